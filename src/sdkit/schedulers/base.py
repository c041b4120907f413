"""What every sdkit scheduler shares: a frozen config, run options, run state, output, config files.

A scheduler holds its settings (a frozen dataclass, ``config_class``, whose fields are the
reference's ``scheduler_config.json`` keys) and constant tensors (CPU, float32 like the reference),
and is never changed after construction. Every scheduler is used the same way:

    state = scheduler.set_timesteps(n, device=None, strength=1.0, **options)  # options: options_class
    sample = scheduler.begin(noise * state.init_noise_sigma, state, generator)
    out = scheduler.step(model_output, timestep, sample, state, generator=None)
    sample, state = out.prev_sample, out.state

Per-run options (DDIM's ``eta``, LMS's ``order``) travel in the state, so many runs, each with
its own options, can share one scheduler.
"""

import dataclasses
import json
import os
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .. import configuration
from ..configuration import choice
from ..files import atomic_write, read_json_object
from . import schedules as S

CONFIG_NAME = "scheduler_config.json"

MODEL_SCHEDULE_KEYS = {
    "rescale_betas_zero_snr": (False, "the model was trained on a zero-terminal-SNR schedule (Lin et al. 2024), "
                                      "whose last timestep is pure noise"),
}
"""Reference config keys that describe the noise schedule a model was trained on: key -> (the value
that changes nothing, what a non-neutral value means). ``from_config`` warns once per class and key
when a config sets one to another value and the class has no such setting, since the class then
samples another schedule than the model's (the key stays in its config, as in the reference)."""
_warned_dropped = set()
_warned_lock = threading.Lock()


def warn_dropped_keys(cls, unused):
    """Warn (once per class and key) about the ``MODEL_SCHEDULE_KEYS`` that ``cls.from_config`` cannot use."""
    for key, value in unused.items():
        if key not in MODEL_SCHEDULE_KEYS or value == MODEL_SCHEDULE_KEYS[key][0]:
            continue
        with _warned_lock:
            if (cls.__name__, key) in _warned_dropped:
                continue
            _warned_dropped.add((cls.__name__, key))
        from .registry import SCHEDULER_CLASSES

        having = sorted(name for name, c in SCHEDULER_CLASSES.items() if key in c.config_keys())
        warnings.warn(f"{cls.__name__} has no {key!r} setting, so the config's {key}={value!r} is not used: "
                      f"{MODEL_SCHEDULE_KEYS[key][1]}, and {cls.__name__} samples another schedule, which "
                      f"can give broken images (the reference does the same). Use one of {', '.join(having)} "
                      f"for this model.", stacklevel=3)


def carried_config(cls, values):
    """(carried keys, given fields) of a config read by ``cls``, the reference's way (ConfigMixin.from_config).

    Keys the config's own class filled with its defaults (``_use_default_values``) are left out, so
    ``cls`` uses its own defaults for them; keys ``cls`` has no setting for are kept ("carried") in
    its config, so a later swap sees them again (``PNDMScheduler.from_config(ddim.config)`` keeps the
    file's ``skip_prk_steps``).
    """
    defaults = _left_at_defaults(values)
    values = {k: v for k, v in values.items() if k not in defaults and k != "_use_default_values"}
    fields = set(cls.config_keys())
    carried = {k: configuration.plain(v) for k, v in values.items() if not k.startswith("_") and k not in fields}
    return values, carried, frozenset(k for k in values if k in fields)


def _left_at_defaults(values):
    """The keys of a config that its ``_use_default_values`` lists and that still hold its class's default.

    A listed key given another value since (``{**sch.config, "timestep_spacing": "trailing"}``) is
    kept, where the reference would drop it; for a class sdkit lacks, every listed key is dropped.
    """
    from .registry import get_scheduler_class

    listed = set(values.get("_use_default_values") or ())
    try:
        source = get_scheduler_class(values.get("_class_name"))
    except ValueError:
        return listed
    defaults = {f.name: configuration.plain(f.default) for f in dataclasses.fields(source.config_class)
                if f.default is not dataclasses.MISSING}
    return {k for k in listed if k not in defaults or defaults[k] == configuration.plain(values.get(k))}


@dataclass(frozen=True)
class SchedulerConfig:
    """The settings every scheduler has."""

    num_train_timesteps: int = 1000  # length of the training noise schedule
    beta_start: float = 0.0001  # first beta of the linear-type schedules
    beta_end: float = 0.02  # last beta of the linear-type schedules
    beta_schedule: str = choice("linear", S.BETA_SCHEDULES)  # SD 1.x / 2.x use scaled_linear
    trained_betas: tuple | None = None  # explicit betas, overriding the schedule
    prediction_type: str = choice("epsilon", S.PREDICTION_TYPES)  # what the model predicts
    timestep_spacing: str = choice("leading", S.TIMESTEP_SPACINGS)  # how n of the training steps are picked
    steps_offset: int = 0  # added to "leading" timesteps (SD 1.x uses 1)


@dataclass(frozen=True)
class ZeroSNRConfig(SchedulerConfig):
    rescale_betas_zero_snr: bool = False  # rescale the betas to zero terminal SNR (Lin et al. 2023)


@dataclass(frozen=True)
class NoOptions:
    """The run options of a scheduler that has none."""


@dataclass(frozen=True)
class SchedulerState:
    """One sampling run. Replace it with ``out.state`` after every ``step``; never edited in place."""

    timesteps: torch.Tensor  # timesteps still to run, in order, on the requested device
    latent_timestep: torch.Tensor  # (1,) first of them: the noise level img2img starts from
    init_noise_sigma: float | torch.Tensor  # scale of the initial N(0, I) latents
    num_inference_steps: int
    schedule: torch.Tensor  # the full schedule on CPU (timesteps is a suffix of it)
    step_index: int  # position in ``schedule`` of the next timestep to step
    options: Any = NoOptions()  # the run options (the scheduler's options_class)
    sigmas: torch.Tensor | None = None  # CPU float32, len(schedule) + 1, for sigma-based samplers
    steps_taken: int = 0  # steps done in this run (img2img starts at 0 part-way in)
    history: tuple = ()  # multistep memory, oldest first


@dataclass(frozen=True)
class SchedulerOutput:
    prev_sample: torch.Tensor  # x_{t-1}, the sample for the next timestep
    pred_original_sample: torch.Tensor | None  # the model's estimate of x0 at this step
    state: SchedulerState  # pass this to the next step


def _load_config_dict(config):
    """A config dict from a dict, a scheduler, a json file or a folder holding scheduler_config.json."""
    if isinstance(config, Scheduler):
        return config.config
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        if os.path.isdir(path):
            path = os.path.join(path, CONFIG_NAME)
        if not os.path.isfile(path):
            raise ValueError(f"No scheduler config at {path!r}; pass a dict, a json file or a folder "
                             f"containing {CONFIG_NAME}.")
        return read_json_object(path, "scheduler config")
    raise TypeError(f"Expected a config dict, a scheduler or a path, got {type(config).__name__}.")


class Scheduler:
    """Base class: config handling, immutability, run options, img2img start, noising for training.

    A subclass sets ``config_class`` (its settings), ``options_class`` (its run options),
    ``_fixed`` (reference keys sdkit supports only at the listed values), and builds its
    constants in ``_setup`` and its schedule in ``_plan``.
    """

    order = 1
    config_class = ZeroSNRConfig
    options_class = NoOptions
    _fixed: dict = {}
    _config_class_name = None  # the reference class name to save under, if not the class's own
    _always_given = ()  # settings never listed as defaults (``_use_default_values``): the class's own choice
    custom_schedules = ()  # "timesteps" and/or "sigmas": the custom schedules set_timesteps takes (as the reference's)

    # ---------------------------------------------------------------- construction and config
    def __init__(self, **settings):
        cfg = configuration.build(type(self).__name__, self.config_class, settings)
        configuration.check_number(type(self).__name__, "num_train_timesteps", cfg.num_train_timesteps, low=1,
                                   integer=True)
        object.__setattr__(self, "_cfg", cfg)
        object.__setattr__(self, "_given", frozenset(settings))  # settings passed, not defaulted
        object.__setattr__(self, "_carried", {})  # config keys of other classes (from_config)
        self._setup(cfg)
        object.__setattr__(self, "_frozen", True)

    def _setup(self, cfg):
        """The constants of the schedule (alpha_bar); subclasses add theirs."""
        self.alphas_cumprod = S.make_alphas_cumprod(cfg)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable; build a new one with "
                f"{type(self).__name__}.from_config({{**scheduler.config, {name!r}: ...}})."
            )
        object.__setattr__(self, name, value)

    @property
    def config(self):
        """The settings as a read-only dict with ``_class_name`` (also ``config.key``); every from_config takes it.

        As the reference's: the keys of other classes this one was built from are kept, and
        ``_use_default_values`` lists the settings left at this class's defaults.
        """
        class_name = self._config_class_name or type(self).__name__
        settings = {f.name: configuration.plain(getattr(self._cfg, f.name))
                    for f in dataclasses.fields(self._cfg)}
        defaults = sorted(set(settings) - self._given - set(self._always_given))
        marks = {"_use_default_values": defaults} if defaults else {}
        return configuration.Config({"_class_name": class_name, **self._carried, **settings, **marks})

    @property
    def compatibles(self):
        """The sdkit classes with the reference's names that take this config (``X.from_config(s.config)``)."""
        from .registry import SCHEDULER_CLASSES

        return list(SCHEDULER_CLASSES.values())

    @classmethod
    def config_keys(cls):
        return [f.name for f in dataclasses.fields(cls.config_class)]

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from reference config keys (dict, json file or folder); keys this class does not use are
        kept in its config (the reference's carry-over), with a warning for those that change the model's
        noise schedule (``MODEL_SCHEDULE_KEYS``)."""
        values, carried, given = carried_config(cls, _load_config_dict(config))
        values = {**values, **overrides}
        try:
            cfg, unused = configuration.read_config(cls.__name__, cls.config_class, values, cls._fixed,
                                                    none_is_unset=True)
            warn_dropped_keys(cls, unused)
            scheduler = cls(**{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)})
            object.__setattr__(scheduler, "_given", given | (set(overrides) & set(cls.config_keys())))
            object.__setattr__(scheduler, "_carried", carried)
            return scheduler
        except ValueError as e:
            if isinstance(config, (str, os.PathLike)):  # a bad value in a file: name the file
                folder = os.fspath(config)
                path = os.path.join(folder, CONFIG_NAME) if os.path.isdir(folder) else folder
                raise ValueError(f"{path}: {e} Fix the file or download the model again.") from None
            raise

    def save_pretrained(self, save_directory):
        """Write scheduler_config.json (loadable by sdkit and by the reference) into a folder."""
        os.makedirs(save_directory, exist_ok=True)
        config = {k: v for k, v in self.config.items() if k != "_use_default_values"}  # as the reference saves
        text = json.dumps(config, indent=2, sort_keys=True)
        return atomic_write(os.path.join(save_directory, CONFIG_NAME),
                            lambda p: Path(p).write_text(text, encoding="utf-8"))

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder=None, local_files_only=None, revision=None, cache_dir=None,
                        token=None):
        """Load scheduler_config.json from a folder or hub repo id (cache first), optionally in ``subfolder``."""
        from ..hub import resolve_folder

        pattern = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
        folder = resolve_folder(path_or_repo_id, subfolder, allow_patterns=[pattern], local_files_only=local_files_only,
                                revision=revision, cache_dir=cache_dir, token=token)
        return cls.from_config(str(folder))

    def __repr__(self):
        settings = (f"{f.name}={getattr(self._cfg, f.name)!r}" for f in dataclasses.fields(self._cfg)
                    if f.name != "trained_betas")
        return f"{type(self).__name__}({', '.join(settings)})"

    def __len__(self):
        return self._cfg.num_train_timesteps

    # ---------------------------------------------------------------- run options and states
    @classmethod
    def option_names(cls):
        """The names of this scheduler's run options (``set_timesteps(n, **options)``)."""
        return tuple(f.name for f in dataclasses.fields(cls.options_class))

    @classmethod
    def make_options(cls, **options):
        """The run options for ``set_timesteps``; an option this scheduler does not have is refused."""
        names = cls.option_names()
        unknown = sorted(set(options) - set(names))
        if unknown:
            has = f"its run options are {', '.join(names)}" if names else "it has no run options"
            raise ValueError(f"{cls.__name__} has no run option {', '.join(map(repr, unknown))}; {has}.")
        return cls.options_class(**options)

    def set_timesteps(self, num_inference_steps=None, device=None, strength=1.0, *, timesteps=None, sigmas=None,
                      **options):
        """The state of a run of ``num_inference_steps`` (fewer when ``strength`` < 1).

        ``options`` are the run options (``option_names()``: DDIM ``eta``, LMS ``order``); they
        are checked here and carried in the state. ``timesteps`` or ``sigmas`` give a custom
        schedule instead of ``num_inference_steps`` (the classes whose ``custom_schedules`` list
        them, as in the reference; e.g. ``AysSchedules``). The scheduler itself is not changed.
        """
        custom = timesteps is not None or sigmas is not None
        if not custom:
            S.check_num_steps(num_inference_steps, self._cfg.num_train_timesteps, type(self).__name__)
        run_options = self.make_options(**options)
        plan = self._custom_plan(num_inference_steps, timesteps, sigmas) if custom else self._plan(num_inference_steps)
        n = plan.pop("num_inference_steps", num_inference_steps)
        return self._make_state(n, device, strength, run_options, **plan)

    @classmethod
    def check_custom_schedule(cls, kind):
        """Raise unless this class takes a custom ``kind`` ("timesteps" or "sigmas") schedule."""
        if kind in cls.custom_schedules:
            return
        from .registry import SCHEDULER_CLASSES

        takers = [name for name, c in SCHEDULER_CLASSES.items() if kind in c.custom_schedules]
        raise ValueError(f"{cls.__name__} takes no custom {kind} (nor does the reference's); "
                         f"{', '.join(takers)} do: swap the scheduler, or pass num_inference_steps.")

    def _custom_plan(self, num_inference_steps, timesteps, sigmas):
        """The plan of a custom schedule, after the reference's checks (``_timesteps_plan`` / ``_sigmas_plan``)."""
        name = type(self).__name__
        if timesteps is not None and sigmas is not None:
            raise ValueError(f"{name}.set_timesteps: pass timesteps or sigmas, not both.")
        kind, values = ("timesteps", timesteps) if timesteps is not None else ("sigmas", sigmas)
        self.check_custom_schedule(kind)
        if num_inference_steps is not None:
            raise ValueError(f"{name}.set_timesteps: pass num_inference_steps or {kind}, not both.")
        values = np.asarray(torch.as_tensor(values).cpu(), dtype=np.float64).reshape(-1)
        if len(values) < (2 if kind == "sigmas" else 1) or not np.isfinite(values).all() or (values < 0).any():
            raise ValueError(f"{name}: custom {kind} must be a list of numbers >= 0 (sigmas: at least 2, the last "
                             f"ending the run), got {values.tolist()}.")
        if kind == "sigmas":
            return {**self._sigmas_plan(values), "num_inference_steps": len(values) - 1}
        last = self._cfg.num_train_timesteps - 1
        if (np.diff(values) >= 0).any() or values[0] > last:
            raise ValueError(f"{name}: custom timesteps must be strictly descending training steps in [0, {last}], "
                             f"got {values.tolist()}.")
        if getattr(self._cfg, "use_karras_sigmas", False):
            raise ValueError(f"{name}: custom timesteps cannot be used with use_karras_sigmas=True (as in the "
                             f"reference); pass sigmas=, or swap in a config without Karras sigmas.")
        return {**self._timesteps_plan(values), "num_inference_steps": len(values)}

    def _timesteps_plan(self, timesteps):
        """The plan of custom (descending) training timesteps: int64, as DDPM's (the reference's DDPMScheduler)."""
        return {"schedule": torch.from_numpy(timesteps.astype(np.int64))}

    def _checked_run(self, num_inference_steps, strength, options):
        """The run options of a ``set_timesteps`` call, after checking its step count and strength."""
        S.check_num_steps(num_inference_steps, self._cfg.num_train_timesteps, type(self).__name__)
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        return self.make_options(**options)

    def _plan(self, num_inference_steps):
        """The run's schedule (DDPM, DDIM: int64 spaced timesteps) and any other state fields."""
        c = self._cfg
        timesteps = S.spaced_timesteps(
            c.timestep_spacing, num_inference_steps, c.num_train_timesteps, c.steps_offset
        )
        return {"schedule": torch.from_numpy(np.round(timesteps).astype(np.int64))}

    def _make_state(self, num_inference_steps, device, strength, options, schedule,
                    state_class=SchedulerState, **fields):
        """A state that starts where the reference img2img pipeline starts for ``strength``.

        The reference runs ``schedule[t_start * order:]`` with
        ``t_start = n - min(int(n * strength), n)`` and begins its step index there.
        """
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}.")
        n = num_inference_steps
        t_start = max(n - min(int(n * strength), n), 0) * self.order
        if t_start >= len(schedule):
            raise ValueError(f"strength={strength} leaves no step of {n}; raise strength or steps.")
        timesteps = schedule[t_start:].to(device)
        return state_class(
            timesteps=timesteps, latent_timestep=timesteps[:1], num_inference_steps=n,
            schedule=schedule, step_index=t_start, options=options, **{"init_noise_sigma": 1.0, **fields},
        )

    def _check_timestep(self, timestep, state):
        """The position of ``timestep`` in the run: it must be the state's next timestep."""
        i = state.step_index
        if i >= len(state.schedule):
            raise ValueError(
                f"{type(self).__name__}.step: this state has no steps left "
                f"({len(state.schedule)} done); start a new run with set_timesteps."
            )
        expected = state.schedule[i].item()
        got = timestep.item() if isinstance(timestep, torch.Tensor) else timestep
        if got != expected:
            raise ValueError(
                f"{type(self).__name__}.step: timestep {got} is not the state's next timestep "
                f"{expected} (step {i}); iterate over state.timesteps in order and pass out.state on."
            )
        return i

    @staticmethod
    def _advance(state, **changes):
        return dataclasses.replace(
            state, step_index=state.step_index + 1, steps_taken=state.steps_taken + 1, **changes
        )

    # ---------------------------------------------------------------- training / img2img noising
    def _train_steps(self, timesteps, device):
        """Whole training timesteps as a flat int64 tensor; fractional or out-of-range ones are refused."""
        timesteps = torch.as_tensor(timesteps, device=device).flatten()
        if timesteps.is_floating_point():
            if not torch.equal(timesteps, timesteps.round()):
                raise ValueError(
                    f"{type(self).__name__}: without a run state, timesteps must be whole training "
                    f"steps, got {timesteps.tolist()}; pass the run's state for its own timesteps."
                )
            timesteps = timesteps.long()
        last = self._cfg.num_train_timesteps - 1
        if timesteps.numel() and (timesteps.min() < 0 or timesteps.max() > last):
            raise ValueError(f"timesteps must lie in [0, {last}], got {timesteps.tolist()}.")
        return timesteps

    def _alpha_bar_at(self, timesteps, like):
        """alpha_bar at training timesteps, in ``like``'s dtype/device, shaped (B, 1, ..., 1)."""
        alphas_cumprod = self.alphas_cumprod.to(device=like.device, dtype=like.dtype)
        return S.per_sample(alphas_cumprod[self._train_steps(timesteps, like.device)], like)

    def add_noise(self, original_samples, noise, timesteps, state=None):
        """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4).

        ``state`` is accepted for a uniform call; the sigma samplers use it to find their sigmas.
        """
        alpha_bar = self._alpha_bar_at(timesteps, original_samples)
        return alpha_bar**0.5 * original_samples + (1 - alpha_bar) ** 0.5 * noise

    def get_velocity(self, sample, noise, timesteps):
        """v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x0 (Salimans & Ho 2022, arXiv 2202.00512)."""
        alpha_bar = self._alpha_bar_at(timesteps, sample)
        return alpha_bar**0.5 * noise - (1 - alpha_bar) ** 0.5 * sample

    def scale_model_input(self, sample, timestep=None, state=None):
        """The UNet input for ``sample``; unchanged for samplers that work on x_t itself."""
        return sample

    def stateful(self):
        """A per-run object with the reference's stateful interface over this scheduler
        (``set_timesteps(n)``, ``.timesteps``, ``.init_noise_sigma``, ``scale_model_input(x, t)``,
        ``step(...).prev_sample``), for loops written against the reference; see stateful.py."""
        from .stateful import StatefulScheduler

        return StatefulScheduler(self)

    def begin(self, sample, state, generator=None):
        """The sample the run's first model call sees: ``sample`` itself, except where a sampler adds
        noise before its first step (A1111's Euler, Heun and DPM2 with churn)."""
        return sample


class SigmaScheduler(Scheduler):
    """Base of the samplers that step in VE sigma (Euler, Euler ancestral, LMS, DPM-Solver)."""

    def _setup(self, cfg):
        """alpha_bar, its last value kept above 0 with zero terminal SNR so that sigma stays finite."""
        self.alphas_cumprod = S.make_alphas_cumprod(cfg, clamp_terminal=True)

    def _sigma_indices(self, timesteps, state):
        """Each timestep's position in the run's schedule (the current step first, like the reference)."""
        timesteps = torch.as_tensor(timesteps).flatten().cpu()
        schedule = state.schedule
        current = schedule[state.step_index] if state.step_index < len(schedule) else None
        indices = []
        for t in timesteps:
            if current is not None and t == current:
                indices.append(state.step_index)
                continue
            found = (schedule == t).nonzero()
            if len(found) == 0:
                raise ValueError(
                    f"{type(self).__name__}.add_noise: timestep {t.item()} is not in the state's "
                    "schedule; pass timesteps from state.timesteps (or no state for training)."
                )
            indices.append(found[0].item())
        return indices

    def _sigma_at(self, timesteps, state, like):
        """VE sigma for each timestep, from the state's schedule or (no state) the training schedule."""
        if state is None:
            train_sigmas = S.vp_to_ve_sigmas(self.alphas_cumprod)
            sigma = S.per_sample(train_sigmas[self._train_steps(timesteps, "cpu")], like)
        else:
            sigma = S.per_sample(state.sigmas[self._sigma_indices(timesteps, state)], like)
        return sigma.to(device=like.device, dtype=like.dtype)

    def add_noise(self, original_samples, noise, timesteps, state=None):
        """x = x0 + sigma eps, the VE noising (Karras et al. 2022, arXiv 2206.00364).

        With the run's ``state`` (img2img: ``state.latent_timestep``) sigma is the run's own, as in
        the reference pipeline; without it, timesteps are whole training steps.
        """
        sigma = self._sigma_at(timesteps, state, original_samples)
        return original_samples + noise * sigma

    def scale_model_input(self, sample, timestep, state):
        """x / sqrt(sigma^2 + 1): the VP-scaled sample the UNet was trained on (Karras et al. 2022)."""
        sigma = state.sigmas[state.step_index]
        return sample / (sigma**2 + 1) ** 0.5

    def _plan(self, num_inference_steps):
        """Float32 timesteps and float32 sigmas (with a final 0)."""
        c = self._cfg
        timesteps, sigmas = S.sampler_sigmas(
            c, self.alphas_cumprod, num_inference_steps, getattr(c, "sigma_min", None),
            getattr(c, "sigma_max", None),
        )
        return self._sigma_plan(timesteps, sigmas)

    def _timesteps_plan(self, timesteps):
        """Custom timesteps: their sigmas, interpolated in t, then 0 (the reference's Euler)."""
        train_sigmas = np.array(S.vp_to_ve_sigmas(self.alphas_cumprod))
        timesteps = timesteps.astype(np.float32)
        return self._sigma_plan(torch.from_numpy(timesteps), S.interp_sigmas(timesteps, train_sigmas))

    def _sigmas_plan(self, sigmas):
        """Custom sigmas, the last one ending the run; timesteps from them, linear in log sigma (the reference's Euler)."""
        log_sigmas = np.log(np.array(S.vp_to_ve_sigmas(self.alphas_cumprod)))
        sigmas = sigmas.astype(np.float32)
        timesteps = S.sigma_to_t(sigmas[:-1], log_sigmas).astype(np.float32)
        return self._sigma_plan(torch.from_numpy(timesteps), sigmas[:-1], final=sigmas[-1])

    def _sigma_plan(self, timesteps, sigmas, final=0.0):
        """Plan fields for a sigma schedule: sigmas float32 with the final one (0 by default), init_noise_sigma."""
        sigmas = torch.from_numpy(np.concatenate([sigmas, [final]]).astype(np.float32))
        sigma_max = sigmas.max()
        trailing_or_linspace = self._cfg.timestep_spacing in ("linspace", "trailing")
        init_noise_sigma = sigma_max if trailing_or_linspace else (sigma_max**2 + 1) ** 0.5
        return {"schedule": timesteps, "sigmas": sigmas, "init_noise_sigma": init_noise_sigma}
