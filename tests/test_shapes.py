"""The shapes data generator: determinism, caption grammar, and pixels that match the spec."""

import itertools

import numpy as np
import pytest
import torch

from sdkit.training.shapes import (
    BACKGROUNDS,
    COLORS,
    OPTIONAL_PARTS,
    PLACES,
    SHAPES,
    SIZES,
    Attributes,
    ShapesDataset,
    all_attributes,
    all_prompts_full,
    caption,
    layout,
    parse_prompt,
    render,
    sample,
    sample_attributes,
    vocabulary,
)

AREA_PER_SIZE2 = {"circle": np.pi / 4, "square": 1.0, "triangle": 0.5}
KEEP_SUBSETS = [set(c) for r in range(5) for c in itertools.combinations(sorted(OPTIONAL_PARTS), r)]


def coverage_of(image, attrs):
    """Per-pixel fraction of shape colour (H, W), read back from the rendered pixels."""
    fg = np.asarray(COLORS[attrs.color], dtype=float)
    bg = np.asarray(BACKGROUNDS[attrs.background], dtype=float)
    d = fg - bg
    return (image.astype(float) - bg) @ d / (d @ d)


# --- determinism and dataset format -------------------------------------------------------------


def test_dataset_item_depends_only_on_seed_and_index():
    a, b = ShapesDataset(100, seed=3), ShapesDataset(100, seed=3)
    later = [a[i] for i in (99, 50, 7)][2]  # same item reached after others
    first = b[7]
    assert torch.equal(later["pixel_values"], first["pixel_values"])
    assert later["caption"] == first["caption"] and later["attrs"] == first["attrs"]
    images = [a[i]["pixel_values"] for i in range(8)]
    assert all(not torch.equal(images[i], images[j]) for i, j in itertools.combinations(range(8), 2))
    other_seed = ShapesDataset(100, seed=4)
    assert not all(torch.equal(a[i]["pixel_values"], other_seed[i]["pixel_values"]) for i in range(4))


def test_dataset_is_the_same_through_worker_processes():
    dataset = ShapesDataset(8, seed=11)
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2, shuffle=False)
    batches = list(loader)
    pixels = torch.cat([b["pixel_values"] for b in batches])
    captions = [c for b in batches for c in b["caption"]]
    assert torch.equal(pixels, torch.stack([dataset[i]["pixel_values"] for i in range(8)]))
    assert captions == [dataset[i]["caption"] for i in range(8)]


def test_dataset_item_format():
    dataset = ShapesDataset(5, seed=0)
    assert len(dataset) == 5
    item = dataset[2]
    x = item["pixel_values"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(item["caption"], str)
    assert Attributes(**item["attrs"]).shape in SHAPES
    # the image in [-1, 1] is the rendered uint8 image, channels first
    image, text, attrs = sample(np.random.default_rng([0, 2]))
    assert torch.equal(x, torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1)
    assert text == item["caption"]
    with pytest.raises(IndexError):
        dataset[5]


# --- attributes and captions ---------------------------------------------------------------------


def test_every_attribute_value_is_reachable():
    rng = np.random.default_rng(0)
    drawn = [sample_attributes(rng) for _ in range(400)]
    assert {a.color for a in drawn} == set(COLORS)
    assert {a.shape for a in drawn} == set(SHAPES)
    assert {a.place for a in drawn} == set(PLACES)
    assert {a.size for a in drawn} == set(SIZES)
    assert {a.background for a in drawn} == set(BACKGROUNDS)
    combos = all_attributes()
    assert len(combos) == len(set(combos)) == 6 * 3 * 5 * 2 * 3
    assert len(set(all_prompts_full())) == 540


def test_captions_parse_back_to_their_attributes():
    words = set(vocabulary())
    assert vocabulary() == sorted(words)
    for attrs in all_attributes():
        for keep in KEEP_SUBSETS:
            text = caption(attrs, keep)
            expected = {name: getattr(attrs, name) for name in keep | {"shape"}}
            assert parse_prompt(text) == expected, text
            assert set(text.split()) <= words
    example = Attributes(color="red", shape="circle", place="left", size="large", background="white")
    assert caption(example) == "a large red circle on the left on a white background"
    assert caption(example, keep={"color"}) == "a red circle"
    assert caption(example, keep=set()) == "a circle"


def test_parse_prompt_ignores_case_and_spacing_and_reads_empty_as_nothing():
    assert parse_prompt("  A Small  BLUE square at the BOTTOM ") == {
        "size": "small",
        "color": "blue",
        "shape": "square",
        "place": "bottom",
    }
    assert parse_prompt("") == {}


@pytest.mark.parametrize(
    "prompt, named",
    [
        ("a red hexagon", "'hexagon'"),
        ("the red circle", "'the'"),
        ("a red", "ends early"),
        ("a red circle on the middle", "'on the middle'"),
        ("a red circle on a pink background", "'pink'"),
        ("a circle red", "'red'"),
        ("a red circle on a white background on the left", "in that order"),
        ("a large small circle", "'small'"),
    ],
)
def test_bad_prompt_raises_naming_the_problem(prompt, named):
    with pytest.raises(ValueError, match="grammar") as error:
        parse_prompt(prompt)
    assert named in str(error.value)


def test_caption_rejects_unknown_parts():
    with pytest.raises(ValueError, match="'shape'"):
        caption(all_attributes()[0], keep={"shape"})


def test_caption_dropout_rates():
    rng = np.random.default_rng(5)
    n = 1200
    results = [sample(rng) for _ in range(n)]
    texts = [t for _, t, _ in results]
    assert 0.07 < texts.count("") / n < 0.13
    named = [parse_prompt(t) for t in texts if t]
    for part in OPTIONAL_PARTS:
        rate = np.mean([part in p for p in named])
        assert 0.44 < rate < 0.56, (part, rate)
    assert 0.03 < np.mean([len(p) == 1 for p in named]) < 0.10  # "a circle": 1/16 of captions
    for (_, text, attrs), p in zip((r for r in results if r[1]), named):
        assert all(getattr(attrs, k) == v for k, v in p.items()), text
    # no dropout: always the full caption
    full = [sample(rng, drop_prob=0.0, empty_prob=0.0) for _ in range(20)]
    assert all(text == caption(attrs) for _, text, attrs in full)


# --- pixels --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def renders():
    """One render of every combination, with its attributes (random sizes and jitter)."""
    rng = np.random.default_rng(123)
    return [(attrs, render(attrs, rng)) for attrs in all_attributes()]


def test_render_pixels_are_background_shape_colour_or_a_blend(renders):
    for attrs, image in renders:
        assert image.shape == (64, 64, 3) and image.dtype == np.uint8
        fg, bg = np.array(COLORS[attrs.color]), np.array(BACKGROUNDS[attrs.background])
        pixels = image.reshape(-1, 3)
        assert (pixels == fg).all(axis=1).sum() >= 100, attrs  # the interior is exactly the palette
        assert (image[0, :] == bg).all() or (image[-1, :] == bg).all(), attrs
        alpha = coverage_of(image, attrs).reshape(-1, 1)
        assert alpha.min() >= -0.01 and alpha.max() <= 1.01
        blend = bg + np.clip(alpha, 0, 1) * (fg - bg)
        assert np.abs(pixels - blend).max() <= 1.0, attrs  # on the bg -> fg segment, up to rounding


def test_render_sizes_within_spec(renders):
    for attrs, image in renders:
        alpha = coverage_of(image, attrs)
        lo, hi = SIZES[attrs.size]
        across = np.sqrt(alpha.sum() / AREA_PER_SIZE2[attrs.shape])  # the whole area: nothing clipped
        assert lo - 0.3 <= across <= hi + 0.3, (attrs, across)
        ys, xs = np.nonzero(alpha > 0.02)
        width, height = xs.max() - xs.min() + 1, ys.max() - ys.min() + 1
        assert lo <= width <= hi + 1, (attrs, width)
        assert lo - 1 <= height <= hi + 1, (attrs, height)


def test_render_centres_near_places(renders):
    for attrs, image in renders:
        ys, xs = np.nonzero(coverage_of(image, attrs) > 0.02)
        centre = np.array([(xs.min() + xs.max()) / 2, (ys.min() + ys.max()) / 2])
        assert np.abs(centre - PLACES[attrs.place]).max() <= 2.5, (attrs, centre)


def test_layout_keeps_large_shapes_inside_the_frame_and_near_their_place():
    rng = np.random.default_rng(0)
    for place in PLACES:
        attrs = Attributes(color="red", shape="square", place=place, size="large", background="black")
        for _ in range(50):
            cx, cy, size = layout(attrs, rng)
            assert 30 <= size <= 37 and isinstance(size, int)
            for c in (cx, cy):
                assert c + 0.5 - size / 2 >= 0 and c + 0.5 + size / 2 <= 64
            assert np.abs(np.array([cx, cy]) - PLACES[place]).max() <= 2.0


def test_triangle_is_upright():
    attrs = Attributes(color="blue", shape="triangle", place="center", size="large", background="white")
    alpha = coverage_of(render(attrs, np.random.default_rng(0)), attrs)
    rows = alpha.sum(axis=1)
    filled = np.nonzero(rows > 0.5)[0]
    top, bottom = rows[filled[:5]].mean(), rows[filled[-6:-1]].mean()
    assert bottom > 4 * top  # narrow apex above, wide base below


@pytest.mark.parametrize("change", ["background", "color"])
def test_twins_are_the_dataset_item_and_the_same_drawing_with_one_attribute_changed(change):
    from sdkit.training.shapes import to_pixel_values, twins

    data = ShapesDataset(50, seed=4)
    changed_values = set()
    for index in range(12):
        image, twin, alpha = twins(4, index, change)
        assert torch.equal(to_pixel_values(image), data[index]["pixel_values"])
        item = data[index]["attrs"]
        inside, outside = alpha == 1.0, alpha == 0.0
        assert inside.sum() > 50 and outside.sum() > 1000
        table = BACKGROUNDS if change == "background" else COLORS
        kept_region, changed_region = (inside, outside) if change == "background" else (outside, inside)
        assert np.array_equal(image[kept_region], twin[kept_region])  # same geometry, other part untouched
        new = tuple(twin[changed_region][0])
        assert new != tuple(image[changed_region][0])
        value = next(name for name, rgb in table.items() if tuple(rgb) == new)
        assert value != item[change]
        changed_values.add(value)
    assert len(changed_values) >= 2  # the new value varies with the index
    with pytest.raises(ValueError, match="change must be one of"):
        twins(4, 0, "shape")
