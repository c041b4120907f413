"""Euler sampling of the probability-flow ODE in sigma (Karras et al. 2022, arXiv 2206.00364, Alg. 1).

| code        | paper                                        |
| ----------- | -------------------------------------------- |
| sigma       | sigma_i, the VE noise level of step i        |
| sigma_next  | sigma_{i+1} (0 after the last step)          |
| x           | x_i = x_t / sqrt(alpha_bar): the VE sample   |
| x0          | D(x_i; sigma_i), the denoised estimate       |
| d           | dx/dsigma = (x - x0) / sigma                 |
"""

from dataclasses import dataclass

import torch

from ..configuration import choice
from . import schedules as S
from .base import SchedulerOutput, SigmaScheduler, ZeroSNRConfig


@dataclass(frozen=True)
class EulerConfig(ZeroSNRConfig):
    timestep_spacing: str = choice("linspace", S.TIMESTEP_SPACINGS)
    use_karras_sigmas: bool = False  # Karras et al. rho=7 sigma spacing instead of timestep spacing
    sigma_min: float | None = None  # Karras range; default: the spaced schedule's ends
    sigma_max: float | None = None


class EulerDiscreteScheduler(SigmaScheduler):
    """First-order deterministic ODE sampler; float timesteps, inputs scaled by 1/sqrt(sigma^2 + 1)."""

    config_class = EulerConfig
    custom_schedules = ("timesteps", "sigmas")
    _fixed = {
        "interpolation_type": ("linear",), "timestep_type": ("discrete",),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "final_sigmas_type": ("zero",),
    }

    def step(self, model_output, timestep, sample, state, generator=None):
        """One Euler step from sigma_i to sigma_{i+1} (Karras et al. 2022, Alg. 1 without churn)."""
        i = self._check_timestep(timestep, state)
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]

        # 1. work in float32, like the reference, for the ODE update
        x = sample.to(torch.float32)

        # 2. denoised estimate x0
        x0 = S.ve_prediction_to_x0(model_output, x, sigma, self._cfg.prediction_type)

        # 3. Euler step along d = (x - x0) / sigma
        d = (x - x0) / sigma
        prev_sample = (x + d * (sigma_next - sigma)).to(model_output.dtype)
        return SchedulerOutput(prev_sample, x0, self._advance(state))
