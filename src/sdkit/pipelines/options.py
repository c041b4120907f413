"""The options of a pipeline call: declared, documented and checked once, per pipeline a few more.

A call's options are a frozen dataclass (``pipe.options_class``); ``pipe(...)`` builds one from its
arguments, which checks everything that does not depend on the pipeline's parts. The pipeline
checks the rest (image size against its VAE, latents against its UNet).
"""

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Optional

import torch

from ..text_chunks import DEFAULT_COMMA_PADDING_BACKTRACK
from .adapters import check_network_options
from .compat import check_call_options
from .prompting import check_prompt_options, embeds_count

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def _is_int(value, low=1):
    return not isinstance(value, bool) and isinstance(value, int) and value >= low


def check_fraction(name, value, note=""):
    """Raise unless ``value`` is a real number (not a bool) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1]{note}, got {value!r}.")


def _strings(value):
    return isinstance(value, (list, tuple)) and all(isinstance(p, str) for p in value)


@dataclass(frozen=True)
class CallOptions:
    """What every pipeline call takes (the reference's names and defaults).

    prompt: a string or a list of strings (one image group per prompt).
    negative_prompt: replaces the empty unconditional prompt; a string or one per prompt.
    height, width: image size in pixels, multiples of the VAE's downsampling factor.
    num_inference_steps: sampler steps (img2img/inpaint run int(steps * strength) of them).
    guidance_scale: classifier-free guidance weight, a finite number >= 0; from 0 to 1 it runs the
        conditional half only (no guidance, the same images as 1), as diffusers does.
    num_images_per_prompt: images made for each prompt.
    generator: a torch.Generator, or a list with one per image (image k then equals the same
        image made alone with that generator).
    eta: the ``eta`` run option of the schedulers that have one (DDIM's noise weight; A1111's
        ancestral and SDE samplers' noise); None keeps each scheduler's default (0 for DDIM, 1 for
        the A1111 ones, as in A1111). Schedulers without eta warn when it is set and not 0.
    output_type: "pil" (list of images), "np" (B, H, W, 3) float [0, 1], "pt" (B, 3, H, W) tensor
        in [0, 1], or "latent" (the final latents, not decoded).
    callback: ``callback(step, timestep, latents)`` after every scheduler step (step counts from
        0, latents are the new ones); return False to stop the run there. A stopped run decodes
        the latents it has and returns ``interrupted=True``.
    scheduler: an sdkit scheduler for this call only (default: ``pipe.scheduler``).
    guidance_rescale: in [0, 1]; matches the guided prediction's std to the conditional one's by
        this fraction (Lin et al. 2024; 0.7 there, 0 = off as in diffusers).
    scheduler_options: further run options of the scheduler for this call, e.g. ``{"order": 2}``
        for LMSDiscreteScheduler (``scheduler.option_names()`` lists them).
    prompt_syntax: "plain" reads prompts as the reference does (one window of tokens, no syntax);
        "a1111" as stable-diffusion-webui does: (x:1.2) weights, prompts past 75 tokens, BREAK,
        [from:to:when] and [a|b] (per step), AND (composable diffusion); see pipelines/prompting.py.
    prompt_embeds, negative_prompt_embeds: embeddings instead of text, as the reference takes them
        ((B, T, D) tensors of one shape), or what ``pipe.encode_prompt`` returns.
    clip_skip: with "plain", the reference's clip_skip: text-encoder layers skipped (1: the
        penultimate layer's features); like the reference, the negative prompt ignores it.
    clip_stop_at_last_layers: with "a1111", A1111's "Clip skip": 1 is the last layer, 2 the
        penultimate (= clip_skip 1), for prompt and negative prompt; no effect on SD 2, as in A1111.
    comma_padding_backtrack: with "a1111", A1111's setting: when a 75-token chunk fills up, text
        after a comma among its last this-many tokens moves to the next chunk (0: off).
    adapters: the LoRA adapters of this call only, ``{name: weight}`` (a weight may be a pair
        (text_encoder_weight, unet_weight)), whatever set_adapters chose; ``{}`` for none. Names are
        adapters loaded with load_lora_weights. The pipeline's shared weights never change.
    lora_dirs: folders where "a1111" prompts' ``<lora:name:w>`` tags find ``name.safetensors`` (when no
        adapter of that name is loaded); a tag's weights replace those ``adapters`` gives it.
    embedding_dirs: folders of textual-inversion embeddings whose file stems are trigger words for
        this call (besides those loaded with load_textual_inversion).
    allow_pickle: let this call read .pt / .ckpt / .bin files from lora_dirs and embedding_dirs
        (through torch.load(weights_only=True)).
    allow_large: run even when the memory estimate of this size and batch exceeds the memory at
        hand (``sdkit.pipelines.memory``); by default such a call is refused before it starts.
    deep_cache_interval: DeepCache (Ma et al. 2023): the whole UNet runs on every this-many-th
        model call and only its shallow path on the others, on the deep features kept from the
        last whole call (1: off, the exact images; 3 is about 2x faster, changing them slightly).
    deep_cache_branch: the skip connection whose deep features are kept (0, the shallowest, is
        fastest; deeper branches recompute more and change the images less).
    guidance_end: the fraction of model calls that run classifier-free guidance, from the
        first (1: all, the exact images); the rest run the conditional half alone, which halves
        their cost. AND prompts keep guidance at every call.
    seed: A1111 seeds instead of ``generator``: image k of the batch uses seed + k with its own
        generator for its initial noise and every later draw (sdkit.noise.SeedNoise).
    subseed, subseed_strength: A1111's variation seed: the initial noise is slerped this far
        (0-1) towards the noise of subseed + k (every image then uses ``seed`` itself, as in A1111).
    seed_resize_from_w, seed_resize_from_h: A1111's "Seed resize from": the noise is drawn at
        this size (pixels) and pasted centred, so a seed keeps its composition at another size.
    rng: the random number source: "cpu" (default; the same numbers on any device), "gpu" (the
        device's generator, A1111's default) or "nv" (Philox: an NVIDIA card's numbers anywhere).
    eta_noise_seed_delta: A1111's ENSD: draws after the initial noise use seed + k + ENSD.
    callback_on_step_end: the reference's ``callback(pipe, step, timestep, callback_kwargs)`` after
        every step; ``callback_kwargs`` holds the tensors named in ``callback_on_step_end_tensor_inputs``
        ("latents", "prompt_embeds", "negative_prompt_embeds"), and the dict it returns may replace
        "latents" and "prompt_embeds". Setting ``pipe._interrupt = True`` in it stops this call only.
    callback_steps: call ``callback`` every this many steps (the reference's older form).
    return_dict: False returns the reference's tuple (images, nsfw_content_detected).
    timesteps, sigmas: a custom schedule instead of ``num_inference_steps`` (e.g. ``AysSchedules``),
        for the schedulers whose ``custom_schedules`` list it (as in the reference).
    cross_attention_kwargs: only ``{"scale": s}``, the reference's LoRA scale: the call's adapters at their
        weights times s (compat.lora_adapters).
    """

    positional: ClassVar[tuple] = ("prompt",)  # the arguments a call may give by position

    prompt: Any = None
    negative_prompt: Any = None
    height: Optional[int] = None
    width: Optional[int] = None
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    num_images_per_prompt: int = 1
    generator: Any = None
    eta: Optional[float] = None
    output_type: str = "pil"
    callback: Optional[Callable] = None
    scheduler: Any = None
    guidance_rescale: float = 0.0
    scheduler_options: Optional[dict] = None
    prompt_syntax: str = "plain"
    prompt_embeds: Any = None
    negative_prompt_embeds: Any = None
    clip_skip: Optional[int] = None
    clip_stop_at_last_layers: Optional[int] = None
    comma_padding_backtrack: int = DEFAULT_COMMA_PADDING_BACKTRACK
    adapters: Optional[dict] = None
    lora_dirs: Any = None
    embedding_dirs: Any = None
    allow_pickle: bool = False
    allow_large: bool = False
    deep_cache_interval: int = 1
    deep_cache_branch: int = 0
    guidance_end: float = 1.0
    seed: Optional[int] = None
    subseed: Optional[int] = None
    subseed_strength: float = 0.0
    seed_resize_from_w: int = 0
    seed_resize_from_h: int = 0
    rng: str = "cpu"
    eta_noise_seed_delta: int = 0
    callback_on_step_end: Optional[Callable] = None
    callback_on_step_end_tensor_inputs: Any = ("latents",)
    callback_steps: Optional[int] = None
    return_dict: bool = True
    timesteps: Any = None
    sigmas: Any = None
    cross_attention_kwargs: Optional[dict] = None

    @classmethod
    def from_call(cls, args, kwargs):
        """The options of ``pipe(*args, **kwargs)``; an unknown name is a TypeError listing the known."""
        if len(args) > len(cls.positional):
            raise TypeError(f"a pipeline call takes at most {len(cls.positional)} positional arguments "
                            f"({', '.join(cls.positional)}), got {len(args)}; pass the rest by name.")
        twice = [name for name in cls.positional[:len(args)] if name in kwargs]
        if twice:
            raise TypeError(f"got {twice[0]!r} both by position and by name.")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(kwargs) - set(names))
        if unknown:
            raise TypeError(f"unknown call options {unknown}; this pipeline takes {', '.join(names)}.")
        return cls(**dict(zip(cls.positional, args)), **kwargs)

    @property
    def prompts(self):
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def prompt_count(self):
        """Prompts in the call: given as text, or rows of ``prompt_embeds``."""
        return len(self.prompts) if self.prompt is not None else embeds_count(self.prompt_embeds, "prompt_embeds")

    @property
    def negative_prompts(self):
        """One negative prompt per prompt, or None (the empty prompt)."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * self.prompt_count
        return list(self.negative_prompt)

    @property
    def batch_size(self):
        return self.prompt_count * self.num_images_per_prompt

    @property
    def denoising_strength(self):
        """How much of the schedule the run covers (1: all of it, from pure noise)."""
        return 1.0

    def __post_init__(self):
        if self.prompt_embeds is None and not (isinstance(self.prompt, str) or (_strings(self.prompt) and self.prompt)):
            raise ValueError(f"prompt must be a string or a non-empty list of strings (or pass prompt_embeds), "
                             f"got {self.prompt!r}.")
        check_prompt_options(self)
        check_network_options(self)
        negative = self.negative_prompt
        if negative is not None and not isinstance(negative, str):
            if not _strings(negative):
                raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative!r}.")
            if len(negative) != self.prompt_count:
                raise ValueError(f"negative_prompt has {len(negative)} entries for {self.prompt_count} "
                                 f"prompts: pass one string, or a list with one per prompt.")
        if not _is_int(self.num_inference_steps):
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {self.num_inference_steps!r}.")
        if not _is_int(self.num_images_per_prompt):
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {self.num_images_per_prompt!r}.")
        scale = self.guidance_scale
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale) \
                or scale < 0:
            raise ValueError(f"guidance_scale must be a finite number >= 0 (0 to 1: no guidance; 7.5 is "
                             f"usual), got {scale!r}.")
        check_fraction("guidance_rescale", self.guidance_rescale, " (0: off; 0.7 in Lin et al. 2024)")
        if self.output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={self.output_type!r} is not one of {OUTPUT_TYPES}.")
        if self.callback is not None and not callable(self.callback):
            raise ValueError("callback must be callable as callback(step, timestep, latents).")
        if not isinstance(self.allow_large, bool):
            raise ValueError(f"allow_large must be True or False, got {self.allow_large!r}.")
        if self.scheduler_options is not None and not isinstance(self.scheduler_options, dict):
            raise ValueError(f"scheduler_options must be a dict of run options, got {self.scheduler_options!r}.")
        if not _is_int(self.deep_cache_interval):
            raise ValueError(f"deep_cache_interval must be an integer >= 1 (1: off; 2-5 trade detail for "
                             f"speed), got {self.deep_cache_interval!r}.")
        if not _is_int(self.deep_cache_branch, low=0):
            raise ValueError(f"deep_cache_branch must be an integer >= 0 (0: the shallowest), "
                             f"got {self.deep_cache_branch!r}.")
        check_fraction("guidance_end", self.guidance_end, " (1: guidance at every step)")
        self._check_generator()
        self._check_seeds()
        check_call_options(self)

    def _check_seeds(self):
        from ..noise import RNG_SOURCES, check_seed

        if self.seed is None:
            given = [name for name in ("subseed", "subseed_strength", "seed_resize_from_w", "seed_resize_from_h",
                                       "eta_noise_seed_delta") if getattr(self, name)]
            if given:
                raise ValueError(f"{', '.join(given)} need A1111 seeds: pass seed= too.")
            return
        if self.generator is not None:
            raise ValueError("pass either generator (torch generators) or seed (A1111 seeds), not both.")
        check_seed("seed", self.seed)
        check_fraction("subseed_strength", self.subseed_strength, " (A1111's variation strength)")
        if self.subseed is not None:
            check_seed("subseed", self.subseed)
        elif self.subseed_strength:
            raise ValueError("subseed_strength needs a subseed (the variation seed) too.")
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            if not _is_int(getattr(self, name), low=0):
                raise ValueError(f"{name} must be a whole number of pixels >= 0 (0: off), got {getattr(self, name)!r}.")
        if not _is_int(self.eta_noise_seed_delta, low=0):
            raise ValueError(f"eta_noise_seed_delta must be a whole number >= 0, got {self.eta_noise_seed_delta!r}.")
        if self.rng not in RNG_SOURCES:
            raise ValueError(f"rng={self.rng!r} is not a random number source; use one of {', '.join(RNG_SOURCES)}.")

    def seed_noise(self, device, factor):
        """The call's A1111 random numbers (a SeedNoise), or None when it uses torch generators."""
        from ..noise import SeedNoise, a1111_seeds

        if self.seed is None:
            return None
        seeds, subseeds = a1111_seeds(self.seed, self.batch_size, self.subseed, self.subseed_strength)
        return SeedNoise(seeds, self.rng, device, subseeds, self.subseed_strength,
                         (self.seed_resize_from_w, self.seed_resize_from_h), factor, self.eta_noise_seed_delta)

    def _check_generator(self):
        generator, batch_size = self.generator, self.batch_size
        if isinstance(generator, (list, tuple)):
            if len(generator) != batch_size:
                raise ValueError(f"Got {len(generator)} generators for {batch_size} images (prompts x "
                                 f"num_images_per_prompt): pass one generator, or a list of {batch_size}.")
            if not all(isinstance(g, torch.Generator) for g in generator):
                raise ValueError("generator list must hold torch.Generator objects only.")
        elif generator is not None and not isinstance(generator, torch.Generator):
            raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}.")


@dataclass(frozen=True)
class TextToImageOptions(CallOptions):
    """And: latents: (B, C, h, w) initial noise to use instead of drawing it (scaled by the
    scheduler's init_noise_sigma, as drawn noise is). height, width default to the UNet's
    sample_size times the VAE factor."""

    latents: Optional[torch.Tensor] = None

    def __post_init__(self):
        super().__post_init__()
        latents = self.latents
        if latents is not None and not (isinstance(latents, torch.Tensor) and latents.is_floating_point()):
            kind = f"a {latents.dtype} tensor" if isinstance(latents, torch.Tensor) else \
                f"{type(latents).__module__}.{type(latents).__name__}"
            raise ValueError(f"latents must be a float torch.Tensor (B, C, h, w), got {kind}; convert it "
                             f"with torch.as_tensor(latents, dtype=torch.float32).")


@dataclass(frozen=True)
class ImageToImageOptions(CallOptions):
    """And: image: PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1] (or uint8), or a list or
    batch: one image, one per prompt, or one per output image. strength: in [0, 1]; the run starts
    int(num_inference_steps * strength) steps before the end, at that step's noise level (1.0:
    pure noise, the input only sets the mean). height, width default to the image's size rounded
    down to the VAE factor; the image is resized (Lanczos for PIL) when they differ."""

    positional: ClassVar[tuple] = ("prompt", "image")

    image: Any = None
    strength: float = 0.8

    @property
    def denoising_strength(self):
        return self.strength

    def __post_init__(self):
        super().__post_init__()
        if self.image is None:
            raise ValueError("image is required: the picture to start from (PIL image, array or tensor).")
        check_fraction("strength", self.strength)
        if int(self.num_inference_steps * self.strength) < 1:
            raise ValueError(f"strength={self.strength} with num_inference_steps={self.num_inference_steps} "
                             f"runs int({self.num_inference_steps} * {self.strength}) = 0 denoising steps; "
                             f"raise strength or num_inference_steps.")


@dataclass(frozen=True)
class InpaintOptions(ImageToImageOptions):
    """And: mask_image: same size as image; white (>= 0.5) is repainted, black kept. PIL (any mode,
    read as gray), (H, W) array or (1, H, W) tensor in [0, 1]. strength: 1.0 (the default) starts
    the masked region from pure noise. paste_back: put the original pixels back outside the mask
    after decoding (default: on for 4-channel UNets, off for inpainting UNets). mask_blur: width
    in pixels of the feathered edge, which lies inside the mask (unmasked pixels are kept exactly)."""

    positional: ClassVar[tuple] = ("prompt", "image", "mask_image")

    mask_image: Any = None
    strength: float = 1.0
    paste_back: Optional[bool] = None
    mask_blur: int = 4

    def __post_init__(self):
        super().__post_init__()
        if self.mask_image is None:
            raise ValueError("mask_image is required: white where the image is repainted, black where kept.")
        if not _is_int(self.mask_blur, low=0):
            raise ValueError(f"mask_blur must be a whole number of pixels >= 0, got {self.mask_blur!r}.")
