"""Linear multistep sampling in sigma (k-diffusion `sample_lms`; Karras et al. 2022, arXiv 2206.00364).

| code        | meaning                                                         |
| ----------- | --------------------------------------------------------------- |
| sigma       | sigma_i, noise level of the current sample                      |
| d           | dx/dsigma = (x - x0) / sigma at this and up to 3 past steps     |
| coeffs      | integrals of the Lagrange basis over [sigma_i, sigma_{i+1}]     |
"""

from . import schedules as S
from .base import SchedulerOutput, SigmaScheduler


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


class LMSDiscreteScheduler(SigmaScheduler):
    """Up to 4th-order linear multistep on dx/dsigma; deterministic."""

    _fixed_options = {"use_exponential_sigmas": (False,), "use_beta_sigmas": (False,)}

    def __init__(
        self,
        num_train_timesteps: int = 1000,  # length of the training noise schedule
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",  # linear | scaled_linear | squaredcos_cap_v2 | sigmoid
        trained_betas: list | None = None,  # explicit betas, overriding the schedule
        use_karras_sigmas: bool = False,  # Karras et al. rho=7 sigma spacing
        prediction_type: str = "epsilon",  # epsilon | v_prediction | sample
        timestep_spacing: str = "linspace",  # linspace | leading | trailing
        steps_offset: int = 0,  # added to "leading" timesteps
    ):
        self._init_config(locals())
        self.alphas_cumprod = S.make_alphas_cumprod(self._config)
        self._freeze()

    def step(self, model_output, timestep, sample, state, generator=None, order=4):
        """One LMS step from sigma_i to sigma_{i+1} using up to ``order`` derivatives.

        Deterministic: ``generator`` is accepted (and unused) so every sampler takes the same call.
        """
        i = self._check_timestep(timestep, state)
        sigma = state.sigmas[i]

        # 1. denoised estimate and the derivative dx/dsigma
        x0 = S.ve_prediction_to_x0(model_output, sample, sigma, self._config["prediction_type"])
        d = (sample - x0) / sigma
        history = (state.history + (d,))[-order:]

        # 2. multistep coefficients (the order grows with the step index, like the reference)
        order = min(i + 1, order)
        coeffs = [lms_coefficient(state.sigmas, order, i, j) for j in range(order)]

        # 3. x_{i+1} = x_i + sum_j c_j d_{i-j}
        prev_sample = sample + sum(c * d_j for c, d_j in zip(coeffs, reversed(history)))
        return SchedulerOutput(prev_sample, x0, self._advance(state, history=history))
