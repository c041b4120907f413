"""The reference's call forms on sdkit's call: step-end callbacks, the interrupt flag, the older
``callback`` / ``callback_steps``, custom schedules, ``return_dict`` and ``cross_attention_kwargs``
(as diffusers' StableDiffusionPipeline.__call__ takes them).

No call state is kept on the shared pipeline. What the reference keeps there during a call
(``pipe._interrupt``, ``pipe._guidance_scale``, ``pipe.num_timesteps``, ...) lives in the running
call's :class:`CallState`, which the pipeline's attributes of those names read and write through a
context variable: a callback that sets ``pipe._interrupt = True`` stops its own call only, and
concurrent calls in other threads never see it.
"""

import contextlib
import contextvars
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch

from .denoising import PromptEmbeds, guidance_for

CALLBACK_TENSOR_INPUTS = ("latents", "prompt_embeds", "negative_prompt_embeds")
_current = contextvars.ContextVar("sdkit_pipeline_call", default=None)


@dataclass
class CallState:
    """What the reference keeps on the pipeline during a call, kept for one call instead."""

    pipe: Any
    guidance_scale: float
    guidance_rescale: float
    clip_skip: Optional[int]
    cross_attention_kwargs: Optional[dict]
    num_timesteps: int
    interrupt: bool = False  # set by a callback: stop after this step
    context: Optional[torch.Tensor] = None  # prompt_embeds a step-end callback returned: the UNet's context from then


def running_call(pipe):
    """The CallState of ``pipe``'s call running in this thread (in its callbacks), or None."""
    state = _current.get()
    return state if state is not None and state.pipe is pipe else None


def _call_attribute(name, doc):
    """A pipeline attribute that is the running call's ``name`` (the reference keeps it on the pipeline)."""

    def get(pipe):
        state = running_call(pipe)
        if state is None:
            raise AttributeError(f"{type(pipe).__name__}.{name} is known only during a call (in its callbacks): "
                                 f"sdkit keeps no call state on the pipeline.")
        return getattr(state, name)

    def set_(pipe, value):  # outside a call there is nothing to change: the reference resets it at the next call
        state = running_call(pipe)
        if state is not None:
            setattr(state, name, value)

    return property(get, set_, doc=doc)


class CallStateMixin:
    """The reference's per-call pipeline attributes, answered by the running call (see the module's docstring)."""

    interrupt = _interrupt = _call_attribute("interrupt", "True once a callback asked the call to stop.")
    guidance_scale = _guidance_scale = _call_attribute("guidance_scale", "The call's guidance scale (a step-end "
                                                                         "callback may change it).")
    guidance_rescale = _guidance_rescale = _call_attribute("guidance_rescale", "The call's guidance rescale.")
    clip_skip = _clip_skip = _call_attribute("clip_skip", "The call's clip_skip.")
    cross_attention_kwargs = _cross_attention_kwargs = _call_attribute("cross_attention_kwargs", "The call's "
                                                                       "cross_attention_kwargs.")
    num_timesteps = _num_timesteps = _call_attribute("num_timesteps", "Model calls in the run.")

    @property
    def do_classifier_free_guidance(self):
        return self.guidance_scale > 1


# ---------------------------------------------------------------- the call's options
def check_call_options(options):
    """Raise a one-line error for a bad value of the reference's call options (options.py calls it)."""
    step_end = options.callback_on_step_end
    if step_end is not None and not callable(step_end):
        raise ValueError("callback_on_step_end must be callable as callback(pipe, step, timestep, callback_kwargs).")
    names = tensor_inputs(options)
    unknown = [n for n in names if n not in CALLBACK_TENSOR_INPUTS]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs {unknown} are not offered; sdkit's step-end "
                         f"callbacks get {', '.join(CALLBACK_TENSOR_INPUTS)}.")
    steps = options.callback_steps
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        raise ValueError(f"callback_steps must be an integer >= 1 (call the callback every that many steps), "
                         f"got {steps!r}.")
    if not isinstance(options.return_dict, bool):
        raise ValueError(f"return_dict must be True or False, got {options.return_dict!r}.")
    if options.timesteps is not None and options.sigmas is not None:
        raise ValueError("pass timesteps or sigmas (a custom schedule), not both.")
    kwargs = options.cross_attention_kwargs
    if kwargs is not None:
        if not isinstance(kwargs, dict) or set(kwargs) - {"scale"}:
            raise ValueError(f"cross_attention_kwargs takes only {{'scale': s}} (the LoRA weight) in sdkit, got {kwargs!r}.")
        scale = kwargs.get("scale", 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise ValueError(f"cross_attention_kwargs['scale'] must be a finite number, got {scale!r}.")


def tensor_inputs(options):
    """The names a step-end callback gets: its own ``tensor_inputs`` (a reference PipelineCallback) or the option's."""
    names = getattr(options.callback_on_step_end, "tensor_inputs", None) or options.callback_on_step_end_tensor_inputs
    return [names] if isinstance(names, str) else list(names)


def lora_adapters(pipe, options):
    """The call's ``adapters`` after ``cross_attention_kwargs={"scale": s}``, the reference's LoRA scale: every
    adapter the call uses (``adapters=``, else the set_adapters choice; not fused ones) at its weights times s.

    Without adapters the scale changes nothing, as in the reference; A1111 prompt tags keep their own weights.
    """
    from .adapters import adapter_weight

    scale = (options.cross_attention_kwargs or {}).get("scale", 1.0)
    if scale == 1.0:
        return options.adapters
    chosen = options.adapters
    if chosen is None:
        registry = pipe._networks
        with registry.lock:
            fused = registry.fused[0] if registry.fused else ()
            chosen = {n: registry.weights[n] for n in registry.active if n not in fused}
    return {name: tuple(w * scale for w in adapter_weight(weight, f"adapters[{name!r}]"))
            for name, weight in chosen.items()}


def set_timesteps(scheduler, options, device, run_options):
    """The run's state: ``num_inference_steps``, or the call's custom ``timesteps`` / ``sigmas`` (the reference's
    retrieve_timesteps, which then runs len(timesteps) steps)."""
    strength = options.denoising_strength
    for kind in ("timesteps", "sigmas"):
        values = getattr(options, kind)
        if values is not None:
            type(scheduler).check_custom_schedule(kind)
            return scheduler.set_timesteps(None, device=device, strength=strength, **{kind: values}, **run_options)
    return scheduler.set_timesteps(options.num_inference_steps, device=device, strength=strength, **run_options)


def returned(output, options):
    """The call's result as the reference returns it: the output, or (images, nsfw_content_detected)."""
    return output if options.return_dict else (output.images, output.nsfw_content_detected)


# ---------------------------------------------------------------- the callbacks
class StepCallbacks:
    """A call's reference callbacks as hooks of sdkit's loop.

    ``callback_on_step_end(pipe, i, t, callback_kwargs)`` runs after every step (after the
    pipeline's own after-step, e.g. inpainting's blend, as in the reference); the dict it returns
    may replace ``latents`` and ``prompt_embeds``. The older ``callback(i, t, latents)`` runs every
    ``callback_steps`` steps. The loop stops when either returns False (sdkit's form) or a callback
    set ``pipe._interrupt = True`` (the reference's).
    """

    def __init__(self, pipe, options, run, conditioning):
        self.options, self.run, self.conditioning = options, run, conditioning
        self.state = CallState(pipe, options.guidance_scale, options.guidance_rescale, options.clip_skip,
                               options.cross_attention_kwargs, len(run.state.timesteps))
        self.step_end = options.callback_on_step_end
        self.names = tensor_inputs(options)
        self.index = 0  # loop index of the next step-end call

    @contextlib.contextmanager
    def active(self):
        """The pipeline's per-call attributes answer from this call while the loop runs."""
        token = _current.set(self.state)
        try:
            yield
        finally:
            _current.reset(token)

    def wrap(self, start, run):
        """The start with the step-end callback after its own after-step hook, and the run with
        guidance that follows the call's scale and embeddings (a callback may change them)."""
        if self.step_end is None:
            return start, run
        inner = start.after_step

        def after_step(latents, state):
            if inner is not None:
                latents = inner(latents, state)
            return self._step_end(latents)

        return (dataclasses.replace(start, after_step=after_step),
                dataclasses.replace(run, guidance=self._guidance(run.guidance)))

    def _prompt_embeds(self, prompt):
        """The UNet's encoder_hidden_states as the reference names them: [negative; prompt] with guidance."""
        if self.state.context is not None:
            return self.state.context
        return torch.cat([prompt.uncond, prompt.cond]) if self.run.guidance.needs_uncond else prompt.cond

    def _step_end(self, latents):
        i = self.index
        self.index += 1
        prompt = self.conditioning.at(i)

        def tensor(name):
            if name == "latents":
                return latents
            return self._prompt_embeds(prompt) if name == "prompt_embeds" else prompt.uncond

        kwargs = {name: tensor(name) for name in self.names}
        out = self.step_end(self.state.pipe, i, self.run.state.timesteps[i], kwargs)
        if not isinstance(out, dict):
            raise TypeError(f"callback_on_step_end returned {type(out).__name__}; return the callback_kwargs dict "
                            f"(the pipeline takes 'latents' and 'prompt_embeds' from it).")
        embeds = out.get("prompt_embeds")
        if embeds is not None and embeds is not kwargs.get("prompt_embeds"):
            self.state.context = embeds
        return out.get("latents", latents)

    def _guidance(self, base):
        """The run's guidance piece until a callback changes the scale or the embeddings; then the reference's
        guidance at the new scale on the callback's embeddings ([negative; prompt] above scale 1)."""
        state, scale = self.state, self.state.guidance_scale

        def piece(model):
            guided = base(model)

            def following(x, call):
                if state.context is None and state.guidance_scale == scale:
                    return guided(x, call)
                return guidance_for(state.guidance_scale, state.guidance_rescale)(model)(x, self._changed(call))

            return following

        return piece

    def _changed(self, call):
        """The model call with the embeddings a callback set, split as the current scale uses them."""
        context, cfg = self.state.context, self.state.guidance_scale > 1
        if context is None:
            if cfg and call.prompt.uncond is None:
                raise ValueError("a callback raised guidance_scale above 1 in a call that started without guidance; "
                                 "start the call with guidance_scale > 1.")
            return call
        prompt = PromptEmbeds(*reversed(context.chunk(2))) if cfg else PromptEmbeds(context)  # (2B, T, D) -> two (B, T, D)
        return dataclasses.replace(call, prompt=prompt)

    def callback(self, i, t, latents):
        """The loop's callback: ``callback`` after every model call, or, with ``callback_steps``, where the
        reference's older form calls it (every callback_steps steps, not in a warm-up); False stops the run."""
        old, every = self.options.callback, self.options.callback_steps
        if old is not None and (every is None or self._reference_callback_step(i, every)) and old(i, t, latents) is False:
            return False
        return False if self.state.interrupt else None

    def _reference_callback_step(self, i, every):
        """Whether the reference calls ``callback`` after loop index ``i``: past the warm-up model calls (PNDM's
        repeated first step), at the last call or after each full step, every ``every`` steps."""
        state, order = self.run.state, self.run.scheduler.order
        warmup = len(state.schedule) - state.num_inference_steps * order
        last = i == len(state.timesteps) - 1
        return (last or (i + 1 > warmup and (i + 1) % order == 0)) and i % every == 0
