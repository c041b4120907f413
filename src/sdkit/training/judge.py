"""Read a shapes image back into its attributes, to measure how well generated images follow prompts.

``judge(image)`` is plain image analysis, no learned model, so it is deterministic and needs no
weights. It is tuned to stay right on imperfect images (blurred, noisy, resampled), not only on
clean renders from ``sdkit.training.shapes``:

1. background: the palette colour nearest the median of the border pixels;
2. rough mask: pixels (after a 3x3 mean filter against noise) far from the measured background;
   the largest connected blob is the shape, and too small a blob means "no shape";
3. colour: the palette colour nearest the median of the blob's interior pixels;
4. final mask: pixels nearer the measured shape colour than the measured background colour
   (the edge lands half-way, wherever the blur put it), largest blob, holes filled; place is the
   palette place nearest the centre of its bounding box;
5. coverage ``alpha`` of every pixel near the mask: where its colour lies between background (0)
   and shape colour (1). Blur and noise barely change the moments of this soft mass, so shape
   and size come from them rather than from the jagged, blur-eroded mask:

   * an upright triangle has its mass low: vertical skewness -0.57 (0 for circle and square);
   * a square spreads further along its diagonals than along its axes (its projection is
     triangular one way, uniform the other): kurtosis along the diagonals minus along the axes
     is +0.6, against 0 for a circle, which looks the same in every direction;
   * size across = sqrt(area / area of a 1 px wide shape), e.g. sqrt(area / (pi / 4)) for a
     circle, split at 26 px between small (16-22) and large (30-37).
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
TRIANGLE_SKEW = -0.25
"""Vertical skewness of the soft mass below which the shape is an upright triangle (-0.57;
measured -0.39 or lower on blurred, noisy small triangles, above -0.03 for the others)."""
SQUARE_KURTOSIS_GAP = 0.3
"""Kurtosis along the diagonals minus along the axes above which the shape is a square (0.6;
measured 0.45 or more on blurred, noisy small squares, below 0.07 for circles)."""
AREA_PER_SIZE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
"""Area of each shape 1 px across (a triangle is as tall as it is wide)."""
SIZE_THRESHOLD = (SIZES["small"][1] + SIZES["large"][0]) / 2
"""Size across (px) separating small (16-22) from large (30-37): 26."""

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


def _shape_moments(alpha: np.ndarray) -> tuple[float, float]:
    """(vertical skewness, diagonal minus axis kurtosis) of the mass ``alpha`` (H, W)."""
    mass = alpha.sum()
    y, x = np.mgrid[0 : alpha.shape[0], 0 : alpha.shape[1]].astype(np.float64)  # (H, W) each
    x -= (alpha * x).sum() / mass
    y -= (alpha * y).sum() / mass

    def moment(u, k):
        return (alpha * u**k).sum() / mass

    def kurtosis(u):
        return moment(u, 4) / moment(u, 2) ** 2

    skew_y = moment(y, 3) / moment(y, 2) ** 1.5
    u, v = (x + y) / np.sqrt(2), (x - y) / np.sqrt(2)
    kurtosis_gap = (kurtosis(u) + kurtosis(v) - kurtosis(x) - kurtosis(y)) / 2
    return float(skew_y), float(kurtosis_gap)


def judge(image) -> Attributes:
    """The attributes a 64x64 shapes image shows (PIL image, or uint8 / float-in-[0,1] HxWx3 array).

    Other sizes are resized to 64x64 first. If no shape is found, ``background`` is still read
    and every other field is ``None``.
    """
    rgb = _to_array(image)  # (H, W, 3)
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4 * 63, 3)
    bg_rgb = np.median(border, axis=0)
    background = _nearest(BACKGROUNDS, bg_rgb)

    smooth = ndimage.uniform_filter(rgb, size=(3, 3, 1), mode="nearest")
    rough = _largest_blob(np.linalg.norm(smooth - bg_rgb, axis=-1) > ROUGH_THRESHOLD)
    if rough.sum() < MIN_AREA:
        return Attributes(color=None, shape=None, place=None, size=None, background=background)

    interior = ndimage.binary_erosion(rough, iterations=2)
    fg_rgb = np.median(rgb[interior if interior.sum() >= 10 else rough], axis=0)
    color = _nearest(COLORS, fg_rgb)

    nearer_fg = np.linalg.norm(smooth - fg_rgb, axis=-1) < np.linalg.norm(smooth - bg_rgb, axis=-1)
    mask = ndimage.binary_fill_holes(_largest_blob(nearer_fg))
    ys, xs = np.nonzero(mask)
    centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
    place = min(PLACES, key=lambda p: float(np.linalg.norm(centre - PLACES[p])))

    near = ndimage.binary_dilation(mask, iterations=SOFT_MARGIN)
    d = fg_rgb - bg_rgb
    alpha = np.where(near, (rgb - bg_rgb) @ d / (d @ d), 0.0)  # (H, W); not clipped: noise averages out
    skew_y, kurtosis_gap = _shape_moments(alpha)
    if skew_y < TRIANGLE_SKEW:
        shape = "triangle"
    elif kurtosis_gap > SQUARE_KURTOSIS_GAP:
        shape = "square"
    else:
        shape = "circle"
    across = np.sqrt(max(alpha.sum(), 0.0) / AREA_PER_SIZE2[shape])
    size = "small" if across < SIZE_THRESHOLD else "large"
    return Attributes(color=color, shape=shape, place=place, size=size, background=background)


def score(prompt_attrs: dict[str, str], judged: Attributes) -> dict[str, bool]:
    """For each attribute the prompt names (as from ``parse_prompt``), whether the image has it."""
    unknown = set(prompt_attrs) - set(_SCORED)
    if unknown:
        raise ValueError(f"score: unknown attribute(s) {sorted(unknown)}; expected some of {list(_SCORED)}")
    return {name: getattr(judged, name) == value for name, value in prompt_attrs.items()}
