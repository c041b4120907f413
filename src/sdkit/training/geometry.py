"""Direct geometry measures of a shapes image, from the pixels alone (independent of ``judge.py``).

``judge.py`` classifies a shape by its moments; these measures say how well it is drawn, in the
terms a person looks at, and classify it a second, independent way:

* the **soft mask** ``alpha``: each pixel's position between the background (the median of the
  border) and the shape's colour (the median of the strongest half of the largest blob far from
  the background), clipped to [0, 1], kept only near that blob;
* **fill**: the soft area over the soft bounding box (width = sum over columns of the column's
  largest alpha, height likewise). A square fills 1, a circle pi / 4, an upright triangle 1 / 2;
  ``fill_shape`` is the nearest of the three (split at 0.89 and 0.64), the fill-ratio judge;
* **corners** (squares): the coverage of the soft box's four corner squares, a fifth of the side
  each; rounded corners empty them;
* **roundness** (circles): the smallest over the largest soft radius, the integral of alpha along
  36 rays from the centroid; lumps and points lower it;
* **edge error** (triangles): the RMS distance in pixels of the row widths (sum of alpha per row)
  from their best straight line, over the rows between 15% and 90% of the height; an upright
  triangle's width grows linearly from the apex, so notches and bent edges raise it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

FILL = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
"""The fill of each ideal shape (soft area over soft bounding box)."""
RAYS = 36
"""Directions in which the circle's soft radius is measured."""
MIN_AREA = 40.0
"""Soft areas below this (px) are no shape (the smallest shape, a 16 px triangle, has 128)."""


@dataclass(frozen=True)
class Geometry:
    """What ``measure`` reads from one image; ``None`` where it does not apply."""

    fill: float
    fill_shape: str
    width: float  # soft extents, px
    height: float
    corners: float  # coverage of the soft box's corner squares (1: square corners)
    roundness: float  # smallest / largest soft radius (1: round)
    edge_error: float | None  # RMS px of the row widths from a straight line (0: straight edges)


def _largest_blob(mask):
    labels, count = ndimage.label(mask)
    if count == 0:
        return mask
    return labels == 1 + int(np.argmax(np.bincount(labels.ravel())[1:]))


def soft_mask(rgb):
    """The shape's coverage (H, W) in [0, 1] of a float RGB image (H, W, 3) in 0..255, or None."""
    border = np.concatenate([rgb[0], rgb[-1], rgb[1:-1, 0], rgb[1:-1, -1]])  # (4 * (H - 1), 3)
    bg = np.median(border, axis=0)
    distance = np.linalg.norm(rgb - bg, axis=-1)  # (H, W)
    blob = _largest_blob(distance >= 0.5 * np.percentile(distance, 99.5))
    if blob.sum() < 4:
        return None
    strong = distance[blob] >= np.median(distance[blob])
    fg = np.median(rgb[blob][strong], axis=0)
    d = fg - bg
    if d @ d < 1.0:
        return None
    alpha = np.clip((rgb - bg) @ d / (d @ d), 0.0, 1.0)  # (H, W)
    mask = ndimage.binary_fill_holes(_largest_blob(alpha >= 0.5))
    return np.where(ndimage.binary_dilation(mask, iterations=2), alpha, 0.0)


def _overlap(n, low, high):
    """(n,) length of [c, c + 1) inside [low, high] for each pixel index c."""
    c = np.arange(n)
    return np.clip(np.minimum(c + 1, high) - np.maximum(c, low), 0, None)


def corner_fill(alpha, width, height):
    """Mean coverage of the four corner squares, a fifth of the side each, of the soft box
    (``width`` x ``height`` about the centroid): 1 for sharp corners. The patches reach a pixel
    past the box, so anti-aliased edge pixels count whole."""
    area = alpha.sum()
    y, x = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]] + 0.5  # pixel centres, (H, W) each
    cx, cy = (alpha * x).sum() / area, (alpha * y).sum() / area
    k = min(width, height) / 5
    left, right, top, bottom = cx - width / 2, cx + width / 2, cy - height / 2, cy + height / 2
    columns = [_overlap(alpha.shape[1], left - 1, left + k), _overlap(alpha.shape[1], right - k, right + 1)]
    rows = [_overlap(alpha.shape[0], top - 1, top + k), _overlap(alpha.shape[0], bottom - k, bottom + 1)]
    return float(np.mean([wy @ alpha @ wx / k**2 for wy in rows for wx in columns]))


def roundness(alpha):
    """Smallest over largest soft radius: alpha integrated along ``RAYS`` rays from the centroid."""
    area = alpha.sum()
    y, x = np.mgrid[0:alpha.shape[0], 0:alpha.shape[1]]  # (H, W) each
    cy, cx = (alpha * y).sum() / area, (alpha * x).sum() / area
    step = 0.25
    r = np.arange(0, max(alpha.shape), step)  # (R,)
    theta = np.arange(RAYS) * 2 * np.pi / RAYS  # (A,)
    ys, xs = cy + np.sin(theta)[:, None] * r, cx + np.cos(theta)[:, None] * r  # (A, R)
    along = ndimage.map_coordinates(alpha, [ys.ravel(), xs.ravel()], order=1, cval=0.0).reshape(ys.shape)
    radii = along.sum(axis=1) * step  # (A,)
    return float(radii.min() / radii.max())


def edge_error(alpha):
    """RMS distance (px) of the row widths from their best line, rows 15%-90% down the shape."""
    widths = alpha.sum(axis=1)  # (H,)
    rows = np.nonzero(widths >= 0.5)[0]
    top, height = rows[0], rows[-1] + 1 - rows[0]
    y = np.arange(top + int(round(0.15 * height)), top + int(round(0.9 * height)))
    if len(y) < 3:
        return None
    coefficients = np.polyfit(y, widths[y], 1)
    return float(np.sqrt(np.mean((np.polyval(coefficients, y) - widths[y]) ** 2)))


def measure(image) -> Geometry | None:
    """The geometry of a shapes image (uint8 or float-in-[0, 1] RGB array, or PIL image), or None."""
    rgb = np.asarray(image, dtype=np.float64)[..., :3]
    if np.asarray(image).dtype.kind == "f":
        rgb = rgb * 255
    alpha = soft_mask(rgb)
    if alpha is None or alpha.sum() < MIN_AREA:
        return None
    width, height = alpha.max(axis=0).sum(), alpha.max(axis=1).sum()
    fill = float(alpha.sum() / (width * height))
    fill_shape = min(FILL, key=lambda s: abs(FILL[s] - fill))
    return Geometry(fill=fill, fill_shape=fill_shape, width=float(width), height=float(height),
                    corners=corner_fill(alpha, width, height), roundness=roundness(alpha), edge_error=edge_error(alpha))
