"""Pseudo numerical methods for diffusion models: PNDM and PLMS (Liu et al. 2022, arXiv 2202.09778).

| code            | paper                                                  |
| --------------- | ------------------------------------------------------ |
| alpha_bar       | bar-alpha_t                                            |
| phi(x, eps, t, t_prev) | the transfer part, eq. 11 (``_transfer``)        |
| eps_history     | e_{t}, e_{t-delta}, ...: past model outputs (eq. 12)   |
| eps_rk          | running Runge-Kutta combination of eps (eq. 13)        |

With ``skip_prk_steps=True`` (the Stable Diffusion default, "PLMS") the warm-up is a 2nd-order
pseudo-improved-Euler step; otherwise three 4-stage pseudo Runge-Kutta steps (12 model calls).
"""

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch

from ..configuration import choice
from . import schedules as S
from .base import Scheduler, SchedulerConfig, SchedulerOutput, SchedulerState


@dataclass(frozen=True)
class PNDMState(SchedulerState):
    num_prk_steps: int = 0  # model calls in the Runge-Kutta warm-up (0 for PLMS)
    cur_sample: torch.Tensor | None = None  # x at the start of the current multi-call step
    eps_rk: torch.Tensor | float = 0.0  # partial Runge-Kutta sum of eps


@dataclass(frozen=True)
class PNDMConfig(SchedulerConfig):
    prediction_type: str = choice("epsilon", ("epsilon", "v_prediction"))
    skip_prk_steps: bool = False  # True: PLMS warm-up (SD default); False: Runge-Kutta warm-up
    set_alpha_to_one: bool = False  # alpha_bar past the last step: 1 (True) or alpha_bar_0


class PNDMScheduler(Scheduler):
    """Linear multistep on the DDIM transfer; 4th order once 3 past outputs are known."""

    config_class = PNDMConfig

    def _setup(self, c):
        super()._setup(c)
        self.final_alpha_cumprod = torch.tensor(1.0) if c.set_alpha_to_one else self.alphas_cumprod[0]

    def _plan(self, num_inference_steps):
        """Warm-up timesteps followed by the multistep ones (int64)."""
        c, n = self._cfg, num_inference_steps
        base = S.spaced_timesteps(c.timestep_spacing, n, c.num_train_timesteps, c.steps_offset)
        base = np.round(base[::-1]).astype(np.int64)  # ascending
        if c.skip_prk_steps:
            # PLMS runs the second-to-last base timestep twice (the improved-Euler warm-up)
            prk = np.array([], dtype=np.int64)
            plms = np.concatenate([base[:-1], base[-2:-1], base[-1:]])[::-1]
        elif n < 4:
            raise ValueError(
                f"PNDMScheduler: the Runge-Kutta warm-up needs at least 4 steps, got {n}; "
                "use more steps or skip_prk_steps=True (PLMS)."
            )
        else:
            # each of the last 4 base timesteps and its half-step midpoint, as 4-call RK stages
            half = c.num_train_timesteps // n // 2
            pairs = base[-4:].repeat(2) + np.tile(np.array([0, half]), 4)
            prk = pairs[:-1].repeat(2)[1:-1][::-1]
            plms = base[:-3][::-1]
        schedule = torch.from_numpy(np.concatenate([prk, plms]).astype(np.int64))
        return {"schedule": schedule, "state_class": PNDMState, "num_prk_steps": len(prk)}

    def step(self, model_output, timestep, sample, state, generator=None):
        """One model call's worth of PNDM: a Runge-Kutta stage or a linear multistep update."""
        self._check_timestep(timestep, state)
        if state.steps_taken < state.num_prk_steps:
            return self._step_prk(model_output, int(timestep), sample, state)
        return self._step_plms(model_output, int(timestep), sample, state)

    def _step_prk(self, eps, t, x, state):
        """Stage k of pseudo Runge-Kutta (eq. 13): accumulate eps, move from the stage's start."""
        k = state.steps_taken
        delta = self._cfg.num_train_timesteps // state.num_inference_steps
        prev_t = t - (0 if k % 2 else delta // 2)
        t = int(state.schedule[k // 4 * 4])
        history, cur_sample, eps_rk = state.history, state.cur_sample, state.eps_rk

        # 1. add this stage's eps to the Runge-Kutta sum (weights 1/6, 1/3, 1/3, 1/6)
        if k % 4 == 0:
            eps_rk = eps_rk + 1 / 6 * eps
            history = history + (eps,)
            cur_sample = x
        elif k % 4 in (1, 2):
            eps_rk = eps_rk + 1 / 3 * eps
        else:
            eps = eps_rk + 1 / 6 * eps
            eps_rk = 0.0

        # 2. transfer from the stage's starting sample
        start = cur_sample if cur_sample is not None else x
        prev_sample, x0 = self._transfer(start, t, prev_t, eps)
        new = dataclasses.replace(state, history=history, cur_sample=cur_sample, eps_rk=eps_rk)
        return SchedulerOutput(prev_sample, x0, self._advance(new))

    def _step_plms(self, eps, t, x, state):
        """Pseudo linear multistep (eq. 12), with a pseudo improved-Euler warm-up when PRK is skipped."""
        if not self._cfg.skip_prk_steps and len(state.history) < 3:
            raise ValueError("PNDMScheduler: the multistep phase needs the 12 Runge-Kutta calls first; "
                             "run the state's timesteps from the beginning.")
        k = state.steps_taken
        delta = self._cfg.num_train_timesteps // state.num_inference_steps
        history, cur_sample = state.history, state.cur_sample

        # 1. the transfer interval; the second warm-up call redoes the first interval
        prev_t = t - delta
        if k != 1:
            history = history[-3:] + (eps,)
        else:
            prev_t, t = t, t + delta

        # 2. combine past eps (Adams-Bashforth weights of eq. 12)
        e = history
        if len(e) == 1 and k == 0:
            cur_sample = x
        elif len(e) == 1 and k == 1:
            eps = (eps + e[-1]) / 2
            x, cur_sample = cur_sample, None
        elif len(e) == 2:
            eps = (3 * e[-1] - e[-2]) / 2
        elif len(e) == 3:
            eps = (23 * e[-1] - 16 * e[-2] + 5 * e[-3]) / 12
        else:
            eps = 1 / 24 * (55 * e[-1] - 59 * e[-2] + 37 * e[-3] - 9 * e[-4])

        # 3. transfer x_t -> x_{t_prev}
        prev_sample, x0 = self._transfer(x, t, prev_t, eps)
        new = dataclasses.replace(state, history=history, cur_sample=cur_sample)
        return SchedulerOutput(prev_sample, x0, self._advance(new))

    def _transfer(self, x, t, prev_t, model_output):
        """phi, the transfer x_t -> x_{t_prev} for a given eps (Liu et al. 2022, eq. 11); and x0."""
        alpha_bar = self.alphas_cumprod[t]
        alpha_bar_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        x0, eps = S.vp_prediction_to_x0_eps(
            model_output, x, alpha_bar**0.5, (1 - alpha_bar) ** 0.5, self._cfg.prediction_type
        )
        x_coef = (alpha_bar_prev / alpha_bar) ** 0.5
        denom = alpha_bar * (1 - alpha_bar_prev) ** 0.5 + (
            alpha_bar * (1 - alpha_bar) * alpha_bar_prev
        ) ** 0.5
        prev_sample = x_coef * x - (alpha_bar_prev - alpha_bar) * eps / denom
        return prev_sample, x0


@dataclass(frozen=True)
class PLMSConfig(PNDMConfig):
    skip_prk_steps: bool = True


class PLMSScheduler(PNDMScheduler):
    """PNDM with the PLMS warm-up by default (skip_prk_steps=True); saved as a PNDMScheduler."""

    config_class = PLMSConfig
    _config_class_name = "PNDMScheduler"
    _always_given = ("skip_prk_steps",)  # PLMS's True must survive a swap back to PNDMScheduler
