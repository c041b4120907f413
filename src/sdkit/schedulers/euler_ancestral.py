"""Euler ancestral sampling (k-diffusion `sample_euler_ancestral`; Karras et al. 2022, arXiv 2206.00364).

| code        | meaning                                                        |
| ----------- | -------------------------------------------------------------- |
| sigma       | sigma_i, noise level of the current sample                     |
| sigma_next  | sigma_{i+1}, noise level of the next sample (0 after the last) |
| sigma_up    | std of the fresh noise added at this step                      |
| sigma_down  | noise level the deterministic Euler step goes to               |
| x0, d       | denoised estimate and dx/dsigma = (x - x0) / sigma             |
"""

import torch

from . import schedules as S
from .base import SchedulerOutput, SigmaScheduler


def ancestral_sigmas(sigma, sigma_next):
    """(sigma_down, sigma_up): an ODE move plus fresh noise (k-diffusion get_ancestral_step, eta=1)."""
    sigma_up = (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5
    sigma_down = (sigma_next**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class EulerAncestralDiscreteScheduler(SigmaScheduler):
    """Euler step to sigma_down, then add N(0, sigma_up^2) noise: stochastic, first order."""

    _prediction_types = ("epsilon", "v_prediction")

    def __init__(
        self,
        num_train_timesteps: int = 1000,  # length of the training noise schedule
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
        trained_betas: list | None = None,  # explicit betas, overriding the schedule
        prediction_type: str = "epsilon",  # epsilon | v_prediction
        timestep_spacing: str = "linspace",  # linspace | leading | trailing
        steps_offset: int = 0,  # added to "leading" timesteps
        rescale_betas_zero_snr: bool = False,  # zero terminal SNR (Lin et al. 2023)
    ):
        self._init_config(locals())
        self.alphas_cumprod = S.make_alphas_cumprod(self._config, clamp_terminal=True)
        self._freeze()

    def step(self, model_output, timestep, sample, state, generator=None):
        """One ancestral Euler step from sigma_i to sigma_{i+1}."""
        i = self._check_timestep(timestep, state)
        sigma, sigma_next = state.sigmas[i], state.sigmas[i + 1]

        # 1. denoised estimate x0 (the sample in float32, like the reference)
        x = sample.to(torch.float32)
        x0 = S.ve_prediction_to_x0(model_output, x, sigma, self._config["prediction_type"])

        # 2. split the step into a deterministic part and fresh noise
        sigma_down, sigma_up = ancestral_sigmas(sigma, sigma_next)

        # 3. Euler step to sigma_down
        d = (x - x0) / sigma
        prev_sample = x + d * (sigma_down - sigma)

        # 4. add noise of std sigma_up
        noise = S.randn(model_output.shape, generator, model_output.device, model_output.dtype)
        prev_sample = (prev_sample + noise * sigma_up).to(model_output.dtype)
        return SchedulerOutput(prev_sample, x0, self._advance(state))
