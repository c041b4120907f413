"""The `sdkit` command line: generate, PNG settings in A1111's format, errors without traceback."""

import importlib.util
import os
import subprocess
import sys

import numpy as np
import pytest
from helpers import build_reference_pipeline, sample_image, sample_mask
from PIL import Image

from sdkit.cli import format_parameters, main, parse_parameters


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return str(build_reference_pipeline(tmp_path_factory.mktemp("tiny-sd1")))


def run(capsys, *argv):
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


def pixels(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_parameters_text_round_trip():
    text = format_parameters("a red circle, on a white background", "blurry", 25, "Euler a", 7.5, 42,
                             64, 64, "tiny-shapes", strength=0.6)
    assert text == ("a red circle, on a white background\nNegative prompt: blurry\n"
                    "Steps: 25, Sampler: Euler a, CFG scale: 7.5, Seed: 42, Size: 64x64, "
                    "Model: tiny-shapes, Denoising strength: 0.6")
    parsed = parse_parameters(text)
    assert parsed == {"prompt": "a red circle, on a white background", "negative_prompt": "blurry",
                      "Steps": "25", "Sampler": "Euler a", "CFG scale": "7.5", "Seed": "42",
                      "Size": "64x64", "Model": "tiny-shapes", "Denoising strength": "0.6"}
    assert parse_parameters("just a prompt")["prompt"] == "just a prompt"


def test_generate_writes_png_with_settings_and_regenerates(model, tmp_path, capsys):
    out = tmp_path / "out.png"
    code, stdout, err = run(capsys, "generate", "a red circle", "-o", str(out), "--model", model,
                            "--steps", "3", "--seed", "7", "--negative", "blurry", "--scheduler", "Euler a",
                            "--guidance", "5", "--guidance-rescale", "0.5", "-q")
    assert code == 0, err
    params = parse_parameters(Image.open(out).info["parameters"])
    assert params["prompt"] == "a red circle" and params["negative_prompt"] == "blurry"
    assert (params["Steps"], params["Sampler"], params["CFG scale"], params["Seed"], params["Size"],
            params["CFG Rescale phi"]) == ("3", "Euler a", "5", "7", "64x64", "0.5")
    big = tmp_path / "out.x4.png"
    assert Image.open(big).size == (256, 256) and str(big) in stdout
    # regenerate from the stored settings alone
    w, h = params["Size"].split("x")
    again = tmp_path / "again.png"
    code, _, err = run(capsys, "generate", params["prompt"], "-o", str(again), "--model", model,
                       "--negative", params["negative_prompt"], "--steps", params["Steps"],
                       "--scheduler", params["Sampler"], "--guidance", params["CFG scale"],
                       "--guidance-rescale", params["CFG Rescale phi"], "--seed", params["Seed"], "--width", w, "--height", h, "-q", "--enlarge", "1")
    assert code == 0, err
    assert np.array_equal(pixels(out), pixels(again))
    assert not (tmp_path / "again.x4.png").exists()


def test_batch_seeds_are_per_image(model, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a blue square", "-o", str(tmp_path / "b.png"), "--model", model,
                       "--steps", "2", "--seed", "100", "--batch", "2", "-q", "--enlarge", "1")
    assert code == 0, err
    second = tmp_path / "b-2.png"
    assert parse_parameters(Image.open(second).info["parameters"])["Seed"] == "101"
    code, _, err = run(capsys, "generate", "a blue square", "-o", str(tmp_path / "alone.png"), "--model", model,
                       "--steps", "2", "--seed", "101", "-q", "--enlarge", "1")
    assert code == 0, err
    # equal up to float rounding of batched vs single matmuls (at most one 8-bit level, rarely)
    diff = np.abs(pixels(second).astype(int) - pixels(tmp_path / "alone.png").astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    assert not np.array_equal(pixels(second), pixels(tmp_path / "b-1.png"))


def test_random_seed_is_printed_and_stored(model, tmp_path, capsys):
    code, stdout, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "r.png"), "--model", model,
                            "--steps", "1", "-q", "--enlarge", "1")
    assert code == 0, err
    seed = stdout.split("seed: ")[1].split()[0]
    assert parse_parameters(Image.open(tmp_path / "r.png").info["parameters"])["Seed"] == seed


def test_img2img_and_inpaint(model, tmp_path, capsys):
    init, mask = tmp_path / "init.png", tmp_path / "mask.png"
    sample_image().save(init)
    sample_mask().save(mask)
    code, _, err = run(capsys, "generate", "a red circle", "-o", str(tmp_path / "i2i.png"), "--model", model,
                       "--steps", "4", "--seed", "1", "--init-image", str(init), "--strength", "0.5", "-q")
    assert code == 0, err
    assert "Denoising strength: 0.5" in Image.open(tmp_path / "i2i.png").info["parameters"]
    code, _, err = run(capsys, "generate", "a red circle", "-o", str(tmp_path / "inp.png"), "--model", model,
                       "--steps", "2", "--seed", "1", "--init-image", str(init), "--mask", str(mask), "-q")
    assert code == 0, err
    assert Image.open(tmp_path / "inp.png").size == (64, 64)


@pytest.mark.parametrize("args, message", [
    (["--model", "/no/such/model"], "cannot load model '/no/such/model'"),
    (["--width", "60"], "--width 60 must be a positive multiple of 8"),
    (["--steps", "0"], "--steps 0 must be at least 1"),
    (["--strength", "1.5", "--init-image", "x.png"], "--strength 1.5 must be between 0 and 1"),
    (["--scheduler", "Heun++"], "unknown --scheduler 'Heun++'"),
    (["--init-image", "/no/such.png"], "--init-image /no/such.png does not exist"),
    (["--mask", "m.png"], "--mask needs --init-image"),
    (["--openvino-precision", "bf16"], "--openvino-precision bf16 needs --openvino"),
])
def test_errors_are_one_line_and_write_nothing(model, tmp_path, capsys, args, message):
    out = tmp_path / "never.png"
    argv = ["generate", "a circle", "-o", str(out), "--steps", "1", "-q", *args]
    if "--model" not in args:
        argv += ["--model", model]
    code, _, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("sdkit: error: ") and message in err and err.count("\n") == 1
    assert "Traceback" not in err
    assert os.listdir(tmp_path) == []


@pytest.mark.slow
def test_openvino_gives_the_eager_png_records_itself_and_bf16_gives_a_close_one_or_a_one_line_error(model, tmp_path):
    """In fresh processes, as the command runs (OpenVINO's runtime stays out of the test process: loaded in
    it, a later test's self-sent SIGTERM crashed the process; see conftest.py)."""
    if importlib.util.find_spec("openvino") is None:
        pytest.skip("openvino is not installed")
    exe = os.path.join(os.path.dirname(sys.executable), "sdkit")
    env = {**os.environ, "SDKIT_CACHE": str(tmp_path / "cache")}

    def sdkit(*argv):
        proc = subprocess.run([exe, "generate", *argv, "--model", model, "-q", "--enlarge", "1"],
                              capture_output=True, text=True, timeout=600, env=env)
        return proc.returncode, proc.stderr

    argv = ["a red circle", "--steps", "3", "--seed", "7"]
    assert sdkit(*argv, "-o", str(tmp_path / "eager.png"))[0] == 0
    code, err = sdkit(*argv, "-o", str(tmp_path / "ov.png"), "--openvino")
    assert code == 0, err
    eager, compiled = pixels(tmp_path / "eager.png").astype(int), pixels(tmp_path / "ov.png").astype(int)
    assert np.abs(eager - compiled).max() <= 1  # float32 to 1e-4: at most a rounding step apart
    assert os.listdir(tmp_path / "cache" / "openvino")  # the compiled models were kept on disk
    assert parse_parameters(Image.open(tmp_path / "ov.png").info["parameters"])["OpenVINO"] == "f32"
    assert "OpenVINO" not in parse_parameters(Image.open(tmp_path / "eager.png").info["parameters"])
    code, err = sdkit("--from-png", str(tmp_path / "ov.png"), "-o", str(tmp_path / "again.png"))
    assert code == 0 and "warning" not in err, err
    assert np.array_equal(pixels(tmp_path / "again.png"), pixels(tmp_path / "ov.png"))
    assert parse_parameters(Image.open(tmp_path / "again.png").info["parameters"])["OpenVINO"] == "f32"  # compiled
    code, err = sdkit(*argv, "-o", str(tmp_path / "bf16.png"), "--openvino", "--openvino-precision", "bf16")
    has_bf16 = subprocess.run([sys.executable, "-c", "import openvino; print('BF16' in openvino.Core().get_property("
                               "'CPU', 'OPTIMIZATION_CAPABILITIES'))"], capture_output=True, text=True).stdout
    if has_bf16.strip() == "True":
        assert code == 0, err
        assert 0 < np.abs(pixels(tmp_path / "bf16.png").astype(int) - eager).mean() < 8
        assert parse_parameters(Image.open(tmp_path / "bf16.png").info["parameters"])["OpenVINO"] == "bf16"
    else:
        assert code == 2 and 'precision="bf16" needs a CPU with bfloat16 instructions' in err
        assert err.count("\n") == 1 and not (tmp_path / "bf16.png").exists()


def test_openvino_without_openvino_installed_is_one_line(model, tmp_path, capsys, monkeypatch):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "openvino" else find_spec(name, *a))
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "x.png"), "--model", model, "--openvino")
    assert code == 2 and err == 'sdkit: error: --openvino needs OpenVINO: pip install "sdkit[openvino]"\n'
    assert os.listdir(tmp_path) == []


def test_unwritable_output(model, tmp_path, capsys):
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "missing" / "x.png"), "--model", model)
    assert code == 2 and "does not exist" in err
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "x.jpg"), "--model", model)
    assert code == 2 and "must end in .png" in err


def test_console_script(model, tmp_path):
    """The installed `sdkit` command itself, end to end, in a fresh process."""
    exe = os.path.join(os.path.dirname(sys.executable), "sdkit")
    out = tmp_path / "cmd.png"
    proc = subprocess.run([exe, "generate", "a green triangle", "-o", str(out), "--model", model,
                           "--steps", "2", "--seed", "3", "-q"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (64, 64)
    proc = subprocess.run([exe, "generate", "x", "-o", str(tmp_path / "y.png"), "--model", "/nope"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1


def test_bundled_model_is_the_default(tmp_path, capsys):
    """No --model: the bundled tiny-shapes model, at its recommended_settings.json guidance scale, rescale and end."""
    out = tmp_path / "default.png"
    code, _, err = run(capsys, "generate", "a large blue square on the left on a white background",
                       "-o", str(out), "--steps", "5", "--seed", "0", "-q")
    assert code == 0, err
    params = parse_parameters(Image.open(out).info["parameters"])
    assert (params["Model"], params["CFG scale"], params["CFG Rescale phi"], params["Guidance end"], params["Size"],
            params["Sampler"]) == ("tiny-shapes", "5", "0.7", "0.6", "64x64", "DDIMScheduler")


def test_the_model_folder_s_recommended_settings_are_the_defaults(model, tmp_path, capsys):
    """A folder's recommended_settings.json sets the defaults of --steps, --guidance, --guidance-rescale,
    --guidance-end and the sampler; flags win; without the file the defaults are 25, 7.5, 0, 1."""
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(model, folder)
    (folder / "recommended_settings.json").write_text(
        '{"guidance_scale": 4, "guidance_rescale": 0.5, "guidance_end": 0.5, "num_inference_steps": 3, '
        '"scheduler": "Euler a"}')
    fields = ("Steps", "Sampler", "CFG scale", "CFG Rescale phi", "Guidance end")

    def settings(folder, *flags):
        out = tmp_path / "x.png"
        code, _, err = run(capsys, "generate", "a red circle", "-o", str(out), "--model", str(folder), "--seed", "1",
                           "-q", *flags)
        assert code == 0, err
        params = parse_parameters(Image.open(out).info["parameters"])
        return tuple(params.get(name) for name in fields)

    assert settings(folder) == ("3", "Euler a", "4", "0.5", "0.5")
    assert settings(folder, "--guidance", "6", "--steps", "2", "--guidance-rescale", "0", "--guidance-end", "1",
                    "--scheduler", "DDIM") == ("2", "DDIM", "6", None, None)
    assert settings(model, "--steps", "2") == ("2", "PNDMScheduler", "7.5", None, None)


def test_missing_bundled_model_is_one_line(tmp_path, capsys, monkeypatch):
    import sdkit

    monkeypatch.setattr(sdkit, "TINY_MODEL", str(tmp_path / "missing"))
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "x.png"))
    assert code == 2 and "bundled model is missing" in err and err.count("\n") == 1
    assert not (tmp_path / "x.png").exists()


def test_a1111_script_names_are_aliases(model, tmp_path, capsys):
    """--cfg-scale and --sampler (A1111 scripts' habits) are --guidance and --scheduler: the same image."""
    common = ["--model", model, "--steps", "2", "--seed", "3", "-q", "--enlarge", "1"]
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "a.png"), "--guidance", "4",
                       "--scheduler", "Euler a", *common)
    assert code == 0, err
    code, _, err = run(capsys, "generate", "a circle", "-o", str(tmp_path / "b.png"), "--cfg-scale", "4",
                       "--sampler", "Euler a", *common)
    assert code == 0, err
    params = parse_parameters(Image.open(tmp_path / "b.png").info["parameters"])
    assert (params["Sampler"], params["CFG scale"]) == ("Euler a", "4")
    assert np.array_equal(pixels(tmp_path / "a.png"), pixels(tmp_path / "b.png"))
