"""Speed options that keep the outputs: torch.compile of the UNet, channels_last, and the OpenVINO backend
(``pipe.compile(backend="openvino")``, the ``openvino`` extra: the eager images to 1e-4, compiled once per
shape and cached on disk, shared by concurrent calls)."""

import copy
import os
import warnings
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import build_reference_pipeline, concurrently, one_torch_thread, quiet, rel_err
import sdkit
from sdkit import StableDiffusionPipeline
from sdkit.pipelines.adapters import NO_NETWORKS


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1")
    return quiet(StableDiffusionPipeline.from_pretrained(folder))


def run(p, prompt="a red circle", seed=0, steps=3):
    return p(prompt, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), output_type="np").images


@pytest.mark.slow
def test_compiled_unet_gives_the_eager_images_in_threads_and_follows_a_new_unet(pipe):
    """torch.compile with the "eager" backend (dynamo's tracing and guards, no code generation: the
    plumbing of pipe.compile without inductor's minutes of C++ builds here)."""
    p = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
    jobs = [("a red circle", 0), ("a blue square", 1), ("a green triangle", 2), ("a small circle", 3)]
    expected = [run(p, *job) for job in jobs]
    assert p.compile(backend="eager") is p
    np.testing.assert_array_equal(run(p, *jobs[0]), expected[0])  # the first call compiles
    results = concurrently(lambda i: run(p, *jobs[i]), len(jobs))
    for a, b in zip(expected, results):
        np.testing.assert_array_equal(a, b)
    with torch.no_grad():  # weights changed in place (as fuse_lora does): the compiled UNet steps aside, once warned
        p.unet.conv_in.bias.add_(0.5)
    with pytest.warns(UserWarning, match="UNet's weights changed after pipe.compile .* pipe.compile again"):
        assert p._unet_for_run(SimpleNamespace(networks=NO_NETWORKS)) is p.unet
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert p._unet_for_run(SimpleNamespace(networks=NO_NETWORKS)) is p.unet
    p.compile(backend="eager")  # compiled again: the new weights are the compiled ones
    assert p._unet_for_run(SimpleNamespace(networks=NO_NETWORKS)) is p._compiled_unet
    p.unet = copy.deepcopy(p.unet)  # new weights: the stale compiled UNet is not used
    with torch.no_grad():
        next(p.unet.parameters()).add_(0.5)
    assert p._unet_for_run(SimpleNamespace(networks=NO_NETWORKS)) is p.unet
    assert np.abs(run(p) - expected[0]).max() > 1e-3
    p.compile(backend=None)
    assert p._compiled_unet is None


@pytest.mark.slow
def test_inductor_on_a_cpu_freezes_the_weights_gives_the_eager_images_and_serves_threads(pipe):
    """The real inductor build (about 2 minutes here): on a CPU the weights are constants of the graph."""
    from sdkit.pipelines.performance import Weights

    p = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet))
    jobs = [("a red circle", 0), ("a blue square", 1), ("a green triangle", 2)]
    expected = [run(p, *job) for job in jobs]
    p.compile(backend="inductor")
    results = concurrently(lambda i: run(p, *jobs[i]), len(jobs))  # the first compiles; the others wait
    for a, b in zip(results, expected):
        assert rel_err(a, b) < 1e-4 and np.abs(a - b).max() < 1e-3
    with torch.no_grad():
        p.unet.conv_in.weight.mul_(1.5)
    with pytest.warns(UserWarning, match="UNet's weights changed after pipe.compile"):
        changed = run(p)  # the eager UNet, with the new weights
    np.testing.assert_array_equal(changed, run(StableDiffusionPipeline.from_pipe(p)))
    assert np.abs(changed - expected[0]).max() > 1e-2
    # what the check prevents: the frozen graph still computes with the convolution weights it packed
    p._compiled_unet.weights.versions = Weights._read(p.unet)
    assert rel_err(run(p), expected[0]) < 1e-4


def test_freezing_is_inductors_on_a_cpu(pipe):
    from sdkit.pipelines.performance import CompiledUNet

    assert CompiledUNet(pipe.unet, "inductor").freezing is True
    assert CompiledUNet(pipe.unet, "inductor", freezing=False).freezing is False
    assert CompiledUNet(pipe.unet, "eager").freezing is False
    with pytest.raises(ValueError, match="freezing=True is inductor's on a CPU; this is backend='eager'"):
        StableDiffusionPipeline.from_pipe(pipe).compile(backend="eager", freezing=True)


def test_compile_refuses_a_cache_dir_or_a_precision_for_torch_backends(pipe, tmp_path):
    with pytest.raises(ValueError, match="cache_dir is for backend=.openvino."):
        StableDiffusionPipeline.from_pipe(pipe).compile(backend="inductor", cache_dir=str(tmp_path))
    with pytest.raises(ValueError, match="precision is for backend=.openvino.; with torch.compile, load"):
        StableDiffusionPipeline.from_pipe(pipe).compile(backend="inductor", precision="bf16")


def test_channels_last_unet_and_vae_give_the_same_images(pipe):
    p = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae))
    plain = run(p)
    p.unet.to(memory_format=torch.channels_last)
    p.vae.to(memory_format=torch.channels_last)
    assert p.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    assert rel_err(plain, run(p)) < 1e-4


# -- OpenVINO -----------------------------------------------------------------------------------------

def openvino_module():
    """sdkit.pipelines.openvino, skipping the test where OpenVINO is not installed."""
    pytest.importorskip("openvino")
    from sdkit.pipelines import openvino

    return openvino


def rel(a, b):
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.slow
@pytest.mark.openvino
def test_openvino_unet_gives_the_eager_images_compiles_once_and_serves_threads(pipe, tmp_path, monkeypatch):
    ov = pytest.importorskip("openvino")
    jobs = [("a red circle", 0), ("a blue square", 1), ("a green triangle", 2)]
    expected = [run(pipe, *job) for job in jobs]
    p = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path), threads=1)
    conversions = []
    convert = ov.convert_model
    monkeypatch.setattr(ov, "convert_model", lambda *a, **k: conversions.append(1) or convert(*a, **k))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", torch.jit.TracerWarning)
        results = concurrently(lambda i: run(p, *jobs[i]), len(jobs))  # the first compiles; the others wait
    ours = os.path.dirname(sdkit.__file__)  # torch's own functions warn too; torch's filters hide those
    assert not [f"{w.filename}:{w.lineno}" for w in caught
                if issubclass(w.category, torch.jit.TracerWarning) and w.filename.startswith(ours)]
    for a, b in zip(results, expected):
        assert rel(a, b) < 1e-4 and np.abs(a - b).max() < 1e-3
    # one UNet shape (batch 2, 8x8 latents, 16 tokens) and one decoder shape (1 x 4 x 8 x 8), converted once
    assert len(conversions) == 2
    files = os.listdir(p._compiled_unet.cache_dir)
    assert any(f.endswith(".xml") for f in files) and any(f.endswith(".bin") for f in files)
    # a new process (here: a new pipeline) with the same weights loads the saved models, converting nothing
    again = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path), threads=1)
    assert rel(run(again), expected[0]) < 1e-4
    assert len(conversions) == 2


@pytest.mark.slow
@pytest.mark.openvino
def test_the_openvino_vae_decoder_gives_the_eager_decode_and_steps_aside_for_tiling(pipe, tmp_path):
    pytest.importorskip("openvino")
    p = StableDiffusionPipeline.from_pipe(pipe, vae=copy.deepcopy(pipe.vae))
    p.compile(backend="openvino", cache_dir=str(tmp_path), threads=1)
    z = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        eager = p.vae.decode(z)
        compiled = p._decoder_for(z)
        assert compiled is not None and rel(compiled(z).numpy(), eager.numpy()) < 1e-4
        first = compiled(z)
        kept = first.clone()
        compiled(-z)  # the pooled request runs again on other latents: the first output is a copy, unchanged
        assert torch.equal(first, kept)
        assert len(compiled.shapes._idle[((2, 4, 8, 8),)]) == 1  # sequential calls reuse one infer request
        p.enable_vae_slicing()
        assert rel(p._decode(z * p.vae.config.scaling_factor).numpy(), eager.numpy()) < 1e-4
        big = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
        assert p._decoder_for(big) is not None
        p.enable_vae_tiling()  # tiles share the whole image's statistics: the eager VAE decodes them
        assert p._decoder_for(big) is None and p._decoder_for(z) is not None
        p.vae.decoder.conv_out.bias.add_(0.1)  # changed in place: the compiled decoder steps aside, warned
        with pytest.warns(UserWarning, match="VAE's weights changed after pipe.compile"):
            assert p._decoder_for(z) is None
        p.vae = copy.deepcopy(pipe.vae)  # new weights: the stale compiled decoder is not used
        assert p._decoder_for(z) is None


@pytest.mark.openvino
def test_the_openvino_disk_cache_is_keyed_by_the_weights(pipe):
    sdkit_openvino = openvino_module()
    unet = pipe.unet
    key = sdkit_openvino.weights_hash(unet)
    changed = StableDiffusionPipeline.from_pipe(pipe, unet=type(unet).from_config(dict(unet.config)))
    changed.unet.load_state_dict({k: v + 0.01 for k, v in unet.state_dict().items()})
    assert sdkit_openvino.weights_hash(changed.unet) != key
    assert sdkit_openvino.weights_hash(unet) == key


@pytest.mark.openvino
def test_openvino_refuses_an_unknown_precision_and_leaves_the_pipeline_as_it_was(pipe, tmp_path):
    openvino_module()
    p = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path))  # converts lazily
    before = p._compiled_unet, p._compiled_decoder
    with pytest.raises(ValueError, match="precision='fp8' is not one of .'f32', 'bf16'."):
        p.compile(backend="openvino", cache_dir=str(tmp_path), precision="fp8")
    assert (p._compiled_unet, p._compiled_decoder) == before and before[1] is not None
    with pytest.raises(ValueError, match="precision is for backend='openvino'"):
        p.compile(backend="inductor", precision="bf16")
    assert (p._compiled_unet, p._compiled_decoder) == before
    without = SimpleNamespace(get_property=lambda device, name: ["FP32", "INT8", "EXPORT_IMPORT"])  # an AVX2 CPU's
    with pytest.raises(ValueError, match='precision="bf16" needs a CPU with bfloat16 instructions'):
        openvino_module().check_precision(without, "bf16")
    openvino_module().check_precision(without, "f32")


@pytest.mark.slow
@pytest.mark.openvino
def test_openvino_bf16_runs_bfloat16_where_the_cpu_has_it_and_is_refused_where_not(pipe, tmp_path):
    ov = pytest.importorskip("openvino")
    p = StableDiffusionPipeline.from_pipe(pipe)
    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        with pytest.raises(ValueError, match='precision="bf16" needs a CPU with bfloat16 instructions'):
            p.compile(backend="openvino", cache_dir=str(tmp_path), precision="bf16")
        return
    expected = run(pipe)
    # float32 first, then bfloat16 on the same disk cache (the usual order): each precision keeps its own blobs
    f32 = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path), threads=1)
    assert rel(run(f32), expected) < 1e-4
    p.compile(backend="openvino", cache_dir=str(tmp_path), threads=1, precision="bf16")
    got = run(p)
    compiled = next(iter(p._compiled_unet.shapes._compiled.values()))
    assert compiled.get_property("INFERENCE_PRECISION_HINT") == ov.Type.bf16
    # close to the float32 images, and not equal to them to float32's 1e-4 (bfloat16 really ran)
    assert 1e-4 < rel(got, expected) < 0.05
    assert {"blobs", "blobs-bf16"} <= set(os.listdir(p._compiled_unet.cache_dir))
    again = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path), threads=1)
    assert rel(run(again), expected) < 1e-4  # float32 again, from its own blobs


@pytest.mark.openvino
def test_the_openvino_unet_checks_its_inputs_before_converting_a_shape(pipe, tmp_path):
    openvino_module()
    p = StableDiffusionPipeline.from_pipe(pipe).compile(backend="openvino", cache_dir=str(tmp_path))
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 16, pipe.unet.config.cross_attention_dim)
    with pytest.raises(ValueError, match="timestep has 3 values for a batch of 2"):
        p._compiled_unet(x, torch.tensor([1, 2, 3]), ctx)
    with pytest.raises(ValueError, match="encoder_hidden_states batch 1 does not match sample batch 2"):
        p._compiled_unet(x, 1, ctx[:1])
    assert not p._compiled_unet.shapes._compiled and not os.path.exists(p._compiled_unet.cache_dir)


@pytest.mark.openvino
def test_openvino_refuses_a_half_precision_unet(pipe):
    openvino_module()
    p = StableDiffusionPipeline.from_pipe(pipe, unet=type(pipe.unet).from_config(dict(pipe.unet.config)).half())
    with pytest.raises(ValueError, match="float32 on the CPU"):
        p.compile(backend="openvino")
