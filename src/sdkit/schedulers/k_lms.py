"""A1111 "LMS": linear multistep in sigma (k-diffusion ``sample_lms``; Karras et al. 2022, arXiv
2206.00364), with the run's own sigmas; the coefficients are those of the reference LMS class.

| code     | meaning                                                      |
| -------- | ------------------------------------------------------------ |
| d        | dx/dsigma at this and up to ``order - 1`` past steps         |
| coeffs   | integrals of the Lagrange basis over [sigma_i, sigma_{i+1}]  |
"""

from .ladder import KDiffusionScheduler, to_d
from .lms import LMSOptions, lms_coefficient


class KLMSScheduler(KDiffusionScheduler):
    """Up to 4th-order linear multistep on dx/dsigma; deterministic; ``order`` is a run option."""

    a1111_name = "LMS"
    options_class = LMSOptions

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        order = state.options.order
        history = (state.history + (to_d(x, sigmas[i], denoised),))[-order:]
        cur_order = min(i + 1, order)
        coeffs = [lms_coefficient(sigmas, cur_order, i, j) for j in range(cur_order)]
        return x + sum(c * d for c, d in zip(coeffs, reversed(history))), {"history": history}
