"""The direct geometry measures (sdkit.training.geometry) on clean renders and hand-made shapes."""

import numpy as np
import pytest
from scipy import ndimage

from sdkit.training import geometry
from sdkit.training.shapes import Attributes, all_attributes, draw, render

SUPER = 8  # supersampling of the hand-made shapes below


RED_ON_WHITE = Attributes(color="red", shape="square", place="center", size="large", background="white")


def image_of(inside):
    """uint8 (64, 64, 3): the region ``inside(x, y)`` (pixel units) red on white, anti-aliased."""
    t = (np.arange(64 * SUPER) + 0.5) / SUPER
    x, y = np.meshgrid(t, t)  # (512, 512) each
    alpha = inside(x, y).reshape(64, SUPER, 64, SUPER).mean(axis=(1, 3))  # (64, 64)
    return draw(RED_ON_WHITE, alpha)


def rounded_square(cx, cy, s, r):
    """Inside test of an axis-aligned square of side s with corners rounded to radius r."""
    def inside(x, y):
        dx, dy = np.maximum(np.abs(x - cx) - (s / 2 - r), 0), np.maximum(np.abs(y - cy) - (s / 2 - r), 0)
        return (np.abs(x - cx) <= s / 2) & (np.abs(y - cy) <= s / 2) & (dx**2 + dy**2 <= r**2)
    return inside


def test_clean_renders_have_the_ideal_fill_and_are_classed_right():
    measured = {}
    for i, attrs in enumerate(all_attributes()):
        geo = geometry.measure(render(attrs, np.random.default_rng([3, i])))
        assert geo.fill_shape == attrs.shape, (attrs, geo)
        measured.setdefault(attrs.shape, []).append(geo)
    fills = {s: np.array([g.fill for g in v]) for s, v in measured.items()}
    assert np.abs(fills["square"] - 1).max() < 0.01
    assert np.abs(fills["circle"] - np.pi / 4).max() < 0.02
    assert np.abs(fills["triangle"] - 0.5).max() < 0.06  # anti-aliasing widens the soft box a little
    assert min(g.roundness for g in measured["circle"]) > 0.95
    assert max(g.edge_error for g in measured["triangle"]) < 0.1
    assert min(g.corners for g in measured["square"]) > 0.97


@pytest.mark.parametrize("r", [0.0, 4.0, 8.0])
def test_rounded_corners_lower_fill_as_worked_by_hand(r):
    s = 30.0
    geo = geometry.measure(image_of(rounded_square(32, 32, s, r)))
    assert geo.fill == pytest.approx(1 - (4 - np.pi) * r**2 / s**2, abs=0.01)  # area lost: (4 - pi) r^2
    assert geo.width == pytest.approx(s, abs=0.05) and geo.height == pytest.approx(s, abs=0.05)


def test_rounded_corners_empty_the_corner_patches():
    sharp, round_ = (geometry.measure(image_of(rounded_square(32, 32, 30, r))).corners for r in (0.0, 8.0))
    assert sharp > 0.99 and round_ < 0.8


def test_an_ellipse_has_roundness_near_its_axis_ratio_and_a_square_fill():
    a, b = 15.0, 10.0
    geo = geometry.measure(image_of(lambda x, y: ((x - 32) / a) ** 2 + ((y - 32) / b) ** 2 <= 1))
    assert geo.roundness == pytest.approx(b / a, abs=0.02)
    assert geo.fill == pytest.approx(np.pi / 4, abs=0.01) and geo.fill_shape == "circle"


def test_a_notched_triangle_has_a_large_edge_error():
    def triangle(x, y, notch=False):
        inside = (y <= 47) & (y >= 17) & (np.abs(x - 32) <= (y - 17) / 2)
        if notch:  # a 4 px bite out of the left edge half-way down
            inside &= ~((np.abs(y - 32) <= 3) & (x < 32 - (y - 17) / 2 + 4))
        return inside
    clean = geometry.measure(image_of(triangle))
    notched = geometry.measure(image_of(lambda x, y: triangle(x, y, True)))
    assert clean.edge_error < 0.1 and notched.edge_error > 1.0
    # the tips are under a pixel wide, so the soft box is a little small: fill a little over 1/2
    assert 0.5 <= clean.fill <= 0.54 and clean.fill_shape == "triangle"


def test_blur_keeps_the_class_and_no_shape_gives_none():
    for i, attrs in enumerate(all_attributes()[::7]):
        image = render(attrs, np.random.default_rng([4, i])).astype(np.float64)
        blurred = ndimage.gaussian_filter(image, sigma=(0.8, 0.8, 0))
        assert geometry.measure(blurred.round().astype(np.uint8)).fill_shape == attrs.shape
    assert geometry.measure(np.full((64, 64, 3), 128, np.uint8)) is None
    assert geometry.measure(np.full((64, 64, 3), 0.5)) is None
