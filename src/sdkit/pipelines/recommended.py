"""A model's recommended settings: ``recommended_settings.json`` beside ``model_index.json``.

The file is sdkit's own (diffusers ignores it); every key is optional:

    {"guidance_scale": 3.0, "guidance_rescale": 0.7, "guidance_end": 0.6, "num_inference_steps": 25,
     "scheduler": "DDIM"}

* ``guidance_scale``, ``guidance_rescale``, ``guidance_end``, ``num_inference_steps``: what a call
  that does not pass them uses (a value passed to the call always wins). ``guidance_end`` is the
  fraction of the model calls, from the first, that run classifier-free guidance (a guidance
  interval, Kynkaanniemi et al. 2024): a model whose low-noise steps bend shapes under strong
  guidance recommends one, and then applies it at any ``guidance_scale`` the call passes;
* ``scheduler``: the sampler ``from_pretrained`` sets as ``pipe.scheduler``, a class name
  ("DDIMScheduler") or an A1111 name ("Euler a"), built from the folder's scheduler config
  (``from_pretrained(..., scheduler=...)`` wins).

A folder without the file keeps the reference's defaults (guidance 7.5, 50 steps, no rescale,
guidance at every step).
The settings are read once, at load, into a frozen ``RecommendedSettings``; calls never change it.
"""

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..files import atomic_write, read_json_object

FILE = "recommended_settings.json"
CALL_OPTIONS = ("guidance_scale", "guidance_rescale", "guidance_end", "num_inference_steps")
"""The keys that are call options (the rest apply at load)."""


@dataclass(frozen=True)
class RecommendedSettings:
    """What a model folder recommends; ``None`` leaves the reference's default."""

    guidance_scale: Optional[float] = None
    guidance_rescale: Optional[float] = None
    guidance_end: Optional[float] = None  # fraction of the model calls that run guidance (1: all)
    num_inference_steps: Optional[int] = None
    scheduler: Optional[str] = None  # class name or A1111 sampler name

    def __post_init__(self):
        problem = _problem(self)
        if problem:
            raise ValueError(f"recommended settings: {problem}.")

    def call_defaults(self):
        """The call options this model sets, as keywords (only those it recommends)."""
        return {name: getattr(self, name) for name in CALL_OPTIONS if getattr(self, name) is not None}

    def get(self, name, default):
        """The recommended ``name``, or ``default`` when the model recommends none."""
        value = getattr(self, name)
        return default if value is None else value

    def scheduler_for(self, base):
        """``base`` (a scheduler) as the recommended sampler, on ``base``'s config; ``base`` if none is named."""
        if self.scheduler is None:
            return base
        from ..schedulers import from_name

        return from_name(self.scheduler, base.config)

    def as_dict(self):
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


def _problem(settings):
    """Why ``settings`` cannot be used (None if they can)."""
    scale, steps = settings.guidance_scale, settings.num_inference_steps
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale)):
        return f"guidance_scale must be a finite number, got {scale!r}"
    for name in ("guidance_rescale", "guidance_end"):
        value = getattr(settings, name)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                  or not 0 <= value <= 1):
            return f"{name} must be a number in [0, 1], got {value!r}"
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
        return f"num_inference_steps must be an integer >= 1, got {steps!r}"
    if settings.scheduler is not None and not isinstance(settings.scheduler, str):
        return f"scheduler must be a scheduler class name or A1111 sampler name, got {settings.scheduler!r}"
    return None


def read(folder):
    """The settings in ``folder/recommended_settings.json``; empty settings when there is no file."""
    path = os.path.join(os.fspath(folder), FILE)
    if not os.path.isfile(path):
        return RecommendedSettings()
    values = read_json_object(path, "recommended settings")
    names = [f.name for f in dataclasses.fields(RecommendedSettings)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        warnings.warn(f"{path}: ignoring unknown keys {unknown}; sdkit reads {', '.join(names)}.", stacklevel=3)
    try:
        return RecommendedSettings(**{k: v for k, v in values.items() if k in names})
    except ValueError as e:
        raise ValueError(f"{path}: {e} Fix the file or delete it (the reference's defaults then apply).") from None


def write(folder, settings):
    """Write ``settings`` to ``folder/recommended_settings.json`` (nothing, and no file, when empty)."""
    path = os.path.join(os.fspath(folder), FILE)
    values = settings.as_dict()
    if not values:
        if os.path.isfile(path):
            os.remove(path)
        return None
    text = json.dumps(values, indent=2, sort_keys=True) + "\n"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
