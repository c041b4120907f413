"""DPM-Solver++ multistep, orders 1 and 2 ("DPM++ 2M"; Lu et al. 2022, arXiv 2211.01095, Alg. 2).

| code           | paper                                               |
| -------------- | --------------------------------------------------- |
| alpha, sigma_t | alpha_t, sigma_t of x_t = alpha_t x0 + sigma_t eps  |
| lam            | lambda_t = log(alpha_t / sigma_t), half-log-SNR     |
| h              | lambda_t - lambda_s, the step in lambda             |
| x0             | the data prediction x_theta(x_s, s)                 |
| r0, D1         | h_{i-1} / h_i and the first divided difference      |
"""

from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import choice
from . import schedules as S
from .base import SchedulerOutput, SigmaScheduler, ZeroSNRConfig


def lam(sigma):
    """alpha, sigma_t and lambda = log alpha - log sigma_t for a VE sigma (Lu et al. 2022, Sec. 2)."""
    alpha, sigma_t = S.ve_to_vp(sigma)
    return alpha, sigma_t, torch.log(alpha) - torch.log(sigma_t)


@dataclass(frozen=True)
class DPMSolverConfig(ZeroSNRConfig):
    timestep_spacing: str = choice("linspace", S.TIMESTEP_SPACINGS)
    solver_order: int = choice(2, (1, 2))  # 1 (DPM-Solver++ 1 = DDIM) or 2 (2M)
    lower_order_final: bool = True  # kept for configs: the last step (sigma 0) is first order anyway
    use_karras_sigmas: bool = False  # Karras et al. rho=7 sigma spacing
    lambda_min_clipped: float = -float("inf")  # drop timesteps whose lambda is below this


class DPMSolverMultistepScheduler(SigmaScheduler):
    """Multistep exponential integrator on the data prediction; deterministic."""

    config_class = DPMSolverConfig
    custom_schedules = ("timesteps",)
    _fixed = {
        "thresholding": (False,), "algorithm_type": ("dpmsolver++", "deis"),
        "solver_type": ("midpoint", "logrho", "bh1", "bh2"), "euler_at_final": (False,),
        "use_exponential_sigmas": (False,), "use_beta_sigmas": (False,), "use_lu_lambdas": (False,),
        "use_flow_sigmas": (False,), "final_sigmas_type": ("zero",), "use_dynamic_shifting": (False,),
        "variance_type": ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log"),
    }

    def _plan(self, num_inference_steps):
        """Int64 timesteps, float32 sigmas (with a final 0); clipped lambdas may drop steps."""
        c, n = self._cfg, num_inference_steps
        lambda_t = torch.log(self.alphas_cumprod.sqrt()) - torch.log((1 - self.alphas_cumprod).sqrt())
        clipped = torch.searchsorted(torch.flip(lambda_t, [0]), c.lambda_min_clipped).item()
        end = c.num_train_timesteps - clipped
        timesteps = S.spaced_timesteps(
            c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset, end=end, extra_point=True,
        )
        timesteps = np.round(timesteps).astype(np.int64)
        train_sigmas = np.array(S.vp_to_ve_sigmas(self.alphas_cumprod))
        if c.use_karras_sigmas:
            sigmas = S.karras_sigmas(train_sigmas[0].item(), train_sigmas[-1].item(), n)
            timesteps = S.sigma_to_t(sigmas, np.log(train_sigmas))
            if c.beta_schedule != "squaredcos_cap_v2":
                timesteps = timesteps.round()
        else:
            sigmas = S.interp_sigmas(timesteps, train_sigmas)
        return self._solver_plan(timesteps, sigmas)

    def _timesteps_plan(self, timesteps):
        """Custom int64 timesteps and their interpolated sigmas (the reference's ``set_timesteps(timesteps=...)``)."""
        timesteps = timesteps.astype(np.int64)
        return self._solver_plan(timesteps, S.interp_sigmas(timesteps, np.array(S.vp_to_ve_sigmas(self.alphas_cumprod))))

    @staticmethod
    def _solver_plan(timesteps, sigmas):
        """Plan fields: int64 timesteps, float32 sigmas with a final 0, the step count."""
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        schedule = torch.from_numpy(np.asarray(timesteps)).to(torch.int64)
        return {"schedule": schedule, "sigmas": sigmas, "num_inference_steps": len(schedule)}

    def step(self, model_output, timestep, sample, state, generator=None):
        """One DPM-Solver++ step: first order to start (and at the end), then 2M; deterministic."""
        i = self._check_timestep(timestep, state)
        n = len(state.schedule)
        c = self._cfg

        # 1. data prediction x0 at sigma_i
        alpha_s0, sigma_s0, lam_s0 = lam(state.sigmas[i])
        x0, _ = S.vp_prediction_to_x0_eps(model_output, sample, alpha_s0, sigma_s0, c.prediction_type)
        history = (state.history + (x0,))[-c.solver_order:]

        # 2. first order for the first step of a run and for the last step (its sigma is 0)
        first_order = c.solver_order == 1 or state.steps_taken < 1 or i == n - 1

        # 3. exponential-integrator update in float32 (Lu et al. 2022, eqs. 8 and 10)
        x = sample.to(torch.float32)
        alpha_t, sigma_t, lam_t = lam(state.sigmas[i + 1])
        h = lam_t - lam_s0
        prev_sample = sigma_t / sigma_s0 * x - alpha_t * (torch.exp(-h) - 1.0) * x0
        if not first_order:
            _, _, lam_s1 = lam(state.sigmas[i - 1])
            r0 = (lam_s0 - lam_s1) / h
            D1 = 1.0 / r0 * (x0 - history[-2])
            prev_sample = prev_sample - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * D1
        prev_sample = prev_sample.to(x0.dtype)
        return SchedulerOutput(prev_sample, x0, self._advance(state, history=history))

    def scale_model_input(self, sample, timestep=None, state=None):
        """The UNet input is x_t itself: DPM-Solver works on the VP sample."""
        return sample

    def add_noise(self, original_samples, noise, timesteps, state=None):
        """x_t = alpha_t x0 + sigma_t eps with (alpha_t, sigma_t) from the VE sigma (Lu et al. 2022)."""
        alpha, sigma_t = S.ve_to_vp(self._sigma_at(timesteps, state, original_samples))
        return alpha * original_samples + sigma_t * noise
