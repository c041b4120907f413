"""Euler, Heun and DPM2 with churn (k-diffusion ``sample_euler``, ``sample_heun``, ``sample_dpm_2``;
Karras et al. 2022, arXiv 2206.00364, Alg. 2), as A1111 runs them.

| code        | paper                                                      |
| ----------- | ---------------------------------------------------------- |
| sigma_hat   | t-hat_i = t_i (1 + gamma_i), the churned noise level        |
| d, d_2      | d_i and d'_i, dx/dsigma at the step's start and its second point |
| sigma_mid   | DPM2's second point, the geometric mean of sigma_hat and sigma_{i+1} |
"""

from .ladder import ChurnScheduler, churn, log_lerp, to_d


class KEulerScheduler(ChurnScheduler):
    """A1111 "Euler": first-order probability-flow ODE steps, optional churn (run options s_churn, ...)."""

    a1111_name = "Euler"

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        _, sigma_hat = churn(sigmas, i, state.options)
        d = to_d(x, sigma_hat, denoised)
        x = x + d * (sigmas[i + 1] - sigma_hat)
        return self._churned(x, sigmas, i + 1, state.options, noise), {}


class KHeunScheduler(ChurnScheduler):
    """A1111 "Heun": Karras et al.'s second-order steps (two model calls, one at the last step)."""

    a1111_name = "Heun"

    def _second_sigma(self, sigmas, i, options):
        return sigmas[i + 1] if sigmas[i + 1] != 0 else None

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        _, sigma_hat = churn(sigmas, i, state.options)
        dt = sigmas[i + 1] - sigma_hat
        if stage == 0:
            d = to_d(x, sigma_hat, denoised)
            if sigmas[i + 1] == 0:  # Euler to sigma 0
                return x + d * dt, {}
            return x + d * dt, {"carry": (x, d)}
        x_start, d = state.carry
        d_2 = to_d(x, sigmas[i + 1], denoised)
        x = x_start + (d + d_2) / 2 * dt
        return self._churned(x, sigmas, i + 1, state.options, noise), {"carry": ()}


class KDPM2Scheduler(ChurnScheduler):
    """A1111 "DPM2": DPM-Solver-2 steps via the geometric midpoint; drops the next-to-last sigma."""

    a1111_name = "DPM2"
    default_schedule = "karras"
    discard_next_to_last_sigma = True

    def _second_sigma(self, sigmas, i, options):
        return log_lerp(self._first_sigma(sigmas, i, options), sigmas[i + 1]) if sigmas[i + 1] != 0 else None

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        _, sigma_hat = churn(sigmas, i, state.options)
        if stage == 0:
            d = to_d(x, sigma_hat, denoised)
            if sigmas[i + 1] == 0:  # Euler to sigma 0
                return x + d * (sigmas[i + 1] - sigma_hat), {}
            sigma_mid = log_lerp(sigma_hat, sigmas[i + 1])
            return x + d * (sigma_mid - sigma_hat), {"carry": (x,)}
        (x_start,) = state.carry
        sigma_mid = log_lerp(sigma_hat, sigmas[i + 1])
        d_2 = to_d(x, sigma_mid, denoised)
        x = x_start + d_2 * (sigmas[i + 1] - sigma_hat)
        return self._churned(x, sigmas, i + 1, state.options, noise), {"carry": ()}
