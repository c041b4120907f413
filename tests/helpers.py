"""Test helpers: tiny reference-shaped configs, weight perturbation, error metrics."""

import torch

SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)

# SD2 style: linear projections, per-level head counts, three attention levels out of four
SD2_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=48, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8)

INPAINT_UNET = {**SD1_UNET, "in_channels": 9}

# FiLM resnets and the pooled prompt in the timestep embedding (the bundled model's UNet options)
FILM_UNET = {**SD1_UNET, "resnet_time_scale_shift": "scale_shift", "addition_embed_type": "text",
             "addition_embed_type_num_heads": 4}

VAE_F2 = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
              layers_per_block=1, sample_size=16)
VAE_F8 = dict(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4,
              layers_per_block=1, sample_size=64)


# Tiny models a single file describes fully: SD's 32 norm groups and head conventions (SD 1: 8 heads,
# SD 2: 64-channel heads), 64-wide CLIP text encoders on the real 49,408-token vocabulary
SD1_FILE_UNET = {**SD1_UNET, "cross_attention_dim": 64, "attention_head_dim": 8, "norm_num_groups": 32,
                 "layers_per_block": 1}
SD2_FILE_UNET = {**SD2_UNET, "block_out_channels": (64, 64, 128, 128), "cross_attention_dim": 64,
                 "attention_head_dim": (1, 1, 2, 2), "norm_num_groups": 32}
INPAINT_FILE_UNET = {**SD1_FILE_UNET, "in_channels": 9}
VAE_FILE = {**VAE_F8, "block_out_channels": (32, 32, 32, 32), "norm_num_groups": 32}


def perturb(model, seed=0, scale=0.1):
    """Move biases and norm affines away from their defaults so no path is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()


# -- tiny saved pipelines (for pipeline parity tests and the examples) ---------------------------

WORDS = ("a", "an", "the", "small", "large", "red", "green", "blue", "yellow", "circle", "square",
         "triangle", "on", "left", "right", "top", "bottom", "in", "center", "of", "white", "black",
         "gray", "background", "photo", "blurry", "dark")

SD_BETAS = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def build_reference_pipeline(save_dir, kind="sd1", seed=0, model_max_length=16, single_file=False):
    """Save a tiny random diffusers pipeline folder and return its path.

    kind: "sd1" (PNDM/PLMS, epsilon), "sd2" (linear projections, DDIM with v-prediction) or
    "inpaint" (SD1-shaped 9-channel inpainting UNet). Weights are perturbed so no path is trivial.
    ``single_file``: models that follow the SD conventions a single-file checkpoint relies on
    (``*_FILE_*`` configs, sdkit's CLIP tokenizer; SD 2: OpenCLIP's GELU and "!" padding).
    """
    import os
    import tempfile

    import diffusers
    from transformers import CLIPTextConfig, CLIPTextModel

    from sdkit.clip_vocab import OPENCLIP_PAD, SD1_PAD, clip_tokenizer
    from sdkit.training.tokenizer import build_clip_tokenizer

    configs = {"sd1": SD1_FILE_UNET, "sd2": SD2_FILE_UNET, "inpaint": INPAINT_FILE_UNET} if single_file else \
        {"sd1": SD1_UNET, "sd2": SD2_UNET, "inpaint": INPAINT_UNET}
    unet_config = configs[kind]
    if single_file:
        tokenizer = clip_tokenizer(OPENCLIP_PAD if kind == "sd2" else SD1_PAD, model_max_length)
    else:
        tokenizer = build_clip_tokenizer(WORDS, tempfile.mkdtemp(prefix="sdkit-tok-"),
                                         model_max_length=model_max_length)
    torch.manual_seed(seed)
    unet = perturb(diffusers.UNet2DConditionModel(**unet_config), seed)
    vae = perturb(diffusers.AutoencoderKL(**(VAE_FILE if single_file else VAE_F8)), seed + 1)
    hidden = unet_config["cross_attention_dim"]
    text_encoder = CLIPTextModel(CLIPTextConfig(
        hidden_size=hidden, intermediate_size=2 * hidden, num_attention_heads=hidden // 64 if single_file else 4,
        num_hidden_layers=2, vocab_size=len(tokenizer), max_position_embeddings=model_max_length,
        hidden_act="gelu" if single_file and kind == "sd2" else "quick_gelu",
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)).eval()
    if single_file:  # layer norms away from 1 and 0, so a swapped norm cannot pass unnoticed
        perturb(text_encoder, seed + 2)
    if kind == "sd2":
        scheduler = diffusers.DDIMScheduler(**SD_BETAS, clip_sample=False, set_alpha_to_one=False,
                                            steps_offset=1, prediction_type="v_prediction")
    else:
        scheduler = diffusers.PNDMScheduler(**SD_BETAS, skip_prk_steps=True, set_alpha_to_one=False,
                                            steps_offset=1)
    cls = diffusers.StableDiffusionInpaintPipeline if kind == "inpaint" else diffusers.StableDiffusionPipeline
    pipe = cls(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
               safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(save_dir)
    return save_dir


def sample_image(size=64, seed=0):
    """A deterministic smooth RGB PIL image with some structure (gradients and a disc)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size, 0:size] / size
    c = rng.uniform(0.2, 0.8, 3)
    img = np.stack([c[0] + 0.3 * x, c[1] + 0.3 * y, c[2] - 0.3 * x * y], -1)
    img[(x - 0.4) ** 2 + (y - 0.5) ** 2 < 0.06] = rng.uniform(0, 1, 3)
    return Image.fromarray((img.clip(0, 1) * 255).round().astype(np.uint8))


def sample_mask(size=64, box=(16, 16, 48, 40)):
    """A PIL "L" mask, white (repaint) inside `box` = (left, top, right, bottom)."""
    from PIL import Image, ImageDraw

    mask = Image.new("L", (size, size), 0)
    ImageDraw.Draw(mask).rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=255)
    return mask


def drop_guidance_after(guided_calls):
    """A diffusers ``callback_on_step_end`` (its documented dynamic-guidance recipe) that stops
    classifier-free guidance after the first ``guided_calls`` steps: scale 0, the prompt's
    embeddings alone (pass ``callback_on_step_end_tensor_inputs=["prompt_embeds"]``)."""

    def drop(pipe, i, t, kwargs):
        if i == guided_calls - 1:
            pipe._guidance_scale = 0.0
            return {"prompt_embeds": kwargs["prompt_embeds"].chunk(2)[-1]}
        return {}

    return drop


def quiet(pipe):
    """The pipeline with its progress bar off (test output stays readable)."""
    pipe.set_progress_bar_config(disable=True)
    return pipe


def one_torch_thread():
    """Generator for a module-scoped fixture: run torch single-threaded, then restore the count.

    On a small shared CPU, intra-op threads that spin while another process holds the other
    core make tiny models tens of times slower; one thread keeps these tests fast.
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def concurrently(fn, count):
    """[fn(0), ..., fn(count - 1)], each run in its own thread, all started together; errors re-raised."""
    import threading

    results, errors, barrier = [None] * count, [], threading.Barrier(count)

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as e:  # re-raised in the calling thread below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results
# -- broken model folders (for the error tests) -----------------------------------------------------

class Payload:
    """A pickle that, if ever unpickled, creates the file ``marker`` (it must never be created)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _set_json(path, **changes):
    import json

    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config))


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _pickle_only(folder, weights, pickle_name, marker):
    """Replace a part's safetensors weights by a pickle holding the same tensors and a payload."""
    from safetensors.torch import load_file

    state = {**load_file(str(folder / weights)), "payload": Payload(marker)}
    (folder / weights).unlink()
    torch.save(state, folder / pickle_name)


def _self_link(path):
    import os

    path.unlink()
    os.symlink(path.name, path)


def _empty(folder):
    for f in folder.iterdir():
        f.unlink()


# how -> (edit of a copied pipeline folder d, what the error names)
BREAKS = {
    "truncated text encoder": (lambda d: _truncate(d / "text_encoder" / "model.safetensors"),
                               "text_encoder/model.safetensors: Error while deserializing header"),
    "truncated unet": (lambda d: _truncate(d / "unet" / "diffusion_pytorch_model.safetensors"),
                       "unet/diffusion_pytorch_model.safetensors: Error while deserializing header"),
    "layers_per_block one": (lambda d: _set_json(d / "unet" / "config.json", layers_per_block="one"),
                             "unet/config.json: UNet2DConditionModel: layers_per_block='one' should be a whole number"),
    "block_out_channels text": (lambda d: _set_json(d / "vae" / "config.json", block_out_channels="wide"),
                                "vae/config.json: AutoencoderKL: block_out_channels='wide' should be a list of whole"),
    "config is a list": (lambda d: (d / "vae" / "config.json").write_text("[1, 2]"),
                         "vae/config.json should hold a JSON object ({...}), found a list"),
    "config not JSON": (lambda d: (d / "unet" / "config.json").write_text("{not json"),
                        "unet/config.json is not valid JSON"),
    "num_train_timesteps 0": (lambda d: _set_json(d / "scheduler" / "scheduler_config.json", num_train_timesteps=0),
                              "scheduler_config.json: PNDMScheduler: num_train_timesteps must be a whole number >= 1, got 0"),
    "beta_schedule unknown": (lambda d: _set_json(d / "scheduler" / "scheduler_config.json", beta_schedule="cosine"),
                              "scheduler_config.json: PNDMScheduler: beta_schedule='cosine' is not supported"),
    "pickle text encoder": (lambda d: _pickle_only(d / "text_encoder", "model.safetensors", "pytorch_model.bin",
                                                   d / "PWNED"),
                            "text_encoder holds only the pickle file pytorch_model.bin, which can run code"),
    "pickle unet": (lambda d: _pickle_only(d / "unet", "diffusion_pytorch_model.safetensors",
                                           "diffusion_pytorch_model.bin", d / "PWNED"),
                    "unet/diffusion_pytorch_model.bin is a pickle checkpoint, which can run code"),
    "empty tokenizer": (lambda d: _empty(d / "tokenizer"), "tokenizer has no tokenizer vocabulary"),
    "weights link loop": (lambda d: _self_link(d / "unet" / "diffusion_pytorch_model.safetensors"),
                          "diffusion_pytorch_model.safetensors is a symlink to 'diffusion_pytorch_model.safetensors', "
                          "which does not exist or loops"),
    "model_index not JSON": (lambda d: (d / "model_index.json").write_text("\x00\x01"), "model_index.json is not valid JSON"),
    "model_index missing": (lambda d: (d / "model_index.json").unlink(), "model_index.json not found"),
    "unknown scheduler class": (lambda d: _set_json(d / "model_index.json", scheduler=["diffusers", "FooScheduler"]),
                                "names the scheduler 'FooScheduler', which sdkit does not have"),
}


def broken_copy(model, dest, how):
    """A copy of the pipeline folder ``model`` at ``dest`` broken as ``BREAKS[how]`` says; returns dest."""
    import shutil
    from pathlib import Path

    dest = Path(dest)
    shutil.copytree(model, dest)
    BREAKS[how][0](dest)
    return dest


def train_tiny_vae(run, **overrides):
    """A VAE training run of 2 steps (checkpoint every step) on a tiny config into ``run``."""
    from sdkit.training.config import VAEConfig
    from sdkit.training.loop import train
    from sdkit.training.stages import VAEStage

    cfg = VAEConfig(**{**dict(steps=2, batch_size=4, num_images=4, block_out_channels=(8, 8, 8, 8), norm_num_groups=4,
                              scale_samples=16, save_every=1, log_every=1, warmup_steps=1), **overrides})
    return train(VAEStage(cfg), cfg, str(run))


def bundled_for_the_reference(dest):
    """A copy of the bundled model without recommended_settings.json, sdkit's own file (diffusers ignores it,
    sdkit fills a call's unpassed options from it): on it both libraries' calls have the same defaults."""
    import shutil

    import sdkit

    shutil.copytree(sdkit.TINY_MODEL, dest, ignore=shutil.ignore_patterns("recommended_settings.json"))
    return str(dest)
