"""AutoencoderKL: the latent-diffusion VAE (Kingma & Welling 2014; Rombach et al. 2022).

``encode(x)`` gives a diagonal Gaussian over latents; ``decode(z)`` gives the image. Latents fed
to the UNet are ``z * config.scaling_factor``.
"""

import contextvars
import warnings
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..per_call import holding
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


_TILE_NORM = contextvars.ContextVar("sdkit_vae_tile_norm", default=None)
"""While a tiled encode or decode runs: the whole image's statistics of each GroupNorm (``image_norm``)."""


class _ImageNorm(dict):
    """{GroupNorm: (mean, var) per (image, group)}; filled by the pass that ``recording`` marks."""

    recording = True


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm (same parameters and outputs) that, inside a tiled encode or decode, normalises
    every tile by the statistics of the whole image rather than by the tile's own."""

    def forward(self, x):
        norm = _TILE_NORM.get()
        if norm is None:
            return super().forward(x)
        groups = x.reshape(x.shape[0], self.num_groups, -1)
        if norm.recording:
            var, mean = torch.var_mean(groups.float(), dim=2, keepdim=True, unbiased=False)
            norm[self] = (mean, var)
        mean, var = norm[self]
        y = ((groups - mean.to(x.dtype)) * torch.rsqrt(var + self.eps).to(x.dtype)).reshape(x.shape)
        return y * self.weight[:, None, None] + self.bias[:, None, None] if self.affine else y


def image_norm(fn, x, tile, multiple):
    """Each GroupNorm's statistics over the whole of ``x``, estimated as the fast mode of A1111's
    Tiled VAE extension does: from one pass of ``fn`` over ``x`` shrunk to fit one tile (nearest
    pixels, sides rounded to ``multiple``; each channel then given the whole image's mean and
    spread, and clamped to its range). The memory of one tile, the time of one more.

    Normalising each tile by its own statistics instead (the reference's tiling) stretches a
    tile's contrast: a tile of flat background comes out blotched, and colours shift from tile
    to tile (benchmarks/RESULTS.md; tests/test_bundled_model.py)."""
    H, W = x.shape[2:]
    k = max(H, W) / tile
    size = [max(multiple, round(side / k / multiple) * multiple) for side in (H, W)]
    small = F.interpolate(x, size=size, mode="nearest-exact")
    std, mean = torch.std_mean(x, dim=(2, 3), keepdim=True)
    small_std, small_mean = torch.std_mean(small, dim=(2, 3), keepdim=True)
    small = ((small - small_mean) / small_std.clamp_min(1e-6) * std + mean).clamp(x.min(), x.max())
    norm = _ImageNorm()
    with holding(_TILE_NORM, norm):
        fn(small)
    norm.recording = False
    return norm


def tile_starts(size, tile, stride):
    """Origins of tiles of length ``tile`` that cover [0, size) every ``stride``; the last one ends at ``size``."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def blend_window(n, ramp, device, dtype):
    """(n,) weights rising linearly over ``ramp`` values from each end to 1: overlapping tiles cross-fade."""
    i = torch.arange(n, device=device, dtype=dtype) + 0.5
    return (torch.minimum(i, n - i) / max(ramp, 1)).clamp(max=1.0)


def tiled(fn, x, tile, overlap):
    """``fn`` over overlapping (tile x tile) windows of (B, C, H, W) ``x``, blended into one output.

    Windows start every tile - overlap (the last ones end at the border); each output window is
    weighted by a linear ramp over its overlap, and the weighted sum is divided by the summed
    weights, so neighbouring tiles cross-fade and no seam is left. ``fn`` may change the size by a
    constant factor (decode: x8 into pixels; encode: /8 into latents).
    """
    H, W = x.shape[2:]
    out = weight = None
    for top in tile_starts(H, tile, tile - overlap):
        for left in tile_starts(W, tile, tile - overlap):
            window = x[:, :, top:top + tile, left:left + tile]
            y = fn(window)
            scale = y.shape[2] / window.shape[2]
            if out is None:
                out = y.new_zeros(y.shape[0], y.shape[1], round(H * scale), round(W * scale))
                weight = y.new_zeros(1, 1, *out.shape[2:])
            ramp = overlap * scale
            w = blend_window(y.shape[2], ramp, y.device, y.dtype)[:, None] * \
                blend_window(y.shape[3], ramp, y.device, y.dtype)[None, :]  # (h, w)
            t, l = round(top * scale), round(left * scale)
            out[:, :, t:t + y.shape[2], l:l + y.shape[3]] += y * w
            weight[:, :, t:t + y.shape[2], l:l + y.shape[3]] += w
    return out / weight


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
        for module in self.modules():
            if type(module) is nn.GroupNorm:  # tiles share the whole image's statistics (GroupNorm above)
                module.__class__ = GroupNorm
        c = cfg.latent_channels
        self.quant_conv = nn.Conv2d(2 * c, 2 * c, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = nn.Conv2d(c, c, 1) if cfg.use_post_quant_conv else None
        # memory settings (the reference's names), read by every call, changed only by the enable_* methods
        self.use_slicing = False  # encode and decode a batch one image at a time
        self.use_tiling = False  # encode and decode large images in blended overlapping tiles
        sample = cfg.sample_size if isinstance(cfg.sample_size, int) else min(cfg.sample_size)
        self.tile_sample_min_size = self._sample_pixels = sample  # tile side in pixels; the configured image side
        self.tile_overlap_factor = 0.25  # fraction of a tile shared with its neighbour
        self.tile_norm = "image"  # tiles normalised by the whole image's statistics ("tile": each by its own)

    def enable_slicing(self):
        """Decode (and encode) a batch one image at a time: the same images, the memory of one."""
        self.use_slicing = True

    def disable_slicing(self):
        self.use_slicing = False

    def enable_tiling(self, tile_sample_min_size=None, tile_overlap_factor=None, tile_norm=None):
        """Decode (and encode) images larger than a tile (default: the VAE's sample_size, in pixels) in
        overlapping tiles blended together, so memory stays that of one tile at any size.

        With ``tile_norm="image"`` (the default) every tile is normalised by the whole image's
        GroupNorm statistics, estimated from one more pass over the image shrunk to a tile
        (``image_norm``, as the fast mode of A1111's Tiled VAE extension); ``"tile"`` normalises
        each tile by its own, as the reference's tiling does. The linear cross-fade over the overlap
        leaves no visible seam either way. Tiles smaller than the sample_size change the images
        more (a warning says so)."""
        f = self.downsample_factor
        size = self.tile_sample_min_size if tile_sample_min_size is None else tile_sample_min_size
        overlap = self.tile_overlap_factor if tile_overlap_factor is None else tile_overlap_factor
        if isinstance(size, bool) or not isinstance(size, int) or size < 2 * f or size % f:
            raise ValueError(f"tile_sample_min_size must be a multiple of {f} (the VAE factor) of at least "
                             f"{2 * f} pixels, got {size!r}.")
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap < 1:
            raise ValueError(f"tile_overlap_factor must be a number in [0, 1), got {overlap!r}.")
        trained = self._sample_pixels
        if size < trained:
            warnings.warn(f"VAE tiles of {size} pixels are smaller than the VAE's sample_size ({trained}): each tile "
                          f"sees less of the image around it, and tiles this small change colours and shapes. Keep the "
                          f"default tile size unless memory forces smaller tiles.", stacklevel=2)
        norm = self.tile_norm if tile_norm is None else tile_norm
        if norm not in ("image", "tile"):
            raise ValueError(f'tile_norm must be "image" (the whole image\'s statistics) or "tile" (each tile\'s '
                             f'own, as the reference), got {norm!r}.')
        self.tile_sample_min_size, self.tile_overlap_factor, self.tile_norm = size, overlap, norm
        self.use_tiling = True

    def disable_tiling(self):
        self.use_tiling = False

    def memory_settings(self):
        """The slicing and tiling settings, to give a copy of this VAE (``vars(copy).update(...)``)."""
        names = ("use_slicing", "use_tiling", "tile_sample_min_size", "tile_overlap_factor", "tile_norm")
        return {name: getattr(self, name) for name in names}

    def _tile(self, in_pixels):
        """(tile side, overlap) in the units of the input: pixels to encode, latents to decode."""
        f = self.downsample_factor
        size = self.tile_sample_min_size if in_pixels else self.tile_sample_min_size // f
        unit = f if in_pixels else 1  # tiles start on latent pixels
        overlap = int(size * self.tile_overlap_factor) // unit * unit
        return size, overlap

    def _tiles(self, x, in_pixels):
        """Whether x (pixels to encode, or latents to decode) goes in tiles: tiling on and x larger than a tile."""
        return self.use_tiling and max(x.shape[2:]) > self._tile(in_pixels)[0]

    def tiles(self, z):
        """Whether ``decode`` decodes latents ``z`` in tiles."""
        return self._tiles(z, in_pixels=False)

    def decode_with(self, decode, z):
        """``decode`` (a stand-in for this VAE's decode of one batch, such as a compiled one) over unscaled
        latents ``z``, sliced and tiled as set."""
        return self._by_settings(decode, z, in_pixels=False)

    def _by_settings(self, fn, x, in_pixels):
        """``fn`` on x as the settings say: per image (slicing), in tiles (tiling), or whole."""
        if self.use_slicing and x.shape[0] > 1:
            return torch.cat([self._by_settings(fn, x[i:i + 1], in_pixels) for i in range(x.shape[0])])
        if self._tiles(x, in_pixels):
            size, overlap = self._tile(in_pixels)
            if self.tile_norm == "tile":
                return tiled(fn, x, size, overlap)
            norm = image_norm(fn, x, size, self.downsample_factor if in_pixels else 1)
            with holding(_TILE_NORM, norm):
                return tiled(fn, x, size, overlap)
        return fn(x)

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
        with ``return_dict=False``. Slicing and tiling apply as set (``enable_slicing``, ``enable_tiling``)."""
        dist = DiagonalGaussian(self._by_settings(self._encode, x, in_pixels=True))
        return dist if return_dict else (dist,)

    def decode(self, z, return_dict=True, generator=None):
        """z: (B, latent_channels, h, w) unscaled latents -> (B, 3, h*f, w*f), roughly in [-1, 1]: a tensor
        that also has the reference's ``.sample``, or ``(images,)`` with ``return_dict=False``.
        ``generator`` is taken for the reference's signature; decoding draws no noise. Slicing and
        tiling apply as set."""
        return model_output(self._by_settings(self._decode, z, in_pixels=False), return_dict)

    def _encode(self, x):
        h = self.encoder(x)
        return self.quant_conv(h) if self.quant_conv is not None else h

    def _decode(self, z):
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)

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
