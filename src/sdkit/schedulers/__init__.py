"""Stateless samplers: one scheduler serves many runs; each run's state is held by the caller.

The reference's classes (DDIMScheduler, ...) sample as the reference does; A1111's samplers
(``from_name("DPM++ 2M", config, schedule="Karras")``) as A1111 1.10 does.

    state = scheduler.set_timesteps(num_inference_steps, device=None, strength=1.0)
    x = randn(shape) * state.init_noise_sigma
    for t in state.timesteps:
        eps = unet(scheduler.scale_model_input(x, t, state), t, context)
        out = scheduler.step(eps, t, x, state, generator=g)
        x, state = out.prev_sample, out.state

Loops written for the reference's stateful schedulers run on ``scheduler.stateful()``, a per-run
object with the reference's ``set_timesteps(n)``, ``.timesteps``, ``step(...).prev_sample``.
"""

from .a1111_timesteps import A1111DDIMScheduler, A1111PLMSScheduler
from .a1111_unipc import A1111UniPCScheduler
from .base import Scheduler, SchedulerOutput, SchedulerState, SigmaScheduler
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
from .ladder import KDiffusionScheduler
from .lms import LMSDiscreteScheduler
from .pndm import PLMSScheduler, PNDMScheduler, PNDMState
from .registry import (
    A1111_CLASSES, A1111_SAMPLERS, SAMPLER_NAMES, SCHEDULER_CLASSES, a1111_name, a1111_schedule, from_name,
    get_scheduler_class, split_sampler_name,
)
from .sigma_schedules import SCHEDULE_LABELS, SCHEDULE_TYPES, AysSchedules
from .stateful import StatefulScheduler

__all__ = [
    "Scheduler", "SchedulerOutput", "SchedulerState", "SigmaScheduler", "PNDMState",
    "DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "PLMSScheduler", "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler",
    "SAMPLER_NAMES", "SCHEDULER_CLASSES", "a1111_name", "from_name", "get_scheduler_class",
    "KDiffusionScheduler", "KEulerScheduler", "KEulerAncestralScheduler", "KHeunScheduler", "KDPM2Scheduler",
    "KDPM2AncestralScheduler", "KDPMPP2SAncestralScheduler", "KDPMPP2MScheduler", "KDPMPPSDEScheduler",
    "KDPMPP2MSDEScheduler", "KDPMPP3MSDEScheduler", "KLMSScheduler", "KRestartScheduler", "KLCMScheduler",
    "A1111DDIMScheduler", "A1111PLMSScheduler", "A1111UniPCScheduler", "A1111_CLASSES", "A1111_SAMPLERS",
    "SCHEDULE_LABELS",
    "SCHEDULE_TYPES", "a1111_schedule", "split_sampler_name",
    "AysSchedules", "StatefulScheduler",
]
