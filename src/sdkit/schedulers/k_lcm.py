"""A1111 "LCM": latent consistency model sampling (Luo et al. 2023, arXiv 2310.04378; A1111's
``sd_samplers_lcm.py``): each step jumps to the consistency function's x0 and re-noises to the
next sigma. The model is seen on LCM's 50 original timesteps (19, 39, ..., 999), called at the
nearest of them, with the consistency boundary scalings (sigma_data 0.5, timestep scale 10).

| code            | meaning                                                       |
| --------------- | ------------------------------------------------------------- |
| c_skip, c_out   | the consistency model's boundary-condition scalings           |
| scaled_t        | the timestep times 10                                         |
"""

from dataclasses import dataclass

import torch

from ..configuration import choice
from . import sigma_schedules as K
from .base import NoOptions
from .ladder import KConfig, KDiffusionScheduler

ORIGINAL_STEPS = 50  # the LCM's distillation steps


class LCMLadder(K.Ladder):
    """The sigmas of LCM's 50 original timesteps; timesteps map to the nearest of them."""

    def __init__(self, alphas_cumprod, quantize=False):
        T = len(alphas_cumprod)
        self.skip = T // ORIGINAL_STEPS
        valid = torch.stack([alphas_cumprod[T - 1 - x * self.skip] for x in range(ORIGINAL_STEPS)][::-1])
        super().__init__(valid.float(), quantize=True)

    def get_sigmas(self, n):
        start, end = self.sigma_to_t(self.sigma_max), self.sigma_to_t(self.sigma_min)
        return K.append_zero(self.t_to_sigma(torch.linspace(start, end, n)))

    def sigma_to_t(self, sigma):
        dists = sigma.log() - self.log_sigmas[:, None]
        return dists.abs().argmin(dim=0).view(sigma.shape) * self.skip + (self.skip - 1)

    def t_to_sigma(self, t):
        return super().t_to_sigma(torch.clamp(((t - (self.skip - 1)) / self.skip).float(), min=0,
                                              max=len(self.sigmas) - 1))


@dataclass(frozen=True)
class LCMConfig(KConfig):
    prediction_type: str = choice("epsilon", ("epsilon",))  # A1111's LCM wrapper assumes an eps model


class KLCMScheduler(KDiffusionScheduler):
    """x0 from the consistency function, then noise to the next sigma."""

    a1111_name = "LCM"
    config_class = LCMConfig
    options_class = NoOptions
    ladder_class = LCMLadder

    def denoise(self, model_output, x, sigma):
        """The consistency function: c_skip x + c_out (x - sigma eps), scalings at 10 t (sigma_data 0.5)."""
        x0 = x + model_output * -sigma
        scaled_t = self.ladder.sigma_to_t(sigma) * 10.0
        c_skip = 0.5**2 / (scaled_t**2 + 0.5**2)
        c_out = scaled_t / (scaled_t**2 + 0.5**2) ** 0.5
        return c_out * x0 + c_skip * x

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        if sigmas[i + 1] > 0:
            return denoised + sigmas[i + 1] * noise.randn(), {}
        return denoised, {}
