"""Peak resident memory of sdkit against image size, with and without VAE tiling, one process per case.

    python benchmarks/memory.py [--sizes 512,1024,1536,2048] [--max-gb 8] [--txt2img-sizes 512]

Random weights in the SD 1.5 shapes, float32 on the CPU. Each case runs in a fresh child process,
which reports its peak RSS (``ru_maxrss``) and its RSS once the models are built (the weights).
Cases: a VAE decode of one image of each size, untiled and with ``vae.enable_tiling()`` (tiles of
512 pixels overlapping by a quarter); a whole one-step txt2img call (guidance, so a UNet batch
of 2, then a tiled decode) at ``--txt2img-sizes``. A case whose memory estimate
(``sdkit.pipelines.memory``) exceeds ``--max-gb`` is not run; its estimate is printed instead.
Slow on a small CPU: a 2048x2048 decode is about 16 times a 512x512 one.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))


SD_VAE = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
              down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)


def child(case, size, tiled):
    """Run one case in this process; print a JSON line with the RSS figures."""
    import torch

    from sdkit.models import AutoencoderKL, UNet2DConditionModel

    from speed import rss

    torch.set_num_threads(int(os.environ.get("SDKIT_BENCH_THREADS", "1")))
    with torch.inference_mode():
        torch.manual_seed(0)
        vae = AutoencoderKL.from_config(SD_VAE).eval()
        if case == "vae":
            if tiled:
                vae.enable_tiling()
            z = torch.randn(1, 4, size // 8, size // 8)
            base = rss()
            start = time.perf_counter()
            image = vae.decode(z)
            assert image.shape == (1, 3, size, size)
        else:
            from transformers import CLIPTextConfig, CLIPTextModel

            from sdkit import StableDiffusionPipeline
            from sdkit.clip_vocab import SD1_PAD, clip_tokenizer
            from sdkit.schedulers import PNDMScheduler

            text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                        num_hidden_layers=12)).eval()
            ours = StableDiffusionPipeline(
                unet=UNet2DConditionModel.from_config(dict(cross_attention_dim=768, sample_size=64)).eval(), vae=vae,
                text_encoder=text_encoder, tokenizer=clip_tokenizer(SD1_PAD, 77),
                scheduler=PNDMScheduler.from_config(dict(skip_prk_steps=True, steps_offset=1, beta_schedule="scaled_linear",
                                                         beta_start=0.00085, beta_end=0.012)))
            ours.set_progress_bar_config(disable=True)
            if tiled:
                ours.enable_vae_tiling()
            base = rss()
            start = time.perf_counter()
            image = ours("a red circle", num_inference_steps=1, height=size, width=size, output_type="np",
                         generator=torch.Generator().manual_seed(0), allow_large=True).images
            assert image.shape == (1, size, size, 3)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    print(json.dumps(dict(base=base, peak=peak, seconds=time.perf_counter() - start)))


def estimate(case, size, tiled):
    """sdkit's own memory estimate of the case's work above the weights, in bytes."""
    from sdkit.pipelines import memory

    config = dict(block_out_channels=list(SD_VAE["block_out_channels"]))
    vae = memory.vae_bytes(config, size, size, 1, 4, tile=512 if tiled else None)
    if case == "vae":
        return vae
    unet = dict(block_out_channels=[320, 640, 1280, 1280], layers_per_block=2,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"])
    h = size // 8
    return max(memory.unet_bytes(unet, h, h, 2, 4), vae)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="512,1024,1536,2048")
    parser.add_argument("--txt2img-sizes", default="512")
    parser.add_argument("--max-gb", type=float, default=8.0, help="skip cases whose estimate exceeds this")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        case, size, tiled = args.child
        return child(case, int(size), tiled == "tiled")
    cases = [("vae", int(s), t) for s in args.sizes.split(",") for t in ("untiled", "tiled")]
    cases += [("txt2img", int(s), "tiled") for s in args.txt2img_sizes.split(",") if s]
    print("| case | size | VAE tiling | peak RSS (MB) | above the weights (MB) | seconds |")
    print("|---|---:|---|---:|---:|---:|", flush=True)
    for case, size, tiled in cases:
        guess = estimate(case, size, tiled == "tiled")
        name = "VAE decode" if case == "vae" else "txt2img, 1 step"
        if guess > args.max_gb * 2**30:
            print(f"| {name} | {size} | {tiled} | not run | estimate {guess / 2**20:.0f} | |", flush=True)
            continue
        out = subprocess.run([sys.executable, __file__, "--child", case, str(size), tiled], capture_output=True,
                             text=True)
        if out.returncode:
            print(f"| {name} | {size} | {tiled} | failed: {out.stderr.strip().splitlines()[-1]} | | |", flush=True)
            continue
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {name} | {size} | {tiled} | {r['peak'] / 2**20:.0f} | {(r['peak'] - r['base']) / 2**20:.0f} | "
              f"{r['seconds']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
