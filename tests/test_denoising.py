"""The one denoising loop and the pieces it calls: new behaviour comes from a new piece, not an edit.

Each test adds a toy piece through the pipeline's extension points (``prepare_start``'s model
pieces, ``prepare_conditioning``'s per-step conditioning) and checks the result against a loop
written out by hand here, step by step, with torch.equal.
"""

import dataclasses
import pathlib

import pytest
import torch

import sdkit
import sdkit.schedulers as sch
from helpers import build_reference_pipeline, one_torch_thread
from sdkit import StableDiffusionPipeline
from sdkit.text import encode_text

STEPS, SCALE = 4, 5.0


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    p = StableDiffusionPipeline.from_pretrained(build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1"))
    p.set_progress_bar_config(disable=True)
    return p


def by_hand(pipe, scheduler, contexts, unet_scale=1.0, seed=0):
    """Classifier-free guidance written out: contexts[i] = (uncond, cond) for model call i, the
    UNet run once on the [uncond; cond] batch as the reference does."""
    g = torch.Generator().manual_seed(seed)
    state = scheduler.set_timesteps(STEPS)
    x = torch.randn((1, 4, 8, 8), generator=g) * state.init_noise_sigma
    with torch.inference_mode():
        for i, t in enumerate(state.timesteps):
            uncond, cond = contexts[i]
            inp = scheduler.scale_model_input(x, t, state)
            both = pipe.unet(torch.cat([inp, inp]), t, torch.cat([uncond, cond])) * unet_scale
            eps_u, eps_c = both.chunk(2)
            out = scheduler.step(eps_u + SCALE * (eps_c - eps_u), t, x, state, generator=g)
            x, state = out.prev_sample, out.state
    return x


def embed(pipe, text):
    with torch.inference_mode():
        return encode_text(pipe.text_encoder, pipe.tokenizer, [text])


def call(pipe, prompt="a red circle", **kwargs):
    return pipe(prompt, num_inference_steps=STEPS, guidance_scale=SCALE, output_type="latent",
                generator=torch.Generator().manual_seed(0), **kwargs).images


def scale_output(factor):
    """A toy model piece: the inner model's prediction times ``factor``."""
    def piece(model):
        return lambda x, call: model(x, call) * factor
    return piece


class ScaledUNet(StableDiffusionPipeline):
    """A new feature as a piece: the UNet's output scaled by 0.5 inside the guidance."""

    def prepare_start(self, run, options):
        start = super().prepare_start(run, options)
        return dataclasses.replace(start, pieces=start.pieces + (scale_output(0.5),))


@dataclasses.dataclass(frozen=True)
class SwitchAt:
    """A toy per-step conditioning: ``first`` for calls before ``index``, then ``second``."""

    first: sdkit.pipelines.PromptEmbeds
    second: sdkit.pipelines.PromptEmbeds
    index: int

    def at(self, i):
        return self.first if i < self.index else self.second


class SwitchingPrompt(StableDiffusionPipeline):
    """A prompt that changes at call 2: 'a red circle', then 'a blue square'."""

    def prepare_conditioning(self, run, options):
        first = super().prepare_conditioning(run, options)
        second = super().prepare_conditioning(run, dataclasses.replace(options, prompt="a blue square"))
        return SwitchAt(first, second, 2)


@pytest.mark.parametrize("name", ["DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_a_model_piece_changes_the_run_exactly_as_written_by_hand(pipe, name):
    scheduler = getattr(sch, name).from_config(pipe.scheduler.config)
    empty, red = embed(pipe, ""), embed(pipe, "a red circle")
    scaled = ScaledUNet.from_pipe(pipe, scheduler=scheduler)
    got = call(scaled)
    assert torch.equal(got, by_hand(pipe, scaled.scheduler, [(empty, red)] * STEPS, unet_scale=0.5))
    plain = StableDiffusionPipeline.from_pipe(pipe, scheduler=scheduler)
    assert torch.equal(call(plain), by_hand(pipe, plain.scheduler, [(empty, red)] * STEPS))
    assert not torch.equal(got, call(plain))


def test_a_conditioning_that_switches_at_a_step(pipe):
    scheduler = sch.DDIMScheduler.from_config(pipe.scheduler.config)
    empty, red, blue = embed(pipe, ""), embed(pipe, "a red circle"), embed(pipe, "a blue square")
    switching = SwitchingPrompt.from_pipe(pipe, scheduler=scheduler)
    expected = by_hand(pipe, switching.scheduler, [(empty, red)] * 2 + [(empty, blue)] * 2)
    assert torch.equal(call(switching), expected)
    assert not torch.equal(expected, by_hand(pipe, switching.scheduler, [(empty, red)] * STEPS))


def test_pieces_see_each_model_call_in_order(pipe):
    """The loop makes one model call per scheduler timestep; a piece sees its index and timestep."""
    seen = []

    def record(model):
        def wrapped(x, call):
            seen.append((call.index, int(call.timestep), x.shape[0], call.context.shape[0]))
            return model(x, call)
        return wrapped

    class Recording(StableDiffusionPipeline):
        def prepare_start(self, run, options):
            start = super().prepare_start(run, options)
            return dataclasses.replace(start, pieces=(record,))

    pndm = sch.PNDMScheduler.from_config(pipe.scheduler.config, skip_prk_steps=False)  # 4 calls per RK step
    call(Recording.from_pipe(pipe, scheduler=pndm))
    timesteps = pndm.set_timesteps(STEPS).timesteps
    assert [s[:2] for s in seen] == [(i, int(t)) for i, t in enumerate(timesteps)] and len(seen) == 13
    assert {s[2:] for s in seen} == {(2, 2)}  # inside the guidance: the [uncond; cond] batch


def test_no_signature_inspection_in_the_loop():
    """Every scheduler takes one step signature; pipelines pass options, they do not inspect methods."""
    pipelines = pathlib.Path(sdkit.__file__).parent / "pipelines"
    for path in pipelines.glob("*.py"):
        assert "inspect" not in path.read_text(), path.name
