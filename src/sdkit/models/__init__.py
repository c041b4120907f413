"""Models: UNet2DConditionModel and AutoencoderKL with diffusers-compatible configs and weights."""

from .modeling import Config, ModelMixin
from .unet import UNet2DConditionModel
from .vae import AutoencoderKL, DiagonalGaussian

__all__ = ["AutoencoderKL", "Config", "DiagonalGaussian", "ModelMixin", "UNet2DConditionModel"]
