"""Linear multistep sampling in sigma (k-diffusion `sample_lms`; Karras et al. 2022, arXiv 2206.00364).

| code        | meaning                                                         |
| ----------- | --------------------------------------------------------------- |
| sigma       | sigma_i, noise level of the current sample                      |
| d           | dx/dsigma = (x - x0) / sigma at this and up to 3 past steps     |
| coeffs      | integrals of the Lagrange basis over [sigma_i, sigma_{i+1}]     |
"""

from dataclasses import dataclass

from ..configuration import check_number, choice
from . import schedules as S
from .base import SchedulerConfig, SchedulerOutput, SigmaScheduler


def lms_coefficient(sigmas, order, i, j):
    """Integral over [sigma_i, sigma_{i+1}] of node sigma_{i-j}'s Lagrange basis (linear multistep)."""
    from scipy import integrate

    sigmas = sigmas.numpy()  # float32 scalars: the reference integrates in float32 too

    def basis(tau):
        prod = 1.0
        for k in range(order):
            if k != j:
                prod *= (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k])
        return prod

    return integrate.quad(basis, sigmas[i], sigmas[i + 1], epsrel=1e-4)[0]


@dataclass(frozen=True)
class LMSConfig(SchedulerConfig):
    timestep_spacing: str = choice("linspace", S.TIMESTEP_SPACINGS)
    use_karras_sigmas: bool = False  # Karras et al. rho=7 sigma spacing


@dataclass(frozen=True)
class LMSOptions:
    order: int = 4  # how many past derivatives the multistep uses (the reference's default, 4)

    def __post_init__(self):
        check_number("LMSDiscreteScheduler", "order", self.order, low=1, high=4, integer=True)


class LMSDiscreteScheduler(SigmaScheduler):
    """Up to 4th-order linear multistep on dx/dsigma; deterministic; ``order`` is a run option."""

    config_class = LMSConfig
    options_class = LMSOptions
    _fixed = {"use_exponential_sigmas": (False,), "use_beta_sigmas": (False,)}

    def step(self, model_output, timestep, sample, state, generator=None):
        """One LMS step from sigma_i to sigma_{i+1} using up to ``state.options.order`` derivatives."""
        i = self._check_timestep(timestep, state)
        sigma = state.sigmas[i]

        # 1. denoised estimate and the derivative dx/dsigma
        x0 = S.ve_prediction_to_x0(model_output, sample, sigma, self._cfg.prediction_type)
        d = (sample - x0) / sigma
        order = state.options.order
        history = (state.history + (d,))[-order:]

        # 2. multistep coefficients (the order grows with the step index, like the reference)
        order = min(i + 1, order)
        coeffs = [lms_coefficient(state.sigmas, order, i, j) for j in range(order)]

        # 3. x_{i+1} = x_i + sum_j c_j d_{i-j}
        prev_sample = sample + sum(c * d_j for c, d_j in zip(coeffs, reversed(history)))
        return SchedulerOutput(prev_sample, x0, self._advance(state, history=history))
