"""What txt2img, img2img and inpaint share: loading, prompt encoding, the denoising loop, decoding.

A pipeline holds only its parts (unet, vae, text_encoder, tokenizer, scheduler) and settings; each
call keeps its run state (scheduler state, latents, generators) in locals, so one pipeline can serve
many threads at once. Each pipeline adds only how a run starts (``Start``) and finishes.
"""

import copy
import functools
import inspect
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from ..schedulers import Scheduler
from ..schedulers.schedules import randn
from ..text import encode_prompts
from . import loading
from .images import to_output

OUTPUT_TYPES = ("pil", "np", "pt", "latent")


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images | (B, H, W, 3) float array | (B, 3, H, W) tensor | latents
    interrupted: bool = False  # True when the callback stopped the run before its last step


@dataclass
class Run:
    """The per-call settings every pipeline stage needs, passed explicitly (never kept on self)."""

    batch_size: int  # images in this call: len(prompts) * num_images_per_prompt
    num_images_per_prompt: int
    height: int
    width: int
    generator: Any  # None, a torch.Generator, or a list with one per image
    scheduler: Scheduler
    state: Any  # the scheduler state at the start of the run
    guidance: bool  # classifier-free guidance on (guidance_scale > 1)
    device: torch.device
    dtype: torch.dtype  # the UNet's dtype: latents and context are kept in it


@dataclass
class Start:
    """How a run begins, and what it does besides denoising."""

    latents: torch.Tensor  # (B, C, h, w) initial latents, already scaled by the scheduler
    unet_extra: Optional[torch.Tensor] = None  # channels appended to the UNet input (inpainting UNets)
    blend: Optional[Callable] = None  # blend(latents, next_timestep, state) after each step
    finish: Optional[Callable] = None  # finish(images in [0, 1]) -> images, after decoding


def classifier_free_guidance(prediction, guidance_scale, guidance_rescale=0.0):
    """eps = eps_uncond + s (eps_cond - eps_uncond) (Ho & Salimans 2022, arXiv 2207.12598).

    ``guidance_rescale`` = phi > 0 pulls each guided prediction's standard deviation back towards
    the conditional one's: eps = phi * eps * std(eps_cond) / std(eps) + (1 - phi) * eps (Lin et al.
    2024, arXiv 2305.08891, section 3.4; they use phi = 0.7). Large scales otherwise overshoot,
    most visibly with zero-terminal-SNR models.
    """
    uncond, cond = prediction.chunk(2)  # (2B, ...) -> two (B, ...)
    guided = uncond + guidance_scale * (cond - uncond)
    if guidance_rescale:
        dims = tuple(range(1, guided.ndim))
        matched = guided * (cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
        guided = guidance_rescale * matched + (1 - guidance_rescale) * guided
    return guided


def _check_fraction(name, value, note=""):
    """Raise unless ``value`` is a real number (not a bool) in [0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1]{note}, got {value!r}.")


@functools.lru_cache(maxsize=None)
def _step_parameters(scheduler_class):
    return set(inspect.signature(scheduler_class.step).parameters)


def _check_generator(generator, batch_size):
    if isinstance(generator, (list, tuple)):
        if len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for {batch_size} images (prompts x "
                             f"num_images_per_prompt): pass one generator, or a list of {batch_size}.")
        if not all(isinstance(g, torch.Generator) for g in generator):
            raise ValueError("generator list must hold torch.Generator objects only.")
    elif generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or a list of them, got {type(generator).__name__}.")


def encode_latents(vae, images, batch_size, generator, dtype):
    """Scaled VAE latents z * scaling_factor of (b, 3, H, W) images in [-1, 1], one per batch item.

    With a list of generators the images are first repeated to the batch and each is sampled with
    its own generator (so image k does not depend on the others); with one generator the distinct
    images are sampled together and then repeated, in the reference's order of random draws.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(generator, (list, tuple)):
        images = repeat_to_batch(images, batch_size, "image")
        latents = torch.cat([vae.encode(images[i:i + 1]).sample(generator[i]) for i in range(batch_size)])
    else:
        latents = repeat_to_batch(vae.encode(images).sample(generator), batch_size, "image")
    return (latents * vae.config.scaling_factor).to(dtype)


def repeat_to_batch(x, batch_size, what):
    """Repeat a (b, ...) tensor to (batch_size, ...): b must be 1, the batch, or divide it evenly."""
    b = x.shape[0]
    if b == batch_size:
        return x
    if batch_size % b:
        raise ValueError(f"Got {b} {what}s for {batch_size} images: pass one {what}, one per prompt, "
                         f"or one per image.")
    return x.repeat_interleave(batch_size // b, dim=0)


class DiffusionPipeline:
    """Base of the Stable Diffusion pipelines. Build from parts, or with ``from_pretrained``."""

    reference_class_name = "StableDiffusionPipeline"  # written to model_index.json

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler):
        self._check_scheduler(scheduler)
        self.unet, self.vae = unet, vae
        self.text_encoder, self.tokenizer = text_encoder, tokenizer
        self.scheduler = scheduler
        self._progress_bar_config = {}
        self._fp32_vae = None  # lazily made float32 copy of a half-precision VAE (NaN guard)
        self._fp32_lock = threading.Lock()
        self._warned_upcast = False

    # -- parts ------------------------------------------------------------------------------------
    @property
    def components(self):
        """The parts by name; ``OtherPipeline(**pipe.components)`` shares them (no copy)."""
        return {"unet": self.unet, "vae": self.vae, "text_encoder": self.text_encoder,
                "tokenizer": self.tokenizer, "scheduler": self.scheduler}

    @classmethod
    def from_pipe(cls, pipe, **overrides):
        """A pipeline of this class on the same parts as `pipe` (weights shared, not copied)."""
        unknown = set(overrides) - set(pipe.components)
        if unknown:
            raise TypeError(f"from_pipe got unknown parts {sorted(unknown)}; parts are {list(pipe.components)}.")
        new = cls(**{**pipe.components, **overrides})
        new._progress_bar_config = dict(pipe._progress_bar_config)
        return new

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant=None,
                        local_files_only=False, **components):
        """Load a diffusers-layout pipeline folder or Hub repo id (model_index.json + part folders).

        Parts given as keywords (``scheduler=...``, ``vae=...``) replace the folder's. Parts sdkit
        does not use (safety_checker, feature_extractor) are skipped.
        """
        unknown = set(components) - set(loading.REQUIRED)
        if unknown:
            raise TypeError(f"from_pretrained got unknown arguments {sorted(unknown)}; parts that can be "
                            f"passed are {list(loading.REQUIRED)}.")
        parts = loading.load_components(pretrained_model_name_or_path, torch_dtype=torch_dtype,
                                        variant=variant, local_files_only=local_files_only,
                                        skip=tuple(components))
        return cls(**{**parts, **components})

    def save_pretrained(self, save_directory):
        """Write a folder that sdkit and diffusers both load (model_index.json + one folder per part)."""
        os.makedirs(save_directory, exist_ok=True)
        for name, part in self.components.items():
            part.save_pretrained(os.path.join(save_directory, name))
        loading.write_model_index(save_directory, self.reference_class_name, self.components)

    def to(self, *args, **kwargs):
        """Move or cast the models, like ``nn.Module.to``: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``."""
        for model in (self.unet, self.vae, self.text_encoder):
            model.to(*args, **kwargs)
        with self._fp32_lock:
            self._fp32_vae = None
        return self

    @property
    def device(self):
        return self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the per-call progress bar, e.g. ``disable=True``."""
        self._progress_bar_config.update(kwargs)

    # -- checks -----------------------------------------------------------------------------------
    @staticmethod
    def _check_scheduler(scheduler):
        if not isinstance(scheduler, Scheduler):
            raise TypeError(f"scheduler must be an sdkit scheduler, got {type(scheduler).__module__}."
                            f"{type(scheduler).__name__}; convert one with e.g. "
                            f"sdkit.schedulers.DDIMScheduler.from_config(other.config).")

    def _check_common(self, prompt, negative_prompt, height, width, num_inference_steps,
                      num_images_per_prompt, output_type, callback):
        if isinstance(prompt, str):
            prompts = [prompt]
        elif isinstance(prompt, (list, tuple)) and prompt and all(isinstance(p, str) for p in prompt):
            prompts = list(prompt)
        else:
            raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}.")
        negatives = None
        if negative_prompt is not None:
            if isinstance(negative_prompt, str):
                negatives = [negative_prompt] * len(prompts)
            elif isinstance(negative_prompt, (list, tuple)) and all(isinstance(p, str) for p in negative_prompt):
                if len(negative_prompt) != len(prompts):
                    raise ValueError(f"negative_prompt has {len(negative_prompt)} entries for {len(prompts)} "
                                     f"prompts: pass one string, or a list with one per prompt.")
                negatives = list(negative_prompt)
            else:
                raise ValueError(f"negative_prompt must be a string or a list of strings, got {negative_prompt!r}.")
        f = self.vae_scale_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % f:
                near = max(f, int(value) // f * f) if isinstance(value, (int, float)) else 64 * f
                raise ValueError(f"{name}={value!r} must be a positive multiple of {f} (the VAE's "
                                 f"downsampling factor); use e.g. {near}.")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {num_inference_steps!r}.")
        if isinstance(num_images_per_prompt, bool) or not isinstance(num_images_per_prompt, int) or num_images_per_prompt < 1:
            raise ValueError(f"num_images_per_prompt must be an integer >= 1, got {num_images_per_prompt!r}.")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type={output_type!r} is not one of {OUTPUT_TYPES}.")
        if callback is not None and not callable(callback):
            raise ValueError("callback must be callable as callback(step, timestep, latents).")
        return prompts, negatives

    # -- the shared run ---------------------------------------------------------------------------
    def _generate(self, start, *, prompt, negative_prompt, height, width, num_inference_steps,
                  guidance_scale, num_images_per_prompt, generator, eta, output_type, callback,
                  scheduler, strength=1.0, guidance_rescale=0.0):
        """Check, encode the prompts, set the timesteps, start (``start(run)``), denoise, decode."""
        prompts, negatives = self._check_common(prompt, negative_prompt, height, width, num_inference_steps,
                                                num_images_per_prompt, output_type, callback)
        _check_fraction("strength", strength)
        _check_fraction("guidance_rescale", guidance_rescale, " (0: off; 0.7 in Lin et al. 2024)")
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"strength={strength} with num_inference_steps={num_inference_steps} runs "
                             f"int({num_inference_steps} * {strength}) = 0 denoising steps; raise strength "
                             f"or num_inference_steps.")
        batch_size = len(prompts) * num_images_per_prompt
        _check_generator(generator, batch_size)
        scheduler = self.scheduler if scheduler is None else scheduler
        self._check_scheduler(scheduler)
        guidance = guidance_scale > 1.0

        with torch.inference_mode():
            device, dtype = self.device, self.dtype
            context = encode_prompts(self.text_encoder, self.tokenizer, prompts, negatives,
                                     num_images_per_prompt, guidance, device, dtype)
            state = scheduler.set_timesteps(num_inference_steps, device=device, strength=strength)
            run = Run(batch_size, num_images_per_prompt, height, width, generator, scheduler, state,
                      guidance, device, dtype)
            begin = start(run)
            latents, interrupted = self._denoise(begin, context, run, guidance_scale, guidance_rescale, eta, callback)
            if output_type == "latent":
                return PipelineOutput(latents, interrupted)
            images = (self._decode(latents) * 0.5 + 0.5).clamp(0, 1)
            if begin.finish is not None:
                images = begin.finish(images)
            return PipelineOutput(to_output(images, output_type), interrupted)

    def _denoise(self, begin, context, run, guidance_scale, guidance_rescale, eta, callback):
        """The denoising loop every pipeline shares. Returns (latents, interrupted)."""
        scheduler, state, latents = run.scheduler, run.state, begin.latents
        accepted = _step_parameters(type(scheduler))
        step_kwargs = {"generator": run.generator} if "generator" in accepted else {}
        if "eta" in accepted:
            step_kwargs["eta"] = eta
        elif eta:
            warnings.warn(f"eta={eta} is ignored: {type(scheduler).__name__} has no eta (DDIMScheduler has).",
                          stacklevel=4)
        timesteps = state.timesteps
        from tqdm.auto import tqdm

        with tqdm(total=len(timesteps), **self._progress_bar_config) as bar:
            for i, t in enumerate(timesteps):
                x = torch.cat([latents] * 2) if run.guidance else latents  # (2B, C, h, w) with guidance
                x = scheduler.scale_model_input(x, t, state)
                if begin.unet_extra is not None:
                    x = torch.cat([x, begin.unet_extra], dim=1)
                prediction = self.unet(x, t, context)
                if run.guidance:
                    prediction = classifier_free_guidance(prediction, guidance_scale, guidance_rescale)
                out = scheduler.step(prediction, t, latents, state, **step_kwargs)
                latents, state = out.prev_sample, out.state
                if begin.blend is not None:
                    t_next = timesteps[i + 1] if i + 1 < len(timesteps) else None
                    latents = begin.blend(latents, t_next, state)
                bar.update()
                if callback is not None and callback(i, t, latents) is False:
                    return latents, i + 1 < len(timesteps)
        return latents, False

    def _decode(self, latents):
        """Images in about [-1, 1] from latents; a half-precision VAE that overflows is redone in fp32."""
        vae = self.vae
        z = latents / vae.config.scaling_factor
        images = vae.decode(z.to(vae.dtype))
        if torch.isfinite(images).all():
            return images.float()
        if vae.dtype == torch.float32:
            warnings.warn("The VAE decoded NaN or inf values in float32: the latents or the weights are "
                          "broken (check the model files and the sampler settings).", stacklevel=3)
            return images.float()
        if not self._warned_upcast:
            self._warned_upcast = True
            warnings.warn(f"The {vae.dtype} VAE overflowed (NaN/inf, which gives black images); decoding "
                          f"again in float32. Load the VAE in float32 (or a fp16-fixed VAE) to skip the "
                          f"second decode.", stacklevel=3)
        return self._float32_vae().decode(z.float()).float()

    def _float32_vae(self):
        with self._fp32_lock:
            if self._fp32_vae is None or self._fp32_vae[0] is not self.vae:
                self._fp32_vae = (self.vae, copy.deepcopy(self.vae).float())
            return self._fp32_vae[1]

    def _noise(self, run, shape):
        """Standard normal (B, ...) noise from the run's generator(s), as the reference draws it."""
        return randn(shape, run.generator, run.device, run.dtype)

    def _latent_shape(self, run):
        f = self.vae_scale_factor
        return (run.batch_size, self.vae.config.latent_channels, run.height // f, run.width // f)


__all__ = ["DiffusionPipeline", "PipelineOutput", "Run", "Start", "classifier_free_guidance",
           "encode_latents", "repeat_to_batch"]
