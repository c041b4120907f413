"""A1111's "UniPC": the unified predictor-corrector multistep solver (Zhao et al. 2023, arXiv
2302.04867) as A1111 1.10 runs it (``modules/models/diffusion/uni_pc``, ``sd_samplers_timesteps_impl``):
data prediction, B(h) = h ("bh1") or e^h - 1 ("bh2"), order 3 with lower orders at the start and
the end, on DPM-Solver's continuous-time view of the discrete VP schedule (t in (0, 1], log
alpha_t piecewise linear between training steps), the model called at (t - 1/T) * 1000.

Each model call but the first evaluates the predictor's x_t; the step then corrects x_t with
that evaluation and predicts the next one. As in A1111, the run has one step per A1111 timestep
(1, 1 + T // n, ...: n of them, or one more when T // n does not divide T), one model call each.

| code              | paper                                                       |
| ----------------- | ----------------------------------------------------------- |
| t, times          | continuous times t_0 > ... > t_n                            |
| lam, h            | lambda_t = log alpha_t - log sigma_t; h = lambda_t - lambda_prev |
| models            | the data predictions x0(x_{t_i}) of the last ``order`` points |
| rks, D1s          | r_k = (lambda_{t_{i-k}} - lambda_prev) / h and the divided differences |
| R, b              | the order conditions R rho = b (Zhao et al. 2023, Alg. 1)   |
| rhos_p, rhos_c    | predictor and corrector coefficients                        |
"""

from dataclasses import dataclass

import torch

from ..configuration import choice
from .a1111_timesteps import TimestepConfig, TimestepScheduler
from .base import NoOptions, SchedulerOutput, SchedulerState


def interpolate(x, xp, yp):
    """Piecewise-linear y(x) through (xp, yp), extended linearly beyond the ends (DPM-Solver's interpolate_fn)."""
    K = xp.shape[0]
    start = (torch.searchsorted(xp, x.contiguous(), side="left") - 1).clamp(0, K - 2)
    start_x, end_x, start_y, end_y = xp[start], xp[start + 1], yp[start], yp[start + 1]
    return start_y + (x - start_x) * (end_y - start_y) / (end_x - start_x)


class DiscreteVP:
    """A discrete VP schedule in continuous time (DPM-Solver's NoiseScheduleVP("discrete"), Lu et al. 2022)."""

    def __init__(self, alphas_cumprod):
        self.log_alpha = 0.5 * torch.log(alphas_cumprod)
        self.total_N = len(self.log_alpha)
        self.t_array = torch.linspace(0.0, 1.0, self.total_N + 1)[1:]

    def log_mean(self, t):
        return interpolate(t, self.t_array, self.log_alpha)

    def alpha(self, t):
        return torch.exp(self.log_mean(t))

    def std(self, t):
        return torch.sqrt(1.0 - torch.exp(2.0 * self.log_mean(t)))

    def lam(self, t):
        log_mean = self.log_mean(t)
        return log_mean - 0.5 * torch.log(1.0 - torch.exp(2.0 * log_mean))

    def inverse_lambda(self, lam):
        log_alpha = -0.5 * torch.logaddexp(torch.zeros((1,)), -2.0 * lam)
        return interpolate(log_alpha, torch.flip(self.log_alpha, [0]), torch.flip(self.t_array, [0]))


@dataclass(frozen=True)
class UniPCConfig(TimestepConfig):
    unipc_variant: str = choice("bh1", ("bh1", "bh2"))  # A1111's "UniPC variant" (vary_coeff: not in sdkit)
    unipc_skip_type: str = choice("time_uniform", ("time_uniform", "time_quadratic", "logSNR"))  # "UniPC skip type"
    unipc_order: int = 3  # "UniPC order": must be below the number of steps
    unipc_lower_order_final: bool = True  # "UniPC lower order final"


@dataclass(frozen=True)
class UniPCState(SchedulerState):
    times: torch.Tensor | None = None  # (n + 1,) the continuous times t_0 > ... > t_n
    carry: tuple = ()  # the corrected x of the previous point


class A1111UniPCScheduler(TimestepScheduler):
    """A1111 "UniPC": predictor-corrector multistep on the data prediction; deterministic."""

    a1111_name = "UniPC"
    config_class = UniPCConfig
    options_class = NoOptions

    def _setup(self, cfg):
        super()._setup(cfg)
        self.vp = DiscreteVP(self.alphas_cumprod)

    def _times(self, t_T, n):
        """n + 1 continuous times from t_T down to 1/T by the skip type (UniPC.get_time_steps)."""
        t_0, kind = 1.0 / self.vp.total_N, self._cfg.unipc_skip_type
        if kind == "logSNR":
            lam_T, lam_0 = self.vp.lam(torch.tensor(t_T).reshape(1)), self.vp.lam(torch.tensor(t_0).reshape(1))
            return self.vp.inverse_lambda(torch.linspace(lam_T.item(), lam_0.item(), n + 1))
        if kind == "time_quadratic":
            return torch.linspace(t_T ** (1.0 / 2), t_0 ** (1.0 / 2), n + 1).pow(2)
        return torch.linspace(t_T, t_0, n + 1)

    def set_timesteps(self, num_inference_steps, device=None, strength=1.0, **options):
        """Model calls at (t_k - 1/T) * 1000 for k < n; img2img starts at A1111's t_enc-th timestep."""
        run_options = self._checked_run(num_inference_steps, strength, options)
        timesteps, t_T = self.a1111_timesteps(num_inference_steps), 1.0
        start = timesteps[-1:]
        if strength != 1.0:
            t_enc = int(min(strength, 0.999) * num_inference_steps)
            timesteps, start = timesteps[:t_enc], timesteps[t_enc:t_enc + 1]
            t_T = timesteps[-1] / 1000 + 1 / 1000 if len(timesteps) else 1.0
        n = len(timesteps)
        if n < max(self._cfg.unipc_order, 1):
            raise ValueError(f"UniPC order {self._cfg.unipc_order} must not exceed the number of sampling steps "
                             f"({n} here); use more steps or strength, or a lower unipc_order.")
        times = self._times(t_T, n)
        schedule = torch.stack([(t - 1.0 / self.vp.total_N) * 1000.0 for t in times[:-1]])
        return UniPCState(
            timesteps=schedule.to(device), latent_timestep=start.to(device), init_noise_sigma=1.0,
            num_inference_steps=num_inference_steps, schedule=schedule, step_index=0, options=run_options,
            times=times,
        )

    def _order(self, k, n):
        """The order of the update to the k-th point (UniPC.sample, multistep)."""
        order = self._cfg.unipc_order
        if k < order:
            return k
        return min(order, n + 1 - k) if self._cfg.unipc_lower_order_final else order

    def step(self, model_output, timestep, sample, state, generator=None):
        """Correct this point with the model's value at it, then predict the next (the last one uncorrected)."""
        k = self._check_timestep(timestep, state)
        times, n, B = state.times, len(state.times) - 1, sample.shape[0]
        t = times[k].expand(B)
        model_x = self._data_prediction(sample, self._eps(model_output, sample, timestep), t)
        if k == 0:
            x, models, ts = sample, (model_x,), (t,)
        else:
            (x_prev,), (models, ts) = state.carry, state.history
            x = self._update(x_prev, models, ts, t, self._order(k, n), model_t=model_x)
            keep = models if k < self._cfg.unipc_order else models[1:]
            models, ts = keep + (model_x,), (ts if k < self._cfg.unipc_order else ts[1:]) + (t,)
        x_next = self._update(x, models, ts, times[k + 1].expand(B), self._order(k + 1, n))
        return SchedulerOutput(x_next, model_x, self._advance(state, carry=(x,), history=(models, ts)))

    def _data_prediction(self, x, eps, t):
        """x0 = (x - sigma_t eps) / alpha_t."""
        return (x - self.vp.std(t)[:, None, None, None] * eps) / self.vp.alpha(t)[:, None, None, None]

    def _update(self, x, models, ts, t, order, model_t=None):
        """UniPC's B(h) update from the previous points to t: the predictor, or with ``model_t`` the corrector."""
        vp = self.vp
        lam_prev_0, lam_t = vp.lam(ts[-1]), vp.lam(t)
        model_prev_0 = models[-1]
        sigma_prev_0, sigma_t, alpha_t = vp.std(ts[-1]), vp.std(t), torch.exp(vp.log_mean(t))
        h = lam_t - lam_prev_0

        # 1. ratios r_k and divided differences D1_k of the earlier points
        rks, D1s = [], []
        for i in range(1, order):
            rk = ((vp.lam(ts[-(i + 1)]) - lam_prev_0) / h)[0]
            rks.append(rk)
            D1s.append((models[-(i + 1)] - model_prev_0) / rk)
        rks = torch.tensor(rks + [1.0])

        # 2. the order conditions R rho = b with B(h) = h or e^h - 1 (Zhao et al. 2023, eqs. 8-9)
        hh = -h[0]
        h_phi_1 = torch.expm1(hh)
        h_phi_k, factorial_i = h_phi_1 / hh - 1, 1
        B_h = hh if self._cfg.unipc_variant == "bh1" else torch.expm1(hh)
        R, b = [], []
        for i in range(1, order + 1):
            R.append(torch.pow(rks, i - 1))
            b.append(h_phi_k * factorial_i / B_h)
            factorial_i *= i + 1
            h_phi_k = h_phi_k / hh - 1 / factorial_i
        R, b = torch.stack(R), torch.tensor(b)
        D1s = torch.stack(D1s, dim=1) if D1s else None  # (B, K, C, H, W)

        # 3. the predictor, or the corrector with the model's value at t
        x_t_ = (sigma_t / sigma_prev_0)[:, None, None, None] * x \
            - (alpha_t * h_phi_1)[:, None, None, None] * model_prev_0
        scale = (alpha_t * B_h)[:, None, None, None]
        if model_t is None:
            pred_res = 0
            if D1s is not None:
                rhos_p = torch.tensor([0.5]) if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1])
                pred_res = torch.einsum("k,bkchw->bchw", rhos_p.to(D1s.dtype), D1s)
            return x_t_ - scale * pred_res
        rhos_c = torch.tensor([0.5]) if order == 1 else torch.linalg.solve(R, b)
        corr_res = torch.einsum("k,bkchw->bchw", rhos_c[:-1].to(D1s.dtype), D1s) if D1s is not None else 0
        return x_t_ - scale * (corr_res + rhos_c[-1] * (model_t - model_prev_0))
