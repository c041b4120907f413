"""DPM-Solver++ (stochastic), A1111's "DPM++ SDE" (k-diffusion ``sample_dpmpp_sde``; Lu et al.
2022, arXiv 2211.01095): a two-stage step with Brownian-tree noise after each stage.

| code          | meaning                                                     |
| ------------- | ----------------------------------------------------------- |
| t, t_next, h  | -log sigma_i, -log sigma_{i+1} and their difference          |
| s             | the intermediate time t + r h (r = 1/2: the midpoint)        |
| sd, su        | sigma_down and sigma_up of each stage's ancestral split     |
| fac           | 1 / (2 r), the weight of the second data prediction          |
"""

from dataclasses import dataclass

from ..configuration import check_number
from .ladder import KDiffusionScheduler, ancestral_step, sigma_fn, t_fn, to_d


@dataclass(frozen=True)
class SDEOptions:
    eta: float = 1.0  # noise of each stage (0: the ODE)
    s_noise: float = 1.0  # scale of the added noise
    r: float = 1 / 2  # where the intermediate point lies in [t, t_next]

    def __post_init__(self):
        check_number("DPM++ SDE", "eta", self.eta, low=0)
        check_number("DPM++ SDE", "s_noise", self.s_noise, low=0)
        check_number("DPM++ SDE", "r", self.r, low=0, high=1)
        if self.r == 0:
            raise ValueError("DPM++ SDE: r must be in (0, 1], got 0.")


def times(sigmas, i, r):
    """(t, t_next, h, s) of step i."""
    t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
    h = t_next - t
    return t, t_next, h, t + h * r


class KDPMPPSDEScheduler(KDiffusionScheduler):
    """A1111 "DPM++ SDE": two model calls a step (one at the last step), Brownian noise."""

    a1111_name = "DPM++ SDE"
    default_schedule = "karras"
    options_class = SDEOptions

    def _second_sigma(self, sigmas, i, options):
        return sigma_fn(times(sigmas, i, options.r)[3]) if sigmas[i + 1] != 0 else None

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        if sigmas[i + 1] == 0:  # Euler to sigma 0
            return x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i]), {}
        t, t_next, h, s = times(sigmas, i, o.r)
        if stage == 0:
            sd, su = ancestral_step(sigma_fn(t), sigma_fn(s), o.eta)
            s_ = t_fn(sd)
            x_2 = (sigma_fn(s_) / sigma_fn(t)) * x - (t - s_).expm1() * denoised
            x_2 = x_2 + noise.between(sigma_fn(t), sigma_fn(s)) * o.s_noise * su
            return x_2, {"carry": (x, denoised)}
        x_start, denoised_1 = state.carry
        fac = 1 / (2 * o.r)
        sd, su = ancestral_step(sigma_fn(t), sigma_fn(t_next), o.eta)
        t_next_ = t_fn(sd)
        denoised_d = (1 - fac) * denoised_1 + fac * denoised
        x = (sigma_fn(t_next_) / sigma_fn(t)) * x_start - (t - t_next_).expm1() * denoised_d
        x = x + noise.between(sigma_fn(t), sigma_fn(t_next)) * o.s_noise * su
        return x, {"carry": ()}
