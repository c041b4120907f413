"""Prompt adherence and geometry of the bundled tiny-shapes model, read back from the pixels.

    python benchmarks/quality.py                 # the bundled model (sdkit.TINY_MODEL)
    python benchmarks/quality.py --model DIR     # any shapes pipeline folder
    python benchmarks/quality.py --openvino bf16 # sampled with pipe.compile(backend="openvino", precision="bf16")

Prints one markdown table per prompt set (60 fully specified prompts; 36 short "a COLOR SHAPE"
prompts), then the targets and whether each row meets them. Rows:

* clean renders of the prompts (the judges themselves must be right), and the same renders
  encoded and decoded by the model's VAE (what the VAE alone loses);
* generated images with DDIM, Euler a and DPM++ at the model's recommended settings (its
  recommended_settings.json), at guidance 7.5 with the recommended rescale and guidance end (what
  a call passing only ``guidance_scale=7.5`` gets), at the reference's defaults (7.5, no rescale;
  the model's guidance end still applies), and, when the model recommends a guidance end below 1,
  at 7.5 with no rescale and guidance at every step (``guidance_end=1``: what diffusers, which
  does not read the file, draws from the folder; reported, with no target).

Columns: colour, shape, background, place and size as the shapes judge (``judge.py``, moments)
reads them; **shape (fill)**, the shape class an independent judge reads from how much of its
bounding box the shape fills (``geometry.py``); and the geometry: the mean fill of squares and of
triangles (clean: 1.00 and 0.50-0.53), square corners (mean coverage of the corner patches),
circle roundness (smallest / largest radius) and triangle edge error (RMS px of the row widths
from a straight line). Image i of a row uses seed ``seed + i``, so every number is reproducible.
"""

import argparse
import dataclasses
import itertools
import os
import sys
import time

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import sdkit  # noqa: E402
from sdkit.pipelines.openvino import PRECISIONS  # noqa: E402  (OpenVINO itself is imported only to compile)
from sdkit.schedulers import DDIMScheduler, DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler  # noqa: E402
from sdkit.training import geometry  # noqa: E402
from sdkit.training.judge import judge, score  # noqa: E402
from sdkit.training.shapes import (BACKGROUNDS, COLORS, PLACES, SHAPES, SIZES, Attributes, caption,  # noqa: E402
                                   parse_prompt, render, sample_attributes, to_pixel_values)

ATTRIBUTES = ("color", "shape", "fill shape", "background", "place", "size")
GEOMETRY = ("square fill", "triangle fill", "corners", "roundness", "edge error")
HIGHER_IS_BETTER = {"square fill": True, "triangle fill": None, "corners": True, "roundness": True,
                    "edge error": False}
"""How a geometry measure compares with the VAE round trip's: True higher is better, False lower
is better, None closer to the clean renders' is better (a triangle's fill rises when its corners
round off and falls when its edges are notched)."""
SAMPLERS = (("DDIM", DDIMScheduler), ("Euler a", EulerAncestralDiscreteScheduler),
            ("DPM++", DPMSolverMultistepScheduler))
TARGET_RECOMMENDED, TARGET_HIGH, TARGET_GEOMETRY = 0.97, 0.92, 0.10


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


def clean_renders(prompts, seed):
    """A clean render of each prompt; what a prompt leaves open is drawn at random (fixed seeds)."""
    images = []
    for i, prompt in enumerate(prompts):
        attrs = dataclasses.replace(sample_attributes(np.random.default_rng([seed, i, 1])), **parse_prompt(prompt))
        images.append(render(attrs, np.random.default_rng([seed, i])))
    return images


@torch.no_grad()
def vae_round_trip(vae, images):
    """uint8 images through the VAE (posterior mean), as float (B, H, W, 3) in [0, 1]."""
    x = to_pixel_values(np.stack(images)).to(vae.device, vae.dtype)  # (B, 3, H, W)
    decoded = torch.cat([vae.decode(vae.encode(chunk).mean) for chunk in x.split(60)])
    return (decoded.float() * 0.5 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()


def generate(pipe, prompts, seed, batch=30, **options):
    images = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start:start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images.extend(pipe(chunk, generator=generators, output_type="np", **options).images)
    return images


def _mean(values):
    values = [v for v in values if v is not None]
    return float(np.mean(values)) if values else None


def evaluate(images, prompts):
    """{column: value} for one row: attribute accuracies and mean geometry measures."""
    hits, shapes = {}, []
    measured = [geometry.measure(image) for image in images]
    for image, prompt, geo in zip(images, prompts, measured):
        named = parse_prompt(prompt)
        for name, ok in score(named, judge(image)).items():
            hits.setdefault(name, []).append(ok)
        hits.setdefault("fill shape", []).append(geo is not None and geo.fill_shape == named["shape"])
        shapes.append(named["shape"])
    row = {name: float(np.mean(v)) for name, v in hits.items()}

    def of(shape, field):
        return _mean([getattr(g, field) for g, s in zip(measured, shapes) if s == shape and g is not None])

    row.update({"square fill": of("square", "fill"), "triangle fill": of("triangle", "fill"),
                "corners": of("square", "corners"), "roundness": of("circle", "roundness"),
                "edge error": of("triangle", "edge_error")})
    return row


def geometry_misses(row, vae_row, clean_row):
    """The geometry columns of ``row`` more than ``TARGET_GEOMETRY`` worse than the VAE round trip's."""
    misses = []
    for name in GEOMETRY:
        value, reference, clean = row.get(name), vae_row.get(name), clean_row.get(name)
        if value is None or reference is None:
            continue
        better = HIGHER_IS_BETTER[name]
        if better is True:
            bad = value < (1 - TARGET_GEOMETRY) * reference
        elif better is False:
            bad = value > (1 + TARGET_GEOMETRY) * reference
        else:  # no further from the clean value than the VAE's, give or take 10% of the VAE's value
            bad = abs(value - clean) > abs(reference - clean) + TARGET_GEOMETRY * reference
        if bad:
            misses.append(f"{name} {value:.3f} vs {reference:.3f}")
    return misses


def print_table(title, rows):
    print(f"\n{title}")
    print("| setting | n | " + " | ".join(ATTRIBUTES + GEOMETRY) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in ATTRIBUTES + GEOMETRY) + " |")
    for name, n, row, _ in rows:
        cells = ["" if row.get(a) is None else f"{row[a]:.2f}" for a in ATTRIBUTES]
        cells += ["" if row.get(g) is None else f"{row[g]:.3f}" for g in GEOMETRY]
        print(f"| {name} | {n} | " + " | ".join(cells) + " |")


def settings_of(guidance, rescale, steps, end=1.0):
    """(label, call options, accuracy target) of the guidance settings (the last with no target)."""
    recommended = dict(guidance_scale=guidance, guidance_rescale=rescale, guidance_end=end, num_inference_steps=steps)
    until = f", guidance end {end:g}" if end < 1 else ""
    settings = [
        (f"guidance {guidance:g}, rescale {rescale:g}{until} (recommended)", recommended, TARGET_RECOMMENDED),
        (f"guidance 7.5, rescale {rescale:g}{until}", {**recommended, "guidance_scale": 7.5}, TARGET_HIGH),
        (f"guidance 7.5, rescale 0{until} (reference defaults)",
         {**recommended, "guidance_scale": 7.5, "guidance_rescale": 0.0}, TARGET_HIGH)]
    if end < 1:
        settings.append(("guidance 7.5, rescale 0, every step (as diffusers draws the folder; no target)",
                         {**recommended, "guidance_scale": 7.5, "guidance_rescale": 0.0, "guidance_end": 1.0}, None))
    return settings


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=sdkit.TINY_MODEL)
    parser.add_argument("--guidance-scale", type=float, help="default: the model's recommended scale")
    parser.add_argument("--guidance-rescale", type=float, help="default: the model's recommended rescale")
    parser.add_argument("--guidance-end", type=float, help="default: the model's recommended guidance end, else 1")
    parser.add_argument("--steps", type=int, help="default: the model's recommended steps")
    parser.add_argument("--seed", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--openvino", metavar="PRECISION", choices=PRECISIONS,
                        help=f'sample with pipe.compile(backend="openvino", precision=PRECISION): {" or ".join(PRECISIONS)}')
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe = sdkit.StableDiffusionPipeline.from_pretrained(args.model)
    pipe.set_progress_bar_config(disable=True)
    if args.openvino:
        pipe.compile(backend="openvino", precision=args.openvino)
    recommended = pipe.recommended
    guidance = args.guidance_scale if args.guidance_scale is not None else recommended.get("guidance_scale", 7.5)
    rescale = args.guidance_rescale if args.guidance_rescale is not None else recommended.get("guidance_rescale", 0.0)
    steps = args.steps or recommended.get("num_inference_steps", 50)
    end = args.guidance_end if args.guidance_end is not None else recommended.get("guidance_end", 1.0)
    settings = settings_of(guidance, rescale, steps, end)
    started, failures = time.time(), []
    print(f"model: {os.path.relpath(args.model, ROOT) if args.model.startswith(ROOT) else args.model}; "
          f"recommended settings {recommended.as_dict() or 'none (reference defaults)'}"
          + (f'; pipe.compile(backend="openvino", precision="{args.openvino}")' if args.openvino else ""))
    for title, prompts in (("60 full prompts", full_prompts()), ("36 short prompts", short_prompts())):
        clean = clean_renders(prompts, args.seed)
        vae_row = evaluate(vae_round_trip(pipe.vae, clean), prompts)
        clean_row = evaluate(clean, prompts)
        rows = [("clean renders", len(prompts), clean_row, None),
                ("clean renders through the VAE", len(prompts), vae_row, None)]
        for (label, options, target), (sampler, cls) in itertools.product(settings, SAMPLERS):
            scheduler = cls.from_config(pipe.scheduler.config)
            row = evaluate(generate(pipe, prompts, args.seed, scheduler=scheduler, **options), prompts)
            rows.append((f"{sampler}, {label}", len(prompts), row, target))
        print_table(f"{title}, {steps} steps", rows)
        for name, _, row, target in rows:
            if target is None:
                continue
            low = [f"{a} {row[a]:.2f}" for a in ATTRIBUTES if a in row and row[a] < target]
            misses = low + (geometry_misses(row, vae_row, clean_row) if target == TARGET_RECOMMENDED else [])
            if misses:
                failures.append(f"{title}, {name}: " + ", ".join(misses))
    print(f"\n({time.time() - started:.0f} s)")
    print(f"targets: attributes >= {TARGET_RECOMMENDED} at the recommended settings and >= {TARGET_HIGH} at 7.5; "
          f"geometry at the recommended settings within {TARGET_GEOMETRY:.0%} of the VAE round trip")
    print("all met" if not failures else "not met:\n" + "\n".join(f"- {f}" for f in failures))


if __name__ == "__main__":
    main()
