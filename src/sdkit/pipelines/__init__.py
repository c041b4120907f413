"""Pipelines: text to image, image to image and inpainting, sharing one denoising loop.

    pipe = StableDiffusionPipeline.from_pretrained("path/or/repo-id")
    out = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0))
    img2img = Img2ImgPipeline(**pipe.components)   # same weights, no copy
"""

from .auto import AutoPipelineForImage2Image, AutoPipelineForInpainting, AutoPipelineForText2Image
from .base import DiffusionPipeline, PipelineOutput, Run, Start
from .denoising import (ClassifierFreeGuidance, ConditionalOnly, ModelCall, PromptEmbeds,
                        classifier_free_guidance, unet_model, with_extra_channels)
from .img2img import Img2ImgPipeline
from .inpaint import InpaintPipeline
from .loading import Part
from .options import CallOptions, ImageToImageOptions, InpaintOptions, TextToImageOptions
from .prompting import ComposableGuidance, PromptSchedule, ScheduledPromptEmbeds
from .txt2img import StableDiffusionPipeline

StableDiffusionImg2ImgPipeline = Img2ImgPipeline  # the reference's names for the same classes
StableDiffusionInpaintPipeline = InpaintPipeline

__all__ = ["AutoPipelineForImage2Image", "AutoPipelineForInpainting", "AutoPipelineForText2Image",
           "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline", "CallOptions", "ClassifierFreeGuidance", "ComposableGuidance", "PromptSchedule", "ScheduledPromptEmbeds", "ConditionalOnly", "DiffusionPipeline", "ImageToImageOptions",
           "Img2ImgPipeline", "InpaintOptions", "InpaintPipeline", "ModelCall", "Part", "PipelineOutput",
           "PromptEmbeds", "Run", "Start", "StableDiffusionPipeline", "TextToImageOptions",
           "classifier_free_guidance", "unet_model", "with_extra_channels"]
