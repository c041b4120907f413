"""Contract every sdkit scheduler keeps, config interop, names, errors and shared use across threads."""

import copy
import dataclasses
import json
import threading

import diffusers
import pytest
import torch

import sdkit.schedulers as ours

SD = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
NAMES = list(ours.SCHEDULER_CLASSES)
VARIANTS = NAMES + ["PLMS", "DDIM-eta1", "LMS-order2"]


def make(variant, **config):
    """(scheduler, run options) for a contract variant."""
    if variant == "PLMS":
        return ours.PNDMScheduler.from_config({**SD, "skip_prk_steps": True, **config}), {}
    if variant == "DDIM-eta1":
        return ours.DDIMScheduler.from_config({**SD, **config}), {"eta": 1.0}
    if variant == "LMS-order2":
        return ours.LMSDiscreteScheduler.from_config({**SD, **config}), {"order": 2}
    return ours.SCHEDULER_CLASSES[variant].from_config({**SD, **config}), {}


def model(x, t):
    return torch.tanh(x * 0.9 + 0.001 * float(t)) * 0.8 + 0.05 * x


def sample(sch, n, seed, shape=(1, 4, 8, 8), dtype=torch.float32, options=None, strength=1.0):
    """A full sampling loop on a shared scheduler, the one loop for every scheduler; the final sample."""
    g = torch.Generator().manual_seed(seed)
    state = sch.set_timesteps(n, strength=strength, **(options or {}))
    x = torch.randn(shape, generator=g, dtype=dtype) * state.init_noise_sigma
    for t in state.timesteps:
        out = sch.step(model(sch.scale_model_input(x, t, state), t), t, x, state, generator=g)
        x, state = out.prev_sample, out.state
    return x


def snapshot(obj):
    """A deep copy of an object's attributes (tensors cloned) to compare later."""
    fields = dataclasses.asdict(obj) if dataclasses.is_dataclass(obj) else vars(obj)
    return {k: (v.clone() if isinstance(v, torch.Tensor) else copy.deepcopy(v)) for k, v in fields.items()}


def same(a, b):
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b or (a != a and b != b)


# ------------------------------------------------------------------ the contract
@pytest.mark.parametrize("variant", VARIANTS)
def test_contract(variant):
    sch, kw = make(variant)
    before = snapshot(sch)

    # config round trip: same settings, same behaviour
    again = type(sch).from_config(sch.config)
    assert again.config == sch.config and sch.config["_class_name"] == type(sch).__name__
    json.dumps(sch.config)  # plain, json-ready

    # a state for 10 steps, then one for 7, and stepping either works; options live in the state
    state10 = sch.set_timesteps(10, device="cpu", **kw)
    assert state10.timesteps.device == torch.device("cpu")
    assert state10.options == sch.make_options(**kw)
    state7 = sch.set_timesteps(7, **kw)
    assert len(state7.timesteps) >= 7 and state7.num_inference_steps == 7
    assert state7.latent_timestep.shape == (1,)
    for dtype in (torch.float32, torch.float64):
        for state in (state10, state7):
            x = torch.randn(2, 4, 8, 8, dtype=dtype)
            t = state.timesteps[0]
            inp = sch.scale_model_input(x, t, state)
            assert inp.shape == x.shape and inp.dtype == dtype and inp.device == x.device
            state_before = snapshot(state)
            # every sampler takes the same call
            out = sch.step(model(inp, t), t, x, state, generator=torch.Generator().manual_seed(0))
            assert out.prev_sample.shape == x.shape and out.prev_sample.dtype == dtype
            assert out.prev_sample.device == x.device
            assert out.pred_original_sample.shape == x.shape
            assert out.state is not state and out.state.step_index == state.step_index + 1
            assert same(snapshot(state), state_before), "step must not change the state it was given"

    # the timesteps a UNet gets: int64 for DDPM/DDIM/PNDM/DPM, float32 for Euler/LMS
    expected = torch.float32 if "Euler" in type(sch).__name__ or "LMS" in type(sch).__name__ else torch.int64
    assert state10.timesteps.dtype == expected

    # the instance itself never changes
    sample(sch, 5, 0, options=kw)
    assert same(snapshot(sch), before)
    with pytest.raises(AttributeError, match="immutable"):
        sch.alphas_cumprod = None


@pytest.mark.parametrize("variant", VARIANTS)
def test_full_loop_keeps_dtype_and_is_finite(variant):
    sch, kw = make(variant)
    for dtype in (torch.float32, torch.float64):
        x = sample(sch, 8, 3, dtype=dtype, options=kw)
        assert x.dtype == dtype and torch.isfinite(x).all()


@pytest.mark.parametrize("name", NAMES)
def test_add_noise_and_velocity_keep_dtype(name):
    sch = ours.SCHEDULER_CLASSES[name].from_config(SD)
    x0 = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    t = torch.tensor([1, 500, 999])
    assert sch.add_noise(x0, noise, t).dtype == torch.float64
    assert sch.get_velocity(x0.float(), noise.float(), t).dtype == torch.float32


def test_add_noise_refuses_timesteps_it_cannot_place():
    x = torch.zeros(1, 4, 8, 8)
    for cls in (ours.DDIMScheduler, ours.EulerDiscreteScheduler):
        with pytest.raises(ValueError, match="lie in \\[0, 999\\]"):
            cls().add_noise(x, x, torch.tensor([1000]))
        with pytest.raises(ValueError, match="whole training steps"):
            cls().add_noise(x, x, torch.tensor([10.5]))
    euler = ours.EulerDiscreteScheduler()
    with pytest.raises(ValueError, match="not in the state's schedule"):
        euler.add_noise(x, x, torch.tensor([3.0]), euler.set_timesteps(10))


# ------------------------------------------------------------------ sharing one instance
@pytest.mark.parametrize("variant", VARIANTS)
def test_threads_sharing_one_scheduler_match_sequential_runs(variant):
    sch, kw = make(variant)
    jobs = [(5 + 2 * i, 100 + i, 1.0 if i % 3 else 0.6) for i in range(8)]
    expected = [sample(sch, n, seed, options=kw, strength=s) for n, seed, s in jobs]
    results, errors = [None] * len(jobs), []
    barrier = threading.Barrier(len(jobs))

    def work(i, n, seed, s):
        try:
            barrier.wait()
            results[i] = sample(sch, n, seed, options=kw, strength=s)
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i, *job)) for i, job in enumerate(jobs)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for got, want in zip(results, expected):
        assert torch.equal(got, want)


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_errors(name):
    cls = ours.SCHEDULER_CLASSES[name]
    sch = cls.from_config(SD)
    for n in (0, -3):
        with pytest.raises(ValueError, match="positive integer"):
            sch.set_timesteps(n)
    with pytest.raises(ValueError, match="more than the 1000 timesteps"):
        sch.set_timesteps(1001)
    with pytest.raises(ValueError, match="prediction_type='x0'.*use one of"):
        cls.from_config({**SD, "prediction_type": "x0"})
    with pytest.raises(ValueError, match="beta_schedule='cubic'.*use one of"):
        cls.from_config({**SD, "beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="timestep_spacing='random'.*use one of"):
        cls.from_config({**SD, "timestep_spacing": "random"})

    state = sch.set_timesteps(10)
    x = torch.randn(1, 4, 8, 8)
    wrong = state.timesteps[0] - 3
    with pytest.raises(ValueError, match="not the state's next timestep"):
        sch.step(x, wrong, x, state)
    with pytest.raises(ValueError, match="strength"):
        sch.set_timesteps(10, strength=0.0)

    # a finished run cannot step again
    state = sch.set_timesteps(1 if name != "PNDMScheduler" else 4)
    for t in state.timesteps:
        state = sch.step(x, t, x, state).state
    with pytest.raises(ValueError, match="no steps left"):
        sch.step(x, t, x, state)


def test_run_options_are_checked_and_unknown_ones_name_the_known():
    with pytest.raises(ValueError, match="DDIMScheduler has no run option 'order'; its run options are eta"):
        ours.DDIMScheduler().set_timesteps(10, order=2)
    with pytest.raises(ValueError, match="LMSDiscreteScheduler has no run option 'eta'; its run options are order"):
        ours.LMSDiscreteScheduler().set_timesteps(10, eta=1.0)
    with pytest.raises(ValueError, match="EulerDiscreteScheduler has no run option 'eta'; it has no run options"):
        ours.EulerDiscreteScheduler().set_timesteps(10, eta=1.0)
    with pytest.raises(ValueError, match=r"eta must be a finite number >= 0, got -1"):
        ours.DDIMScheduler().set_timesteps(10, eta=-1)
    with pytest.raises(ValueError, match=r"order must be a whole number in \[1, 4\], got 5"):
        ours.LMSDiscreteScheduler().set_timesteps(10, order=5)
    assert ours.DDIMScheduler.option_names() == ("eta",) and ours.PNDMScheduler.option_names() == ()


def test_run_options_change_the_run_not_the_scheduler():
    """One shared scheduler, two runs with different options: each equals its own run alone."""
    ddim = ours.DDIMScheduler.from_config(SD)
    deterministic, noisy = sample(ddim, 6, 0), sample(ddim, 6, 0, options={"eta": 1.0})
    assert not torch.equal(deterministic, noisy)
    assert torch.equal(sample(ddim, 6, 0, options={"eta": 0.0}), deterministic)
    lms = ours.LMSDiscreteScheduler.from_config(SD)
    assert not torch.equal(sample(lms, 8, 0, options={"order": 1}), sample(lms, 8, 0))
    assert sample(lms, 8, 0, options={"order": 1}).shape == (1, 4, 8, 8)


def test_pndm_runge_kutta_needs_four_steps():
    with pytest.raises(ValueError, match="at least 4 steps.*skip_prk_steps=True"):
        ours.PNDMScheduler().set_timesteps(3)
    assert len(ours.PLMSScheduler().set_timesteps(1).timesteps) == 1


def test_unsupported_reference_options_are_refused_not_ignored():
    with pytest.raises(ValueError, match="algorithm_type='sde-dpmsolver\\+\\+' is not supported"):
        ours.DPMSolverMultistepScheduler.from_config({"algorithm_type": "sde-dpmsolver++"})
    with pytest.raises(ValueError, match="solver_order=3"):
        ours.DPMSolverMultistepScheduler.from_config({"solver_order": 3})
    with pytest.raises(ValueError, match="variance_type"):
        ours.DDPMScheduler.from_config({"variance_type": "learned"})
    with pytest.raises(ValueError, match="thresholding"):
        ours.DDIMScheduler.from_config({"thresholding": True})


# ------------------------------------------------------------------ config interop
@pytest.mark.parametrize("name", NAMES)
def test_reference_config_loads_into_ours_and_back(name, tmp_path):
    ref = getattr(diffusers, name).from_config({**SD, "prediction_type": "v_prediction",
                                                "timestep_spacing": "trailing"})
    mine = ours.SCHEDULER_CLASSES[name].from_config(dict(ref.config))
    for key, value in mine.config.items():
        if key == "_use_default_values":  # the settings both leave at their defaults (ours has fewer settings)
            assert set(value) <= set(ref.config[key])
        elif key != "_class_name":
            assert ref.config[key] == value, key
    back = getattr(diffusers, name).from_config(mine.config)
    assert back.config["prediction_type"] == "v_prediction"
    assert back.config["timestep_spacing"] == "trailing"

    mine.save_pretrained(tmp_path / "scheduler")
    loaded_ref = getattr(diffusers, name).from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded_ref.config["beta_start"] == 0.00085
    saved = settings(mine.config)  # a saved file lists every setting, so none is left at a default
    assert settings(ours.SCHEDULER_CLASSES[name].from_pretrained(tmp_path, subfolder="scheduler").config) == saved
    assert settings(ours.SCHEDULER_CLASSES[name].from_config(tmp_path / "scheduler").config) == saved
    json_path = tmp_path / "scheduler" / "scheduler_config.json"
    assert settings(ours.SCHEDULER_CLASSES[name].from_config(str(json_path)).config) == saved
    assert "_use_default_values" not in json.loads(json_path.read_text())  # as the reference writes it


def settings(config):
    """A config without the reference's ``_use_default_values`` mark."""
    return {k: v for k, v in config.items() if k != "_use_default_values"}


@pytest.mark.parametrize("source", NAMES)
def test_any_config_swaps_into_any_scheduler(source):
    """Each reference class's full config, and ours, load into every sdkit scheduler."""
    ref_config = dict(getattr(diffusers, source).from_config(SD).config)
    our_config = ours.SCHEDULER_CLASSES[source].from_config(SD).config
    for target in NAMES:
        for config in (ref_config, our_config):
            sch = ours.SCHEDULER_CLASSES[target].from_config(config)
            assert sch.config["beta_schedule"] == "scaled_linear"
            assert sch.set_timesteps(4).timesteps.numel() >= 4


def test_swapping_schedulers_like_diffusers():
    """pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config), from an SD 1.5 config."""
    sd15 = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
            "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
            "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
            "trained_betas": None, "clip_sample": False}
    pndm = ours.PNDMScheduler.from_config(sd15)
    ddim = ours.DDIMScheduler.from_config(pndm.config)
    assert ddim.config["steps_offset"] == 1 and ddim.config["set_alpha_to_one"] is False
    ref_ddim = diffusers.DDIMScheduler.from_config(diffusers.PNDMScheduler.from_config(sd15).config)
    assert ddim.config["skip_prk_steps"] is ref_ddim.config["skip_prk_steps"] is True  # carried, as the reference does
    assert torch.equal(ddim.alphas_cumprod, pndm.alphas_cumprod)
    assert ddim.set_timesteps(50).timesteps[0] == 981


def test_trained_betas_round_trip():
    betas = torch.linspace(1e-4, 0.02, 1000).tolist()
    sch = ours.EulerDiscreteScheduler(trained_betas=betas)
    assert json.loads(json.dumps(sch.config))["trained_betas"] == sch.config["trained_betas"]
    assert torch.equal(ours.EulerDiscreteScheduler.from_config(sch.config).alphas_cumprod, sch.alphas_cumprod)


# ------------------------------------------------------------------ names
def test_from_name_keeps_the_reference_classes_for_their_names():
    """The rule: class names give the reference's sampling, A1111 names A1111's (tests/test_a1111_samplers.py)."""
    base = ours.PNDMScheduler.from_config({**SD, "steps_offset": 1, "skip_prk_steps": True}).config
    for name, cls in ours.SCHEDULER_CLASSES.items():
        sch = ours.from_name(name, base)
        assert type(sch) is cls and sch.config["beta_end"] == 0.012, name
    assert isinstance(ours.from_name("DPM++ 2M Karras", base), ours.KDPMPP2MScheduler)
    assert ours.from_name("DPM++ 2M Karras", base).config["beta_schedule"] == "scaled_linear"
    with pytest.raises(ValueError, match="Unknown sampler name 'Heun\\+\\+'.*DPM\\+\\+ 2M"):
        ours.from_name("Heun++", base)


def test_a1111_name_names_reference_classes_by_class():
    for name in ours.SAMPLER_NAMES:
        assert ours.a1111_name(ours.from_name(name, SD)) == name
    assert ours.a1111_name(ours.PLMSScheduler()) == "PLMSScheduler"
    assert ours.a1111_name(ours.DPMSolverMultistepScheduler(solver_order=1)) == "DPMSolverMultistepScheduler"


def test_get_scheduler_class():
    assert ours.get_scheduler_class("PNDMScheduler") is ours.PNDMScheduler
    assert ours.get_scheduler_class("DDIMScheduler") is ours.DDIMScheduler
    plms = ours.get_scheduler_class("PLMSScheduler")()
    assert isinstance(plms, ours.PNDMScheduler) and plms.config["skip_prk_steps"] is True
    assert plms.config["_class_name"] == "PNDMScheduler"  # what the reference can load
    assert ours.PLMSScheduler.from_config(plms.config).config == plms.config
    assert ours.get_scheduler_class("KEulerScheduler") is ours.KEulerScheduler
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*sdkit has.*DDIMScheduler"):
        ours.get_scheduler_class("UniPCMultistepScheduler")


def test_from_pretrained_folder_and_offline_repo(tmp_path):
    from sdkit.schedulers import DDIMScheduler

    DDIMScheduler(beta_schedule="scaled_linear", steps_offset=1).save_pretrained(tmp_path / "scheduler")
    loaded = DDIMScheduler.from_pretrained(tmp_path, subfolder="scheduler")
    assert loaded.config["steps_offset"] == 1 and loaded.config["beta_schedule"] == "scaled_linear"
    with pytest.raises(FileNotFoundError, match="no-such-user/no-such-model.*not in the Hugging Face cache"):
        DDIMScheduler.from_pretrained("no-such-user/no-such-model", subfolder="scheduler")
