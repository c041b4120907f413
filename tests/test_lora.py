"""LoRA files (kohya in both UNet namings, diffusers / PEFT, LoCon, LoHa, LoKr) against diffusers + peft and
hand-computed weight changes; per-call adapters against their serial runs in threads; bad files."""

import os
import threading

import diffusers
import numpy as np
import pytest
import safetensors.torch
import torch
from helpers import build_reference_pipeline, concurrently, one_torch_thread, perturb, quiet
from transformers import CLIPTextModel

from sdkit import Img2ImgPipeline, StableDiffusionPipeline
from sdkit.per_call import using

TOL = 2e-3
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
CALL = dict(prompt="a red circle on the left", negative_prompt="blurry", num_inference_steps=3, output_type="np")


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A tiny SD 1 folder whose text encoder's norms are perturbed too (a fresh final layer norm gives
    features of mean ~0, which A1111's emphasis rescale divides by)."""
    path = build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1")
    te = perturb(CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")), seed=5, scale=0.5)
    te.save_pretrained(os.path.join(path, "text_encoder"))
    return path


@pytest.fixture
def pipe(folder):
    return quiet(StableDiffusionPipeline.from_pretrained(folder))


def reference(folder):
    return quiet(diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                   requires_safety_checker=False))


def gen(seed=1):
    return torch.Generator().manual_seed(seed)


def targets(pipe, parts=("unet", "text_encoder")):
    """(part, module path, module) of every attention, feed-forward and projection layer."""
    found = []
    for part, ends in (("unet", UNET_TARGETS), ("text_encoder", TEXT_TARGETS)):
        if part in parts:
            found += [(part, p, m) for p, m in getattr(pipe, part).named_modules() if p.endswith(ends)]
    return found


def factors(module, rank, g):
    """Random (down, up) for a layer: (R, I) / (O, R), or (R, I, 1, 1) / (O, R, 1, 1) for a 1x1 conv."""
    O, I = module.weight.shape[:2]
    conv = module.weight.ndim == 4
    down = torch.randn(rank, I, *([1, 1] if conv else []), generator=g) * 0.2
    up = torch.randn(O, rank, *([1, 1] if conv else []), generator=g) * 0.2
    return down, up


def kohya_lora(pipe, rank=4, alpha=2.0, seed=0, parts=("unet", "text_encoder")):
    """A kohya state dict of known random deltas, and {(part, path): alpha / rank * up @ down} by hand."""
    g, sd, deltas = torch.Generator().manual_seed(seed), {}, {}
    for part, path, module in targets(pipe, parts):
        name = ("lora_unet_" if part == "unet" else "lora_te_text_model_") + path.replace(".", "_")
        down, up = factors(module, rank, g)
        sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"] = down, up
        sd[f"{name}.alpha"] = torch.tensor(alpha)
        deltas[part, path] = alpha / rank * (up.flatten(1) @ down.flatten(1)).reshape(module.weight.shape)
    return sd, deltas


def peft_lora(pipe, rank=4, seed=0):
    """The diffusers / PEFT naming of known random deltas (no alpha: scale 1)."""
    g, sd = torch.Generator().manual_seed(seed), {}
    for part, path, module in targets(pipe):
        name = f"unet.{path}" if part == "unet" else f"text_encoder.text_model.{path}"
        sd[f"{name}.lora_A.weight"], sd[f"{name}.lora_B.weight"] = factors(module, rank, g)
    return sd


def assert_close(a, b, what):
    diff = float(np.abs(a - b).max())
    assert diff <= TOL, f"{what}: max abs pixel difference {diff:.2e}"


# -- against the reference --------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["kohya", "peft"])
def test_lora_files_give_the_reference_s_pixels_at_weights_1_and_0_6(folder, pipe, fmt):
    state_dict = kohya_lora(pipe)[0] if fmt == "kohya" else peft_lora(pipe)
    ref = reference(folder)
    base = pipe(**CALL, generator=gen()).images
    ref.load_lora_weights(dict(state_dict), adapter_name="style")
    pipe.load_lora_weights(dict(state_dict), adapter_name="style")
    expected = {}
    for weight in (1.0, 0.6):
        ref.set_adapters(["style"], [weight])
        expected[weight] = ref(**CALL, generator=gen()).images
        assert_close(expected[weight], pipe(**CALL, generator=gen(), adapters={"style": weight}).images,
                     f"{fmt} {weight}")
        assert np.abs(expected[weight] - base).max() > 0.02  # the LoRA changes the image
    assert_close(expected[1.0], pipe(**CALL, generator=gen()).images, "load_lora_weights activates it at 1")


def test_a_weight_pair_applies_to_the_text_encoder_and_the_unet_apart(folder, pipe):
    state_dict, _ = kohya_lora(pipe)
    pipe.load_lora_weights(state_dict, adapter_name="style")
    for pair, prefix in (((0.0, 1.0), "lora_unet_"), ((1.0, 0.0), "lora_te_")):
        ref = reference(folder)
        ref.load_lora_weights({k: v for k, v in state_dict.items() if k.startswith(prefix)}, adapter_name="part")
        assert_close(ref(**CALL, generator=gen()).images,
                     pipe(**CALL, generator=gen(), adapters={"style": pair}).images, f"pair {pair}")


def test_peft_alpha_from_the_file_metadata_matches_the_reference(folder, pipe, tmp_path):
    import json

    path = str(tmp_path / "meta.safetensors")
    metadata = {"unet.r": 4, "unet.lora_alpha": 8, "unet.target_modules": list(UNET_TARGETS),
                "text_encoder.r": 4, "text_encoder.lora_alpha": 2, "text_encoder.target_modules": list(TEXT_TARGETS)}
    safetensors.torch.save_file(peft_lora(pipe), path, metadata={"format": "pt",
                                                                 "lora_adapter_metadata": json.dumps(metadata)})
    ref = reference(folder)
    ref.load_lora_weights(path, adapter_name="meta")
    pipe.load_lora_weights(path)
    assert pipe.get_active_adapters() == ["meta"]  # the file stem
    assert_close(ref(**CALL, generator=gen()).images, pipe(**CALL, generator=gen()).images, "metadata alpha")


def test_fused_weights_equal_w_plus_scale_up_down_and_unfuse_restores_them(pipe):
    state_dict, deltas = kohya_lora(pipe, rank=4, alpha=3.0)
    pipe.load_lora_weights(state_dict, adapter_name="style")
    before = {k: getattr(pipe, k[0]).get_submodule(k[1]).weight.detach().clone() for k in deltas}
    unfused = pipe(**CALL, generator=gen()).images
    pipe.set_adapters("style", 0.6)
    pipe.fuse_lora(lora_scale=0.5)
    for (part, path), delta in deltas.items():
        W = getattr(pipe, part).get_submodule(path).weight
        torch.testing.assert_close(W, before[part, path] + 0.3 * delta, atol=1e-6, rtol=0)
    pipe.unfuse_lora()
    for (part, path) in deltas:
        assert torch.equal(getattr(pipe, part).get_submodule(path).weight, before[part, path])
    pipe.set_adapters("style", 1.0)
    pipe.fuse_lora()
    fused = pipe(**CALL, generator=gen()).images  # the fused adapter is not applied a second time
    np.testing.assert_allclose(fused, unfused, atol=1e-5)
    with pytest.raises(ValueError, match="fused into the weights"):
        pipe(**CALL, adapters={"style": 0.5})
    pipe.unfuse_lora()


def test_lora_factors_follow_the_pipeline_to_its_dtype_once(pipe):
    """After pipe.to(float64) a call's changes are float64 copies made once and reused by later calls
    (not moved by every forward), and the images equal the fused LoRA's in float64."""
    state_dict, _ = kohya_lora(pipe, rank=4)
    pipe.load_lora_weights(state_dict, adapter_name="style")
    pipe.to(dtype=torch.float64)
    first, second = (pipe.networks_for_call(adapters={"style": 1.0}) for _ in range(2))
    for plan_a, plan_b in ((first.unet, second.unet), (first.text_encoder, second.text_encoder)):
        assert plan_a and plan_a.keys() == plan_b.keys()
        for layer, changes in plan_a.items():
            (delta, _), = changes
            assert delta.up.dtype == delta.down.dtype == layer.weight.dtype == torch.float64
            assert delta is plan_b[layer][0][0]  # placed once
    unfused = pipe(**CALL, generator=gen(), adapters={"style": 1.0}).images
    pipe.fuse_lora()
    fused = pipe(**CALL, generator=gen()).images
    np.testing.assert_allclose(unfused, fused, atol=1e-6)  # float32 images of float64 runs
    pipe.unfuse_lora()
    pipe.to(dtype=torch.float32)
    (delta, _), = next(iter(pipe.networks_for_call(adapters={"style": 1.0}).unet.values()))
    assert delta.up.dtype == torch.float32


def test_img2img_applies_the_call_s_adapters_as_the_reference(folder, pipe):
    from helpers import sample_image

    state_dict, _ = kohya_lora(pipe, seed=5)
    ref = diffusers.StableDiffusionImg2ImgPipeline(**reference(folder).components)
    quiet(ref).load_lora_weights(dict(state_dict), adapter_name="style")
    ref.set_adapters(["style"], [0.7])
    img2img = Img2ImgPipeline.from_pipe(pipe)
    img2img.load_lora_weights(state_dict, adapter_name="style")
    kwargs = dict(CALL, image=sample_image(), strength=0.7, num_inference_steps=4)
    assert_close(ref(**kwargs, generator=gen()).images,
                 img2img(**kwargs, generator=gen(), adapters={"style": 0.7}).images, "img2img")
    assert pipe.get_active_adapters() == ["style"]  # pipelines made with from_pipe share their adapters


# the tiny SD 1 UNet's modules in the LDM naming, worked out by hand from CompVis' block numbering
LDM_NAMES = {"down_blocks.0.attentions.0": "input_blocks.1.1", "down_blocks.0.attentions.1": "input_blocks.2.1",
             "down_blocks.1.attentions.0": "input_blocks.4.1", "down_blocks.1.attentions.1": "input_blocks.5.1",
             "mid_block.attentions.0": "middle_block.1", "up_blocks.1.attentions.0": "output_blocks.3.1",
             "up_blocks.1.attentions.1": "output_blocks.4.1", "up_blocks.1.attentions.2": "output_blocks.5.1",
             "up_blocks.2.attentions.0": "output_blocks.6.1", "up_blocks.2.attentions.1": "output_blocks.7.1",
             "up_blocks.2.attentions.2": "output_blocks.8.1", "down_blocks.0.resnets.1.conv1": "input_blocks.2.0.in_layers.2",
             "up_blocks.0.resnets.2.time_emb_proj": "output_blocks.2.0.emb_layers.1",
             "down_blocks.1.resnets.0.conv_shortcut": "input_blocks.4.0.skip_connection",
             "down_blocks.0.downsamplers.0.conv": "input_blocks.3.0.op", "up_blocks.1.upsamplers.0.conv": "output_blocks.5.2.conv",
             "mid_block.resnets.1.conv2": "middle_block.2.out_layers.3"}
LDM_EXTRA = [p for p in LDM_NAMES if "attentions" not in p]  # resnet and sampler convs (LoCon) besides attention


def test_kohya_s_ldm_naming_equals_its_diffusers_naming(pipe):
    state_dict, _ = kohya_lora(pipe, parts=("unet",))
    g = torch.Generator().manual_seed(3)
    for path in LDM_EXTRA:
        module = pipe.unet.get_submodule(path)
        O, I, *k = module.weight.shape
        name = "lora_unet_" + path.replace(".", "_")
        state_dict[f"{name}.lora_down.weight"] = torch.randn(2, I, *k, generator=g) * 0.2
        state_dict[f"{name}.lora_up.weight"] = torch.randn(O, 2, *[1] * len(k), generator=g) * 0.2
    ldm = {}
    for key, value in state_dict.items():
        name, role = key.split(".", 1)
        path = next((p for p in LDM_NAMES if name.startswith("lora_unet_" + p.replace(".", "_"))), None)
        ldm_name = name.replace(path.replace(".", "_"), LDM_NAMES[path].replace(".", "_")) if path else name
        assert ldm_name != name or path is None
        ldm[f"{ldm_name}.{role}"] = value
    assert sum(k.startswith(("lora_unet_input_blocks", "lora_unet_output_blocks", "lora_unet_middle_block"))
               for k in ldm) > len(ldm) // 2
    pipe.load_lora_weights(state_dict, adapter_name="diffusers")
    pipe.load_lora_weights(ldm, adapter_name="ldm")
    a = pipe(**CALL, generator=gen(), adapters={"diffusers": 0.8}).images
    assert np.array_equal(a, pipe(**CALL, generator=gen(), adapters={"ldm": 0.8}).images)
    assert np.abs(a - pipe(**CALL, generator=gen(), adapters={}).images).max() > 0.02


# -- LyCORIS ---------------------------------------------------------------------------------------

def _tucker(t, wa, wb):
    """W[p, r, k, l] = sum_ij t[i, j, k, l] wa[i, p] wb[j, r], by tensordot."""
    tmp = torch.tensordot(wa, t, dims=([0], [0]))  # (p, j, k, l)
    return torch.tensordot(wb, tmp, dims=([0], [1])).permute(1, 0, 2, 3)  # (r, p, k, l) -> (p, r, k, l)


def _r(g, *shape):
    return torch.randn(*shape, generator=g) * 0.3


CONV, LINEAR, WIDE = "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", \
    "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj"  # (32, 32, 3, 3), (32, 32), (256, 32)


def lycoris_layers(g):
    """{kind: (layer path, its tensors, dW by hand without the scale, rank)}."""
    R = 3
    down, up, mid = _r(g, R, 32, 3, 3), _r(g, 32, R, 1, 1), _r(g, R, R, 3, 3)
    down1 = _r(g, R, 32, 1, 1)
    h = [_r(g, 32, R), _r(g, R, 32), _r(g, 32, R), _r(g, R, 32)]
    ht = [_r(g, R, 32), _r(g, R, 32), _r(g, R, R, 3, 3), _r(g, R, 32), _r(g, R, 32), _r(g, R, R, 3, 3)]
    k1, k2 = _r(g, 16, 4), _r(g, 16, 8)
    k1a, k1b, k2a, k2b = _r(g, 4, R), _r(g, R, 4), _r(g, 8, R), _r(g, R, 8)
    kc1, kt, kta, ktb = _r(g, 4, 4), _r(g, R, R, 3, 3), _r(g, R, 8), _r(g, R, 8)
    return {
        "locon": (CONV, {"lora_down.weight": down, "lora_up.weight": up},
                  torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down), R),
        "locon_mid": (CONV, {"lora_down.weight": down1, "lora_up.weight": up, "lora_mid.weight": mid},
                      _tucker(mid, up[:, :, 0, 0].T, down1[:, :, 0, 0]), R),
        "loha": (LINEAR, dict(zip(("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"), h)),
                 (h[0] @ h[1]) * (h[2] @ h[3]), R),
        "loha_conv_tucker": (CONV, dict(zip(("hada_w1_a", "hada_w1_b", "hada_t1", "hada_w2_a", "hada_w2_b",
                                             "hada_t2"), ht)),
                             _tucker(ht[2], ht[0], ht[1]) * _tucker(ht[5], ht[3], ht[4]), R),
        "lokr": (WIDE, {"lokr_w1": k1, "lokr_w2": k2}, torch.kron(k1, k2), None),
        "lokr_factored": (LINEAR, {"lokr_w1_a": k1a, "lokr_w1_b": k1b, "lokr_w2_a": k2a, "lokr_w2_b": k2b},
                          torch.kron(k1a @ k1b, k2a @ k2b), R),
        "lokr_conv_tucker": (CONV, {"lokr_w1": kc1, "lokr_t2": kt, "lokr_w2_a": kta, "lokr_w2_b": ktb},
                             torch.kron(kc1[:, :, None, None], _tucker(kt, kta, ktb).contiguous()), R),
    }


@pytest.mark.parametrize("kind", ["locon", "locon_mid", "loha", "loha_conv_tucker", "lokr", "lokr_factored",
                                  "lokr_conv_tucker"])
def test_lycoris_weight_changes_equal_the_hand_computed_ones(pipe, kind):
    path, tensors, dW, rank = lycoris_layers(torch.Generator().manual_seed(7))[kind]
    name = "lora_unet_" + path.replace(".", "_")
    alpha = 1.5
    pipe.load_lora_weights({**{f"{name}.{k}": v for k, v in tensors.items()}, f"{name}.alpha": torch.tensor(alpha)},
                           adapter_name=kind)
    layer = pipe.unet.get_submodule(path)
    W = layer.weight.detach().clone()
    scale = alpha / rank if rank else 1.0  # LoKr with both factors whole: scale 1, as LyCORIS and A1111
    x = torch.randn(2, 4, 8, 8, generator=gen(5))
    t, context = torch.tensor(500), torch.randn(2, 16, 32, generator=gen(6))
    with torch.inference_mode(), using(pipe.networks_for_call(adapters={kind: 1.0}).unet):
        per_call = pipe.unet(x, t, context)
    pipe.fuse_lora(adapter_names=[kind])
    torch.testing.assert_close(layer.weight - W, scale * dW.reshape(W.shape), atol=1e-6, rtol=0)
    with torch.inference_mode():
        torch.testing.assert_close(per_call, pipe.unet(x, t, context), atol=1e-5, rtol=1e-5)
    pipe.unfuse_lora()
    assert torch.equal(layer.weight, W)


@pytest.mark.parametrize("conv", [False, True])
def test_the_low_rank_and_the_rebuilt_weight_paths_give_w_plus_m_s_dw(conv, monkeypatch):
    from sdkit import lora

    g = torch.Generator().manual_seed(11)
    layer = torch.nn.Conv2d(8, 16, 3, padding=1, stride=2) if conv else torch.nn.Linear(64, 48)
    W, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    O, I = W.shape[:2]
    if conv:
        change = lora.LowRank(_r(g, O, 3, 1, 1), _r(g, 3, 8, 1, 1), _r(g, 3, 3, 3, 3), scale=0.5)  # LoCon with mid
        dW = _tucker(change.mid, change.up[:, :, 0, 0].T, change.down[:, :, 0, 0])
    else:
        change = lora.LowRank(_r(g, O, 4), _r(g, 4, I), scale=0.5)
        dW = change.up @ change.down
    lora.make_changeable(layer)
    assert type(layer).__name__ == ("Conv2d" if conv else "Linear") and set(layer.state_dict()) == {"weight", "bias"}
    low_rank, add_to = [], lora.LowRank.add_to

    def counted(self, *args):
        low_rank.append(1)
        return add_to(self, *args)

    monkeypatch.setattr(lora.LowRank, "add_to", counted)
    for shape in ([(1, 8, 4, 4), (2, 8, 64, 64)] if conv else [(1, 64), (4, 256, 64)]):  # few, many tokens
        x = torch.randn(*shape, generator=g)
        expected = (torch.nn.functional.conv2d(x, W + 0.7 * 0.5 * dW, b, stride=2, padding=1) if conv
                    else torch.nn.functional.linear(x, W + 0.7 * 0.5 * dW, b))
        with torch.no_grad(), using({layer: ((change, 0.7 * change.scale),)}):
            torch.testing.assert_close(layer(x), expected, atol=1e-5, rtol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, W, b) if not conv else
                                       torch.nn.functional.conv2d(x, W, b, stride=2, padding=1))
    assert low_rank == [1]  # the few tokens went through the factors, the many through the rebuilt weight
    assert torch.equal(layer.weight, W)


# -- per call, in threads --------------------------------------------------------------------------

def test_threads_with_different_adapters_each_equal_their_serial_run(pipe):
    base = pipe(**CALL, generator=gen(2)).images
    pipe.load_lora_weights(kohya_lora(pipe, seed=1)[0], adapter_name="a")
    pipe.load_lora_weights(kohya_lora(pipe, seed=2)[0], adapter_name="b")
    settings = [{"a": 1.0}, {"b": (0.5, 1.2)}, {}] * 2
    serial = [pipe(**CALL, generator=gen(i), adapters=s).images for i, s in enumerate(settings)]
    assert len({float(np.abs(serial[i] - serial[j]).sum()) for i in range(3) for j in range(i)}) == 3
    results = concurrently(lambda i: pipe(**CALL, generator=gen(i), adapters=settings[i]).images, len(settings))
    for i in range(len(settings)):
        assert np.array_equal(results[i], serial[i]), f"thread {i} ({settings[i]})"
    assert np.array_equal(serial[2], base)
    pipe.unload_lora_weights()
    assert pipe.get_active_adapters() == [] and pipe.get_list_adapters() == {}
    assert np.array_equal(pipe(**CALL, generator=gen(2)).images, base)


def test_loading_and_deleting_during_a_run_leave_the_run_alone(pipe):
    pipe.load_lora_weights(kohya_lora(pipe, seed=1)[0], adapter_name="a")
    expected = pipe(**CALL, generator=gen()).images
    paused, resume, out = threading.Event(), threading.Event(), {}

    def callback(step, t, latents):
        if step == 0:
            paused.set()
            resume.wait(30)

    thread = threading.Thread(target=lambda: out.update(images=pipe(**CALL, generator=gen(), callback=callback).images))
    thread.start()
    assert paused.wait(30)
    pipe.delete_adapters("a")
    pipe.load_lora_weights(kohya_lora(pipe, seed=2)[0], adapter_name="b")
    pipe.load_textual_inversion({"red": torch.randn(1, 32)})  # a trigger word the prompt uses
    resume.set()
    thread.join()
    assert np.array_equal(out["images"], expected)
    assert pipe.get_active_adapters() == ["b"]


def test_adapter_api_follows_the_reference(pipe, tmp_path):
    path = str(tmp_path / "my_style.safetensors")
    safetensors.torch.save_file(kohya_lora(pipe, seed=1)[0], path)
    pipe.load_lora_weights(path)
    pipe.load_lora_weights(kohya_lora(pipe, seed=2)[0])
    assert pipe.get_active_adapters() == ["default_0"]  # the last loaded, as in the reference
    assert pipe.get_list_adapters() == {"text_encoder": ["my_style", "default_0"], "unet": ["my_style", "default_0"]}
    pipe.set_adapters(["my_style", "default_0"], [0.7, (0.2, 0.9)])
    both = pipe(**CALL, generator=gen()).images
    assert np.array_equal(both, pipe(**CALL, generator=gen(), adapters={"my_style": 0.7, "default_0": (0.2, 0.9)}).images)
    pipe.delete_adapters("default_0")
    assert pipe.get_active_adapters() == ["my_style"]
    img2img = Img2ImgPipeline.from_pipe(pipe)  # from_pipe shares the loaded adapters
    assert img2img.get_active_adapters() == ["my_style"]
    with pytest.raises(ValueError, match="already loaded"):
        pipe.load_lora_weights(path)


# -- bad inputs ------------------------------------------------------------------------------------

def _bad_files(pipe, tmp_path):
    sd, _ = kohya_lora(pipe, seed=4)
    key = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    wide = dict(sd, **{f"{key}.lora_down.weight": torch.randn(4, 1024)})  # an SD 2-wide context
    rank = dict(sd, **{f"{key}.lora_up.weight": torch.randn(32, 3)})
    unknown = dict(sd, **{"lora_unet_nowhere_to_q.lora_down.weight": torch.randn(4, 32),
                          "lora_unet_nowhere_to_q.lora_up.weight": torch.randn(32, 4)})
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.randn(4, 32)}
    dora = dict(sd, **{f"{key}.dora_scale": torch.randn(1, 32)})
    pickle = str(tmp_path / "old.pt")
    torch.save(sd, pickle)
    return [(wide, r"attn2_to_k: the LoRA changes a \(32, 1024\) weight but .* is \(32, 32\).*another model"),
            (rank, r"lora_down has rank 4 but lora_up rank 3"),
            (unknown, r"2 of its \d+ keys name no layer.*lora_unet_nowhere_to_q"),
            (sdxl, r"SDXL LoRA"), (dora, r"dora_scale is not supported"),
            (pickle, r"pickle checkpoint.*allow_pickle=True"),
            (str(tmp_path / "missing.safetensors"), r"does not exist")]


def test_bad_lora_files_are_clear_errors_and_change_nothing(pipe, tmp_path):
    pipe.load_lora_weights(kohya_lora(pipe, seed=1)[0], adapter_name="good")
    before = pipe(**CALL, generator=gen()).images
    for source, message in _bad_files(pipe, tmp_path):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            pipe.load_lora_weights(source, adapter_name="bad")
        assert pipe.get_active_adapters() == ["good"] and list(pipe.get_list_adapters()["unet"]) == ["good"]
    assert np.array_equal(pipe(**CALL, generator=gen()).images, before)
    pipe.load_lora_weights(str(tmp_path / "old.pt"), adapter_name="pickled", allow_pickle=True)  # opted in
    for adapters, message in (({"nope": 1.0}, "'nope', which is not loaded"), ({"good": "x"}, "number or a pair"),
                              ({"good": (1, 2, 3)}, "number or a pair")):
        with pytest.raises(ValueError, match=message):
            pipe(**CALL, adapters=adapters)


# -- A1111 tags ------------------------------------------------------------------------------------

def test_lora_tags_find_files_and_equal_the_adapters_option(pipe, tmp_path):
    folder = tmp_path / "loras"
    (folder / "sub").mkdir(parents=True)
    safetensors.torch.save_file(kohya_lora(pipe, seed=1)[0], str(folder / "sub" / "style.safetensors"))
    a1111 = dict(CALL, prompt_syntax="a1111")
    tagged = pipe(**dict(a1111, prompt="a red <lora:style:0.7:0.4> circle on the left"), generator=gen(),
                  lora_dirs=str(folder)).images
    pipe.load_lora_weights(str(folder / "sub" / "style.safetensors"), adapter_name="loaded")
    expected = pipe(**a1111, generator=gen(), adapters={"loaded": (0.7, 0.4)}).images
    assert np.array_equal(tagged, expected)
    twice = pipe(**dict(a1111, prompt="a red <lora:loaded:0.3:0.2> circle <lora:loaded:0.4:0.2> on the left"),
                 generator=gen(), adapters={"loaded": 5.0}).images  # tags replace adapters=, repeated tags add up
    assert np.array_equal(twice, expected)
    with pytest.raises(ValueError, match=r"<lora:other:1>: no LoRA named 'other'.*loaded.*found: style"):
        pipe(**dict(a1111, prompt="a <lora:other:1>"), lora_dirs=[str(folder)])
    with pytest.warns(UserWarning, match="first prompt's .*<lora:loaded:0.3>.* apply to the whole batch") as caught:
        pipe(**dict(a1111, prompt=["a <lora:loaded:0.3>", "b", "c <lora:loaded:0.5>"], output_type="latent"))
    assert len(caught) == 1


def test_a_lora_tag_at_0_8_equals_the_lora_at_0_8_and_its_text_never_reaches_the_text_encoder(pipe, tmp_path):
    safetensors.torch.save_file(kohya_lora(pipe, seed=3)[0], str(tmp_path / "x.safetensors"))
    fed = []
    hook = pipe.text_encoder.register_forward_pre_hook(lambda module, args: fed.append(args[0].tolist()))
    a1111 = dict(CALL, prompt_syntax="a1111")
    try:
        tagged = pipe(**dict(a1111, prompt="a red circle <lora:x:0.8> on the left"), generator=gen(),
                      lora_dirs=str(tmp_path)).images
        tagged_ids, fed[:] = list(fed), []
        plain = pipe(**a1111, generator=gen()).images  # nothing loaded yet: no LoRA
        pipe.load_lora_weights(str(tmp_path / "x.safetensors"))
        fed[:] = []
        explicit = pipe(**a1111, generator=gen(), adapters={"x": 0.8}).images
    finally:
        hook.remove()
    assert np.array_equal(tagged, explicit) and np.abs(tagged - plain).max() > 0.02
    assert tagged_ids == fed  # the same tokens (prompt, then negative prompt): the tag's text is cut out
    words = set(pipe.tokenizer(CALL["prompt"] + " " + CALL["negative_prompt"]).input_ids)
    tag_only = set(pipe.tokenizer("<lora:x:0.8>").input_ids) - words
    assert tag_only and not tag_only & {i for call in tagged_ids for row in call for i in row}


def test_cli_applies_lora_tags_and_writes_a1111_s_lora_hash(folder, tmp_path, capsys):
    import hashlib

    from PIL import Image

    from sdkit import infotext
    from sdkit.cli import main

    loras = tmp_path / "loras"
    loras.mkdir()
    pipe = StableDiffusionPipeline.from_pretrained(folder)
    path = str(loras / "my,style.safetensors")
    safetensors.torch.save_file(kohya_lora(pipe, seed=1)[0], path, metadata={"ss_output_name": "x"})
    with open(path, "rb") as f:
        data = f.read()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()[:12]
    out = tmp_path / "o.png"
    code = main(["generate", "a red circle <lora:my,style:0.8>", "-o", str(out), "--model", folder, "--steps", "2",
                 "--seed", "1", "-q", "--enlarge", "1", "--lora-dir", str(loras)])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    info = infotext.load(out)
    assert info.get("Lora hashes") == (("mystyle", addnet),) and 'Lora hashes: "mystyle: ' in info.text
    assert info.prompt == "a red circle <lora:my,style:0.8>"
    again = tmp_path / "again.png"  # --from-png applies the prompt's tags again, to the same pixels
    code = main(["generate", "--from-png", str(out), "-o", str(again), "--model", folder, "-q", "--enlarge", "1",
                 "--lora-dir", str(loras)])
    assert code == 0 and "Lora hashes" in capsys.readouterr().err  # the hashes themselves are only reported
    untagged = tmp_path / "untagged.png"
    assert main(["generate", "a red circle", "-o", str(untagged), "--model", folder, "--steps", "2", "--seed", "1",
                 "-q", "--enlarge", "1"]) == 0
    pixels = [np.asarray(Image.open(p)) for p in (out, again, untagged)]
    assert np.array_equal(pixels[1], pixels[0]) and not np.array_equal(pixels[2], pixels[0])
    code = main(["generate", "a <lora:absent:1>", "-o", str(tmp_path / "x.png"), "--model", folder, "--steps", "1",
                 "-q", "--lora-dir", str(loras)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no LoRA named 'absent'" in err
    assert not os.path.exists(tmp_path / "x.png")


def test_cross_attention_scale_scales_the_adapters_as_the_reference(folder, pipe):
    """cross_attention_kwargs={"scale": s}: the reference's LoRA scale, on set_adapters weights and on adapters=."""
    state_dict = kohya_lora(pipe)[0]
    ref = reference(folder)
    ref.load_lora_weights(dict(state_dict), adapter_name="style")
    pipe.load_lora_weights(dict(state_dict), adapter_name="style")
    ref.set_adapters(["style"], [0.8])
    pipe.set_adapters(["style"], [0.8])
    expected = ref(**CALL, generator=gen(), cross_attention_kwargs={"scale": 0.5}).images
    assert np.abs(expected - ref(**CALL, generator=gen()).images).max() > 0.02  # the scale changes the image
    assert_close(expected, pipe(**CALL, generator=gen(), cross_attention_kwargs={"scale": 0.5}).images, "set_adapters")
    assert_close(expected, pipe(**CALL, generator=gen(), adapters={"style": 0.8},
                                cross_attention_kwargs={"scale": 0.5}).images, "adapters=")
    assert_close(pipe(**CALL, generator=gen(), adapters={"style": 0.4}).images,
                 pipe(**CALL, generator=gen(), cross_attention_kwargs={"scale": 0.5}).images, "0.8 * 0.5")


def test_placed_copies_of_lora_factors_go_with_the_adapter():
    """The cache of placed factors holds its deltas weakly: one already in place (the cache's value is
    then the delta itself) and one copied to another dtype are both freed once nothing else holds them."""
    import dataclasses
    import gc

    from sdkit.pipelines import adapters

    @dataclasses.dataclass(eq=False)
    class Delta:
        up: torch.Tensor

    class Layer:
        weight = torch.zeros(2)

    class Double:
        weight = torch.zeros(2, dtype=torch.float64)

    before = len(adapters._PLACED)
    here, there = Delta(torch.ones(2)), Delta(torch.ones(2))
    assert adapters._placed(here, Layer) is here
    moved = adapters._placed(there, Double)
    assert moved.up.dtype == torch.float64 and adapters._placed(there, Double) is moved
    del here, there, moved
    gc.collect()
    assert len(adapters._PLACED) == before
