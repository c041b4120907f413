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
    # needs a multiple of 4 per process (background and colour twin pairs)
    lr: float = 2e-3  # GroupNorm'd small conv nets tolerate a high rate with warm-up and clipping
    block_out_channels: Tuple[int, ...] = (16, 32, 32, 64)  # 4 levels = factor 8; thin at 64x64 for speed
    layers_per_block: int = 1  # one resnet per encoder level (two per decoder level)
    norm_num_groups: int = 4  # >= 4 channels per group: GroupNorm over 1-2 channels normalises away
    # per-image constants such as the shape's colour
    latent_channels: int = 4  # the Stable Diffusion latent width
    kl_weight: float = 1e-5  # per latent element: just enough to keep the posterior well scaled
    reconstruction_loss: str = "mse"  # mse | l1 (decoder stages only: losses.vae_loss says why)
    foreground_weight: float = 5.0  # extra loss weight on shape pixels (5-30% of the image): unweighted,
    # the encoder spends its latent range on the background and neighbouring hues end up close
    # (measured in MODEL_CARD.md, "Why latent noise and the shape-pixel weight")
    latent_noise: float = 0.6  # Gaussian noise added to the latents the decoder sees, as a fraction of
    # their std (so of the unit-variance latents the UNet models): to survive it the encoder must
    # spread what it encodes over all channels and keep attribute values apart
    channel_decorrelation: float = 0.0  # weight of the mean squared correlation between latent channels
    # (unweighted, the four channels carry one signal); off in the recipe, the runs are in MODEL_CARD.md
    colour_factorization: float = 0.05  # weight of the twin terms: losses.invariance_loss twice and,
    # with colour_margin, losses.separation_loss. Batches are pairs of drawings that differ only in
    # background or only in colour; at the shape's positions the first ``colour_channels`` latent
    # channels must not see the background and the others not the colour, so a hue gets one code
    # whatever the background and prompts that leave the background open keep their colour
    # (MODEL_CARD.md, "Why colour factorization and the margin")
    colour_channels: int = 2  # the channels that carry the colour (the rest carry the background)
    colour_margin: float = 2.0  # at the shape's positions the colour channels of two different colours
    # should be at least this far apart (unit-variance latents; only with colour_factorization), so
    # that invariance does not leave neighbouring hues on one line
    init_logvar: float = -6.0  # initial posterior log-variance: near-deterministic latents train much faster
    ema_decay: Optional[float] = 0.995  # short run: a shorter average
    init_from: Optional[str] = None  # start from this VAE folder (config.json + weights) instead of random
    train_encoder: bool = True  # false: only the decoder learns, so latents (and a UNet trained on them) stay valid
    num_images: Optional[int] = None  # none: an endless stream of new images; N: cycle over N (overfitting tests)
    denoised_from: Optional[str] = None  # a finished UNet run folder for a decoder stage (the recipe's last,
    # ``decoder_config(vae, unet)``). Part of every batch is what that UNet makes of noised encodings of
    # fresh drawings (training.denoised), with the drawing as the target, so the decoder learns to draw
    # the UNet's slightly bent latents as clean shapes (MODEL_CARD.md: fill shape 0.82 -> 0.95)
    denoised_images: int = 6000  # drawings denoised once when the stage starts (cached in its run folder)
    denoised_fraction: float = 0.5  # the share of each batch taken from those pairs
    scale_samples: int = 512  # images encoded to measure the latent std -> scaling_factor


def decoder_config(vae_folder: str, unet_folder: Optional[str] = None) -> VAEConfig:
    """Stage 1b of the bundled recipe: fine-tune only the decoder of the stage-1 VAE in ``vae_folder``
    (the latent space stays the UNet's).

    Reconstructed colours are still drifting towards their neighbours when stage 1 ends; more
    decoder steps fix that. Shape pixels weigh 3x. Batches of 12: without the encoder there are no
    twin pairs to fill. Without ``unet_folder`` (the recipe): latent noise 0.3, so the decoder stays
    robust to imprecise latents (by blurring them). With the finished UNet run ``unet_folder`` (the
    recipe's last stage, on the first decoder stage's VAE): half of each batch is that UNet's
    denoised latents with their drawings as targets (``denoised_from``), the other half clean
    encodings, no latent noise, so the decoder learns to draw the UNet's latents as clean shapes;
    2000 steps of 8 + 8 at lr 5e-4 (16 min here, MODEL_CARD.md).
    """
    common = dict(init_from=vae_folder, train_encoder=False, foreground_weight=2.0)
    if unet_folder is None:
        return VAEConfig(**common, steps=3000, batch_size=12, lr=1e-3, warmup_steps=20, latent_noise=0.3)
    return VAEConfig(**common, steps=2000, batch_size=16, lr=5e-4, warmup_steps=50, latent_noise=0.0,
                     denoised_from=unet_folder)


@dataclass
class UNetConfig(LoopConfig):
    """Stage 2: the text encoder and UNet, trained together on cached VAE latents."""

    steps: int = 8000  # the most the recipe's hour on the 2-core CPU leaves (times in MODEL_CARD.md)
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
    timestep_bias: str = "later"  # none | later: draw the noisiest timesteps more often (losses.sample_timesteps),
    # where the layout is decided: place words were not learned without it (MODEL_CARD.md)
    timestep_bias_portion: float = 0.25  # the share of the timesteps that "later" favours
    timestep_bias_multiplier: float = 3.0  # how much more often they are drawn
    min_snr_gamma: Optional[float] = None  # Min-SNR-gamma weighting (none: plain MSE). For v it weighs
    # down the high-noise steps, where the layout is decided, so place words went unlearned
    offset_noise: float = 0.05  # per-channel shared noise: lets flat backgrounds reach their exact tone
    init_from: Optional[str] = None  # start from this folder's unet/ and text_encoder/ (a UNet run or a
    # pipeline folder of the same architecture) instead of random weights: a fine-tuning run
    guidance_agreement: float = 0.0  # experimental, off (not in the recipe; as a fine-tune it did not pay, MODEL_CARD.md):
    # weight of losses.agreement_loss: below guidance_agreement_below the empty prompt's prediction must
    # match the prompt's (stop-gradient), so classifier-free guidance, which scales their difference, has
    # nothing to amplify where the image is already decided
    guidance_agreement_below: int = 500  # training timesteps t < this get the agreement term
    immiscible: bool = False  # assign noise to latents within the batch by least total distance; with
    # 32 latents per process the assigned noise carries the layout, which then ignores the prompt
    # UNet architecture (8x8 latents: levels 8 -> 4 -> 2)
    block_out_channels: Tuple[int, ...] = (32, 64, 128)  # 3.2M params: small enough for the CPU recipe
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
    # export: the scheduler class and the recommended settings written to recommended_settings.json
    # (what a pipeline call that does not pass them uses; the measurements are in MODEL_CARD.md)
    scheduler: str = "DDIMScheduler"  # the bundled model's default sampler
    guidance_scale: float = 5.0  # recommended classifier-free guidance scale (not used in training)
    guidance_rescale: float = 0.7  # recommended guidance rescale (Lin et al. 2024)
    guidance_end: float = 0.6  # recommended guidance interval: the first 60% of the steps are guided
    num_inference_steps: int = 25  # recommended sampler steps


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
