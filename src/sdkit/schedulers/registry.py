"""Scheduler lookup by class name (model_index.json) and by A1111 sampler name.

The rule: a reference class name (``DDIMScheduler``) gives the reference's sampling; an A1111 name
("DDIM", "DPM++ 2M", "Euler a") gives A1111 1.10's, with its schedule type ("Karras", ...).
"""

from . import sigma_schedules as K
from .a1111_timesteps import A1111DDIMScheduler, A1111PLMSScheduler
from .a1111_unipc import A1111UniPCScheduler
from .base import Scheduler, _load_config_dict
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .k_ancestral import KDPM2AncestralScheduler, KDPMPP2SAncestralScheduler, KEulerAncestralScheduler
from .k_dpmpp import KDPMPP2MScheduler, KDPMPP2MSDEScheduler, KDPMPP3MSDEScheduler
from .k_dpmpp_sde import KDPMPPSDEScheduler
from .k_euler import KDPM2Scheduler, KEulerScheduler, KHeunScheduler
from .k_lcm import KLCMScheduler
from .k_lms import KLMSScheduler
from .k_restart import KRestartScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PLMSScheduler, PNDMScheduler

SCHEDULER_CLASSES = {
    cls.__name__: cls
    for cls in (DDPMScheduler, DDIMScheduler, PNDMScheduler, EulerDiscreteScheduler,
                EulerAncestralDiscreteScheduler, DPMSolverMultistepScheduler, LMSDiscreteScheduler)
}

# A1111 1.10's samplers, in its order: name -> (class, settings over the base config, aliases)
A1111_SAMPLERS = {
    "DPM++ 2M": (KDPMPP2MScheduler, {}, ("k_dpmpp_2m",)),
    "DPM++ SDE": (KDPMPPSDEScheduler, {}, ("k_dpmpp_sde",)),
    "DPM++ 2M SDE": (KDPMPP2MSDEScheduler, {"solver_type": "midpoint"}, ("k_dpmpp_2m_sde",)),
    "DPM++ 2M SDE Heun": (KDPMPP2MSDEScheduler, {"solver_type": "heun"}, ("k_dpmpp_2m_sde_heun",)),
    "DPM++ 2S a": (KDPMPP2SAncestralScheduler, {}, ("k_dpmpp_2s_a",)),
    "DPM++ 3M SDE": (KDPMPP3MSDEScheduler, {}, ("k_dpmpp_3m_sde",)),
    "Euler a": (KEulerAncestralScheduler, {}, ("k_euler_a", "k_euler_ancestral")),
    "Euler": (KEulerScheduler, {}, ("k_euler",)),
    "LMS": (KLMSScheduler, {}, ("k_lms",)),
    "Heun": (KHeunScheduler, {}, ("k_heun",)),
    "DPM2": (KDPM2Scheduler, {}, ("k_dpm_2",)),
    "DPM2 a": (KDPM2AncestralScheduler, {}, ("k_dpm_2_a",)),
    "Restart": (KRestartScheduler, {}, ("restart",)),
    "DDIM": (A1111DDIMScheduler, {}, ("ddim",)),
    "PLMS": (A1111PLMSScheduler, {}, ("plms",)),
    "UniPC": (A1111UniPCScheduler, {}, ("unipc",)),
    "LCM": (KLCMScheduler, {}, ("k_lcm",)),
}
SAMPLER_NAMES = tuple(A1111_SAMPLERS)
A1111_CLASSES = {cls.__name__: cls for cls, _, _ in A1111_SAMPLERS.values()}


def get_scheduler_class(name):
    """The sdkit class for a class name such as "PNDMScheduler" (as in model_index.json) or "KEulerScheduler"."""
    if name == "PLMSScheduler":
        return PLMSScheduler
    classes = {**SCHEDULER_CLASSES, **A1111_CLASSES}
    if name not in classes:
        raise ValueError(f"Unknown scheduler class {name!r}; sdkit has {', '.join(sorted(classes))}.")
    return classes[name]


def split_sampler_name(name, schedule=None):
    """(A1111 sampler name, schedule type key or None) of a name, legacy "DPM++ 2M Karras" style included.

    As A1111's get_sampler_and_scheduler: a schedule label (or key, or alias) ending the name wins
    over ``schedule``; names match in any case.
    """
    text = " ".join(str(name).split())
    schedule_key = None
    if schedule is not None:
        schedule_key = K.schedule_type(schedule)
        if schedule_key is None:
            raise ValueError(f"Unknown schedule type {schedule!r}; A1111's are "
                             f"{', '.join(K.SCHEDULE_LABELS.values())}.")
    for key, label in K.SCHEDULE_LABELS.items():
        options = [label, key] + [alias for alias, target in K.SCHEDULE_ALIASES.items() if target == key]
        suffix = next((o for o in options if text.lower().endswith(" " + o.lower())), None)
        if suffix is not None and _sampler_key(text[:-len(suffix) - 1]) is not None:
            text, schedule_key = text[:-len(suffix) - 1], key
            break
    sampler = _sampler_key(text)
    if sampler is None:
        raise ValueError(f"Unknown sampler name {name!r}; A1111's samplers in sdkit are {', '.join(SAMPLER_NAMES)} "
                         f"(legacy names like 'DPM++ 2M Karras' work too), or a class name such as "
                         f"{', '.join(sorted(SCHEDULER_CLASSES))}.")
    return sampler, schedule_key


def _sampler_key(text):
    wanted = text.strip().lower()
    for name, (_, _, aliases) in A1111_SAMPLERS.items():
        if wanted == name.lower() or wanted in aliases:
            return name
    return None


def from_name(name, base_config=None, schedule=None) -> Scheduler:
    """A scheduler by A1111 sampler name (``schedule``: an A1111 schedule type), or by class name.

    The base config (a dict, scheduler or path) gives the model's betas and prediction type.
    An A1111 name gives A1111's sampling; a class name (``DDIMScheduler``) the reference's.
    """
    config = _load_config_dict(base_config) if base_config is not None else {}
    text = " ".join(str(name).split())
    if text in SCHEDULER_CLASSES or text == "PLMSScheduler" or text in A1111_CLASSES:
        if schedule is not None and text not in A1111_CLASSES:
            raise ValueError(f"{text} is a reference class: it has no A1111 schedule type; pass schedule=None "
                             "or use an A1111 sampler name.")
        settings = {"schedule_type": K.schedule_type(schedule)} if schedule is not None else {}
        return get_scheduler_class(text).from_config({**config, **settings})
    sampler, schedule_key = split_sampler_name(text, schedule)
    cls, settings, _ = A1111_SAMPLERS[sampler]
    if schedule_key is not None:
        settings = {**settings, "schedule_type": schedule_key}
    return cls.from_config({**config, **settings})


def a1111_name(scheduler):
    """The A1111 sampler name of a scheduler ("DPM++ 2M SDE Heun"); a reference class's own name."""
    for name, (cls, settings, _) in A1111_SAMPLERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in settings.items()):
            return name
    return type(scheduler).__name__


def a1111_schedule(scheduler):
    """A1111's "Schedule type" infotext value of a scheduler, or None for a reference class."""
    return getattr(scheduler, "schedule_label", None)
