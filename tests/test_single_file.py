"""Single-file checkpoints: sdkit's A1111-layout export read by diffusers, round trips, architecture
inference from shapes, the SD 2 OpenCLIP text tower, EMA, dtypes, pickles and bad files."""

import logging
import os
import sys
import types

import diffusers
import numpy as np
import pytest
import torch
from diffusers.loaders import single_file_utils as reference
from helpers import build_reference_pipeline, one_torch_thread, quiet, sample_image, sample_mask
from oracles import open_clip_tokenizer, open_clip_transformer
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from sdkit import Img2ImgPipeline, InpaintPipeline, StableDiffusionPipeline
from sdkit.models import AutoencoderKL, UNet2DConditionModel, ldm
from sdkit.models.single_file import pipeline_state_dict

TOL = 2e-3
KINDS = ("sd1", "sd2", "inpaint")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


def _class(kind):
    return InpaintPipeline if kind == "inpaint" else StableDiffusionPipeline


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random diffusers folders whose configs follow the SD conventions a single file relies on."""
    return {kind: build_reference_pipeline(str(tmp_path_factory.mktemp(kind)), kind, seed=10 + i, single_file=True)
            for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def pipes(folders):
    return {kind: quiet(_class(kind).from_pretrained(path)) for kind, path in folders.items()}


@pytest.fixture(scope="module")
def files(pipes, tmp_path_factory):
    out = {}
    for kind, pipe in pipes.items():
        out[kind] = str(tmp_path_factory.mktemp(f"{kind}-file") / f"{kind}-model.safetensors")
        pipe.save_single_file(out[kind])
    return out


def _load(kind, path, pipe, **kwargs):
    kwargs.setdefault("prediction_type", pipe.scheduler.config.prediction_type)
    return quiet(_class(kind).from_single_file(path, **kwargs))


def _assert_same_weights(a, b, names=("unet", "vae", "text_encoder")):
    for name in names:
        x, y = getattr(a, name).state_dict(), getattr(b, name).state_dict()
        assert x.keys() == y.keys(), f"{name}: keys differ: {sorted(set(x) ^ set(y))[:5]}"
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), f"{name}.{key} differs"


def _call(kind):
    kwargs = dict(prompt="a red circle on the left", negative_prompt="blurry", num_inference_steps=4,
                  guidance_scale=7.5, height=64, width=64, output_type="np")
    if kind == "inpaint":
        kwargs.update(image=sample_image(seed=3), mask_image=sample_mask())
    return kwargs


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


# -- round trips and the independent reader -----------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_round_trip_folder_file_folder(kind, pipes, files, tmp_path):
    """folder -> single file -> folder: every tensor identical, the same configs (but the default size)."""
    pipe = pipes[kind]
    back = _load(kind, files[kind], pipe)
    back.save_pretrained(tmp_path)
    again = _class(kind).from_pretrained(tmp_path)
    _assert_same_weights(pipe, again)
    for name in ("unet", "vae"):
        ours, read = dict(getattr(pipe, name).config), dict(getattr(again, name).config)
        assert {k: v for k, v in ours.items() if k != "sample_size"} == \
            {k: v for k, v in read.items() if k != "sample_size"}
    assert again.tokenizer.get_vocab() == pipe.tokenizer.get_vocab()
    assert again.tokenizer.pad_token == pipe.tokenizer.pad_token
    assert again.scheduler.config.prediction_type == pipe.scheduler.config.prediction_type


@pytest.mark.parametrize("kind", KINDS)
def test_reference_reads_the_exported_file(kind, folders, pipes, files):
    """diffusers 0.42.1 loads sdkit's file with the folder as config, offline, and gives sdkit's pixels;
    sdkit's own reading of the file gives its folder's pixels (to float rounding: the same weights at
    other memory alignments)."""
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
    ref = quiet(cls.from_single_file(files[kind], config=folders[kind], local_files_only=True, safety_checker=None,
                                      requires_safety_checker=False))
    ours = pipes[kind]
    from_file = _load(kind, files[kind], ours, scheduler=ours.scheduler)
    a = ref(**_call(kind), generator=gen(1)).images
    b = ours(**_call(kind), generator=gen(1)).images
    c = from_file(**_call(kind), generator=gen(1)).images
    diff = float(np.abs(a.astype(np.float64) - b).max())
    print(f"\n{kind}: diffusers reading sdkit's file vs sdkit: max abs pixel difference {diff:.1e}")
    assert diff <= TOL, f"{kind}: diffusers reading sdkit's file differs by {diff:.2e}"
    assert np.abs(b - c).max() <= 1e-5


@pytest.mark.parametrize("kind", ["sd1", "sd2"])
def test_file_layout(kind, files, pipes):
    """The A1111 keys: SD 1 text encoder under text_model. without position_ids, SD 2 as the whole
    OpenCLIP tower; CompVis' schedule buffers equal diffusers' for the same betas."""
    with safe_open(files[kind], "pt") as f:
        keys = set(f.keys())
        alphas_cumprod = f.get_tensor("alphas_cumprod")
    assert {"model.diffusion_model.input_blocks.0.0.weight", "first_stage_model.encoder.conv_in.weight"} <= keys
    assert set(ldm.SCHEDULE_BUFFERS) <= keys
    expected = diffusers.DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod
    torch.testing.assert_close(alphas_cumprod, expected, rtol=1e-6, atol=1e-7)
    if kind == "sd1":
        assert "cond_stage_model.transformer.text_model.final_layer_norm.weight" in keys
        assert not any("position_ids" in k for k in keys)
    else:
        layers = pipes[kind].text_encoder.config.num_hidden_layers
        assert f"cond_stage_model.model.transformer.resblocks.{layers}.attn.in_proj_weight" in keys
        assert {"cond_stage_model.model.text_projection", "cond_stage_model.model.logit_scale"} <= keys
        assert not any(k.startswith("cond_stage_model.transformer.") for k in keys)


def test_sd2_text_tower_is_open_clips_penultimate(files, pipes):
    """open_clip's own TextTransformer loads the file's cond_stage_model.model.* strictly, and its
    penultimate block then ln_final (FrozenOpenCLIPEmbedder, layer="penultimate") equals sdkit's text
    encoder; the extra last block is an identity, so running every block agrees too."""
    pipe = pipes["sd2"]
    prefix = ldm.OPENCLIP_PREFIX
    tower = {k[len(prefix):]: v for k, v in load_file(files["sd2"]).items() if k.startswith(prefix)}
    config = pipe.text_encoder.config
    text = open_clip_transformer().TextTransformer(
        context_length=config.max_position_embeddings, vocab_size=config.vocab_size, width=config.hidden_size,
        heads=config.num_attention_heads, layers=config.num_hidden_layers + 1, output_dim=config.hidden_size,
        mlp_ratio=config.intermediate_size / config.hidden_size)
    text.load_state_dict({k: v for k, v in tower.items() if k != "logit_scale"}, strict=True)
    ids = open_clip_tokenizer().tokenize(["a red circle", "Café, naïve 🐱!!"],
                                         context_length=config.max_position_embeddings)
    with torch.no_grad():
        x = text.token_embedding(ids) + text.positional_embedding
        for block in text.transformer.resblocks[:-1]:
            x = block(x, attn_mask=text.attn_mask)
        penultimate = text.ln_final(x)
        every = text.ln_final(text.transformer.resblocks[-1](x, attn_mask=text.attn_mask))
        ours = pipe.text_encoder(ids).last_hidden_state
    torch.testing.assert_close(ours, penultimate, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(every, penultimate)


# -- architecture inference ---------------------------------------------------------------------

SD15 = dict(cross_attention_dim=768)
SD21 = dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
            upcast_attention=True)
UNET_TABLE = {  # name: (family, config); sdkit's defaults are SD 1.5's
    "SD 1.5": ("sd1", SD15),
    "SD 2.1": ("sd2", SD21),
    "SD 1.5 inpainting": ("sd1", {**SD15, "in_channels": 9}),
    "SD 2 inpainting": ("sd2", {**SD21, "in_channels": 9}),
    "two levels, narrow": ("sd1", dict(block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=64,
                                       down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))),
    "five levels, three resnets": ("sd2", dict(
        block_out_channels=(64, 64, 128, 128, 192), layers_per_block=3, cross_attention_dim=128,
        down_block_types=("DownBlock2D",) + ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3 + ("UpBlock2D",),
        attention_head_dim=(1, 1, 2, 2, 3), use_linear_projection=True, upcast_attention=True)),
    "deep transformers, FiLM resnets": ("sd1", dict(block_out_channels=(64, 128, 128), transformer_layers_per_block=2,
                                                    cross_attention_dim=96, resnet_time_scale_shift="scale_shift",
                                                    down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                                    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)),
    "per-level resnets": ("sd1", dict(block_out_channels=(32, 64, 64), layers_per_block=(1, 2, 3),
                                      cross_attention_dim=32, out_channels=8,
                                      down_block_types=("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
                                      up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2)),
}


def _shapes(state_dict):
    return {k: tuple(v.shape) for k, v in state_dict.items()}


@pytest.mark.parametrize("name", list(UNET_TABLE))
def test_unet_inference_table(name):
    """An LDM UNet's shapes give the config that built it, and diffusers' own LDM reader maps sdkit's
    export onto sdkit's (= diffusers') names (shapes only: meta tensors, so SD 1.5 and 2.1 are full size)."""
    family, settings = UNET_TABLE[name]
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(settings)
    exported, left = ldm.unet_to_ldm(unet.state_dict(), unet.config)
    assert not left and len(exported) == len(unet.state_dict())
    read = UNet2DConditionModel.parse_config(ldm.unet_config(exported, family))
    expected = UNet2DConditionModel.parse_config({**unet.config, "sample_size": 64})
    assert read == expected
    back, left = ldm.unet_from_ldm(exported, dict(unet.config))
    assert not left and _shapes(back) == _shapes(unet.state_dict())
    if isinstance(unet.config.layers_per_block, int):  # diffusers' reader takes one count for all levels
        theirs = reference.convert_ldm_unet_checkpoint({ldm.UNET_PREFIX + k: v for k, v in exported.items()},
                                                      dict(unet.config))
        assert _shapes(theirs) == _shapes(unet.state_dict())


VAE_TABLE = {
    "SD": dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, sample_size=512),
    "two levels, 8 latent channels": dict(block_out_channels=(32, 64), layers_per_block=1, latent_channels=8),
    "three levels, three resnets": dict(block_out_channels=(32, 64, 64), layers_per_block=3),
    "no attention, no quant convs": dict(block_out_channels=(32, 32), mid_block_add_attention=False,
                                         use_quant_conv=False, use_post_quant_conv=False),
}


@pytest.mark.parametrize("name", list(VAE_TABLE))
def test_vae_inference_table(name):
    settings = VAE_TABLE[name]
    n = len(settings["block_out_channels"])
    settings = {**settings, "down_block_types": ("DownEncoderBlock2D",) * n,
                "up_block_types": ("UpDecoderBlock2D",) * n}
    with torch.device("meta"):
        vae = AutoencoderKL.from_config(settings)
    exported, left = ldm.vae_to_ldm(vae.state_dict(), vae.config)
    assert not left
    assert AutoencoderKL.parse_config(ldm.vae_config(exported)) == \
        AutoencoderKL.parse_config({**vae.config, "sample_size": 512})
    back, left = ldm.vae_from_ldm(exported, vae.config)
    assert not left and _shapes(back) == _shapes(vae.state_dict())
    if vae.config.use_quant_conv and vae.config.mid_block_add_attention:
        theirs = reference.convert_ldm_vae_checkpoint({ldm.VAE_PREFIX + k: v for k, v in exported.items()},
                                                     dict(vae.config))
        assert _shapes(theirs) == _shapes(vae.state_dict())


TEXT_TABLE = {  # name: (family, CLIPTextConfig settings)
    "CLIP ViT-L (SD 1)": ("sd1", dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                      num_attention_heads=12, hidden_act="quick_gelu")),
    "OpenCLIP ViT-H (SD 2)": ("sd2", dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                          num_attention_heads=16, hidden_act="gelu")),
    "narrow SD 1": ("sd1", dict(hidden_size=128, intermediate_size=256, num_hidden_layers=3, num_attention_heads=2,
                                hidden_act="quick_gelu", max_position_embeddings=32)),
    "narrow SD 2": ("sd2", dict(hidden_size=64, intermediate_size=256, num_hidden_layers=1, num_attention_heads=1,
                                hidden_act="gelu")),
}


@pytest.mark.parametrize("name", list(TEXT_TABLE))
def test_text_encoder_inference_table(name):
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdkit.models.single_file import _text_prefix, _text_to_ldm

    family, settings = TEXT_TABLE[name]
    config = CLIPTextConfig(vocab_size=49408, **settings)
    with torch.device("meta"):
        model = CLIPTextModel(config)
    prefix, (exported, left), _ = _text_to_ldm(model, family)
    assert not left
    full = {prefix + k: v for k, v in exported.items()}
    if family == "sd2":
        assert sum(k.endswith(".attn.in_proj_weight") for k in full) == config.num_hidden_layers + 1
        read, left = ldm.openclip_from_ldm(exported)
        theirs = reference.convert_open_clip_checkpoint(model, full)
    else:
        read, left = ldm.clip_from_ldm(exported), {}
        theirs = reference.convert_ldm_clip_checkpoint(full)
    assert not left
    names = _shapes(model.state_dict())
    strip = _text_prefix(names)
    assert _shapes(read) == {k[len(strip):]: v for k, v in names.items()}
    theirs = {k.removeprefix("text_model."): v for k, v in theirs.items()}
    assert {k: v for k, v in _shapes(theirs).items() if k in read} == _shapes(read)
    inferred = ldm.text_config(read, family)
    assert {k: inferred[k] for k in settings} == settings and inferred["vocab_size"] == 49408


@pytest.mark.parametrize("family, unet, text, expected", [
    ("sd1", SD15, TEXT_TABLE["CLIP ViT-L (SD 1)"][1], "v1"),
    ("sd2", SD21, TEXT_TABLE["OpenCLIP ViT-H (SD 2)"][1], "v2"),
])
def test_full_size_pipelines_export_as_sd(family, unet, text, expected):
    """SD 1.5- and SD 2.1-shaped pipelines (meta tensors: shapes only) export to the keys diffusers'
    model detection calls SD 1 / SD 2, and read back to the same architecture."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdkit.clip_vocab import OPENCLIP_PAD, SD1_PAD, clip_tokenizer
    from sdkit.models.single_file import SD_SCHEDULER, build_scheduler

    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel.from_config(unet), vae=AutoencoderKL.from_config(VAE_TABLE["SD"] | dict(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)),
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, **text)))
    parts.update(tokenizer=clip_tokenizer(OPENCLIP_PAD if family == "sd2" else SD1_PAD),
                 scheduler=build_scheduler("epsilon"))
    exported = pipeline_state_dict(parts)  # includes reading it back and comparing every config field
    assert reference.infer_diffusers_model_type(exported) == expected
    assert SD_SCHEDULER["beta_schedule"] == "scaled_linear"
    n = sum(p.numel() for p in parts["unet"].parameters())
    assert n > 859e6 and sum(v.numel() for k, v in exported.items() if k.startswith(ldm.UNET_PREFIX)) == n


@pytest.mark.slow
def test_sd15_pipeline_round_trip_with_weights(tmp_path):
    """A whole SD 1.5-shaped pipeline (860M-parameter UNet, SD VAE, CLIP ViT-L) with random fp16
    weights: folder -> single file -> folder gives every tensor back."""
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdkit.clip_vocab import SD1_PAD, clip_tokenizer
    from sdkit.models.single_file import build_scheduler

    g = torch.Generator().manual_seed(0)
    with torch.device("meta"):
        parts = dict(unet=UNet2DConditionModel.from_config(SD15), vae=AutoencoderKL.from_config(VAE_TABLE["SD"] | dict(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4)),
            text_encoder=CLIPTextModel(CLIPTextConfig(vocab_size=49408, **TEXT_TABLE["CLIP ViT-L (SD 1)"][1])))
    for name, part in parts.items():
        parts[name] = part = part.to_empty(device="cpu").half()
        with torch.no_grad():
            for p in part.parameters():
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float16) * 0.02)
            for key, b in part.named_buffers():  # CLIP's position ids
                if key.endswith("position_ids"):
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
    pipe = StableDiffusionPipeline(tokenizer=clip_tokenizer(SD1_PAD), scheduler=build_scheduler("epsilon"), **parts)
    pipe.save_pretrained(tmp_path / "folder")
    folder = StableDiffusionPipeline.from_pretrained(tmp_path / "folder", torch_dtype=torch.float16)
    folder.save_single_file(tmp_path / "sd15.safetensors")
    back = quiet(StableDiffusionPipeline.from_single_file(tmp_path / "sd15.safetensors", prediction_type="epsilon",
                                                          torch_dtype=torch.float16))
    assert back.unet.config == {**pipe.unet.config, "sample_size": 64}
    assert sum(p.numel() for p in back.unet.parameters()) > 859e6
    _assert_same_weights(pipe, back)


# -- prediction type ----------------------------------------------------------------------------

def _with_tensor(path, out, key, value):
    state_dict = load_file(path)
    state_dict[key] = value
    save_file(state_dict, out)
    return out


def _a1111_score(folder, bias):
    """A1111's SD 2 test on the diffusers UNet of the same weights: mean(unet(0.5, 999, 0.5) - 0.5)."""
    unet = diffusers.UNet2DConditionModel.from_pretrained(folder, subfolder="unet")
    with torch.no_grad():
        unet.conv_out.bias.fill_(bias)
        x = torch.full((1, 4, 8, 8), 0.5)
        return (unet(x, torch.tensor([999]), torch.full((1, 2, 64), 0.5)).sample - x).mean().item()


@pytest.mark.parametrize("bias", [-4.0, 4.0])
def test_sd2_prediction_type_by_a1111s_test(bias, folders, files, tmp_path, caplog):
    """No prediction_type and no .yaml: SD 2 runs A1111's test (v when the mean of output - input is
    below -1), computed here on diffusers' UNet of the same weights; the log says which was used."""
    key = "model.diffusion_model.out.2.bias"
    path = _with_tensor(files["sd2"], str(tmp_path / "sd2.safetensors"), key, torch.full((4,), bias))
    expected = "v_prediction" if _a1111_score(folders["sd2"], bias) < -1 else "epsilon"
    assert expected == ("v_prediction" if bias < 0 else "epsilon")  # the constructed case is clear-cut
    with caplog.at_level(logging.INFO, logger="sdkit.models.single_file"):
        pipe = StableDiffusionPipeline.from_single_file(path)
    assert pipe.scheduler.config.prediction_type == expected
    assert f"prediction_type={expected} (A1111's SD 2 test" in caplog.text
    assert pipe.unet.config.sample_size == (96 if expected == "v_prediction" else 64)


def test_prediction_type_order(files, tmp_path, caplog):
    """prediction_type= beats a .yaml beside the file, which beats detection; SD 1 defaults to epsilon."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(open(files["sd2"], "rb").read())
    yaml = tmp_path / "model.yaml"
    yaml.write_text('model:\n  target: ldm.models.diffusion.ddpm.LatentDiffusion\n  params:\n'
                    '    parameterization: "v"\n    linear_start: 0.00085\n')
    with caplog.at_level(logging.INFO, logger="sdkit.models.single_file"):
        assert StableDiffusionPipeline.from_single_file(path).scheduler.config.prediction_type == "v_prediction"
        assert "model.yaml beside the file" in caplog.text
        chosen = StableDiffusionPipeline.from_single_file(path, prediction_type="epsilon")
        assert chosen.scheduler.config.prediction_type == "epsilon"
        yaml.write_text("model:\n  params:\n    linear_start: 0.00085\n")  # no parameterization: eps
        assert StableDiffusionPipeline.from_single_file(path).scheduler.config.prediction_type == "epsilon"
        sd1 = StableDiffusionPipeline.from_single_file(files["sd1"])
    assert sd1.scheduler.config.prediction_type == "epsilon" and "the default for SD 1.x" in caplog.text
    yaml.write_text("model:\n  params:\n    parameterization: x0\n")
    with pytest.raises(ValueError, match="parameterization 'x0'"):
        StableDiffusionPipeline.from_single_file(path)
    with pytest.raises(ValueError, match="prediction_type='v'"):
        StableDiffusionPipeline.from_single_file(files["sd1"], prediction_type="v")


# -- other layouts, EMA, dtypes, pickles, parts ---------------------------------------------------

def test_older_sd1_text_naming_and_position_ids(files, pipes, tmp_path):
    """cond_stage_model.transformer.* without text_model. and with position_ids (older A1111 files)."""
    old = "cond_stage_model.transformer.text_model."
    state_dict = {("cond_stage_model.transformer." + k[len(old):]) if k.startswith(old) else k: v
                  for k, v in load_file(files["sd1"]).items()}
    state_dict["cond_stage_model.transformer.embeddings.position_ids"] = torch.arange(16)[None]
    save_file(state_dict, tmp_path / "old.safetensors")
    _assert_same_weights(pipes["sd1"], _load("sd1", tmp_path / "old.safetensors", pipes["sd1"]))


def test_ema_weights(files, pipes, tmp_path):
    """model_ema.* (CompVis LitEma, names without dots) is read with use_ema=True, skipped otherwise."""
    state_dict = load_file(files["sd1"])
    unet = {k: v for k, v in state_dict.items() if k.startswith(ldm.UNET_PREFIX)}
    for key, value in unet.items():
        state_dict["model_ema." + key[len("model."):].replace(".", "")] = value + 1
    state_dict.update({"model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(7)})
    save_file(state_dict, tmp_path / "ema.safetensors")
    plain = _load("sd1", tmp_path / "ema.safetensors", pipes["sd1"])
    _assert_same_weights(pipes["sd1"], plain)
    ema = _load("sd1", tmp_path / "ema.safetensors", pipes["sd1"], use_ema=True)
    for key, value in pipes["sd1"].unet.state_dict().items():
        torch.testing.assert_close(ema.unet.state_dict()[key], value + 1)
    with pytest.raises(ValueError, match="has no EMA weights"):
        _load("sd1", files["sd1"], pipes["sd1"], use_ema=True)


def test_dtypes(pipes, tmp_path):
    """Half-precision files load in float32 by default, or in torch_dtype; save_single_file(dtype=) casts."""
    pipe = pipes["sd1"]
    for dtype in (torch.float16, torch.bfloat16):
        path = tmp_path / f"{dtype}.safetensors"
        pipe.save_single_file(path, dtype=dtype)
        with safe_open(str(path), "pt") as f:
            assert f.get_tensor("model.diffusion_model.out.2.weight").dtype == dtype
        default = _load("sd1", path, pipe)
        assert {p.dtype for name in ("unet", "vae", "text_encoder") for p in getattr(default, name).parameters()} \
            == {torch.float32}
        torch.testing.assert_close(default.unet.conv_out.weight, pipe.unet.conv_out.weight.to(dtype).float(),
                                   rtol=0, atol=0)
        half = _load("sd1", path, pipe, torch_dtype=dtype)
        assert {p.dtype for name in ("unet", "vae", "text_encoder") for p in getattr(half, name).parameters()} \
            == {dtype}


def _fake_lightning():
    """A PyTorch Lightning ModelCheckpoint class under its real module name, to pickle a training checkpoint."""
    names = ("pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint")
    modules = {n: types.ModuleType(n) for n in names}
    checkpoint_class = type("ModelCheckpoint", (), {"__module__": names[-1]})
    modules[names[-1]].ModelCheckpoint = checkpoint_class
    return modules, checkpoint_class


def test_ckpt_with_training_metadata(files, pipes, tmp_path, monkeypatch):
    """A real-world .ckpt: tensors under state_dict beside Lightning callbacks and numpy scalars, read only
    with allow_pickle=True; the same weights as the safetensors file."""
    from collections import OrderedDict

    modules, checkpoint_class = _fake_lightning()
    with monkeypatch.context() as patch:
        for name, module in modules.items():
            patch.setitem(sys.modules, name, module)
        callback = checkpoint_class()
        callback.best_model_score = np.float64(0.25)
        torch.save({"state_dict": OrderedDict(load_file(files["sd1"])), "epoch": 6, "global_step": np.int64(470000),
                    "pytorch-lightning_version": "1.4.2", "callbacks": {checkpoint_class: {"monitor": None}},
                    "saved_callback": callback}, tmp_path / "model.ckpt")
    assert "pytorch_lightning" not in sys.modules  # the loader below cannot import the real thing
    with pytest.raises(ValueError, match="allow_pickle=True"):
        StableDiffusionPipeline.from_single_file(tmp_path / "model.ckpt")
    _assert_same_weights(pipes["sd1"], _load("sd1", tmp_path / "model.ckpt", pipes["sd1"], allow_pickle=True))


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_that_would_run_code_is_refused(files, tmp_path):
    marker = tmp_path / "it-ran"
    torch.save({"state_dict": load_file(files["sd1"]), "payload": _RunsCode(marker)}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match=r"evil\.ckpt.*system.*could run code"):
        StableDiffusionPipeline.from_single_file(tmp_path / "evil.ckpt", allow_pickle=True)
    assert not marker.exists()


def test_unet_and_vae_from_single_files(files, pipes, tmp_path):
    """UNet2DConditionModel / AutoencoderKL.from_single_file, a standalone A1111 VAE file, and vae=."""
    pipe = pipes["sd1"]
    state_dict = load_file(files["sd1"])
    assert _shapes(UNet2DConditionModel.from_single_file(files["sd1"]).state_dict()) == _shapes(pipe.unet.state_dict())
    bare = {k[len(ldm.UNET_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ldm.UNET_PREFIX)}
    save_file(bare, tmp_path / "unet.safetensors")
    unet = UNet2DConditionModel.from_single_file(tmp_path / "unet.safetensors")
    assert all(torch.equal(v, pipe.unet.state_dict()[k]) for k, v in unet.state_dict().items())
    # a standalone VAE as A1111 users have it (vae-ft-mse-840000-ema-pruned: no prefix, EMA counters, loss.*)
    vae = {k[len(ldm.VAE_PREFIX):]: v for k, v in state_dict.items() if k.startswith(ldm.VAE_PREFIX)}
    vae.update({"model_ema.decay": torch.tensor(0.999), "loss.logvar": torch.zeros(())})
    save_file({k: v + 0.5 if k.endswith("conv_out.bias") else v for k, v in vae.items()}, tmp_path / "vae.safetensors")
    standalone = AutoencoderKL.from_single_file(tmp_path / "vae.safetensors")
    torch.testing.assert_close(standalone.decoder.conv_out.bias, pipe.vae.decoder.conv_out.bias + 0.5)
    # a checkpoint without its VAE needs one
    no_vae = {k: v for k, v in state_dict.items() if not k.startswith(ldm.VAE_PREFIX)}
    save_file(no_vae, tmp_path / "no-vae.safetensors")
    with pytest.raises(ValueError, match=r"no-vae\.safetensors has no VAE \(first_stage_model"):
        StableDiffusionPipeline.from_single_file(tmp_path / "no-vae.safetensors")
    swapped = StableDiffusionPipeline.from_single_file(tmp_path / "no-vae.safetensors",
                                                       vae=str(tmp_path / "vae.safetensors"))
    torch.testing.assert_close(swapped.vae.decoder.conv_out.bias, standalone.decoder.conv_out.bias)
    given = Img2ImgPipeline.from_single_file(files["sd1"], vae=standalone)
    assert type(given) is Img2ImgPipeline and given.vae is standalone
    _assert_same_weights(pipe, given, names=("unet", "text_encoder"))
    with pytest.raises(TypeError, match=r"unknown arguments \['controlnet'\]"):
        StableDiffusionPipeline.from_single_file(files["sd1"], controlnet=None)


# -- bad inputs ---------------------------------------------------------------------------------

def test_truncated_file(files, tmp_path):
    data = open(files["sd1"], "rb").read()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut\.safetensors.*damaged or truncated"):
        StableDiffusionPipeline.from_single_file(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("extra, what", [
    ({"conditioner.embedders.0.transformer.text_model.final_layer_norm.weight": torch.ones(4),
      "conditioner.embedders.1.model.ln_final.weight": torch.ones(4)}, "SDXL checkpoint"),
    ({"model.diffusion_model.label_emb.0.0.weight": torch.ones(4, 4)}, "label_emb"),
    ({"control_model.input_hint_block.0.weight": torch.ones(4)}, "ControlNet"),
])
def test_other_architectures_are_named(extra, what, files, tmp_path):
    state_dict = {**load_file(files["sd1"]), **extra}
    save_file(state_dict, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match=rf"other\.safetensors: it is .*{what}.*sdkit supports SD 1.x and 2.x\. "
                                         rf"{len(extra)} keys it could not place: "):
        StableDiffusionPipeline.from_single_file(tmp_path / "other.safetensors")


def test_lora_and_unknown_files(tmp_path):
    save_file({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": torch.ones(4, 4)},
              tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="a LoRA .*1 keys it could not place: lora_unet_down"):
        StableDiffusionPipeline.from_single_file(tmp_path / "lora.safetensors")
    save_file({f"w{i}": torch.ones(1) for i in range(8)}, tmp_path / "odd.safetensors")
    with pytest.raises(ValueError, match=r"not an SD 1.x / 2.x checkpoint.*8 keys .*w0, w1, w2, w3, w4 \(and 3 more\)"):
        StableDiffusionPipeline.from_single_file(tmp_path / "odd.safetensors")
    with pytest.raises(FileNotFoundError, match="is not a file"):
        StableDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors")


def test_mismatched_and_missing_tensors(files, tmp_path):
    key = "model.diffusion_model.output_blocks.0.0.in_layers.2.weight"
    state_dict = load_file(files["sd1"])
    save_file({**state_dict, key: torch.ones(3, 3, 3, 3)}, tmp_path / "shape.safetensors")
    with pytest.raises(ValueError, match=r"shape\.safetensors: 1 mis-shaped keys: up_blocks\.0\.resnets\.0\.conv1"):
        StableDiffusionPipeline.from_single_file(tmp_path / "shape.safetensors")
    del state_dict[key]
    save_file(state_dict, tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match=r"missing\.safetensors: 1 missing keys: up_blocks\.0\.resnets\.0\.conv1"):
        StableDiffusionPipeline.from_single_file(tmp_path / "missing.safetensors")
    text = "cond_stage_model.transformer.text_model.encoder.layers.0.mlp.fc1.weight"
    save_file({**load_file(files["sd1"]), text: torch.ones(5, 64)}, tmp_path / "text.safetensors")
    with pytest.raises(ValueError, match=r"CLIPTextModel from .*text\.safetensors.*encoder\.layers\.0\.mlp\.fc1"):
        StableDiffusionPipeline.from_single_file(tmp_path / "text.safetensors")


def test_what_the_layout_cannot_carry_is_refused_and_nothing_is_written(pipes, tmp_path):
    """A model the file cannot describe (4 heads and 8 norm groups, a pooled-prompt embedding, a
    tokenizer that is not CLIP's, the bundled model) is refused before anything is written."""
    import sdkit
    from helpers import SD1_FILE_UNET

    folder = build_reference_pipeline(str(tmp_path / "unconventional"), "sd1")
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ValueError, match=r"cannot record the UNet's attention_head_dim=\(4, 4, 4\) \(readers would "
                                         r"assume \(8, 8, 8\)\), norm_num_groups=8 \(readers would assume 32\)"):
        pipe.save_single_file(out / "a.safetensors")
    pooled = UNet2DConditionModel.from_config({**SD1_FILE_UNET, "addition_embed_type": "text"})
    with pytest.raises(ValueError, match="no place for the UNet's add_embedding.norm1.bias"):
        StableDiffusionPipeline(**{**pipes["sd1"].components, "unet": pooled}).save_single_file(out / "b.safetensors")
    other_tokenizer = StableDiffusionPipeline(**{**pipes["sd1"].components, "tokenizer": pipe.tokenizer})
    with pytest.raises(ValueError, match=r"readers use CLIP's 49,408-token BPE padded with '<\|endoftext\|>'"):
        other_tokenizer.save_single_file(out / "c.safetensors")
    with pytest.raises(ValueError, match="cannot record the UNet's"):
        StableDiffusionPipeline.from_pretrained(sdkit.TINY_MODEL).save_single_file(out / "d.safetensors")
    with pytest.raises(ValueError, match="safetensors files only"):
        pipes["sd1"].save_single_file(out / "e.ckpt")
    assert list(out.iterdir()) == []
