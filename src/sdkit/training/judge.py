"""Read a shapes image back into its attributes, to measure how well generated images follow prompts.

``judge(image)`` is plain image analysis, no learned model, so it is deterministic and needs no
weights. It is tuned to stay right on imperfect images (blurred, noisy, resampled), not only on
clean renders from ``sdkit.training.shapes``:

1. background: the palette colour nearest the median of the border pixels;
2. rough mask: pixels (after a 3x3 mean filter against noise) far from the measured background;
   the largest connected blob is the shape, and too small a blob means "no shape";
3. colour: the palette colour nearest the median of the blob's core (its quarter of pixels
   farthest from the background, so least mixed with it by blur);
4. final mask: pixels nearer the measured shape colour than the measured background colour
   (the edge lands half-way, wherever the blur put it), largest blob, holes filled; place is the
   palette place nearest the centre of its bounding box;
5. coverage ``alpha`` of every pixel near the mask: where its (smoothed) colour lies between
   the background (0) and the palette shape colour (1). Shape and size come from this soft mass
   rather than from the blur-eroded mask, through statistics that a symmetric blur leaves
   unchanged (blur keeps the area and the 3rd and 4th cumulants; it only adds to the variance).
   A shape coloured far off the palette gets too small a soft area; then shape and size are
   ``None``.

   * triangle score: the vertical 3rd cumulant over area^1.5, scaled so an upright triangle has
     -1 (its mass sits low); circle and square have 0;
   * square score: the 4th cumulant along the diagonals minus along the axes, over area^2,
     scaled so a square has 1 (its projection is triangular along a diagonal, uniform along an
     axis); a circle looks the same in every direction and has 0;
   * size across = sqrt(area / area of that shape 1 px across), split at 26 px between small
     (16-22) and large (30-37).
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage

from sdkit.training.shapes import BACKGROUNDS, COLORS, IMAGE_SIZE, PLACES, SIZES, Attributes

ROUGH_THRESHOLD = 40.0
"""RGB distance from the background above which a (smoothed) pixel may belong to the shape.
The closest shape/background pair in the palette (purple on gray) is ~86 apart."""
MIN_AREA = 40
"""Blobs smaller than this (px) are not a shape: the smallest shape, a 16 px triangle, has 128."""
SOFT_MARGIN = 3
"""Pixels within this distance (px) of the mask count towards the soft mass (blurred edges)."""
TRIANGLE_SCORE = -0.5
"""Triangle score below which the shape is an upright triangle (exactly -1; on 5,400 blurred,
noisy, resampled renders: -0.74 or lower for triangles, above -0.05 for circles and squares)."""
SQUARE_SCORE = 0.5
"""Square score above which a non-triangle is a square (exactly 1; on the same renders: 0.74 or
more for squares, below 0.09 for circles)."""
AREA_PER_SIZE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
"""Area of each shape 1 px across (a triangle is as tall as it is wide)."""
SIZE_THRESHOLD = (SIZES["small"][1] + SIZES["large"][0]) / 2
"""Size across (px) separating small (16-22) from large (30-37): 26. On the same renders the
estimate stays within 0.6 px of the drawn size."""

_SCORED = ("color", "shape", "place", "size", "background")


def _to_array(image) -> np.ndarray:
    """The image as float (64, 64, 3) in 0..255; resized to 64x64 if needed."""
    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    else:
        array = np.asarray(image)
        if array.ndim != 3 or array.shape[2] not in (3, 4):
            raise ValueError(f"judge: expected an RGB image (H, W, 3), got an array of shape {array.shape}")
        if array.dtype.kind == "f":  # the pipelines' output_type="np" convention: float in [0, 1]
            array = np.clip(array * 255, 0, 255).round()
        elif array.dtype != np.uint8:
            raise ValueError(f"judge: expected uint8 (0..255) or float (0..1) pixels, got {array.dtype}")
        pil = Image.fromarray(array[:, :, :3].astype(np.uint8), "RGB")
    if pil.size != (IMAGE_SIZE, IMAGE_SIZE):
        pil = pil.resize((IMAGE_SIZE, IMAGE_SIZE), Image.BILINEAR)
    return np.asarray(pil, dtype=np.float64)


def _nearest(palette: dict[str, tuple[int, int, int]], rgb: np.ndarray) -> str:
    names = list(palette)
    distances = np.linalg.norm(np.asarray([palette[n] for n in names], dtype=np.float64) - rgb, axis=1)
    return names[int(np.argmin(distances))]


def _largest_blob(mask: np.ndarray) -> np.ndarray:
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    areas = np.bincount(labels.ravel())[1:]
    return labels == 1 + int(np.argmax(areas))


def _shape_scores(alpha: np.ndarray) -> tuple[float, float]:
    """(triangle score, square score) of the soft mass ``alpha`` (H, W); see the module docstring.

    For a shape s px across: an upright triangle (area s^2 / 2) has vertical 3rd cumulant
    -s^3 / 135; a square (area s^2) has 4th cumulant -s^4 / 120 along its axes and -s^4 / 240
    along its diagonals (the sum of two uniforms s / sqrt(2) wide).
    """
    area = alpha.sum()
    y, x = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float64)  # (H, W) each
    x -= (alpha * x).sum() / area
    y -= (alpha * y).sum() / area

    def moment(u, k):
        return (alpha * u**k).sum() / area

    def kappa4(u):
        return moment(u, 4) - 3 * moment(u, 2) ** 2

    triangle = moment(y, 3) / area**1.5 * (135 / 2**1.5)
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    square = (kappa4(u) + kappa4(v) - kappa4(x) - kappa4(y)) / 2 / area**2 * 240
    return float(triangle), float(square)


def judge(image) -> Attributes:
    """The attributes a 64x64 shapes image shows (PIL image, or uint8 / float-in-[0,1] HxWx3 array).

    Other sizes are resized to 64x64 first. If no shape is found, ``background`` is still read
    and every other field is ``None``; a field that cannot be read is ``None`` too.
    """
    return measure(image)[0]


def measure(image) -> tuple[Attributes, tuple[float, float] | None]:
    """``(judge(image), (triangle score, square score))``; the scores are ``None`` when no shape
    is measured. Beyond the class they say how well drawn the shape is: a round disc has square
    score 0, a square 1 and a square standing on its corner (a diamond) -1."""
    rgb = _to_array(image)  # (H, W, 3)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4 * 63, 3)
    bg_rgb = np.median(border, axis=0)
    background = _nearest(BACKGROUNDS, bg_rgb)

    smooth = ndimage.uniform_filter(rgb, size=(3, 3, 1), mode="nearest")
    rough = _largest_blob(np.linalg.norm(smooth - bg_rgb, axis=-1) > ROUGH_THRESHOLD)
    if rough.sum() < MIN_AREA:
        return Attributes(color=None, shape=None, place=None, size=None, background=background), None

    # the core: the quarter of the blob farthest from the background, least mixed with it by blur
    contrast = np.linalg.norm(smooth - bg_rgb, axis=-1)[rough]
    fg_rgb = np.median(rgb[rough][contrast >= np.quantile(contrast, 0.75)], axis=0)
    color = _nearest(COLORS, fg_rgb)

    nearer_fg = np.linalg.norm(smooth - fg_rgb, axis=-1) < np.linalg.norm(smooth - bg_rgb, axis=-1)
    mask = ndimage.binary_fill_holes(_largest_blob(nearer_fg))
    if mask.sum() < MIN_AREA:
        return Attributes(color=None, shape=None, place=None, size=None, background=background), None
    ys, xs = np.nonzero(mask)
    centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
    place = min(PLACES, key=lambda p: float(np.linalg.norm(centre - PLACES[p])))

    near = ndimage.binary_dilation(mask, iterations=SOFT_MARGIN)
    d = np.asarray(COLORS[color], dtype=np.float64) - bg_rgb
    alpha = np.where(near, (smooth - bg_rgb) @ d / (d @ d), 0.0)  # (H, W); unclipped: noise averages out
    rows, cols = np.nonzero(near.any(axis=1))[0], np.nonzero(near.any(axis=0))[0]
    alpha = alpha[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]  # crop: moments need only the shape
    if alpha.sum() < MIN_AREA:  # a colour far off the palette, projecting badly onto bg -> colour
        return Attributes(color=color, shape=None, place=place, size=None, background=background), None
    triangle_score, square_score = _shape_scores(alpha)
    if triangle_score < TRIANGLE_SCORE:
        shape = "triangle"
    elif square_score > SQUARE_SCORE:
        shape = "square"
    else:
        shape = "circle"
    across = np.sqrt(alpha.sum() / AREA_PER_SIZE2[shape])
    size = "small" if across < SIZE_THRESHOLD else "large"
    attrs = Attributes(color=color, shape=shape, place=place, size=size, background=background)
    return attrs, (triangle_score, square_score)


def score(prompt_attrs: dict[str, str], judged: Attributes) -> dict[str, bool]:
    """For each attribute the prompt names (as from ``parse_prompt``), whether the image has it."""
    unknown = set(prompt_attrs) - set(_SCORED)
    if unknown:
        raise ValueError(f"score: unknown attribute(s) {sorted(unknown)}; expected some of {list(_SCORED)}")
    return {name: getattr(judged, name) == value for name, value in prompt_attrs.items()}
