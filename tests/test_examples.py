"""Each example script runs once, as a user would run it, against a tiny saved pipeline folder."""

import os
import subprocess
import sys

import pytest
from PIL import Image

import sdkit
from helpers import build_reference_pipeline

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return {"sd1": build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1"),
            "inpaint": build_reference_pipeline(str(tmp_path_factory.mktemp("inpaint")), "inpaint")}


def run(script, *args):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "CUDA_VISIBLE_DEVICES": "",
           "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny models: threads only spin
    return subprocess.run([sys.executable, os.path.join(EXAMPLES, script), *args], capture_output=True,
                          text=True, env=env, timeout=300)


@pytest.mark.parametrize("script, kind, extra, width", [
    ("txt2img.py", "sd1", ["-p", "a red circle", "-n", "blurry"], 64),
    ("img2img.py", "sd1", ["--strength", "0.6"], 64),
    ("swap_scheduler.py", "sd1", ["-s", "DDIMScheduler", "Euler a", "DPM++ 2M Karras"], 3 * 64),
])
def test_example_writes_an_image(folders, tmp_path, script, kind, extra, width):
    out = tmp_path / "out.png"
    result = run(script, folders[kind], "-o", str(out), "--steps", "2", *extra)
    assert result.returncode == 0, result.stderr[-3000:]
    with Image.open(out) as image:
        assert image.size == (width, 64) and image.mode == "RGB"


def test_inpaint_example_with_image_and_mask_files(folders, tmp_path):
    from helpers import sample_image, sample_mask

    sample_image().save(tmp_path / "in.png")
    sample_mask().save(tmp_path / "mask.png")
    out = tmp_path / "out.png"
    result = run("inpaint.py", folders["inpaint"], "-i", str(tmp_path / "in.png"), "-m", str(tmp_path / "mask.png"),
                 "-o", str(out), "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size == (64, 64)


def test_without_a_model_the_example_says_the_bundled_one_is_missing(tmp_path, monkeypatch, capsys):
    """A broken install (no bundled model): a plain message, no traceback, no output file."""
    import runpy

    monkeypatch.setattr(sdkit, "TINY_MODEL", str(tmp_path / "missing"))
    example = runpy.run_path(os.path.join(EXAMPLES, "txt2img.py"))  # defines main() without running it
    with pytest.raises(SystemExit) as exit_info:
        example["main"](["-o", str(tmp_path / "out.png")])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "no model was given" in err and "bundled model is missing" in err
    assert not (tmp_path / "out.png").exists()


@pytest.mark.skipif(not os.path.isdir(sdkit.TINY_MODEL), reason="the bundled model is not built yet")
def test_without_a_model_the_example_uses_the_bundled_one(tmp_path):
    out = tmp_path / "out.png"
    result = run("txt2img.py", "-o", str(out), "--steps", "2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert Image.open(out).size[0] > 0


def test_examples_use_the_model_s_recommended_settings(folders, tmp_path):
    """Without --steps and --guidance the example draws what the pipeline's default call draws: the
    folder's recommended_settings.json (here 2 steps, guidance 4), not constants of its own."""
    import shutil

    import numpy as np
    import torch

    folder = tmp_path / "model"
    shutil.copytree(folders["sd1"], folder)
    (folder / "recommended_settings.json").write_text('{"num_inference_steps": 2, "guidance_scale": 4.0}')
    out = tmp_path / "out.png"
    result = run("txt2img.py", str(folder), "-o", str(out), "-p", "a red circle")
    assert result.returncode == 0, result.stderr[-3000:]
    pipe = sdkit.StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)

    def pixels(**kwargs):
        image = pipe("a red circle", generator=torch.Generator().manual_seed(0), **kwargs).images[0]
        return np.asarray(image, dtype=np.int16)

    drawn = np.asarray(Image.open(out), dtype=np.int16)
    assert np.abs(drawn - pixels()).max() <= 1  # uint8 rounding of float differences between processes
    assert np.abs(drawn - pixels(guidance_scale=7.5)).max() > 1
