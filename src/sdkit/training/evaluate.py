"""Validation during training: a minimal guided sampler and prompt-adherence scores from the judge.

The sampler is the plain classifier-free-guided loop (Ho & Salimans 2022) over any sdkit
scheduler, so training can be checked without the pipelines; users generate with
``sdkit.StableDiffusionPipeline``.
"""

from __future__ import annotations

import numpy as np
import torch

from .judge import judge, score
from .shapes import parse_prompt


@torch.no_grad()
def generate(unet, text_encoder, tokenizer, vae, scheduler, prompts, steps=25, guidance_scale=4.0,
             seed=0):
    """Images (B, 64, 64, 3) float in [0, 1] for ``prompts``; image i uses seed ``seed + i``."""
    ids = tokenizer(list(prompts) + [""], padding="max_length", max_length=tokenizer.model_max_length,
                    truncation=True, return_tensors="pt").input_ids
    hidden = text_encoder(ids).last_hidden_state  # (B + 1, T, D)
    cond, uncond = hidden[:-1], hidden[-1:].expand(len(prompts), -1, -1)
    shape = (4, unet.config.sample_size, unet.config.sample_size)
    x = torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i))
                   for i in range(len(prompts))])
    state = scheduler.set_timesteps(steps)
    x = x * state.init_noise_sigma
    generator = torch.Generator().manual_seed(seed)
    for t in state.timesteps:
        model_in = scheduler.scale_model_input(x, t, state)
        if guidance_scale == 1.0:
            prediction = unet(model_in, t, cond)
        else:
            out = unet(torch.cat([model_in, model_in]), t, torch.cat([uncond, cond]))
            u, c = out.chunk(2)
            prediction = u + guidance_scale * (c - u)
        step = scheduler.step(prediction, t, x, state, generator=generator)
        x, state = step.prev_sample, step.state
    images = vae.decode(x / vae.config.scaling_factor)
    return ((images + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()


def adherence(images, prompts) -> dict[str, float]:
    """Fraction of prompts whose named attributes the judge finds, per attribute."""
    hits: dict[str, list[bool]] = {}
    for image, prompt in zip(images, prompts):
        for name, ok in score(parse_prompt(prompt), judge(image)).items():
            hits.setdefault(name, []).append(ok)
    return {name: float(np.mean(v)) for name, v in hits.items()}
