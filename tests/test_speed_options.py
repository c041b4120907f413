"""Speed options that keep the outputs: torch.compile of the UNet, channels_last (OpenVINO in test_openvino.py)."""

import copy
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import build_reference_pipeline, concurrently, one_torch_thread, quiet, rel_err
from sdkit import StableDiffusionPipeline
from sdkit.pipelines.adapters import NO_NETWORKS


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1")
    return quiet(StableDiffusionPipeline.from_pretrained(folder))


def run(p, prompt="a red circle", seed=0, steps=2):
    return p(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_images_in_threads_and_follows_a_new_unet(pipe):
    """torch.compile with the "eager" backend (dynamo's tracing and guards, no code generation: the
    plumbing of pipe.compile without inductor's minutes of C++ builds here)."""
    p = StableDiffusionPipeline.from_pipe(pipe)
    jobs = [("a red circle", 0), ("a blue square", 1), ("a green triangle", 2), ("a small circle", 3)]
    expected = [run(p, *job) for job in jobs]
    assert p.compile(backend="eager") is p
    np.testing.assert_array_equal(run(p, *jobs[0]), expected[0])  # the first call compiles
    results = concurrently(lambda i: run(p, *jobs[i]), len(jobs))
    for a, b in zip(expected, results):
        np.testing.assert_array_equal(a, b)
    p.unet = copy.deepcopy(p.unet)  # new weights: the stale compiled UNet is not used
    with torch.no_grad():
        next(p.unet.parameters()).add_(0.5)
    assert p._unet_for_run(SimpleNamespace(networks=NO_NETWORKS)) is p.unet
    assert np.abs(run(p) - expected[0]).max() > 1e-3
    p.compile(backend=None)
    assert p._compiled_unet is None


def test_compile_refuses_a_cache_dir_for_torch_backends(pipe, tmp_path):
    with pytest.raises(ValueError, match="cache_dir is OpenVINO's"):
        StableDiffusionPipeline.from_pipe(pipe).compile(backend="inductor", cache_dir=str(tmp_path))


def test_channels_last_unet_and_vae_give_the_same_images(pipe):
    p = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae))
    plain = run(p)
    p.unet.to(memory_format=torch.channels_last)
    p.vae.to(memory_format=torch.channels_last)
    assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(plain, run(p)) < 1e-4
