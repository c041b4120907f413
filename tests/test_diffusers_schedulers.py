"""The reference's scheduler habits on sdkit's stateless schedulers, checked against diffusers 0.42.1:
config carry-over on swaps, the dropped-key warning, ``compatibles``, custom ``timesteps=`` /
``sigmas=`` schedules, and the per-run ``stateful()`` object for hand-written loops."""

import warnings

import diffusers
import pytest
import torch

import sdkit
import sdkit.schedulers as ours
from sdkit.schedulers import base as scheduler_base

NAMES = list(ours.SCHEDULER_CLASSES)
BUNDLED = sdkit.TINY_MODEL + "/scheduler"
SD15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
        "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
        "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
        "clip_sample": False}
SHAPE = (1, 4, 8, 8)


def model(x, t):
    """A fixed nonlinear stand-in for the UNet, the same on both sides."""
    return torch.tanh(x * 0.9 + 0.001 * float(t)) * 0.8 + 0.05 * x


def reference_loop(scheduler, n, x, seed=7, **schedule):
    """The reference's tutorial loop (stateful scheduler)."""
    scheduler.set_timesteps(n, **schedule) if n else scheduler.set_timesteps(**schedule)
    x = x * scheduler.init_noise_sigma
    g = torch.Generator().manual_seed(seed)
    for t in scheduler.timesteps:
        kw = {"generator": g} if "generator" in scheduler.step.__code__.co_varnames else {}
        x = scheduler.step(model(scheduler.scale_model_input(x, t), t), t, x, **kw).prev_sample
    return x


def noise():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0), dtype=torch.float64)


def quiet_reference(cls, config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return cls.from_config(config)


# ------------------------------------------------------------------ config carry-over
@pytest.mark.parametrize("source", ["bundled", "sd15"])
@pytest.mark.parametrize("first", NAMES)
def test_swap_chain_keeps_the_reference_config(source, first):
    """A -> B -> A from the bundled / an SD 1.5 config: every step's config and schedule are the reference's."""
    config = diffusers.DDIMScheduler.load_config(BUNDLED) if source == "bundled" else SD15
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for second in NAMES:
            ref = getattr(diffusers, first).from_config(config)
            mine = ours.SCHEDULER_CLASSES[first].from_config(config)
            for name in (second, first):
                ref = getattr(diffusers, name).from_config(ref.config)
                mine = ours.SCHEDULER_CLASSES[name].from_config(mine.config)
                for key, value in mine.config.items():
                    if key == "_use_default_values":
                        assert set(value) <= set(ref.config[key]), (first, name)
                    elif key != "_diffusers_version":
                        assert ref.config[key] == value, (first, second, name, key)
                ref.set_timesteps(9)
                assert torch.equal(mine.set_timesteps(9).timesteps, ref.timesteps), (first, second, name)


def test_pndm_from_bundled_ddim_config_keeps_skip_prk_steps():
    """The issue's case: the bundled DDIM config's skip_prk_steps survives into PNDM (21 UNet calls, not 29)."""
    ddim = ours.DDIMScheduler.from_pretrained(BUNDLED)
    assert "skip_prk_steps" not in ours.DDIMScheduler.config_keys()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pndm = ours.PNDMScheduler.from_config(ddim.config)
        ref = diffusers.PNDMScheduler.from_config(diffusers.DDIMScheduler.from_pretrained(BUNDLED).config)
    ref.set_timesteps(20)
    assert len(pndm.set_timesteps(20).timesteps) == len(ref.timesteps) == 21


def test_swap_warns_once_naming_the_dropped_zero_snr_key():
    scheduler_base._warned_dropped.clear()
    ddim = ours.DDIMScheduler.from_pretrained(BUNDLED)  # rescale_betas_zero_snr: true
    with pytest.warns(UserWarning, match="PNDMScheduler has no 'rescale_betas_zero_snr' setting"):
        ours.PNDMScheduler.from_config(ddim.config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ours.PNDMScheduler.from_config(ddim.config)  # once per class and key
        ours.EulerDiscreteScheduler.from_config(ddim.config)  # has the setting: no warning
        ours.PNDMScheduler.from_config(SD15)  # neutral value: no warning


def test_config_attribute_access_stays_read_only():
    sch = ours.DDIMScheduler.from_pretrained(BUNDLED)
    assert sch.config.prediction_type == "v_prediction" == sch.config["prediction_type"]
    with pytest.raises((TypeError, AttributeError)):
        sch.config["prediction_type"] = "epsilon"
    with pytest.raises((TypeError, AttributeError)):
        sch.config.prediction_type = "epsilon"


def test_compatibles_are_the_classes_that_take_the_config():
    sch = ours.EulerDiscreteScheduler.from_pretrained(BUNDLED)
    names = {cls.__name__ for cls in sch.compatibles}
    assert names == set(NAMES)
    assert names <= {cls.__name__ for cls in diffusers.EulerDiscreteScheduler().compatibles}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for cls in sch.compatibles:
            assert cls.from_config(sch.config).set_timesteps(3).timesteps.numel() >= 3


# ------------------------------------------------------------------ custom schedules
AYS_TIMESTEPS = ours.AysSchedules["StableDiffusionTimesteps"]
AYS_SIGMAS = ours.AysSchedules["StableDiffusionSigmas"]
CUSTOM = [("EulerDiscreteScheduler", "timesteps", AYS_TIMESTEPS), ("EulerDiscreteScheduler", "sigmas", AYS_SIGMAS),
          ("DDPMScheduler", "timesteps", AYS_TIMESTEPS), ("DPMSolverMultistepScheduler", "timesteps", AYS_TIMESTEPS)]


@pytest.mark.parametrize("name,kind,values", CUSTOM)
def test_custom_schedules_sample_like_the_reference(name, kind, values):
    ref = quiet_reference(getattr(diffusers, name), SD15)
    mine = quiet_reference(ours.SCHEDULER_CLASSES[name], SD15)
    x_ref = reference_loop(ref, None, noise(), **{kind: values})
    x_our = reference_loop(mine.stateful(), None, noise(), **{kind: values})
    assert torch.equal(mine.set_timesteps(**{kind: values}).timesteps, ref.timesteps)
    assert ((x_our - x_ref).norm() / x_ref.norm()).item() < 1e-6


def test_aligned_your_steps_lists_are_the_references():
    from diffusers.schedulers.scheduling_utils import AysSchedules

    assert set(ours.AysSchedules) == set(AysSchedules) - {"StableDiffusionVideoSigmas"}  # SVD: not an sdkit model
    for key, values in ours.AysSchedules.items():
        assert values == list(AysSchedules[key]), key


def test_custom_schedules_refused_clearly():
    ddim = ours.DDIMScheduler.from_config(SD15)
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom timesteps.*EulerDiscreteScheduler"):
        ddim.set_timesteps(timesteps=AYS_TIMESTEPS)
    euler = ours.EulerDiscreteScheduler.from_config(SD15)
    with pytest.raises(ValueError, match="not both"):
        euler.set_timesteps(timesteps=AYS_TIMESTEPS, sigmas=AYS_SIGMAS)
    with pytest.raises(ValueError, match="not both"):
        euler.set_timesteps(10, timesteps=AYS_TIMESTEPS)
    with pytest.raises(ValueError, match="strictly descending"):
        euler.set_timesteps(timesteps=[10, 500])
    with pytest.raises(ValueError, match="use_karras_sigmas"):
        ours.EulerDiscreteScheduler.from_config({**SD15, "use_karras_sigmas": True}).set_timesteps(timesteps=[9, 3])


# ------------------------------------------------------------------ the per-run stateful object
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("source", ["bundled", "sd15"])
def test_tutorial_loop_runs_with_one_added_line(name, source):
    """The reference's loop, unchanged but for ``scheduler = scheduler.stateful()``, gives its samples."""
    config = diffusers.DDIMScheduler.load_config(BUNDLED) if source == "bundled" else SD15
    ref = quiet_reference(getattr(diffusers, name), config)
    shared = quiet_reference(ours.SCHEDULER_CLASSES[name], config)
    x_ref = reference_loop(ref, 6, noise())
    x_our = reference_loop(shared.stateful(), 6, noise())
    assert ((x_our - x_ref).norm() / x_ref.norm()).item() < 1e-6
    assert torch.equal(shared.set_timesteps(6).timesteps, ref.timesteps)  # the shared scheduler is untouched


def test_stateful_runs_are_independent_and_show_the_shared_settings():
    shared = ours.DDIMScheduler.from_pretrained(BUNDLED)
    a, b = shared.stateful(), shared.stateful()
    a.set_timesteps(4)
    b.set_timesteps(10)
    assert len(a.timesteps) == 4 and len(b.timesteps) == 10
    assert a.config is not None and a.config["prediction_type"] == "v_prediction" and a.order == shared.order
    with pytest.raises(RuntimeError, match="set_timesteps"):
        shared.stateful().step(torch.zeros(SHAPE), 999, torch.zeros(SHAPE))
    with pytest.raises(ValueError, match="variance_noise"):
        a.step(torch.zeros(SHAPE), a.timesteps[0], torch.zeros(SHAPE), variance_noise=torch.zeros(SHAPE))


def test_stateful_step_keywords_and_tuple_form_match_the_reference():
    ref = diffusers.DDIMScheduler.from_config(SD15)
    run = ours.DDIMScheduler.from_config(SD15).stateful()
    for s in (ref, run):
        s.set_timesteps(5)
    x = noise()
    gen = [torch.Generator().manual_seed(3) for _ in range(2)]
    outs = []
    for s, g in zip((ref, run), gen):
        y = x
        for t in s.timesteps:
            y = s.step(model(y, t), t, y, eta=1.0, generator=g, return_dict=False)[0]
        outs.append(y)
    assert ((outs[1] - outs[0]).norm() / outs[0].norm()).item() < 1e-6


def test_a_setting_changed_in_the_config_dict_is_kept():
    """``{**sch.config, key: value}`` keeps value even where _use_default_values lists the key (the reference
    drops it, silently); an unchanged listed key still takes the new class's default, as in the reference."""
    ddim = ours.DDIMScheduler.from_config(SD15)
    assert "timestep_spacing" in ddim.config["_use_default_values"]
    assert ours.DDIMScheduler.from_config({**ddim.config, "timestep_spacing": "trailing"}).config.timestep_spacing == \
        "trailing"
    assert ours.EulerDiscreteScheduler.from_config(ddim.config).config.timestep_spacing == "linspace"
    karras = ours.from_name("DPM++ 2M", ours.from_name("DPM++ 2M", SD15).config, schedule="Karras")
    assert karras.config["schedule_type"] == "karras"
