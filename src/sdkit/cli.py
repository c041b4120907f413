"""The ``sdkit`` command line: ``sdkit generate``, ``sdkit convert`` and ``sdkit train``.

Errors are one line on stderr (exit status 2), never a traceback, and never a partial file: a
run writes all its images to temporary names and renames them into place only when every one
is complete (``sdkit.files.AtomicFiles``), so a failed, interrupted (Ctrl-C) or terminated
(SIGTERM) run leaves the folder as it was.
"""

import argparse
import importlib.util
import math
import os
import random
import re
import signal
import sys
import tempfile
import threading

EXIT_USAGE = 2
EXIT_TERMINATED = 128 + 15  # the shell's status for a SIGTERM
SEED_MAX = 2**64 - 1  # torch generators take 64-bit seeds
RANDOM_SEED = -1  # A1111's "random seed"
ENLARGED_BYTES = 5  # per pixel of an enlarged copy: PIL's 4-byte RGB pixels, plus the PNG encoder's rows
DEFAULT_GUIDANCE = 7.5  # diffusers' default CFG scale
DEFAULT_STEPS = 25  # for models whose folder recommends no step count (recommended_settings.json)


class CLIError(Exception):
    """A user error: printed as one line, no traceback."""


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that temporaries are removed as after Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


# -- A1111 "parameters" text ------------------------------------------------------------------

def format_parameters(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height,
                      model, strength=None, guidance_rescale=0.0, clip_skip=1, model_hash=None):
    """The PNG text A1111 writes and its PNG Info tab reads back.

    A non-zero ``guidance_rescale`` is written as "CFG Rescale phi", the field of A1111's CFG
    rescale extension (A1111 itself has no such setting). ``clip_skip`` is A1111's count (1 = the
    last layer), written as A1111 writes it: only when above 1. ``model_hash`` (a single file's
    :func:`model_hash`) goes before ``Model``, as A1111 writes it.
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [("Steps", steps), ("Sampler", sampler), ("CFG scale", f"{cfg_scale:g}"), ("Seed", seed),
              ("Size", f"{width}x{height}")] + ([("Model hash", model_hash)] if model_hash else []) + \
        [("Model", model)]
    if strength is not None:
        fields.append(("Denoising strength", f"{strength:g}"))
    if clip_skip > 1:
        fields.append(("Clip skip", clip_skip))
    if guidance_rescale:
        fields.append(("CFG Rescale phi", f"{guidance_rescale:g}"))
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')


def parse_parameters(text):
    """Parse A1111's parameters text into a dict (prompt, negative_prompt and the key: value fields)."""
    lines = text.strip().split("\n")
    last = lines[-1] if len(lines) > 1 or "Steps: " in lines[-1] else ""
    body = lines[:-1] if last else lines
    prompt, negative, in_negative = [], [], False
    for line in body:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    result = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        result[key.strip()] = value.strip().strip('"')
    return result


# -- generate -----------------------------------------------------------------------------------

def _default_model():
    import sdkit

    if not os.path.isfile(os.path.join(sdkit.TINY_MODEL, "model_index.json")):
        raise CLIError(f"no --model given and the bundled model is missing at {sdkit.TINY_MODEL} "
                       f"(a broken install?): reinstall sdkit or pass --model PATH_OR_REPO_ID")
    return sdkit.TINY_MODEL


def _check_output(path):
    directory = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(directory):
        raise CLIError(f"output folder {directory} does not exist: create it or choose another -o path")
    if not os.access(directory, os.W_OK):
        raise CLIError(f"output folder {directory} is not writable: choose another -o path")
    if not path.lower().endswith(".png"):
        raise CLIError(f"output {path!r} must end in .png (the settings are stored as PNG text)")


def _check_outputs(paths):
    """Refuse output paths that name a folder, before anything runs."""
    for path in paths:
        if os.path.isdir(path):
            raise CLIError(f"output {path} is a folder: give -o a .png file name")


def output_paths(output, batch):
    """The image paths of a run: ``output`` itself, or NAME-1.png ... NAME-N.png for a batch."""
    stem, ext = os.path.splitext(output)
    return [output] if batch == 1 else [f"{stem}-{i + 1}{ext}" for i in range(batch)]


def enlarged_path(path, scale):
    stem, ext = os.path.splitext(path)
    return f"{stem}.x{scale}{ext}"


def resolve_seed(seed, count=1):
    """The seed a run uses: None or -1 (A1111's "random") draws one; any other must be 0 to 2**64-1,
    with seed + count - 1 too (image k of a batch uses seed + k)."""
    if seed is None or seed == RANDOM_SEED:
        return random.randrange(2**32)
    top = SEED_MAX - (count - 1)
    if not 0 <= seed <= top:
        batch = f" for a batch of {count}" if count > 1 else ""
        raise CLIError(f"--seed {seed} must be -1 (random) or a whole number from 0 to {top}{batch}")
    return seed


def _check_number(option, value, low, high=math.inf, note=""):
    """Refuse a non-finite value, or one outside [low, high], naming the option."""
    if value is not None and not (math.isfinite(value) and low <= value <= high):
        bounds = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise CLIError(f"{option} {value:g} must be a finite number {bounds}{note}")


def _check_args(args):
    """Every check that needs no model: run before torch is imported, so bad options fail at once."""
    if args.steps is not None and args.steps < 1:
        raise CLIError(f"--steps {args.steps} must be at least 1")
    if args.batch < 1:
        raise CLIError(f"--batch {args.batch} must be at least 1")
    if args.clip_skip < 1:
        raise CLIError(f"--clip-skip {args.clip_skip} must be at least 1 (1 = the text encoder's last layer)")
    if not 0.0 <= args.strength <= 1.0:
        raise CLIError(f"--strength {args.strength} must be between 0 and 1")
    _check_number("--guidance", args.guidance, 0, note=" (0 to 1: no guidance; 7.5 is usual)")
    _check_number("--guidance-rescale", args.guidance_rescale, 0, 1)
    _check_number("--guidance-end", args.guidance_end, 0, 1)
    if args.enlarge is not None and args.enlarge < 1:
        raise CLIError(f"--enlarge {args.enlarge} must be at least 1 (1: no enlarged copy)")
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image (the picture to repaint)")
    if args.openvino_precision != "f32" and not args.openvino:
        raise CLIError(f"--openvino-precision {args.openvino_precision} needs --openvino")
    if args.openvino and importlib.util.find_spec("openvino") is None:
        made = f"{args.from_png} was made with OpenVINO: " if args.from_png else ""
        raise CLIError(f'{made}--openvino needs OpenVINO: pip install "sdkit[openvino]"'
                       + (", or pass --no-openvino" if made else ""))
    _check_output(args.output)
    _check_outputs(output_paths(args.output, args.batch))


def _load_image(path, what):
    from PIL import Image, UnidentifiedImageError

    from sdkit.pipelines.images import to_8bit

    try:
        with Image.open(path) as im:
            return to_8bit(im, f"{what} {path}").convert("RGB")
    except FileNotFoundError:
        raise CLIError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{what} {path} is not a readable image: {e}") from None
    except ValueError as e:  # to_8bit: values outside the mode's range
        raise CLIError(str(e)) from None


def _out_of_memory(error):
    """Whether an exception is an allocation failure (Python, torch CPU or CUDA)."""
    import torch

    return isinstance(error, (MemoryError, torch.cuda.OutOfMemoryError)) or "can't allocate memory" in str(error)


def _check_sizes(args, pipe, height, width, scale):
    """Refuse (unless --allow-large) a run or an enlarged copy that would not fit in memory."""
    from sdkit.pipelines import memory

    if args.allow_large:
        return
    error = memory.size_error(pipe, height, width, args.batch, guided=args.guidance > 1)
    if error:
        raise CLIError(f"{error}: lower --width/--height/--batch, or pass --allow-large to try anyway")
    budget = memory.available_bytes("cpu")
    needed = width * height * scale * scale * ENLARGED_BYTES
    if scale > 1 and budget is not None and needed > budget:
        most = max(1, math.isqrt(budget // (width * height * ENLARGED_BYTES)))
        raise CLIError(f"--enlarge {scale} makes a {width * scale}x{height * scale} copy needing about "
                       f"{memory.format_bytes(needed)} but {memory.format_bytes(budget)} is available: use --enlarge "
                       f"{most} or less (1: no copy), or pass --allow-large to try anyway")


def _write_pngs(items):
    """Write every (make_image, path, parameters) item, all or none; a failure is a CLIError naming the file."""
    from PIL import PngImagePlugin

    from sdkit.files import AtomicFiles

    files, path = AtomicFiles(), None
    try:
        for make_image, path, parameters in items:
            info = PngImagePlugin.PngInfo()
            if parameters is not None:
                info.add_text("parameters", parameters)
            make_image().save(files.reserve(path), format="PNG", pnginfo=info)
        path = items[-1][1]
        files.commit()
    except BaseException as e:
        files.discard()
        if isinstance(e, OSError):
            raise CLIError(f"cannot write {path}: {e.strerror or e}; free some disk space or choose another "
                           f"-o path (no image was written)") from None
        if isinstance(e, MemoryError):
            raise CLIError(f"out of memory writing {path}: lower --enlarge (no image was written)") from None
        raise


def _scheduler(name, base, schedule=None, settings=None):
    """The scheduler for --scheduler (a class name, or an A1111 name with --schedule-type) on the model's config."""
    from sdkit import schedulers

    try:
        return schedulers.get_scheduler_class(name).from_config(base.config)
    except ValueError:
        pass
    try:
        return schedulers.from_name(name, {**base.config, **(settings or {})}, schedule=schedule)
    except ValueError as e:
        raise CLIError(f"unknown --scheduler {name!r}: {e}") from None




def sampler_name(scheduler):
    """The A1111 name of a configured sdkit scheduler (its class name when A1111 has none)."""
    from sdkit import schedulers

    return schedulers.a1111_name(scheduler)


def _model_label(model):
    import sdkit

    if os.path.abspath(model) == os.path.abspath(sdkit.TINY_MODEL):
        return "tiny-shapes"
    if os.path.isfile(model):  # a single-file checkpoint: A1111 names it by its stem
        return os.path.splitext(os.path.basename(model))[0]
    return model.rstrip("/")


def _clip_skip_option(args):
    """--clip-skip (A1111's count) as the call option of the chosen prompt syntax."""
    if args.clip_skip == 1:
        return {}
    if args.prompt_syntax == "a1111":
        return {"clip_stop_at_last_layers": args.clip_skip}
    return {"clip_skip": args.clip_skip - 1}  # the reference counts the layers skipped


def _recommended_defaults(args, recommended):
    """Fill in --steps, --guidance, --guidance-rescale and --guidance-end from the model's recommended settings."""
    if args.steps is None:
        args.steps = recommended.get("num_inference_steps", DEFAULT_STEPS)
    if args.guidance is None:
        args.guidance = recommended.get("guidance_scale", DEFAULT_GUIDANCE)
    if args.guidance_rescale is None:
        args.guidance_rescale = recommended.get("guidance_rescale", 0.0)
    if args.guidance_end is None:
        args.guidance_end = recommended.get("guidance_end", 1.0)


def _sha256(path, skip_header=False):
    """The SHA-256 hex digest of a file; ``skip_header``: of a .safetensors file's tensor bytes only."""
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def model_hash(path):
    """A1111's short model hash of a checkpoint file: the first 10 hex digits of its SHA-256."""
    return _sha256(path)[:10]


def lora_hash(path):
    """A1111's short LoRA hash: 12 hex digits of kohya's "addnet" hash for .safetensors (the SHA-256 of
    the bytes after the header, so metadata edits keep it), of the SHA-256 for other files."""
    return _sha256(path, skip_header=path.lower().endswith(".safetensors"))[:12]


def embedding_hash(path):
    """A1111's short embedding hash ("TI hashes"): the first 12 hex digits of the file's SHA-256."""
    return _sha256(path)[:12]


def _network_fields(args, pipe):
    """A1111's "Lora hashes" and "TI hashes" of the LoRA files the prompt's tags name and the embeddings
    the prompt and negative prompt use, as sdkit.infotext fields (((name, hash), ...); names without
    ":" and ",", as A1111 writes them)."""
    from sdkit.embeddings import Triggers, folder_embeddings
    from sdkit.pipelines.adapters import find_lora_file, lora_tags

    def clean(name):
        return name.replace(":", "").replace(",", "")

    fields = []
    if args.prompt_syntax == "a1111" and args.lora_dir:
        paths = [(t.name, find_lora_file(t.name, args.lora_dir)) for t in lora_tags([args.prompt])]
        hashes = tuple((clean(n), lora_hash(p)) for n, p in paths if p)
        if hashes:
            fields.append(("Lora hashes", hashes))
    if args.embeddings_dir:
        embeddings = folder_embeddings(args.embeddings_dir)
        files = {e.name: e.path for e in embeddings}
        triggers = Triggers(embeddings, pipe.tokenizer, pipe.text_encoder.config.hidden_size)
        used = triggers.used(pipe.tokenizer, [args.prompt, args.negative], args.prompt_syntax == "a1111")
        if used:
            fields.append(("TI hashes", tuple((clean(n), embedding_hash(files[n])) for n in used)))
    return fields


def _show_loading_log(quiet):
    """Print how a single file was read (its prediction type and why) on stderr, unless quiet."""
    import logging

    log = logging.getLogger("sdkit.models.single_file")
    if not quiet and not log.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        log.addHandler(handler)
        log.setLevel(logging.INFO)


def _load_pipeline(args, model):
    """The pipeline of a model folder, repo id or single file (with the --vae, --prediction-type,
    --allow-pickle options)."""
    from sdkit.models import AutoencoderKL
    from sdkit.pipelines import StableDiffusionPipeline

    parts = {}
    if getattr(args, "vae", None):
        parts["vae"] = AutoencoderKL.from_single_file(args.vae, allow_pickle=args.allow_pickle)
    if os.path.isfile(model):
        _show_loading_log(getattr(args, "quiet", False))
        return StableDiffusionPipeline.from_single_file(model, prediction_type=args.prediction_type,
                                                        allow_pickle=args.allow_pickle, **parts)
    if args.prediction_type:
        raise CLIError("--prediction-type is for single-file models; a folder's scheduler_config.json says "
                       "what its model predicts")
    return StableDiffusionPipeline.from_pretrained(model, **parts)


def _seed_options(args, seed):
    """The pipeline's A1111 seed options from the command line."""
    w, h = args.seed_resize_from or (0, 0)
    return dict(seed=seed, rng=args.rng, subseed=args.subseed, subseed_strength=args.subseed_strength,
                seed_resize_from_w=w, seed_resize_from_h=h, eta_noise_seed_delta=args.ensd, eta=args.eta,
                scheduler_options=args.scheduler_options or None)


def _infotext(args, scheduler, run_options, seed, subseed, image, model, strength, file_hash, network_fields=()):
    """The A1111 parameters text of one image of this run (CFG scale 0 to 1 runs unguided: written as 1);
    ``network_fields``: the run's "Lora hashes" and "TI hashes" (``_network_fields``)."""
    import sdkit
    from sdkit import infotext

    extra = [("CFG Rescale phi", args.guidance_rescale)] if args.guidance_rescale else []
    extra += [("Guidance end", args.guidance_end)] if args.guidance_end < 1 and args.guidance > 1 else []
    extra += [("OpenVINO", args.openvino_precision)] if args.openvino else []  # the pixels it makes are its own
    extra += list(network_fields)
    return infotext.create(
        args.prompt, args.negative, steps=args.steps, scheduler=scheduler, run_options=run_options,
        cfg_scale=max(args.guidance, 1.0), seed=seed, width=image.width, height=image.height, model=model,
        model_hash=file_hash, denoising_strength=strength, clip_skip=args.clip_skip if args.clip_skip > 1 else None,
        subseed=subseed, subseed_strength=args.subseed_strength, seed_resize_from=args.seed_resize_from or (0, 0),
        ensd=args.ensd, rng=args.rng, extra=extra, version=f"sdkit-{sdkit.__version__}")


def _from_png(args, given):
    """Fill the settings the command line leaves open from an A1111 PNG or parameters text (--from-png)."""
    from sdkit import infotext

    try:
        info = infotext.load(args.from_png)
    except (OSError, ValueError) as e:
        raise CLIError(f"--from-png {args.from_png}: {e}") from None
    unsupported = info.unsupported()
    if unsupported:
        print(f"sdkit: warning: ignoring settings sdkit does not support: {', '.join(unsupported)}", file=sys.stderr)
    sampler, schedule, config, call = infotext.generation_settings(info)
    values = {
        "negative": call["negative_prompt"] or "", "steps": call["num_inference_steps"],
        "guidance": call["guidance_scale"], "seed": call["seed"], "width": call["width"], "height": call["height"],
        "scheduler": sampler, "schedule_type": schedule if sampler not in _class_names() else None,
        "rng": call["rng"], "subseed": call.get("subseed"), "subseed_strength": call.get("subseed_strength", 0.0),
        "ensd": call["eta_noise_seed_delta"], "eta": call.get("eta"),
        "guidance_rescale": call.get("guidance_rescale", 0.0), "guidance_end": call.get("guidance_end", 1.0),
        "seed_resize_from": (call["seed_resize_from_w"], call["seed_resize_from_h"]) if call["seed_resize_from_w"]
        else None,
        "scheduler_options": call.get("scheduler_options"), "strength": call.get("strength", args.strength),
        "clip_skip": call.get("clip_stop_at_last_layers", 1), "prompt_syntax": call["prompt_syntax"],
        "openvino": "OpenVINO" in info, "openvino_precision": str(info.get("OpenVINO", "f32")),
    }
    for name, value in values.items():
        if name not in given:
            setattr(args, name, value)
    if "openvino_precision" not in given:  # the PNG's precision, when it runs with OpenVINO at all
        if not args.openvino:
            args.openvino_precision = "f32"
        elif args.openvino_precision not in ("f32", "bf16"):
            raise CLIError(f"{args.from_png}: its OpenVINO field {args.openvino_precision!r} is not f32 or bf16; "
                           "pass --openvino-precision or --no-openvino")
    if args.prompt is None:
        args.prompt = call["prompt"]
    if sampler not in _class_names():
        args.scheduler_config = {k: v for k, v in config.items() if v is not None}
    if "strength" in call and not args.init_image:
        raise CLIError(f"{args.from_png} was made by img2img (Denoising strength {call['strength']}): "
                       "pass its --init-image")
    if args.model is None:
        model = info.get("Model")
        if model != "tiny-shapes":
            raise CLIError(f"{args.from_png} was made with the model {model!r}: pass --model PATH_OR_REPO_ID")
    elif info.get("Model hash") and os.path.isfile(args.model):
        file_hash = model_hash(args.model)  # reads the whole checkpoint: once
        if file_hash != info.get("Model hash"):
            print(f"sdkit: warning: {args.model} has the hash {file_hash}, the PNG's model "
                  f"{info.get('Model hash')}", file=sys.stderr)


def _class_names():
    from sdkit import schedulers

    return (*schedulers.SCHEDULER_CLASSES, "PLMSScheduler", *schedulers.A1111_CLASSES)


def _size(text):
    """WxH on the command line, e.g. 512x768."""
    m = re.fullmatch(r"(\d+)x(\d+)", text)
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT, e.g. 512x768")
    return int(m.group(1)), int(m.group(2))


def generate(args):
    if args.from_png:
        _from_png(args, getattr(args, "given", set()))
    if args.prompt is None:
        raise CLIError("a prompt is needed (or --from-png IMAGE.png)")
    _check_args(args)
    seed = resolve_seed(args.seed, args.batch)
    if args.seed is None or args.seed == RANDOM_SEED:
        print(f"seed: {seed}")
    init = _load_image(args.init_image, "--init-image") if args.init_image else None
    mask = _load_image(args.mask, "--mask") if args.mask else None

    from sdkit.pipelines import Img2ImgPipeline, InpaintPipeline
    from sdkit.pipelines.img2img import small_image_error

    model = args.model or _default_model()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar is noise here
    try:
        pipe = _load_pipeline(args, model)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CLIError(f"cannot load model {model!r}: {e}") from None
    _recommended_defaults(args, pipe.recommended)
    for name in ("width", "height"):
        value = getattr(args, name)
        error = pipe.size_error(value) if value is not None else None
        if error:
            raise CLIError(f"--{name} {value} {error}")
    f = pipe.vae_scale_factor
    if init is not None and not (args.width and args.height):
        error = small_image_error(*init.size, f)
        if error:
            raise CLIError(f"--init-image {args.init_image} {error} (--width, --height)")
    default_height, default_width = (init.height // f * f, init.width // f * f) if init else pipe.default_size()
    height, width = args.height or default_height, args.width or default_width
    scale = args.enlarge if args.enlarge is not None else (4 if max(height, width) < 256 else 1)
    paths = output_paths(args.output, args.batch)
    if scale > 1:
        _check_outputs(enlarged_path(p, scale) for p in paths)
    _check_sizes(args, pipe, height, width, scale)

    if args.schedule_type and not args.scheduler:
        raise CLIError("--schedule-type needs an A1111 --scheduler name, e.g. --scheduler 'DPM++ 2M'")
    from sdkit.schedulers import SCHEDULE_LABELS, sigma_schedules

    if args.schedule_type and sigma_schedules.schedule_type(args.schedule_type) is None:
        raise CLIError(f"unknown --schedule-type {args.schedule_type!r}: use one of "
                       f"{', '.join(SCHEDULE_LABELS.values())}")
    scheduler = _scheduler(args.scheduler, pipe.scheduler, args.schedule_type, args.scheduler_config) \
        if args.scheduler else pipe.scheduler
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative or None, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.batch, height=args.height,
                  width=args.width, scheduler=scheduler, guidance_rescale=args.guidance_rescale,
                  guidance_end=args.guidance_end,
                  prompt_syntax=args.prompt_syntax, lora_dirs=args.lora_dir, embedding_dirs=args.embeddings_dir,
                  allow_pickle=args.allow_pickle, **_clip_skip_option(args), **_seed_options(args, seed),
                  allow_large=True)  # _check_sizes has checked, or --allow-large was given
    strength = None
    if mask is not None:
        pipe, strength = InpaintPipeline(**pipe.components), args.strength
        kwargs.update(image=init, mask_image=mask, strength=args.strength)
    elif init is not None:
        pipe, strength = Img2ImgPipeline(**pipe.components), args.strength
        kwargs.update(image=init, strength=args.strength)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    if args.openvino:
        try:
            pipe.compile(backend="openvino", precision=args.openvino_precision)
        except (ImportError, ValueError) as e:
            raise CLIError(str(e)) from None
    try:
        images = pipe(**kwargs).images
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None
    except (MemoryError, RuntimeError) as e:
        if not _out_of_memory(e):
            raise
        raise CLIError(f"out of memory generating {width}x{height} x {args.batch}: lower --width/--height/"
                       f"--batch (nothing was written)") from None

    from sdkit.noise import a1111_seeds

    run_options = dict(args.scheduler_options or {})
    if args.eta is not None and "eta" in scheduler.option_names():
        run_options["eta"] = args.eta
    run_options = scheduler.make_options(**run_options)
    seeds, subseeds = a1111_seeds(seed, args.batch, args.subseed, args.subseed_strength)
    file_hash = model_hash(model) if os.path.isfile(model) else None
    network_fields = _network_fields(args, pipe)
    items, shown = [], []
    for i, (image, path) in enumerate(zip(images, paths)):
        params = _infotext(args, scheduler, run_options, seeds[i], subseeds[i] if subseeds else None, image,
                           _model_label(model), strength, file_hash, network_fields).text
        items.append((lambda image=image: image, path, params))
        shown.append(path)
        if scale > 1:
            from PIL import Image

            big = enlarged_path(path, scale)
            items.append((lambda image=image: image.resize((image.width * scale, image.height * scale),
                                                           Image.NEAREST), big, None))
            shown.append(f"{big} (enlarged {scale}x for viewing)")
    _write_pngs(items)
    print("\n".join(shown))
    return 0


# -- convert ------------------------------------------------------------------------------------

DTYPES = ("fp32", "fp16", "bf16")


def convert(args):
    """A diffusers folder -> one .safetensors file, a file -> a folder, a .ckpt -> a .safetensors file."""
    import torch

    source, target = args.input, args.output
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}.get(args.dtype)
    if not os.path.exists(source):
        raise CLIError(f"{source} does not exist")
    if os.path.exists(target):
        raise CLIError(f"{target} already exists: sdkit convert does not overwrite; choose a new OUT")
    parent = os.path.dirname(os.path.abspath(target))
    if not os.path.isdir(parent):
        raise CLIError(f"output folder {parent} does not exist: create it or choose another OUT")
    to_file = target.lower().endswith(".safetensors")
    if os.path.isdir(source) and not to_file:
        raise CLIError(f"{source} is a folder: convert it to a file (OUT ending in .safetensors)")
    from transformers.utils import logging as hf_logging

    from sdkit.models.single_file import convert_file
    from sdkit.pipelines import InpaintPipeline, StableDiffusionPipeline

    hf_logging.disable_progress_bar()
    _show_loading_log(False)
    try:
        if os.path.isdir(source):
            StableDiffusionPipeline.from_pretrained(source).save_single_file(target, dtype)
        elif to_file:
            convert_file(source, target, allow_pickle=args.allow_pickle, dtype=dtype)
        else:
            pipe = StableDiffusionPipeline.from_single_file(source, prediction_type=args.prediction_type,
                                                            torch_dtype=dtype, allow_pickle=args.allow_pickle)
            if pipe.unet.config.in_channels == 2 * pipe.vae.config.latent_channels + 1:
                pipe = InpaintPipeline.from_pipe(pipe)  # recorded as an inpainting pipeline
            _save_folder(pipe, target)
    except (FileNotFoundError, ValueError, TypeError, OSError) as e:
        raise CLIError(f"cannot convert {source}: {e}") from None
    print(target)
    return 0


def _save_folder(pipe, target):
    """save_pretrained into a temporary folder beside ``target``, renamed into place when complete."""
    import shutil

    tmp = tempfile.mkdtemp(dir=os.path.dirname(os.path.abspath(target)), prefix=".sdkit-")
    try:
        pipe.save_pretrained(tmp)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _add_single_file_options(parser):
    parser.add_argument("--allow-pickle", action="store_true",
                        help="read .ckpt/.pt pickles (with torch.load(weights_only=True) and A1111's allow-list)")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"),
                        help="what a single-file model predicts (default: a .yaml beside it, A1111's SD 2 "
                             "test, else epsilon)")


# -- parser -------------------------------------------------------------------------------------

class OneLineParser(argparse.ArgumentParser):
    """argparse, with a usage error as one line ("sdkit: error: ...", exit status 2) like every other error."""

    def error(self, message):
        self.exit(EXIT_USAGE, f"sdkit: error: {message} (see {self.prog} -h)\n")


def build_parser():
    parser = OneLineParser(prog="sdkit", description="sdkit: a small latent-diffusion toolkit")
    sub = parser.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img with --init-image, "
                                        "inpaint with --mask)")
    g.add_argument("prompt", nargs="?")
    g.add_argument("-o", "--output", required=True, help="output PNG path (batch: NAME-1.png, NAME-2.png, ...)")
    g.add_argument("--model", help="model folder, Hugging Face repo id or single-file checkpoint (.safetensors; "
                                   ".ckpt with --allow-pickle) (default: the bundled tiny-shapes model)")
    g.add_argument("--vae", help="a VAE file to use instead of the model's (e.g. vae-ft-mse-840000-ema-pruned"
                                 ".safetensors)")
    _add_single_file_options(g)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, help=f"sampler steps; default: the model's recommended_settings.json, "
                                             f"else {DEFAULT_STEPS}")
    g.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (CFG) >= 0; 0 to 1 is no "
                                                   f"guidance (written as CFG scale 1); default: the model's "
                                                   f"recommended_settings.json, else {DEFAULT_GUIDANCE:g}")
    g.add_argument("--guidance-rescale", type=float,
                   help="guidance rescale phi in [0, 1] (Lin et al. 2024); default: the model's "
                        "recommended_settings.json, else 0")
    g.add_argument("--guidance-end", type=float,
                   help="the fraction of the steps, from the first, that run guidance, in [0, 1] (the rest run "
                        "the prompt alone, and faster); default: the model's recommended_settings.json, else 1")
    g.add_argument("--seed", type=int, help="random seed, 0 to 2**64-1 (-1 or not given: random, printed and "
                                            "written as the seed used; image k of a batch uses seed + k)")
    g.add_argument("--scheduler", help="A1111 sampler name (A1111's sampling), e.g. 'Euler a', 'DPM++ 2M', "
                                       "'DPM++ 2M Karras', or an sdkit class name, e.g. DDIMScheduler; default: "
                                       "the model's recommended_settings.json, else its scheduler_config.json")
    # A1111 scripts' names for --guidance and --scheduler (errors name the main option)
    g.add_argument("--cfg-scale", dest="guidance", type=float, help="the same as --guidance")
    g.add_argument("--sampler", dest="scheduler", help="the same as --scheduler")
    g.add_argument("--prompt-syntax", choices=("a1111", "plain"), default="a1111",
                   help="a1111 (default): read the prompts as A1111 does: (word:1.2), [word], BREAK, more than 75 "
                        "tokens, [from:to:when], [a|b], AND; plain: as the reference pipeline does (one window of "
                        "tokens, no syntax)")
    g.add_argument("--clip-skip", type=int, default=1,
                   help="A1111's Clip skip: 1 (default) uses the text encoder's last layer, 2 the one before, ... "
                        "(no effect on SD 2 models with a1111 syntax, as in A1111)")
    g.add_argument("--lora-dir", action="append", metavar="DIR",
                   help="a folder of LoRA files for the prompt's <lora:name:weight> tags (name = file stem; may "
                        "be given more than once); written to the PNG as Lora hashes")
    g.add_argument("--embeddings-dir", action="append", metavar="DIR",
                   help="a folder of textual-inversion embeddings whose file stems are trigger words (may be "
                        "given more than once); those used are written to the PNG as TI hashes")
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch", type=int, default=1, help="number of images")
    g.add_argument("--init-image", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img/inpaint denoising strength in [0, 1]")
    g.add_argument("--mask", help="inpainting mask, white = repaint (needs --init-image)")
    g.add_argument("--enlarge", type=int, help="also write a copy enlarged by this factor for viewing "
                                              "(default 4 for images under 256 px; 1 = off)")
    g.add_argument("--allow-large", action="store_true", help="run even when the memory estimate of the "
                                                             "size, batch or --enlarge exceeds the memory at hand")
    g.add_argument("--openvino", action=argparse.BooleanOptionalAction, default=False,
                   help='run the UNet and VAE decoder compiled by OpenVINO (CPU; pip install "sdkit[openvino]"): '
                        "the same images, faster after a first call that compiles each size (cached on disk); "
                        "--no-openvino: eager, also for a --from-png made with OpenVINO")
    g.add_argument("--openvino-precision", choices=("f32", "bf16"), default="f32",
                   help="bf16: bfloat16 on CPUs with bfloat16 instructions, faster but not the same images")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    g.add_argument("--schedule-type", help="A1111 schedule type for an A1111 --scheduler: Automatic, Uniform, "
                                           "Karras, Exponential, Polyexponential, SGM Uniform, KL Optimal, "
                                           "Align Your Steps, Simple, Normal, DDIM, Beta")
    g.add_argument("--rng", choices=("cpu", "gpu", "nv"), default="cpu",
                   help="random number source: cpu (default, the same on any device), gpu (A1111's default) or "
                        "nv (NVIDIA's numbers on any device)")
    g.add_argument("--subseed", type=int, help="A1111 variation seed")
    g.add_argument("--subseed-strength", type=float, default=0.0, help="variation strength in [0, 1]")
    g.add_argument("--seed-resize-from", type=_size, help="A1111 'Seed resize from' WIDTHxHEIGHT")
    g.add_argument("--ensd", type=int, default=0, help="A1111 eta noise seed delta")
    g.add_argument("--eta", type=float, help="eta of the sampler (DDIM noise; A1111 ancestral/SDE noise, default 1)")
    g.add_argument("--from-png", help="regenerate the settings of an A1111 (or sdkit) PNG or a pasted parameters "
                                      "text; other flags override them")
    g.set_defaults(scheduler_config=None, scheduler_options=None)
    c = sub.add_parser("convert", help="convert a diffusers folder to a single .safetensors file (A1111 layout), "
                                       "a single file to a folder, or a .ckpt to .safetensors")
    c.add_argument("input", help="a diffusers pipeline folder or a single-file checkpoint")
    c.add_argument("output", help="OUT.safetensors (a single file) or a new folder")
    c.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep them as they are)")
    _add_single_file_options(c)
    sub.add_parser("train", help="train the VAE or the text-to-image stage (see `sdkit train -h`)",
                   add_help=False)
    return parser


def _given_options(parser, argv):
    """The dests of the generate options named on the command line (they override --from-png)."""
    generate_parser = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices["generate"]
    actions = generate_parser._option_string_actions
    return {actions[t.split("=")[0]].dest for t in argv if t.split("=")[0] in actions}


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _terminate) if in_main_thread else None
    try:
        return _run(argv)
    except Terminated:
        print("sdkit: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    finally:
        if in_main_thread and previous is not None:  # None: a handler installed outside Python
            signal.signal(signal.SIGTERM, previous)


def _run(argv):
    if argv[:1] == ["train"]:
        from sdkit.training.cli import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    if args.command == "generate":
        args.given = _given_options(parser, argv)
    try:
        return convert(args) if args.command == "convert" else generate(args)
    except CLIError as e:
        print(f"sdkit: error: {' '.join(str(e).split())}", file=sys.stderr)  # one line, whatever the cause
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
