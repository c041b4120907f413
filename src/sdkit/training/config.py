"""Training configurations: one dataclass per stage, with the reason for every default.

Every field is also a command-line flag of ``python -m sdkit.training`` (``--field-name``);
tuples are written comma-separated (``--block-out-channels 16,32,32,64``) and ``none`` unsets an
optional value (``--min-snr-gamma none``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple


class ConfigError(ValueError):
    """A training option (or combination) that cannot work; the CLI prints it as one line."""


@dataclass
class LoopConfig:
    """What every stage's optimisation loop needs."""

    steps: int = 1000  # total optimizer steps of the run (the LR schedule spans them)
    stop_at: Optional[int] = None  # end this invocation early at this step (checkpoint kept; resume later)
    batch_size: int = 16  # examples per step over all processes (each process takes batch_size / N)
    lr: float = 1e-3  # peak AdamW learning rate, reached after the warm-up
    warmup_steps: int = 50  # linear warm-up from 0: Adam's moments are poor estimates at first
    min_lr_ratio: float = 0.05  # the cosine decays to lr * this at the last step
    adam_beta2: float = 0.99  # shorter second-moment memory than 0.999 suits short runs
    weight_decay: float = 0.0  # the data are unlimited, so no overfitting to fight
    max_grad_norm: Optional[float] = 1.0  # clip the global gradient norm (none: no clipping)
    ema_decay: Optional[float] = 0.999  # EMA of weights; exported weights are the EMA (none: off)
    seed: int = 0  # model init, data order and noise all derive from (seed, step, rank)
    save_every: int = 250  # steps between checkpoints (one is always written at the end)
    log_every: int = 10  # steps between loss-log lines (JSONL) and progress-bar updates
    num_threads: Optional[int] = 1  # torch threads per process: on a shared 2-core CPU, 1 ran 4x faster than 2
    log_indices: bool = False  # also log every process's example indices (for the multi-process test)


@dataclass
class VAEConfig(LoopConfig):
    """Stage 1: the autoencoder. 64x64x3 images <-> 8x8x4 latents (factor 8)."""

    steps: int = 1500  # 6.5 min with 2 processes on the 2-core CPU; reconstructions keep every attribute
    batch_size: int = 16  # an autoencoder needs many steps more than big batches; colour_factorization
    # needs a multiple of 4 per process: 16 with 2 processes is 2 background and 2 colour pairs each
    lr: float = 2e-3  # GroupNorm'd small conv nets tolerate a high rate with warm-up and clipping
    block_out_channels: Tuple[int, ...] = (16, 32, 32, 64)  # 4 levels = factor 8; thin at 64x64 for speed
    layers_per_block: int = 1  # one resnet per encoder level (two per decoder level)
    norm_num_groups: int = 4  # >= 4 channels per group: GroupNorm over 1-2 channels normalises away
    # per-image constants such as the shape's colour (8 groups: 15% colours right after 250 steps; 4: 34%)
    latent_channels: int = 4  # the Stable Diffusion latent width (DESIGN.md)
    kl_weight: float = 1e-5  # per latent element: just enough to keep the posterior well scaled
    foreground_weight: float = 5.0  # extra loss weight on shape pixels (5-30% of the image): unweighted,
    # the encoder spent its latent range on the background and put orange 1.6 from yellow (median
    # latent distance of one layout drawn in both colours); with 5.0 (and no colour_factorization) the
    # closest pairs are 3.2-4.2 apart (benchmarks/vae_colours.py)
    latent_noise: float = 0.6  # Gaussian noise added to the latents the decoder sees, as a fraction of
    # their std (so of the unit-variance latents the UNet models): to survive it the encoder must
    # spread what it encodes over all channels and keep attribute values apart
    channel_decorrelation: float = 0.0  # weight of the mean squared correlation between latent channels.
    # Unweighted, the four channels carry one signal. In a 1-process screening run, 0.1 spread the six
    # colours over a plane (10th-percentile gap to the nearest other colour at shape pixels 0.42 -> 1.16,
    # unit-variance latents); in three 2-process runs it was 0.18-0.77, the channels decorrelated but
    # the colours still on one of them, so the bundled recipe leaves it off
    colour_factorization: float = 0.05  # weight of the twin terms: losses.invariance_loss twice and,
    # with colour_margin, losses.separation_loss. Batches are pairs of drawings that differ only in
    # background or only in colour; at the shape's positions the first ``colour_channels`` latent
    # channels must not see the background and the others not the colour, so a hue gets one code
    # whatever the background. Without it the encoder writes the background into the shape's
    # positions too and a hue's code depends on it (orange on black lay nearer red on white than
    # orange on white did), and prompts that leave the background open missed the colour (short-prompt
    # colour 0.72-0.89). Invariance alone (margin 0) fixed that but left the hues on one line with red
    # and orange 0.43 apart at a square's centre: full-prompt colour fell to 0.92 (orange -> red)
    colour_channels: int = 2  # the channels that carry the colour (the rest carry the background)
    colour_margin: float = 2.0  # at the shape's positions the colour channels of two different colours
    # should be at least this far apart (unit-variance latents; only with colour_factorization). With
    # 2.0 (benchmarks/vae_colours.py, 2 processes) the closest pair of colours is 6.3 apart instead of
    # 2.4 (invariance alone) or 3.2 (neither term), the 10th-percentile gap to the nearest other colour
    # at shape pixels on any background 3.4 instead of 1.3 or 0.4, and the bundled model gets every
    # colour right on full and short prompts (MODEL_CARD.md)
    init_logvar: float = -6.0  # initial posterior log-variance: near-deterministic latents train much faster
    ema_decay: Optional[float] = 0.995  # short run: a shorter average
    init_from: Optional[str] = None  # start from this VAE folder (config.json + weights) instead of random
    train_encoder: bool = True  # false: only the decoder learns, so latents (and a UNet trained on them) stay valid
    num_images: Optional[int] = None  # none: an endless stream of new images; N: cycle over N (overfitting tests)
    scale_samples: int = 512  # images encoded to measure the latent std -> scaling_factor


def decoder_config(vae_folder: str) -> VAEConfig:
    """Stage 1b of the bundled recipe: fine-tune only the decoder of the stage-1 VAE in ``vae_folder``.

    Reconstructed colours were still drifting towards their neighbours (red to orange, purple to
    blue) when stage 1 ended; more decoder steps fix that without moving the latent space, so the
    UNet can train on stage-1 latents at the same time. Shape pixels weigh 3x: colour is the error.
    Latent noise 0.3 instead of stage 1's 0.6: the decoder stays robust to imprecise latents but
    draws small shapes sharper (reconstructed shape 0.90 instead of 0.85 after 1500 steps; 3000
    steps: shape 0.92, colour 0.98). Batches of 12, not stage 1's 16: without the encoder there are
    no twin pairs to fill (16 took 11.5 instead of 8.2 min).
    """
    return VAEConfig(init_from=vae_folder, train_encoder=False, steps=3000, batch_size=12, lr=1e-3,
                     warmup_steps=20, foreground_weight=2.0, latent_noise=0.3)


@dataclass
class UNetConfig(LoopConfig):
    """Stage 2: the text encoder and UNet, trained together on cached VAE latents."""

    steps: int = 8000  # ~38 min with 2 processes on an idle 2-core CPU: the whole recipe fits in an hour
    batch_size: int = 64  # 8x8 latents are cheap; bigger batches steady the many-attribute loss
    lr: float = 1e-3  # AdamW peak for both UNet and text encoder
    warmup_steps: int = 100
    ema_decay: Optional[float] = 0.998  # averages over ~the last 500 steps of the run
    # data
    num_images: int = 12000  # fixed training images whose VAE latents are cached (~22 per combination)
    data_seed: int = 1  # seed of the ShapesDataset items that are cached (items differ from the VAE's)
    caption_drop_prob: float = 0.35  # each optional caption part is left out with this probability
    empty_caption_prob: float = 0.1  # caption dropout: "" for classifier-free guidance
    sample_posterior: bool = True  # train on z ~ q(z|x), not only its mean: a smoother latent space
    # diffusion
    prediction_type: str = "v_prediction"  # epsilon | v_prediction
    beta_schedule: str = "scaled_linear"  # linear | scaled_linear | squaredcos_cap_v2 (Stable Diffusion's)
    num_train_timesteps: int = 1000
    beta_start: float = 0.00085
    beta_end: float = 0.012
    rescale_betas_zero_snr: bool = True  # last timestep pure noise (Lin et al. 2024); needs v_prediction.
    # Sampling starts from pure noise, so the layout (place words) must come from the prompt alone
    timestep_bias: str = "later"  # none | later: draw the noisiest timesteps more often (losses.sample_timesteps);
    # place words were never learned without it (0.23-0.37 after 2000-7000 steps), and fully with it
    timestep_bias_portion: float = 0.25  # the share of the timesteps that "later" favours
    timestep_bias_multiplier: float = 3.0  # how much more often they are drawn
    min_snr_gamma: Optional[float] = None  # Min-SNR-gamma weighting (none: plain MSE). For v it weighs
    # the high-noise steps, where the layout is decided, ~100x less: place words went unlearned with 5.0
    offset_noise: float = 0.05  # per-channel shared noise: lets flat backgrounds reach their exact tone
    immiscible: bool = False  # assign noise to latents within the batch by least total distance; with
    # 32 latents per process the assigned noise carries the layout, which then ignores the prompt
    # UNet architecture (8x8 latents: levels 8 -> 4 -> 2)
    block_out_channels: Tuple[int, ...] = (32, 64, 128)  # 3.2M params: 3x faster than (64, 128, 128)
    layers_per_block: int = 1
    attention_head_dim: int = 4  # the reference's name for the number of heads
    norm_num_groups: int = 8  # divides every block_out_channels entry; >= 4 channels per group (see VAEConfig)
    resnet_time_scale_shift: str = "default"  # default | scale_shift (FiLM: the embedding scales and shifts)
    addition_embed_type: Optional[str] = None  # none | text: the pooled prompt joins the timestep embedding
    addition_embed_type_num_heads: int = 4  # heads of that pooling (width / heads channels each)
    # text encoder (CLIP text transformer, trained from scratch as in LDM)
    text_hidden_size: int = 64  # also the UNet's cross_attention_dim
    text_layers: int = 2
    text_heads: int = 4
    max_length: int = 16  # tokens incl. start/end; the longest caption needs 13
    # export
    scheduler: str = "DDIMScheduler"  # the bundled model's default sampler
    guidance_scale: float = 3.0  # not used in training: the scale the model card recommends (with rescale 0.7)


def config_from_args(cls, args: dict):
    """Build ``cls`` from a dict of overrides, coercing strings the way the CLI writes them."""
    known = {f.name: f for f in dataclasses.fields(cls)}
    unknown = set(args) - set(known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown option(s) {sorted(unknown)}; known: {sorted(known)}")
    return cls(**args)


def parse_value(text: str, default):
    """A CLI string -> the type of ``default`` (tuples comma-separated; 'none' -> None)."""
    if text.lower() == "none":
        return None
    if isinstance(default, bool):
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"expected true/false, got {text!r}")
    if isinstance(default, tuple):
        return tuple(int(v) for v in text.split(","))
    if isinstance(default, int):
        return int(text)
    if isinstance(default, float) or default is None:
        try:
            return float(text) if default is not None or "." in text or "e" in text else int(text)
        except ValueError:
            return text
    return text
