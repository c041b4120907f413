"""A1111 1.10's parameters text: real infotexts parse into settings and format back to the same text; a
PNG the CLI wrote regenerates pixel for pixel with --from-png (and with infotext.regenerate)."""

import contextlib
import warnings

import numpy as np
import pytest
from helpers import build_reference_pipeline
from PIL import Image
from test_cli import pixels, run

import sdkit.schedulers as ours
from sdkit import StableDiffusionPipeline, infotext

# Infotexts in the form A1111 writes them (modules/processing.py create_infotext order, JSON quoting)
TABLE = [
    ("masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer\n"
     "Negative prompt: lowres, bad anatomy, bad hands\ntext, error, missing fingers\n"
     "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 2357123458, Size: 512x768, "
     "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Clip skip: 2, ENSD: 31337, Version: v1.10.1",
     {"prompt": "masterpiece, best quality, 1girl, (red hair:1.2), looking at viewer",
      "negative_prompt": "lowres, bad anatomy, bad hands\ntext, error, missing fingers", "num_inference_steps": 28,
      "guidance_scale": 7, "seed": 2357123458, "width": 512, "height": 768, "eta_noise_seed_delta": 31337, "rng": "gpu",
      "prompt_syntax": "a1111", "clip_stop_at_last_layers": 2},
     ("DPM++ 2M", "Karras"), []),
    ("a cozy cabin in the woods, <lora:add_detail:0.6>\nNegative prompt: easynegative\n"
     "Steps: 30, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7.5, Seed: 42, Size: 512x512, "
     "Model hash: 1a189f0be6, Model: dreamshaper_8, Variation seed: 3890284917, Variation seed strength: 0.35, "
     "Seed resize from: 768x512, Denoising strength: 0.55, RNG: CPU, Lora hashes: \"add_detail: 7c6bad76eb54\", "
     "TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1",
     {"guidance_scale": 7.5, "seed": 42, "subseed": 3890284917, "subseed_strength": 0.35, "seed_resize_from_w": 768,
      "seed_resize_from_h": 512, "strength": 0.55, "rng": "cpu"},
     ("Euler a", "Automatic"), ["Lora hashes", "TI hashes"]),
    ("portrait photo of an old man, dramatic lighting\n"
     "Steps: 25, Sampler: DPM++ SDE, Schedule type: Karras, CFG scale: 6, Seed: 1, Size: 512x512, "
     "Model hash: e6bb9ea85b, Model: realisticVisionV51, Denoising strength: 0.4, "
     "Hires prompt: \"portrait photo, old man, \\\"sharp\\\" focus\", Hires upscale: 2, Hires steps: 10, "
     "Hires upscaler: R-ESRGAN 4x+, ADetailer model: face_yolov8n.pt, ADetailer confidence: 0.3, "
     "Noise Schedule: Zero Terminal SNR, Eta: 0.67, Version: v1.9.4",
     {"num_inference_steps": 25, "guidance_scale": 6, "eta": 0.67}, ("DPM++ SDE", "Karras"),
     ["Hires prompt", "Hires upscale", "Hires steps", "Hires upscaler", "ADetailer model", "ADetailer confidence"]),
    ("a castle on a hill\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3312513442, Size: 512x512, "
     "Model hash: 45dee52b, Model: sd-v1-4, "
     "ControlNet 0: \"Module: canny, Model: control_v11p_sd15_canny [d14c016b], Weight: 1\", Version: v1.5.1",
     {"seed": 3312513442}, ("DPM++ 2M Karras", None), ["ControlNet 0"]),
    ("a lake at dawn\nSteps: 50, Sampler: DDIM, Schedule type: Automatic, CFG scale: 9, Seed: 7, Size: 768x768, "
     "Model hash: ad2a33c361, Model: v2-1_768-ema-pruned, Eta DDIM: 0.3, Version: v1.10.1",
     {"eta": 0.3, "width": 768}, ("DDIM", "Automatic"), []),
    ("Steps: 12, Sampler: Heun, Schedule type: Exponential, CFG scale: 4.5, Seed: 9, Size: 64x64, Model: tiny-shapes, "
     "RNG: NV, Sigma churn: 0.5, Sigma tmin: 0.1, Version: v1.10.1",
     {"prompt": "", "rng": "nv", "scheduler_options": {"s_churn": 0.5, "s_tmin": 0.1}}, ("Heun", "Exponential"), []),
]


@pytest.mark.parametrize("text, call, sampler, unsupported", TABLE)
def test_real_infotexts_parse_into_settings_and_format_back(text, call, sampler, unsupported):
    info = infotext.parse(text)
    assert info.text == text
    name, schedule, config, settings = infotext.generation_settings(info)
    assert (name, schedule) == sampler
    for key, value in call.items():
        assert settings[key] == value, key
    assert info.unsupported() == unsupported
    ours.from_name(name, {**config, "beta_schedule": "scaled_linear"}, schedule=schedule)  # A1111 names resolve


def test_fields_read_typed_and_set():
    info = infotext.parse(TABLE[1][0])
    assert info.get("Size") == (512, 512) and info.get("Seed resize from") == (768, 512)
    assert info.get("Lora hashes") == (("add_detail", "7c6bad76eb54"),) and info.get("CFG scale") == 7.5
    changed = info.replace(Steps=10, Denoising_strength=None, ENSD=5)
    assert changed.get("Steps") == 10 and "Denoising strength" not in changed
    assert changed.text.endswith('TI hashes: "easynegative: c74b4e810b03", ENSD: 5, Version: v1.10.1')
    assert infotext.parse("just a prompt") == infotext.Infotext("just a prompt")
    legacy = infotext.generation_settings(TABLE[3][0])[2]
    assert legacy["downcast_alphas_cumprod"] is True  # A1111 < 1.7 sampled with float16 alpha_bar
    assert infotext.generation_settings(TABLE[0][0])[2]["downcast_alphas_cumprod"] is False
    assert infotext.generation_settings(TABLE[2][0])[2]["rescale_betas_zero_snr"] is True


def test_what_sdkit_writes_is_what_a1111_writes():
    scheduler = ours.from_name("DPM++ 2M SDE", {"beta_schedule": "scaled_linear", "rescale_betas_zero_snr": True},
                               schedule="Karras")
    info = infotext.create("a red circle", "blurry, dark", steps=20, scheduler=scheduler,
                           run_options=scheduler.make_options(eta=0.5), cfg_scale=7.0, seed=5, width=512, height=512,
                           model="tiny-shapes", subseed=9, subseed_strength=0.25, ensd=31337, rng="cpu",
                           version="v1.10.1")
    assert info.text == ("a red circle\nNegative prompt: blurry, dark\nSteps: 20, Sampler: DPM++ 2M SDE, "
                         "Schedule type: Karras, CFG scale: 7, Seed: 5, Size: 512x512, Model: tiny-shapes, "
                         "Variation seed: 9, Variation seed strength: 0.25, ENSD: 31337, RNG: CPU, "
                         "Noise Schedule: Zero Terminal SNR, Eta: 0.5, Version: v1.10.1")
    reference = infotext.create("x", "", steps=4, scheduler=ours.DDIMScheduler(), cfg_scale=7.5, seed=1, width=64,
                                height=64, rng="gpu")
    assert reference.text == "x\nSteps: 4, Sampler: DDIMScheduler, CFG scale: 7.5, Seed: 1, Size: 64x64"


# -- regenerating ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_reference_pipeline(tmp_path_factory.mktemp("sd1")))


@pytest.mark.parametrize("flags", [
    ["--scheduler", "DPM++ 2M SDE", "--schedule-type", "Karras", "--subseed", "77", "--subseed-strength", "0.4",
     "--ensd", "31337", "--rng", "nv", "--eta", "0.8"],
    ["--scheduler", "Euler a", "--batch", "2"],
    ["--scheduler", "Euler", "--seed-resize-from", "48x40", "--negative", "blurry, dark", "--clip-skip", "2"],
    ["--scheduler", "DDIMScheduler", "--eta", "0.5"],
    ["--scheduler", "Heun", "--schedule-type", "Beta", "--ensd", "3"],
    ["--scheduler", "Euler a", "--guidance-end", "0.5", "--guidance-rescale", "0.7"],  # sdkit's Guidance end field
])
def test_cli_png_regenerates_identically_from_png(model, tmp_path, capsys, flags):
    out = tmp_path / "out.png"
    code, _, err = run(capsys, "generate", "a red circle, on the left", "-o", str(out), "--model", model,
                       "--steps", "4", "--seed", "21", "--enlarge", "1", "-q", *flags)
    assert code == 0, err
    made = sorted(tmp_path.glob("out*.png"))
    for k, path in enumerate(made):
        again = tmp_path / f"again-{k}.png"
        code, _, err = run(capsys, "generate", "--from-png", str(path), "-o", str(again), "--model", model,
                           "--enlarge", "1", "-q")
        assert code == 0 and err == "", err
        assert Image.open(again).info["parameters"] == Image.open(path).info["parameters"]
        if len(made) == 1:
            assert np.array_equal(pixels(path), pixels(again))
        else:  # image k of a batch made alone: equal up to the rounding of batched matrix products
            diff = np.abs(pixels(path).astype(int) - pixels(again).astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01


def test_from_png_flags_override_and_unsupported_fields_warn_in_one_line(model, tmp_path, capsys):
    text = TABLE[2][0].replace("Size: 512x512", "Size: 64x64")
    out = tmp_path / "o.png"
    code, _, err = run(capsys, "generate", "--from-png", text, "-o", str(out), "--model", model, "--steps", "3",
                       "--enlarge", "1", "-q")
    assert code == 0
    assert err.count("\n") == 1 and err.startswith("sdkit: warning: ignoring settings sdkit does not support: ")
    assert "Hires upscale" in err and "ADetailer model" in err
    written = infotext.parse(Image.open(out).info["parameters"])
    assert (written.get("Steps"), written.get("Sampler"), written.get("Seed"), written.get("Eta")) == (3, "DPM++ SDE", 1, 0.67)
    assert written.prompt == "portrait photo of an old man, dramatic lighting"


@pytest.mark.parametrize("text, message", [
    (TABLE[0][0].replace("Size: 512x768", "Size: 64x64"), "made with the model 'v1-5-pruned-emaonly': pass --model"),
])
def test_from_png_needs_the_model_it_names(tmp_path, capsys, text, message):
    code, _, err = run(capsys, "generate", "--from-png", text, "-o", str(tmp_path / "x.png"), "-q")
    assert code == 2 and message in err and not (tmp_path / "x.png").exists()


def test_from_png_of_img2img_needs_the_init_image(model, tmp_path, capsys):
    text = TABLE[1][0].replace("Size: 512x512", "Size: 64x64")
    code, _, err = run(capsys, "generate", "--from-png", text, "-o", str(tmp_path / "x.png"), "--model", model, "-q")
    assert code == 2 and "made by img2img (Denoising strength 0.55): pass its --init-image" in err


def test_regenerate_function_gives_the_cli_pixels(model, tmp_path, capsys):
    out = tmp_path / "cli.png"
    code, _, err = run(capsys, "generate", "a blue square", "-o", str(out), "--model", model, "--steps", "3",
                       "--seed", "8", "--scheduler", "DPM++ 2S a", "--enlarge", "1", "-q")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing unsupported in sdkit's own PNG
        image = infotext.regenerate(str(out), pipe).images[0]
    assert np.array_equal(np.asarray(image), pixels(out))
    with pytest.warns(UserWarning, match="sdkit ignores these settings of the infotext: Lora hashes, TI hashes"):
        text = TABLE[1][0].replace("Size: 512x512", "Size: 64x64").replace(", <lora:add_detail:0.6>", "")
        text = text.replace("Negative prompt: easynegative\n", "")  # a NaN embedding on the tiny vocabulary
        infotext.regenerate(text, pipe, image=pixels(out),
                            num_inference_steps=2)


def test_an_openvino_infotext_says_how_to_get_its_pixels_and_a_bad_one_is_refused(model, tmp_path, capsys):
    out = tmp_path / "eager.png"
    code, _, err = run(capsys, "generate", "a red circle", "-o", str(out), "--model", model, "--steps", "2",
                       "--seed", "3", "--enlarge", "1", "-q")
    assert code == 0, err
    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    made = infotext.load(str(out)).replace(OpenVINO="bf16")
    with pytest.warns(UserWarning, match=r'made with pipe.compile\(backend="openvino", precision="bf16"\)'):
        infotext.regenerate(made, pipe)  # an eager pipeline: warned, not silently other pixels
    crafted = infotext.load(str(out)).replace(OpenVINO="fp8").text
    code, _, err = run(capsys, "generate", "--from-png", crafted, "-o", str(tmp_path / "x.png"), "--model", model, "-q")
    assert code == 2 and "its OpenVINO field 'fp8' is not f32 or bf16" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()
    code, _, err = run(capsys, "generate", "--from-png", crafted, "-o", str(tmp_path / "y.png"), "--model", model,
                       "-q", "--enlarge", "1", "--no-openvino")  # eager: the PNG's precision no longer matters
    assert code == 0, err
    assert np.array_equal(pixels(tmp_path / "y.png"), pixels(out))
    assert "OpenVINO" not in infotext.load(str(tmp_path / "y.png"))


@pytest.mark.parametrize("args, message", [
    (["--scheduler", "Euler", "--schedule-type", "Fast"], "unknown --schedule-type 'Fast': use one of Automatic"),
    (["--schedule-type", "Karras"], "--schedule-type needs an A1111 --scheduler name"),
    (["--subseed-strength", "0.5"], "subseed_strength needs a subseed"),
    (["--rng", "amd"], None),
])
def test_seed_and_schedule_flags_fail_in_one_line(model, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) if message is None else contextlib.nullcontext():  # argparse refuses --rng
        code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "x.png"), "--model", model,
                           "--steps", "1", "-q", *args)
    if message is not None:
        assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()

