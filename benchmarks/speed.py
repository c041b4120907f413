"""Speed of sdkit against the reference (diffusers 0.42.1), in one process, as ratios.

    python benchmarks/speed.py [--repeats 5] [--threads N]

Rows: SD 1.5-shaped UNet forward (random weights, CFG batch of 2 at 32x32 latents), SD VAE
decode (32x32 latents -> 256x256), loading a saved SD 1.5-shaped UNet folder, and a whole
txt2img call on a tiny pipeline folder. Each timing is the median of `--repeats` runs after one
warm-up. Ratio = reference time / sdkit time (above 1: sdkit is faster). Needs the test extra.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))


def median_time(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import diffusers
    from helpers import build_reference_pipeline

    from sdkit import StableDiffusionPipeline
    from sdkit.models import AutoencoderKL, UNet2DConditionModel

    rows = []
    torch.manual_seed(0)
    with torch.inference_mode():
        ref_unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(dict(ref_unet.config))
        unet.load_checked_state_dict(ref_unet.state_dict())
        x, ctx = torch.randn(2, 4, 32, 32), torch.randn(2, 77, 768)
        rows.append(("UNet SD1.5 forward, 2x4x32x32",
                     median_time(lambda: ref_unet(x, 500, ctx), args.repeats),
                     median_time(lambda: unet(x, 500, ctx), args.repeats)))

        with tempfile.TemporaryDirectory() as d:
            ref_unet.save_pretrained(d)
            del ref_unet, unet
            rows.append(("UNet SD1.5 from_pretrained (3.4 GB fp32)",
                         median_time(lambda: diffusers.UNet2DConditionModel.from_pretrained(d), 2),
                         median_time(lambda: UNet2DConditionModel.from_pretrained(d), 2)))

        vae_config = dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                          down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)
        ref_vae = diffusers.AutoencoderKL(**vae_config).eval()
        vae = AutoencoderKL.from_config(dict(ref_vae.config))
        vae.load_checked_state_dict(ref_vae.state_dict())
        z = torch.randn(1, 4, 32, 32)
        rows.append(("VAE SD decode, 1x4x32x32 -> 256x256",
                     median_time(lambda: ref_vae.decode(z), args.repeats),
                     median_time(lambda: vae.decode(z), args.repeats)))
        del ref_vae, vae

    with tempfile.TemporaryDirectory() as d:
        build_reference_pipeline(d)
        ref = diffusers.StableDiffusionPipeline.from_pretrained(d, safety_checker=None)
        ref.set_progress_bar_config(disable=True)
        ours = StableDiffusionPipeline.from_pretrained(d)
        ours.set_progress_bar_config(disable=True)
        kw = dict(num_inference_steps=25, guidance_scale=7.5, output_type="np")
        rows.append(("tiny txt2img call, 25 steps, PNDM",
                     median_time(lambda: ref("a red circle", generator=torch.Generator().manual_seed(0), **kw),
                                 args.repeats),
                     median_time(lambda: ours("a red circle", generator=torch.Generator().manual_seed(0), **kw),
                                 args.repeats)))

    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, threads {torch.get_num_threads()}, "
          f"median of {args.repeats}")
    print(f"| {'case':44s} | {'diffusers s':>11s} | {'sdkit s':>9s} | {'ratio':>6s} |")
    print(f"|{'-' * 46}|{'-' * 13}|{'-' * 11}|{'-' * 8}|")
    for name, ref_t, our_t in rows:
        print(f"| {name:44s} | {ref_t:11.4f} | {our_t:9.4f} | {ref_t / our_t:6.2f} |")


if __name__ == "__main__":
    main()
