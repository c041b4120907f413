"""What a trained UNet makes of noised encodings: training pairs for a decoder that draws them clean.

A sampler ends on the UNet's estimate of the clean latent, and that estimate bends the edges a
little (a square's sides bow in, a circle gets lumps), which a decoder trained only on the
encoder's latents draws faithfully. Each pair here is a fresh drawing, encoded, noised to a
random strength and denoised by the UNet through an img2img run with a random sampler and
guidance, kept as the final latent; the drawing itself is the decoder's target.
"""

from __future__ import annotations

import json
import os

import numpy as np
import torch

from .shapes import OPTIONAL_PARTS, Attributes, ShapesDataset, caption

STRENGTHS = (0.04, 0.08, 0.12, 0.2, 0.3, 0.4, 0.5, 0.6)
"""img2img strengths: from the last step alone (0.04 of 25) to runs long enough that the UNet
redraws the edges, but short enough that the drawing still fixes where they belong."""
GUIDANCE = ((2.0, 0.7), (3.0, 0.7), (5.0, 0.7), (7.5, 0.7), (2.0, 0.0), (3.0, 0.0), (5.0, 0.0), (7.5, 0.0))
"""(guidance scale, guidance rescale) pairs: the recommended setting, the reference's 7.5, between."""
SAMPLERS = ("DDIMScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler")
STEPS = 25
CHUNK = 32  # drawings per img2img call (one strength, guidance and sampler each)


def unet_pipeline(vae_dir, unet_dir):
    """An img2img pipeline of the VAE in ``vae_dir`` and the finished UNet run in ``unet_dir``."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdkit.models import AutoencoderKL, UNet2DConditionModel
    from sdkit.pipelines import Img2ImgPipeline
    from sdkit.schedulers import DDIMScheduler

    from .config import UNetConfig
    from .export import scheduler_config

    with open(os.path.join(unet_dir, "train_config.json")) as f:
        cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.load(f).items()})
    pipe = Img2ImgPipeline(vae=AutoencoderKL.from_pretrained(vae_dir),
                           unet=UNet2DConditionModel.from_pretrained(os.path.join(unet_dir, "unet")),
                           text_encoder=CLIPTextModel.from_pretrained(os.path.join(unet_dir, "text_encoder")).eval(),
                           tokenizer=CLIPTokenizer.from_pretrained(os.path.join(unet_dir, "tokenizer")),
                           scheduler=DDIMScheduler.from_config(scheduler_config(cfg, "DDIMScheduler")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def denoised_pairs(pipe, num_images, seed, drop_prob=0.35):
    """(latents (N, C, h, w) scaled as the UNet's, images uint8 (N, 3, H, W)) for ``num_images`` drawings.

    Everything is drawn from ``seed``: the drawings (``ShapesDataset(num_images, seed)``), their
    captions (optional parts dropped with ``drop_prob``, never empty), and per chunk of ``CHUNK``
    the strength, guidance and sampler, and per drawing the img2img noise.
    """
    from sdkit.schedulers import get_scheduler_class

    data = ShapesDataset(num_images, seed=seed)
    rng = np.random.default_rng([seed, 1])
    samplers = [get_scheduler_class(name).from_config(pipe.scheduler.config) for name in SAMPLERS]
    latents, images = [], []
    for start in range(0, num_images, CHUNK):
        items = [data[i] for i in range(start, min(start + CHUNK, num_images))]
        pixels = torch.stack([it["pixel_values"] for it in items])  # (b, 3, H, W) in [-1, 1]
        prompts = [caption(Attributes(**it["attrs"]), {p for p in sorted(OPTIONAL_PARTS) if rng.random() >= drop_prob})
                   for it in items]
        strength = float(STRENGTHS[rng.integers(len(STRENGTHS))])
        scale, rescale = GUIDANCE[rng.integers(len(GUIDANCE))]
        scheduler = samplers[rng.integers(len(samplers))]
        generators = [torch.Generator().manual_seed(seed * 1_000_003 + start + i) for i in range(len(items))]
        out = pipe(prompts, image=(pixels + 1) / 2, strength=strength, num_inference_steps=STEPS,
                   guidance_scale=scale, guidance_rescale=rescale, scheduler=scheduler, generator=generators,
                   output_type="latent")
        latents.append(out.images.cpu())
        images.append(((pixels + 1) * 127.5).round().to(torch.uint8))
    return torch.cat(latents), torch.cat(images)
