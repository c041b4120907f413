"""The synthetic "shapes" data set the bundled tiny model is trained on.

Every image is 64x64 RGB with one shape on a flat background. Its caption follows the grammar

    a [small|large] [COLOR] SHAPE [PLACE] [on a BG background]

where each bracketed part is optional (the values are in the README and the model card). The image always has
every attribute; a caption may leave some out, in which case that attribute is simply random.

Everything here is deterministic given a ``numpy.random.Generator``: ``ShapesDataset`` derives
one per item from ``(seed, index)``, so item ``i`` is the same in any worker, process or order.

Geometry (all in pixel-index coordinates: pixel ``(x, y)`` is column ``x``, row ``y``):

* ``size`` is the shape's extent "across", an integer number of pixels drawn uniformly from
  ``SIZES[size]`` (both ends included): the diameter of a circle, the side of a square, the base
  width of a triangle. The upright triangle is as tall as it is wide (apex centred at the top).
* The shape's bounding box is centred on ``PLACES[place]`` plus a uniform jitter of up to
  ``JITTER`` px on each axis, then moved inward just enough that the whole shape stays inside
  the frame. For the largest shapes (37 px) at an edge place this pins the centre to the
  nominal place +-2 px inward (e.g. x = 18 for "on the left"), so the centre is always within
  ``JITTER`` px of the nominal place and nothing is clipped.
* Rendering is anti-aliased by ``SUPERSAMPLE`` x ``SUPERSAMPLE`` supersampling (exact area
  coverage on that grid), so interior pixels are exactly the palette colour and edge pixels are
  blends of the shape and background colours.
"""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 64
"""Side of every image, in pixels."""

BACKGROUNDS = {"white": (240, 240, 240), "black": (20, 20, 20), "gray": (128, 128, 128)}
COLORS = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
}
SHAPES = ("circle", "square", "triangle")
PLACES = {"left": (16, 32), "right": (47, 32), "top": (32, 16), "bottom": (32, 47), "center": (32, 32)}
"""Place name -> nominal centre ``(cx, cy)`` of the shape's bounding box, in pixel indices."""
PLACE_PHRASES = {
    "left": "on the left",
    "right": "on the right",
    "top": "at the top",
    "bottom": "at the bottom",
    "center": "in the center",
}
"""Place name -> the words a caption uses for it."""
SIZES = {"small": (16, 22), "large": (30, 37)}
"""Size name -> (min_px, max_px) across, both included."""

JITTER = 2.0
"""Largest random offset (px, per axis) of a shape's centre from its nominal place."""
SUPERSAMPLE = 4
"""Anti-aliasing: each pixel's coverage is measured on a SUPERSAMPLE x SUPERSAMPLE grid."""

OPTIONAL_PARTS = frozenset({"size", "color", "place", "background"})
"""The caption parts that may be left out (the shape is always named)."""
GRAMMAR = "a [small|large] [COLOR] SHAPE [PLACE] [on a BG background]"


@dataclass(frozen=True)
class Attributes:
    """What one image shows. Values are the names used as keys of the tables above.

    The judge returns ``None`` for attributes it cannot read (no shape found).
    """

    color: str | None
    shape: str | None
    place: str | None
    size: str | None
    background: str | None


def all_attributes() -> list[Attributes]:
    """Every fully specified attribute combination (6 x 3 x 5 x 2 x 3 = 540), in a fixed order."""
    return [
        Attributes(color=c, shape=s, place=p, size=z, background=b)
        for c, s, p, z, b in itertools.product(COLORS, SHAPES, PLACES, SIZES, BACKGROUNDS)
    ]


def all_prompts_full() -> list[str]:
    """The fully specified caption of every combination, in the order of ``all_attributes()``."""
    return [caption(a) for a in all_attributes()]


def caption(attrs: Attributes, keep: set[str] | frozenset[str] | None = None) -> str:
    """The prompt describing ``attrs``, naming only the optional parts in ``keep`` (default: all).

    ``keep`` is a subset of ``OPTIONAL_PARTS`` = {"size", "color", "place", "background"}.
    """
    keep = OPTIONAL_PARTS if keep is None else frozenset(keep)
    unknown = keep - OPTIONAL_PARTS
    if unknown:
        raise ValueError(
            f"caption: unknown part(s) {sorted(unknown)} in keep; choose from {sorted(OPTIONAL_PARTS)}"
        )
    words = ["a"]
    if "size" in keep:
        words.append(attrs.size)
    if "color" in keep:
        words.append(attrs.color)
    words.append(attrs.shape)
    if "place" in keep:
        words.append(PLACE_PHRASES[attrs.place])
    if "background" in keep:
        words.append(f"on a {attrs.background} background")
    return " ".join(words)


def vocabulary() -> list[str]:
    """Sorted list of every word a caption can contain (the tokenizer is built from it)."""
    words = {"a", "on", "background", *SIZES, *COLORS, *SHAPES, *BACKGROUNDS}
    for phrase in PLACE_PHRASES.values():
        words.update(phrase.split())
    return sorted(words)


def parse_prompt(prompt: str) -> dict[str, str]:
    """The attributes a prompt names, e.g. ``{"color": "red", "shape": "circle"}``.

    Case and extra whitespace are ignored. The empty prompt (used for classifier-free guidance)
    names nothing and gives ``{}``. A prompt outside the grammar raises ``ValueError`` saying
    which word was wrong and what was expected there.
    """
    words = prompt.lower().split()
    if not words:
        return {}
    out: dict[str, str] = {}
    i = 0

    def fail(problem: str) -> ValueError:
        return ValueError(f"parse_prompt({prompt!r}): {problem}. The grammar is {GRAMMAR!r}")

    def expect(word: str, where: str) -> None:
        nonlocal i
        if i >= len(words):
            raise fail(f"prompt ends early, expected {word!r} {where}")
        if words[i] != word:
            raise fail(f"unexpected word {words[i]!r}, expected {word!r} {where}")
        i += 1

    expect("a", "at the start")
    if i < len(words) and words[i] in SIZES:
        out["size"] = words[i]
        i += 1
    if i < len(words) and words[i] in COLORS:
        out["color"] = words[i]
        i += 1
    if i >= len(words):
        raise fail(f"no shape: the prompt ends early, expected one of {', '.join(SHAPES)}")
    if words[i] not in SHAPES:
        raise fail(
            f"unknown word {words[i]!r} where the shape belongs; expected one of "
            f"{', '.join(SHAPES)} (optionally preceded by a size {'/'.join(SIZES)} and a colour "
            f"{'/'.join(COLORS)})"
        )
    out["shape"] = words[i]
    i += 1
    for name, phrase in PLACE_PHRASES.items():
        n = len(phrase.split())
        if words[i : i + n] == phrase.split():
            out["place"] = name
            i += n
            break
    if i < len(words):
        if words[i : i + 2] != ["on", "a"] or i + 4 != len(words) or words[i + 3] != "background":
            raise fail(
                f"unexpected words {' '.join(words[i:])!r} after the shape; expected a place "
                f"({', '.join(repr(p) for p in PLACE_PHRASES.values())}) and/or "
                f"'on a BG background' with BG one of {', '.join(BACKGROUNDS)}, in that order"
            )
        if words[i + 2] not in BACKGROUNDS:
            raise fail(
                f"unknown background {words[i + 2]!r}; expected one of {', '.join(BACKGROUNDS)}"
            )
        out["background"] = words[i + 2]
    return out


def sample_attributes(rng: np.random.Generator) -> Attributes:
    """Attributes drawn uniformly and independently."""

    def pick(options) -> str:
        options = list(options)
        return options[int(rng.integers(len(options)))]

    return Attributes(
        color=pick(COLORS),
        shape=pick(SHAPES),
        place=pick(PLACES),
        size=pick(SIZES),
        background=pick(BACKGROUNDS),
    )


def layout(attrs: Attributes, rng: np.random.Generator) -> tuple[float, float, int]:
    """Draw the geometry of one shape: centre ``(cx, cy)`` in pixel indices and size across (px).

    The centre is the nominal place plus up to ``JITTER`` px per axis, moved inward so the shape
    fits the frame (see the module docstring).
    """
    lo, hi = SIZES[attrs.size]
    size = int(rng.integers(lo, hi + 1))
    jitter = rng.uniform(-JITTER, JITTER, size=2)
    half = size / 2
    # pixel index c covers [c, c + 1); a shape centred at index c spans [c + 0.5 - half, c + 0.5 + half]
    lowest, highest = half - 0.5, IMAGE_SIZE - 0.5 - half
    cx, cy = (
        float(np.clip(nominal + j, lowest, highest)) for nominal, j in zip(PLACES[attrs.place], jitter)
    )
    return cx, cy, size


def coverage(shape: str, cx: float, cy: float, size: float) -> np.ndarray:
    """Fraction (64, 64) float of each pixel covered by the shape, on the supersampling grid."""
    n = IMAGE_SIZE * SUPERSAMPLE
    # continuous coordinates of the sub-pixel centres, in pixels; pixel index c has centre c + 0.5
    t = (np.arange(n) + 0.5) / SUPERSAMPLE
    x, y = t[None, :], t[:, None]  # (1, n), (n, 1)
    X, Y, half = cx + 0.5, cy + 0.5, size / 2
    if shape == "circle":
        inside = (x - X) ** 2 + (y - Y) ** 2 <= half**2
    elif shape == "square":
        inside = (np.abs(x - X) <= half) & (np.abs(y - Y) <= half)
    elif shape == "triangle":
        top = Y - half  # apex at (X, top), base from X - half to X + half at Y + half
        inside = (y <= Y + half) & (np.abs(x - X) <= (y - top) / 2)
    else:
        raise ValueError(f"coverage: unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")
    inside = inside.reshape(IMAGE_SIZE, SUPERSAMPLE, IMAGE_SIZE, SUPERSAMPLE)  # (H, s, W, s)
    return inside.mean(axis=(1, 3))


def render(attrs: Attributes, rng: np.random.Generator) -> np.ndarray:
    """Draw one image of ``attrs`` (size and jitter from ``rng``): uint8 array (64, 64, 3)."""
    return draw(attrs, coverage(attrs.shape, *layout(attrs, rng)))


def draw(attrs: Attributes, alpha: np.ndarray) -> np.ndarray:
    """The shape's colour over the background, mixed by the coverage ``alpha`` (64, 64): uint8 (64, 64, 3)."""
    alpha = alpha[:, :, None]  # (H, W, 1)
    fg = np.asarray(COLORS[attrs.color], dtype=np.float64)
    bg = np.asarray(BACKGROUNDS[attrs.background], dtype=np.float64)
    return np.rint(bg * (1 - alpha) + fg * alpha).astype(np.uint8)


def drawing(rng: np.random.Generator) -> tuple[Attributes, np.ndarray]:
    """The attributes and shape coverage (64, 64) of one example, drawn from ``rng`` in the dataset's order."""
    attrs = sample_attributes(rng)
    return attrs, coverage(attrs.shape, *layout(attrs, rng))


def item_rng(seed: int, index: int) -> np.random.Generator:
    """The random stream of item ``index`` of ``ShapesDataset(seed=seed)``."""
    return np.random.default_rng([int(seed), int(index)])


def sample(
    rng: np.random.Generator, drop_prob: float = 0.5, empty_prob: float = 0.1
) -> tuple[np.ndarray, str, Attributes]:
    """One training example: (image uint8 (64, 64, 3), caption, attributes).

    Each optional caption part is left out independently with probability ``drop_prob``; with
    probability ``empty_prob`` the caption is "" (caption dropout for classifier-free guidance).
    """
    attrs, alpha = drawing(rng)
    image = draw(attrs, alpha)
    keep = {part for part in sorted(OPTIONAL_PARTS) if rng.random() >= drop_prob}
    text = "" if rng.random() < empty_prob else caption(attrs, keep)
    return image, text, attrs


def to_pixel_values(image: np.ndarray) -> torch.Tensor:
    """uint8 (..., H, W, 3) image(s) -> float tensor (..., 3, H, W) in [-1, 1], the VAE's input."""
    return torch.from_numpy(np.asarray(image)).movedim(-1, -3).float() / 127.5 - 1


def twins(seed: int, index: int, change: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Item ``index`` of ``ShapesDataset(seed=seed)`` and the same drawing with one attribute changed.

    ``change`` is "background" or "color". Returns ``(image, twin, alpha)``: uint8 (64, 64, 3)
    twice and the shape's coverage (64, 64). The twin keeps everything else, the exact geometry
    (size, jitter) included; its new value is one of the others, chosen by ``index``.
    """
    tables = {"background": BACKGROUNDS, "color": COLORS}
    if change not in tables:
        raise ValueError(f"twins: change must be one of {sorted(tables)}, got {change!r}")
    attrs, alpha = drawing(item_rng(seed, index))  # exactly the dataset item's drawing
    others = [name for name in tables[change] if name != getattr(attrs, change)]
    twin = dataclasses.replace(attrs, **{change: others[int(index) // 2 % len(others)]})
    return draw(attrs, alpha), draw(twin, alpha), alpha


class ShapesDataset(torch.utils.data.Dataset):
    """``length`` shapes examples; item ``i`` depends only on ``(seed, i)``.

    Each item is a dict: ``pixel_values`` float tensor (3, 64, 64) in [-1, 1], ``caption`` str,
    and ``attrs`` (a dict of attribute names, so the default collate function batches it).
    """

    def __init__(self, length: int, seed: int = 0, drop_prob: float = 0.5, empty_prob: float = 0.1):
        if length < 0:
            raise ValueError(f"ShapesDataset: length must be >= 0, got {length}")
        self.length, self.seed = int(length), int(seed)
        self.drop_prob, self.empty_prob = drop_prob, empty_prob

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.length:
            raise IndexError(f"ShapesDataset: index {index} out of range for length {self.length}")
        image, text, attrs = sample(item_rng(self.seed, index), self.drop_prob, self.empty_prob)
        return {"pixel_values": to_pixel_values(image), "caption": text, "attrs": dataclasses.asdict(attrs)}
