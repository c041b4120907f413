"""Stateless samplers: one scheduler serves many runs; each run's state is held by the caller.

    state = scheduler.set_timesteps(num_inference_steps, device=None, strength=1.0)
    x = randn(shape) * state.init_noise_sigma
    for t in state.timesteps:
        eps = unet(scheduler.scale_model_input(x, t, state), t, context)
        out = scheduler.step(eps, t, x, state, generator=g)
        x, state = out.prev_sample, out.state
"""

from .base import Scheduler, SchedulerOutput, SchedulerState, SigmaScheduler
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .dpm_solver import DPMSolverMultistepScheduler
from .euler import EulerDiscreteScheduler
from .euler_ancestral import EulerAncestralDiscreteScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PLMSScheduler, PNDMScheduler, PNDMState
from .registry import (
    SAMPLER_NAMES, SCHEDULER_CLASSES, a1111_name, from_name, get_scheduler_class,
)
from .registry import scheduler_from_name

__all__ = [
    "Scheduler", "SchedulerOutput", "SchedulerState", "SigmaScheduler", "PNDMState",
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "PLMSScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
    "SAMPLER_NAMES", "SCHEDULER_CLASSES", "a1111_name", "from_name", "get_scheduler_class",
    "scheduler_from_name",
]
