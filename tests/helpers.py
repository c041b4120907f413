"""Test helpers: tiny reference-shaped configs, weight perturbation, error metrics."""

import torch

SD1_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64, 64), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)

# SD2 style: linear projections, per-level head counts, three attention levels out of four
SD2_UNET = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 32, 64, 64), layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=48, attention_head_dim=(2, 4, 8, 8), use_linear_projection=True,
    upcast_attention=True, norm_num_groups=8)

INPAINT_UNET = {**SD1_UNET, "in_channels": 9}

VAE_F2 = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
              up_block_types=("UpDecoderBlock2D",) * 2, norm_num_groups=8, latent_channels=4,
              layers_per_block=1, sample_size=16)
VAE_F8 = dict(block_out_channels=(16, 32, 32, 32), down_block_types=("DownEncoderBlock2D",) * 4,
              up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=8, latent_channels=4,
              layers_per_block=1, sample_size=64)


def perturb(model, seed=0, scale=0.1):
    """Move biases and norm affines away from their defaults so no path is trivial."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)
    return model.eval()


def rel_err(a, b):
    a, b = torch.as_tensor(a).double(), torch.as_tensor(b).double()
    return ((a - b).norm() / a.norm().clamp_min(1e-30)).item()
