"""The two training stages of the bundled model: the VAE, then UNet + text encoder on cached latents.

A stage gives the loop (``loop.train``) four things: ``setup`` (data preparation, run once per
process, main process first), ``build_models``, ``batch(step, rank, world, batch_size, device)`` (every random
draw seeded by ``(seed, step, rank)``) and ``loss(models, batch)``; ``finish`` saves the result.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile

import numpy as np
import torch

from sdkit.files import atomic_write, plain_modes
from sdkit.models import AutoencoderKL, UNet2DConditionModel

from . import losses
from .config import ConfigError
from .loop import seed_for
from .shapes import (BACKGROUNDS, COLORS, OPTIONAL_PARTS, PLACES, SHAPES, SIZES, Attributes,
                     ShapesDataset, caption, sample_attributes, to_pixel_values,
                     twins, vocabulary)
from .tokenizer import build_clip_tokenizer

STREAM_LENGTH = 2**62
"""The VAE reads an endless stream of shapes items: batch ``(step, rank)`` takes its own slice."""

_ATTRIBUTE_TABLES = (("color", list(COLORS)), ("shape", list(SHAPES)), ("place", list(PLACES)),
                     ("size", list(SIZES)), ("background", list(BACKGROUNDS)))


def vae_model_config(cfg) -> dict:
    """diffusers-style AutoencoderKL config for a ``VAEConfig``."""
    n = len(cfg.block_out_channels)
    return dict(in_channels=3, out_channels=3, block_out_channels=tuple(cfg.block_out_channels),
                down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                layers_per_block=cfg.layers_per_block, latent_channels=cfg.latent_channels,
                norm_num_groups=cfg.norm_num_groups, sample_size=64, scaling_factor=1.0)


def unet_model_config(cfg) -> dict:
    """diffusers-style UNet2DConditionModel config for a ``UNetConfig`` (attention below the top level)."""
    n = len(cfg.block_out_channels)
    return dict(sample_size=8, in_channels=4, out_channels=4, block_out_channels=tuple(cfg.block_out_channels),
                layers_per_block=cfg.layers_per_block,
                down_block_types=("CrossAttnDownBlock2D",) * (n - 1) + ("DownBlock2D",),
                up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 1),
                cross_attention_dim=cfg.text_hidden_size, attention_head_dim=cfg.attention_head_dim,
                norm_num_groups=cfg.norm_num_groups, resnet_time_scale_shift=cfg.resnet_time_scale_shift,
                addition_embed_type=cfg.addition_embed_type,
                addition_embed_type_num_heads=cfg.addition_embed_type_num_heads)


def text_encoder_config(cfg, tokenizer):
    """A small transformers CLIPTextConfig whose vocabulary and length match the tokenizer."""
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=cfg.text_hidden_size,
        intermediate_size=4 * cfg.text_hidden_size, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, max_position_embeddings=cfg.max_length,
        hidden_act="quick_gelu", bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)


class VAEStage:
    """AutoencoderKL on freshly rendered shapes: squared error (shape pixels weighted) + small KL,
    with the colour-factorization terms when ``colour_factorization`` is on."""

    name = "vae"

    def __init__(self, cfg):
        if cfg.colour_factorization and not 0 < cfg.colour_channels < cfg.latent_channels:
            raise ConfigError(f"colour_channels must leave channels on both sides: 1 to {cfg.latent_channels - 1} "
                             f"of the {cfg.latent_channels} latent channels, got {cfg.colour_channels}")
        if cfg.colour_margin < 0:
            raise ConfigError(f"colour_margin is a distance in unit-variance latents and must be >= 0, "
                              f"got {cfg.colour_margin}")
        if cfg.denoised_from and (cfg.train_encoder or not cfg.init_from):
            raise ConfigError("denoised_from trains the decoder of an existing VAE on a UNet's latents: it needs "
                              "init_from (the VAE the UNet was trained on) and train_encoder false (the decoder stage)")
        if cfg.reconstruction_loss not in ("mse", "l1"):
            raise ConfigError(f"reconstruction_loss is 'mse' or 'l1', got {cfg.reconstruction_loss!r}")
        if cfg.reconstruction_loss == "l1" and cfg.train_encoder:
            raise ConfigError("reconstruction_loss 'l1' is for a decoder stage (train_encoder false): from scratch "
                              "an L1 autoencoder erases the shape first (losses.vae_loss)")
        if cfg.denoised_from and not 0 < cfg.denoised_fraction < 1:
            raise ConfigError(f"denoised_fraction is a share of each batch, 0 < it < 1, got {cfg.denoised_fraction}")
        self.cfg = cfg
        self.denoised = None

    def setup(self, out_dir, accelerator):
        """With ``denoised_from``: make (once per run folder) and load the UNet's denoised pairs."""
        cfg = self.cfg
        if not cfg.denoised_from:
            return
        cache = os.path.join(out_dir, "denoised.pt")
        key = json.dumps({"vae": os.path.abspath(cfg.init_from), "unet": os.path.abspath(cfg.denoised_from),
                          "num_images": cfg.denoised_images, "seed": cfg.seed + 20_000}, sort_keys=True)
        saved = torch.load(cache, weights_only=True) if os.path.isfile(cache) else None
        if saved is None or saved["key"] != key:
            if not accelerator.is_main_process:
                raise RuntimeError(f"denoised pairs {cache} missing after the main process built them")
            from .denoised import denoised_pairs, unet_pipeline

            pipe = unet_pipeline(cfg.init_from, cfg.denoised_from).to(accelerator.device)
            latents, images = denoised_pairs(pipe, cfg.denoised_images, cfg.seed + 20_000)
            saved = {"key": key, "latents": latents, "images": images}
            atomic_write(cache, lambda tmp: torch.save(saved, tmp))
        self.denoised = (saved["latents"], saved["images"])

    def build_models(self):
        cfg = self.cfg
        if cfg.init_from:
            vae = AutoencoderKL.from_pretrained(cfg.init_from)
        else:
            vae = AutoencoderKL.from_config(vae_model_config(cfg))
            # Start the posterior almost deterministic (std = exp(init_logvar / 2)): with the default
            # std ~1 the decoder first sees latents drowned in noise and learns only a blurry average.
            # The KL term raises the variance later as far as it pays.
            with torch.no_grad():
                vae.quant_conv.bias[cfg.latent_channels:] = cfg.init_logvar
        if not cfg.train_encoder:  # decoder fine-tuning: the latent space stays exactly as it was
            for module in (vae.encoder, vae.quant_conv):
                module.requires_grad_(False)
        return {"vae": vae}

    def pairs(self):
        """True when batches are twin drawings (the colour-factorization term is on)."""
        return bool(self.cfg.colour_factorization) and self.cfg.train_encoder

    def check_batch(self, B):
        """Raise ``ConfigError`` unless ``B`` examples per process fit this stage's batches."""
        if self.pairs() and (B < 4 or B % 4):
            raise ConfigError(f"colour_factorization needs a batch of 4, 8, 12, ... per process, got {B}: "
                              f"make batch_size a multiple of 4 x the number of processes")
        if self.cfg.denoised_from and not 0 < self.denoised_count(B) < B:
            raise ConfigError(f"denoised_fraction {self.cfg.denoised_fraction} of {B} examples per process leaves "
                              f"no room for both kinds of example; raise batch_size")

    def denoised_count(self, B):
        """How many of ``B`` examples per process are the UNet's denoised pairs."""
        return int(round(B * self.cfg.denoised_fraction)) if self.cfg.denoised_from else 0

    def batch(self, step, rank, world, B, device):
        first = (step * world + rank) * B  # disjoint slices of the stream per (step, rank)
        generator = torch.Generator().manual_seed(seed_for(self.cfg.seed, step, rank))
        self.check_batch(B)
        pairs = self.pairs()
        indices = torch.arange(first, first + (B // 2 if pairs else B))  # pairs: drawings, each with a twin
        if self.cfg.num_images:
            indices = indices % self.cfg.num_images
        if pairs:
            # the first half of the pairs changes the background, the second half the colour
            made = [twins(self.cfg.seed, int(i), "background" if k < B // 4 else "color")
                    for k, i in enumerate(indices)]
            images, changed, alphas = zip(*made)
            images = to_pixel_values(np.stack(images + changed))  # (B, 3, 64, 64): drawings, then twins
            coverage = torch.from_numpy(np.stack(alphas)).float()[:, None]  # (B / 2, 1, 64, 64)
            return {"images": images.to(device), "indices": indices, "generator": generator,
                    "coverage": coverage.to(device)}
        data = ShapesDataset(STREAM_LENGTH, seed=self.cfg.seed)
        n = self.denoised_count(B)
        images = torch.stack([data[int(i)]["pixel_values"] for i in indices[:B - n]])  # (B - n, 3, 64, 64)
        batch = {"images": images.to(device), "indices": indices, "generator": generator}
        if n:
            latents, targets = self.denoised
            picks = torch.randint(0, len(latents), (n,), generator=generator)
            batch["denoised"] = latents[picks].to(device)  # (n, C, h, w), scaled as the UNet's
            batch["denoised_images"] = to_pixel_values(targets[picks].movedim(1, -1).numpy()).to(device)
        return batch

    def loss(self, models, batch):
        vae = models["vae"]
        with torch.set_grad_enabled(self.cfg.train_encoder):
            posterior = vae.encode(batch["images"])
        z = posterior.sample(batch["generator"])
        if self.cfg.latent_noise:  # the decoder must read latents as imprecise as a UNet's samples
            noise = torch.randn(z.shape, generator=batch["generator"]).to(z.device)
            z = z + self.cfg.latent_noise * z.detach().std() * noise
        targets = batch["images"]
        if "denoised" in batch:  # the UNet's latents, to be drawn as the drawings they came from
            z = torch.cat([z, batch["denoised"] / vae.config.scaling_factor])
            targets = torch.cat([targets, batch["denoised_images"]])
        reconstruction = vae.decode(z)
        loss, rec, kl = losses.vae_loss(reconstruction, targets, posterior, self.cfg.kl_weight,
                                         self.cfg.foreground_weight, self.cfg.reconstruction_loss)
        logs = {"rec": rec.detach(), "kl": kl.detach()}
        if self.cfg.train_encoder and self.cfg.channel_decorrelation:
            corr = losses.channel_correlation_loss(posterior.mean)
            loss = loss + self.cfg.channel_decorrelation * corr
            logs["corr"] = corr.detach()
        if self.pairs():
            terms = self.factorization(posterior.mean, batch["coverage"])
            loss = loss + self.cfg.colour_factorization * sum(terms.values())
            logs.update({name: term.detach() for name, term in terms.items()})
        return loss, logs

    def factorization(self, latents, coverage):
        """The colour-factorization terms: ``inv_bg``, the colour channels' change with the background;
        ``inv_col``, the other channels' change with the colour; with ``colour_margin``, ``sep``, how
        far the colour channels of different colours fall short of that margin apart."""
        drawings, changed = latents.chunk(2)
        weights = torch.nn.functional.avg_pool2d(coverage, coverage.shape[-1] // latents.shape[-1])
        k, half = self.cfg.colour_channels, len(weights) // 2  # pairs [:half] changed background, [half:] colour
        scale = latents.detach().var()
        terms = {"inv_bg": losses.invariance_loss(drawings[:half, :k], changed[:half, :k], weights[:half], scale),
                 "inv_col": losses.invariance_loss(drawings[half:, k:], changed[half:, k:], weights[half:], scale)}
        if self.cfg.colour_margin:
            terms["sep"] = losses.separation_loss(drawings[half:, :k], changed[half:, :k], weights[half:], scale,
                                                  self.cfg.colour_margin)
        return terms

    def finish(self, models, out_dir):
        """Save ``out_dir/vae`` with ``scaling_factor`` = 1 / std of the latents (unit-variance latents)."""
        vae = models["vae"]
        data = ShapesDataset(self.cfg.scale_samples, seed=self.cfg.seed + 10_000)
        with torch.no_grad():
            images = torch.stack([data[i]["pixel_values"] for i in range(len(data))])
            z = torch.cat([vae.encode(chunk.to(vae.device)).mean for chunk in images.split(64)])
        scale = round(float(1.0 / z.std()), 5) if self.cfg.train_encoder else vae.config.scaling_factor
        final = AutoencoderKL.from_config({**vae.config, "scaling_factor": scale})
        final.load_state_dict(vae.state_dict())
        final.save_pretrained(os.path.join(out_dir, "vae"))


def attribute_codes(attrs: Attributes) -> list[int]:
    return [values.index(getattr(attrs, name)) for name, values in _ATTRIBUTE_TABLES]


def attributes_from_codes(codes) -> Attributes:
    return Attributes(**{name: values[int(c)] for (name, values), c in zip(_ATTRIBUTE_TABLES, codes)})


@torch.no_grad()
def encode_dataset(vae, num_images, seed, batch_size=64):
    """VAE posterior (mean, std) and attribute codes of ShapesDataset(num_images, seed) items."""
    data = ShapesDataset(num_images, seed=seed)
    means, stds, codes = [], [], []
    for start in range(0, num_images, batch_size):
        items = [data[i] for i in range(start, min(start + batch_size, num_images))]
        images = torch.stack([it["pixel_values"] for it in items]).to(vae.device)  # (b, 3, 64, 64)
        posterior = vae.encode(images)
        means.append(posterior.mean.cpu())
        stds.append(posterior.std.cpu())
        codes.extend(attribute_codes(Attributes(**it["attrs"])) for it in items)
    return torch.cat(means), torch.cat(stds), torch.tensor(codes, dtype=torch.long)


class UNetStage:
    """UNet + CLIP text encoder on cached latents, with the diffusion options of ``UNetConfig``."""

    name = "unet"

    def __init__(self, cfg, vae_dir):
        self.cfg, self.vae_dir = cfg, vae_dir
        self.scheduler = losses.config_noise_scheduler(cfg)
        losses.check_timestep_bias(cfg.timestep_bias, cfg.timestep_bias_portion, cfg.timestep_bias_multiplier)
        self._ids = {}
        if cfg.init_from:  # refused here, before setup writes the tokenizer and the latent cache
            for name in ("unet", "text_encoder"):
                if not os.path.isdir(os.path.join(cfg.init_from, name)):
                    raise ConfigError(f"init_from: {os.path.join(cfg.init_from, name)} not found; give a UNet run "
                                      f"or pipeline folder holding {name}/")
            with tempfile.TemporaryDirectory() as tmp:  # the models' shapes need the tokenizer's vocabulary size
                self.tokenizer = build_clip_tokenizer(vocabulary(), tmp, model_max_length=cfg.max_length)
            self.build_models()  # the architecture check (load_initial); setup builds the tokenizer again

    def setup(self, out_dir, accelerator):
        """Build the tokenizer and cache the VAE latents of the training images (once per out_dir)."""
        cfg = self.cfg
        tok_dir = os.path.join(out_dir, "tokenizer")
        if accelerator.is_main_process:
            self.tokenizer = build_clip_tokenizer(vocabulary(), tok_dir, model_max_length=cfg.max_length)
        else:
            from transformers import CLIPTokenizer
            self.tokenizer = CLIPTokenizer.from_pretrained(tok_dir)
        vae = AutoencoderKL.from_pretrained(self.vae_dir, subfolder="vae")
        self.scaling_factor = vae.config.scaling_factor
        cache = os.path.join(out_dir, "latents.pt")
        key = {"vae": os.path.abspath(self.vae_dir), "num_images": cfg.num_images, "seed": cfg.data_seed}
        saved = torch.load(cache, weights_only=True) if os.path.isfile(cache) else None
        if saved is None or saved["key"] != json.dumps(key, sort_keys=True):
            if not accelerator.is_main_process:
                raise RuntimeError(f"latent cache {cache} missing after the main process built it")
            mean, std, codes = encode_dataset(vae.to(accelerator.device), cfg.num_images, cfg.data_seed)
            saved = {"key": json.dumps(key, sort_keys=True), "mean": mean, "std": std, "codes": codes}
            tmp = cache + ".tmp"
            torch.save(saved, tmp)
            os.replace(tmp, cache)
        self.mean, self.std, self.codes = saved["mean"], saved["std"], saved["codes"]

    def build_models(self):
        from transformers import CLIPTextModel

        text_encoder = CLIPTextModel(text_encoder_config(self.cfg, self.tokenizer))
        unet = UNet2DConditionModel.from_config(unet_model_config(self.cfg))
        if self.cfg.init_from:
            self.load_initial(unet, text_encoder, self.cfg.init_from)
        return {"unet": unet, "text_encoder": text_encoder}

    @staticmethod
    def load_initial(unet, text_encoder, folder):
        """Copy ``folder``'s unet/ and text_encoder/ weights into the freshly built models (same shapes)."""
        from transformers import CLIPTextModel

        for name, model, load in (("unet", unet, UNet2DConditionModel.from_pretrained),
                                  ("text_encoder", text_encoder, CLIPTextModel.from_pretrained)):
            path = os.path.join(folder, name)
            try:  # strict: every key present, none extra, every shape equal
                model.load_state_dict(load(path).state_dict())
            except RuntimeError as e:
                lines = str(e).splitlines()  # line 0 names the class, then one line per kind of problem
                first = (lines[1:] or lines)[0].strip()[:200]
                raise ConfigError(f"init_from: {path} is not this config's architecture ({first}); "
                                  f"pass the architecture fields it was trained with") from None

    def input_ids(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self._ids]
        if missing:
            ids = self.tokenizer(missing, padding="max_length", max_length=self.cfg.max_length,
                                 truncation=True, return_tensors="pt").input_ids
            self._ids.update(zip(missing, ids))
        return torch.stack([self._ids[t] for t in texts])  # (B, max_length)

    def captions(self, indices, rng):
        """A fresh caption per example: optional parts dropped, or "" (caption dropout)."""
        cfg, texts = self.cfg, []
        for i in indices:
            keep = {part for part in sorted(OPTIONAL_PARTS) if rng.random() >= cfg.caption_drop_prob}
            empty = rng.random() < cfg.empty_caption_prob
            texts.append("" if empty else caption(attributes_from_codes(self.codes[i]), keep))
        return texts

    def batch(self, step, rank, world, B, device):
        cfg = self.cfg
        rng = np.random.default_rng(seed_for(cfg.seed, step, rank))
        generator = torch.Generator().manual_seed(seed_for(cfg.seed, step, rank, 1))
        indices = torch.as_tensor(rng.integers(0, len(self.mean), size=B))
        texts = self.captions(indices.tolist(), rng)
        z = self.mean[indices]  # (B, 4, 8, 8)
        if cfg.sample_posterior:
            z = z + self.std[indices] * torch.randn(z.shape, generator=generator)
        x0 = z * self.scaling_factor
        eps = losses.offset_noise(x0.shape, cfg.offset_noise, generator)
        if cfg.immiscible:
            eps = eps[losses.immiscible_assignment(x0, eps)]
        timesteps = losses.sample_timesteps(B, cfg.num_train_timesteps, generator, cfg.timestep_bias,
                                            cfg.timestep_bias_portion, cfg.timestep_bias_multiplier)
        return {"x0": x0.to(device), "eps": eps.to(device), "timesteps": timesteps.to(device),
                "input_ids": self.input_ids(texts).to(device), "indices": indices, "captions": texts}

    def loss(self, models, batch):
        x0, eps, t = batch["x0"], batch["eps"], batch["timesteps"]
        context = models["text_encoder"](batch["input_ids"]).last_hidden_state  # (B, T, D)
        x_t = self.scheduler.add_noise(x0, eps, t)
        prediction = models["unet"](x_t, t, context)
        target = losses.diffusion_target(self.scheduler, x0, eps, t)
        weights = losses.min_snr_weights(self.scheduler, t, self.cfg.min_snr_gamma)
        loss = losses.diffusion_loss(prediction, target, weights)
        if not self.cfg.guidance_agreement:
            return loss, {}
        agree = self.agreement(models, x_t, t, prediction)
        return loss + self.cfg.guidance_agreement * agree, {"agree": agree.detach()}

    def agreement(self, models, x_t, t, prediction):
        """``losses.agreement_loss`` of the empty prompt's prediction on the batch's low-noise part."""
        low = t < self.cfg.guidance_agreement_below
        if not low.any():
            return prediction.sum() * 0.0
        empty = models["text_encoder"](self.input_ids([""]).to(x_t.device)).last_hidden_state  # (1, T, D)
        n = int(low.sum())
        uncond = models["unet"](x_t[low], t[low], empty.expand(n, -1, -1))
        return losses.agreement_loss(uncond, prediction[low], len(t))

    def finish(self, models, out_dir):
        models["unet"].save_pretrained(os.path.join(out_dir, "unet"))
        folder = os.path.join(out_dir, "text_encoder")
        os.makedirs(folder, exist_ok=True)
        with plain_modes(folder):  # transformers writes the weights 0600
            models["text_encoder"].save_pretrained(folder)
        with open(os.path.join(out_dir, "train_config.json"), "w") as f:
            json.dump(dataclasses.asdict(self.cfg), f, indent=2)
