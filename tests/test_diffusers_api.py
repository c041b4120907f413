"""The reference's (diffusers 0.42.1) loading keywords, names, object shapes and call arguments on sdkit.

Each behaviour is checked against diffusers itself where it has one to compare with; the snippets
as users write them are in test_diffusers_snippets.py.
"""

import huggingface_hub
import pytest
import torch

import sdkit
from sdkit import StableDiffusionPipeline
from sdkit.models import AutoencoderKL, UNet2DConditionModel

TINY = sdkit.TINY_MODEL


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(TINY)
    p.set_progress_bar_config(disable=True)
    return p


def images(p, **kw):
    return p("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
             **kw).images


# ------------------------------------------------------------------ (1) loading keywords
def test_reference_loading_keywords_are_taken(pipe):
    loaded = StableDiffusionPipeline.from_pretrained(
        TINY, use_safetensors=True, safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        low_cpu_mem_usage=True, local_files_only=True, torch_dtype=torch.float32, variant=None)
    loaded.set_progress_bar_config(disable=True)
    assert (images(loaded) == images(pipe)).all()
    assert not hasattr(loaded, "safety_checker")


def test_download_keywords_reach_the_hub(monkeypatch, tmp_path):
    seen = []

    def snapshot_download(repo_id, **kwargs):
        seen.append((repo_id, kwargs))
        return TINY

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    StableDiffusionPipeline.from_pretrained("someone/tiny", revision="v1", cache_dir=str(tmp_path), token="hf_x",
                                            local_files_only=True)
    UNet2DConditionModel.from_pretrained("someone/tiny", subfolder="unet", revision="v1", token="hf_x")
    sdkit.schedulers.DDIMScheduler.from_pretrained("someone/tiny", subfolder="scheduler", revision="v1",
                                                   cache_dir=str(tmp_path), token="hf_x")
    assert len(seen) == 3
    for repo, kwargs in seen:
        assert repo == "someone/tiny" and kwargs["revision"] == "v1" and kwargs["token"] == "hf_x"
    assert seen[0][1]["cache_dir"] == seen[2][1]["cache_dir"] == str(tmp_path)


def test_constructor_takes_the_no_safety_checker_forms(pipe):
    built = StableDiffusionPipeline(**pipe.components, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    assert built.unet is pipe.unet


@pytest.mark.parametrize("keyword,value", [("safety_checker", object()), ("feature_extractor", "x"),
                                           ("requires_safety_checker", True)])
def test_a_safety_checker_is_refused_clearly(pipe, keyword, value):
    with pytest.raises(ValueError, match=f"no safety checker.*{keyword}="):
        StableDiffusionPipeline.from_pretrained(TINY, **{keyword: value})
    with pytest.raises(ValueError, match="no safety checker"):
        StableDiffusionPipeline(**pipe.components, **{keyword: value})


def test_other_loading_keywords_stay_errors():
    with pytest.raises(ValueError, match="use_safetensors=False asks for pickle weights"):
        StableDiffusionPipeline.from_pretrained(TINY, use_safetensors=False)
    with pytest.raises(TypeError, match="unknown arguments \\['force_download'\\]"):
        StableDiffusionPipeline.from_pretrained(TINY, force_download=True)
    with pytest.raises(ValueError, match="low_cpu_mem_usage must be True, False or None"):
        AutoencoderKL.from_pretrained(TINY, subfolder="vae", low_cpu_mem_usage="yes")


def test_models_take_the_loading_keywords(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", use_safetensors=True, low_cpu_mem_usage=False)
    assert unet.config.in_channels == 4
    with pytest.raises(ValueError, match="allow_pickle=True"):
        AutoencoderKL.from_pretrained(TINY, subfolder="vae", use_safetensors=False)
    vae = AutoencoderKL.from_pretrained(TINY, subfolder="vae")  # pickles only where asked for and allowed
    torch.save(vae.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(open(TINY + "/vae/config.json").read())
    loaded = AutoencoderKL.from_pretrained(tmp_path, use_safetensors=False, allow_pickle=True)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)
