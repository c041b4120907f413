"""Fewer UNet calls, opt-in per call: DeepCache step caching and guidance truncation."""


import diffusers
import numpy as np
import pytest
import torch

import sdkit.schedulers
from helpers import (SD1_UNET, build_reference_pipeline, concurrently, drop_guidance_after, one_torch_thread,
                     perturb, quiet)
from sdkit import StableDiffusionPipeline
from sdkit.models import UNet2DConditionModel


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1")


@pytest.fixture(scope="module")
def pipe(folder):
    p = quiet(StableDiffusionPipeline.from_pretrained(folder))
    p.scheduler = sdkit.schedulers.DDIMScheduler.from_config(p.scheduler.config)
    return p


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    ref = perturb(diffusers.UNet2DConditionModel(**SD1_UNET))
    with torch.device("meta"):
        ours = UNet2DConditionModel.from_config(dict(ref.config))
    ours.load_checked_state_dict(ref.state_dict())
    return ours.eval()


def test_every_branch_on_its_own_deep_features_gives_the_whole_unet(unet):
    """The shallow path fed the features its own full step kept reproduces that step: the split is exact."""
    x, ctx = torch.randn(2, 4, 16, 16, generator=gen(1)), torch.randn(2, 16, SD1_UNET["cross_attention_dim"])
    with torch.no_grad():
        whole = unet(x, 500, ctx)
        for branch in range(unet.deep_cache_branches()):
            full, deep = unet.deep_cache_forward(x, 500, ctx, branch)
            shallow, _ = unet.deep_cache_forward(x, 500, ctx, branch, deep)
            torch.testing.assert_close(full, whole, rtol=0, atol=0)
            torch.testing.assert_close(shallow, whole, rtol=1e-5, atol=1e-6, msg=f"branch {branch}")


def test_a_branch_that_does_not_exist_is_refused(unet):
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 16, SD1_UNET["cross_attention_dim"])
    with pytest.raises(ValueError, match="branches 0 to"):
        unet.deep_cache_forward(x, 1, ctx, unet.deep_cache_branches())


def count_calls(modules):
    """Forward hooks appending the module's name to one log at each call."""
    log = []
    handles = [m.register_forward_hook(lambda mod, args, out, name=name: log.append(name))
               for name, m in modules.items()]
    return log, handles


@pytest.mark.parametrize("interval", [2, 3])
def test_deep_cache_recomputes_the_deep_path_every_interval_calls(pipe, interval):
    """Documented pattern: the whole UNet on calls 0, k, 2k, ...; conv_in and the last up layer on every call."""
    unet = pipe.unet
    log, handles = count_calls({"conv_in": unet.conv_in, "mid": unet.mid_block,
                                "first_up": unet.up_blocks[0].resnets[0], "last_up": unet.up_blocks[-1].resnets[-1]})
    steps = 7
    try:
        pipe("a red circle", num_inference_steps=steps, generator=gen(0), output_type="latent",
             deep_cache_interval=interval)
    finally:
        for h in handles:
            h.remove()
    calls, whole = [], []
    for name in log:
        if name == "conv_in":
            calls.append(len(calls))
        if name == "mid":
            whole.append(calls[-1])
    assert len(calls) == steps
    assert whole == list(range(0, steps, interval))
    assert log.count("first_up") == len(whole) and log.count("last_up") == steps


def test_deep_cache_is_deterministic_and_interval_1_is_the_plain_run(pipe):
    kw = dict(num_inference_steps=6, output_type="np")
    plain = pipe("a blue square", generator=gen(3), **kw).images
    off = pipe("a blue square", generator=gen(3), deep_cache_interval=1, **kw).images
    np.testing.assert_array_equal(plain, off)
    a = pipe("a blue square", generator=gen(3), deep_cache_interval=3, **kw).images
    b = pipe("a blue square", generator=gen(3), deep_cache_interval=3, **kw).images
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - plain).max() > 0  # it does skip work


def test_deep_cache_and_guidance_end_option_checks():
    with pytest.raises(ValueError, match="deep_cache_interval"):
        StableDiffusionPipeline.options_class(prompt="x", deep_cache_interval=0)
    with pytest.raises(ValueError, match="deep_cache_branch"):
        StableDiffusionPipeline.options_class(prompt="x", deep_cache_branch=-1)
    with pytest.raises(ValueError, match="guidance_end"):
        StableDiffusionPipeline.options_class(prompt="x", guidance_end=1.5)


def test_guidance_end_stops_the_unconditional_half(pipe):
    log = []
    handle = pipe.unet.conv_in.register_forward_hook(lambda m, args, out: log.append(args[0].shape[0]))
    try:
        pipe(["a red circle", "a blue square"], num_inference_steps=5, generator=[gen(0), gen(1)],
             output_type="latent", guidance_end=0.5)
    finally:
        handle.remove()
    assert log == [4, 4, 4, 2, 2]  # ceil(0.5 * 5) = 3 guided calls on [uncond; cond], then cond alone


def test_guidance_end_matches_the_reference_with_guidance_dropped_by_callback(folder, pipe):
    """Independent oracle: diffusers' documented dynamic-guidance callback (scale 0, cond embeds) at the same step."""
    ref = quiet(diffusers.StableDiffusionPipeline.from_pretrained(folder, safety_checker=None,
                                                                  requires_safety_checker=False))
    ref.scheduler = diffusers.DDIMScheduler.from_config(ref.scheduler.config)
    steps, end = 6, 0.5

    kw = dict(num_inference_steps=steps, guidance_scale=7.5, output_type="np")
    expected = ref("a red circle", generator=gen(2), callback_on_step_end=drop_guidance_after(int(steps * end)),
                   callback_on_step_end_tensor_inputs=["prompt_embeds"], **kw).images
    ours = pipe("a red circle", generator=gen(2), guidance_end=end, **kw).images
    plain = pipe("a red circle", generator=gen(2), **kw).images
    np.testing.assert_allclose(ours, expected, atol=2e-3)
    assert np.abs(plain - expected).max() > 1e-2  # the oracle did drop guidance


def test_threads_with_deep_cache_and_guidance_end_give_the_sequential_images(pipe):
    jobs = [dict(prompt=p, seed=i, deep_cache_interval=1 + i % 3, guidance_end=(1.0, 0.5, 0.3)[i % 3])
            for i, p in enumerate(["a red circle", "a blue square", "a green triangle", "a small yellow circle",
                                   "a large red square", "a triangle on the left"])]

    def run(job):
        return pipe(job["prompt"], generator=gen(job["seed"]), num_inference_steps=4, output_type="np",
                    deep_cache_interval=job["deep_cache_interval"], guidance_end=job["guidance_end"]).images

    expected = [run(job) for job in jobs]
    results = concurrently(lambda i: run(jobs[i]), len(jobs))
    for i, (a, b) in enumerate(zip(expected, results)):
        np.testing.assert_array_equal(a, b, err_msg=f"job {i}")
