"""DDPM ancestral sampling (Ho et al. 2020, arXiv 2006.11239).

| code            | paper                                   |
| --------------- | --------------------------------------- |
| alpha_bar       | bar-alpha_t                             |
| alpha_bar_prev  | bar-alpha_{t-1} (1 past the last step)  |
| beta            | beta_t = 1 - bar-alpha_t / bar-alpha_{t-1} (for the strided schedule) |
| x0, eps         | predicted x_0 and epsilon               |
"""

from dataclasses import dataclass

import torch

from ..configuration import choice
from . import schedules as S
from .base import Scheduler, SchedulerOutput, ZeroSNRConfig


@dataclass(frozen=True)
class DDPMConfig(ZeroSNRConfig):
    # posterior variance (fixed_small, its log form) or beta_t (fixed_large)
    variance_type: str = choice("fixed_small", ("fixed_small", "fixed_small_log", "fixed_large"))
    clip_sample: bool = True  # clamp predicted x0 to +-clip_sample_range (pixel-space models)
    clip_sample_range: float = 1.0


class DDPMScheduler(Scheduler):
    """Ancestral sampler of the posterior q(x_{t-1} | x_t, x0); noise at every step but the last."""

    config_class = DDPMConfig
    custom_schedules = ("timesteps",)
    _fixed = {"thresholding": (False,)}

    def _setup(self, c):
        super()._setup(c)
        self.one = torch.tensor(1.0)

    def step(self, model_output, timestep, sample, state, generator=None):
        """One ancestral step x_t -> x_{t-1} (Ho et al. 2020, eqs. 6-7)."""
        i = self._check_timestep(timestep, state)
        t = int(state.schedule[i])
        prev_t = int(state.schedule[i + 1]) if i + 1 < len(state.schedule) else -1
        c = self._cfg

        # 1. alpha_bar at t and at the previous (next-to-run) timestep
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
        alpha = alpha_bar / alpha_bar_prev
        beta = 1 - alpha

        # 2. predicted x0 from the model output
        x0, _ = S.vp_prediction_to_x0_eps(
            model_output, sample, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, c.prediction_type
        )

        # 3. optional clipping of x0
        if c.clip_sample:
            x0 = x0.clamp(-c.clip_sample_range, c.clip_sample_range)

        # 4. posterior mean: mu = coef_x0 * x0 + coef_xt * x_t (eq. 7)
        coef_x0 = alpha_bar_prev**0.5 * beta / (1 - alpha_bar)
        coef_xt = alpha**0.5 * (1 - alpha_bar_prev) / (1 - alpha_bar)
        prev_sample = coef_x0 * x0 + coef_xt * sample

        # 5. add posterior noise, except at the last step
        if t > 0:
            noise = S.randn(model_output.shape, generator, model_output.device, model_output.dtype)
            prev_sample = prev_sample + self._std(alpha_bar, alpha_bar_prev, beta) * noise
        return SchedulerOutput(prev_sample, x0, self._advance(state))

    def _std(self, alpha_bar, alpha_bar_prev, beta):
        """Standard deviation of the added noise: posterior (fixed_small) or beta_t (fixed_large)."""
        variance = torch.clamp((1 - alpha_bar_prev) / (1 - alpha_bar) * beta, min=1e-20)
        kind = self._cfg.variance_type
        if kind == "fixed_small":
            return variance**0.5
        if kind == "fixed_small_log":
            return torch.exp(0.5 * torch.log(variance))
        return beta**0.5
