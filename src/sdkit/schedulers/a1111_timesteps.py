"""A1111's own DDIM and PLMS (``modules/sd_samplers_timesteps_impl.py``, A1111 1.6+), which differ
from the reference classes of the same names: the timesteps are 1, 1 + T // n, ..., the run makes
n - 1 model calls (from the last timestep down to the second; PLMS's first step makes two), and
v models are turned into eps before guidance. DDIM: Song et al. 2020, arXiv 2010.02502; PLMS: Liu
et al. 2022, arXiv 2202.09778.

| code           | paper                                                   |
| -------------- | ------------------------------------------------------- |
| a_t, a_prev    | alpha_bar at this call's timestep and the next lower one |
| e_t            | the model's eps at x_t                                  |
| sigma_t        | DDIM's sigma_t(eta), eq. 16                             |
| pred_x0        | the predicted x_0                                       |
| old_eps        | PLMS's past eps (up to 3)                               |
"""

from dataclasses import dataclass

import torch

from ..configuration import check_number, choice
from . import schedules as S
from . import sigma_schedules as K
from .base import NoOptions, Scheduler, SchedulerOutput, SchedulerState, ZeroSNRConfig
from .ladder import ldm_alphas_cumprod


@dataclass(frozen=True)
class TimestepConfig(ZeroSNRConfig):
    prediction_type: str = choice("epsilon", ("epsilon", "v_prediction"))
    schedule_type: str = choice("automatic", K.SCHEDULE_TYPES)  # written to the infotext; A1111's DDIM ignores it
    discard_penultimate_sigma: bool = False  # "Discard penultimate sigma": one timestep more
    downcast_alphas_cumprod: bool = False  # "Downcast alphas_cumprod" (A1111 < 1.7)


@dataclass(frozen=True)
class DDIMOptions:
    eta: float = 0.0  # A1111's "Eta DDIM": 0 deterministic

    def __post_init__(self):
        check_number("DDIM", "eta", self.eta, low=0)


@dataclass(frozen=True)
class TimestepState(SchedulerState):
    """A run of A1111's DDIM or PLMS: its timesteps and each model call's (index, stage)."""

    a1111_timesteps: torch.Tensor | None = None  # the run's timesteps, ascending (A1111's ``timesteps``)
    calls: tuple = ()  # (index into a1111_timesteps, stage) of each model call
    carry: tuple = ()  # PLMS's warm-up: x and eps of its first call


class TimestepScheduler(Scheduler):
    """Base of A1111's DDIM and PLMS: integer timesteps, the model called on x_t itself."""

    config_class = TimestepConfig
    a1111_name = None

    def _setup(self, cfg):
        self.alphas_cumprod = ldm_alphas_cumprod(cfg)

    @property
    def schedule_label(self):
        return K.SCHEDULE_LABELS[self._cfg.schedule_type]

    def a1111_timesteps(self, num_inference_steps):
        """clip(range(0, T, T // n) + 1, 0, T - 1): A1111's CompVisSampler.get_timesteps."""
        T, n = self._cfg.num_train_timesteps, num_inference_steps + (1 if self._cfg.discard_penultimate_sigma else 0)
        return torch.clip(torch.arange(0, T, T // n) + 1, 0, T - 1)

    def set_timesteps(self, num_inference_steps, device=None, strength=1.0, **options):
        """Calls at timesteps[-1], ..., timesteps[1]; img2img keeps timesteps[:t_enc], noised at timesteps[t_enc]."""
        run_options = self._checked_run(num_inference_steps, strength, options)
        timesteps = self.a1111_timesteps(num_inference_steps)
        start = timesteps[-1:]
        if strength != 1.0:
            t_enc = int(min(strength, 0.999) * num_inference_steps)
            timesteps, start = timesteps[:t_enc], timesteps[t_enc:t_enc + 1]
        if len(timesteps) < 2:
            raise ValueError(f"strength={strength} leaves no step of {num_inference_steps} (A1111's DDIM and PLMS "
                             "call the model at all but the first timestep); raise strength or steps.")
        calls = self._calls(len(timesteps))
        schedule = torch.stack([timesteps[self._call_index(index, stage)] for index, stage in calls]).float()
        return TimestepState(
            timesteps=schedule.to(device), latent_timestep=start.to(device), init_noise_sigma=1.0,
            num_inference_steps=num_inference_steps, schedule=schedule, step_index=0, options=run_options,
            a1111_timesteps=timesteps, calls=tuple(calls),
        )

    def _calls(self, count):
        """(index, stage) of each model call: one per index, from the last down to 1."""
        return [(index, 0) for index in range(count - 1, 0, -1)]

    @staticmethod
    def _call_index(index, stage):
        """The timestep index a call is made at (PLMS's second warm-up call: the next lower one)."""
        return index if stage == 0 else max(index - 1, 0)

    def _eps(self, model_output, x, t):
        """eps from the model output (v: sqrt(alpha_bar) v + sqrt(1 - alpha_bar) x_t, A1111's v denoiser)."""
        if self._cfg.prediction_type != "v_prediction":
            return model_output
        t = int(t)
        return self.alphas_cumprod.sqrt()[t] * model_output + (1 - self.alphas_cumprod).sqrt()[t] * x

    def _coefficients(self, timesteps, index, like):
        """(a_t, a_prev, sqrt(1 - a_t)) at a timestep index, as A1111 rounds them (float values times ones)."""
        alphas = self.alphas_cumprod[timesteps]
        alphas_prev = self.alphas_cumprod[torch.nn.functional.pad(timesteps[:-1], pad=(1, 0))].double()
        ones = like.new_ones(())
        a_t, a_prev = alphas[index].item(), alphas_prev[index].item()
        return a_t * ones, a_prev * ones, torch.sqrt(1 - alphas)[index].item() * ones, a_t, a_prev

    @staticmethod
    def _update(x, e_t, coefficients, sigma_t=0.0):
        """(x_prev, pred_x0): x_prev = sqrt(a_prev) x0 + sqrt(1 - a_prev - sigma_t^2) e_t (Song et al. 2020, eq. 12)."""
        a_t, a_prev, sqrt_one_minus_at = coefficients[:3]
        pred_x0 = (x - sqrt_one_minus_at * e_t) / a_t.sqrt()
        dir_xt = (1.0 - a_prev - sigma_t**2).sqrt() * e_t
        return a_prev.sqrt() * pred_x0 + dir_xt, pred_x0

    def step(self, model_output, timestep, sample, state, generator=None):
        """One model call: eps from the output, then the sampler's update for this call."""
        k = self._check_timestep(timestep, state)
        index, stage = state.calls[k]
        e_t = self._eps(model_output, sample, timestep)
        prev_sample, pred_x0, changes = self._step(sample, e_t, index, stage, state, generator)
        return SchedulerOutput(prev_sample, pred_x0, self._advance(state, **changes))


class A1111DDIMScheduler(TimestepScheduler):
    """A1111 "DDIM"; the run option ``eta`` (A1111's "Eta DDIM") adds the DDPM-like noise."""

    a1111_name = "DDIM"
    options_class = DDIMOptions

    def _step(self, x, e_t, index, stage, state, generator):
        coefficients = self._coefficients(state.a1111_timesteps, index, x)
        a_t, a_prev = coefficients[3:]
        sigma_t = state.options.eta * ((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)) ** 0.5 * x.new_ones(())
        x_prev, pred_x0 = self._update(x, e_t, coefficients, sigma_t)
        if state.options.eta:
            x_prev = x_prev + sigma_t * S.randn(x.shape, generator, x.device, x.dtype)
        return x_prev, pred_x0, {}


class A1111PLMSScheduler(TimestepScheduler):
    """A1111 "PLMS": a pseudo improved Euler step first (two model calls), then Adams-Bashforth on eps."""

    a1111_name = "PLMS"
    options_class = NoOptions

    def _calls(self, count):
        return [(count - 1, 0), (count - 1, 1)] + [(index, 0) for index in range(count - 2, 0, -1)]

    def _step(self, x, e_t, index, stage, state, generator):
        coefficients = self._coefficients(state.a1111_timesteps, index, x)
        old_eps = state.history
        if stage == 0 and not old_eps:  # the warm-up's first call: a DDIM step to the next timestep
            x_prev, pred_x0 = self._update(x, e_t, coefficients)
            return x_prev, pred_x0, {"carry": (x, e_t)}
        if stage == 1:  # its second call: the two eps averaged (pseudo improved Euler)
            (x, e_first), e_t_prime = state.carry, (state.carry[1] + e_t) / 2
            e_t = e_first
        elif len(old_eps) == 1:  # Adams-Bashforth, 2nd to 4th order (Liu et al. 2022, eq. 12)
            e_t_prime = (3 * e_t - old_eps[-1]) / 2
        elif len(old_eps) == 2:
            e_t_prime = (23 * e_t - 16 * old_eps[-1] + 5 * old_eps[-2]) / 12
        else:
            e_t_prime = (55 * e_t - 59 * old_eps[-1] + 37 * old_eps[-2] - 9 * old_eps[-3]) / 24
        x_prev, pred_x0 = self._update(x, e_t_prime, coefficients)
        return x_prev, pred_x0, {"history": (old_eps + (e_t,))[-3:], "carry": ()}
