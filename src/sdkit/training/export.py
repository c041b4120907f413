"""Assemble trained parts into a Stable Diffusion pipeline folder (the diffusers layout).

The folder is what diffusers' ``StableDiffusionPipeline.save_pretrained`` writes: model_index.json,
unet/, vae/, text_encoder/, tokenizer/, scheduler/, with safetensors weights only; and sdkit's
recommended_settings.json (the guidance and steps a call uses when it passes none).
"""

from __future__ import annotations

import json
import os
import shutil

from sdkit.models.modeling import DIFFUSERS_VERSION
from sdkit.pipelines import recommended

from .losses import config_noise_scheduler


def scheduler_config(cfg, scheduler_class: str) -> dict:
    """The scheduler_config.json of the training noise schedule, for ``scheduler_class``."""
    ddpm = config_noise_scheduler(cfg)
    config = {k: v for k, v in ddpm.config.items() if k not in ("_class_name", "_use_default_values")}
    config.update(_class_name=scheduler_class, _diffusers_version=DIFFUSERS_VERSION,
                  clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                  # zero terminal SNR: sampling must start at t = T, which "trailing" spacing includes
                  timestep_spacing="trailing" if cfg.rescale_betas_zero_snr else "leading",
                  skip_prk_steps=True)
    return config


def model_index(scheduler_class: str) -> dict:
    return {
        "_class_name": "StableDiffusionPipeline",
        "_diffusers_version": DIFFUSERS_VERSION,
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", scheduler_class],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def export_pipeline(vae_dir, unet_dir, out_dir, cfg) -> str:
    """Write the pipeline folder ``out_dir`` from a VAE run and a UNet run (replacing its parts)."""
    os.makedirs(out_dir, exist_ok=True)
    parts = {"vae": os.path.join(vae_dir, "vae"), "unet": os.path.join(unet_dir, "unet"),
             "text_encoder": os.path.join(unet_dir, "text_encoder"),
             "tokenizer": os.path.join(unet_dir, "tokenizer")}
    for name, source in parts.items():
        if not os.path.isdir(source):
            raise FileNotFoundError(f"export: {source} is missing; finish the training stage that writes it.")
        target = os.path.join(out_dir, name)
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(source, target, ignore=shutil.ignore_patterns("*.bin", "*.pt", ".*"))
    os.makedirs(os.path.join(out_dir, "scheduler"), exist_ok=True)
    with open(os.path.join(out_dir, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(cfg, cfg.scheduler), f, indent=2, sort_keys=True)
    with open(os.path.join(out_dir, "model_index.json"), "w") as f:
        json.dump(model_index(cfg.scheduler), f, indent=2, sort_keys=True)
    recommended.write(out_dir, recommended_settings(cfg))
    return out_dir


def recommended_settings(cfg) -> recommended.RecommendedSettings:
    """The settings a ``UNetConfig`` recommends for sampling (recommended_settings.json)."""
    return recommended.RecommendedSettings(guidance_scale=cfg.guidance_scale, guidance_rescale=cfg.guidance_rescale,
                                           guidance_end=cfg.guidance_end, num_inference_steps=cfg.num_inference_steps)


def folder_size(path) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)
