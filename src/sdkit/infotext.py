"""A1111 1.10's "parameters" text (its infotext): write it, read it, and regenerate an image from it.

The text is the prompt, an optional "Negative prompt: ..." (both may span lines), and one line of
``Key: value`` fields joined by ", "; a value holding ",", ":" or a newline is JSON-quoted
(A1111's ``modules/processing.py`` create_infotext and ``modules/infotext_utils.py``
parse_generation_parameters). :func:`parse` reads it into an :class:`Infotext` whose ``text``
gives back the same string; :func:`generation_settings` turns it into sdkit call options, naming
the fields sdkit cannot honour (Hires fix, ADetailer, ControlNet, LoRA, ...); :func:`regenerate`
runs them. An infotext means A1111's prompt syntax (``prompt_syntax="a1111"``, "Clip skip" as
``clip_stop_at_last_layers``).
"""

import dataclasses
import json
import os
import re
import warnings
from dataclasses import dataclass

FIELD = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')  # A1111's re_param
SIZE = re.compile(r"^(\d+)x(\d+)$")
INTEGER = re.compile(r"^-?\d+$")

INT_FIELDS = ("Steps", "Seed", "Clip skip", "ENSD", "Variation seed", "UniPC order")
NUMBER_FIELDS = ("CFG scale", "Denoising strength", "Variation seed strength", "Eta", "Eta DDIM", "Sigma churn",
                 "Sigma tmin", "Sigma tmax", "Sigma noise", "Schedule rho", "Schedule min sigma", "Schedule max sigma",
                 "Beta schedule alpha", "Beta schedule beta", "CFG Rescale phi", "Guidance end")
SIZE_FIELDS = ("Size", "Seed resize from")
HASH_FIELDS = ("Lora hashes", "TI hashes")
FLAG_FIELDS = ("Discard penultimate sigma", "SGM noise multiplier", "Downcast alphas_cumprod",
               "UniPC lower order final")

# fields that change nothing sdkit draws, and the ones it honours (anything else is reported)
INFORMATIONAL = ("Model hash", "Model", "Version", "User", "Init image hash")
HONOURED = ("Steps", "Sampler", "Clip skip", "Schedule type", "CFG scale", "Seed", "Size", "Denoising strength", "ENSD",
            "Variation seed", "Variation seed strength", "Seed resize from", "RNG", "Eta", "Eta DDIM", "Sigma churn",
            "Sigma tmin", "Sigma tmax", "Sigma noise", "Schedule rho", "Schedule min sigma", "Schedule max sigma",
            "Beta schedule alpha", "Beta schedule beta", "Discard penultimate sigma", "SGM noise multiplier",
            "Noise Schedule", "Downcast alphas_cumprod", "CFG Rescale phi", "UniPC variant", "UniPC skip type",
            "UniPC order", "UniPC lower order final", "Guidance end",
            "OpenVINO")  # sdkit's: the precision it ran at (the CLI's --from-png compiles again; in Python, compile)
ZERO_SNR = "Zero Terminal SNR"
V170_TSNR = (1, 7, 0, 225)  # A1111 versions before v1.7.0-225 sampled with float16 alpha_bar


def quote(text):
    """A field value as A1111 writes it: JSON-quoted when it holds ",", ":" or a newline."""
    text = str(text)
    if "," not in text and "\n" not in text and ":" not in text:
        return text
    return json.dumps(text, ensure_ascii=False)


def unquote(text):
    """A quoted field value's text (A1111's unquote: JSON, or the text itself if that fails)."""
    if len(text) == 0 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:
        return text


def _number(text):
    return int(text) if INTEGER.match(text) else float(text)


def _read(key, text):
    """A field's value: int, float, (width, height), bool, ((name, hash), ...) or the text itself."""
    try:
        if key in INT_FIELDS:
            return int(text)
        if key in NUMBER_FIELDS:
            return _number(text)
        if key in SIZE_FIELDS and SIZE.match(text):
            return tuple(int(v) for v in SIZE.match(text).groups())
        if key in FLAG_FIELDS and text in ("True", "False"):
            return text == "True"
        if key in HASH_FIELDS:
            return tuple(tuple(part.split(": ", 1)) for part in text.split(", ")) if ": " in text else text
    except ValueError:
        pass
    return text


def _write(value):
    """A field's text from its value (the inverse of ``_read``); integral floats as A1111's UI sends them, "7"."""
    if isinstance(value, str):
        return value
    if isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return f"{value[0]}x{value[1]}"
    if isinstance(value, tuple):
        return ", ".join(f"{name}: {digest}" for name, digest in value)
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


@dataclass(frozen=True)
class Infotext:
    """A parsed A1111 parameters text: the prompts, and the fields in their order as written.

    ``get`` reads a field typed (int, float, (width, height), bool, ((name, hash), ...), or text);
    ``replace`` sets fields from typed values. ``text`` writes the parameters text back.
    """

    prompt: str = ""
    negative_prompt: str = ""
    fields: tuple = ()  # ((key, text), ...), unquoted

    def get(self, key, default=None):
        raw = dict(self.fields).get(key)
        return default if raw is None else _read(key, raw)

    def __contains__(self, key):
        return key in dict(self.fields)

    def replace(self, **fields):
        """A copy with fields set (None removes one); new ones go before "Version", where A1111 puts extras."""
        current = dict(self.fields)
        order = [k for k, _ in self.fields]
        for key, value in fields.items():
            key = key.replace("_", " ")
            if key not in current and value is not None:
                order.insert(order.index("Version") if "Version" in order else len(order), key)
            current[key] = None if value is None else _write(value)
        return dataclasses.replace(self, fields=tuple((k, current[k]) for k in order if current[k] is not None))

    @property
    def text(self):
        """The parameters text, as A1111's create_infotext writes it."""
        params = ", ".join(k if k == v else f"{k}: {quote(v)}" for k, v in self.fields)
        negative = f"\nNegative prompt: {self.negative_prompt}" if self.negative_prompt else ""
        return f"{self.prompt}{negative}\n{params}".strip()

    def unsupported(self):
        """The fields sdkit does not honour (Hires fix, ADetailer, ControlNet, LoRA and TI hashes, ...)."""
        out = []
        for key, _ in self.fields:
            if key in HONOURED or key in INFORMATIONAL:
                continue
            if key == "Denoising strength" and "Hires upscale" in self:
                continue  # the Hires fix's strength: reported with the Hires fields
            out.append(key)
        return out


def parse(text):
    """An :class:`Infotext` from A1111's parameters text (A1111's parse_generation_parameters rules)."""
    *lines, last = text.strip().split("\n")
    if len(FIELD.findall(last)) < 3:
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    fields = tuple((key, unquote(value)) for key, value in FIELD.findall(last))
    return Infotext("\n".join(prompt), "\n".join(negative), fields)


def read_png(path):
    """The parameters text of an A1111 (or sdkit) PNG; ValueError if it has none."""
    from PIL import Image

    with Image.open(path) as image:
        text = image.info.get("parameters")
    if not text:
        raise ValueError(f"{path} has no A1111 parameters text (PNG text chunk 'parameters').")
    return text


def load(source):
    """An :class:`Infotext` from a PNG path, a parameters text, or an Infotext."""
    if isinstance(source, Infotext):
        return source
    source = os.fspath(source)
    if "\n" not in source and os.path.isfile(source):
        source = read_png(source)
    return parse(source)


# -- writing: what sdkit ran, as A1111 would have written it ----------------------------------

def scheduler_fields(scheduler, run_options):
    """The infotext fields A1111 adds for a sampler's settings and run options (its insertion order)."""
    c, fields = scheduler.config, []
    if c.get("downcast_alphas_cumprod"):
        fields.append(("Downcast alphas_cumprod", True))
    if c.get("rescale_betas_zero_snr") and "schedule_type" in c:
        fields.append(("Noise Schedule", ZERO_SNR))
    if c.get("discard_penultimate_sigma"):
        fields.append(("Discard penultimate sigma", True))
    for key, label in (("sigma_min", "Schedule min sigma"), ("sigma_max", "Schedule max sigma"),
                       ("rho", "Schedule rho")):
        if c.get(key):
            fields.append((label, c[key]))
    if getattr(scheduler, "schedule_name", None) == "beta":
        fields += [("Beta schedule alpha", c["beta_alpha"]), ("Beta schedule beta", c["beta_beta"])]
    if c.get("sgm_noise_multiplier"):
        fields.append(("SGM noise multiplier", True))
    unipc = (("unipc_variant", "UniPC variant", "bh1"), ("unipc_skip_type", "UniPC skip type", "time_uniform"),
             ("unipc_order", "UniPC order", 3), ("unipc_lower_order_final", "UniPC lower order final", True))
    fields += [(label, c[key]) for key, label, default in unipc if key in c and c[key] != default]
    defaults = type(scheduler).options_class()
    # "Eta DDIM" for the samplers whose eta defaults to 0 (DDIM's), "Eta" for the k-diffusion ones (default 1)
    labels = {"eta": "Eta DDIM" if getattr(defaults, "eta", 0) == 0 else "Eta", "s_churn": "Sigma churn",
              "s_tmin": "Sigma tmin", "s_tmax": "Sigma tmax", "s_noise": "Sigma noise"}
    for name, label in labels.items():
        value = getattr(run_options, name, None)
        if value is not None and value != getattr(defaults, name):
            fields.append((label, value))
    return fields


def create(prompt, negative_prompt, *, steps, scheduler, cfg_scale, seed, width, height, run_options=None,
           model=None, model_hash=None, denoising_strength=None, clip_skip=None, subseed=None, subseed_strength=0.0,
           seed_resize_from=(0, 0), ensd=0, rng="gpu", extra=(), version=None):
    """The :class:`Infotext` of one image, fields in the order A1111's create_infotext writes them.

    ``scheduler`` gives "Sampler" and "Schedule type" (sdkit's reference classes are named by class,
    as A1111 has no such sampler); ``extra`` are further (key, value) fields, before "Version".
    """
    from .schedulers import a1111_name, a1111_schedule

    options = run_options if run_options is not None else type(scheduler).options_class()
    w, h = seed_resize_from
    fields = [
        ("Steps", steps), ("Sampler", a1111_name(scheduler)), ("Schedule type", a1111_schedule(scheduler)),
        ("CFG scale", cfg_scale), ("Seed", seed), ("Size", (width, height)), ("Model hash", model_hash),
        ("Model", model), ("Variation seed", subseed if subseed_strength else None),
        ("Variation seed strength", subseed_strength or None),
        ("Seed resize from", (w, h) if w > 0 and h > 0 else None),
        ("Denoising strength", denoising_strength), ("Clip skip", clip_skip), ("ENSD", ensd or None),
        ("RNG", None if rng == "gpu" else rng.upper()),
        *scheduler_fields(scheduler, options), *extra, ("Version", version),
    ]
    return Infotext(prompt, negative_prompt or "", tuple((k, _write(v)) for k, v in fields if v is not None))


# -- reading: the call that reproduces an infotext --------------------------------------------

def _version_tuple(text):
    """A1111's version ("v1.6.0", "v1.7.0-225-g1234abc") as a tuple, or None for anything else."""
    m = re.match(r"^v?(\d+)\.(\d+)\.(\d+)(?:-(?:RC-)?(\d+))?", str(text or ""))
    return tuple(int(g or 0) for g in m.groups()) if m else None


def generation_settings(info):
    """(sampler, schedule, base-config settings, call options) that reproduce an infotext with sdkit.

    The call options are keyword arguments of a pipeline call (prompt, seeds, size, steps, ...);
    the base-config settings go over the model's scheduler config (A1111's noise schedule options).
    Fields sdkit cannot honour are listed by ``info.unsupported()``.
    """
    info = load(info)
    sampler = info.get("Sampler", "DPM++ 2M")
    schedule = info.get("Schedule type")
    version = _version_tuple(info.get("Version"))
    config = {
        "rescale_betas_zero_snr": info.get("Noise Schedule") == ZERO_SNR,
        "downcast_alphas_cumprod": bool(info.get("Downcast alphas_cumprod"))
        or (version is not None and version < V170_TSNR),
        "discard_penultimate_sigma": bool(info.get("Discard penultimate sigma")),
        "sgm_noise_multiplier": bool(info.get("SGM noise multiplier")),
        "rho": info.get("Schedule rho"), "sigma_min": info.get("Schedule min sigma"),
        "sigma_max": info.get("Schedule max sigma"),
        "beta_alpha": info.get("Beta schedule alpha", 0.6), "beta_beta": info.get("Beta schedule beta", 0.6),
        "unipc_variant": info.get("UniPC variant"), "unipc_skip_type": info.get("UniPC skip type"),
        "unipc_order": info.get("UniPC order"), "unipc_lower_order_final": info.get("UniPC lower order final"),
    }
    width, height = info.get("Size", (None, None))
    resize_w, resize_h = info.get("Seed resize from", (0, 0))
    call = {
        "prompt": info.prompt, "negative_prompt": info.negative_prompt or None, "prompt_syntax": "a1111",
        "num_inference_steps": info.get("Steps", 20), "guidance_scale": info.get("CFG scale", 7.0),
        "width": width, "height": height, "seed": info.get("Seed"),
        "rng": str(info.get("RNG", "GPU")).lower(), "eta_noise_seed_delta": info.get("ENSD", 0),
        "seed_resize_from_w": resize_w, "seed_resize_from_h": resize_h,
    }
    if info.get("Variation seed strength"):
        call.update(subseed=info.get("Variation seed"), subseed_strength=info.get("Variation seed strength"))
    if "Denoising strength" in info and "Hires upscale" not in info:
        call["strength"] = info.get("Denoising strength")
    if info.get("Clip skip", 1) > 1:
        call["clip_stop_at_last_layers"] = info.get("Clip skip")
    if "CFG Rescale phi" in info:
        call["guidance_rescale"] = info.get("CFG Rescale phi")
    if "Guidance end" in info:  # sdkit's field: guidance ran on this fraction of the steps
        call["guidance_end"] = info.get("Guidance end")
    eta = info.get("Eta DDIM") if "Eta DDIM" in info else info.get("Eta")
    if eta is not None:
        call["eta"] = eta
    churn = {name: info.get(label) for name, label in (("s_churn", "Sigma churn"), ("s_tmin", "Sigma tmin"),
                                                         ("s_tmax", "Sigma tmax"), ("s_noise", "Sigma noise"))
             if label in info}
    if churn:
        call["scheduler_options"] = churn
    return sampler, schedule, config, call


def regenerate(source, pipe, image=None, **overrides):
    """Regenerate an A1111 (or sdkit) PNG or parameters text with ``pipe``; keyword arguments override.

    ``image`` is the init image when the infotext is img2img's ("Denoising strength"). Fields sdkit
    does not honour are named in one warning. Returns the pipeline's output.
    """
    from .pipelines import Img2ImgPipeline

    info = load(source)
    unsupported = info.unsupported()
    if unsupported:
        warnings.warn(f"sdkit ignores these settings of the infotext: {', '.join(unsupported)}.", stacklevel=2)
    ran = info.get("OpenVINO")  # sdkit's field: those pixels are OpenVINO's, at this precision
    if ran is not None and str(ran) != getattr(getattr(pipe, "_compiled_unet", None), "precision", None):
        warnings.warn(f'the infotext was made with pipe.compile(backend="openvino", precision="{ran}"): compile '
                      f'the pipeline so for its pixels.', stacklevel=2)
    sampler, schedule, config, call = generation_settings(info)
    call = {k: v for k, v in call.items() if v is not None or k == "negative_prompt"}
    scheduler = sampler_for(sampler, schedule, config, pipe.scheduler)
    call = {**call, "scheduler": scheduler, **overrides}
    strength = call.pop("strength", None)
    if strength is not None or image is not None:
        if image is None:
            raise ValueError(f"the infotext is img2img's (Denoising strength {strength}): pass the init image.")
        return Img2ImgPipeline.from_pipe(pipe)(image=image, strength=strength if strength is not None else 0.75,
                                              **call)
    return pipe(**call)


def sampler_for(sampler, schedule, config, base_scheduler):
    """The sdkit scheduler for an infotext's sampler: A1111's, or a reference class named by its class name."""
    from .schedulers import SCHEDULER_CLASSES, from_name

    base = dict(base_scheduler.config)
    if sampler in SCHEDULER_CLASSES or sampler == "PLMSScheduler":
        return from_name(sampler, base)
    base.update({k: v for k, v in config.items() if v is not None})
    return from_name(sampler, base, schedule=schedule)
