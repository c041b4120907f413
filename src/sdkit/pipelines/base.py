"""What txt2img, img2img and inpaint share: parts, loading, the call, the denoising loop, decoding.

A pipeline holds only its parts (declared in ``parts``) and settings; each call keeps its run
state (options, scheduler state, latents, generators) in locals, so one pipeline can serve many
threads at once. A call goes:

    options = pipe.options_class(...)          # checked once (options.py)
    conditioning = pipe.prepare_conditioning(run, options)   # per-step prompt embeddings
    start = pipe.prepare_start(run, options)   # initial latents, model pieces, after-step, finish
    model = pipe.prepare_model(run, start)     # unet -> pieces -> guidance (denoising.py)
    latents = pipe._denoise(model, conditioning, start, run, callback)   # the one loop

Each pipeline adds only its options and its ``prepare_start``. LoRA adapters and textual-inversion
embeddings (adapters.py) are chosen per call (``run.networks``) and never change shared weights.
"""

import copy
import dataclasses
import os
import threading
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from .. import per_call
from ..files import plain_modes
from ..noise import SeedNoise
from ..schedulers import Scheduler
from ..schedulers.schedules import randn
from . import compat, loading, memory, prompting
from . import recommended as recommended_settings
from .adapters import NO_NETWORKS, AdapterLoaderMixin, with_adapters
from .denoising import DeepCache, ModelCall, classifier_free_guidance, compose, truncate_guidance, unet_model
from .images import to_output
from .options import CallOptions
from .performance import PerformanceSettings


@dataclass
class PipelineOutput:
    images: Any  # list of PIL images | (B, H, W, 3) float array | (B, 3, H, W) tensor | latents
    interrupted: bool = False  # True when the callback stopped the run before its last step
    nsfw_content_detected: Any = None  # the reference's safety-checker flags: None, sdkit has no checker


@dataclass(frozen=True)
class Run:
    """The per-call settings every stage needs, passed explicitly (never kept on self)."""

    batch_size: int  # images in this call: len(prompts) * num_images_per_prompt
    height: int
    width: int
    generator: Any  # None, a torch.Generator, a list with one per image, or an A1111 SeedNoise
    scheduler: Scheduler
    state: Any  # the scheduler state at the start of the run
    guidance: Callable  # the guidance piece (denoising.ClassifierFreeGuidance or ConditionalOnly)
    device: torch.device
    dtype: torch.dtype  # the UNet's dtype: latents and context are kept in it
    networks: Any = NO_NETWORKS  # the call's LoRA plans and embeddings (adapters.CallNetworks)
    deep_cache: Optional[DeepCache] = None  # DeepCache settings of the run (None: off)


@dataclass(frozen=True)
class Start:
    """How a run begins, what it adds to the model, and what it does besides denoising."""

    latents: torch.Tensor  # (B, C, h, w) initial latents, already scaled by the scheduler
    pieces: tuple = ()  # model pieces applied inside the guidance (denoising.with_extra_channels, ...)
    after_step: Optional[Callable] = None  # after_step(latents, state) -> latents, after each step
    finish: Optional[Callable] = None  # finish(images in [0, 1]) -> images, after decoding


def encode_latents(vae, images, batch_size, generator, dtype):
    """Scaled VAE latents z * scaling_factor of (b, 3, H, W) images in [-1, 1], one per batch item.

    With a list of generators the images are first repeated to the batch and each is sampled with
    its own generator (so image k does not depend on the others); with one generator the distinct
    images are sampled together and then repeated, in the reference's order of random draws.
    """
    images = images.to(device=vae.device, dtype=vae.dtype)
    if isinstance(generator, SeedNoise):
        generator = generator.posterior_generators
    if isinstance(generator, (list, tuple)):
        images = repeat_to_batch(images, batch_size, "image")
        latents = torch.cat([vae.encode(images[i:i + 1]).sample(generator[i]) for i in range(batch_size)])
    else:
        latents = repeat_to_batch(vae.encode(images).sample(generator), batch_size, "image")
    return (latents * vae.config.scaling_factor).to(dtype)


def check_finite(x, what, options=None):
    """Raise a ValueError unless ``x`` is all finite: NaN or inf would become black images."""
    if torch.isfinite(x).all():
        return
    scale = getattr(options, "guidance_scale", None)
    hint = (f"guidance_scale={scale:g} is far above the usual 1-15: lower it" if scale is not None and scale > 30
            else "check the model files, the sampler settings and (in float16) load the model in float32")
    raise ValueError(f"The {what} contain NaN or inf values, which would be written as black pixels; {hint}. "
                     f"No image was made.")


def repeat_to_batch(x, batch_size, what):
    """Repeat a (b, ...) tensor to (batch_size, ...): b must be 1, the batch, or divide it evenly."""
    b = x.shape[0]
    if b == batch_size:
        return x
    if batch_size % b:
        raise ValueError(f"Got {b} {what}s for {batch_size} images: pass one {what}, one per prompt, "
                         f"or one per image.")
    return x.repeat_interleave(batch_size // b, dim=0)


class DiffusionPipeline(AdapterLoaderMixin, compat.CallStateMixin, PerformanceSettings):
    """Base of the Stable Diffusion pipelines. Build from parts, or with ``from_pretrained``.

    ``recommended`` (a ``recommended.RecommendedSettings``, read from the folder's
    recommended_settings.json by ``from_pretrained``) fills in the call options a call does not pass.
    The reference's per-call attributes (``pipe._interrupt``, ``pipe.guidance_scale``, ...) answer
    from the call running in this thread, inside its callbacks only (compat.py).
    """

    reference_class_name = "StableDiffusionPipeline"  # written to model_index.json
    parts = loading.STABLE_DIFFUSION  # the parts this pipeline needs (loading.Part)
    options_class = CallOptions  # the options of a call

    def __init__(self, recommended=None, **parts):
        parts, _ = loading.reference_keywords(type(self).__name__, parts, loading=False)  # safety_checker=None, ...
        names = [p.name for p in self.parts]
        missing = [n for n in names if n not in parts]
        unknown = sorted(set(parts) - set(names))
        if missing or unknown:
            raise TypeError(f"{type(self).__name__} takes the parts {', '.join(names)}"
                            + (f"; missing {missing}" if missing else "")
                            + (f"; unknown {unknown}" if unknown else "") + ".")
        for part in self.parts:
            if part.check is not None:
                part.check(parts[part.name])
            setattr(self, part.name, parts[part.name])
        if "scheduler" in parts:
            self.scheduler = loading.reference_scheduler(self.scheduler, type(self).__name__)
        if recommended is not None and not isinstance(recommended, recommended_settings.RecommendedSettings):
            raise TypeError(f"recommended must be a RecommendedSettings (sdkit.pipelines.recommended), "
                            f"got {type(recommended).__name__}.")
        self.recommended = recommended or recommended_settings.RecommendedSettings()  # read-only: frozen
        self._progress_bar_config = {}
        self._fp32_vae = None  # lazily made float32 copy of a half-precision VAE (NaN guard)
        self._fp32_lock = threading.Lock()
        self._warned_upcast = False

    # -- parts ------------------------------------------------------------------------------------
    @property
    def components(self):
        """The parts by name; ``OtherPipeline(**pipe.components)`` shares them (no copy)."""
        return {p.name: getattr(self, p.name) for p in self.parts}

    @classmethod
    def from_pipe(cls, pipe, **overrides):
        """A pipeline of this class on the same parts as `pipe` (weights shared, not copied), with its
        recommended settings."""
        overrides, _ = loading.reference_keywords(cls.__name__, overrides, loading=False)
        names = [p.name for p in cls.parts]
        unknown = sorted(set(overrides) - set(names))
        if unknown:
            raise TypeError(f"from_pipe got unknown parts {unknown}; {cls.__name__}'s parts are {names}.")
        shared = {n: getattr(pipe, n) for n in names if hasattr(pipe, n)}
        new = cls(recommended=getattr(pipe, "recommended", None), **{**shared, **overrides})
        new._progress_bar_config = dict(pipe._progress_bar_config)
        if not {"unet", "text_encoder"} & set(overrides):  # the same layers: the same LoRAs and embeddings
            new._network_registry = pipe._networks
        return new

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, torch_dtype=None, variant=None,
                        local_files_only=False, **components):
        """Load a diffusers-layout pipeline folder or Hub repo id (model_index.json + part folders).

        ``DiffusionPipeline.from_pretrained`` loads the class that the folder's model_index.json
        names. Parts given as keywords (``scheduler=...``, ``vae=...``) replace the folder's. Parts sdkit
        does not use (safety_checker, feature_extractor) are skipped. The reference's loading
        keywords that mean something here are taken: ``use_safetensors``, ``revision``,
        ``cache_dir``, ``token``, ``low_cpu_mem_usage`` and the "no safety checker" forms
        (``safety_checker=None``, ``requires_safety_checker=False``; see ``loading.reference_keywords``).
        The folder's recommended_settings.json, if any, becomes ``pipe.recommended`` (and its
        scheduler, unless one is passed, ``pipe.scheduler``).
        """
        if cls is DiffusionPipeline:  # the reference's generic loader: the class model_index.json names
            from .auto import from_index

            return from_index(pretrained_model_name_or_path, torch_dtype=torch_dtype, variant=variant,
                              local_files_only=local_files_only, **components)
        components, hub = loading.reference_keywords(cls.__name__, components)
        names = [p.name for p in cls.parts]
        unknown = sorted(set(components) - set(names))
        if unknown:
            raise TypeError(f"from_pretrained got unknown arguments {unknown}; parts that can be "
                            f"passed are {names}.")
        folder = loading.resolve_pipeline_folder(pretrained_model_name_or_path, cls.parts, variant,
                                                 local_files_only, hub)
        parts = loading.load_components(folder, cls.parts, torch_dtype=torch_dtype, variant=variant,
                                        skip=tuple(components))
        settings = recommended_settings.read(folder)
        if "scheduler" in parts:
            try:
                parts["scheduler"] = settings.scheduler_for(parts["scheduler"])
            except ValueError as e:
                raise ValueError(f"{folder / recommended_settings.FILE}: {e}") from None
        return cls(recommended=settings, **{**parts, **components})

    @classmethod
    def from_single_file(cls, path, prediction_type=None, torch_dtype=None, allow_pickle=False, use_ema=False,
                         **components):
        """Load a single-file checkpoint (A1111 / CompVis layout, SD 1.x or 2.x), with no config and offline.

        The architecture is read from the tensor shapes. ``prediction_type``: "epsilon" or
        "v_prediction"; when None, a ``.yaml`` beside the file decides (A1111's convention), else
        for SD 2 A1111's test, else epsilon (logged). ``.ckpt`` pickles load only with
        ``allow_pickle=True``; ``use_ema=True`` reads the file's EMA weights. Parts given as keywords
        replace the file's: ``vae=`` takes an AutoencoderKL or the path of a VAE file.
        """
        from ..models.single_file import load_parts

        components, _ = loading.reference_keywords(cls.__name__, components, loading=False)
        names = [p.name for p in cls.parts]
        unknown = sorted(set(components) - set(names))
        if unknown:
            raise TypeError(f"from_single_file got unknown arguments {unknown}; parts that can be "
                            f"passed are {names}.")
        return cls(**load_parts(path, names, prediction_type, torch_dtype, allow_pickle, use_ema, components))

    def save_single_file(self, path, dtype=None):
        """Write one ``.safetensors`` file in the A1111 / CompVis layout (atomically; floats cast to ``dtype``).

        A1111, ComfyUI and the CompVis code load it; the SD 2 text encoder goes back to the OpenCLIP
        layout. Parts the layout cannot describe (e.g. non-standard norm groups or heads) are refused.
        """
        from ..models.single_file import save_pipeline

        save_pipeline(self.components, path, dtype)

    def save_pretrained(self, save_directory):
        """Write a folder that sdkit and diffusers both load (model_index.json + one folder per part,
        and recommended_settings.json when ``recommended`` holds any)."""
        os.makedirs(save_directory, exist_ok=True)
        for part in self.parts:
            obj, folder = getattr(self, part.name), os.path.join(save_directory, part.name)
            os.makedirs(folder, exist_ok=True)
            with plain_modes(folder):  # transformers' parts write some files 0600
                if part.save is not None:
                    part.save(obj, folder)
                else:
                    obj.save_pretrained(folder)
        loading.write_model_index(save_directory, self.reference_class_name, self.parts, self.components)
        recommended_settings.write(save_directory, self.recommended)

    def to(self, *args, **kwargs):
        """Move or cast the models, like ``nn.Module.to``: ``pipe.to("cuda")``, ``pipe.to(torch.float16)``."""
        for part in self.components.values():
            if isinstance(part, torch.nn.Module):
                part.to(*args, **kwargs)
        with self._fp32_lock:
            self._fp32_vae = None
        return self

    @property
    def device(self):
        """Where calls run: the UNet's device, or the accelerator while offloading (performance.py)."""
        return self._execution_device if self._execution_device is not None else self.unet.device

    @property
    def dtype(self):
        return self.unet.dtype

    @property
    def vae_scale_factor(self):
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def image_processor(self):
        """The reference's ``pipe.image_processor`` (``preprocess`` / ``postprocess``) for this VAE's factor."""
        from .image_processor import VaeImageProcessor

        return VaeImageProcessor(self.vae_scale_factor)

    def progress_bar(self, iterable=None, total=None):
        """A tqdm bar with ``set_progress_bar_config``'s options, as the reference's ``pipe.progress_bar``."""
        from tqdm.auto import tqdm

        if iterable is None and total is None:
            raise ValueError("progress_bar needs an iterable or a total.")
        return tqdm(iterable, total=total, **self._progress_bar_config)

    def default_size(self):
        """(height, width) of images when a call gives none: the UNet's sample size times the VAE factor."""
        side = self.unet.config.sample_size * self.vae_scale_factor
        return side, side

    def size_error(self, value):
        """Why ``value`` cannot be an image side (None if it can): sides are positive multiples of the VAE factor."""
        f = self.vae_scale_factor
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % f:
            near = max(f, int(value) // f * f) if isinstance(value, (int, float)) else 64 * f
            return f"must be a positive multiple of {f} (the VAE's downsampling factor); use e.g. {near}"
        return None

    def check_size(self, height, width):
        """Raise unless height and width are valid image sides (``size_error``; the CLI uses it too)."""
        for name, value in (("height", height), ("width", width)):
            error = self.size_error(value)
            if error:
                raise ValueError(f"{name}={value!r} {error}.")

    def set_progress_bar_config(self, **kwargs):
        """tqdm options for the per-call progress bar, e.g. ``disable=True``."""
        self._progress_bar_config.update(kwargs)

    # -- the call ---------------------------------------------------------------------------------
    def __call__(self, *args, **kwargs):
        """Generate images. The options, with their meaning and defaults, are ``self.options_class``
        (``help(type(pipe).options_class)``); ``prompt`` (and ``image``, ``mask_image``) may be given
        by position. Options the call does not pass come from ``self.recommended`` (the model folder's
        recommended_settings.json), else the reference's defaults. Returns a PipelineOutput with
        ``.images`` and ``.interrupted``."""
        options = self.options_class.from_call(args, {**self.recommended.call_defaults(), **kwargs})
        with self._call_guard():
            return self._generate(options)

    def image_size(self, options):
        """(height, width) of this call's images: the options', else the pipeline's default."""
        default_height, default_width = self.default_size()
        return options.height or default_height, options.width or default_width

    def prepare_conditioning(self, run, options):
        """The prompt embeddings of every model call (``.at(index)``): the same at every step, or
        A1111's per-step schedule (prompting.py)."""
        networks = run.networks
        request = prompting.request_for_call(options, run.guidance.needs_uncond,
                                             networks.triggers(self.tokenizer, self.text_encoder))
        with per_call.using(networks.text_encoder):
            return prompting.conditioning(self.text_encoder, self.tokenizer, request, options.num_images_per_prompt,
                                          run.device, run.dtype)

    def encode_prompt(self, prompt, negative_prompt=None, prompt_syntax="plain", clip_skip=None,
                      clip_stop_at_last_layers=None, num_inference_steps=None,
                      comma_padding_backtrack=prompting.DEFAULT_COMMA_PADDING_BACKTRACK, adapters=None,
                      lora_dirs=None, embedding_dirs=None, allow_pickle=False):
        """(prompt_embeds, negative_prompt_embeds) a call with these prompts would use, for
        ``pipe(prompt_embeds=..., negative_prompt_embeds=...)``.

        (B, T, D) tensors of one shape (the negative prompt defaults to the empty one), or, for
        A1111 prompts that change during the run or use AND, ``prompting.ScheduledPromptEmbeds``
        (those need ``num_inference_steps``, the call's step count). ``clip_skip`` is the
        reference's (layers skipped; "plain" only), ``clip_stop_at_last_layers`` A1111's Clip skip
        (1 = last layer; "a1111" only). One row per prompt: a call repeats them per image. The text
        encoder's LoRA weights and the embeddings are those a call with these options would use.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        networks = self.networks_for_call(prompts, prompt_syntax, adapters, lora_dirs, embedding_dirs, allow_pickle)
        with torch.no_grad(), per_call.using(networks.text_encoder):  # not inference mode: callers may edit them
            return prompting.encode_prompt(self.text_encoder, self.tokenizer, prompt, negative_prompt, prompt_syntax,
                                           clip_skip, clip_stop_at_last_layers, num_inference_steps,
                                           comma_padding_backtrack, self.device, self.dtype,
                                           networks.triggers(self.tokenizer, self.text_encoder))

    def prepare_start(self, run, options):
        """How the run starts (the pipeline's own part): a :class:`Start`."""
        raise NotImplementedError

    def prepare_model(self, run, start):
        """The model function of this run: the UNet (with the call's LoRAs), then the start's pieces, then
        the guidance."""
        return compose(unet_model(self._unet_for_run(run), run.deep_cache),
                       [with_adapters(run.networks.unet), *start.pieces, run.guidance])

    def _scheduler_options(self, scheduler, options):
        """The run options for the scheduler: ``scheduler_options`` plus ``eta`` where it has one."""
        run_options = dict(options.scheduler_options or {})
        if "eta" in scheduler.option_names():
            if options.eta is not None:
                run_options.setdefault("eta", options.eta)
        elif options.eta:
            warnings.warn(f"eta={options.eta} is ignored: {type(scheduler).__name__} has no eta "
                          f"(DDIMScheduler has).", stacklevel=4)
        return run_options

    def _generate(self, options):
        """Check, encode the prompts, set the timesteps, start, denoise, decode."""
        height, width = self.image_size(options)
        self.check_size(height, width)
        scheduler = self.scheduler if options.scheduler is None else options.scheduler
        loading.check_scheduler(scheduler)
        run_options = self._scheduler_options(scheduler, options)

        with torch.inference_mode():
            device, dtype = self.device, self.dtype
            state = compat.set_timesteps(scheduler, options, device, run_options)  # steps, or custom timesteps / sigmas
            guidance = truncate_guidance(prompting.guidance_for_call(options), options.guidance_end,
                                         len(state.timesteps))
            adapters = compat.lora_adapters(self, options)  # adapters=, scaled by cross_attention_kwargs["scale"]
            networks = self.networks_for_call(options.prompts if options.prompt is not None else None,
                                              options.prompt_syntax, adapters, options.lora_dirs,
                                              options.embedding_dirs, options.allow_pickle)
            self._check_memory(options, height, width, guidance)
            seed_noise = options.seed_noise(device, self.vae_scale_factor)
            generator = options.generator if seed_noise is None else seed_noise
            run = Run(options.batch_size, height, width, generator, scheduler, state, guidance, device, dtype,
                      networks, deep_cache=DeepCache(options.deep_cache_interval, options.deep_cache_branch))
            conditioning = self.prepare_conditioning(run, options)
            start = self.prepare_start(run, options)
            start = dataclasses.replace(start, latents=scheduler.begin(start.latents, state, generator))
            callbacks = compat.StepCallbacks(self, options, run, conditioning)  # the reference's callbacks
            start, run = callbacks.wrap(start, run)
            model = self.prepare_model(run, start)
            with callbacks.active():
                latents, interrupted = self._denoise(model, conditioning, start, run, callbacks.callback)
            check_finite(latents, "denoised latents", options)
            if options.output_type == "latent":
                return compat.returned(PipelineOutput(latents, interrupted), options)
            images = (self._decode(latents, options) * 0.5 + 0.5).clamp(0, 1)
            if start.finish is not None:
                images = start.finish(images)
            return compat.returned(PipelineOutput(to_output(images, options.output_type), interrupted), options)

    def _denoise(self, model, conditioning, start, run, callback):
        """The denoising loop every pipeline shares: ``model(x, call)``, then the scheduler's step.

        A scheduler that needs several model calls per step lists each call's timestep in its
        state, so every iteration is one model call. Returns (latents, interrupted).
        """
        scheduler, state, latents = run.scheduler, run.state, start.latents
        timesteps = state.timesteps
        from tqdm.auto import tqdm

        with tqdm(total=len(timesteps), **self._progress_bar_config) as bar:
            for i, t in enumerate(timesteps):
                call = ModelCall(t, i, state, conditioning.at(i))
                prediction = model(scheduler.scale_model_input(latents, t, state), call)
                out = scheduler.step(prediction, t, latents, state, generator=run.generator)
                latents, state = out.prev_sample, out.state
                if start.after_step is not None:
                    latents = start.after_step(latents, state)
                bar.update()
                if callback is not None and callback(i, t, latents) is False:
                    return latents, i + 1 < len(timesteps)
        return latents, False

    def _check_memory(self, options, height, width, guidance):
        """Refuse a call whose memory estimate exceeds the memory at hand (``memory.size_error``)."""
        if options.allow_large:
            return
        error = memory.size_error(self, height, width, options.batch_size, guidance.needs_uncond,
                                  decode=options.output_type != "latent")
        if error:
            raise ValueError(f"{error}: lower height, width or the batch, or pass allow_large=True to try anyway.")

    def _decode(self, latents, options=None):
        """Images in about [-1, 1] from latents; a half-precision VAE that overflows is redone in fp32.

        NaN or inf left after that is an error (they would be written as black pixels)."""
        vae = self.vae
        z = latents / vae.config.scaling_factor
        compiled = self._decoder_for(z)  # None unless compiled, and never for a tiled decode
        images = vae.decode(z.to(vae.dtype)) if compiled is None else vae.decode_with(compiled, z)
        if torch.isfinite(images).all():
            return images.float()
        if vae.dtype != torch.float32:
            if not self._warned_upcast:
                self._warned_upcast = True
                warnings.warn(f"The {vae.dtype} VAE overflowed (NaN/inf, which gives black images); decoding "
                              f"again in float32. Load the VAE in float32 (or a fp16-fixed VAE) to skip the "
                              f"second decode.", stacklevel=3)
            images = self._float32_vae().decode(z.float())
        check_finite(images, "decoded images (in float32)", options)
        return images.float()

    def _float32_vae(self):
        with self._fp32_lock:
            if self._fp32_vae is None or self._fp32_vae[0] is not self.vae:
                self._fp32_vae = (self.vae, copy.deepcopy(self.vae).float())
            fp32 = self._fp32_vae[1]
            vars(fp32).update(self.vae.memory_settings())  # tiling or slicing set after the copy was made
            return fp32

    def _noise(self, run, shape):
        """Standard normal (B, ...) noise from the run's generator(s), as the reference draws it."""
        return randn(shape, run.generator, run.device, run.dtype)

    def _latent_shape(self, run):
        f = self.vae_scale_factor
        return (run.batch_size, self.vae.config.latent_channels, run.height // f, run.width // f)


__all__ = ["DiffusionPipeline", "PipelineOutput", "Run", "Start", "classifier_free_guidance",
           "encode_latents", "repeat_to_batch"]
