"""A1111's samplers by name: whole pipeline runs against k-diffusion driven as A1111 1.10 drives it.

The oracle is k-diffusion's own sampler function (tests/oracles.py) on k-diffusion's CompVis
wrapper of the same UNet, with A1111's classifier-free guidance on the denoised outputs
(modules/sd_samplers_cfg_denoiser.py), A1111's sigmas (get_sigmas in
modules/sd_samplers_kdiffusion.py), A1111's per-image noise (modules/rng.py ImageRNG, with
k-diffusion's torch.randn_like routed to it as A1111's TorchHijack does) and, for the SDE
samplers, k-diffusion's BrownianTreeNoiseSampler on torchsde seeded with the image seeds. The
alpha_bar the wrapper sees is built here the way CompVis LDM and A1111 build it. A1111's own
samplers that k-diffusion lacks (DDIM, PLMS, Restart, LCM) are checked against transcriptions of
A1111's functions below.
"""

import threading
import warnings

import pytest
import torch
from a1111_oracle import (A1111, CompVisModel, ImageRNG, NoiseScheduleVP, TorchHijack, UniPC, a1111_ddim, a1111_plms,
                          a1111_restart, a1111_sigmas, external, ldm_alphas_cumprod, sampling)
from helpers import build_reference_pipeline, rel_err

import sdkit
import sdkit.schedulers as ours
from sdkit import StableDiffusionPipeline
from sdkit.text import encode_prompts

TOL = 1e-5
PROMPT, NEGATIVE, SCALE, SEED = "a large red circle", "blurry", 5.0, 1234

DETERMINISTIC = ("DPM++ 2M", "Euler", "LMS", "Heun", "DPM2")
STOCHASTIC = ("DPM++ SDE", "DPM++ 2M SDE", "DPM++ 2M SDE Heun", "DPM++ 2S a", "DPM++ 3M SDE", "Euler a", "DPM2 a")


@pytest.fixture(scope="module")
def bundled():
    pipe = StableDiffusionPipeline.from_pretrained(sdkit.TINY_MODEL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def random_folder(tmp_path_factory):
    return build_reference_pipeline(tmp_path_factory.mktemp("sd1"))


@pytest.fixture(scope="module")
def random_model(random_folder):
    pipe = StableDiffusionPipeline.from_pretrained(random_folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


MODELS = ("bundled", "random_model")


# -- the oracle: A1111 1.10's way of driving k-diffusion, written here ----------------------------

class GuidedModel(CompVisModel):
    """The UNet with guidance on its outputs ([uncond; cond], as sdkit's pipeline guides): only rounding differs."""

    def __init__(self, unet, alphas_cumprod, cond, uncond):
        super().__init__(unet, alphas_cumprod)
        self.context = torch.cat([uncond, cond])

    def apply_model(self, x, t, cond):
        out = self.unet(torch.cat([x, x]), torch.cat([t, t]), self.context)
        uncond, cond = out.chunk(2)
        return uncond + SCALE * (cond - uncond)


def oracle(pipe, name, steps, seeds, schedule="Automatic", ensd=0, guide_outputs=False, **params):
    """The final latents of A1111 1.10 sampling ``name`` with k-diffusion on this pipeline's UNet.

    ``guide_outputs``: guidance on the UNet's outputs instead of A1111's on the denoised ones (the
    same sum, rounded as sdkit's pipeline rounds it).
    """
    config = pipe.scheduler.config
    B = len(seeds)
    cond, uncond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [PROMPT], [NEGATIVE], B, True, pipe.device,
                                  pipe.dtype)
    alphas_cumprod = ldm_alphas_cumprod(config)
    model = GuidedModel(pipe.unet, alphas_cumprod, cond, uncond) if guide_outputs else CompVisModel(pipe.unet,
                                                                                                 alphas_cumprod)
    wrapper = external.CompVisVDenoiser if config["prediction_type"] == "v_prediction" else external.CompVisDenoiser
    denoiser = wrapper(model)

    def cfg_denoiser(x, sigma):  # A1111's CFGDenoiser: [cond; uncond], guidance on the denoised outputs
        if guide_outputs:
            return denoiser(x, sigma, cond=None)
        x_out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        denoised_uncond = x_out[-B:]
        denoised = torch.clone(denoised_uncond)
        for i in range(B):
            denoised[i] += (x_out[i] - denoised_uncond[i]) * (1.0 * SCALE)
        return denoised

    function, _, opts = A1111[name]
    sigmas = a1111_sigmas(denoiser, name, steps, schedule)
    rng = ImageRNG((4, 8, 8), seeds, ensd=ensd)
    x = rng.next() * sigmas[0]
    kwargs = dict(params)
    if opts.get("brownian"):
        kwargs["noise_sampler"] = sampling.BrownianTreeNoiseSampler(x, sigmas[sigmas > 0].min(), sigmas.max(),
                                                                    seed=seeds)
    if "solver_type" in opts:
        kwargs["solver_type"] = opts["solver_type"]
    sampling.torch = TorchHijack(rng)
    try:
        with torch.inference_mode(), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torchsde's note on the sigma_max query
            return getattr(sampling, function)(cfg_denoiser, x, sigmas, disable=True, **kwargs)
    finally:
        sampling.torch = torch


def ours_latents(pipe, name, steps, seed, batch, schedule=None, **call):
    scheduler = ours.from_name(name, pipe.scheduler.config, schedule=schedule)
    return pipe(PROMPT, negative_prompt=NEGATIVE, scheduler=scheduler, seed=seed, num_images_per_prompt=batch,
                num_inference_steps=steps, guidance_scale=SCALE, guidance_rescale=0.0, guidance_end=1.0,
                output_type="latent", **call).images


# -- parity ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", DETERMINISTIC)
def test_deterministic_samplers_match_k_diffusion_driven_as_a1111(request, model, name):
    pipe = request.getfixturevalue(model)
    latents = ours_latents(pipe, name, 6, SEED, 2)
    assert rel_err(latents, oracle(pipe, name, 6, [SEED, SEED + 1])) <= TOL


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name", STOCHASTIC)
def test_stochastic_samplers_match_with_the_same_noise_draws(request, model, name):
    """Per-image generators (seed + k, then seed + k + ENSD), Brownian trees seeded per image: the same draws."""
    pipe = request.getfixturevalue(model)
    latents = ours_latents(pipe, name, 6, SEED, 2, eta_noise_seed_delta=31337)
    assert rel_err(latents, oracle(pipe, name, 6, [SEED, SEED + 1], ensd=31337)) <= TOL


@pytest.mark.parametrize("name", DETERMINISTIC + STOCHASTIC)
def test_samplers_equal_k_diffusion_bitwise_when_guidance_rounds_alike(bundled, name):
    """The whole difference is where guidance is rounded: guided on the UNet's outputs, as sdkit guides, k-diffusion
    gives the same bits (zero-terminal-SNR v model, sigma_max 4519, ENSD on)."""
    latents = ours_latents(bundled, name, 6, SEED, 2, eta_noise_seed_delta=31337)
    assert torch.equal(latents, oracle(bundled, name, 6, [SEED, SEED + 1], ensd=31337, guide_outputs=True))


@pytest.mark.parametrize("name, schedule", [("Euler", "Karras"), ("DPM++ 2M", "Exponential"),
                                            ("Heun", "Polyexponential"), ("LMS", "Karras")])
def test_schedule_types_reach_the_sampler(bundled, name, schedule):
    latents = ours_latents(bundled, name, 6, SEED, 1, schedule=schedule)
    assert rel_err(latents, oracle(bundled, name, 6, [SEED], schedule=schedule)) <= TOL


@pytest.mark.parametrize("name", ["Euler", "Heun", "DPM2"])
def test_churn_options_match(random_model, name):
    """s_churn, s_tmin, s_noise: the churn noise drawn before each step, as k-diffusion draws it."""
    options = {"s_churn": 1.5, "s_tmin": 0.05, "s_noise": 1.003}
    latents = ours_latents(random_model, name, 6, SEED, 2, scheduler_options=options, eta_noise_seed_delta=5)
    assert rel_err(latents, oracle(random_model, name, 6, [SEED, SEED + 1], ensd=5, **options)) <= TOL


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "DPM++ 2M SDE"])
def test_eta_and_s_noise_match(random_model, name):
    latents = ours_latents(random_model, name, 5, SEED, 1, eta=0.6, scheduler_options={"s_noise": 0.97})
    assert rel_err(latents, oracle(random_model, name, 5, [SEED], eta=0.6, s_noise=0.97)) <= TOL


def test_img2img_runs_a1111s_share_of_the_steps(random_model):
    """A1111 img2img: sigmas[n - int(min(strength, 0.999) n) - 1:], the start x0 + noise * sigma."""
    sch = ours.from_name("DPM++ 2M", random_model.scheduler.config)
    state = sch.set_timesteps(10, strength=0.55)
    full = sch.sigmas(10)
    assert torch.equal(state.ladder, full[10 - 5 - 1:]) and len(state.timesteps) == 6
    x0, noise = torch.randn(1, 4, 8, 8), torch.randn(1, 4, 8, 8)
    assert torch.equal(sch.add_noise(x0, noise, state.latent_timestep, state), x0 + noise * full[4])
    assert len(sch.set_timesteps(10, strength=1.0).timesteps) == 10


# -- A1111's own samplers (not in k-diffusion): transcriptions of A1111 1.10's functions -----------

def guided(pipe, batch):
    """A1111's guidance of model outputs ([cond; uncond] batch) for this pipeline's UNet."""
    cond, uncond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [PROMPT], [NEGATIVE], batch, True, pipe.device,
                                  pipe.dtype)

    def model_out(x, t):
        out = pipe.unet(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, uncond]))
        return out[batch:] + (out[:batch] - out[batch:]) * SCALE

    return model_out


def guided_eps(pipe, batch, alphas_cumprod):
    """The guided eps of A1111's timestep samplers (CompVisTimestepsVDenoiser converts v at the integer timestep)."""
    unet = guided(pipe, batch)

    def eps(x, t):
        out = unet(x, t)
        if pipe.scheduler.config["prediction_type"] != "v_prediction":
            return out
        i = t.to(torch.int)
        return alphas_cumprod.sqrt()[i, None, None, None] * out + (1 - alphas_cumprod).sqrt()[i, None, None, None] * x

    return eps


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("name, eta", [("DDIM", 0.0), ("DDIM", 0.6), ("PLMS", None)])
def test_a1111_ddim_and_plms_match_a1111s_functions(request, model, name, eta):
    pipe = request.getfixturevalue(model)
    latents = ours_latents(pipe, name, 8, SEED, 2, eta=eta, eta_noise_seed_delta=7)
    alphas_cumprod = ldm_alphas_cumprod(pipe.scheduler.config)
    eps = guided_eps(pipe, 2, alphas_cumprod)

    timesteps = torch.clip(torch.arange(0, 1000, 1000 // 8) + 1, 0, 999)
    rng = ImageRNG((4, 8, 8), [SEED, SEED + 1], ensd=7)
    with torch.inference_mode():
        x = rng.next()
        if name == "DDIM":
            expected = a1111_ddim(eps, x, timesteps, alphas_cumprod, eta, lambda x: rng.next())
        else:
            expected = a1111_plms(eps, x, timesteps, alphas_cumprod)
    assert rel_err(latents, expected) <= TOL


def k_model(pipe, batch):
    """A1111's CFG k-diffusion denoiser (guidance on denoised outputs) for this pipeline."""
    config = pipe.scheduler.config
    wrapper = external.CompVisVDenoiser if config["prediction_type"] == "v_prediction" else external.CompVisDenoiser
    denoiser = wrapper(CompVisModel(pipe.unet, ldm_alphas_cumprod(config)))
    cond, uncond = encode_prompts(pipe.text_encoder, pipe.tokenizer, [PROMPT], [NEGATIVE], batch, True, pipe.device,
                                  pipe.dtype)

    def model(x, sigma):
        out = denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), cond=torch.cat([cond, uncond]))
        return out[batch:] + (out[:batch] - out[batch:]) * SCALE

    return denoiser, model


@pytest.mark.parametrize("steps", [8, 20])
def test_restart_matches_a1111s_restart_sampler(random_model, steps):
    """Restart from 20 steps on redraws its Karras sigmas and runs 0.1 -> 2 again after fresh noise."""
    latents = ours_latents(random_model, "Restart", steps, SEED, 1)
    denoiser, model = k_model(random_model, 1)
    sigmas = sampling.get_sigmas_karras(steps, denoiser.sigmas[0].item(), denoiser.sigmas[-1].item())
    rng = ImageRNG((4, 8, 8), [SEED])
    with torch.inference_mode():
        expected = a1111_restart(model, rng.next() * sigmas[0], sigmas, lambda x: rng.next())
    assert rel_err(latents, expected) <= TOL


def test_lcm_matches_a1111s_lcm_sampler(random_model):
    """modules/sd_samplers_lcm.py: LCM's 50 timesteps, the nearest one for each sigma, the consistency scalings."""
    latents = ours_latents(random_model, "LCM", 4, SEED, 1)
    ac = ldm_alphas_cumprod(random_model.scheduler.config)
    skip = 1000 // 50
    valid = torch.zeros(50)
    for x in range(50):
        valid[50 - 1 - x] = ac[1000 - 1 - x * skip]
    log_sigmas = (((1 - valid) / valid) ** 0.5).log()

    def sigma_to_t(sigma):
        return (sigma.log() - log_sigmas[:, None]).abs().argmin(dim=0).view(sigma.shape) * skip + (skip - 1)

    def t_to_sigma(t):
        t = torch.clamp(((t - (skip - 1)) / skip).float(), min=0, max=49)
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()

    sigma_max, sigma_min = log_sigmas[-1].exp(), log_sigmas[0].exp()
    sigmas = sampling.append_zero(t_to_sigma(torch.linspace(sigma_to_t(sigma_max), sigma_to_t(sigma_min), 4)))
    unet = guided(random_model, 1)
    rng = ImageRNG((4, 8, 8), [SEED])
    with torch.inference_mode():
        x = rng.next() * sigmas[0]
        for i in range(len(sigmas) - 1):
            sigma = sigmas[i] * x.new_ones([1])
            c_in = (1 / (sigma**2 + 1) ** 0.5)[:, None, None, None]
            x0 = x + unet(x * c_in, sigma_to_t(sigma)) * -sigma[:, None, None, None]
            st = sigma_to_t(sigma)[:, None, None, None] * 10.0
            x = st / (st**2 + 0.25) ** 0.5 * x0 + 0.25 / (st**2 + 0.25) * x
            if sigmas[i + 1] > 0:
                x = x + sigmas[i + 1] * rng.next()
    assert rel_err(latents, x) <= TOL


def test_lcm_refuses_v_prediction(bundled):
    with pytest.raises(ValueError, match="prediction_type='v_prediction'.*'epsilon'"):
        ours.from_name("LCM", bundled.scheduler.config)


# -- names ------------------------------------------------------------------------------------------

def test_names_map_as_a1111_maps_them():
    """A1111 1.10 names, aliases and legacy "Sampler Schedule" names (modules/sd_samplers.py get_sampler_and_scheduler)."""
    cases = {
        "DPM++ 2M Karras": (ours.KDPMPP2MScheduler, "karras"), "DPM++ 2M": (ours.KDPMPP2MScheduler, "automatic"),
        "Euler a": (ours.KEulerAncestralScheduler, "automatic"), "k_euler_a": (ours.KEulerAncestralScheduler, "automatic"),
        "euler": (ours.KEulerScheduler, "automatic"), "LMS Karras": (ours.KLMSScheduler, "karras"),
        "DPM++ 2M SDE Heun Exponential": (ours.KDPMPP2MSDEScheduler, "exponential"),
        "DPM++ SDE Karras": (ours.KDPMPPSDEScheduler, "karras"), "DPM2 a Karras": (ours.KDPM2AncestralScheduler, "karras"),
        "Euler SGMUniform": (ours.KEulerScheduler, "sgm_uniform"), "DDIM": (ours.A1111DDIMScheduler, "automatic"),
        "PLMS": (ours.A1111PLMSScheduler, "automatic"), "Restart": (ours.KRestartScheduler, "automatic"),
    }
    for name, (cls, schedule) in cases.items():
        sch = ours.from_name(name, {"beta_schedule": "scaled_linear"})
        assert type(sch) is cls and sch.config["schedule_type"] == schedule, name
    assert ours.from_name("DPM++ 2M SDE Heun").config["solver_type"] == "heun"
    assert ours.from_name("DPM++ 2M", schedule="Karras").config["schedule_type"] == "karras"
    assert ours.from_name("DPM++ 2M Karras", schedule="Uniform").config["schedule_type"] == "karras"  # name wins
    assert type(ours.from_name("DDIMScheduler")) is ours.DDIMScheduler  # the reference's class by its name
    with pytest.raises(ValueError, match="Unknown sampler name 'DPM fast'.*DPM\\+\\+ 2M"):
        ours.from_name("DPM fast")
    with pytest.raises(ValueError, match="Unknown schedule type 'Fast'.*Karras"):
        ours.from_name("Euler", schedule="Fast")
    with pytest.raises(ValueError, match="reference class"):
        ours.from_name("DDIMScheduler", schedule="Karras")


def test_a1111_name_and_schedule_label_invert_from_name():
    for name in ours.SAMPLER_NAMES:
        sch = ours.from_name(name, {"beta_schedule": "scaled_linear"})
        assert ours.a1111_name(sch) == name
    assert ours.a1111_schedule(ours.from_name("DPM++ 2M")) == "Karras"  # A1111 writes the default it used
    assert ours.a1111_schedule(ours.from_name("Euler")) == "Automatic"
    assert ours.a1111_schedule(ours.from_name("Euler", schedule="Uniform")) == "Uniform"
    assert ours.a1111_name(ours.DDIMScheduler()) == "DDIMScheduler" and ours.a1111_schedule(ours.DDIMScheduler()) is None


def test_second_order_samplers_list_both_calls():
    sch = ours.from_name("Heun", {"beta_schedule": "scaled_linear"})
    state = sch.set_timesteps(5)
    assert [i for i, _ in state.calls] == [0, 0, 1, 1, 2, 2, 3, 3, 4]  # the last step is Euler
    assert torch.equal(state.call_sigmas[1::2], state.ladder[1:5])
    dpm2 = ours.from_name("DPM2", {"beta_schedule": "scaled_linear"}).set_timesteps(5)
    assert len(dpm2.ladder) == 6 and dpm2.ladder[-1] == 0  # 5 steps with the next-to-last sigma dropped


# -- the contract every scheduler keeps -------------------------------------------------------------

A1111_SAMPLERS = [n for n in ours.SAMPLER_NAMES if n != "LCM"]


def toy_model(x, t):
    return torch.tanh(x * 0.9 + 0.001 * float(t)) * 0.8 + 0.05 * x


def toy_run(sch, n, seed, shape=(1, 4, 8, 8), dtype=torch.float32, **options):
    g = torch.Generator().manual_seed(seed)
    state = sch.set_timesteps(n, **options)
    x = sch.begin(torch.randn(shape, generator=g, dtype=dtype) * state.init_noise_sigma, state, g)
    for t in state.timesteps:
        out = sch.step(toy_model(sch.scale_model_input(x, t, state), t), t, x, state, generator=g)
        x, state = out.prev_sample, out.state
    return x


@pytest.mark.parametrize("name", A1111_SAMPLERS)
def test_a1111_samplers_keep_the_contract(name):
    sch = ours.from_name(name, {"beta_schedule": "scaled_linear", "prediction_type": "v_prediction"})
    before = dict(vars(sch))
    for dtype in (torch.float32, torch.float64):
        x = toy_run(sch, 6, 3, dtype=dtype)
        assert x.dtype == dtype and torch.isfinite(x).all()
    assert torch.equal(toy_run(sch, 6, 3), toy_run(sch, 6, 3))  # a torch generator repeats
    state = sch.set_timesteps(6)
    t = state.timesteps[0]
    x = torch.randn(2, 4, 8, 8)
    out = sch.step(toy_model(x, t), t, x, state)
    assert out.state.step_index == 1 and state.step_index == 0
    with pytest.raises(ValueError, match="not the state's next timestep"):
        sch.step(toy_model(x, t), t + 1, x, state)
    assert type(sch).from_config(sch.config).config == sch.config
    assert vars(sch).keys() == before.keys()
    with pytest.raises(AttributeError, match="immutable"):
        sch.alphas_cumprod = None
    with pytest.raises(ValueError, match="no run option 'bogus'"):
        sch.set_timesteps(4, bogus=1)


def in_threads(work, jobs):
    """work(*job) for every job, all at once in threads; the results in the jobs' order."""
    results = [None] * len(jobs)

    def run(k):
        results[k] = work(*jobs[k])

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(jobs))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    return results


@pytest.mark.parametrize("name", ["Euler a", "DPM++ SDE", "Heun"])
def test_threads_sharing_one_a1111_sampler_match_serial_runs(name):
    sch = ours.from_name(name, {"beta_schedule": "scaled_linear"})
    options = {"s_churn": 1.0} if name == "Heun" else {}
    jobs = [(4, 0), (7, 1), (5, 2), (6, 3)]

    def work(n, seed):
        return toy_run(sch, n, seed, **options)

    serial = [work(*job) for job in jobs]
    assert all(torch.equal(a, b) for a, b in zip(in_threads(work, jobs), serial))


def test_image_k_of_a_batch_is_image_k_made_alone(random_model):
    """seed + k with its own generator: the second image of a batch equals the image of seed + 1 alone."""
    batch = ours_latents(random_model, "DPM++ 2M SDE", 5, SEED, 2)
    alone = ours_latents(random_model, "DPM++ 2M SDE", 5, SEED + 1, 1)
    assert rel_err(batch[1:], alone) <= 1e-5


def test_concurrent_calls_with_their_own_seeds_and_samplers_equal_serial_ones(random_model):
    """Each call draws from its own SeedNoise and runs its own state: threads change nothing."""
    jobs = [("Euler a", 3), ("DPM++ SDE", 4), ("DPM++ 2M", 5), ("Heun", 6)]

    def work(name, seed):
        return ours_latents(random_model, name, 4, seed, 2, eta_noise_seed_delta=9)

    serial = [work(*job) for job in jobs]
    assert all(torch.equal(a, b) for a, b in zip(in_threads(work, jobs), serial))


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("settings", [{}, {"unipc_variant": "bh2"}, {"unipc_skip_type": "time_quadratic"},
                                      {"unipc_skip_type": "logSNR", "unipc_order": 2},
                                      {"unipc_lower_order_final": False}])
def test_unipc_matches_a1111s_uni_pc(request, model, settings):
    """A1111's UniPC (modules/models/diffusion/uni_pc/uni_pc.py with its UniPCCFG, transcribed in a1111_oracle)."""
    pipe = request.getfixturevalue(model)
    scheduler = ours.from_name("UniPC", {**pipe.scheduler.config, **settings})
    latents = pipe(PROMPT, negative_prompt=NEGATIVE, scheduler=scheduler, seed=SEED, num_images_per_prompt=2,
                   num_inference_steps=7, guidance_scale=SCALE, guidance_rescale=0.0, guidance_end=1.0,
                   output_type="latent").images
    alphas_cumprod = ldm_alphas_cumprod(pipe.scheduler.config)
    eps = guided_eps(pipe, 2, alphas_cumprod)

    sampler = UniPC(eps, NoiseScheduleVP(alphas_cumprod), settings.get("unipc_variant", "bh1"))
    with torch.inference_mode():
        steps = len(range(0, 1000, 1000 // 7))  # A1111 runs UniPC over len(get_timesteps(p, 7)) = 8 steps
        expected = sampler.sample(ImageRNG((4, 8, 8), [SEED, SEED + 1]).next(), steps,
                                  order=settings.get("unipc_order", 3),
                                  skip_type=settings.get("unipc_skip_type", "time_uniform"),
                                  lower_order_final=settings.get("unipc_lower_order_final", True))
    assert rel_err(latents, expected) <= TOL


def test_the_unet_takes_the_continuous_timesteps_as_the_reference_does(random_folder, random_model):
    """k-diffusion calls the UNet at fractional timesteps: sdkit's UNet embeds them as diffusers' does."""
    import diffusers

    ref = diffusers.UNet2DConditionModel.from_pretrained(random_folder, subfolder="unet").eval()
    unet = random_model.unet
    x, context = torch.randn(2, 4, 8, 8), torch.randn(2, 16, 32)
    t = torch.tensor([437.3125, 12.75])
    with torch.inference_mode():
        assert rel_err(unet(x, t, context), ref(x, t, context).sample) <= TOL
        assert not torch.equal(unet(x, t, context), unet(x, t.round(), context))
