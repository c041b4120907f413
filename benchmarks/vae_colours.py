"""How far apart a shapes VAE keeps the six colours in its latents, and whether its decoder reads them back.

    python benchmarks/vae_colours.py                      # the bundled model's VAE
    python benchmarks/vae_colours.py RUN_OR_MODEL ...     # folders with a vae/ subfolder

The UNet samples latents with some error; a colour survives that only if the latents of different
colours are further apart than the error. Two measurements, all in the unit-variance latents the
UNet models (``scaling_factor`` applied):

* **gap**: each of 120 random layouts is drawn in all six colours (same shape, place, size,
  background, jitter); the median latent distance of every colour pair over those layouts, and the
  smallest of those medians (the pair most easily confused);
* **gap at shape pixels**: 40 layouts drawn in every colour on every background; at the latent
  positions the shape covers, the distance from each colour to the nearest *other* colour on the
  same background and on any background (10th percentile: the hard cases); once over all channels
  and once over the first ``--colour-channels`` (2), the ones a VAE trained with
  ``--colour-factorization`` keeps for the colour;
* **centre latents**: the latent at the 2x2 centre positions of a large centred square, every colour
  on every background (does the code of a hue depend on the background?);
* **decoded colour**: 600 images encoded, Gaussian noise of std 0, 0.3 and 0.5 added to the latents,
  decoded and read back by the shapes judge; the fraction whose colour is still right.
"""

import argparse
import dataclasses
import itertools
import os
import sys

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "src"))

import sdkit  # noqa: E402
from sdkit.models import AutoencoderKL  # noqa: E402
from sdkit.training.judge import judge  # noqa: E402
from sdkit.training.shapes import (BACKGROUNDS, COLORS, coverage, layout, render, sample_attributes,  # noqa: E402
                                   to_pixel_values)
from sdkit.training.stages import attributes_from_codes, encode_dataset  # noqa: E402

COLOR_NAMES, BACKGROUND_NAMES = list(COLORS), list(BACKGROUNDS)


@torch.no_grad()
def encode(vae, pixels, chunk=120):
    return torch.cat([vae.encode(c).mean for c in pixels.split(chunk)]) * vae.config.scaling_factor


def pair_gaps(vae, layouts=120):
    rng = np.random.default_rng(5)
    images = []
    for i in range(layouts):
        attrs = sample_attributes(rng)
        images += [render(dataclasses.replace(attrs, color=c), np.random.default_rng([9, i])) for c in COLOR_NAMES]
    z = encode(vae, to_pixel_values(np.stack(images))).reshape(layouts, len(COLOR_NAMES), -1)
    distance = torch.cdist(z, z).median(0).values  # (6, 6)
    return {(a, b): float(distance[i, j]) for (i, a), (j, b) in itertools.combinations(enumerate(COLOR_NAMES), 2)}


def shape_pixel_gaps(vae, channel_counts, layouts=40):
    """For each count k of ``channel_counts``: (same-background gaps, any-background gaps) in channels [:k]."""
    rng = np.random.default_rng(5)
    images, masks = [], []
    for i in range(layouts):
        attrs = sample_attributes(rng)
        for c, b in itertools.product(COLOR_NAMES, BACKGROUND_NAMES):
            images.append(render(dataclasses.replace(attrs, color=c, background=b), np.random.default_rng([9, i])))
        cx, cy, size = layout(attrs, np.random.default_rng([9, i]))
        covered = torch.from_numpy(coverage(attrs.shape, cx, cy, size)).float()[None, None]
        masks.append(torch.nn.functional.avg_pool2d(covered, 8)[0, 0] > 0.5)  # latent positions inside the shape
    z = encode(vae, to_pixel_values(np.stack(images)))
    z = z.reshape(layouts, len(COLOR_NAMES), len(BACKGROUND_NAMES), *z.shape[1:])
    gaps = {}
    for channels in channel_counts:
        same, any_background = [], []
        for zi, mask in zip(z, masks):
            if not mask.any():
                continue
            inside = zi[:, :, :channels][..., mask].flatten(2)  # (colours, backgrounds, channels * positions)
            for c, b in itertools.product(range(len(COLOR_NAMES)), range(len(BACKGROUND_NAMES))):
                d = (inside - inside[c, b]).norm(dim=-1)
                d[c] = float("inf")  # only other colours
                same.append(float(d[:, b].min()))
                any_background.append(float(d.min()))
        gaps[channels] = np.array(same), np.array(any_background)
    return gaps


def centre_latents(vae):
    from sdkit.training.shapes import Attributes

    images = [render(Attributes(color=c, shape="square", place="center", size="large", background=b),
                     np.random.default_rng(0)) for c, b in itertools.product(COLOR_NAMES, BACKGROUND_NAMES)]
    z = encode(vae, to_pixel_values(np.stack(images)))[:, :, 3:5, 3:5].mean((2, 3))  # (18, 4)
    return z.reshape(len(COLOR_NAMES), len(BACKGROUND_NAMES), -1)


@torch.no_grad()
def decoded_colour(vae, n=600, noise_levels=(0.0, 0.3, 0.5)):
    means, _, codes = encode_dataset(vae, n, seed=77, batch_size=100)
    z = means * vae.config.scaling_factor
    asked = [attributes_from_codes(c).color for c in codes]
    generator = torch.Generator().manual_seed(0)
    rows = {}
    for std in noise_levels:
        noisy = z + std * torch.randn(z.shape, generator=generator)
        images = torch.cat([vae.decode(c / vae.config.scaling_factor) for c in noisy.split(100)])
        images = ((images.clamp(-1, 1) + 1) / 2).permute(0, 2, 3, 1).numpy()
        hits = {c: [] for c in COLOR_NAMES}
        for image, colour in zip(images, asked):
            hits[colour].append(judge(image).color == colour)
        rows[std] = {c: float(np.mean(v)) for c, v in hits.items()}
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folders", nargs="*", default=[sdkit.TINY_MODEL], help="folders with a vae/ subfolder")
    parser.add_argument("--colour-channels", type=int, default=2, help="also measure the gap in this many first channels")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    for folder in args.folders:
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").eval()
        gaps = pair_gaps(vae)
        closest = sorted(gaps.items(), key=lambda kv: kv[1])[:3]
        all_channels = vae.config.latent_channels
        gaps_at_shape = shape_pixel_gaps(vae, (all_channels, args.colour_channels))
        same, any_background = gaps_at_shape[all_channels]
        print(f"## {os.path.relpath(folder, ROOT) if folder.startswith(ROOT) else folder}")
        print("closest colour pairs (median latent distance, same layout): "
              + ", ".join(f"{a}-{b} {d:.2f}" for (a, b), d in closest))
        print(f"gap to the nearest other colour at shape pixels: same background median {np.median(same):.2f}, "
              f"p10 {np.percentile(same, 10):.2f}; any background median {np.median(any_background):.2f}, "
              f"p10 {np.percentile(any_background, 10):.2f}")
        same, any_background = gaps_at_shape[args.colour_channels]
        print(f"the same in the first {args.colour_channels} channels alone (the colour channels of "
              f"--colour-factorization): same background p10 {np.percentile(same, 10):.2f}; "
              f"any background p10 {np.percentile(any_background, 10):.2f}")
        centre = centre_latents(vae)
        print("centre latent of a large centred square (4 channels), per background:")
        print("| colour | " + " | ".join(BACKGROUND_NAMES) + " |")
        print("| --- |" + " --- |" * len(BACKGROUND_NAMES))
        for c, row in zip(COLOR_NAMES, centre):
            print(f"| {c} | " + " | ".join(" ".join(f"{v:+.2f}" for v in z.tolist()) for z in row) + " |")
        print("| latent noise std | " + " | ".join(COLOR_NAMES) + " | all |")
        print("| --- |" + " --- |" * (len(COLOR_NAMES) + 1))
        for std, row in decoded_colour(vae).items():
            print(f"| {std:g} | " + " | ".join(f"{row[c]:.2f}" for c in COLOR_NAMES)
                  + f" | {np.mean(list(row.values())):.2f} |")
        print(flush=True)


if __name__ == "__main__":
    main()
