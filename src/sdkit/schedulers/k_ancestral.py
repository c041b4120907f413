"""The ancestral samplers: each step goes down to sigma_down by the ODE and adds fresh noise of std
sigma_up (k-diffusion ``sample_euler_ancestral``, ``sample_dpm_2_ancestral``,
``sample_dpmpp_2s_ancestral``; Karras et al. 2022, arXiv 2206.00364; DPM-Solver++(2S), Lu et al.
2022, arXiv 2211.01095), as A1111 runs them. ``eta`` scales sigma_up (1: A1111's default).

| code              | meaning                                                        |
| ----------------- | -------------------------------------------------------------- |
| sigma_down        | the level the deterministic part of the step goes to            |
| sigma_up          | std of the noise added after it                                 |
| sigma_mid         | DPM2 a's second point, geometric mean of sigma_i and sigma_down |
| t, t_next, s, h   | DPM-Solver times -log sigma of the step's start, end and midpoint; h = t_next - t |
"""

from .ladder import KDiffusionScheduler, ancestral_step, log_lerp, sigma_fn, t_fn, to_d


class KEulerAncestralScheduler(KDiffusionScheduler):
    """A1111 "Euler a": an Euler step to sigma_down, then noise."""

    a1111_name = "Euler a"

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], o.eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise.randn() * o.s_noise * sigma_up
        return x, {}


class KDPM2AncestralScheduler(KDiffusionScheduler):
    """A1111 "DPM2 a": a DPM-Solver-2 step to sigma_down (two model calls), then noise; drops the next-to-last sigma."""

    a1111_name = "DPM2 a"
    default_schedule = "karras"
    discard_next_to_last_sigma = True

    def _second_sigma(self, sigmas, i, options):
        sigma_down, _ = ancestral_step(sigmas[i], sigmas[i + 1], options.eta)
        return log_lerp(sigmas[i], sigma_down) if sigma_down != 0 else None

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], o.eta)
        if stage == 0:
            d = to_d(x, sigmas[i], denoised)
            if sigma_down == 0:  # Euler to sigma 0
                return x + d * (sigma_down - sigmas[i]), {}
            return x + d * (log_lerp(sigmas[i], sigma_down) - sigmas[i]), {"carry": (x,)}
        (x_start,) = state.carry
        d_2 = to_d(x, log_lerp(sigmas[i], sigma_down), denoised)
        x = x_start + d_2 * (sigma_down - sigmas[i])
        return x + noise.randn() * o.s_noise * sigma_up, {"carry": ()}


class KDPMPP2SAncestralScheduler(KDiffusionScheduler):
    """A1111 "DPM++ 2S a": a single-step DPM-Solver++(2S) to sigma_down (two model calls), then noise."""

    a1111_name = "DPM++ 2S a"
    default_schedule = "karras"

    @staticmethod
    def _times(sigmas, i, eta):
        """(t, t_next, s, h) of step i: DPM-Solver times of sigma_i, sigma_down and their midpoint."""
        sigma_down, _ = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        t, t_next = t_fn(sigmas[i]), t_fn(sigma_down)
        h = t_next - t
        return t, t_next, t + 1 / 2 * h, h

    def _second_sigma(self, sigmas, i, options):
        if ancestral_step(sigmas[i], sigmas[i + 1], options.eta)[0] == 0:
            return None
        return sigma_fn(self._times(sigmas, i, options.eta)[2])

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        o = state.options
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], o.eta)
        if stage == 0 and sigma_down == 0:  # Euler to sigma 0
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        elif stage == 0:
            t, _, s, h = self._times(sigmas, i, o.eta)
            x_2 = (sigma_fn(s) / sigma_fn(t)) * x - (-h * (1 / 2)).expm1() * denoised
            return x_2, {"carry": (x,)}
        else:
            (x_start,) = state.carry
            t, t_next, _, h = self._times(sigmas, i, o.eta)
            x = (sigma_fn(t_next) / sigma_fn(t)) * x_start - (-h).expm1() * denoised
        if sigmas[i + 1] > 0:
            x = x + noise.randn() * o.s_noise * sigma_up
        return x, {"carry": ()}
