"""The reference's stateful scheduler interface, as a per-run object over a shared sdkit scheduler.

sdkit's schedulers keep no run state, so one serves many runs at once (the stateless form is in
``base.py``). Loops written for the reference's schedulers, which hold their run, get that
interface from one call on the shared scheduler:

    scheduler = scheduler.stateful()                       # the one added line
    scheduler.set_timesteps(25)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        x = scheduler.scale_model_input(latents, t)
        latents = scheduler.step(unet(x, t, context).sample, t, latents).prev_sample

The object holds one run (``.state``); make one per run or per thread. It changes nothing on the
shared scheduler, whose settings (``config``, ``order``, ...) it shows as its own.
"""

import dataclasses

from .base import SchedulerState
from .pndm import PNDMState

# step() keywords of the reference's schedulers that sdkit's classes do not have, at the values that change nothing
REFERENCE_STEP_DEFAULTS = {"use_clipped_model_output": False, "variance_noise": None, "s_churn": 0.0,
                           "s_tmin": 0.0, "s_tmax": float("inf"), "s_noise": 1.0}
SEEKABLE = (SchedulerState, PNDMState)  # states whose position is only their step index


class StatefulScheduler:
    """One sampling run on a shared scheduler, with the reference's methods and attributes."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.state = None  # the run's SchedulerState, after set_timesteps
        self._timesteps = None

    def __getattr__(self, name):  # the shared scheduler's settings: config, order, alphas_cumprod, ...
        if name in ("scheduler", "state", "_timesteps"):
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __len__(self):
        return len(self.scheduler)

    def __repr__(self):
        return f"StatefulScheduler({self.scheduler!r})"

    # ---------------------------------------------------------------- the run
    def set_timesteps(self, num_inference_steps=None, device=None, timesteps=None, sigmas=None, **options):
        """Start a run, as the reference's ``set_timesteps`` (run options such as DDIM's ``eta`` may be given here)."""
        self.state = self.scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps,
                                                  sigmas=sigmas, **options)
        self._timesteps = self.state.timesteps

    def _run(self):
        if self.state is None:
            raise RuntimeError(f"{type(self.scheduler).__name__}: call set_timesteps(num_inference_steps) first, "
                               f"as with the reference's schedulers.")
        return self.state

    @property
    def timesteps(self):
        self._run()
        return self._timesteps

    @property
    def init_noise_sigma(self):
        return self._run().init_noise_sigma

    @property
    def sigmas(self):
        return self._run().sigmas

    @property
    def num_inference_steps(self):
        return self._run().num_inference_steps

    @property
    def step_index(self):
        return None if self.state is None else self.state.step_index

    def set_begin_index(self, begin_index=0):
        """Start the run at position ``begin_index`` of its schedule (the reference's img2img start)."""
        state = self._run()
        if type(state) not in SEEKABLE:
            raise ValueError(f"{type(self.scheduler).__name__} cannot start part-way in this way: call "
                             f"set_timesteps with strength= on the shared scheduler instead.")
        timesteps = state.schedule[begin_index:].to(state.timesteps.device)
        self.state = dataclasses.replace(state, step_index=begin_index, timesteps=timesteps,
                                         latent_timestep=timesteps[:1])

    def _at(self, timestep):
        """Before the first step, a timestep later in the schedule starts the run there (as the reference finds it)."""
        state = self._run()
        if state.steps_taken or state.step_index >= len(state.schedule):
            return
        t = timestep.item() if hasattr(timestep, "item") else timestep
        if state.schedule[state.step_index].item() != t and (state.schedule == t).any():
            self.set_begin_index(int((state.schedule == t).nonzero()[0]))

    def scale_model_input(self, sample, timestep=None):
        """The UNet input for ``sample`` at ``timestep`` of this run."""
        if timestep is not None:
            self._at(timestep)
        return self.scheduler.scale_model_input(sample, timestep, self._run())

    def step(self, model_output, timestep, sample, generator=None, return_dict=True, **options):
        """One step of the run: ``.prev_sample`` (and ``.pred_original_sample``), or a tuple with ``return_dict=False``.

        Keywords that are run options of the scheduler (DDIM's ``eta``) apply from this step on; the
        reference's other step keywords are accepted at the values that change nothing.
        """
        self._at(timestep)
        state = self._run()
        names = self.scheduler.option_names()
        run_options = {k: v for k, v in options.items() if k in names}
        for key, value in options.items():
            if key not in names and (key not in REFERENCE_STEP_DEFAULTS or value != REFERENCE_STEP_DEFAULTS[key]):
                raise ValueError(f"{type(self.scheduler).__name__}.step got {key}={value!r}, which sdkit's class does "
                                 f"not have; its run options are {', '.join(names) or 'none'}.")
        if run_options:
            merged = {**dataclasses.asdict(state.options), **run_options}
            state = dataclasses.replace(state, options=self.scheduler.make_options(**merged))
        out = self.scheduler.step(model_output, timestep, sample, state, generator=generator)
        self.state = out.state
        return out if return_dict else (out.prev_sample, out.pred_original_sample)

    def add_noise(self, original_samples, noise, timesteps):
        """The reference's ``add_noise``, at this run's noise levels once set_timesteps has been called."""
        return self.scheduler.add_noise(original_samples, noise, timesteps, self.state)
