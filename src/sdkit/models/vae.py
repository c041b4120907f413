"""AutoencoderKL: the latent-diffusion VAE (Kingma & Welling 2014; Rombach et al. 2022).

``encode(x)`` gives a diagonal Gaussian over latents; ``decode(z)`` gives the image. Latents fed
to the UNet are ``z * config.scaling_factor``.
"""

from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import Downsample2D, ResnetBlock2D, SpatialSelfAttention, Upsample2D
from .modeling import ModelMixin, model_output


@dataclass(frozen=True)
class AutoencoderKLConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: Tuple[str, ...] = ("DownEncoderBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpDecoderBlock2D",)
    block_out_channels: Tuple[int, ...] = (64,)  # downsampling factor is 2 ** (levels - 1)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int = 32                      # image size the model was trained at
    scaling_factor: float = 0.18215            # latents * this has roughly unit variance (SD1/2)
    shift_factor: Optional[float] = None       # subtracted before scaling (unused by SD1/2)
    latents_mean: Optional[Tuple[float, ...]] = None
    latents_std: Optional[Tuple[float, ...]] = None
    force_upcast: bool = True                  # decode in fp32: the SD VAE overflows in fp16
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True


class DiagonalGaussian:
    """N(mean, std^2) per latent element; `parameters` is (B, 2C, h, w) = [mean, logvar]."""

    def __init__(self, parameters):
        self.mean, logvar = parameters.chunk(2, dim=1)
        self.logvar = logvar.clamp(-30.0, 20.0)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    @property
    def latent_dist(self):  # `vae.encode(x).latent_dist.sample()` as in diffusers
        return self

    def mode(self):
        return self.mean

    def sample(self, generator=None):
        """mean + std * eps, with eps drawn from `generator` (or a list, one per batch item)."""
        shape, device, dtype = self.mean.shape, self.mean.device, self.mean.dtype
        if isinstance(generator, (list, tuple)):
            eps = torch.cat([torch.randn((1, *shape[1:]), generator=g, device=g.device, dtype=dtype)
                             for g in generator]).to(device)
        else:
            gen_device = generator.device if generator is not None else device
            eps = torch.randn(shape, generator=generator, device=gen_device, dtype=dtype).to(device)
        return self.mean + self.std * eps

    def kl(self):
        """KL(N(mean, var) || N(0, 1)) summed over the latent dimensions, per batch item."""
        return 0.5 * torch.sum(self.mean ** 2 + self.var - 1.0 - self.logvar, dim=[1, 2, 3])


class MidBlock(nn.Module):
    def __init__(self, channels, groups, add_attention=True):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock2D(channels, channels, None, groups, 1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialSelfAttention(channels, groups)]) if add_attention else None

    def forward(self, x):
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_downsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6)
            for i in range(num_layers))
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels, padding=0)]) if add_downsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.downsamplers[0](x) if self.downsamplers is not None else x


class DecoderBlock(nn.Module):
    def __init__(self, in_channels, out_channels, num_layers, groups, add_upsample):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock2D(in_channels if i == 0 else out_channels, out_channels, None, groups, 1e-6)
            for i in range(num_layers))
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def forward(self, x):
        for resnet in self.resnets:
            x = resnet(x)
        return self.upsamplers[0](x) if self.upsamplers is not None else x


class Encoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], cfg.layers_per_block, g, add_downsample=i < n - 1)
            for i in range(n))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x):
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, len(cfg.block_out_channels)
        rev = ch[::-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(rev[max(i - 1, 0)], rev[i], cfg.layers_per_block + 1, g, add_upsample=i < n - 1)
            for i in range(n))
        self.conv_norm_out = nn.GroupNorm(g, ch[0], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, z):
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class AutoencoderKL(ModelMixin):
    """KL-regularised autoencoder with diffusers' config keys and checkpoint names."""

    config_class = AutoencoderKLConfig
    _fixed = {"act_fn": ("silu",)}

    def __init__(self, config: AutoencoderKLConfig = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else self.parse_config(kwargs)
        self._set_config(cfg)
        for key, types, known in (("down_block_types", cfg.down_block_types, "DownEncoderBlock2D"),
                                  ("up_block_types", cfg.up_block_types, "UpDecoderBlock2D")):
            if any(t != known for t in types) or len(types) != len(cfg.block_out_channels):
                raise ValueError(f"AutoencoderKL: config key {key!r} = {list(types)} is not supported: "
                                 f"sdkit expects one {known!r} per entry of block_out_channels.")
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None

    @classmethod
    def from_single_file(cls, path, torch_dtype=None, allow_pickle=False):
        """The VAE of a single-file checkpoint, or a standalone A1111 VAE file such as
        ``vae-ft-mse-840000-ema-pruned.safetensors`` (``encoder.*``, ``decoder.*``, no prefix)."""
        from .single_file import load_vae

        return load_vae(path, torch_dtype, allow_pickle)

    @property
    def downsample_factor(self):
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(self, x, return_dict=True):
        """x: (B, 3, H, W) in [-1, 1] -> DiagonalGaussian over (B, latent_channels, H/f, W/f), which is
        also its own ``.latent_dist`` (the reference's ``vae.encode(x).latent_dist``); ``(dist,)``
        with ``return_dict=False``."""
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        return DiagonalGaussian(h) if return_dict else (DiagonalGaussian(h),)

    def decode(self, z, return_dict=True, generator=None):
        """z: (B, latent_channels, h, w) unscaled latents -> (B, 3, h*f, w*f), roughly in [-1, 1]: a tensor
        that also has the reference's ``.sample``, or ``(images,)`` with ``return_dict=False``.
        ``generator`` is taken for the reference's signature; decoding draws no noise."""
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return model_output(self.decoder(z), return_dict)

    def forward(self, x, generator=None, sample_posterior=False):
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z)

    @classmethod
    def convert_state_dict(cls, state_dict):
        """Rename the pre-2023 attention names (query/key/value/proj_attn) to to_q/to_k/to_v/to_out.0."""
        legacy = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}
        out = {}
        for key, value in state_dict.items():
            for old, new in legacy.items():
                if "attentions." in key and old in key:
                    key = key.replace(old, new)
            out[key] = value
        return out
