"""DPM-Solver++ multistep samplers: 2M, 2M SDE (midpoint or Heun) and 3M SDE (Lu et al. 2022,
arXiv 2211.01095; k-diffusion ``sample_dpmpp_2m``, ``sample_dpmpp_2m_sde``, ``sample_dpmpp_3m_sde``),
as A1111 runs them. The SDE ones add Brownian-tree noise (one path per image with A1111 seeds).

| code             | paper                                                       |
| ---------------- | ----------------------------------------------------------- |
| t, s             | lambda-like times -log sigma_i, -log sigma_{i+1}            |
| h, h_last        | t_{i+1} - t_i, this step's and the previous one's           |
| eta_h, h_eta     | eta h, and (eta + 1) h: the SDE's share of the step        |
| denoised_1, _2   | the data predictions of the previous steps (multistep memory) |
| r, r0, r1        | ratios of the previous steps' h to this one's               |
"""

from dataclasses import dataclass

from ..configuration import choice
from .base import NoOptions
from .ladder import KConfig, KDiffusionScheduler, sigma_fn, t_fn


class KDPMPP2MScheduler(KDiffusionScheduler):
    """A1111 "DPM++ 2M": second-order multistep on the data prediction; deterministic."""

    a1111_name = "DPM++ 2M"
    default_schedule = "karras"

    options_class = NoOptions

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        t, t_next = t_fn(sigmas[i]), t_fn(sigmas[i + 1])
        h = t_next - t
        if not state.history or sigmas[i + 1] == 0:
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            (old_denoised,) = state.history
            r = (t - t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (sigma_fn(t_next) / sigma_fn(t)) * x - (-h).expm1() * denoised_d
        return x, {"history": (denoised,)}


@dataclass(frozen=True)
class SDEConfig(KConfig):
    solver_type: str = choice("midpoint", ("midpoint", "heun"))  # "DPM++ 2M SDE" or "DPM++ 2M SDE Heun"


class KDPMPP2MSDEScheduler(KDiffusionScheduler):
    """A1111 "DPM++ 2M SDE" (solver_type midpoint) and "DPM++ 2M SDE Heun" (heun)."""

    a1111_name = "DPM++ 2M SDE"
    config_class = SDEConfig
    default_schedule = "exponential"

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        if sigmas[i + 1] == 0:
            return denoised, {}
        t, s = -sigmas[i].log(), -sigmas[i + 1].log()
        h = s - t
        eta_h = o.eta * h
        x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
        if state.history:
            old_denoised, h_last = state.history
            r = h_last / h
            if self._cfg.solver_type == "heun":
                x = x + ((-h - eta_h).expm1().neg() / (-h - eta_h) + 1) * (1 / r) * (denoised - old_denoised)
            else:
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
        if o.eta:
            W = noise.between(sigmas[i], sigmas[i + 1])
            x = x + W * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt() * o.s_noise
        return x, {"history": (denoised, h)}


class KDPMPP3MSDEScheduler(KDiffusionScheduler):
    """A1111 "DPM++ 3M SDE": third-order multistep SDE; drops the next-to-last sigma."""

    a1111_name = "DPM++ 3M SDE"
    default_schedule = "exponential"
    discard_next_to_last_sigma = True

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        denoised_1, denoised_2, h_1, h_2 = state.history or (None, None, None, None)
        h = h_1
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            h_eta = h * (o.eta + 1)
            x = (-h_eta).exp() * x + (-h_eta).expm1().neg() * denoised
            if h_2 is not None:
                r0, r1 = h_1 / h, h_2 / h
                d1_0, d1_1 = (denoised - denoised_1) / r0, (denoised_1 - denoised_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * r0 / (r0 + r1)
                d2 = (d1_0 - d1_1) / (r0 + r1)
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                phi_3 = phi_2 / h_eta - 0.5
                x = x + phi_2 * d1 - phi_3 * d2
            elif h_1 is not None:
                r = h_1 / h
                d = (denoised - denoised_1) / r
                phi_2 = h_eta.neg().expm1() / h_eta + 1
                x = x + phi_2 * d
            if o.eta:
                W = noise.between(sigmas[i], sigmas[i + 1])
                x = x + W * sigmas[i + 1] * (-2 * h * o.eta).expm1().neg().sqrt() * o.s_noise
        return x, {"history": (denoised, denoised_1, h, h_1)}
