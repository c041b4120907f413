"""UNet2DConditionModel and AutoencoderKL against diffusers 0.42.1, and their I/O."""

import dataclasses
import json
import os
import warnings

import diffusers
import pytest
import torch
from helpers import FILM_UNET, INPAINT_UNET, SD1_UNET, SD2_UNET, VAE_F2, VAE_F8, perturb, rel_err

from sdkit.models import AutoencoderKL, UNet2DConditionModel


def reference_unet(tmp_path, config, seed=0):
    torch.manual_seed(seed)
    ref = perturb(diffusers.UNet2DConditionModel(**config), seed)
    ref.save_pretrained(tmp_path)
    return ref


@pytest.mark.parametrize("config", [SD1_UNET, SD2_UNET, INPAINT_UNET, FILM_UNET],
                         ids=["sd1", "sd2", "inpaint9", "film-text"])
def test_unet_matches_reference(tmp_path, config):
    ref = reference_unet(tmp_path, config)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, config["in_channels"], 8, 16, generator=g)   # non-square latents
    t = torch.tensor([3, 871])                                       # per-batch timesteps
    ctx = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        got = ours(x, t, ctx)
    assert got.shape == expected.shape
    assert rel_err(expected, got) <= 1e-5


@pytest.mark.parametrize("timestep", [500, 500.0, torch.tensor(500), torch.tensor([500, 500]),
                                      torch.tensor(499.5)], ids=["int", "float", "0d", "batch", "0d-float"])
def test_unet_timestep_forms(tmp_path, timestep):
    ref = reference_unet(tmp_path, SD1_UNET)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        assert rel_err(ref(x, timestep, ctx).sample, ours(x, timestep, ctx)) <= 1e-5


def test_unet_refuses_inputs_that_do_not_fit():
    unet = UNet2DConditionModel.from_config(SD1_UNET)
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32)
    with torch.no_grad():
        with pytest.raises(ValueError, match="timestep has 3 values for a batch of 2"):
            unet(x, torch.tensor([1, 2, 3]), ctx)
        with pytest.raises(ValueError, match="encoder_hidden_states batch 1 does not match sample batch 2"):
            unet(x, 1, ctx[:1])
        with pytest.raises(ValueError, match="sample has 3 channels; this UNet takes 4"):
            unet(x[:, :3], 1, ctx)


def test_unet_odd_latent_size(tmp_path):
    """Sizes not divisible by the total downsampling still work, as in the reference."""
    ref = reference_unet(tmp_path, SD1_UNET)
    ours = UNet2DConditionModel.from_pretrained(tmp_path)
    x, ctx = torch.randn(1, 4, 6, 10), torch.randn(1, 5, 32)
    with torch.no_grad():
        assert rel_err(ref(x, 10, ctx).sample, ours(x, 10, ctx)) <= 1e-5


@pytest.mark.parametrize("config", [VAE_F2, VAE_F8], ids=["factor2", "factor8"])
def test_vae_matches_reference(tmp_path, config):
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**config))
    ref.save_pretrained(tmp_path)
    ours = AutoencoderKL.from_pretrained(tmp_path)
    f = 2 ** (len(config["block_out_channels"]) - 1)
    assert ours.downsample_factor == f
    x = torch.rand(2, 3, 32, 48) * 2 - 1
    z = torch.randn(2, 4, 32 // f, 48 // f)
    with torch.no_grad():
        dist, ref_dist = ours.encode(x), ref.encode(x).latent_dist
        assert rel_err(ref_dist.mean, dist.mean) <= 1e-5
        assert rel_err(ref_dist.std, dist.std) <= 1e-5
        assert torch.equal(dist.mode(), dist.mean)
        s1 = ref_dist.sample(torch.Generator().manual_seed(3))
        s2 = dist.sample(torch.Generator().manual_seed(3))
        assert rel_err(s1, s2) <= 1e-5
        assert rel_err(ref.decode(z).sample, ours.decode(z)) <= 1e-5
    assert ours.config.scaling_factor == pytest.approx(0.18215)


@pytest.mark.slow
def test_sd15_shape_unet_matches_reference():
    """The real SD 1.5 UNet shape (about 860M parameters), random weights, one small forward."""
    torch.manual_seed(0)
    ref = diffusers.UNet2DConditionModel(cross_attention_dim=768, sample_size=64).eval()
    n_params = sum(p.numel() for p in ref.parameters())
    assert 855e6 < n_params < 865e6
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(dict(ref.config))
    ours.load_checked_state_dict(ref.state_dict(), source="reference")
    x, ctx = torch.randn(1, 4, 16, 8), torch.randn(1, 77, 768)
    with torch.no_grad():
        expected = ref(x, 981, ctx).sample
        del ref
        got = ours(x, 981, ctx)
    assert rel_err(expected, got) <= 1e-5


def test_round_trip_and_reference_reads_ours(tmp_path):
    torch.manual_seed(0)
    model = perturb(UNet2DConditionModel.from_config(SD2_UNET))
    model.save_pretrained(tmp_path)
    again = UNet2DConditionModel.from_pretrained(tmp_path)
    for (k, a), (k2, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(a, b)
    assert dict(again.config) == dict(model.config)
    ref = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 48)
    with torch.no_grad():
        assert rel_err(ref(x, 7, ctx).sample, model(x, 7, ctx)) <= 1e-5


def test_fp16_variant(tmp_path):
    torch.manual_seed(0)
    ref = perturb(diffusers.AutoencoderKL(**VAE_F2))
    ref.half().save_pretrained(tmp_path, variant="fp16")
    assert (tmp_path / "diffusion_pytorch_model.fp16.safetensors").is_file()
    ours = AutoencoderKL.from_pretrained(tmp_path, variant="fp16", torch_dtype=torch.float16)
    assert ours.dtype == torch.float16
    for k, v in ref.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    assert AutoencoderKL.from_pretrained(tmp_path, variant="fp16").dtype == torch.float32
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(tmp_path)  # no default-variant file in this folder


@pytest.mark.parametrize("writer", ["reference", "sdkit"])
def test_sharded_checkpoint(tmp_path, writer):
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**SD1_UNET))
    if writer == "reference":
        ref.save_pretrained(tmp_path, max_shard_size="300KB")
    else:
        ours = UNet2DConditionModel.from_config(dict(ref.config))
        ours.load_checked_state_dict(ref.state_dict())
        ours.save_pretrained(tmp_path, max_shard_size="300KB")
    assert (tmp_path / "diffusion_pytorch_model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("*.safetensors"))) > 2
    loaded = UNet2DConditionModel.from_pretrained(tmp_path)
    for k, v in ref.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    back = diffusers.UNet2DConditionModel.from_pretrained(tmp_path)  # the reference reads it too
    assert torch.equal(back.conv_out.weight, ref.conv_out.weight)


def test_legacy_vae_attention_names(tmp_path):
    torch.manual_seed(0)
    ours = perturb(AutoencoderKL.from_config(VAE_F2))
    legacy = {k.replace(".to_q.", ".query.").replace(".to_k.", ".key.").replace(".to_v.", ".value.")
              .replace(".to_out.0.", ".proj_attn."): v for k, v in ours.state_dict().items()}
    assert any(".query." in k for k in legacy)
    fresh = AutoencoderKL.from_config(VAE_F2)
    fresh.load_checked_state_dict(legacy)
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(fresh.encode(x).mean, ours.encode(x).mean)


# -- bad inputs ---------------------------------------------------------------------------------

@pytest.fixture
def saved_vae(tmp_path):
    torch.manual_seed(0)
    AutoencoderKL.from_config(VAE_F2).save_pretrained(tmp_path)
    return tmp_path


def test_missing_config(saved_vae):
    os.remove(saved_vae / "config.json")
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(saved_vae)


def test_missing_weights(saved_vae):
    os.remove(saved_vae / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors"):
        AutoencoderKL.from_pretrained(saved_vae)


def test_truncated_safetensors(saved_vae):
    path = saved_vae / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="diffusion_pytorch_model.safetensors.*(damaged|truncated)"):
        AutoencoderKL.from_pretrained(saved_vae)


def _rewrite(folder, change):
    from safetensors.torch import load_file, save_file
    path = str(folder / "diffusion_pytorch_model.safetensors")
    sd = load_file(path)
    change(sd)
    save_file(sd, path)


def test_wrong_shape_is_named(saved_vae):
    _rewrite(saved_vae, lambda sd: sd.__setitem__("decoder.conv_out.weight", torch.zeros(3, 32, 3, 1)))
    with pytest.raises(ValueError, match=r"1 mis-shaped keys: decoder\.conv_out\.weight"):
        AutoencoderKL.from_pretrained(saved_vae)


def test_extra_and_missing_keys_are_named(saved_vae):
    def change(sd):
        sd["encoder.extra.weight"] = torch.zeros(1)
        del sd["quant_conv.bias"]
    _rewrite(saved_vae, change)
    with pytest.raises(ValueError, match=r"1 missing keys: quant_conv\.bias.*1 unexpected keys: encoder\.extra\.weight"):
        AutoencoderKL.from_pretrained(saved_vae)


def test_pickle_needs_opt_in(saved_vae):
    from safetensors.torch import load_file
    sd = load_file(str(saved_vae / "diffusion_pytorch_model.safetensors"))
    os.remove(saved_vae / "diffusion_pytorch_model.safetensors")
    torch.save(sd, saved_vae / "diffusion_pytorch_model.ckpt")
    with pytest.raises(ValueError, match=r"diffusion_pytorch_model\.ckpt.*allow_pickle=True"):
        AutoencoderKL.from_pretrained(saved_vae)
    loaded = AutoencoderKL.from_pretrained(saved_vae, allow_pickle=True)
    assert torch.equal(loaded.quant_conv.weight, sd["quant_conv.weight"])


def test_unsupported_config_value_names_key():
    with pytest.raises(ValueError, match="resnet_time_scale_shift"):
        UNet2DConditionModel.from_config({**SD1_UNET, "resnet_time_scale_shift": "spatial"})
    with pytest.raises(ValueError, match="addition_embed_type"):
        UNet2DConditionModel.from_config({**SD1_UNET, "addition_embed_type": "text_time"})
    with pytest.raises(ValueError, match="addition_embed_type"):  # a config dataclass given directly
        UNet2DConditionModel(dataclasses.replace(UNet2DConditionModel.parse_config(SD1_UNET), addition_embed_type="x"))
    with pytest.raises(ValueError, match="down_block_types"):
        UNet2DConditionModel.from_config({**SD1_UNET, "down_block_types": ("SimpleCrossAttnDownBlock2D",) * 3})


def test_unknown_config_key_warns(tmp_path):
    with pytest.warns(UserWarning, match="totally_new_key"):
        UNet2DConditionModel.from_config({**SD1_UNET, "totally_new_key": 1})


def test_wrong_model_folder(saved_vae):
    with pytest.raises(ValueError, match="describes AutoencoderKL, not UNet2DConditionModel"):
        UNet2DConditionModel.from_pretrained(saved_vae)


def test_unknown_repo_offline():
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-model.*not in the Hugging Face cache"):
        UNet2DConditionModel.from_pretrained("no-such-user/no-such-model", subfolder="unet")


def test_config_is_read_only():
    model = AutoencoderKL.from_config(VAE_F2)
    with pytest.raises(TypeError, match="read-only"):
        model.config["latent_channels"] = 8
    assert json.loads(json.dumps(model.config))["block_out_channels"] == [32, 64]


def test_reference_output_forms(tmp_path):
    """``unet(...).sample``, ``vae.encode(x).latent_dist``, ``vae.decode(z).sample`` and ``return_dict=False``,
    as the reference's models return them; the output is still a tensor for code that takes it so."""
    import copy
    import io

    ref_unet = reference_unet(tmp_path / "unet", SD1_UNET)
    torch.manual_seed(0)
    ref_vae = perturb(diffusers.AutoencoderKL(**VAE_F8))
    ref_vae.save_pretrained(tmp_path / "vae")
    unet, vae = UNet2DConditionModel.from_pretrained(tmp_path / "unet"), AutoencoderKL.from_pretrained(tmp_path / "vae")
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        out = unet(x, 10, ctx)
        assert rel_err(ref_unet(x, 10, ctx).sample, out.sample) <= 1e-5
        assert type(out.sample) is torch.Tensor and type(out * 2) is torch.Tensor  # plain tensors from here on
        (tup,) = unet(x, 10, ctx, return_dict=False)
        assert type(tup) is torch.Tensor and torch.equal(tup, out.sample)
        assert type(copy.deepcopy(out)) is torch.Tensor
        buffer = io.BytesIO()
        torch.save(out, buffer)
        buffer.seek(0)
        assert type(torch.load(buffer, weights_only=True)) is torch.Tensor
        dist = vae.encode(image).latent_dist
        assert rel_err(ref_vae.encode(image).latent_dist.mean, dist.mean) <= 1e-5
        (dist2,) = vae.encode(image, return_dict=False)
        assert torch.equal(dist2.mean, dist.mean)
        z = dist.mode()
        assert rel_err(ref_vae.decode(z).sample, vae.decode(z).sample) <= 1e-5
        assert torch.equal(vae.decode(z, return_dict=False)[0], vae.decode(z).sample)
    with pytest.raises(ValueError, match="cross_attention_kwargs"):
        unet(x, 10, ctx, cross_attention_kwargs={"scale": 0.5})
