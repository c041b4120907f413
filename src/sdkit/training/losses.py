"""Training maths: diffusion targets, loss weights, noise tricks, and the VAE loss.

| code        | paper                                                              |
| ----------- | ------------------------------------------------------------------ |
| x0          | clean latent x_0                                                   |
| eps         | Gaussian noise epsilon                                             |
| alpha_bar   | bar-alpha_t; x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps    |
| alpha, sigma| sqrt(alpha_bar), sqrt(1 - alpha_bar)                               |
| snr         | alpha_bar / (1 - alpha_bar) = alpha^2 / sigma^2                    |
| v           | alpha eps - sigma x0 (Salimans & Ho 2022)                           |

The noise schedule and the noising itself come from :class:`sdkit.schedulers.DDPMScheduler`,
so training and sampling share one definition of ``alphas_cumprod``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from sdkit.schedulers import DDPMScheduler

from .config import ConfigError

PREDICTION_TYPES = ("epsilon", "v_prediction")


def noise_scheduler(beta_schedule="scaled_linear", num_train_timesteps=1000, beta_start=0.00085,
                    beta_end=0.012, prediction_type="epsilon", rescale_betas_zero_snr=False):
    """The training noise schedule, as the DDPM scheduler the sampling side reads (Ho et al. 2020).

    ``rescale_betas_zero_snr`` rescales the betas so the last timestep is pure noise (Lin et al.
    2024, arXiv 2305.08891): the model then learns, at t = T, to draw the layout from the prompt
    alone, exactly as it must when sampling starts from pure noise. It needs v-prediction.
    """
    if rescale_betas_zero_snr and prediction_type != "v_prediction":
        raise ConfigError("rescale_betas_zero_snr needs prediction_type='v_prediction': at zero SNR the "
                         "noise is the input itself, so an epsilon target teaches nothing there.")
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(f"prediction_type {prediction_type!r} is not supported for training; "
                         f"use one of {', '.join(PREDICTION_TYPES)}.")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=beta_start,
                         beta_end=beta_end, beta_schedule=beta_schedule, prediction_type=prediction_type,
                         rescale_betas_zero_snr=rescale_betas_zero_snr)


def config_noise_scheduler(cfg):
    """``noise_scheduler`` for a ``UNetConfig``: the schedule both training and export use."""
    return noise_scheduler(cfg.beta_schedule, cfg.num_train_timesteps, cfg.beta_start, cfg.beta_end,
                           cfg.prediction_type, cfg.rescale_betas_zero_snr)


def _per_sample(values, like):
    """(B,) -> (B, 1, ..., 1) shaped to broadcast against ``like``."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.dim() - 1)))


def diffusion_target(scheduler, x0, eps, timesteps):
    """What the model learns to predict: eps (Ho et al. 2020) or v = alpha eps - sigma x0 (Salimans & Ho 2022)."""
    if scheduler.config["prediction_type"] == "epsilon":
        return eps
    return scheduler.get_velocity(x0, eps, timesteps)


def snr(scheduler, timesteps):
    """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer training timesteps, (B,)."""
    alpha_bar = scheduler.alphas_cumprod[timesteps.cpu()].to(timesteps.device)
    return alpha_bar / (1 - alpha_bar)


def min_snr_weights(scheduler, timesteps, gamma):
    """Min-SNR-gamma loss weights (Hang et al. 2023, arXiv 2303.09556), (B,).

    The weight min(snr, gamma) is for an x0 loss; expressed for the model's target it is
    min(snr, gamma) / snr for epsilon and min(snr, gamma) / (snr + 1) for v.
    ``gamma=None`` gives weight 1 (plain MSE on the target).
    """
    s = snr(scheduler, timesteps)
    if gamma is None:
        return torch.ones_like(s)
    clipped = torch.clamp(s, max=gamma)
    if scheduler.config["prediction_type"] == "epsilon":
        return clipped / s
    return clipped / (s + 1)


TIMESTEP_BIASES = ("none", "later")


def sample_timesteps(batch_size, num_train_timesteps, generator=None, bias="none", portion=0.25, multiplier=1.0):
    """Training timesteps, (B,) int64: uniform, or with the noisiest ``portion`` drawn ``multiplier`` x as often.

    ``bias="later"`` (the "later" timestep bias of diffusers' SDXL training script) spends more of
    the batch where the layout is decided: near t = T the input is almost pure noise, so where
    the shape goes (the prompt's place words) can only be learned there.
    """
    check_timestep_bias(bias, portion, multiplier)
    if bias == "none" or multiplier == 1.0:
        return torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)
    weights = torch.ones(num_train_timesteps, dtype=torch.float64)
    weights[num_train_timesteps - int(round(portion * num_train_timesteps)):] = multiplier
    return torch.multinomial(weights, batch_size, replacement=True, generator=generator)


def check_timestep_bias(bias, portion, multiplier):
    """Raise ``ConfigError`` unless ``sample_timesteps`` can use these options."""
    if bias not in TIMESTEP_BIASES:
        raise ConfigError(f"timestep bias {bias!r} is not supported; use one of {', '.join(TIMESTEP_BIASES)}.")
    if bias != "none" and multiplier != 1.0 and (not 0 < portion < 1 or multiplier <= 0):
        raise ConfigError(f"timestep bias needs 0 < portion < 1 and multiplier > 0, got {portion}, {multiplier}.")


def offset_noise(shape, offset=0.0, generator=None, device=None):
    """N(0, I) plus ``offset`` times one N(0, 1) draw per (sample, channel) (Guttenberg 2023).

    The shared per-channel shift lets the model change an image's mean colour, which plain noise
    (whose per-channel mean is ~0 at every level) teaches it badly. ``offset=0`` is plain noise.
    """
    eps = torch.randn(shape, generator=generator, device=device)
    if offset:
        eps = eps + offset * torch.randn((*shape[:2], *([1] * (len(shape) - 2))), generator=generator,
                                         device=device)
    return eps


def immiscible_assignment(x0, eps):
    """Permutation ``p`` pairing x0[i] with eps[p[i]] so the total distance is least (Li et al. 2024).

    "Immiscible Diffusion" (arXiv 2406.12303): assigning each image the nearest noise within the
    batch (a linear assignment on pairwise L2 distances) makes the noise-to-image map less tangled.
    """
    cost = torch.cdist(x0.flatten(1).double(), eps.flatten(1).double())  # (B, B)
    rows, cols = linear_sum_assignment(cost.cpu().numpy())
    perm = np.empty_like(cols)
    perm[rows] = cols
    return torch.as_tensor(perm, dtype=torch.long, device=x0.device)


def diffusion_loss(model_output, target, weights):
    """Per-sample mean squared error, weighted, then averaged over the batch."""
    per_sample = (model_output.float() - target.float()).pow(2).flatten(1).mean(1)  # (B,)
    return (weights * per_sample).mean()


def agreement_loss(uncond_prediction, cond_prediction, batch_size):
    """How far the empty prompt's prediction is from the prompt's, summed per sample over ``batch_size``.

    Classifier-free guidance (Ho & Salimans 2022) adds ``(scale - 1) * (cond - uncond)`` to the
    conditional prediction. At low noise the image is already decided and the prompt adds nothing
    the noisy latent does not show, so the exact predictions agree there; a trained model's do not,
    and guidance magnifies their difference into bent edges. The conditional prediction is the
    target (detached), so only the unconditional one moves. ``uncond_prediction`` and
    ``cond_prediction`` (n, C, h, w) are the low-noise part of a batch of ``batch_size``: the
    result is the per-sample mean squared difference summed and divided by ``batch_size``.
    """
    per_sample = (uncond_prediction.float() - cond_prediction.detach().float()).pow(2).flatten(1).mean(1)  # (n,)
    return per_sample.sum() / batch_size


def foreground_weights(image, foreground_weight):
    """Per-pixel loss weights (B, 1, H, W): 1 on the background, ``1 + foreground_weight`` on the shape.

    The background is the colour of the top-left pixel (no shape reaches a corner). A shape covers
    5-30% of the image, so unweighted it is a small part of the loss and is learned last.
    """
    background = image[:, :, :1, :1]  # (B, C, 1, 1)
    mask = (image - background).abs().amax(dim=1, keepdim=True) > 0.05  # (B, 1, H, W)
    return 1 + foreground_weight * mask.to(image.dtype)


def channel_correlation_loss(latents):
    """Mean squared off-diagonal correlation between the channels of ``latents`` (B, C, H, W).

    Every position of every image is one sample. 0 when the channels are uncorrelated, 1 when they
    are all the same signal: an autoencoder left alone tends to write one scalar per position into
    all of its channels, which leaves the attributes that matter little to the pixel loss (the
    shape's hue) as small wiggles on that one axis.
    """
    x = latents.transpose(0, 1).flatten(1).float()  # (C, N)
    x = x - x.mean(1, keepdim=True)
    x = x / (x.pow(2).mean(1, keepdim=True).sqrt() + 1e-6)
    corr = x @ x.T / x.shape[1]  # (C, C)
    channels = corr.shape[0]
    off_diagonal = corr - torch.diag(torch.diagonal(corr))
    return off_diagonal.pow(2).sum() / (channels * (channels - 1))


def invariance_loss(latents, twin_latents, weights, scale):
    """How far latents move between twin drawings, in units of the latents' spread.

    ``latents`` and ``twin_latents`` (B, C, h, w) encode the same drawings with one attribute changed;
    ``weights`` (B, 1, h, w) is the shape's coverage of each latent position. Returns the weighted
    mean squared difference of the pairs divided by ``scale``, the variance of all latents (what the
    ``scaling_factor`` divides out; pass it detached): the distance in the unit-variance latents the
    UNet models. Dividing by a variance measured at the shape alone, with gradient, let the encoder
    win by collapsing every latent to a constant; a plain difference by shrinking the latents.
    """
    a, b, w = latents.float(), twin_latents.float(), weights.float()
    return (w * (a - b).pow(2)).sum() / (w.sum() * a.shape[1]) / scale


def separation_loss(latents, twin_latents, weights, scale, margin):
    """How far twin drawings of different colours fall short of ``margin`` apart, per latent position.

    Arguments as for ``invariance_loss``; the twins differ in colour. At each position the distance
    over the given channels in unit-variance latents, ``sqrt(sum_c (a - b)^2 / scale)``, is compared
    with ``margin``: the coverage-weighted mean of ``relu(margin - distance)^2``. Pairs already
    ``margin`` apart cost nothing, so this spreads the closest hues (red and orange) without pushing
    the rest further; invariance alone left the six hues on one line with red and orange 0.4 apart.
    """
    a, b, w = latents.float(), twin_latents.float(), weights.float()
    distance = ((a - b).pow(2).sum(1, keepdim=True) / scale + 1e-12).sqrt()  # (B, 1, h, w)
    return (w * torch.relu(margin - distance).pow(2)).sum() / w.sum()


def vae_loss(reconstruction, image, posterior, kl_weight, foreground_weight=0.0, kind="mse"):
    """Reconstruction error + ``kl_weight`` * KL(q(z|x) || N(0, I)) per latent element (Kingma & Welling 2014).

    Returns ``(loss, reconstruction_loss, kl)``. ``kind`` "mse" (squared error) or "l1" (absolute
    error), both weighted per pixel by ``foreground_weights``. Training from scratch needs squared
    error: L1's optimum for a pixel the latent does not yet pin down is the median colour, which is
    the background, so an L1 autoencoder first erases the shape and then barely learns it; squared
    error predicts the mean (a blurred shape) and keeps pulling the latent towards encoding it. A
    decoder that already draws the shape is where L1 pays: where a latent leaves an edge uncertain,
    the median commits to one side of it instead of blurring across (sharper corners and points).
    """
    if kind not in ("mse", "l1"):
        raise ValueError(f"reconstruction loss {kind!r}: expected 'mse' or 'l1'")
    weights = foreground_weights(image, foreground_weight)
    error = reconstruction - image
    error = error.pow(2) if kind == "mse" else error.abs()
    rec = (weights * error).mean() / weights.mean()
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return rec + kl_weight * kl, rec, kl
