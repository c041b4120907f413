"""Scheduler lookup by class name (model_index.json) and by A1111 sampler name."""

from .base import Scheduler, _load_config_dict
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PLMSScheduler, PNDMScheduler

SCHEDULER_CLASSES = {
    cls.__name__: cls
    for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, LMSDiscreteScheduler)
}

# A1111 sampler name -> (class, settings applied over the base config)
SAMPLER_NAMES = {
    "DDIM": (DDIMScheduler, {}),
    "DDPM": (DDPMScheduler, {}),
    "PLMS": (PNDMScheduler, {"skip_prk_steps": True}),
    "PNDM": (PNDMScheduler, {"skip_prk_steps": False}),
    "Euler": (EulerDiscreteScheduler, {"use_karras_sigmas": False}),
    "Euler Karras": (EulerDiscreteScheduler, {"use_karras_sigmas": True}),
    "Euler a": (EulerAncestralDiscreteScheduler, {}),
    "LMS": (LMSDiscreteScheduler, {"use_karras_sigmas": False}),
    "LMS Karras": (LMSDiscreteScheduler, {"use_karras_sigmas": True}),
    "DPM++ 2M": (DPMSolverMultistepScheduler, {"solver_order": 2, "use_karras_sigmas": False}),
    "DPM++ 2M Karras": (DPMSolverMultistepScheduler, {"solver_order": 2, "use_karras_sigmas": True}),
}


def get_scheduler_class(name):
    """The sdkit class for a reference class name such as "PNDMScheduler" (as in model_index.json)."""
    if name == "PLMSScheduler":
        return PLMSScheduler
    if name not in SCHEDULER_CLASSES:
        raise ValueError(
            f"Unknown scheduler class {name!r}; sdkit has {', '.join(sorted(SCHEDULER_CLASSES))}."
        )
    return SCHEDULER_CLASSES[name]


def from_name(name, base_config=None) -> Scheduler:
    """A scheduler for an A1111 sampler name (any case), keeping a base config's betas and spacing."""
    by_lower = {k.lower(): k for k in SAMPLER_NAMES}
    key = by_lower.get(" ".join(str(name).split()).lower())
    if key is None:
        raise ValueError(f"Unknown sampler name {name!r}; known names: {', '.join(SAMPLER_NAMES)}.")
    cls, settings = SAMPLER_NAMES[key]
    config = _load_config_dict(base_config) if base_config is not None else {}
    return cls.from_config({**config, **settings})


def scheduler_from_name(name, base_config) -> Scheduler:
    """A scheduler named by its class name ("DDIMScheduler") or A1111 name ("Euler a") on ``base_config``."""
    try:
        return get_scheduler_class(name).from_config(base_config)
    except ValueError:
        pass
    try:
        return from_name(name, base_config)
    except ValueError:
        raise ValueError(f"Unknown scheduler {name!r}; known class names: {', '.join(sorted(SCHEDULER_CLASSES))}; "
                         f"known A1111 sampler names: {', '.join(SAMPLER_NAMES)}.") from None


def a1111_name(scheduler):
    """The A1111 sampler name of a configured scheduler; its class name when A1111 has none."""
    config = scheduler.config
    for name, (cls, settings) in SAMPLER_NAMES.items():
        if isinstance(scheduler, cls) and all(config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__
