"""A1111 1.10's schedule types: each against k-diffusion's get_sigmas_* or A1111's formula
(modules/sd_schedulers.py, transcribed in tests/a1111_oracle.py) on k-diffusion's CompVis wrapper."""

import pytest
import torch
from a1111_oracle import (CompVisModel, align_your_steps, beta_scheduler, ddim_scheduler, external, kl_optimal,
                          ldm_alphas_cumprod, normal_scheduler, sampling, sgm_uniform, simple_scheduler)

import sdkit.schedulers as ours

SD = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
      "prediction_type": "epsilon"}
CONFIGS = {"sd": SD, "zero-snr": {**SD, "rescale_betas_zero_snr": True}, "linear": {**SD, "beta_schedule": "linear",
                                                                                     "beta_end": 0.02}}


def wrapper(config):
    return external.CompVisDenoiser(CompVisModel(None, ldm_alphas_cumprod(config)))


def expected(schedule, n, den, rho=None):
    lo, hi = den.sigmas[0].item(), den.sigmas[-1].item()
    k = {"sigma_min": lo, "sigma_max": hi}
    return {
        "uniform": lambda: den.get_sigmas(n),
        "karras": lambda: sampling.get_sigmas_karras(n, lo, hi, rho=rho or 7.0),
        "exponential": lambda: sampling.get_sigmas_exponential(n, lo, hi),
        "polyexponential": lambda: sampling.get_sigmas_polyexponential(n, lo, hi, rho=rho or 1.0),
        "sgm_uniform": lambda: sgm_uniform(n, inner_model=den, **k),
        "normal": lambda: normal_scheduler(n, inner_model=den, **k),
        "simple": lambda: simple_scheduler(n, inner_model=den, **k),
        "ddim": lambda: ddim_scheduler(n, inner_model=den, **k),
        "beta": lambda: beta_scheduler(n, **k),
        "kl_optimal": lambda: kl_optimal(n, **k),
        "align_your_steps": lambda: align_your_steps(n),
    }[schedule]()


SCHEDULES = [s for s in ours.SCHEDULE_TYPES if s != "automatic"]


@pytest.mark.parametrize("config", list(CONFIGS))
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("n", [1, 7, 11, 30])
def test_each_schedule_matches_k_diffusion_or_a1111s_formula(config, schedule, n):
    sch = ours.from_name("Euler", CONFIGS[config], schedule=schedule)
    assert torch.equal(sch.sigmas(n), expected(schedule, n, wrapper(CONFIGS[config])))


def test_automatic_is_each_samplers_default():
    """A1111 1.10's defaults: Karras for DPM++ 2M, SDE, 2S a, DPM2 (a) and Restart; Exponential for 2M/3M SDE."""
    den = wrapper(SD)
    defaults = {"DPM++ 2M": "karras", "DPM++ SDE": "karras", "DPM++ 2S a": "karras", "DPM2": "karras",
                "DPM2 a": "karras", "Restart": "karras", "DPM++ 2M SDE": "exponential",
                "DPM++ 2M SDE Heun": "exponential", "DPM++ 3M SDE": "exponential", "Euler": "uniform",
                "Euler a": "uniform", "LMS": "uniform", "Heun": "uniform"}
    discards = ("DPM2", "DPM2 a", "DPM++ 3M SDE")
    for name, schedule in defaults.items():
        sigmas = expected(schedule, 9 + (name in discards), den)
        if name in discards:  # A1111 drops the next-to-last sigma for these
            sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
        assert torch.equal(ours.from_name(name, SD).sigmas(9), sigmas), name


def test_schedule_settings_override_the_models_range():
    """A1111's "Schedule rho / min sigma / max sigma" and "Discard penultimate sigma" settings."""
    sch = ours.from_name("DPM++ 2M", {**SD, "rho": 5.0, "sigma_min": 0.05, "sigma_max": 10.0})
    assert torch.equal(sch.sigmas(8), sampling.get_sigmas_karras(8, 0.05, 10.0, rho=5.0))
    sch = ours.from_name("Euler", {**SD, "discard_penultimate_sigma": True})
    full = wrapper(SD).get_sigmas(9)
    assert torch.equal(sch.sigmas(8), torch.cat([full[:-2], full[-1:]]))
    beta = ours.from_name("Euler", {**SD, "beta_alpha": 0.5, "beta_beta": 0.7}, schedule="Beta")
    den = wrapper(SD)
    assert torch.equal(beta.sigmas(8), beta_scheduler(8, den.sigmas[0].item(), den.sigmas[-1].item(), 0.5, 0.7))


def test_model_calls_are_at_the_continuous_timestep_of_each_sigma():
    """k-diffusion's sigma_to_t: log-sigma interpolation; quantized to the nearest step with A1111's option."""
    for quantize in (False, True):
        den = external.CompVisDenoiser(CompVisModel(None, ldm_alphas_cumprod(SD)), quantize=quantize)
        sch = ours.from_name("DPM++ 2M", {**SD, "quantize": quantize})
        state = sch.set_timesteps(9)
        assert torch.equal(state.schedule, den.sigma_to_t(state.call_sigmas))
        assert state.schedule.dtype == (torch.int64 if quantize else torch.float32)


def test_alpha_bar_as_a1111_builds_it():
    """float64 betas and product kept as float32; Zero Terminal SNR ends at 4.897e-8; old versions in float16."""
    for config in CONFIGS.values():
        assert torch.equal(ours.from_name("Euler", config).alphas_cumprod, ldm_alphas_cumprod(config))
    zsnr = ours.from_name("Euler", CONFIGS["zero-snr"])
    assert zsnr.alphas_cumprod[-1].item() == pytest.approx(4.8973451890853435e-08) and zsnr.sigmas(4)[0] > 4000
    half = ours.from_name("Euler", {**SD, "downcast_alphas_cumprod": True})
    assert half.alphas_cumprod.dtype == torch.float16
    den = external.CompVisDenoiser(CompVisModel(None, ldm_alphas_cumprod(SD).half()))
    assert torch.equal(half.sigmas(8), den.get_sigmas(8).float())
