"""UNet2DConditionModel: the Stable Diffusion 1.x / 2.x denoiser (Rombach et al. 2022, LDM).

Config keys and checkpoint key names are those of the diffusers reference, so a diffusers
``unet/`` folder loads as it is.
"""

import functools
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from .blocks import (Downsample2D, ResnetBlock2D, TextTimeEmbedding, TimestepEmbedding, Transformer2DModel,
                     Upsample2D, timestep_embedding)
from ..configuration import choice
from .modeling import ModelMixin, model_output

IntOrTuple = Union[int, Tuple[int, ...]]


@dataclass(frozen=True)
class UNet2DConditionConfig:
    sample_size: Optional[int] = None       # latent size the model was trained at (default H/W)
    in_channels: int = 4                    # 4 latents; 9 for inpainting (latents + mask + masked image)
    out_channels: int = 4
    center_input_sample: bool = False       # map input from [0, 1] to [-1, 1] first
    flip_sin_to_cos: bool = True            # timestep embedding order: cos first (SD) or sin first
    freq_shift: int = 0                     # denominator shift of the sinusoid frequencies
    down_block_types: Tuple[str, ...] = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    up_block_types: Tuple[str, ...] = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)  # channels per resolution level
    layers_per_block: IntOrTuple = 2        # resnets per down block (up blocks have one more)
    dropout: float = 0.0                    # resnet and attention dropout (training only)
    norm_num_groups: int = 32               # GroupNorm groups everywhere
    norm_eps: float = 1e-5                  # resnet GroupNorm eps
    cross_attention_dim: IntOrTuple = 1280  # text embedding width (768 SD1, 1024 SD2)
    transformer_layers_per_block: IntOrTuple = 1
    attention_head_dim: IntOrTuple = 8      # the reference uses this as the NUMBER of heads per level
    use_linear_projection: bool = False     # SD2: Linear instead of 1x1 conv around the transformer
    upcast_attention: bool = False          # SD2.1: attention in fp32 when running in half precision
    resnet_time_scale_shift: str = choice("default", ("default", "scale_shift"))  # scale_shift: FiLM by the embedding
    addition_embed_type: Optional[str] = choice(None, (None, "text"))  # text: the pooled prompt joins the time embedding
    addition_embed_type_num_heads: int = 64   # heads of that pooling


def _per_level(value, n, name):
    """Expand an int config value to one per level; check a list's length."""
    if isinstance(value, int):
        return (value,) * n
    if len(value) != n:
        raise ValueError(f"UNet2DConditionModel: config key {name!r} has {len(value)} entries, "
                         f"but there are {n} blocks in down_block_types.")
    return tuple(value)


def _resnet(in_channels, out_channels, temb_channels, cfg):
    """A resnet with the config's norm, dropout and timestep-conditioning (default or FiLM)."""
    return ResnetBlock2D(in_channels, out_channels, temb_channels, cfg.norm_num_groups, cfg.norm_eps, cfg.dropout,
                         time_embedding_norm=cfg.resnet_time_scale_shift)


def _transformers(channels, count, heads, cross_attention_dim, transformer_layers, cfg):
    """`count` spatial transformers at one level (one after each resnet)."""
    return nn.ModuleList(
        Transformer2DModel(heads, channels // heads, channels, transformer_layers, cross_attention_dim,
                           cfg.norm_num_groups, cfg.use_linear_projection, cfg.upcast_attention, cfg.dropout)
        for _ in range(count))


class DownBlock2D(nn.Module):
    """Resnets (+ spatial transformers when `with_attention`), then an optional 2x downsample."""

    def __init__(self, in_channels, out_channels, temb_channels, num_layers, add_downsample, *,
                 with_attention, heads, cross_attention_dim, transformer_layers, cfg):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(in_channels if i == 0 else out_channels, out_channels, temb_channels, cfg)
            for i in range(num_layers))
        self.attentions = _transformers(out_channels, num_layers, heads, cross_attention_dim,
                                        transformer_layers, cfg) if with_attention else None
        self.downsamplers = nn.ModuleList([Downsample2D(out_channels)]) if add_downsample else None

    def layers(self):
        """The block's steps in order, each ``step(x, temb, context) -> x`` and each output a skip."""
        steps = [functools.partial(self.layer, i) for i in range(len(self.resnets))]
        if self.downsamplers is not None:
            steps.append(lambda x, temb, context: self.downsamplers[0](x))
        return steps

    def layer(self, i, x, temb, context):
        """Resnet i, then its transformer."""
        x = self.resnets[i](x, temb)
        return self.attentions[i](x, context) if self.attentions is not None else x


class UpBlock2D(nn.Module):
    """Resnets on [x, skip] concatenations (+ transformers), then an optional 2x upsample."""

    def __init__(self, in_channels, prev_channels, out_channels, temb_channels, num_layers, add_upsample,
                 *, with_attention, heads, cross_attention_dim, transformer_layers, cfg):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(num_layers):
            skip_channels = in_channels if i == num_layers - 1 else out_channels
            resnet_in = prev_channels if i == 0 else out_channels
            self.resnets.append(_resnet(resnet_in + skip_channels, out_channels, temb_channels, cfg))
        self.attentions = _transformers(out_channels, num_layers, heads, cross_attention_dim,
                                        transformer_layers, cfg) if with_attention else None
        self.upsamplers = nn.ModuleList([Upsample2D(out_channels)]) if add_upsample else None

    def layer(self, i, x, skip, temb, context):
        """Resnet i on [x, skip], then its transformer."""
        x = self.resnets[i](torch.cat([x, skip], dim=1), temb)
        return self.attentions[i](x, context) if self.attentions is not None else x


class UNetMidBlock2DCrossAttn(nn.Module):
    def __init__(self, channels, temb_channels, heads, cross_attention_dim, transformer_layers, cfg):
        super().__init__()
        self.resnets = nn.ModuleList(
            _resnet(channels, channels, temb_channels, cfg) for _ in range(2))
        self.attentions = _transformers(channels, 1, heads, cross_attention_dim, transformer_layers, cfg)

    def forward(self, x, temb, context):
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


_BLOCKS = {"CrossAttnDownBlock2D": True, "DownBlock2D": False}
_UP_BLOCKS = {"CrossAttnUpBlock2D": True, "UpBlock2D": False}


class UNet2DConditionModel(ModelMixin):
    """Text-conditioned UNet. ``unet(sample, timestep, encoder_hidden_states) -> prediction``."""

    config_class = UNet2DConditionConfig
    # reference keys accepted only at these values (anything else changes the architecture)
    _fixed = {
        "mid_block_type": ("UNetMidBlock2DCrossAttn",), "only_cross_attention": (False,),
        "dual_cross_attention": (False,), "act_fn": ("silu",), "downsample_padding": (1,),
        "mid_block_scale_factor": (1, 1.0), "num_attention_heads": (None,),
        "class_embed_type": (None,), "num_class_embeds": (None,), "addition_time_embed_dim": (None,),
        "resnet_skip_time_act": (False,), "resnet_out_scale_factor": (1, 1.0),
        "time_embedding_type": ("positional",), "time_embedding_dim": (None,),
        "time_embedding_act_fn": (None,), "timestep_post_act": (None,), "time_cond_proj_dim": (None,),
        "conv_in_kernel": (3,), "conv_out_kernel": (3,), "projection_class_embeddings_input_dim": (None,),
        "attention_type": ("default",), "class_embeddings_concat": (False,),
        "mid_block_only_cross_attention": (None, False), "cross_attention_norm": (None,),
        "encoder_hid_dim": (None,), "encoder_hid_dim_type": (None,),
        "reverse_transformer_layers_per_block": (None,),
    }

    def __init__(self, config: UNet2DConditionConfig = None, **kwargs):
        super().__init__()
        cfg = config if config is not None else self.parse_config(kwargs)
        self._set_config(cfg)
        n = len(cfg.down_block_types)
        for key, types, known in (("down_block_types", cfg.down_block_types, _BLOCKS),
                                  ("up_block_types", cfg.up_block_types, _UP_BLOCKS)):
            bad = [t for t in types if t not in known]
            if bad:
                raise ValueError(f"UNet2DConditionModel: config key {key!r} has unsupported block types "
                                 f"{bad}; sdkit supports {sorted(known)}.")
        if len(cfg.up_block_types) != n or len(cfg.block_out_channels) != n:
            raise ValueError("UNet2DConditionModel: down_block_types, up_block_types and "
                             "block_out_channels must have the same length.")
        channels = tuple(cfg.block_out_channels)
        heads = _per_level(cfg.attention_head_dim, n, "attention_head_dim")
        layers = _per_level(cfg.layers_per_block, n, "layers_per_block")
        context_dims = _per_level(cfg.cross_attention_dim, n, "cross_attention_dim")
        tlayers = _per_level(cfg.transformer_layers_per_block, n, "transformer_layers_per_block")
        for c in channels:
            if c % cfg.norm_num_groups:
                raise ValueError(f"UNet2DConditionModel: block_out_channels {channels} must be "
                                 f"multiples of norm_num_groups={cfg.norm_num_groups}.")
        temb = channels[0] * 4

        self.conv_in = nn.Conv2d(cfg.in_channels, channels[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(channels[0], temb)
        self.add_embedding = (TextTimeEmbedding(context_dims[0], temb, cfg.addition_embed_type_num_heads)
                              if cfg.addition_embed_type == "text" else None)

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock2D(
                channels[max(i - 1, 0)], channels[i], temb, layers[i], add_downsample=i < n - 1,
                with_attention=_BLOCKS[kind], heads=heads[i], cross_attention_dim=context_dims[i],
                transformer_layers=tlayers[i], cfg=cfg))

        self.mid_block = UNetMidBlock2DCrossAttn(channels[-1], temb, heads[-1], context_dims[-1],
                                                 tlayers[-1], cfg)

        self.up_blocks = nn.ModuleList()
        rev = channels[::-1]
        for i, kind in enumerate(cfg.up_block_types):
            j = n - 1 - i  # the matching down level
            self.up_blocks.append(UpBlock2D(
                rev[min(i + 1, n - 1)], rev[max(i - 1, 0)], rev[i], temb, layers[j] + 1,
                add_upsample=i < n - 1, with_attention=_UP_BLOCKS[kind], heads=heads[j],
                cross_attention_dim=context_dims[j], transformer_layers=tlayers[j], cfg=cfg))

        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, channels[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(channels[0], cfg.out_channels, 3, padding=1)

    @classmethod
    def from_single_file(cls, path, torch_dtype=None, allow_pickle=False, use_ema=False):
        """The UNet of a single-file checkpoint (``model.diffusion_model.*``) or a bare LDM UNet file.

        The architecture is read from the tensor shapes (SD 1: 8 heads; SD 2: 64-channel heads).
        """
        from .single_file import load_unet

        return load_unet(path, torch_dtype, allow_pickle, use_ema)

    def forward(self, sample, timestep, encoder_hidden_states, *, cross_attention_kwargs=None, return_dict=True):
        """sample: (B, C, h, w) latents; timestep: int, float, 0-d or (B,) tensor;
        encoder_hidden_states: (B, T, cross_attention_dim). Returns the (B, out_channels, h, w)
        prediction: a tensor that also has the reference's ``.sample`` (``modeling.OutputTensor``),
        or ``(prediction,)`` with ``return_dict=False``, as the reference returns it."""
        if cross_attention_kwargs:
            raise ValueError(f"UNet2DConditionModel takes no cross_attention_kwargs "
                             f"(got {sorted(cross_attention_kwargs)}): "
                             f"sdkit has no attention processors to pass them to; leave them out.")
        return model_output(self._predict(sample, timestep, encoder_hidden_states), return_dict)

    def _predict(self, sample, timestep, encoder_hidden_states):
        """The denoiser itself (``forward`` without the reference's output forms)."""
        return self._run(sample, *self._embed(sample, timestep, encoder_hidden_states))[0]

    def deep_cache_branches(self):
        """How many DeepCache branches the UNet has: one per skip connection (conv_in's is branch 0)."""
        return 1 + sum(len(block.layers()) for block in self.down_blocks)

    def deep_cache_forward(self, sample, timestep, encoder_hidden_states, branch, deep=None):
        """One step of DeepCache (Ma et al. 2023, arXiv 2312.00858): (prediction, deep features).

        With ``deep=None`` the whole UNet runs and also returns the deep features of ``branch``:
        the up path's input to the layer that reads skip ``branch`` (0: conv_in's, the shallowest).
        With ``deep`` given (from an earlier step) only the shallow path runs: conv_in, the first
        ``branch`` down layers, then the up layers from that one on, on the cached features.
        """
        if not 0 <= branch < self.deep_cache_branches():
            raise ValueError(f"DeepCache branch {branch} does not exist: this UNet has branches 0 to "
                             f"{self.deep_cache_branches() - 1} (0 is the shallowest and fastest).")
        return self._run(sample, *self._embed(sample, timestep, encoder_hidden_states), branch, deep)

    def check_inputs(self, sample, timestep, encoder_hidden_states):
        """Raise ValueError unless the inputs fit this UNet and each other (``timestep``: a tensor)."""
        B = sample.shape[0]
        if timestep.numel() not in (1, B):
            raise ValueError(f"timestep has {timestep.numel()} values for a batch of {B}: pass one per "
                             f"sample or a single value.")
        if encoder_hidden_states.shape[0] != B:
            raise ValueError(f"encoder_hidden_states batch {encoder_hidden_states.shape[0]} does not "
                             f"match sample batch {B}.")
        if sample.shape[1] != self.config.in_channels:
            raise ValueError(f"sample has {sample.shape[1]} channels; this UNet takes {self.config.in_channels}.")

    def _embed(self, sample, timestep, encoder_hidden_states):
        """(time embedding (B, 4 C0), context (B, T, D)) after checking the inputs."""
        cfg = self.config
        B = sample.shape[0]
        t = timestep if torch.is_tensor(timestep) else torch.tensor(
            timestep, dtype=torch.float32 if isinstance(timestep, float) else torch.long)
        t = t.to(sample.device).reshape(-1)
        if not torch.jit.is_tracing():  # a trace (OpenVINO's converter) is of one shape: no checks in its graph
            self.check_inputs(sample, t, encoder_hidden_states)  # the OpenVINO UNet checks its calls itself
        t = t.expand(B)
        emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
        emb = self.time_embedding(emb.to(sample.dtype))
        context = encoder_hidden_states.to(sample.dtype)
        if self.add_embedding is not None:
            emb = emb + self.add_embedding(context)
        return emb, context

    def _run(self, sample, emb, context, branch=None, deep=None):
        """Down, middle, up and out; with a ``branch``, also the deep features there (see deep_cache_forward)."""
        if self.config.center_input_sample:
            sample = 2 * sample - 1.0
        shallow = deep is not None
        # 1. down: keep every intermediate for the skip connections
        x = self.conv_in(sample)
        skips = [x]
        steps = [step for block in self.down_blocks for step in block.layers()]
        for step in steps[:branch] if shallow else steps:
            x = step(x, emb, context)
            skips.append(x)
        # 2. middle
        x = deep if shallow else self.mid_block(x, emb, context)
        # 3. up: layer c reads skip S - 1 - c; a block upsamples to the next skip's size
        layers = [(block, i) for block in self.up_blocks for i in range(len(block.resnets))]
        enter = None if branch is None else len(layers) - 1 - branch  # the layer that reads skip `branch`
        kept = None
        for c in range(enter if shallow else 0, len(layers)):
            block, i = layers[c]
            if c == enter:
                kept = x
            x = block.layer(i, x, skips.pop(), emb, context)
            if i == len(block.resnets) - 1 and block.upsamplers is not None:
                x = block.upsamplers[0](x, skips[-1].shape[2:] if skips else None)
        # 4. out
        return self.conv_out(F.silu(self.conv_norm_out(x))), kept
