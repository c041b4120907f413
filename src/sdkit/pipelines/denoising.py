"""The pieces the denoising loop calls: a model function composed per call, and its conditioning.

The loop (``DiffusionPipeline._denoise``) knows only ``model(x, call) -> prediction``. A pipeline
composes that function for each call from small pieces, innermost first:

    unet_model(unet, deep_cache)     # the UNet on call.context (DeepCache: the shallow path on most calls)
    -> with_extra_channels(extra)    # inpainting UNets: mask and masked-image latents appended
    -> ClassifierFreeGuidance(s, phi) or ConditionalOnly()   # owns the [uncond, cond] batch
       (TruncatedGuidance: the conditional model alone after a fraction of the calls)

Each piece is ``piece(model) -> model``. The conditioning is asked for the prompt of each model
call (``conditioning.at(index)``), so a prompt may change from step to step. A new feature
(ControlNet residuals, a cached UNet, per-call adapter weights, a prompt schedule) is a new piece
or conditioning, not an edit of the loop.
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Optional

import torch


@dataclass(frozen=True)
class PromptEmbeds:
    """The text conditioning of one model call: (B, T, D) embeddings, and the negative ones for guidance."""

    cond: torch.Tensor  # (B, T, D) the prompts', one row per image
    uncond: Optional[torch.Tensor] = None  # (B, T, D) the negative (or empty) prompts'; None without guidance

    def at(self, index):
        """The same conditioning at every model call."""
        return self


@dataclass(frozen=True)
class ModelCall:
    """Where the run is at one model call, and what conditions it."""

    timestep: torch.Tensor  # the scheduler's timestep, as the UNet takes it
    index: int  # model calls made before this one in the run
    state: Any  # the scheduler state at this call (read only)
    prompt: PromptEmbeds  # the conditioning for this call (conditioning.at(index))
    context: Optional[torch.Tensor] = None  # (B', T, D) the UNet's encoder_hidden_states, set by guidance


def unet_model(unet, deep_cache=None):
    """The innermost piece: ``unet(x, t, context)``; with a :class:`DeepCache`, ``deep_cache_model``."""
    if deep_cache is not None and deep_cache.interval > 1:
        return deep_cache_model(unet, deep_cache)

    def model(x, call):
        return unet(x, call.timestep, call.context)

    return model


@dataclass(frozen=True)
class DeepCache:
    """DeepCache's settings for one run (Ma et al. 2023, arXiv 2312.00858; their ``cache_interval`` and
    ``cache_branch_id``): the whole UNet on every ``interval``-th model call, the shallow path of
    ``branch`` on the others."""

    interval: int  # 1: every call runs the whole UNet (off)
    branch: int = 0  # the skip connection at which deep features are cached; 0 is the shallowest


def deep_cache_model(unet, deep_cache):
    """The UNet with DeepCache: model call i runs the whole UNet when i % interval == 0 (and keeps its
    deep features), else only the shallow path on the features kept last (``deep_cache_forward``).

    The features live in this function's closure, made per run, so runs sharing the UNet never see
    each other's. A call whose batch or context shape differs from the kept features' (guidance
    that stopped, ``guidance_end``) runs the whole UNet.
    """
    kept = {}  # (x shape, context shape) -> deep features of the last full call

    def model(x, call):
        key = (tuple(x.shape), tuple(call.context.shape))
        deep = kept.get(key) if call.index % deep_cache.interval else None
        prediction, deep = unet.deep_cache_forward(x, call.timestep, call.context, deep_cache.branch, deep)
        kept.clear()
        kept[key] = deep
        return prediction

    return model


def with_extra_channels(extra):
    """A piece that appends (b, c, h, w) channels to the UNet input, repeated to its batch (inpainting UNets)."""

    def piece(model):
        def wrapped(x, call):
            repeats = x.shape[0] // extra.shape[0]  # guidance runs [uncond; cond]: the same channels twice
            return model(torch.cat([x, extra.repeat(repeats, 1, 1, 1)], dim=1), call)

        return wrapped

    return piece


def classifier_free_guidance(prediction, guidance_scale, guidance_rescale=0.0):
    """eps = eps_uncond + s (eps_cond - eps_uncond) (Ho & Salimans 2022, arXiv 2207.12598).

    ``prediction`` is the model's output on the [uncond; cond] batch (2B, ...). ``guidance_rescale``
    = phi > 0 pulls each guided prediction's standard deviation back towards the conditional one's:
    eps = phi * eps * std(eps_cond) / std(eps) + (1 - phi) * eps (Lin et al. 2024, arXiv 2305.08891,
    section 3.4; they use phi = 0.7). Large scales otherwise overshoot, most visibly with
    zero-terminal-SNR models.
    """
    uncond, cond = prediction.chunk(2)  # (2B, ...) -> two (B, ...)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        dims = tuple(range(1, guided.ndim))
        matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * matched + (1 - guidance_rescale) * guided
    return guided


@dataclass(frozen=True)
class ClassifierFreeGuidance:
    """The guidance piece: one model call on [uncond; cond], combined by ``classifier_free_guidance``."""

    scale: float
    rescale: float = 0.0
    needs_uncond = True  # the pipeline encodes negative prompts for it

    def __call__(self, model):
        def guided(x, call):
            context = torch.cat([call.prompt.uncond, call.prompt.cond])  # (2B, T, D)
            prediction = model(torch.cat([x, x]), dataclasses.replace(call, context=context))
            return classifier_free_guidance(prediction, self.scale, self.rescale)

        return guided


@dataclass(frozen=True)
class ConditionalOnly:
    """No guidance (scale <= 1): the conditional prediction alone, one batch of B."""

    needs_uncond = False

    def __call__(self, model):
        def conditional(x, call):
            return model(x, dataclasses.replace(call, context=call.prompt.cond))

        return conditional


@dataclass(frozen=True)
class TruncatedGuidance:
    """Guidance on the first ``calls`` model calls, the conditional model alone after them: the late,
    low-noise steps cost one batch of B instead of 2B (the unconditional half is stopped)."""

    guided: Any  # the guidance piece of the first calls (ClassifierFreeGuidance or a subclass)
    calls: int  # model calls that run guided, from the first
    needs_uncond = True

    def __call__(self, model):
        guided, conditional = self.guided(model), ConditionalOnly()(model)

        def truncated(x, call):
            if call.index < self.calls or call.prompt.cond.shape[0] != x.shape[0]:  # AND parts need guidance
                return guided(x, call)
            return conditional(x, call)

        return truncated


def truncate_guidance(guidance, guidance_end, calls):
    """The guidance piece of a run of ``calls`` model calls that guides only the first ``guidance_end``
    fraction of them (ceil(guidance_end * calls)); unchanged when that is all of them or there is no guidance."""
    guided_calls = math.ceil(guidance_end * calls - 1e-9)
    if guided_calls >= calls or not guidance.needs_uncond:
        return guidance
    return TruncatedGuidance(guidance, guided_calls)


def guidance_for(guidance_scale, guidance_rescale=0.0):
    """The guidance piece for a scale: classifier-free guidance above 1, the conditional model otherwise."""
    if guidance_scale > 1.0:
        return ClassifierFreeGuidance(guidance_scale, guidance_rescale)
    return ConditionalOnly()


def compose(model, pieces):
    """Apply pieces innermost first: compose(m, [a, b]) is b(a(m))."""
    for piece in pieces:
        model = piece(model)
    return model
