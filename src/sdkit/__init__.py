"""sdkit: a small, plain latent-diffusion (Stable Diffusion) toolkit.

Models, schedulers and pipelines are separate, swappable parts. Heavy submodules are imported
on first use, so ``import sdkit`` stays fast.
"""

import importlib
import os

__version__ = "0.1.0"

TINY_MODEL = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny-shapes")
"""Path of the bundled tiny shapes model (diffusers folder layout)."""

_LAZY = {
    "StableDiffusionPipeline": "sdkit.pipelines",
    "Img2ImgPipeline": "sdkit.pipelines",
    "InpaintPipeline": "sdkit.pipelines",
    # the reference's names: the same classes, and the classes that choose a pipeline
    "StableDiffusionImg2ImgPipeline": "sdkit.pipelines",
    "StableDiffusionInpaintPipeline": "sdkit.pipelines",
    "DiffusionPipeline": "sdkit.pipelines",
    "AutoPipelineForText2Image": "sdkit.pipelines",
    "AutoPipelineForImage2Image": "sdkit.pipelines",
    "AutoPipelineForInpainting": "sdkit.pipelines",
    "UNet2DConditionModel": "sdkit.models",
    "AutoencoderKL": "sdkit.models",
}

__all__ = ["TINY_MODEL", "__version__", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    if name in ("models", "pipelines", "schedulers"):  # sdkit.schedulers.X without importing it first
        return importlib.import_module(f"sdkit.{name}")
    if name.endswith("Scheduler") or name == "AysSchedules":  # every scheduler, as from sdkit.schedulers
        schedulers = importlib.import_module("sdkit.schedulers")
        if name in schedulers.__all__:
            return getattr(schedulers, name)
    raise AttributeError(f"module 'sdkit' has no attribute {name!r}")
