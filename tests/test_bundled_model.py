"""The bundled tiny-shapes model: layout, size, and that it follows prompts (so a broken model or
pipeline fails CI). The full quality numbers come from benchmarks/quality.py (see MODEL_CARD.md)."""

import json
import os
import warnings

import numpy as np
import pytest
import torch

import sdkit
from sdkit.training import geometry
from sdkit.training.judge import judge, score
from sdkit.training.shapes import parse_prompt

MODEL = sdkit.TINY_MODEL
PROMPTS = [
    "a large red circle on the left on a white background",
    "a small blue square at the top on a black background",
    "a large yellow triangle in the center on a gray background",
    "a small green circle at the bottom on a white background",
    "a large purple square on the right on a white background",
    "a large orange triangle at the top on a black background",
    "a small red triangle on the right on a gray background",
    "a large blue circle at the bottom on a gray background",
]


def test_bundled_model_is_a_small_safetensors_diffusers_folder():
    index = json.loads(open(os.path.join(MODEL, "model_index.json")).read())
    assert index["_class_name"] == "StableDiffusionPipeline"
    for part, library, cls in [("unet", "diffusers", "UNet2DConditionModel"), ("vae", "diffusers", "AutoencoderKL"),
                               ("text_encoder", "transformers", "CLIPTextModel"),
                               ("tokenizer", "transformers", "CLIPTokenizer")]:
        assert index[part] == [library, cls]
        assert os.path.isdir(os.path.join(MODEL, part))
    assert index["scheduler"][0] == "diffusers" and os.path.isfile(
        os.path.join(MODEL, "scheduler", "scheduler_config.json"))
    assert index["safety_checker"] == [None, None] and index["requires_safety_checker"] is False
    files = [os.path.join(root, f) for root, _, names in os.walk(MODEL) for f in names]
    assert sum(os.path.getsize(f) for f in files) <= 30 * 10**6
    weights = [f for f in files if f.endswith((".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".pkl"))]
    assert weights and all(f.endswith(".safetensors") for f in weights)
    assert os.path.isfile(os.path.join(os.path.dirname(MODEL), "tiny-shapes", "MODEL_CARD.md"))


@pytest.fixture(scope="module")
def pipe():
    pipe = sdkit.StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe

# short prompts leave the background (and size, place) open: the colours between two others,
# orange and purple, were the ones an earlier model lost there
SHORT_PROMPTS = ["a orange circle", "a purple triangle", "a yellow square", "a red triangle", "a green square",
                 "a blue circle", "a orange square", "a purple circle"]


def adherence(pipe, prompts, **options):
    """Per attribute, the fraction of images that have it (the shapes judge), and "fill shape": the
    shape class read from how much of its bounding box the shape fills (geometry.py)."""
    generators = [torch.Generator().manual_seed(100 + i) for i in range(len(prompts))]
    images = pipe(prompts, generator=generators, output_type="np", **options).images
    hits = {}
    for image, prompt in zip(images, prompts):
        named = parse_prompt(prompt)
        for name, ok in score(named, judge(image)).items():
            hits.setdefault(name, []).append(ok)
        measured = geometry.measure(image)
        hits.setdefault("fill shape", []).append(measured is not None and measured.fill_shape == named["shape"])
    return {name: float(np.mean(v)) for name, v in hits.items()}


def test_the_folder_recommends_its_settings(pipe):
    """The bundled folder carries its recommended settings, so pipe(prompt) uses them."""
    settings = json.loads(open(os.path.join(MODEL, "recommended_settings.json")).read())
    assert pipe.recommended.as_dict() == settings
    assert settings["guidance_scale"] < 7.5 and 0 < settings["guidance_rescale"] <= 1

    def draw(**options):
        return pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="np", **options).images

    default = draw()
    assert np.array_equal(default, draw(guidance_scale=settings["guidance_scale"],
                                        guidance_rescale=settings["guidance_rescale"],
                                        num_inference_steps=settings["num_inference_steps"]))
    assert np.abs(default - draw(guidance_scale=7.5)).max() > 0.05  # a passed value wins


def test_bundled_model_follows_prompts(pipe):
    # at the pipeline's defaults (the folder's recommended settings); one miss is allowed for
    # floating-point differences between machines
    acc = adherence(pipe, PROMPTS)
    assert all(acc[name] >= 7 / 8 for name in ("color", "shape", "background", "place", "size")), acc


def test_bundled_model_draws_the_colour_of_short_prompts(pipe):
    # measured 2026-11-24 (15 steps, guidance 3, rescale 0.7): colour and shape 8/8; the model before
    # the colour factorization drew orange red or yellow and purple blue on prompts like these
    acc = adherence(pipe, SHORT_PROMPTS)
    assert acc["color"] >= 7 / 8 and acc["shape"] >= 7 / 8, acc


def _every_scheduler_class():
    from sdkit import schedulers

    return [*schedulers.SCHEDULER_CLASSES, "PLMSScheduler", *schedulers.A1111_CLASSES]


@pytest.mark.slow
@pytest.mark.parametrize("name", _every_scheduler_class())
def test_every_scheduler_class_draws_the_shape_at_the_recommended_settings_or_says_why(pipe, name, monkeypatch):
    """Swapped in as diffusers users do (``from_config``): a class whose config cannot honour the
    model's zero-terminal-SNR schedule warns naming it, one that cannot read v-prediction refuses;
    every other class draws the prompt's colour and shape at the pipeline's defaults. Measured
    2026-12-02 on PROMPTS: every class 8/8 shape and colour (PNDM, PLMS and LMS warn and still do)."""
    from sdkit.schedulers import base as scheduler_base
    from sdkit.schedulers import get_scheduler_class

    monkeypatch.setattr(scheduler_base, "_warned_dropped", set())  # the warning comes once per process
    cls = get_scheduler_class(name)
    if name == "KLCMScheduler":  # LCM distils epsilon models: it names what it cannot read
        with pytest.raises(ValueError, match="prediction_type='v_prediction' is not supported"):
            cls.from_config(pipe.scheduler.config)
        return
    keeps_zero_snr = "rescale_betas_zero_snr" in cls.config_keys()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scheduler = cls.from_config(pipe.scheduler.config)
    reasons = [str(w.message) for w in caught if "rescale_betas_zero_snr" in str(w.message)]
    assert bool(reasons) != keeps_zero_snr, reasons
    assert all("zero-terminal-SNR" in r or "zero terminal SNR" in r for r in reasons), reasons
    acc = adherence(pipe, PROMPTS[:4], scheduler=scheduler)
    assert acc["shape"] >= 3 / 4 and acc["color"] >= 3 / 4, acc


def test_diffusers_draws_the_same_pixels_from_the_bundled_model(pipe):
    """The bundled folder is a diffusers pipeline (zero-SNR DDIM, trailing): same seed, same image."""
    import diffusers

    reference = diffusers.StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None)
    reference.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=10, guidance_scale=pipe.recommended.guidance_scale,
                  guidance_rescale=pipe.recommended.guidance_rescale, output_type="np")
    # guidance at every step, as diffusers (which does not read the folder's guidance_end) runs it
    ours = pipe(PROMPTS[0], generator=torch.Generator().manual_seed(0), guidance_end=1.0, **kwargs).images
    theirs = reference(PROMPTS[0], generator=torch.Generator().manual_seed(0), **kwargs).images
    assert np.abs(ours - theirs).max() <= 1e-4



def judged(images, prompts):
    """(the judge's scores, the fill shape) of each (B, 3, H, W) image in [-1, 1], read at 64 x 64."""
    small = (torch.nn.functional.interpolate(images, size=64, mode="area") / 2 + 0.5).clamp(0, 1)
    out = []
    for image, prompt in zip(small.permute(0, 2, 3, 1).numpy(), prompts):
        measured = geometry.measure(image)
        out.append((score(parse_prompt(prompt), judge(image)), measured and measured.fill_shape))
    return out


@pytest.mark.slow
def test_the_judge_reads_512_pixel_tiled_decodes_of_bundled_drawings_as_untiled_ones(pipe):
    """VAE tiling at 512 x 512 (issue 20): 16 drawings of the bundled model, enlarged 8x to 512 x 512 and
    encoded, then decoded whole and in tiles of the default size (the VAE's sample_size, 64 pixels,
    overlapping by 16: 121 tiles). The judge, reading each image at 64 x 64, finds every attribute
    and the fill shape of the tiled decode as in the untiled one, which are those of the drawing.
    The tiles share the whole image's GroupNorm statistics; normalising each tile on its own (as
    diffusers' tiling does, run here on the same latents) changes most judgements, so the check can
    fail. Measured 2026-12-02: 16 of 16 equal, mean |tiled - untiled| 0.020 (sdkit's tiling with
    ``tile_norm="tile"``: 0.133, 1 of 16 equal; diffusers' 0.134)."""
    import copy

    import diffusers

    prompts = PROMPTS * 2
    generators = [torch.Generator().manual_seed(200 + i) for i in range(len(prompts))]
    drawings = pipe(prompts, generator=generators, output_type="pt").images * 2 - 1
    vae = copy.deepcopy(pipe.vae)
    reference = diffusers.AutoencoderKL.from_pretrained(os.path.join(MODEL, "vae")).eval()
    reference.enable_tiling()
    reference.tile_sample_min_size, reference.tile_latent_min_size = 64, 8
    with torch.no_grad():
        z = vae.encode(torch.nn.functional.interpolate(drawings, scale_factor=8, mode="nearest")).mean
        whole = torch.cat([vae.decode(z[i:i + 1]) for i in range(len(z))])
        vae.enable_tiling()
        assert vae.tile_sample_min_size == 64
        tiled = torch.cat([vae.decode(z[i:i + 1]) for i in range(len(z))])
        per_tile = torch.cat([reference.decode(z[i:i + 1]).sample for i in range(len(z))])
    assert tiled.shape == (16, 3, 512, 512)
    error = float((tiled - whole).abs().mean() / 2)
    print("mean |tiled - untiled|", error, "per-tile statistics", float((per_tile - whole).abs().mean() / 2))
    assert error < 0.04
    assert judged(tiled, prompts) == judged(whole, prompts) == judged(drawings, prompts)
    assert sum(a != b for a, b in zip(judged(per_tile, prompts), judged(whole, prompts))) >= 4
