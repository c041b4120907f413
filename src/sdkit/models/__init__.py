"""Models: UNet2DConditionModel and AutoencoderKL with diffusers-compatible configs and weights."""

from ..configuration import Config
from .modeling import ModelMixin
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "Config", "DiagonalGaussian", "ModelMixin", "UNet2DConditionModel"]
