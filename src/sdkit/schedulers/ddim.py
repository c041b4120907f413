"""DDIM sampling (Song, Meng & Ermon 2020, arXiv 2010.02502).

| code            | paper                                         |
| --------------- | --------------------------------------------- |
| alpha_bar       | alpha_t (the paper's alpha is our bar-alpha)   |
| alpha_bar_prev  | alpha_{t-1}: the next timestep to run          |
| x0, eps         | predicted x_0 and epsilon_theta(x_t)          |
| sigma           | sigma_t(eta), eq. 16                          |
"""

from dataclasses import dataclass

import torch

from ..configuration import check_number
from . import schedules as S
from .base import Scheduler, SchedulerOutput, ZeroSNRConfig


@dataclass(frozen=True)
class DDIMConfig(ZeroSNRConfig):
    clip_sample: bool = True  # clamp predicted x0 to +-clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0
    set_alpha_to_one: bool = True  # alpha_bar past the last step: 1 (True) or alpha_bar_0


@dataclass(frozen=True)
class DDIMOptions:
    eta: float = 0.0  # weight of fresh noise: 0 is deterministic DDIM, 1 the DDPM posterior (eq. 16)

    def __post_init__(self):
        check_number("DDIMScheduler", "eta", self.eta, low=0)


class DDIMScheduler(Scheduler):
    """Deterministic (eta=0) to DDPM-like (eta=1) implicit sampler; ``eta`` is a run option."""

    config_class = DDIMConfig
    options_class = DDIMOptions
    _fixed = {"thresholding": (False,)}

    def _setup(self, c):
        super()._setup(c)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]

    def step(self, model_output, timestep, sample, state, generator=None):
        """One DDIM step x_t -> x_{t-1} (Song et al. 2020, eq. 12); ``generator`` draws the eta noise."""
        self._check_timestep(timestep, state)
        c, eta = self._cfg, state.options.eta
        t = int(timestep)
        prev_t = t - c.num_train_timesteps // state.num_inference_steps

        # 1. alpha_bar at t and at the previous timestep
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod

        # 2. predicted x0 and eps
        x0, eps = S.vp_prediction_to_x0_eps(
            model_output, sample, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, c.prediction_type
        )

        # 3. optional clipping of x0
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)

        # 4. sigma_t(eta) (eq. 16)
        variance = (1 - alpha_bar_prev) / (1 - alpha_bar) * (1 - alpha_bar / alpha_bar_prev)
        sigma = eta * variance**0.5

        # 5. x_{t-1} = sqrt(alpha_bar_prev) x0 + direction pointing to x_t (+ noise)
        direction = (1 - alpha_bar_prev - sigma**2) ** 0.5 * eps
        prev_sample = alpha_bar_prev**0.5 * x0 + direction
        if eta > 0:
            noise = S.randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + sigma * noise
        return SchedulerOutput(prev_sample, x0, self._advance(state))
