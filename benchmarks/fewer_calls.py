"""Prompt adherence with fewer UNet calls (DeepCache, guidance_end) on the bundled model, by the shapes judge.

    python benchmarks/fewer_calls.py [--steps 25] [--threads N]

The 60 fully specified prompts of ``quality.py`` (colour, shape, place, size, background) with the
model's default scheduler, and its 36 short "a COLOR SHAPE" prompts with DDIM 20 steps, at the
model's recommended settings, image i from seed 1000 + i, once per setting: plain (the recommended
settings, the model's own guidance end included); ``deep_cache_interval`` 2, 3, 5 (branch 0);
``guidance_end`` 1 (every step), 0.7 and 0.5; and VAE tiling with tiles of 32 pixels, so
every 64 x 64 decode is tiled (the judge's result should not change). Per setting: the judged
accuracy of each attribute the prompts name, their mean in points (100 = every named attribute
of every image right; "fill shape" is the geometry's reading of the shape) and its change from
the plain run, the circles' roundness (``quality.py``'s geometry, higher is rounder),
the mean absolute pixel difference (0-1) from the plain run's images, the UNet evaluations per
image (a guided call counts 2; a shallow DeepCache call is one evaluation of the shallow path)
and the seconds of sampling (on a shared machine only a rough guide; the speed of these
settings at SD 1.5 shapes is ``speed.py --fewer-unet-calls``).
"""

import argparse
import copy
import math
import os
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from quality import ATTRIBUTES, ROOT, evaluate, full_prompts, generate, short_prompts  # noqa: E402

import sdkit  # noqa: E402
from sdkit.schedulers import DDIMScheduler  # noqa: E402

TILE = 32  # the bundled model's images are 64 x 64: tiles of 32 pixels (4 latents) overlapping by 8
SETTINGS = (("plain", {}), ("deep_cache_interval=2", dict(deep_cache_interval=2)),
            ("deep_cache_interval=3", dict(deep_cache_interval=3)), ("deep_cache_interval=5", dict(deep_cache_interval=5)),
            ("guidance_end=1.0", dict(guidance_end=1.0)), ("guidance_end=0.7", dict(guidance_end=0.7)), ("guidance_end=0.5", dict(guidance_end=0.5)),
            (f"VAE tiling, {TILE}-pixel tiles", "tiled"))


def calls(steps, deep_cache_interval=1, guidance_end=1.0):
    """(whole UNet evaluations, shallow-path evaluations) per image: a guided call evaluates two
    (the [uncond; cond] batch), and DeepCache runs the whole UNet on every interval-th call."""
    guided = math.ceil(guidance_end * steps - 1e-9)  # as truncate_guidance: the first fraction of the calls
    whole = shallow = 0
    for i in range(steps):
        batch = 2 if i < guided else 1
        if i % deep_cache_interval == 0:
            whole += batch
        else:
            shallow += batch
    return whole, shallow


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sdkit.TINY_MODEL)
    parser.add_argument("--steps", type=int, help="default: the model's recommended steps")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = sdkit.StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    full, short = full_prompts(), short_prompts()
    steps = args.steps or pipe.recommended.get("num_inference_steps", 50)
    generate(pipe, full[:2], args.seed, num_inference_steps=2)  # warm-up: the first call's one-time costs
    blocks = ((f"{len(full)} full prompts, {type(pipe.scheduler).__name__} {steps} steps", full, steps, None),
              (f"{len(short)} short prompts, DDIM 20 steps", short, 20, DDIMScheduler.from_config(pipe.scheduler.config)))
    model = os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT) else args.model
    print(f"model: {model}; the recommended settings {pipe.recommended.as_dict()}")
    print("| prompts | setting | " + " | ".join(ATTRIBUTES) + " | mean (points) | change | roundness | "
          "mean abs diff from plain | UNet evaluations: whole + shallow | sampling s |")
    print("|---|---|" + "---:|" * (len(ATTRIBUTES) + 6), flush=True)
    tiled = sdkit.StableDiffusionPipeline.from_pipe(pipe, vae=copy.deepcopy(pipe.vae))
    tiled.enable_vae_tiling(tile_sample_min_size=TILE)
    for label, prompts, steps, scheduler in blocks:
        plain = None
        for name, options in SETTINGS:
            runner, options = (tiled, {}) if options == "tiled" else (pipe, options)
            started = time.perf_counter()
            images = np.stack(generate(runner, prompts, args.seed, num_inference_steps=steps, scheduler=scheduler,
                                       **options))
            seconds = time.perf_counter() - started
            acc = evaluate(images, prompts)
            named = [a for a in ATTRIBUTES if acc.get(a) is not None]
            points = 100 * float(np.mean([acc[a] for a in named]))
            if plain is None:
                plain = (points, images)
            whole, shallow = calls(steps, **{"guidance_end": pipe.recommended.get("guidance_end", 1.0), **options})
            cells = [f"{acc[a]:.2f}" if a in named else "" for a in ATTRIBUTES]
            roundness = "" if acc.get("roundness") is None else f"{acc['roundness']:.3f}"
            print(f"| {label} | {name} | " + " | ".join(cells) + f" | {points:.1f} | {points - plain[0]:+.1f} | "
                  f"{roundness} | {np.abs(images - plain[1]).mean():.4f} | "
                  f"{whole} + {shallow} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()
