"""What every sdkit scheduler shares: immutable config, run state, output, config files.

A scheduler holds its config and constant tensors (CPU, float32 like the reference) and is never
changed after construction. ``set_timesteps`` returns a :class:`SchedulerState`; ``step`` returns a
:class:`SchedulerOutput` carrying the next state. Many runs can therefore share one scheduler.
"""

import copy
import dataclasses
import inspect
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from . import schedules as S

CONFIG_NAME = "scheduler_config.json"


@dataclass(frozen=True)
class SchedulerState:
    """One sampling run. Replace it with ``out.state`` after every ``step``; never edited in place."""

    timesteps: torch.Tensor  # timesteps still to run, in order, on the requested device
    latent_timestep: torch.Tensor  # (1,) first of them: the noise level img2img starts from
    init_noise_sigma: float | torch.Tensor  # scale of the initial N(0, I) latents
    num_inference_steps: int
    schedule: torch.Tensor  # the full schedule on CPU (timesteps is a suffix of it)
    step_index: int  # position in ``schedule`` of the next timestep to step
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
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    raise TypeError(f"Expected a config dict, a scheduler or a path, got {type(config).__name__}.")


def _plain(value):
    """Config values as json-ready python types (lists for arrays and tensors)."""
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    if isinstance(value, tuple):
        return list(value)
    return value


class Scheduler:
    """Base class: config handling, immutability, img2img start, noising for training."""

    order = 1
    # Options the reference class has but sdkit does not implement: key -> the values accepted
    # (the reference default, or ones it treats the same). Any other value is refused, not ignored.
    _fixed_options: dict = {}

    # ---------------------------------------------------------------- construction and config
    def _init_config(self, args):
        """Store the constructor's arguments as the config and validate the shared ones."""
        config = {k: _plain(v) for k, v in args.items() if k not in ("self", "__class__")}
        name = type(self).__name__
        S.check_choice("beta_schedule", config["beta_schedule"], S.BETA_SCHEDULES, name)
        S.check_choice("prediction_type", config["prediction_type"], self._prediction_types, name)
        S.check_choice("timestep_spacing", config["timestep_spacing"], S.TIMESTEP_SPACINGS, name)
        object.__setattr__(self, "_config", config)

    _prediction_types = S.PREDICTION_TYPES

    def _freeze(self):
        object.__setattr__(self, "_frozen", True)

    def __setattr__(self, name, value):
        if getattr(self, "_frozen", False):
            raise AttributeError(
                f"{type(self).__name__} is immutable; build a new one with "
                f"{type(self).__name__}.from_config({{**scheduler.config, {name!r}: ...}})."
            )
        object.__setattr__(self, name, value)

    _config_class_name = None  # the reference class name to save under, if not the class's own

    @property
    def config(self):
        """A fresh plain dict of the settings with ``_class_name``; every from_config takes it."""
        class_name = self._config_class_name or type(self).__name__
        return {"_class_name": class_name, **copy.deepcopy(self._config)}

    @classmethod
    def config_keys(cls):
        return [p for p in inspect.signature(cls.__init__).parameters if p != "self"]

    @classmethod
    def from_config(cls, config, **overrides):
        """Build from reference config keys (dict, json file or folder); unused keys are ignored."""
        config = {**_load_config_dict(config), **overrides}
        for key, allowed in cls._fixed_options.items():
            if config.get(key) is not None and config[key] not in allowed:
                raise ValueError(
                    f"{cls.__name__}: {key}={config[key]!r} is not supported by sdkit; "
                    f"remove it or set it to {allowed[0]!r}."
                )
        # None means "unset" in other classes' configs (e.g. DPM's variance_type): use our default
        params = inspect.signature(cls.__init__).parameters
        keys = cls.config_keys()
        return cls(**{
            k: v for k, v in config.items()
            if k in keys and not (v is None and params.get(k) is not None and params[k].default is not None)
        })

    def save_pretrained(self, save_directory):
        """Write scheduler_config.json (loadable by sdkit and by the reference) into a folder."""
        os.makedirs(save_directory, exist_ok=True)
        path = os.path.join(save_directory, CONFIG_NAME)
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.config, f, indent=2, sort_keys=True)
        return path

    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder=None, local_files_only=None):
        """Load scheduler_config.json from a folder or hub repo id (cache first), optionally in ``subfolder``."""
        from ..hub import resolve_folder

        pattern = f"{subfolder}/{CONFIG_NAME}" if subfolder else CONFIG_NAME
        folder = resolve_folder(path_or_repo_id, subfolder, allow_patterns=[pattern],
                                local_files_only=local_files_only)
        return cls.from_config(str(folder))

    def __repr__(self):
        settings = (f"{k}={v!r}" for k, v in self._config.items() if k != "trained_betas")
        return f"{type(self).__name__}({', '.join(settings)})"

    def __len__(self):
        return self._config["num_train_timesteps"]

    # ---------------------------------------------------------------- building states
    def _check_steps(self, num_inference_steps):
        train_steps = self._config["num_train_timesteps"]
        S.check_num_steps(num_inference_steps, train_steps, type(self).__name__)

    def set_timesteps(self, num_inference_steps, device=None, strength=1.0):
        """The run's state (DDPM, DDIM): int64 timesteps for ``num_inference_steps`` (fewer when ``strength`` < 1)."""
        self._check_steps(num_inference_steps)
        c = self._config
        timesteps = S.spaced_timesteps(
            c["timestep_spacing"], num_inference_steps, c["num_train_timesteps"], c["steps_offset"]
        )
        schedule = torch.from_numpy(np.round(timesteps).astype(np.int64))
        return self._make_state(schedule, num_inference_steps, device, strength)

    def _make_state(self, schedule, num_inference_steps, device, strength, init_noise_sigma=1.0,
                    sigmas=None, state_class=SchedulerState, **extra):
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
            timesteps=timesteps, latent_timestep=timesteps[:1], init_noise_sigma=init_noise_sigma,
            num_inference_steps=n, schedule=schedule, step_index=t_start, sigmas=sigmas, **extra,
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
        last = self._config["num_train_timesteps"] - 1
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


class SigmaScheduler(Scheduler):
    """Base of the samplers that step in VE sigma (Euler, Euler ancestral, LMS, DPM-Solver)."""

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

    def set_timesteps(self, num_inference_steps, device=None, strength=1.0):
        """The run's state: float32 timesteps and float32 sigmas (with a final 0)."""
        self._check_steps(num_inference_steps)
        c = self._config
        timesteps, sigmas = S.sampler_sigmas(
            c, self.alphas_cumprod, num_inference_steps, c.get("sigma_min"), c.get("sigma_max")
        )
        return self._sigma_state(timesteps, sigmas, num_inference_steps, device, strength)

    def _sigma_state(self, timesteps, sigmas, num_inference_steps, device, strength, **extra):
        """A state for a sigma schedule: timesteps (torch), sigmas float32 with the final 0 appended."""
        sigmas = torch.from_numpy(np.concatenate([sigmas, [0.0]]).astype(np.float32))
        spacing = self._config["timestep_spacing"]
        sigma_max = sigmas.max()
        init_noise_sigma = sigma_max if spacing in ("linspace", "trailing") else (sigma_max**2 + 1) ** 0.5
        return self._make_state(
            timesteps, num_inference_steps, device, strength, init_noise_sigma=init_noise_sigma,
            sigmas=sigmas, **extra,
        )
