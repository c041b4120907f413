"""Euler ancestral sampling (k-diffusion `sample_euler_ancestral`; Karras et al. 2022, arXiv 2206.00364).

| code        | meaning                                                        |
| ----------- | -------------------------------------------------------------- |
| sigma       | sigma_i, noise level of the current sample                     |
| sigma_next  | sigma_{i+1}, noise level of the next sample (0 after the last) |
| sigma_up    | std of the fresh noise added at this step                      |
| sigma_down  | noise level the deterministic Euler step goes to               |
| x0, d       | denoised estimate and dx/dsigma = (x - x0) / sigma             |
"""

from dataclasses import dataclass

import torch

from ..configuration import choice
from . import schedules as S
from .base import SchedulerOutput, SigmaScheduler, ZeroSNRConfig


def ancestral_sigmas(sigma, sigma_next):
    """(sigma_down, sigma_up): an ODE move plus fresh noise (k-diffusion get_ancestral_step, eta=1)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


@dataclass(frozen=True)
class EulerAncestralConfig(ZeroSNRConfig):
    prediction_type: str = choice("epsilon", ("epsilon", "v_prediction"))
    timestep_spacing: str = choice("linspace", S.TIMESTEP_SPACINGS)


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler step to sigma_down, then add N(0, sigma_up^2) noise: stochastic, first order."""

    config_class = EulerAncestralConfig

    def step(self, model_output, timestep, sample, state, generator=None):
        """One ancestral Euler step from sigma_i to sigma_{i+1}."""
        i = self._check_timestep(timestep, state)
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]

        # 1. denoised estimate x0 (the sample in float32, like the reference)
        x = sample.to(torch.float32)
        x0 = S.ve_prediction_to_x0(model_output, x, sigma, self._cfg.prediction_type)

        # 2. split the step into a deterministic part and fresh noise
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)

        # 3. Euler step to sigma_down
        d = (x - x0) / sigma
        prev_sample = x + d * (sigma_down - sigma)

        # 4. add noise of std sigma_up
        noise = S.randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        return SchedulerOutput(prev_sample, x0, self._advance(state))
