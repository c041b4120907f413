"""A1111 "Restart": Heun steps with restarts, jumps back up in noise (Xu et al. 2023, "Restart
sampling for improving generative processes", arXiv 2306.14878; A1111's ``sd_samplers_extra.py``).

From 20 steps on, the Karras sigmas are redrawn for fewer steps and the stretch from sigma = 2
down to sigma = 0.1 is run again (once, or twice from 36 steps), each time after fresh noise
raises the sample from 0.1 back to 2.

| code          | meaning                                                          |
| ------------- | ---------------------------------------------------------------- |
| steps         | the list of (old_sigma, new_sigma) Heun steps, restarts included |
| d, d_2        | dx/dsigma at old_sigma and at the Euler point                    |
"""

from dataclasses import dataclass

import torch

from ..configuration import check_number
from . import sigma_schedules as K
from .ladder import KDiffusionScheduler, to_d


@dataclass(frozen=True)
class RestartOptions:
    s_noise: float = 1.0  # scale of the restart noise

    def __post_init__(self):
        check_number("Restart", "s_noise", self.s_noise, low=0)


def restart_steps(sigmas):
    """The (old_sigma, new_sigma) pairs of a run on ``sigmas``, restarts included (A1111's restart_sampler)."""
    steps = sigmas.shape[0] - 1
    restarts = {}
    if steps >= 20:
        restart_count, restart_times = (steps // 4, 2) if steps >= 36 else (9, 1)
        sigmas = K.karras(steps - restart_count * restart_times, sigmas[-2].item(), sigmas[0].item())
        restarts = {0.1: (restart_count + 1, restart_times, 2)}
    restarts = {int(torch.argmin(abs(sigmas - key), dim=0)): value for key, value in restarts.items()}
    pairs = []
    for i in range(len(sigmas) - 1):
        pairs.append((sigmas[i], sigmas[i + 1]))
        if i + 1 in restarts:
            count, times, restart_max = restarts[i + 1]
            min_idx, max_idx = i + 1, int(torch.argmin(abs(sigmas - restart_max), dim=0))
            if max_idx < min_idx:
                restart = K.karras(count, sigmas[min_idx].item(), sigmas[max_idx].item())[:-1]
                pairs += list(zip(restart[:-1], restart[1:])) * times
    return pairs


class KRestartScheduler(KDiffusionScheduler):
    """Heun steps on the restart step list; noise before each restart."""

    a1111_name = "Restart"
    default_schedule = "karras"
    options_class = RestartOptions

    def _calls(self, sigmas, options):
        calls = []
        for j, (old, new) in enumerate(restart_steps(sigmas)):
            calls.append((j, 0, old))
            if new != 0:
                calls.append((j, 1, new))
        return calls

    def _step(self, x, denoised, j, stage, sigmas, state, noise):
        pairs = restart_steps(sigmas)
        old, new = pairs[j]
        dt = new - old
        if stage == 0:
            d = to_d(x, old, denoised)
            if new == 0:  # Euler to sigma 0
                return x + d * dt, {}
            return x + d * dt, {"carry": (x, d)}
        x_start, d = state.carry
        x = x_start + (d + to_d(x, new, denoised)) / 2 * dt
        if j + 1 < len(pairs) and new < pairs[j + 1][0]:  # a restart: noise back up to its top
            x = x + noise.randn() * state.options.s_noise * (pairs[j + 1][0] ** 2 - new**2) ** 0.5
        return x, {"carry": ()}
