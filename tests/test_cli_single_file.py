"""`sdkit generate --model FILE` and `sdkit convert`: single files on the command line."""

import hashlib
import os

import numpy as np
import pytest
import torch
from helpers import build_reference_pipeline, one_torch_thread
from PIL import Image
from safetensors.torch import load_file

from sdkit import StableDiffusionPipeline
from sdkit.cli import format_parameters, main, parse_parameters


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1", seed=3, single_file=True)


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_parameters_carry_the_model_hash():
    text = format_parameters("a cat", "", 20, "Euler a", 7.0, 1, 512, 512, "v1-5-pruned-emaonly",
                             model_hash="6ce0161689")
    assert "Size: 512x512, Model hash: 6ce0161689, Model: v1-5-pruned-emaonly" in text
    assert parse_parameters(text)["Model hash"] == "6ce0161689"


def test_convert_folder_to_file_to_folder_and_generate(folder, tmp_path, capsys):
    """folder -> file -> folder keeps every tensor; generate --model FILE gives the folder's image and writes
    A1111's Model hash (sha256, first 10 hex digits) and Model (the file stem)."""
    model = tmp_path / "my-model.safetensors"
    code, out, err = run(capsys, "convert", folder, model)
    assert code == 0 and out.strip() == str(model) and err == ""
    code, out, err = run(capsys, "convert", model, tmp_path / "back")
    assert code == 0 and "prediction_type=epsilon (the default for SD 1.x)" in err
    original = StableDiffusionPipeline.from_pretrained(folder)
    back = StableDiffusionPipeline.from_pretrained(tmp_path / "back")
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(original, name).state_dict(), getattr(back, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")]  # no temporary folder left

    args = ("a red circle", "--steps", 3, "--seed", 5, "--width", 64, "--height", 64, "-q", "--enlarge", 1)
    assert run(capsys, "generate", *args, "--model", model, "-o", tmp_path / "file.png")[0] == 0
    assert run(capsys, "generate", *args, "--model", folder, "-o", tmp_path / "folder.png")[0] == 0
    image = Image.open(tmp_path / "file.png")
    params = parse_parameters(image.info["parameters"])
    assert params["Model hash"] == hashlib.sha256(model.read_bytes()).hexdigest()[:10]
    assert params["Model"] == "my-model"
    expected = np.asarray(Image.open(tmp_path / "folder.png"), dtype=np.int16)
    assert np.abs(np.asarray(image, dtype=np.int16) - expected).max() <= 1
    assert "Model hash" not in Image.open(tmp_path / "folder.png").info["parameters"]


def test_convert_ckpt_needs_allow_pickle(folder, tmp_path, capsys):
    StableDiffusionPipeline.from_pretrained(folder).save_single_file(tmp_path / "a.safetensors", dtype=torch.float16)
    state_dict = load_file(tmp_path / "a.safetensors")
    torch.save({"state_dict": state_dict, "global_step": 100}, tmp_path / "old.ckpt")
    code, out, err = run(capsys, "convert", tmp_path / "old.ckpt", tmp_path / "new.safetensors")
    assert code == 2 and "allow_pickle=True (sdkit convert --allow-pickle)" in err and "Traceback" not in err
    assert not (tmp_path / "new.safetensors").exists()
    code, out, err = run(capsys, "convert", tmp_path / "old.ckpt", tmp_path / "new.safetensors", "--allow-pickle")
    assert code == 0
    converted = load_file(tmp_path / "new.safetensors")
    assert converted.keys() == state_dict.keys() and all(torch.equal(converted[k], state_dict[k]) for k in state_dict)
    code, _, err = run(capsys, "convert", tmp_path / "new.safetensors", tmp_path / "new.safetensors")
    assert code == 2 and "already exists" in err


def test_convert_failures_leave_nothing(tmp_path, capsys):
    """A model the A1111 layout cannot describe, and a file sdkit cannot place: one line, no file."""
    import sdkit

    code, _, err = run(capsys, "convert", sdkit.TINY_MODEL, tmp_path / "tiny.safetensors")
    assert code == 2 and err.startswith("sdkit: error: cannot convert") and "cannot record the UNet's" in err
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.ones(2, 2)}, tmp_path / "lora.safetensors")
    code, _, err = run(capsys, "convert", tmp_path / "lora.safetensors", tmp_path / "lora-folder")
    assert code == 2 and "a LoRA" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "generate", "x", "--model", tmp_path / "lora.safetensors", "-o", tmp_path / "x.png")
    assert code == 2 and "a LoRA" in err
    assert sorted(os.listdir(tmp_path)) == ["lora.safetensors"]
