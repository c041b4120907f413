"""Building blocks shared by the UNet and the VAE.

Attribute names mirror the diffusers checkpoint keys (``resnets.0.norm1.weight``,
``attentions.0.transformer_blocks.0.attn2.to_k.weight``, ...), so loading needs no renaming.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def timestep_embedding(t, dim, flip_sin_to_cos=True, freq_shift=0.0, max_period=10000):
    """Sinusoidal timestep embedding (Vaswani et al. 2017; DDPM, Ho et al. 2020). t: (B,) -> (B, dim)."""
    half = dim // 2
    exponent = -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device)
    freqs = torch.exp(exponent / (half - freq_shift))
    args = t[:, None].float() * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)] if flip_sin_to_cos
                    else [torch.sin(args), torch.cos(args)], dim=-1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


class TimestepEmbedding(nn.Module):
    """Two-layer MLP on the sinusoidal embedding."""

    def __init__(self, in_channels, time_embed_dim):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.linear_2 = nn.Linear(time_embed_dim, time_embed_dim)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))


class AttentionPooling(nn.Module):
    """One query (the mean token + a learned offset) attends over [query, tokens]: (B, T, D) -> (B, D).

    The pooling of DeepFloyd IF; diffusers' checkpoint names (q_proj, k_proj, v_proj,
    positional_embedding).
    """

    def __init__(self, heads, dim):
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention pooling: width {dim} is not divisible by {heads} heads.")
        self.heads = heads
        self.positional_embedding = nn.Parameter(torch.randn(1, dim) / dim**0.5)
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(dim, dim) for _ in range(3))

    def forward(self, x):
        B, T, D = x.shape
        query = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)  # (B, 1, D)
        tokens = torch.cat([query, x], dim=1)  # (B, 1 + T, D)

        def split(t):  # (B, L, D) -> (B, heads, L, D / heads)
            return t.view(B, t.shape[1], self.heads, D // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(query)), split(self.k_proj(tokens)), split(self.v_proj(tokens))
        weights = torch.softmax((q @ k.transpose(-1, -2)).float() / (D // self.heads) ** 0.5, dim=-1)
        return (weights.to(v.dtype) @ v).transpose(1, 2).reshape(B, D)  # (B, D)


class TextTimeEmbedding(nn.Module):
    """The prompt's pooled embedding, added to the timestep embedding (``addition_embed_type="text"``).

    Every resnet then sees the prompt directly, not only through the cross-attention layers.
    """

    def __init__(self, encoder_dim, time_embed_dim, heads=64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, context):
        return self.norm2(self.proj(self.pool(self.norm1(context))))


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv residual block, conditioned on the (timestep [+ text]) embedding.

    ``time_embedding_norm="default"`` adds the embedding after the first conv (SD 1.x/2.x);
    ``"scale_shift"`` makes it a FiLM of the second norm instead: ``norm2(h) * (1 + scale) + shift``
    (Dhariwal & Nichol 2021), which can switch feature maps on and off per prompt.
    """

    def __init__(self, in_channels, out_channels, temb_channels=None, groups=32, eps=1e-6,
                 dropout=0.0, output_scale_factor=1.0, time_embedding_norm="default"):
        super().__init__()
        if time_embedding_norm not in ("default", "scale_shift"):
            raise ValueError(f"time_embedding_norm {time_embedding_norm!r}: use 'default' or 'scale_shift'.")
        self.scale_shift = time_embedding_norm == "scale_shift"
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        proj_out = 2 * out_channels if self.scale_shift else out_channels
        self.time_emb_proj = nn.Linear(temb_channels, proj_out) if temb_channels else None
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None
        self.output_scale_factor = output_scale_factor

    def forward(self, x, temb=None):
        h = self.conv1(F.silu(self.norm1(x)))
        cond = None
        if self.time_emb_proj is not None and temb is not None:
            cond = self.time_emb_proj(F.silu(temb))[:, :, None, None]
        if cond is None:
            h = self.norm2(h)
        elif self.scale_shift:
            scale, shift = cond.chunk(2, dim=1)
            h = self.norm2(h) * (1 + scale) + shift
        else:
            h = self.norm2(h + cond)
        h = self.conv2(self.dropout(F.silu(h)))
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return (x + h) / self.output_scale_factor


class Downsample2D(nn.Module):
    """Strided 3x3 conv. padding=0 pads right/bottom by one (the VAE's asymmetric padding)."""

    def __init__(self, channels, padding=1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=padding)

    def forward(self, x):
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x (or to `size`) then a 3x3 conv."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x, size=None):
        dtype = x.dtype
        if dtype == torch.bfloat16:  # nearest upsampling has no bf16 kernel on some backends
            x = x.float()
        x = F.interpolate(x, size=size, mode="nearest") if size is not None else \
            F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x.to(dtype))


def attention(q, k, v, heads, upcast=False, slice_size=None):
    """Multi-head scaled dot-product attention. q: (B, T, heads*d), k/v: (B, S, heads*d).

    ``slice_size``: attend for this many (image, head) pairs at a time (the reference's attention
    slicing), so a kernel that builds the T x S weights holds only that many at once.
    """
    B, T, inner = q.shape
    d = inner // heads
    q, k, v = (x.view(B, -1, heads, d).transpose(1, 2) for x in (q, k, v))  # (B, heads, T|S, d)
    dtype = q.dtype
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
    if slice_size is None or slice_size >= B * heads:
        out = F.scaled_dot_product_attention(q, k, v)  # (B, heads, T, d)
    else:
        q, k, v = (x.flatten(0, 1) for x in (q, k, v))  # (B * heads, T|S, d)
        out = q.new_empty(q.shape[0], T, v.shape[-1])
        for i in range(0, q.shape[0], slice_size):
            out[i:i + slice_size] = F.scaled_dot_product_attention(q[i:i + slice_size], k[i:i + slice_size],
                                                                   v[i:i + slice_size])
        out = out.unflatten(0, (B, heads))  # (B, heads, T, d)
    return out.to(dtype).transpose(1, 2).reshape(B, T, inner)


def slice_size_for(slice_size, heads):
    """The (image, head) pairs per slice for ``set_attention_slice``: "auto" half the heads, "max" one, None all."""
    if slice_size is None:
        return None
    if slice_size == "auto":
        return max(heads // 2, 1)
    if slice_size == "max":
        return 1
    if isinstance(slice_size, bool) or not isinstance(slice_size, int) or slice_size < 1:
        raise ValueError(f"slice_size must be 'auto', 'max', None or an integer >= 1, got {slice_size!r}.")
    return slice_size


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' key names (to_q, to_k, to_v, to_out.0)."""

    def __init__(self, query_dim, cross_attention_dim=None, heads=8, dim_head=64, bias=False,
                 upcast=False, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = cross_attention_dim or query_dim
        self.heads, self.upcast = heads, upcast
        self.slice_size = None  # attention slicing (set_attention_slice): (image, head) pairs at a time
        self.to_q = nn.Linear(query_dim, inner, bias=bias)
        self.to_k = nn.Linear(context_dim, inner, bias=bias)
        self.to_v = nn.Linear(context_dim, inner, bias=bias)
        self.to_out = nn.ModuleList([nn.Linear(inner, query_dim), nn.Dropout(dropout)])

    def forward(self, x, context=None):
        context = x if context is None else context
        out = attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads, self.upcast,
                        self.slice_size)
        return self.to_out[1](self.to_out[0](out))


class GEGLU(nn.Module):
    """Gated GELU feed-forward input layer (Shazeer 2020, 'GLU Variants Improve Transformer')."""

    def __init__(self, dim_in, dim_out):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x):
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim, mult=4, dropout=0.0):
        super().__init__()
        inner = dim * mult
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x):
        for layer in self.net:
            x = layer(x)
        return x


class BasicTransformerBlock(nn.Module):
    """Pre-LayerNorm self-attention, cross-attention on the text, then a GEGLU feed-forward."""

    def __init__(self, dim, heads, dim_head, cross_attention_dim, upcast=False, dropout=0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, None, heads, dim_head, upcast=upcast, dropout=dropout)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, cross_attention_dim, heads, dim_head, upcast=upcast, dropout=dropout)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, dropout=dropout)

    def forward(self, x, context):
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class Transformer2DModel(nn.Module):
    """Spatial transformer: GroupNorm, project in, transformer blocks over H*W tokens, project out."""

    def __init__(self, heads, dim_head, in_channels, num_layers=1, cross_attention_dim=None,
                 groups=32, use_linear_projection=False, upcast=False, dropout=0.0):
        super().__init__()
        inner = heads * dim_head
        self.use_linear_projection = use_linear_projection
        self.norm = nn.GroupNorm(groups, in_channels, eps=1e-6)
        proj = (lambda i, o: nn.Linear(i, o)) if use_linear_projection else (lambda i, o: nn.Conv2d(i, o, 1))
        self.proj_in = proj(in_channels, inner)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner, heads, dim_head, cross_attention_dim, upcast, dropout)
            for _ in range(num_layers))
        self.proj_out = proj(inner, in_channels)

    def forward(self, x, context):
        B, _, H, W = x.shape
        residual = x
        x = self.norm(x)
        if not self.use_linear_projection:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(B, H * W, -1)  # (B, HW, C)
        if self.use_linear_projection:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.use_linear_projection:
            x = self.proj_out(x)
        x = x.reshape(B, H, W, -1).permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
        if not self.use_linear_projection:
            x = self.proj_out(x)
        return x + residual


class SpatialSelfAttention(Attention):
    """The VAE's single-head self-attention over pixels, with its own GroupNorm and residual."""

    def __init__(self, channels, groups=32, eps=1e-6):
        super().__init__(channels, None, heads=1, dim_head=channels, bias=True, upcast=True)
        self.group_norm = nn.GroupNorm(groups, channels, eps=eps)

    def forward(self, x):
        B, C, H, W = x.shape
        h = self.group_norm(x).view(B, C, H * W).transpose(1, 2)  # (B, HW, C)
        h = super().forward(h)
        return x + h.transpose(1, 2).reshape(B, C, H, W)
