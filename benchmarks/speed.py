"""Speed of sdkit against the reference (diffusers 0.42.1) at SD 1.5 shapes, in one process, as ratios.

    python benchmarks/speed.py [--repeats 3] [--steps 20] [--threads N] [--cases unet,vae512,...]
    python benchmarks/speed.py --fewer-unet-calls     # also DeepCache k = 2, 3, 5 and guidance_end

Random weights in the SD 1.5 shapes (UNet 860M, VAE 84M, CLIP ViT-L/14 text encoder 123M),
float32 on the CPU; sdkit's models hold copies of the reference's weights. Cases:

* ``unet``: one UNet step, batch 2 (classifier-free guidance), 64x64 latents (512x512 images);
* ``vae512``, ``vae768``: a VAE decode of 64x64 and 96x96 latents;
* ``text``: encoding a prompt and the empty negative prompt (77 tokens each);
* ``txt2img``: a whole 512x512 (``--size``) txt2img call, ``--steps`` PNDM steps, guidance 7.5;
* ``lora``: the UNet step with a rank-16 LoRA on its 160 attention and feed-forward layers, unfused
  (the reference's through peft, ``load_lora_weights``; sdkit's per call).

The ``unet`` and ``txt2img`` cases have a compiled side, sdkit with ``pipe.compile(backend="inductor")``
(torch.compile; on a CPU with the weights frozen into the graph; ``--no-inductor`` leaves it out;
its compile, 1.5-2.5 min for the SD 1.5 UNet on 2 cores, is timed apart and the txt2img case
reuses it). With OpenVINO installed (``pip install "sdkit[openvino]"``; ``--no-openvino`` leaves it
out) the ``unet``, VAE and ``txt2img`` cases have another, sdkit with ``pipe.compile(backend="openvino")``
(its one-off conversion and compilation, or its load from the disk cache, is timed apart). Each
compiled txt2img side is warmed by a one-step call that decodes too.

To keep a bare run short (the issue's aim is 20 minutes on a 2-core CPU; a bare run took 26 min
50 s on 2026-12-03 with a cold OpenVINO cache, 4 min of it compiles, and 21 min 51 s with the
cache warm; with the inductor sides, 16 min 23 s on 2026-12-08 with the caches warm:
benchmarks/RESULTS.md), it leaves sides out, which ``--all-sides`` adds: the OpenVINO
side of the 768x768 decode; in the whole txt2img, the eager sdkit side when a compiled side is
there, and of the two compiled float32 sides the one slower in the UNet case (both when the UNet
case did not time both). The VAE and LoRA cases time one round fewer than ``--repeats`` (the 768
decode two fewer, at least one).

The sides run in rotation (who goes first rotates too) after a warm-up round (in the VAE cases
the eager sdkit side is not warmed, and in the LoRA case only the reference is: the eager sides run
the same convolutions, so one side's first call sets up oneDNN's kernels for both; the whole calls
get none when the UNet and 512 decode cases have warmed the models at 512x512), so load
from other processes falls on all; the ratio is the median over the rounds of reference time /
sdkit time (above 1: sdkit is faster); the CPU ratio is the same over the process's CPU time,
which other processes on a shared machine disturb far less (with one thread, ``--threads 1``, it
is the work done; with more, idle threads' spinning counts too). Outputs are compared (the
largest relative error, or for txt2img the largest pixel difference in [0, 1]). Peak RSS: the
largest resident memory seen (sampled every 5 ms) while a side ran, above the process's before
the case.

``--fewer-unet-calls`` adds sdkit-only rows: the whole txt2img with ``deep_cache_interval`` 2, 3, 5
(``--deep-cache-intervals``) and ``guidance_end`` 0.5, each against sdkit's plain run (alternating
likewise). Needs the test extra (diffusers, peft).
"""

import argparse
import os
import statistics
import sys
import threading
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

CASES = ("unet", "vae512", "vae768", "text", "txt2img", "lora")
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss():
    """This process's resident memory in bytes (/proc/self/statm)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE


class PeakRSS:
    """Context manager: the largest RSS seen while inside, sampled every 5 ms by a thread."""

    def __init__(self):
        self.peak = 0

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self._stop.wait(0.005)

    def __enter__(self):
        self._stop = threading.Event()
        self.peak = rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss())


def alternate(reference, ours, pairs, warm_up=True, name="sdkit", **others):
    """Time ``reference()``, ``ours()`` and any ``others`` (name -> function) in rotation (one warm-up
    round first: of every side when ``warm_up`` is True, of none when False, or of the sides it names;
    the order rotates each round); returns a dict per side other than the reference (``ours`` under
    ``name``) with the median times, the median of the rounds' time ratios reference / side, the
    outputs and peak RSS above the start, under the side's name."""
    base = rss()
    fns = {"reference": reference, name: ours, **others}
    names = list(fns)
    warmed = set(names) if warm_up is True else set(warm_up or ())
    out, peaks = {}, dict.fromkeys(names, 0)
    times, cpu = {n: [] for n in names}, {n: [] for n in names}
    for i in range(0 if warmed else 1, pairs + 1):  # round 0 is the warm-up
        order = names[i % len(names):] + names[:i % len(names)]
        elapsed, used = {}, {}
        for side in order if i else [n for n in order if n in warmed]:
            with PeakRSS() as peak, torch.inference_mode():
                start, start_cpu = time.perf_counter(), time.process_time()
                out[side] = fns[side]()
                elapsed[side] = time.perf_counter() - start
                used[side] = time.process_time() - start_cpu
            peaks[side] = max(peaks[side], peak.peak - base)
            if i:
                times[side].append(elapsed[side])
                cpu[side].append(used[side])
        print(f"    round {i}{'' if i else ' (warm-up)'}: " + ", ".join(
            f"{n} {elapsed[n]:.2f} s ({used[n]:.2f} CPU s)" for n in names if n in elapsed), flush=True)
    results = {}
    for side in names[1:]:
        ratios = [r / s for r, s in zip(times["reference"], times[side])]
        cpu_ratios = [r / s for r, s in zip(cpu["reference"], cpu[side])]
        results[side] = dict(reference=statistics.median(times["reference"]), sdkit=statistics.median(times[side]),
                             ratio=statistics.median(ratios), cpu_ratio=statistics.median(cpu_ratios),
                             cpu=(statistics.median(cpu["reference"]), statistics.median(cpu[side])),
                             outputs=(out["reference"], out[side]), rss=(peaks["reference"], peaks[side]))
    return results


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def sd15_models():
    """The reference's SD 1.5-shaped models with random weights, and sdkit's copies of them."""
    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdkit.models import AutoencoderKL, UNet2DConditionModel

    torch.manual_seed(0)
    ref_unet = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
    ref_vae = diffusers.AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4).eval()
    text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=768, intermediate_size=3072, num_attention_heads=12,
                                                num_hidden_layers=12, projection_dim=768)).eval()

    def port(ref, cls):
        with torch.device("meta"):
            ours = cls.from_config(dict(ref.config))
        ours.load_checked_state_dict(ref.state_dict())
        return ours.eval()

    return ref_unet, port(ref_unet, UNet2DConditionModel), ref_vae, port(ref_vae, AutoencoderKL), text_encoder


def pipelines(ref_unet, unet, ref_vae, vae, text_encoder):
    """The reference's and sdkit's txt2img pipelines on those models (one shared text encoder:
    both use transformers' CLIPTextModel)."""
    import diffusers

    from sdkit import StableDiffusionPipeline
    from sdkit.clip_vocab import SD1_PAD, clip_tokenizer
    from sdkit.schedulers import PNDMScheduler

    tokenizer = clip_tokenizer(SD1_PAD, 77)
    betas = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                 skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    scheduler = diffusers.PNDMScheduler(**betas)
    ref = None if ref_unet is None else diffusers.StableDiffusionPipeline(
        vae=ref_vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=ref_unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    ours = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=PNDMScheduler.from_config(dict(scheduler.config)))
    if ref is not None:
        ref.set_progress_bar_config(disable=True)
    ours.set_progress_bar_config(disable=True)
    return ref, ours


# each side's row label after the case's name
LABELS = {"sdkit": "", "inductor": ', pipe.compile(backend="inductor")',
          "openvino": ', pipe.compile(backend="openvino")',
          "bf16": ', pipe.compile(backend="openvino", precision="bf16") (not the same outputs)'}


def labelled(results):
    """(row label, result) of each side in ``alternate``'s results, eager sdkit first."""
    return [(label, results[side]) for side, label in LABELS.items() if side in results]


def openvino_sides(args):
    """{side: OpenVINO precision} of the compiled sides this run times."""
    return {"openvino": "f32", **({"bf16": "bf16"} if args.bf16 else {})}


def compiled_in(side, start):
    print(f"    OpenVINO{'' if side == 'openvino' else ' ' + side}: converted and compiled (or loaded from its disk "
          f"cache) in {time.perf_counter() - start:.0f} s", flush=True)


def row(name, result, error, error_kind="rel err"):
    return dict(name=name, error=f"{error:.1e} {error_kind}", **result)


def openvino_available():
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def run_cases(args, models, rows):
    ref_unet, unet, ref_vae, vae, text_encoder = models
    ref, ours = pipelines(*models)
    del models
    prompt = "a photograph of an astronaut riding a horse"
    threads = torch.get_num_threads()
    openvino = args.openvino and ref is not None
    inductor = None  # sdkit's pipeline with pipe.compile(backend="inductor"), once compiled
    if args.inductor and ref is not None:
        from sdkit import StableDiffusionPipeline

        inductor = StableDiffusionPipeline(**ours.components).compile(backend="inductor")
        inductor.set_progress_bar_config(disable=True)
    unet_times = {}  # UNet case: the compiled sides' median step times
    if "unet" in args.cases:
        print("UNet step", flush=True)
        g = torch.Generator().manual_seed(1)
        # inference tensors, as in a pipeline call: the txt2img case reuses inductor's graph
        with torch.inference_mode():
            x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
            t = torch.tensor(500)
        others = {}
        for side, precision in openvino_sides(args).items() if openvino else ():
            from sdkit.pipelines.openvino import OpenVINOUNet

            start = time.perf_counter()
            compiled = OpenVINOUNet(unet, threads=threads, precision=precision)
            compiled.compiled(x.shape, ctx.shape)
            compiled_in(side, start)
            others[side] = lambda compiled=compiled: compiled(x, t, ctx)
        if inductor is not None:
            start = time.perf_counter()
            with torch.inference_mode():
                inductor._compiled_unet(x, t, ctx)
            print(f"    inductor: compiled in {time.perf_counter() - start:.0f} s", flush=True)
            others["inductor"] = lambda: inductor._compiled_unet(x, t, ctx)
        r = alternate(lambda: ref_unet(x, t, ctx).sample, lambda: unet(x, t, ctx), args.repeats, **others)
        for label, res in labelled(r):
            rows.append(row(f"UNet step, batch 2, 64x64 latents{label}", res,
                            rel_err(res["outputs"][1], res["outputs"][0])))
        unet_times = {side: res["sdkit"] for side, res in r.items() if side in ("inductor", "openvino")}
        # OpenVINO's compiled models (gigabytes for SD 1.5): the txt2img case compiles its own (inductor's is kept)
        others = compiled = None
    for size in (512, 768):
        if f"vae{size}" in args.cases:
            print(f"VAE decode {size}", flush=True)
            z = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(2))
            pairs = max(1, args.repeats - (1 if size == 512 else 2))
            others = {}
            for side, precision in openvino_sides(args).items() if openvino and (size == 512 or args.all_sides) else ():
                from sdkit.pipelines.openvino import OpenVINODecoder

                start = time.perf_counter()
                compiled = OpenVINODecoder(vae, threads=threads, precision=precision)
                compiled.shapes.compiled((z,))
                compiled_in(side, start)
                others[side] = lambda compiled=compiled: compiled(z)
            # the eager sides run the same convolutions, so one side's warm-up sets up oneDNN's kernels for both
            r = alternate(lambda: ref_vae.decode(z).sample, lambda: vae.decode(z), pairs, {"reference", *others},
                          **others)
            for label, res in labelled(r):
                rows.append(row(f"VAE decode, {size}x{size}{label}", res,
                                rel_err(res["outputs"][1], res["outputs"][0])))
            others = compiled = None
    if "text" in args.cases:
        print("text encoding", flush=True)
        from sdkit.text import encode_prompts

        def reference():
            cond, uncond = ref.encode_prompt(prompt, "cpu", 1, True, "")
            return torch.cat([uncond, cond])

        def sdkit_side():
            cond, uncond = encode_prompts(text_encoder, ours.tokenizer, [prompt], [""])
            return torch.cat([uncond, cond])

        r = alternate(reference, sdkit_side, args.repeats * 3)["sdkit"]
        rows.append(row("text encoding, prompt + negative", r, rel_err(r["outputs"][1], r["outputs"][0])))
    kw = dict(num_inference_steps=args.steps, guidance_scale=7.5, output_type="np", height=args.size, width=args.size)

    def txt2img(pipe, **extra):
        return lambda: pipe(prompt, generator=torch.Generator().manual_seed(3), **kw, **extra).images

    if "txt2img" in args.cases:
        print(f"txt2img, {args.steps} steps", flush=True)
        # the compiled float32 sides: the faster in the UNet case when it timed both (--all-sides: both)
        backends = [side for side, on in (("inductor", inductor is not None), ("openvino", openvino)) if on]
        if len(unet_times) == 2 and not args.all_sides:
            backends = [min(unet_times, key=unet_times.get)]
        sides = {}
        for side in backends + (["bf16"] if openvino and args.bf16 else []):
            if side == "inductor":
                compiled = inductor
            else:
                from sdkit import StableDiffusionPipeline

                compiled = StableDiffusionPipeline(**ours.components).compile(
                    backend="openvino", threads=threads, precision=openvino_sides(args)[side])
                compiled.set_progress_bar_config(disable=True)
            start = time.perf_counter()  # a one-step call compiles (or loads) the UNet (and decoder) for this size
            compiled(prompt, num_inference_steps=1, output_type="np", height=args.size, width=args.size)
            print(f"    {side} pipeline: first (1-step) call {time.perf_counter() - start:.0f} s", flush=True)
            sides[side] = txt2img(compiled)
        if not sides or args.all_sides:
            sides = {"sdkit": txt2img(ours), **sides}
        first, *others = sides
        r = alternate(txt2img(ref), sides[first], args.txt2img_pairs, args.warm_txt2img, first,
                      **{side: sides[side] for side in others})
        for label, res in labelled(r):
            a, b = res["outputs"]
            rows.append(row(f"whole txt2img {args.size}x{args.size}, {args.steps} steps{label}", res,
                            float(abs(a - b).max()), "max abs diff"))
    if "lora" in args.cases:
        print("UNet step with a LoRA", flush=True)
        from lora_speed import kohya_lora

        from sdkit.per_call import using

        g = torch.Generator().manual_seed(1)
        x, ctx = torch.randn(2, 4, 64, 64, generator=g), torch.randn(2, 77, 768, generator=g)
        t = torch.tensor(500)
        lora = kohya_lora(unet, 16)
        ref.load_lora_weights(dict(lora), adapter_name="lora")  # peft layers, unfused
        ours.load_lora_weights(dict(lora), adapter_name="lora")
        plan = ours.networks_for_call(adapters={"lora": 1.0}).unet

        def sdkit_side():
            with using(plan):
                return unet(x, t, ctx)

        # the UNet case ran these convolutions; one warm-up call sets up what the LoRA layers add
        r = alternate(lambda: ref_unet(x, t, ctx).sample, sdkit_side, max(1, args.repeats - 1), {"reference"})["sdkit"]
        ref.unload_lora_weights()
        ours.unload_lora_weights()
        rows.append(row(f"UNet step with a rank-16 LoRA on {len(plan)} layers (unfused; the reference's through peft)",
                        r, rel_err(r["outputs"][1], r["outputs"][0])))
    if args.fewer_unet_calls:
        if "txt2img" not in args.cases:
            ours(prompt, num_inference_steps=1, output_type="np", height=args.size, width=args.size)  # warm-up
        for extra in [dict(deep_cache_interval=k) for k in args.deep_cache_intervals] + [dict(guidance_end=0.5)]:
            name = ", ".join(f"{k}={v}" for k, v in extra.items())
            print(f"txt2img, {name}", flush=True)
            r = alternate(txt2img(ours), txt2img(ours, **extra), args.txt2img_pairs, args.txt2img_warm_up)["sdkit"]
            a, b = r["outputs"]
            rows.append(row(f"txt2img {name} (vs sdkit plain)", r, float(abs(a - b).max()), "max abs diff"))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="timed pairs per component case (after a warm-up)")
    parser.add_argument("--txt2img-pairs", type=int, default=1, help="timed pairs of whole txt2img calls")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=512, help="txt2img image side in pixels")
    parser.add_argument("--txt2img-warm-up", action="store_true",
                        help="a warm-up pair before the whole calls too (by default only when the unet and vae512 "
                             "cases did not warm the models at 512x512 first)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default=",".join(CASES),
                        help=f"comma-separated subset of {', '.join(CASES)} (empty: only --fewer-unet-calls)")
    parser.add_argument("--fewer-unet-calls", action="store_true", help="add the DeepCache and guidance_end rows")
    parser.add_argument("--deep-cache-intervals", default="2,3,5", type=lambda v: [int(k) for k in v.split(",") if k],
                        help="the DeepCache intervals of --fewer-unet-calls")
    parser.add_argument("--all-sides", action="store_true",
                        help="add the sides a bare run leaves out: OpenVINO at 768x768, eager sdkit in the whole txt2img")
    parser.add_argument("--bf16", action="store_true",
                        help='add OpenVINO bfloat16 sides (precision="bf16") to the UNet, 512 decode and txt2img '
                             'cases (CPUs with bfloat16 instructions)')
    parser.add_argument("--no-openvino", dest="openvino", action="store_false",
                        help="leave out the OpenVINO sides (left out anyway without openvino)")
    parser.add_argument("--no-inductor", dest="inductor", action="store_false",
                        help='leave out the pipe.compile(backend="inductor") sides of the UNet and txt2img cases')
    args = parser.parse_args()
    args.cases = set(args.cases.split(",")) - {""}
    # whoever first runs a new shape pays for oneDNN's kernel set-up: warm up unless the cases before did
    args.warm_txt2img = args.txt2img_warm_up or not ({"unet", "vae512"} <= args.cases and args.size == 512)
    args.openvino = args.openvino and openvino_available()
    if args.bf16:  # refused now rather than after minutes of float32 cases
        if not args.openvino:
            parser.error("--bf16 adds OpenVINO sides: install openvino and leave out --no-openvino")
        import openvino

        from sdkit.pipelines.openvino import check_precision

        try:
            check_precision(openvino.Core(), "bf16")
        except ValueError as e:
            parser.error(str(e))
    unknown = args.cases - set(CASES)
    if unknown:
        parser.error(f"unknown cases {sorted(unknown)}; choose from {', '.join(CASES)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import diffusers

    start = time.perf_counter()
    rows = []
    with torch.inference_mode():
        models = sd15_models()
    if not args.cases:  # the fewer-UNet-calls rows alone compare sdkit with itself
        models = (None, models[1], None, models[3], models[4])
    run_cases(args, models, rows)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    print(f"\n{cpu}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads), "
          f"diffusers {diffusers.__version__}, float32; ratio: median of alternating pairs ({args.repeats} for the UNet, "
          f"fewer for the VAE and LoRA: see --help; {args.txt2img_pairs} for the whole txt2img); "
          f"{time.perf_counter() - start:.0f} s in all")
    print("| case | reference s | sdkit s | ratio | CPU s reference / sdkit | CPU ratio | outputs | "
          "peak RSS reference / sdkit (MB) |")
    print("|---|---:|---:|---:|---:|---:|---|---:|")
    for r in rows:
        print(f"| {r['name']} | {r['reference']:.2f} | {r['sdkit']:.2f} | {r['ratio']:.2f} | "
              f"{r['cpu'][0]:.2f} / {r['cpu'][1]:.2f} | {r['cpu_ratio']:.2f} | {r['error']} | "
              f"{r['rss'][0] / 2**20:.0f} / {r['rss'][1] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
