"""The ``sdkit`` command line: ``sdkit generate``, ``sdkit convert`` and ``sdkit train``.

Errors are one line on stderr (exit status 2), never a traceback, and never a partial file:
images are written to a temporary name and renamed into place.
"""

import argparse
import os
import random
import re
import sys
import tempfile

EXIT_USAGE = 2
DEFAULT_GUIDANCE = 7.5  # diffusers' default CFG scale
BUNDLED_GUIDANCE = 3.0  # the bundled model's recommended scale and guidance rescale (a sweep is in
BUNDLED_GUIDANCE_RESCALE = 0.7  # assets/tiny-shapes/MODEL_CARD.md)


class CLIError(Exception):
    """A user error: printed as one line, no traceback."""


# -- A1111 "parameters" text ------------------------------------------------------------------

def format_parameters(prompt, negative_prompt, steps, sampler, cfg_scale, seed, width, height,
                      model, strength=None, guidance_rescale=0.0, clip_skip=1, model_hash=None, extra_fields=()):
    """The PNG text A1111 writes and its PNG Info tab reads back.

    A non-zero ``guidance_rescale`` is written as "CFG Rescale phi", the field of A1111's CFG
    rescale extension (A1111 itself has no such setting). ``clip_skip`` is A1111's count (1 = the
    last layer), written as A1111 writes it: only when above 1. ``model_hash`` (a single file's
    :func:`model_hash`) goes before ``Model``, as A1111 writes it. ``extra_fields``: (name, value)
    pairs written last, quoted as A1111 quotes them (``Lora hashes``, ``TI hashes``).
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
    fields += [(k, _quote(v)) for k, v in extra_fields]
    lines.append(", ".join(f"{k}: {v}" for k, v in fields))
    return "\n".join(lines)


def _quote(value):
    """A1111's ``quote``: a value with a comma, colon or line break goes in JSON quotes."""
    import json

    return value if not any(c in value for c in ",:\n") else json.dumps(value)


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


def _save_png(image, path, parameters):
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if parameters is not None:
        info.add_text("parameters", parameters)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), prefix=".sdkit-", suffix=".png")
    os.close(fd)
    try:
        image.save(tmp, format="PNG", pnginfo=info)
        os.replace(tmp, path)
    except BaseException:
        os.remove(tmp)
        raise


def _load_image(path, what):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise CLIError(f"{what} {path} does not exist") from None
    except (UnidentifiedImageError, OSError) as e:
        raise CLIError(f"{what} {path} is not a readable image: {e}") from None


def _scheduler(name, base):
    from sdkit import schedulers

    try:
        return schedulers.get_scheduler_class(name).from_config(base.config)
    except ValueError:
        pass
    try:
        return schedulers.from_name(name, base.config)
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
    the prompt and negative prompt use (``name: hash``, names without ":" and ",")."""
    from sdkit.embeddings import Triggers, folder_embeddings
    from sdkit.pipelines.adapters import find_lora_file, lora_tags

    def clean(name):
        return name.replace(":", "").replace(",", "")

    fields = []
    if args.prompt_syntax == "a1111" and args.lora_dir:
        paths = [(t.name, find_lora_file(t.name, args.lora_dir)) for t in lora_tags([args.prompt])]
        hashes = [f"{clean(n)}: {lora_hash(p)}" for n, p in paths if p]
        if hashes:
            fields.append(("Lora hashes", ", ".join(hashes)))
    if args.embeddings_dir:
        embeddings = folder_embeddings(args.embeddings_dir)
        files = {e.name: e.path for e in embeddings}
        triggers = Triggers(embeddings, pipe.tokenizer, pipe.text_encoder.config.hidden_size)
        used = triggers.used(pipe.tokenizer, [args.prompt, args.negative], args.prompt_syntax == "a1111")
        if used:
            fields.append(("TI hashes", ", ".join(f"{clean(n)}: {embedding_hash(files[n])}" for n in used)))
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


def generate(args):
    import torch

    if args.steps < 1:
        raise CLIError(f"--steps {args.steps} must be at least 1")
    if args.batch < 1:
        raise CLIError(f"--batch {args.batch} must be at least 1")
    if args.clip_skip < 1:
        raise CLIError(f"--clip-skip {args.clip_skip} must be at least 1 (1 = the text encoder's last layer)")
    if not 0.0 <= args.strength <= 1.0:
        raise CLIError(f"--strength {args.strength} must be between 0 and 1")
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image (the picture to repaint)")
    _check_output(args.output)
    init = _load_image(args.init_image, "--init-image") if args.init_image else None
    mask = _load_image(args.mask, "--mask") if args.mask else None

    from sdkit.pipelines import Img2ImgPipeline, InpaintPipeline

    model = args.model or _default_model()
    bundled = _model_label(model) == "tiny-shapes"
    if args.guidance is None:
        args.guidance = BUNDLED_GUIDANCE if bundled else DEFAULT_GUIDANCE
    if args.guidance_rescale is None:
        args.guidance_rescale = BUNDLED_GUIDANCE_RESCALE if bundled else 0.0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar is noise here
    try:
        pipe = _load_pipeline(args, model)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CLIError(f"cannot load model {model!r}: {e}") from None
    for name in ("width", "height"):
        value = getattr(args, name)
        error = pipe.size_error(value) if value is not None else None
        if error:
            raise CLIError(f"--{name} {value} {error}")
    scheduler = _scheduler(args.scheduler, pipe.scheduler) if args.scheduler else pipe.scheduler
    sampler = args.scheduler if args.scheduler else sampler_name(scheduler)
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    if args.seed is None:
        print(f"seed: {seed}")
    generators = [torch.Generator().manual_seed(seed + i) for i in range(args.batch)]
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative or None, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.batch, generator=generators,
                  height=args.height, width=args.width, scheduler=scheduler, guidance_rescale=args.guidance_rescale,
                  prompt_syntax=args.prompt_syntax, lora_dirs=args.lora_dir, embedding_dirs=args.embeddings_dir,
                  allow_pickle=args.allow_pickle, **_clip_skip_option(args))
    strength = None
    if mask is not None:
        pipe, strength = InpaintPipeline(**pipe.components), args.strength
        kwargs.update(image=init, mask_image=mask, strength=args.strength)
    elif init is not None:
        pipe, strength = Img2ImgPipeline(**pipe.components), args.strength
        kwargs.update(image=init, strength=args.strength)
    if args.quiet:
        pipe.set_progress_bar_config(disable=True)
    try:
        images = pipe(**kwargs).images
    except (ValueError, FileNotFoundError) as e:
        raise CLIError(str(e)) from None

    stem, ext = os.path.splitext(args.output)
    file_hash = model_hash(model) if os.path.isfile(model) else None
    network_fields = _network_fields(args, pipe)
    for i, image in enumerate(images):
        path = args.output if args.batch == 1 else f"{stem}-{i + 1}{ext}"
        params = format_parameters(args.prompt, args.negative, args.steps, sampler, args.guidance, seed + i,
                                   image.width, image.height, _model_label(model), strength, args.guidance_rescale,
                                   args.clip_skip, model_hash=file_hash, extra_fields=network_fields)
        _save_png(image, path, params)
        print(path)
        scale = args.enlarge if args.enlarge is not None else (4 if max(image.size) < 256 else 1)
        if scale > 1:
            from PIL import Image

            big = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
            big_path = f"{os.path.splitext(path)[0]}.x{scale}{ext}"
            _save_png(big, big_path, None)
            print(f"{big_path} (enlarged {scale}x for viewing)")
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

def build_parser():
    parser = argparse.ArgumentParser(prog="sdkit", description="sdkit: a small latent-diffusion toolkit")
    sub = parser.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img with --init-image, "
                                        "inpaint with --mask)")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", required=True, help="output PNG path (batch: NAME-1.png, NAME-2.png, ...)")
    g.add_argument("--model", help="model folder, Hugging Face repo id or single-file checkpoint (.safetensors; "
                                   ".ckpt with --allow-pickle) (default: the bundled tiny-shapes model)")
    g.add_argument("--vae", help="a VAE file to use instead of the model's (e.g. vae-ft-mse-840000-ema-pruned"
                                 ".safetensors)")
    _add_single_file_options(g)
    g.add_argument("--negative", default="", help="negative prompt")
    g.add_argument("--steps", type=int, default=25)
    g.add_argument("--guidance", type=float, help=f"classifier-free guidance scale (CFG); default "
                                                   f"{DEFAULT_GUIDANCE:g}, {BUNDLED_GUIDANCE:g} for the bundled model")
    g.add_argument("--guidance-rescale", type=float,
                   help=f"guidance rescale phi in [0, 1] (Lin et al. 2024); default 0, "
                        f"{BUNDLED_GUIDANCE_RESCALE:g} for the bundled model")
    g.add_argument("--seed", type=int, help="random seed (random and printed when not given; image k of a "
                                            "batch uses seed + k)")
    g.add_argument("--scheduler", help="scheduler class name or A1111 sampler name, e.g. 'Euler a', "
                                       "'DPM++ 2M Karras', DDIMScheduler")
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
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c = sub.add_parser("convert", help="convert a diffusers folder to a single .safetensors file (A1111 layout), "
                                       "a single file to a folder, or a .ckpt to .safetensors")
    c.add_argument("input", help="a diffusers pipeline folder or a single-file checkpoint")
    c.add_argument("output", help="OUT.safetensors (a single file) or a new folder")
    c.add_argument("--dtype", choices=DTYPES, help="cast the weights (default: keep them as they are)")
    _add_single_file_options(c)
    sub.add_parser("train", help="train the VAE or the text-to-image stage (see `sdkit train -h`)",
                   add_help=False)
    return parser


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["train"]:
        from sdkit.training.cli import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return convert(args) if args.command == "convert" else generate(args)
    except CLIError as e:
        print(f"sdkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
