"""The ``sdkit`` command line: ``sdkit generate`` and ``sdkit train``.

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
                      model, strength=None, guidance_rescale=0.0):
    """The PNG text A1111 writes and its PNG Info tab reads back.

    A non-zero ``guidance_rescale`` is written as "CFG Rescale phi", the field of A1111's CFG
    rescale extension (A1111 itself has no such setting).
    """
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    fields = [("Steps", steps), ("Sampler", sampler), ("CFG scale", f"{cfg_scale:g}"), ("Seed", seed),
              ("Size", f"{width}x{height}"), ("Model", model)]
    if strength is not None:
        fields.append(("Denoising strength", f"{strength:g}"))
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
    return model.rstrip("/")


def _seed_options(args, seed):
    """The pipeline's A1111 seed options from the command line."""
    w, h = args.seed_resize_from or (0, 0)
    return dict(seed=seed, rng=args.rng, subseed=args.subseed, subseed_strength=args.subseed_strength,
                seed_resize_from_w=w, seed_resize_from_h=h, eta_noise_seed_delta=args.ensd, eta=args.eta,
                scheduler_options=args.scheduler_options or None)


def _infotext(args, scheduler, run_options, seed, subseed, image, model, strength):
    """The A1111 parameters text of one image of this run."""
    import sdkit
    from sdkit import infotext

    extra = [("CFG Rescale phi", args.guidance_rescale)] if args.guidance_rescale else []
    return infotext.create(
        args.prompt, args.negative, steps=args.steps, scheduler=scheduler, run_options=run_options,
        cfg_scale=args.guidance, seed=seed, width=image.width, height=image.height, model=model,
        denoising_strength=strength, subseed=subseed, subseed_strength=args.subseed_strength,
        seed_resize_from=args.seed_resize_from or (0, 0), ensd=args.ensd, rng=args.rng, extra=extra,
        version=f"sdkit-{sdkit.__version__}")


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
        "guidance_rescale": call.get("guidance_rescale", 0.0),
        "seed_resize_from": (call["seed_resize_from_w"], call["seed_resize_from_h"]) if call["seed_resize_from_w"]
        else None,
        "scheduler_options": call.get("scheduler_options"), "strength": call.get("strength", args.strength),
    }
    for name, value in values.items():
        if name not in given:
            setattr(args, name, value)
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
    if args.steps < 1:
        raise CLIError(f"--steps {args.steps} must be at least 1")
    if args.batch < 1:
        raise CLIError(f"--batch {args.batch} must be at least 1")
    if not 0.0 <= args.strength <= 1.0:
        raise CLIError(f"--strength {args.strength} must be between 0 and 1")
    if args.mask and not args.init_image:
        raise CLIError("--mask needs --init-image (the picture to repaint)")
    _check_output(args.output)
    init = _load_image(args.init_image, "--init-image") if args.init_image else None
    mask = _load_image(args.mask, "--mask") if args.mask else None

    from sdkit.pipelines import Img2ImgPipeline, InpaintPipeline, StableDiffusionPipeline

    model = args.model or _default_model()
    bundled = _model_label(model) == "tiny-shapes"
    if args.guidance is None:
        args.guidance = BUNDLED_GUIDANCE if bundled else DEFAULT_GUIDANCE
    if args.guidance_rescale is None:
        args.guidance_rescale = BUNDLED_GUIDANCE_RESCALE if bundled else 0.0
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-load "Loading weights" bar is noise here
    try:
        pipe = StableDiffusionPipeline.from_pretrained(model)
    except (FileNotFoundError, ValueError, OSError) as e:
        raise CLIError(f"cannot load model {model!r}: {e}") from None
    for name in ("width", "height"):
        value = getattr(args, name)
        error = pipe.size_error(value) if value is not None else None
        if error:
            raise CLIError(f"--{name} {value} {error}")
    if args.schedule_type and not args.scheduler:
        raise CLIError("--schedule-type needs an A1111 --scheduler name, e.g. --scheduler 'DPM++ 2M'")
    from sdkit.schedulers import SCHEDULE_LABELS, sigma_schedules

    if args.schedule_type and sigma_schedules.schedule_type(args.schedule_type) is None:
        raise CLIError(f"unknown --schedule-type {args.schedule_type!r}: use one of "
                       f"{', '.join(SCHEDULE_LABELS.values())}")
    scheduler = _scheduler(args.scheduler, pipe.scheduler, args.schedule_type, args.scheduler_config) \
        if args.scheduler else pipe.scheduler
    seed = args.seed if args.seed is not None else random.randrange(2**32)
    if args.seed is None:
        print(f"seed: {seed}")
    kwargs = dict(prompt=args.prompt, negative_prompt=args.negative or None, num_inference_steps=args.steps,
                  guidance_scale=args.guidance, num_images_per_prompt=args.batch, height=args.height,
                  width=args.width, scheduler=scheduler, guidance_rescale=args.guidance_rescale,
                  **_seed_options(args, seed))
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
    except ValueError as e:
        raise CLIError(str(e)) from None

    from sdkit.noise import a1111_seeds

    run_options = dict(args.scheduler_options or {})
    if args.eta is not None and "eta" in scheduler.option_names():
        run_options["eta"] = args.eta
    run_options = scheduler.make_options(**run_options)
    stem, ext = os.path.splitext(args.output)
    seeds, subseeds = a1111_seeds(seed, args.batch, args.subseed, args.subseed_strength)
    for i, image in enumerate(images):
        path = args.output if args.batch == 1 else f"{stem}-{i + 1}{ext}"
        params = _infotext(args, scheduler, run_options, seeds[i], subseeds[i] if subseeds else None, image,
                           _model_label(model), strength).text
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


# -- parser -------------------------------------------------------------------------------------

def build_parser():
    parser = argparse.ArgumentParser(prog="sdkit", description="sdkit: a small latent-diffusion toolkit")
    sub = parser.add_subparsers(dest="command")
    g = sub.add_parser("generate", help="make images from a prompt (txt2img, img2img with --init-image, "
                                        "inpaint with --mask)")
    g.add_argument("prompt", nargs="?")
    g.add_argument("-o", "--output", required=True, help="output PNG path (batch: NAME-1.png, NAME-2.png, ...)")
    g.add_argument("--model", help="model folder or Hugging Face repo id (default: the bundled tiny-shapes model)")
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
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("--batch", type=int, default=1, help="number of images")
    g.add_argument("--init-image", help="start from this image (img2img)")
    g.add_argument("--strength", type=float, default=0.75, help="img2img/inpaint denoising strength in [0, 1]")
    g.add_argument("--mask", help="inpainting mask, white = repaint (needs --init-image)")
    g.add_argument("--enlarge", type=int, help="also write a copy enlarged by this factor for viewing "
                                              "(default 4 for images under 256 px; 1 = off)")
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
    if argv[:1] == ["train"]:
        from sdkit.training.cli import main as train_main

        return train_main(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    args.given = _given_options(parser, argv)
    try:
        return generate(args)
    except CLIError as e:
        print(f"sdkit: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("sdkit: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
