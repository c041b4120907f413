"""Training: the maths of every option, the loop (loss goes down, clipping, LR, EMA), exact resume."""

import itertools
import json
import os

import numpy as np
import pytest
import torch
from torch import nn

from sdkit.schedulers import DDPMScheduler
from sdkit.training import losses
from sdkit.training.config import LoopConfig, UNetConfig, VAEConfig
from sdkit.training.ema import EMA, ema_decay
from sdkit.training.loop import LOG_FILE, load_checkpoint, lr_at, seed_for, train

TINY_VAE = dict(block_out_channels=(8, 8, 8, 8), norm_num_groups=4, batch_size=4, lr=3e-3, warmup_steps=2,
                scale_samples=16, save_every=1000, log_every=1, ema_decay=0.9)
TINY_UNET = dict(block_out_channels=(16, 32), norm_num_groups=8, attention_head_dim=2, text_hidden_size=16,
                 text_layers=1, text_heads=2, num_images=16, batch_size=8, warmup_steps=2, lr=3e-3,
                 save_every=1000, log_every=1, ema_decay=0.9)


def read_log(out_dir):
    with open(os.path.join(out_dir, LOG_FILE)) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- option maths

def _schedule(prediction_type="epsilon", beta_schedule="scaled_linear"):
    return losses.noise_scheduler(beta_schedule=beta_schedule, prediction_type=prediction_type)


def test_epsilon_and_v_targets_equal_their_formulas():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(5, 4, 8, 8, generator=g), torch.randn(5, 4, 8, 8, generator=g)
    t = torch.tensor([0, 10, 300, 700, 999])
    assert torch.equal(losses.diffusion_target(_schedule("epsilon"), x0, eps, t), eps)
    alpha_bar = _schedule().alphas_cumprod[t].reshape(-1, 1, 1, 1)
    v = alpha_bar.sqrt() * eps - (1 - alpha_bar).sqrt() * x0  # Salimans & Ho 2022
    torch.testing.assert_close(losses.diffusion_target(_schedule("v_prediction"), x0, eps, t), v)
    with pytest.raises(ValueError, match="prediction_type"):
        losses.noise_scheduler(prediction_type="sample")


def test_min_snr_weights_equal_the_formula_for_both_prediction_types():
    t = torch.arange(0, 1000, 37)
    alpha_bar = _schedule().alphas_cumprod[t]
    snr = alpha_bar / (1 - alpha_bar)
    gamma = 5.0
    torch.testing.assert_close(losses.min_snr_weights(_schedule("epsilon"), t, gamma),
                               torch.minimum(snr, torch.tensor(gamma)) / snr)
    torch.testing.assert_close(losses.min_snr_weights(_schedule("v_prediction"), t, gamma),
                               torch.minimum(snr, torch.tensor(gamma)) / (snr + 1))
    assert torch.equal(losses.min_snr_weights(_schedule(), t, None), torch.ones(len(t)))
    # low-noise steps (snr > gamma) are down-weighted, noisy ones kept
    w = losses.min_snr_weights(_schedule("epsilon"), t, gamma)
    assert w[0] < 0.01 and w[-1] == 1.0


def test_offset_noise_shifts_each_channel_by_one_shared_draw_and_is_off_by_default():
    shape = (3, 4, 8, 8)
    plain = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(losses.offset_noise(shape, 0.0, torch.Generator().manual_seed(1)), plain)
    assert torch.equal(losses.offset_noise(shape, generator=torch.Generator().manual_seed(1)), plain)
    g = torch.Generator().manual_seed(1)
    torch.randn(shape, generator=g)
    shift = torch.randn((3, 4, 1, 1), generator=g)  # the next draw: one per (sample, channel)
    noisy = losses.offset_noise(shape, 0.1, torch.Generator().manual_seed(1))
    torch.testing.assert_close(noisy - plain, (0.1 * shift).expand(shape))
    torch.testing.assert_close(noisy.mean((2, 3)) - plain.mean((2, 3)), 0.1 * shift[:, :, 0, 0])


def test_immiscible_assignment_is_the_least_total_distance_permutation():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(6, 4, 2, 2, generator=g), torch.randn(6, 4, 2, 2, generator=g)
    perm = losses.immiscible_assignment(x0, eps)
    assert sorted(perm.tolist()) == list(range(6))

    def total(p):
        return sum(float((x0[i] - eps[p[i]]).norm()) for i in range(6))

    best = min(itertools.permutations(range(6)), key=total)
    assert perm.tolist() == list(best)
    assert total(perm.tolist()) <= total(list(range(6)))
    # larger batch: never worse than the identity pairing
    x0, eps = torch.randn(64, 16, generator=g), torch.randn(64, 16, generator=g)
    perm = losses.immiscible_assignment(x0, eps)
    assert (x0 - eps[perm]).norm(dim=1).sum() <= (x0 - eps).norm(dim=1).sum()


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear", "squaredcos_cap_v2"])
def test_beta_schedule_choice_reaches_the_noise_schedule(tmp_path, beta_schedule):
    from sdkit.training.export import scheduler_config
    from sdkit.training.stages import UNetStage

    cfg = UNetConfig(beta_schedule=beta_schedule, rescale_betas_zero_snr=False)
    stage = UNetStage(cfg, vae_dir=str(tmp_path))
    expected = DDPMScheduler(beta_schedule=beta_schedule, beta_start=cfg.beta_start, beta_end=cfg.beta_end)
    assert torch.equal(stage.scheduler.alphas_cumprod, expected.alphas_cumprod)
    if beta_schedule == "linear":
        betas = torch.linspace(cfg.beta_start, cfg.beta_end, 1000)
        torch.testing.assert_close(stage.scheduler.alphas_cumprod, torch.cumprod(1 - betas, 0))
    exported = scheduler_config(cfg, "DDIMScheduler")
    assert exported["beta_schedule"] == beta_schedule and exported["_class_name"] == "DDIMScheduler"
    assert exported["prediction_type"] == cfg.prediction_type


def test_zero_terminal_snr_reaches_training_and_the_exported_scheduler(tmp_path):
    """rescale_betas_zero_snr: the last training step is pure noise (as in diffusers), v-target only,
    and the exported sampler starts at t = T ("trailing") with the same rescaled schedule."""
    import diffusers

    from sdkit.schedulers import DDIMScheduler
    from sdkit.training.export import scheduler_config
    from sdkit.training.stages import UNetStage

    cfg = UNetConfig(rescale_betas_zero_snr=True, prediction_type="v_prediction")
    stage = UNetStage(cfg, vae_dir=str(tmp_path))
    reference = diffusers.DDPMScheduler(beta_schedule="scaled_linear", beta_start=cfg.beta_start,
                                        beta_end=cfg.beta_end, rescale_betas_zero_snr=True)
    torch.testing.assert_close(stage.scheduler.alphas_cumprod, reference.alphas_cumprod, rtol=0, atol=1e-7)
    assert float(stage.scheduler.alphas_cumprod[-1]) < 1e-7  # x_T = eps exactly
    x0, eps = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    t = torch.tensor([999, 999])
    torch.testing.assert_close(stage.scheduler.add_noise(x0, eps, t), eps, rtol=0, atol=1e-5)
    torch.testing.assert_close(losses.diffusion_target(stage.scheduler, x0, eps, t), -x0, rtol=0, atol=1e-3)
    assert torch.isfinite(losses.min_snr_weights(stage.scheduler, t, 5.0)).all()

    exported = scheduler_config(cfg, "DDIMScheduler")
    assert exported["rescale_betas_zero_snr"] is True and exported["timestep_spacing"] == "trailing"
    state = DDIMScheduler.from_config(exported).set_timesteps(25)
    assert int(state.timesteps[0]) == 999
    assert scheduler_config(UNetConfig(rescale_betas_zero_snr=False), "DDIMScheduler")["timestep_spacing"] == "leading"
    with pytest.raises(ValueError, match="v_prediction"):
        losses.noise_scheduler(prediction_type="epsilon", rescale_betas_zero_snr=True)


def test_later_timestep_bias_draws_the_noisiest_portion_multiplier_times_as_often():
    g = torch.Generator().manual_seed(0)
    t = losses.sample_timesteps(200_000, 1000, g, "later", portion=0.25, multiplier=3.0)
    assert t.min() >= 0 and t.max() <= 999 and t.dtype == torch.int64
    # weights 1 on [0, 750) and 3 on [750, 1000): P(t >= 750) = 750 / (750 + 750) = 0.5
    assert abs(float((t >= 750).float().mean()) - 0.5) < 0.01
    low, high = torch.bincount(t, minlength=1000)[:750].float().mean(), torch.bincount(t)[750:].float().mean()
    assert abs(float(high / low) - 3.0) < 0.1
    # "none" (or multiplier 1) is exactly the uniform draw, so older runs resume unchanged
    for kwargs in (dict(bias="none"), dict(bias="later", multiplier=1.0)):
        uniform = losses.sample_timesteps(64, 1000, torch.Generator().manual_seed(3), **kwargs)
        assert torch.equal(uniform, torch.randint(0, 1000, (64,), generator=torch.Generator().manual_seed(3)))
    with pytest.raises(ValueError, match="timestep bias"):
        losses.sample_timesteps(4, 1000, bias="earlier")
    with pytest.raises(ValueError, match="portion"):
        losses.sample_timesteps(4, 1000, bias="later", portion=1.5, multiplier=2.0)


def test_unet_architecture_options_reach_the_model(tmp_path):
    """FiLM resnets and the pooled-prompt embedding are UNetConfig options (diffusers config keys)."""
    from sdkit.training.stages import unet_model_config
    from sdkit.models import UNet2DConditionModel

    cfg = _unet_cfg(resnet_time_scale_shift="scale_shift", addition_embed_type="text", addition_embed_type_num_heads=2)
    unet = UNet2DConditionModel.from_config(unet_model_config(cfg))
    assert unet.config.resnet_time_scale_shift == "scale_shift" and unet.add_embedding is not None
    assert unet.down_blocks[0].resnets[0].time_emb_proj.out_features == 2 * cfg.block_out_channels[0]
    plain = UNet2DConditionModel.from_config(unet_model_config(_unet_cfg()))
    assert plain.add_embedding is None


def test_ema_update_equals_the_formula():
    torch.manual_seed(0)
    net = nn.Linear(3, 2)
    ema = EMA(net, decay=0.99)
    before = {k: v.clone() for k, v in ema.shadow.items()}
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net, step=5)
    d = min(0.99, 6 / 15)
    assert ema_decay(5, 0.99) == d and ema_decay(10**6, 0.99) == 0.99 and ema_decay(5, 0.99, warmup=False) == 0.99
    for name, p in net.named_parameters():
        torch.testing.assert_close(ema.shadow[name], d * before[name] + (1 - d) * p.detach())
    copy = nn.Linear(3, 2)
    ema.copy_to(copy)
    assert torch.equal(copy.weight, ema.shadow["weight"])


def test_lr_warms_up_linearly_then_follows_a_cosine():
    lr, warmup, total, floor = 1e-3, 10, 110, 0.1
    assert lr_at(0, lr, warmup, total, floor) == pytest.approx(1e-4)
    assert lr_at(4, lr, warmup, total, floor) == pytest.approx(5e-4)
    assert lr_at(9, lr, warmup, total, floor) == pytest.approx(1e-3)
    assert lr_at(10, lr, warmup, total, floor) == pytest.approx(1e-3)
    assert lr_at(60, lr, warmup, total, floor) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5))
    assert lr_at(110, lr, warmup, total, floor) == pytest.approx(1e-4)
    assert lr_at(35, lr, warmup, total, floor) == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + np.cos(np.pi / 4))))


def test_seeds_differ_per_step_and_rank():
    seeds = {seed_for(0, step, rank) for step in range(50) for rank in range(4)}
    assert len(seeds) == 200 and seed_for(0, 3, 1) == seed_for(0, 3, 1)


def test_vae_loss_weights_shape_pixels_and_adds_the_kl_term():
    from sdkit.models.vae import DiagonalGaussian
    from sdkit.training.shapes import ShapesDataset

    item = ShapesDataset(1, seed=3)[0]
    image = item["pixel_values"][None]  # (1, 3, 64, 64)
    w = losses.foreground_weights(image, 4.0)
    shape = (image - image[:, :, :1, :1]).abs().amax(1, keepdim=True) > 0.05
    assert 100 < int(shape.sum()) < 64 * 64 / 2
    assert torch.equal(w, torch.where(shape, 5.0, 1.0))
    assert torch.equal(losses.foreground_weights(image, 0.0), torch.ones_like(w))
    posterior = DiagonalGaussian(torch.zeros(1, 8, 8, 8))  # N(0, 1): KL 0
    loss, rec, kl = losses.vae_loss(image + 0.1, image, posterior, kl_weight=1.0)
    assert float(kl) == 0 and float(rec) == pytest.approx(0.01) and float(loss) == pytest.approx(0.01)
    posterior = DiagonalGaussian(torch.cat([torch.ones(1, 4, 8, 8), torch.zeros(1, 4, 8, 8)], 1))
    assert float(losses.vae_loss(image, image, posterior, kl_weight=0.5)[0]) == pytest.approx(0.25)


def test_vae_loss_l1_is_the_weighted_mean_absolute_error():
    from sdkit.models.vae import DiagonalGaussian
    from sdkit.training.shapes import ShapesDataset

    image = ShapesDataset(1, seed=3)[0]["pixel_values"][None]  # (1, 3, 64, 64)
    error = torch.randn(image.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    posterior = DiagonalGaussian(torch.zeros(1, 8, 8, 8))
    w = losses.foreground_weights(image, 2.0)  # (1, 1, 64, 64), broadcast over the channels
    expected = float((w * error.abs()).sum() / (w.sum() * 3))  # the weighted mean over every pixel value
    _, rec, _ = losses.vae_loss(image + error, image, posterior, 1.0, foreground_weight=2.0, kind="l1")
    assert float(rec) == pytest.approx(expected, rel=1e-5)
    _, rec, _ = losses.vae_loss(image + error, image, posterior, 1.0, foreground_weight=2.0, kind="mse")
    assert float(rec) == pytest.approx(float((w * error ** 2).sum() / (w.sum() * 3)), rel=1e-5)
    with pytest.raises(ValueError, match="expected 'mse' or 'l1'"):
        losses.vae_loss(image, image, posterior, 1.0, kind="huber")


def test_channel_correlation_loss_is_the_mean_squared_off_diagonal_correlation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(6, 4, 8, 8, generator=g)
    z[:, 1] = 0.5 * z[:, 0] + z[:, 1]  # channels 0 and 1 correlated
    samples = z.transpose(0, 1).flatten(1).double().numpy()  # (4, 384): every position a sample
    corr = np.corrcoef(samples)
    expected = (corr ** 2).sum() - 4  # the diagonal is 1
    assert float(losses.channel_correlation_loss(z)) == pytest.approx(expected / 12, rel=1e-4)
    # scale and offset per channel do not matter; one signal in every channel is the maximum, 1
    scaled = z * torch.tensor([1.0, 30.0, 0.01, 2.0])[:, None, None] + 5
    assert float(losses.channel_correlation_loss(scaled)) == pytest.approx(expected / 12, rel=1e-4)
    same = z[:, :1].repeat(1, 4, 1, 1) * torch.tensor([1.0, -2.0, 3.0, 0.5])[:, None, None]
    assert float(losses.channel_correlation_loss(same)) == pytest.approx(1.0, abs=1e-5)


def test_vae_stage_adds_the_channel_decorrelation_term_only_while_the_encoder_trains():
    from sdkit.models import AutoencoderKL
    from sdkit.training.stages import VAEStage, vae_model_config

    plain = {**TINY_VAE, "colour_factorization": 0.0}  # this term alone
    cfg = VAEConfig(**{**plain, "channel_decorrelation": 0.0})
    vae = AutoencoderKL.from_config(vae_model_config(cfg))
    base = VAEStage(cfg)
    batch = base.batch(step=1, rank=0, world=1, B=4, device="cpu")
    state = batch["generator"].get_state()
    loss0, logs0 = base.loss({"vae": vae}, batch)
    assert "corr" not in logs0
    batch["generator"].set_state(state)
    loss, logs = VAEStage(VAEConfig(**{**plain, "channel_decorrelation": 0.3})).loss({"vae": vae}, batch)
    with torch.no_grad():
        corr = losses.channel_correlation_loss(vae.encode(batch["images"]).mean)
    assert float(logs["corr"]) == pytest.approx(float(corr)) and float(corr) > 0
    assert float(loss.detach()) == pytest.approx(float(loss0.detach()) + 0.3 * float(corr), rel=1e-5)
    # the decoder stage (frozen encoder) cannot change the correlation: no term
    batch["generator"].set_state(state)
    frozen = VAEStage(VAEConfig(**{**plain, "channel_decorrelation": 0.3, "train_encoder": False}))
    loss_frozen, logs_frozen = frozen.loss({"vae": vae}, batch)
    assert "corr" not in logs_frozen
    assert float(loss_frozen.detach()) == pytest.approx(float(loss0.detach()), rel=1e-6)


def test_invariance_loss_is_the_weighted_pair_difference_in_units_of_the_latent_variance():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    w = torch.rand(3, 1, 8, 8, generator=g) * (torch.rand(3, 1, 8, 8, generator=g) > 0.5)
    an, bn, wn = a.double().numpy(), b.double().numpy(), w.double().numpy()
    expected = (wn * (an - bn) ** 2).sum() / (wn.sum() * 2) / 0.5
    assert float(losses.invariance_loss(a, b, w, 0.5)) == pytest.approx(expected, rel=1e-5)
    assert 2.0 < expected < 6.0  # independent unit-variance latents differ by 2 per element, / 0.5
    assert float(losses.invariance_loss(a, a.clone(), w, 0.5)) == 0.0  # identical twins
    assert float(losses.invariance_loss(5 * a, 5 * b, w, 25 * 0.5)) == pytest.approx(expected, rel=1e-4)
    # positions the shape does not cover do not count
    moved = b.clone()
    moved[w.expand_as(b) == 0] += 100.0
    assert float(losses.invariance_loss(a, moved, w, 0.5)) == pytest.approx(expected, rel=1e-4)


def test_separation_loss_charges_only_pairs_closer_than_the_margin():
    g = torch.Generator().manual_seed(2)
    a, b = torch.randn(3, 2, 8, 8, generator=g), torch.randn(3, 2, 8, 8, generator=g)
    w = torch.rand(3, 1, 8, 8, generator=g) * (torch.rand(3, 1, 8, 8, generator=g) > 0.5)
    an, bn, wn = a.double().numpy(), b.double().numpy(), w.double().numpy()
    distance = np.sqrt(((an - bn) ** 2).sum(1, keepdims=True) / 0.5)
    expected = (wn * np.maximum(2.5 - distance, 0) ** 2).sum() / wn.sum()
    assert float(losses.separation_loss(a, b, w, 0.5, 2.5)) == pytest.approx(expected, rel=1e-5)
    assert 0.1 < expected < 2.5 ** 2  # some positions are closer than the margin, some are not
    assert float(losses.separation_loss(a, a.clone(), w, 0.5, 2.5)) == pytest.approx(2.5 ** 2)  # no gap at all
    far = b + 10.0 * torch.sign(b - a)  # every pair moved well past the margin
    assert float(losses.separation_loss(a, far, w, 0.5, 2.5)) == 0.0
    assert float(losses.separation_loss(3 * a, 3 * b, w, 9 * 0.5, 2.5)) == pytest.approx(expected, rel=1e-4)
    moved = b.clone()  # positions the shape does not cover do not count
    moved[w.expand_as(b) == 0] = a[w.expand_as(b) == 0]
    assert float(losses.separation_loss(a, moved, w, 0.5, 2.5)) == pytest.approx(expected, rel=1e-4)
    # the gradient pushes a close pair apart
    a2 = a.clone().requires_grad_(True)
    losses.separation_loss(a2, a + 0.1, torch.ones(3, 1, 8, 8), 1.0, 2.5).backward()
    assert (a2.grad > 0).all()  # raising a moves it towards its twin a + 0.1: the loss rises


def test_vae_stage_pairs_twins_and_adds_the_colour_factorization_terms():
    from sdkit.models import AutoencoderKL
    from sdkit.training.shapes import twins
    from sdkit.training.stages import VAEStage, vae_model_config

    cfg = VAEConfig(**{**TINY_VAE, "colour_factorization": 0.2, "colour_channels": 1, "colour_margin": 0.0})
    vae = AutoencoderKL.from_config(vae_model_config(cfg))
    stage = VAEStage(cfg)
    batch = stage.batch(step=2, rank=1, world=2, B=8, device="cpu")
    images, coverage = batch["images"], batch["coverage"]
    assert images.shape == (8, 3, 64, 64) and coverage.shape == (4, 1, 64, 64)
    for k, index in enumerate(batch["indices"].tolist()):  # two background pairs, then two colour pairs
        image, twin, alpha = twins(cfg.seed, index, "background" if k < 2 else "color")
        assert np.array_equal(((images[k] + 1) * 127.5).round().permute(1, 2, 0).numpy(), image)
        assert np.array_equal(((images[4 + k] + 1) * 127.5).round().permute(1, 2, 0).numpy(), twin)
        assert np.array_equal(coverage[k, 0].numpy(), alpha.astype(np.float32))
    state = batch["generator"].get_state()
    loss, logs = stage.loss({"vae": vae}, batch)
    batch["generator"].set_state(state)
    loss0, logs0 = VAEStage(VAEConfig(**{**TINY_VAE, "colour_factorization": 0.0})).loss({"vae": vae}, batch)
    assert "inv_bg" not in logs0
    with torch.no_grad():
        z = vae.encode(images).mean
    w, scale = torch.nn.functional.avg_pool2d(coverage, 8), z.var()
    inv_bg = losses.invariance_loss(z[:2, :1], z[4:6, :1], w[:2], scale)  # colour channel vs background change
    inv_col = losses.invariance_loss(z[2:4, 1:], z[6:8, 1:], w[2:], scale)  # other channels vs colour change
    assert float(logs["inv_bg"]) == pytest.approx(float(inv_bg), rel=1e-5)
    assert float(logs["inv_col"]) == pytest.approx(float(inv_col), rel=1e-5)
    assert float(loss.detach()) == pytest.approx(float(loss0.detach()) + 0.2 * float(inv_bg + inv_col), rel=1e-5)
    assert "sep" not in logs  # no margin asked for
    batch["generator"].set_state(state)
    loss_m, logs_m = VAEStage(VAEConfig(**{**cfg.__dict__, "colour_margin": 1.5})).loss({"vae": vae}, batch)
    sep = losses.separation_loss(z[2:4, :1], z[6:8, :1], w[2:], scale, 1.5)  # colour channel vs colour change
    assert float(logs_m["sep"]) == pytest.approx(float(sep), rel=1e-5) and float(sep) > 0
    assert float(loss_m.detach()) == pytest.approx(float(loss.detach()) + 0.2 * float(sep), rel=1e-5)
    with pytest.raises(ValueError, match="multiple of 4"):
        stage.batch(step=0, rank=0, world=1, B=6, device="cpu")
    for channels in (0, 4):  # no channel left for the colour, or none for the background
        with pytest.raises(ValueError, match="colour_channels must leave channels on both sides"):
            VAEStage(VAEConfig(**{**TINY_VAE, "colour_factorization": 0.2, "colour_channels": channels}))
    # the decoder stage (frozen encoder) reads plain batches: the latents cannot change
    frozen = VAEStage(VAEConfig(**{**TINY_VAE, "colour_factorization": 0.2, "train_encoder": False}))
    assert "coverage" not in frozen.batch(step=0, rank=0, world=1, B=6, device="cpu")


# ----------------------------------------------------------------------------- the loop

class ToyStage:
    """Regression of sum(x) by a small MLP: the loop's mechanics without a diffusion model."""

    name = "toy"

    def setup(self, out_dir, accelerator):
        pass

    def build_models(self):
        self.models = {"net": nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 1))}
        return self.models

    def batch(self, step, rank, world, batch_size, device):
        g = torch.Generator().manual_seed(seed_for(0, step, rank))
        x = torch.randn(batch_size, 4, generator=g)
        return {"x": x, "y": 3 * x.sum(1, keepdim=True), "indices": torch.arange(batch_size)}

    def loss(self, models, batch):
        return (models["net"](batch["x"]) - batch["y"]).pow(2).mean(), {}

    def finish(self, models, out_dir):
        self.finished = True


def test_loop_clips_gradients_follows_the_lr_schedule_and_logs(tmp_path):
    stage = ToyStage()
    cfg = LoopConfig(steps=6, batch_size=8, lr=0.01, warmup_steps=2, max_grad_norm=0.05, log_every=1,
                     ema_decay=0.9)
    norms = []

    def callback(step, logs):
        grads = [p.grad for p in stage.models["net"].parameters()]
        norms.append(float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))))

    train(stage, cfg, str(tmp_path), callback=callback)
    log = read_log(tmp_path)
    assert [r["step"] for r in log] == list(range(1, 7))
    assert all(r["grad_norm"] > 0.05 for r in log)  # the raw norm is logged; the applied one is capped
    assert max(norms) <= 0.05 * (1 + 1e-5)
    assert [r["lr"] for r in log] == pytest.approx([lr_at(s, 0.01, 2, 6, cfg.min_lr_ratio) for s in range(6)])
    assert stage.finished


def test_loop_without_clipping_applies_the_raw_gradient(tmp_path):
    stage = ToyStage()
    norms = []
    cfg = LoopConfig(steps=2, batch_size=8, max_grad_norm=None, log_every=1, ema_decay=None)
    train(stage, cfg, str(tmp_path), callback=lambda step, logs: norms.append(
        float(torch.sqrt(sum(p.grad.pow(2).sum() for p in stage.models["net"].parameters())))))
    assert min(norms) > 0.05 and read_log(tmp_path)[0]["grad_norm"] is None


def _states_equal(a, b):
    assert a["step"] == b["step"]
    for name in a["models"]:
        for key, value in a["models"][name].items():
            assert torch.equal(value, b["models"][name][key]), f"{name}.{key}"
    for name in a["ema"]:
        for key, value in a["ema"][name]["shadow"].items():
            assert torch.equal(value, b["ema"][name]["shadow"][key]), f"ema {name}.{key}"
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for key in sa[i]:
            assert torch.equal(sa[i][key], sb[i][key]), f"optimizer state {i}.{key}"


# ----------------------------------------------------------------------------- the real stages

@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    """A tiny VAE run through the CLI: 40 steps on 4 fixed images."""
    from sdkit.training.cli import main

    out = str(tmp_path_factory.mktemp("vae"))
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_VAE.items()]
    assert main(["vae", "--out", out, "--steps", "40", "--num-images", "4", *flags]) == 0
    return out


def test_vae_stage_loss_goes_down_and_saves_a_scaled_vae(tiny_vae):
    from sdkit.models import AutoencoderKL

    log = read_log(tiny_vae)
    first, last = np.mean([r["rec"] for r in log[:5]]), np.mean([r["rec"] for r in log[-5:]])
    assert last < 0.7 * first, (first, last)
    vae = AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae")
    assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 4
    z = vae.encode(torch.zeros(1, 3, 64, 64)).mean
    assert z.shape == (1, 4, 8, 8)


def test_vae_decoder_fine_tuning_keeps_the_latent_space(tiny_vae, tmp_path):
    from sdkit.models import AutoencoderKL
    from sdkit.training.cli import main

    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_VAE.items()]
    out = str(tmp_path / "decoder")
    assert main(["decoder", "--vae", tiny_vae, "--out", out, "--steps", "3", *flags]) == 0
    before = AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae").state_dict()
    after = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert after.config.scaling_factor == AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae").config.scaling_factor
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)


def test_vae_latent_noise_is_added_to_what_the_decoder_reads_scaled_by_the_latent_std():
    from sdkit.models import AutoencoderKL
    from sdkit.training.stages import VAEStage, vae_model_config

    cfg = VAEConfig(**{**TINY_VAE, "latent_noise": 0.5})
    stage = VAEStage(cfg)
    vae = AutoencoderKL.from_config(vae_model_config(cfg))
    batch = stage.batch(step=3, rank=0, world=1, B=4, device="cpu")
    replay = torch.Generator().set_state(batch["generator"].get_state())
    seen = []
    decode = vae.decode
    vae.decode = lambda z: seen.append(z) or decode(z)
    stage.loss({"vae": vae}, batch)
    with torch.no_grad():
        z = vae.encode(batch["images"]).sample(replay)
        noise = torch.randn(z.shape, generator=replay)
    torch.testing.assert_close(seen[0].detach(), z + 0.5 * z.std() * noise)
    # and 0 turns it off: the decoder reads the posterior sample itself
    stage = VAEStage(VAEConfig(**{**TINY_VAE, "latent_noise": 0.0}))
    batch = stage.batch(step=3, rank=0, world=1, B=4, device="cpu")
    replay = torch.Generator().set_state(batch["generator"].get_state())
    seen.clear()
    stage.loss({"vae": vae}, batch)
    with torch.no_grad():
        torch.testing.assert_close(seen[0].detach(), vae.encode(batch["images"]).sample(replay))


def _unet_cfg(**overrides):
    return UNetConfig(**{**TINY_UNET, **overrides})


def test_unet_stage_overfits_a_tiny_data_set(tiny_vae, tmp_path):
    from accelerate import Accelerator

    from sdkit.training.stages import UNetStage

    cfg = _unet_cfg(steps=50, num_images=8, prediction_type="epsilon", rescale_betas_zero_snr=False,
                    timestep_bias="none", min_snr_gamma=None, offset_noise=0.0,
                    immiscible=False)
    stage = UNetStage(cfg, tiny_vae)
    stage.setup(str(tmp_path), Accelerator())
    held = [stage.batch(10_000 + i, 0, 1, 32, "cpu") for i in range(4)]  # fixed noise, timesteps, captions

    def held_loss(models):
        with torch.no_grad():
            return float(np.mean([stage.loss(models, b)[0].item() for b in held]))

    torch.manual_seed(cfg.seed)
    before = held_loss(stage.build_models())
    after = held_loss(train(stage, cfg, str(tmp_path)))
    assert after < 0.75 * before, (before, after)
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    assert os.path.isfile(tmp_path / "text_encoder" / "model.safetensors")


def test_unet_batches_have_caption_dropout_and_fresh_captions(tiny_vae, tmp_path):
    from accelerate import Accelerator

    from sdkit.training.shapes import parse_prompt
    from sdkit.training.stages import UNetStage

    stage = UNetStage(_unet_cfg(num_images=16), tiny_vae)
    stage.setup(str(tmp_path), Accelerator())
    captions = [c for step in range(40) for c in stage.batch(step, 0, 1, 8, "cpu")["captions"]]
    empty = sum(c == "" for c in captions) / len(captions)
    assert 0.04 < empty < 0.2
    assert all(parse_prompt(c).get("shape") for c in captions if c)
    assert len(set(captions)) > 100
    b1, b2 = stage.batch(3, 0, 1, 8, "cpu"), stage.batch(3, 0, 1, 8, "cpu")
    assert torch.equal(b1["x0"], b2["x0"]) and torch.equal(b1["eps"], b2["eps"])  # a batch is a pure function of (step, rank)
    assert not torch.equal(stage.batch(3, 1, 2, 8, "cpu")["indices"], b1["indices"])


def test_agreement_loss_is_the_detached_per_sample_difference_over_the_batch():
    g = torch.Generator().manual_seed(0)
    u = torch.randn(3, 4, 2, 2, generator=g, requires_grad=True)
    c = torch.randn(3, 4, 2, 2, generator=g, requires_grad=True)
    got = losses.agreement_loss(u, c, batch_size=8)
    a, b = u.detach().numpy(), c.detach().numpy()
    assert got.item() == pytest.approx(((a - b) ** 2).reshape(3, -1).mean(1).sum() / 8, rel=1e-6)
    got.backward()
    assert c.grad is None and u.grad.abs().sum() > 0  # only the unconditional prediction moves
    assert losses.agreement_loss(c.detach(), c, 8).item() == 0.0


def test_unet_stage_adds_the_guidance_agreement_on_the_low_noise_samples_only(tiny_vae, tmp_path):
    """loss = v-MSE + w * agreement, the agreement worked by hand from the empty prompt's prediction on
    the samples with t below the threshold; with w = 0 the loss is the v-MSE alone."""
    from accelerate import Accelerator

    from sdkit.training.stages import UNetStage

    below = 600
    stage = UNetStage(_unet_cfg(num_images=16, guidance_agreement=0.5, guidance_agreement_below=below), tiny_vae)
    stage.setup(str(tmp_path), Accelerator())
    torch.manual_seed(0)
    models = stage.build_models()
    batch = stage.batch(0, 0, 1, 8, "cpu")
    batch["timesteps"] = torch.tensor([10, 999, 300, 700, 599, 600, 0, 950])
    with torch.no_grad():
        loss, logs = stage.loss(models, batch)
        plain = UNetStage(_unet_cfg(num_images=16), tiny_vae)
        plain.tokenizer = stage.tokenizer
        mse = plain.loss(models, batch)[0]
        x_t = stage.scheduler.add_noise(batch["x0"], batch["eps"], batch["timesteps"])
        context = models["text_encoder"](batch["input_ids"]).last_hidden_state
        cond = models["unet"](x_t, batch["timesteps"], context)
        low = batch["timesteps"] < below  # 10, 300, 599, 0
        empty = models["text_encoder"](stage.tokenizer([""], padding="max_length", max_length=16,
                                                        return_tensors="pt").input_ids).last_hidden_state
        uncond = models["unet"](x_t[low], batch["timesteps"][low], empty.expand(4, -1, -1))
        by_hand = (uncond - cond[low]).pow(2).flatten(1).mean(1).sum() / 8
    assert int(low.sum()) == 4 and not torch.equal(uncond, cond[low])
    assert logs["agree"].item() == pytest.approx(by_hand.item(), rel=1e-5)
    assert loss.item() == pytest.approx(mse.item() + 0.5 * by_hand.item(), rel=1e-5)
    batch["timesteps"] = torch.full((8,), 800)  # no low-noise sample: nothing added
    with torch.no_grad():
        assert stage.loss(models, batch)[1]["agree"].item() == 0.0


@pytest.mark.parametrize("options", [
    dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_bias="later", min_snr_gamma=5.0,
         offset_noise=0.1, immiscible=True, guidance_agreement=1.0),
    dict(prediction_type="epsilon", rescale_betas_zero_snr=False, timestep_bias="none", min_snr_gamma=None,
         offset_noise=0.0, immiscible=False, ema_decay=None),
])
def test_resumed_unet_run_equals_the_uninterrupted_one(tiny_vae, tmp_path, options):
    """k + m steps in one run == k steps, save, fresh objects, resume, m steps (weights, EMA, optimizer)."""
    from sdkit.training.stages import UNetStage

    cfg = _unet_cfg(steps=6, **options)
    train(UNetStage(cfg, tiny_vae), cfg, str(tmp_path / "straight"))
    first = _unet_cfg(steps=6, stop_at=3, **options)
    train(UNetStage(first, tiny_vae), first, str(tmp_path / "resumed"))
    assert load_checkpoint(str(tmp_path / "resumed"))["step"] == 3
    assert not (tmp_path / "resumed" / "unet").exists()  # not finished yet
    with open(tmp_path / "resumed" / LOG_FILE, "a") as f:  # as if killed after logging step 4
        f.write(json.dumps({"step": 4, "loss": 0.0}) + "\n")
    torch.manual_seed(1234)  # disturb the global RNG: the resumed run must not depend on it
    train(UNetStage(cfg, tiny_vae), cfg, str(tmp_path / "resumed"))
    _states_equal(load_checkpoint(str(tmp_path / "straight")), load_checkpoint(str(tmp_path / "resumed")))
    steps = [r["step"] for r in read_log(tmp_path / "resumed")]
    assert steps == list(range(1, 7))


def test_export_writes_a_diffusers_pipeline_folder(tiny_vae, tmp_path):
    from transformers import CLIPTextModel, CLIPTokenizer

    from sdkit.models import AutoencoderKL, UNet2DConditionModel
    from sdkit.training.cli import main

    unet_dir = tmp_path / "unet-run"
    cfg = _unet_cfg(steps=2)
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_UNET.items()]
    assert main(["unet", "--vae", tiny_vae, "--out", str(unet_dir), "--steps", "2", "--guidance-scale", "4.5",
                 *flags]) == 0
    out = tmp_path / "pipe"
    assert main(["export", "--vae", tiny_vae, "--unet", str(unet_dir), "--out", str(out)]) == 0
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"] == ["transformers", "CLIPTextModel"]
    assert index["tokenizer"] == ["transformers", "CLIPTokenizer"]
    assert index["scheduler"] == ["diffusers", cfg.scheduler]
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    files = [os.path.join(r, f) for r, _, fs in os.walk(out) for f in fs]
    assert not [f for f in files if f.endswith((".bin", ".pt", ".ckpt", ".pth"))]
    UNet2DConditionModel.from_pretrained(str(out), subfolder="unet")
    AutoencoderKL.from_pretrained(str(out), subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(str(out / "text_encoder"))
    tokenizer = CLIPTokenizer.from_pretrained(str(out / "tokenizer"))
    ids = tokenizer("a large red circle on the left on a white background").input_ids
    assert len(ids) == 11 + 2  # one token per word
    assert text_encoder.config.max_position_embeddings == tokenizer.model_max_length == cfg.max_length
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["prediction_type"] == cfg.prediction_type
    # the recommended settings: the run's --guidance-scale, the recipe's rescale and steps
    settings = json.loads((out / "recommended_settings.json").read_text())
    assert settings == {"guidance_scale": 4.5, "guidance_rescale": cfg.guidance_rescale,
                        "guidance_end": cfg.guidance_end, "num_inference_steps": cfg.num_inference_steps}
    from sdkit import StableDiffusionPipeline

    assert StableDiffusionPipeline.from_pretrained(str(out)).recommended.guidance_scale == 4.5


def test_configs_reject_unknown_cli_values():
    from sdkit.training.cli import main

    with pytest.raises(SystemExit):
        main(["vae", "--out", "x", "--steps", "many"])
    assert VAEConfig().block_out_channels[0] * 8 > 0


@pytest.mark.parametrize("argv, message", [
    (["vae", "--colour-factorization", "0.1", "--colour-channels", "4"], "colour_channels must leave channels"),
    (["vae", "--colour-factorization", "0.1", "--batch-size", "6"], "a batch of 4, 8, 12, ... per process, got 6"),
    (["vae", "--colour-margin", "-1"], "colour_margin is a distance in unit-variance latents and must be >= 0"),
    (["unet", "--vae", "missing-vae", "--prediction-type", "epsilon"], "needs prediction_type='v_prediction'"),
    (["unet", "--vae", "missing-vae", "--timestep-bias", "sooner"], "timestep bias 'sooner' is not supported"),
])
def test_train_cli_reports_options_that_cannot_work_in_one_line_and_writes_nothing(tmp_path, argv, message):
    from sdkit.training.cli import main

    out = tmp_path / "run"
    with pytest.raises(SystemExit) as raised:
        main([*argv, "--out", str(out)])
    text = str(raised.value.code)
    assert text.startswith(f"sdkit train {argv[0]}: ") and message in text and "\n" not in text
    assert not out.exists()


@pytest.fixture(scope="module")
def tiny_unet_run(tiny_vae, tmp_path_factory):
    """A 2-step UNet run on the tiny VAE's latents (train_config.json, unet/, text_encoder/, tokenizer/)."""
    from sdkit.training.cli import main

    out = str(tmp_path_factory.mktemp("unet-run"))
    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_UNET.items()]
    assert main(["unet", "--vae", tiny_vae, "--out", out, "--steps", "2", *flags]) == 0
    return out


def test_unet_run_with_init_from_starts_from_that_run_s_weights(tiny_vae, tiny_unet_run, tmp_path):
    """init_from copies the folder's unet/ and text_encoder/ into the built models, every tensor
    equal; a folder of another architecture or a missing one is refused before anything is written."""
    from accelerate import Accelerator
    from transformers import CLIPTextModel

    from sdkit.models import UNet2DConditionModel
    from sdkit.training.config import ConfigError
    from sdkit.training.stages import UNetStage

    stage = UNetStage(_unet_cfg(init_from=tiny_unet_run), tiny_vae)
    stage.setup(str(tmp_path / "a"), Accelerator())
    models = stage.build_models()
    for name, cls in (("unet", UNet2DConditionModel), ("text_encoder", CLIPTextModel)):
        saved = cls.from_pretrained(os.path.join(tiny_unet_run, name)).state_dict()
        built = models[name].state_dict()
        assert saved.keys() == built.keys() and all(torch.equal(saved[k], built[k]) for k in saved)

    # both refused when the stage is made, before setup writes the tokenizer and the latent cache
    with pytest.raises(ConfigError, match="not this config's architecture"):
        UNetStage(_unet_cfg(init_from=tiny_unet_run, block_out_channels=(32, 64)), tiny_vae)
    with pytest.raises(ConfigError, match="unet not found"):
        UNetStage(_unet_cfg(init_from=str(tmp_path)), tiny_vae)


def test_denoised_pairs_are_the_drawings_and_what_img2img_makes_of_them(monkeypatch):
    """Each chunk is one img2img call on the drawings (as [0, 1] images) with a strength, guidance
    and sampler from the lists, kept as latents; the targets are the drawings themselves."""
    from sdkit.training import denoised
    from sdkit.training.shapes import ShapesDataset, parse_prompt

    calls = []

    class FakePipe:
        scheduler = DDPMScheduler()

        def __call__(self, prompts, image, scheduler, generator, output_type, **options):
            calls.append(dict(prompts=prompts, image=image, scheduler=scheduler, options=options))
            assert output_type == "latent" and len(generator) == len(prompts) == len(image)
            out = torch.stack([torch.full((4, 8, 8), float(len(calls)))] * len(prompts))  # (b, 4, 8, 8)
            return type("Out", (), {"images": out})()

    monkeypatch.setattr(denoised, "CHUNK", 3)
    latents, images = denoised.denoised_pairs(FakePipe(), 7, seed=5)
    data = ShapesDataset(7, seed=5)
    assert latents.shape == (7, 4, 8, 8) and images.dtype == torch.uint8 and images.shape == (7, 3, 64, 64)
    assert [len(c["prompts"]) for c in calls] == [3, 3, 1]
    assert torch.equal(latents[:, 0, 0, 0], torch.tensor([1.0, 1, 1, 2, 2, 2, 3]))  # chunk k -> call k's output
    for i in range(7):
        drawing = data[i]["pixel_values"]
        assert torch.equal(images[i], ((drawing + 1) * 127.5).round().to(torch.uint8))
        torch.testing.assert_close(calls[i // 3]["image"][i % 3], (drawing + 1) / 2)
    for c in calls:
        assert c["options"]["strength"] in denoised.STRENGTHS
        assert (c["options"]["guidance_scale"], c["options"]["guidance_rescale"]) in denoised.GUIDANCE
        assert type(c["scheduler"]).__name__ in denoised.SAMPLERS
    prompts = [p for c in calls for p in c["prompts"]]
    for i, prompt in enumerate(prompts):  # each caption names its drawing's shape and colour
        named = parse_prompt(prompt)
        assert (named["shape"], named["color"]) == (data[i]["attrs"]["shape"], data[i]["attrs"]["color"]), prompt


def test_decoder_on_a_unet_s_denoised_latents_trains_on_both_kinds_of_example(tiny_vae, tiny_unet_run, tmp_path,
                                                                               monkeypatch):
    """The experimental ``decoder --unet``: the pairs are made once and cached, half of each batch
    is them (decoded from the UNet's latents, with the drawings as targets), only the decoder
    learns, and a changed UNet folder makes new pairs."""
    from sdkit.models import AutoencoderKL
    from sdkit.training import denoised
    from sdkit.training.cli import main
    from sdkit.training.stages import VAEStage

    flags = [f"--{k.replace('_', '-')}={','.join(map(str, v)) if isinstance(v, tuple) else v}"
             for k, v in TINY_VAE.items()]
    out = tmp_path / "decoder"
    assert main(["decoder", "--vae", tiny_vae, "--unet", tiny_unet_run, "--out", str(out), "--steps", "2",
                 "--denoised-images", "6", *flags]) == 0
    cached = torch.load(out / "denoised.pt", weights_only=True)
    assert cached["latents"].shape == (6, 4, 8, 8) and cached["images"].shape == (6, 3, 64, 64)
    before = AutoencoderKL.from_pretrained(tiny_vae, subfolder="vae").state_dict()
    after = AutoencoderKL.from_pretrained(str(out), subfolder="vae")
    changed = {k for k, v in after.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith(("decoder.", "post_quant_conv.")) for k in changed)

    # the cache is reused: a second setup on the same folder makes no pairs
    monkeypatch.setattr(denoised, "denoised_pairs", lambda *a, **k: pytest.fail("pairs made again"))
    from accelerate import Accelerator

    cfg = VAEConfig(**{**TINY_VAE, "init_from": os.path.join(tiny_vae, "vae"), "train_encoder": False,
                       "latent_noise": 0.0, "denoised_from": tiny_unet_run, "denoised_images": 6})
    stage = VAEStage(cfg)
    stage.setup(str(out), Accelerator())
    batch = stage.batch(step=1, rank=0, world=1, B=4, device="cpu")
    assert batch["images"].shape[0] == 2 and batch["denoised"].shape == (2, 4, 8, 8)
    picked = [int(torch.nonzero((cached["latents"] == z).flatten(1).all(1))[0]) for z in batch["denoised"]]
    torch.testing.assert_close(batch["denoised_images"], (cached["images"][picked].float() / 127.5 - 1))
    vae = AutoencoderKL.from_pretrained(os.path.join(tiny_vae, "vae"))
    seen = []
    decode = vae.decode
    vae.decode = lambda z: seen.append(z) or decode(z)
    replay = torch.Generator().set_state(batch["generator"].get_state())
    stage.loss({"vae": vae}, batch)
    with torch.no_grad():
        z = vae.encode(batch["images"]).sample(replay)
    torch.testing.assert_close(seen[0].detach(), torch.cat([z, batch["denoised"] / vae.config.scaling_factor]))


@pytest.mark.parametrize("overrides, message", [
    (dict(denoised_from="run"), "denoised_from trains the decoder of an existing VAE"),
    (dict(denoised_from="run", init_from="vae", train_encoder=False, denoised_fraction=1.0),
     "denoised_fraction is a share of each batch"),
    (dict(reconstruction_loss="l2"), "reconstruction_loss is 'mse' or 'l1'"),
    (dict(reconstruction_loss="l1"), "'l1' is for a decoder stage"),
])
def test_denoised_decoder_options_that_cannot_work_are_refused(overrides, message):
    from sdkit.training.config import ConfigError
    from sdkit.training.stages import VAEStage

    with pytest.raises(ConfigError, match=message):
        VAEStage(VAEConfig(**{**TINY_VAE, **overrides}))
