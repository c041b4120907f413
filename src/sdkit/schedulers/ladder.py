"""What A1111's k-diffusion samplers share: the model's VP schedule seen as VE sigmas, A1111's
sigma schedules, the denoiser wrapper, and a run state that lists every model call.

A1111 1.10 drives k-diffusion (Karras et al. 2022, arXiv 2206.00364) like this
(``modules/sd_samplers_kdiffusion.py``): the model's alpha_bar (float64 product, kept as float32;
"Zero Terminal SNR" and "Downcast alphas_cumprod" applied) gives the sigma ladder; a schedule type
picks the run's sigmas from it (the sampler's default when "Automatic"); DPM2, DPM2 a and DPM++ 3M
SDE drop the next-to-last sigma; the start is noise * sigma_max; the UNet sees x / sqrt(sigma^2 + 1)
at the continuous timestep of sigma (log-sigma interpolation); epsilon models are denoised as
x - sigma eps, v models as c_skip x + c_out v (k-diffusion's CompVisDenoiser / CompVisVDenoiser).

Each sampler lists its model calls in the state (``calls``: ladder step and stage; ``call_sigmas``),
so Heun, DPM2, DPM++ 2S a and DPM++ SDE, which call the model twice a step, run through the one
denoising loop. Noise comes from the ``generator`` of ``step``: a torch generator (or a list), or
an A1111 :class:`~sdkit.noise.SeedNoise` that draws as A1111 does.

| code          | meaning                                                          |
| ------------- | ---------------------------------------------------------------- |
| sigmas        | the run's noise levels, k-diffusion's ``sigmas`` (float32, CPU)  |
| i             | the ladder step: from sigmas[i] to sigmas[i + 1]                 |
| x, denoised   | the VE sample and D(x; sigma), the model's estimate of x0        |
| d             | dx/dsigma = (x - denoised) / sigma                               |
| t             | -log sigma (DPM-Solver's time) or the model's timestep, by context |
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..configuration import check_number, choice
from ..noise import BrownianNoise, SeedNoise
from . import schedules as S
from . import sigma_schedules as K
from .base import Scheduler, SchedulerOutput, SchedulerState, ZeroSNRConfig

ZERO_SNR_LAST_ALPHA_BAR = 4.8973451890853435e-08  # A1111's last alpha_bar under "Zero Terminal SNR"


@dataclass(frozen=True)
class KConfig(ZeroSNRConfig):
    """The model's schedule keys, and A1111's sampling settings (infotext names in quotes)."""

    prediction_type: str = choice("epsilon", ("epsilon", "v_prediction"))  # CompVisDenoiser or the v one
    schedule_type: str = choice("automatic", K.SCHEDULE_TYPES)  # "Schedule type"; automatic: the sampler's
    rho: float | None = None  # "Schedule rho" (None: 7 for karras, 1 for polyexponential)
    sigma_min: float | None = None  # "Schedule min sigma" (None: the model's)
    sigma_max: float | None = None  # "Schedule max sigma" (None: the model's)
    beta_alpha: float = 0.6  # "Beta schedule alpha"
    beta_beta: float = 0.6  # "Beta schedule beta"
    discard_penultimate_sigma: bool = False  # "Discard penultimate sigma" for every sampler
    quantize: bool = False  # A1111's "Enable quantization in K samplers": the nearest training timestep
    sgm_noise_multiplier: bool = False  # "SGM noise multiplier": start at noise * sqrt(1 + sigma_max^2)
    downcast_alphas_cumprod: bool = False  # "Downcast alphas_cumprod": alpha_bar in float16 (A1111 < 1.7)


@dataclass(frozen=True)
class ChurnOptions:
    """Karras et al. 2022 Alg. 2's stochasticity (A1111's "Sigma churn / tmin / tmax / noise")."""

    s_churn: float = 0.0  # total churn; each step's gamma is min(s_churn / steps, sqrt 2 - 1)
    s_tmin: float = 0.0  # churn only at sigmas in [s_tmin, s_tmax]
    s_tmax: float = float("inf")
    s_noise: float = 1.0  # scale of the churn noise

    def __post_init__(self):
        for name in ("s_churn", "s_tmin", "s_noise"):
            check_number("sampler", name, getattr(self, name), low=0)
        if not (isinstance(self.s_tmax, (int, float)) and not isinstance(self.s_tmax, bool) and self.s_tmax >= 0):
            raise ValueError(f"sampler: s_tmax must be a number >= 0 (inf: no limit), got {self.s_tmax!r}.")


@dataclass(frozen=True)
class NoiseOptions:
    """The ancestral and SDE samplers' noise (A1111's "Eta" and "Sigma noise")."""

    eta: float = 1.0  # 0: the ODE, 1: full ancestral / SDE noise
    s_noise: float = 1.0  # scale of the added noise

    def __post_init__(self):
        check_number("sampler", "eta", self.eta, low=0)
        check_number("sampler", "s_noise", self.s_noise, low=0)


@dataclass(frozen=True)
class KState(SchedulerState):
    """A run of a k-diffusion sampler: its sigmas and every model call (ladder step, stage, sigma)."""

    ladder: torch.Tensor | None = None  # the run's sigmas (float32), k-diffusion's ``sigmas``
    calls: tuple = ()  # (i, stage) of each model call, in order
    call_sigmas: torch.Tensor | None = None  # (calls,) float32 sigma of each call
    sigma_range: tuple = ()  # (sigma_min, sigma_max) of the whole schedule: the Brownian noise's span
    carry: tuple = ()  # what a step's first model call leaves for its second
    brownian: Any = None  # the run's Brownian noise, made at its first draw


def ldm_alphas_cumprod(config):
    """alpha_bar as CompVis LDM builds it (float64 betas and product, stored as float32), with A1111's overrides.

    "Downcast alphas_cumprod" rounds it to float16; "Zero Terminal SNR" (the config's
    rescale_betas_zero_snr) rescales sqrt(alpha_bar) to end at 0 (Lin et al. 2023, arXiv 2305.08891,
    Alg. 1) and sets the last alpha_bar to 4.897e-8, as A1111's sd_models.py does.
    """
    n = config.num_train_timesteps
    if config.trained_betas is None and config.beta_schedule == "linear":
        betas = torch.linspace(config.beta_start, config.beta_end, n, dtype=torch.float64)
    elif config.trained_betas is None and config.beta_schedule == "scaled_linear":
        betas = torch.linspace(config.beta_start**0.5, config.beta_end**0.5, n, dtype=torch.float64) ** 2
    else:
        betas = S.make_betas(config.beta_schedule, n, config.beta_start, config.beta_end,
                             config.trained_betas).double()
    alphas_cumprod = torch.tensor(np.cumprod(1.0 - betas.numpy(), axis=0), dtype=torch.float32)
    if config.downcast_alphas_cumprod:
        alphas_cumprod = alphas_cumprod.half()
    if config.rescale_betas_zero_snr:
        sqrt_alpha_bar = alphas_cumprod.sqrt()
        first, last = sqrt_alpha_bar[0].clone(), sqrt_alpha_bar[-1].clone()
        sqrt_alpha_bar = (sqrt_alpha_bar - last) * (first / (first - last))
        alphas_cumprod = sqrt_alpha_bar**2
        alphas_cumprod[-1] = ZERO_SNR_LAST_ALPHA_BAR
    return alphas_cumprod


def sigma_fn(t):
    """sigma = exp(-t) for DPM-Solver's time t = -log sigma (Lu et al. 2022, arXiv 2211.01095)."""
    return t.neg().exp()


def t_fn(sigma):
    return sigma.log().neg()


def to_d(x, sigma, denoised):
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta=1.0):
    """(sigma_down, sigma_up): an ODE step to sigma_down plus fresh noise of std sigma_up (k-diffusion)."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


class KDiffusionScheduler(Scheduler):
    """Base of A1111's k-diffusion samplers. A subclass lists its model calls (``_calls``) and steps (``_step``)."""

    config_class = KConfig
    options_class = NoiseOptions
    a1111_name = None  # the sampler's name in A1111
    default_schedule = None  # A1111's schedule for "Automatic" (None: the model's own ladder, Uniform)
    discard_next_to_last_sigma = False  # A1111 drops the next-to-last sigma for this sampler
    ladder_class = K.Ladder

    def _setup(self, cfg):
        self.alphas_cumprod = ldm_alphas_cumprod(cfg)
        self.ladder = self.ladder_class(self.alphas_cumprod, cfg.quantize)

    # ---------------------------------------------------------------- the run's sigmas
    @property
    def schedule_name(self):
        """The schedule this sampler runs: the config's, or for "automatic" the sampler's default (or uniform)."""
        name = self._cfg.schedule_type
        return (self.default_schedule or "uniform") if name == "automatic" else name

    @property
    def schedule_label(self):
        """A1111's "Schedule type" infotext value: "Automatic" unless a schedule function was used."""
        c = self._cfg
        if c.schedule_type == "automatic" and self.default_schedule is None:
            return "Automatic"
        return K.SCHEDULE_LABELS[self.schedule_name]

    def sigmas(self, num_inference_steps):
        """The float32 sigmas of a run of n steps, as A1111's KDiffusionSampler.get_sigmas makes them."""
        c, n = self._cfg, num_inference_steps
        discard = self.discard_next_to_last_sigma or c.discard_penultimate_sigma
        n += 1 if discard else 0
        if c.schedule_type == "automatic" and self.default_schedule is None:
            sigmas = self.ladder.get_sigmas(n)
        else:
            name = self.schedule_name
            model_min, model_max = self.ladder.sigma_min.item(), self.ladder.sigma_max.item()
            kwargs = {"sigma_min": c.sigma_min or model_min, "sigma_max": c.sigma_max or model_max,
                      "ladder": self.ladder, "alpha": c.beta_alpha, "beta": c.beta_beta}
            if name in K.DEFAULT_RHO and c.rho:
                kwargs["rho"] = c.rho
            sigmas = K.SCHEDULES[name](n, **kwargs)
        if discard:
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        return sigmas.float() if sigmas.dtype == torch.float16 else sigmas

    @staticmethod
    def start_index(num_inference_steps, strength):
        """The ladder step img2img starts at: A1111 runs int(min(strength, 0.999) * n) + 1 of the n steps."""
        if strength == 1.0:
            return 0
        return num_inference_steps - int(min(strength, 0.999) * num_inference_steps) - 1

    def set_timesteps(self, num_inference_steps, device=None, strength=1.0, **options):
        """The state of a run: the sigmas (from ``start_index`` for img2img) and every model call's timestep."""
        run_options = self._checked_run(num_inference_steps, strength, options)
        sigmas = self.sigmas(num_inference_steps)
        ladder = sigmas[self.start_index(num_inference_steps, strength):]
        if len(ladder) < 2:
            raise ValueError(f"strength={strength} leaves no step of {num_inference_steps}; raise strength or steps.")
        calls = self._calls(ladder, run_options)
        call_sigmas = torch.stack([torch.as_tensor(sigma, dtype=torch.float32) for _, _, sigma in calls])
        schedule = self.ladder.sigma_to_t(call_sigmas)
        timesteps = schedule.to(device)
        positive = sigmas[sigmas > 0]
        return KState(
            timesteps=timesteps, latent_timestep=timesteps[:1], init_noise_sigma=self._start_scale(ladder[0]),
            num_inference_steps=num_inference_steps, schedule=schedule, step_index=0, options=run_options,
            ladder=ladder, calls=tuple((i, stage) for i, stage, _ in calls), call_sigmas=call_sigmas,
            sigma_range=(positive.min(), sigmas.max()),
        )

    def _start_scale(self, sigma_max):
        """x = noise * sigma_max (A1111), or noise * sqrt(1 + sigma_max^2) with the SGM noise multiplier."""
        return torch.sqrt(1.0 + sigma_max**2.0) if self._cfg.sgm_noise_multiplier else sigma_max

    def _calls(self, sigmas, options):
        """[(i, stage, sigma)] of the model calls: one at ``_first_sigma`` a step, a second at ``_second_sigma``."""
        calls = []
        for i in range(len(sigmas) - 1):
            calls.append((i, 0, self._first_sigma(sigmas, i, options)))
            second = self._second_sigma(sigmas, i, options)
            if second is not None:
                calls.append((i, 1, second))
        return calls

    def _first_sigma(self, sigmas, i, options):
        """The sigma of step i's first model call."""
        return sigmas[i]

    def _second_sigma(self, sigmas, i, options):
        """The sigma of step i's second model call, or None for a one-call step."""
        return None

    # ---------------------------------------------------------------- the model and a step
    def scale_model_input(self, sample, timestep, state):
        """x / sqrt(sigma^2 + 1) at this call's sigma (k-diffusion's c_in)."""
        sigma = state.call_sigmas[state.step_index]
        return sample * (1 / (sigma**2 + 1.0) ** 0.5)

    def denoise(self, model_output, x, sigma):
        """D(x; sigma) from the model's eps (x - sigma eps) or v (c_skip x + c_out v), k-diffusion's wrappers."""
        if self._cfg.prediction_type == "v_prediction":
            c_skip = 1.0 / (sigma**2 + 1.0)
            c_out = -sigma * 1.0 / (sigma**2 + 1.0) ** 0.5
            return model_output * c_out + x * c_skip
        return x + model_output * -sigma

    def step(self, model_output, timestep, sample, state, generator=None):
        """One model call's worth of the sampler: ``_step`` with the denoised estimate at this call's sigma."""
        k = self._check_timestep(timestep, state)
        i, stage = state.calls[k]
        denoised = self.denoise(model_output, sample, state.call_sigmas[k])
        noise = _Noise(self, state, generator, sample)
        prev_sample, changes = self._step(sample, denoised, i, stage, state.ladder, state, noise)
        if noise.brownian is not state.brownian:
            changes = {**changes, "brownian": noise.brownian}
        return SchedulerOutput(prev_sample, denoised, self._advance(state, **changes))

    def _step(self, x, denoised, i, stage, sigmas, state, noise):
        """(next sample, state changes) for call ``stage`` of ladder step ``i``."""
        raise NotImplementedError

    # ---------------------------------------------------------------- img2img noising
    def add_noise(self, original_samples, noise, timesteps, state=None):
        """x = x0 + sigma * noise, sigma the noise level of the state's call at ``timesteps`` (img2img, inpaint)."""
        if state is None:
            return super().add_noise(original_samples, noise, timesteps)
        sigma = self._sigma_of(timesteps, state)
        return original_samples + noise * S.per_sample(sigma, original_samples).to(original_samples.dtype)

    def _sigma_of(self, timesteps, state):
        """Each timestep's noise level: the sigma of the state's model call at that timestep."""
        return torch.stack([self._call_sigma(self._call_index(t, state), state)
                            for t in torch.as_tensor(timesteps).flatten().cpu()])

    def _call_index(self, t, state):
        found = (state.schedule == t).nonzero()
        if len(found) == 0:
            raise ValueError(f"{type(self).__name__}.add_noise: timestep {t.item()} is not in the state's "
                             "schedule; pass timesteps from state.timesteps (or no state for training).")
        return found[0].item()

    def _call_sigma(self, k, state):
        return state.call_sigmas[k]


class _Noise:
    """The noise a step draws: fresh normal noise, or the run's Brownian noise (made at its first use)."""

    def __init__(self, scheduler, state, generator, like):
        self.scheduler, self.state, self.generator, self.like = scheduler, state, generator, like
        self.brownian = state.brownian

    def randn(self):
        """Standard normal noise like the sample (A1111: each image's next draw)."""
        x = self.like
        return S.randn(x.shape, self.generator, x.device, x.dtype)

    def between(self, sigma, sigma_next):
        """Brownian-tree noise for the step from sigma to sigma_next, one path per image (A1111)."""
        if self.brownian is None:
            self.brownian = make_brownian(self.state.sigma_range, self.generator, self.like)
        return self.brownian(sigma, sigma_next)


def make_brownian(sigma_range, generator, like):
    """A run's Brownian noise: seeded per image by A1111 seeds, else from the torch generator(s) like k-diffusion."""
    sigma_min, sigma_max = sigma_range
    if isinstance(generator, SeedNoise):
        return generator.brownian(sigma_min, sigma_max, like)
    generators = list(generator) if isinstance(generator, (list, tuple)) else [generator]
    entropies = [torch.randint(0, 2**63 - 1, [], generator=g).item() for g in generators]
    batched = isinstance(generator, (list, tuple))
    shape = tuple(like.shape[1:]) if batched else tuple(like.shape)

    def randn(seed):
        g = torch.Generator(like.device).manual_seed(int(seed))
        return torch.randn(shape, generator=g, device=like.device, dtype=like.dtype)

    return BrownianNoise(sigma_min, sigma_max, entropies, randn, batched)


def churn(sigmas, i, options):
    """(gamma, sigma_hat) of step i: sigma raised by the churn (Karras et al. 2022, Alg. 2, lines 4-5)."""
    o = options
    gamma = min(o.s_churn / (len(sigmas) - 1), 2**0.5 - 1) if o.s_tmin <= sigmas[i] <= o.s_tmax else 0.0
    return gamma, sigmas[i] * (gamma + 1)


class ChurnScheduler(KDiffusionScheduler):
    """Base of Euler, Heun and DPM2: each step first raises sigma by the churn, adding noise to match.

    A1111's k-diffusion draws the churn noise before each step's model call (every step when
    s_churn > 0); here the previous step adds it at its end, and ``begin`` adds the first step's.
    """

    options_class = ChurnOptions

    def _first_sigma(self, sigmas, i, options):
        """sigma_hat: the step's sigma raised by the churn."""
        return churn(sigmas, i, options)[1]

    def _churned(self, x, sigmas, i, options, noise):
        """x raised from sigmas[i] to sigma_hat with fresh noise (drawn every step once s_churn > 0)."""
        if i >= len(sigmas) - 1 or not options.s_churn:
            return x
        eps = noise.randn() * options.s_noise
        gamma, sigma_hat = churn(sigmas, i, options)
        if gamma > 0:
            x = x + eps * (sigma_hat**2 - sigmas[i] ** 2) ** 0.5
        return x

    def _call_sigma(self, k, state):
        """sigmas[i] for a step's first call: the level before its churn (img2img starts there)."""
        i, stage = state.calls[k]
        return state.ladder[i] if stage == 0 else state.call_sigmas[k]

    def begin(self, sample, state, generator=None):
        """The first step's churn (A1111 adds it before the first model call)."""
        i, _ = state.calls[state.step_index]
        return self._churned(sample, state.ladder, i, state.options, _Noise(self, state, generator, sample))


def log_lerp(a, b):
    """exp(lerp(log a, log b, 1/2)): the geometric midpoint, as k-diffusion computes it."""
    return a.log().lerp(b.log(), 0.5).exp()


__all__ = ["KConfig", "KState", "ChurnOptions", "NoiseOptions", "KDiffusionScheduler", "ChurnScheduler",
           "ldm_alphas_cumprod", "sigma_fn", "t_fn", "to_d", "ancestral_step", "make_brownian", "log_lerp"]
