"""Pipelines: text to image, image to image and inpainting, sharing one denoising loop.

    pipe = StableDiffusionPipeline.from_pretrained("path/or/repo-id")
    out = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    img2img = Img2ImgPipeline(**pipe.components)   # same weights, no copy
"""

from .base import DiffusionPipeline, PipelineOutput, classifier_free_guidance
from .img2img import Img2ImgPipeline
from .inpaint import InpaintPipeline
from .txt2img import StableDiffusionPipeline

__all__ = ["DiffusionPipeline", "Img2ImgPipeline", "InpaintPipeline", "PipelineOutput",
           "StableDiffusionPipeline", "classifier_free_guidance"]
