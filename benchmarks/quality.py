"""Prompt adherence of the bundled tiny-shapes model, read back by the shapes judge.

    python benchmarks/quality.py                 # the bundled model (sdkit.TINY_MODEL)
    python benchmarks/quality.py --model DIR     # any shapes pipeline folder

Prints one markdown table: for each setting, the fraction of images whose judged attribute equals
the prompt's, per attribute the prompts name, and the circle roundness: the mean |square score| of
the images asked for a circle (``judge.measure``; 0 is a round disc, 1 a square, -1 a diamond),
which the shape accuracy does not see. Settings:

* the judge on clean renders of the full prompts (must be 1.0: the judge itself is right);
* 60 fully specified prompts, 25 steps, the model's default scheduler, at the recommended
  guidance scale and at guidance 1.0 (no classifier-free guidance);
* 36 short "a COLOR SHAPE" prompts with DDIM (20 steps), Euler ancestral (20) and DPM-Solver++ (12),
  and for each of these which colours were drawn instead of which; then the same at guidance 1.0.

Image i of a setting uses seed ``seed + i``, so every number is reproducible.
"""

import argparse
import itertools
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import sdkit  # noqa: E402
from sdkit.cli import BUNDLED_GUIDANCE, BUNDLED_GUIDANCE_RESCALE  # noqa: E402  (the model card's recommendation)
from sdkit.schedulers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler  # noqa: E402
from sdkit.training.judge import measure, score  # noqa: E402
from sdkit.training.shapes import (BACKGROUNDS, COLORS, PLACES, SHAPES, SIZES, Attributes, caption,  # noqa: E402
                                   parse_prompt, render)

ATTRIBUTES = ("color", "shape", "background", "place", "size")


def full_prompts(n=60, seed=0):
    """``n`` distinct fully specified prompts in which every value of every attribute appears equally often.

    Each attribute's column holds its values in equal numbers (for n = 60: 10 per colour, 20 per shape
    and background, 12 per place, 30 per size), shuffled independently by a fixed seed, so every
    value meets many values of the others.
    """
    tables = {"color": list(COLORS), "shape": list(SHAPES), "place": list(PLACES), "size": list(SIZES),
              "background": list(BACKGROUNDS)}
    rng = np.random.default_rng(seed)
    while True:
        columns = {name: rng.permutation(np.resize(np.arange(len(values)), n)) for name, values in tables.items()}
        combos = [Attributes(**{name: tables[name][columns[name][i]] for name in tables}) for i in range(n)]
        if len(set(combos)) == n:
            return [caption(a) for a in combos]


def short_prompts(repeats=2):
    return [f"a {c} {s}" for c, s in itertools.product(COLORS, SHAPES)] * repeats


def accuracy(judged, prompts):
    """Per attribute the prompts name, the fraction of judged images (``judge`` results) that have it."""
    hits = {}
    for attrs, prompt in zip(judged, prompts):
        for name, ok in score(parse_prompt(prompt), attrs).items():
            hits.setdefault(name, []).append(ok)
    return {name: float(np.mean(v)) for name, v in hits.items()}


def generate(pipe, prompts, steps, guidance, seed, scheduler=None, batch=30, guidance_rescale=0.0, **options):
    """Images of ``prompts``, image i from seed ``seed + i``; ``options``: more call options."""
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk, num_inference_steps=steps, guidance_scale=guidance, generator=generators,
                   output_type="np", scheduler=scheduler, guidance_rescale=guidance_rescale, **options)
        images.extend(out.images)
    return images


def circle_roundness(scores, prompts):
    """Mean |square score| of the images whose prompt asks for a circle (0: a round disc; a square
    has 1, a diamond -1): how well drawn the circles are, which the circle/square/triangle
    accuracy does not see. ``None`` when no such image has a measured shape."""
    values = [abs(s[1]) for s, prompt in zip(scores, prompts) if parse_prompt(prompt)["shape"] == "circle" and s]
    return float(np.mean(values)) if values else None


def colour_misses(judged, prompts):
    """``{"asked->drawn": count}`` over the judged images whose colour differs from the prompt's."""
    counts = {}
    for attrs, prompt in zip(judged, prompts):
        asked, drawn = parse_prompt(prompt)["color"], attrs.color
        if drawn != asked:
            counts[f"{asked}->{drawn}"] = counts.get(f"{asked}->{drawn}", 0) + 1
    return dict(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))


def clean_renders(prompts, seed):
    images = []
    for i, prompt in enumerate(prompts):
        attrs = parse_prompt(prompt)
        images.append(render(Attributes(**attrs), np.random.default_rng([seed, i])))
    return images


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sdkit.TINY_MODEL)
    parser.add_argument("--guidance-scale", type=float, default=BUNDLED_GUIDANCE)
    parser.add_argument("--guidance-rescale", type=float, default=BUNDLED_GUIDANCE_RESCALE,
                        help="guidance_rescale (0: off)")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = sdkit.StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    full, short = full_prompts(), short_prompts()
    default_name = type(pipe.scheduler).__name__
    config = pipe.scheduler.config
    judged, scores = zip(*[measure(image) for image in clean_renders(full, args.seed)])
    rows = [("judge on clean renders (60 full prompts)", len(full), accuracy(judged, full),
             circle_roundness(scores, full))]
    # (label, prompts, steps, guidance, scheduler, sampler: set for the short prompts, whose colour misses are listed)
    settings = [
        (f"60 full prompts, {default_name} 25 steps, guidance {args.guidance_scale:g}", full, 25,
         args.guidance_scale, None, None),
        (f"60 full prompts, {default_name} 25 steps, guidance 1.0", full, 25, 1.0, None, None),
    ]
    samplers = (("DDIM", 20, DDIMScheduler), ("Euler a", 20, EulerAncestralDiscreteScheduler),
                ("DPM++", 12, DPMSolverMultistepScheduler))
    for sampler, steps, cls in samplers:
        settings.append((f"36 short prompts, {sampler} {steps} steps, guidance {args.guidance_scale:g}", short,
                         steps, args.guidance_scale, cls.from_config(config), f"{sampler} {steps} steps"))
    for sampler, steps, cls in samplers:
        settings.append((f"36 short prompts, {sampler} {steps} steps, guidance 1.0", short, steps, 1.0,
                         cls.from_config(config), None))
    started = time.time()
    misses = {}
    for name, prompts, steps, guidance, scheduler, sampler in settings:
        images = generate(pipe, prompts, steps, guidance, args.seed, scheduler, guidance_rescale=args.guidance_rescale)
        judged, scores = zip(*[measure(image) for image in images])
        rows.append((name, len(prompts), accuracy(judged, prompts), circle_roundness(scores, prompts)))
        if sampler:
            misses[sampler] = colour_misses(judged, prompts)

    print(f"model: {os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT) else args.model}"
          + (f", guidance_rescale {args.guidance_rescale:g}" if args.guidance_rescale else ""))
    print("| setting | n | " + " | ".join(ATTRIBUTES) + " | circle roundness |")
    print("| --- | --- | " + " | ".join("---" for _ in ATTRIBUTES) + " | --- |")
    for name, n, acc, roundness in rows:
        cells = [f"{acc[a]:.2f}" if a in acc else "" for a in ATTRIBUTES]
        cells.append("" if roundness is None else f"{roundness:.3f}")
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")
    print(f"({time.time() - started:.0f} s of sampling)")
    for name, counts in misses.items():
        print(f"short-prompt colour misses, {name}: " + (", ".join(f"{k} {v}" for k, v in counts.items()) or "none"))


if __name__ == "__main__":
    main()
