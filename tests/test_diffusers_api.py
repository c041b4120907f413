"""The reference's (diffusers 0.42.1) loading keywords, names, object shapes and call arguments on sdkit.

Each behaviour is checked against diffusers itself where it has one to compare with; the snippets
as users write them are in test_diffusers_snippets.py.
"""

import huggingface_hub
import numpy as np
import pytest
import torch

import sdkit
from sdkit import StableDiffusionPipeline
from sdkit.models import AutoencoderKL, UNet2DConditionModel

TINY = sdkit.TINY_MODEL


@pytest.fixture(scope="module")
def pipe():
    p = StableDiffusionPipeline.from_pretrained(TINY)
    p.set_progress_bar_config(disable=True)
    return p


def images(p, **kw):
    return p("a red circle", num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np",
             **kw).images


# ------------------------------------------------------------------ (1) loading keywords
def test_reference_loading_keywords_are_taken(pipe):
    loaded = StableDiffusionPipeline.from_pretrained(
        TINY, use_safetensors=True, safety_checker=None, requires_safety_checker=False, feature_extractor=None,
        low_cpu_mem_usage=True, local_files_only=True, torch_dtype=torch.float32, variant=None)
    loaded.set_progress_bar_config(disable=True)
    assert (images(loaded) == images(pipe)).all()
    assert not hasattr(loaded, "safety_checker")


def test_download_keywords_reach_the_hub(monkeypatch, tmp_path):
    seen = []

    def snapshot_download(repo_id, **kwargs):
        seen.append((repo_id, kwargs))
        return TINY

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    StableDiffusionPipeline.from_pretrained("someone/tiny", revision="v1", cache_dir=str(tmp_path), token="hf_x",
                                            local_files_only=True)
    UNet2DConditionModel.from_pretrained("someone/tiny", subfolder="unet", revision="v1", token="hf_x")
    sdkit.schedulers.DDIMScheduler.from_pretrained("someone/tiny", subfolder="scheduler", revision="v1",
                                                   cache_dir=str(tmp_path), token="hf_x")
    assert len(seen) == 3
    for repo, kwargs in seen:
        assert repo == "someone/tiny" and kwargs["revision"] == "v1" and kwargs["token"] == "hf_x"
    assert seen[0][1]["cache_dir"] == seen[2][1]["cache_dir"] == str(tmp_path)


def test_constructor_takes_the_no_safety_checker_forms(pipe):
    built = StableDiffusionPipeline(**pipe.components, safety_checker=None, feature_extractor=None,
                                    requires_safety_checker=False)
    assert built.unet is pipe.unet


@pytest.mark.parametrize("keyword,value", [("safety_checker", object()), ("feature_extractor", "x"),
                                           ("requires_safety_checker", True)])
def test_a_safety_checker_is_refused_clearly(pipe, keyword, value):
    with pytest.raises(ValueError, match=f"no safety checker.*{keyword}="):
        StableDiffusionPipeline.from_pretrained(TINY, **{keyword: value})
    with pytest.raises(ValueError, match="no safety checker"):
        StableDiffusionPipeline(**pipe.components, **{keyword: value})


def test_other_loading_keywords_stay_errors():
    with pytest.raises(ValueError, match="use_safetensors=False asks for pickle weights"):
        StableDiffusionPipeline.from_pretrained(TINY, use_safetensors=False)
    with pytest.raises(TypeError, match="unknown arguments \\['force_download'\\]"):
        StableDiffusionPipeline.from_pretrained(TINY, force_download=True)
    with pytest.raises(ValueError, match="low_cpu_mem_usage must be True, False or None"):
        AutoencoderKL.from_pretrained(TINY, subfolder="vae", low_cpu_mem_usage="yes")


def test_models_take_the_loading_keywords(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(TINY, subfolder="unet", use_safetensors=True, low_cpu_mem_usage=False)
    assert unet.config.in_channels == 4
    with pytest.raises(ValueError, match="allow_pickle=True"):
        AutoencoderKL.from_pretrained(TINY, subfolder="vae", use_safetensors=False)
    vae = AutoencoderKL.from_pretrained(TINY, subfolder="vae")  # pickles only where asked for and allowed
    torch.save(vae.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(open(TINY + "/vae/config.json").read())
    loaded = AutoencoderKL.from_pretrained(tmp_path, use_safetensors=False, allow_pickle=True)
    assert torch.equal(loaded.decoder.conv_out.weight, vae.decoder.conv_out.weight)


# ------------------------------------------------------------------ (2) names
@pytest.fixture(scope="module")
def inpaint_folder(tmp_path_factory):
    from helpers import build_reference_pipeline

    return build_reference_pipeline(tmp_path_factory.mktemp("inpaint"), kind="inpaint")


def test_every_scheduler_is_importable_from_sdkit():
    names = [n for n in sdkit.schedulers.__all__ if n.endswith("Scheduler")]
    assert len(names) > 20
    for name in names + ["AysSchedules"]:
        assert getattr(sdkit, name) is getattr(sdkit.schedulers, name), name
    from sdkit import DPMSolverMultistepScheduler, EulerAncestralDiscreteScheduler  # noqa: F401
    with pytest.raises(AttributeError):
        sdkit.NoSuchScheduler


def test_reference_pipeline_names_are_sdkit_classes():
    from sdkit import (Img2ImgPipeline, InpaintPipeline, StableDiffusionImg2ImgPipeline,
                       StableDiffusionInpaintPipeline)

    assert StableDiffusionImg2ImgPipeline is Img2ImgPipeline and StableDiffusionInpaintPipeline is InpaintPipeline
    assert StableDiffusionImg2ImgPipeline.reference_class_name == "StableDiffusionImg2ImgPipeline"


def test_diffusion_pipeline_loads_the_class_model_index_names(inpaint_folder):
    import diffusers

    for folder in (TINY, inpaint_folder):
        ref = type(diffusers.DiffusionPipeline.from_pretrained(folder, safety_checker=None))
        mine = sdkit.DiffusionPipeline.from_pretrained(folder, safety_checker=None, use_safetensors=True)
        assert type(mine).reference_class_name == ref.__name__
        assert mine.unet.config.in_channels == (9 if folder == inpaint_folder else 4)


def test_diffusion_pipeline_refuses_a_class_sdkit_lacks(tmp_path):
    import json
    import shutil

    shutil.copytree(TINY, tmp_path / "m")
    index = json.loads((tmp_path / "m" / "model_index.json").read_text())
    (tmp_path / "m" / "model_index.json").write_text(json.dumps({**index, "_class_name": "StableDiffusionXLPipeline"}))
    with pytest.raises(ValueError, match="'StableDiffusionXLPipeline', which sdkit does not have"):
        sdkit.DiffusionPipeline.from_pretrained(tmp_path / "m")


@pytest.mark.parametrize("task", ["Text2Image", "Image2Image", "Inpainting"])
def test_auto_pipelines_choose_the_reference_class(pipe, task):
    import diffusers

    ours_auto, ref_auto = getattr(sdkit, f"AutoPipelineFor{task}"), getattr(diffusers, f"AutoPipelineFor{task}")
    ref = ref_auto.from_pretrained(TINY, safety_checker=None)
    mine = ours_auto.from_pretrained(TINY, safety_checker=None, torch_dtype=torch.float32)
    assert type(mine).reference_class_name == type(ref).__name__
    assert type(ours_auto.from_pipe(pipe)).reference_class_name == type(ref_auto.from_pipe(ref)).__name__
    shared = ours_auto.from_pipe(pipe, requires_safety_checker=False)
    assert shared.unet is pipe.unet and shared.vae is pipe.vae
    with pytest.raises(TypeError, match="from_pretrained"):
        ours_auto()


# ------------------------------------------------------------------ (3) object shapes
def test_image_processor_converts_as_the_reference():
    import numpy as np
    from diffusers.image_processor import VaeImageProcessor
    from helpers import sample_image

    ref, mine = VaeImageProcessor(vae_scale_factor=8), StableDiffusionPipeline.from_pretrained(TINY).image_processor
    image = sample_image(70)  # not a multiple of 8: rounded down to 64
    for kw in ({}, {"height": 48, "width": 32}):
        expected = ref.preprocess(image, **kw)
        got = mine.preprocess(image, **kw)
        assert got.shape == expected.shape and (got - expected).abs().max() <= 1e-6
    x = torch.rand(2, 3, 16, 16) * 2.2 - 1.1
    assert (mine.preprocess(x) == ref.preprocess(x)).all()  # already in [-1, 1]
    for output_type in ("np", "pt"):
        assert np.allclose(np.asarray(mine.postprocess(x, output_type)), np.asarray(ref.postprocess(x, output_type)),
                           atol=1e-6)
    pils = [np.asarray(a) for a in mine.postprocess(x)]
    assert all((a == np.asarray(b)).all() for a, b in zip(pils, ref.postprocess(x)))
    flags = [True, False]
    assert torch.allclose(mine.postprocess(x, "pt", flags), ref.postprocess(x, "pt", flags))
    arr = np.random.default_rng(0).random((2, 8, 8, 3)).astype(np.float32)
    assert all((np.asarray(a) == np.asarray(b)).all() for a, b in zip(mine.numpy_to_pil(arr), ref.numpy_to_pil(arr)))
    assert (mine.pil_to_numpy(image) == ref.pil_to_numpy(image)).all()


def test_output_has_no_nsfw_flags_and_the_progress_bar_follows_its_config(pipe, capsys):
    out = pipe("a red circle", num_inference_steps=2, output_type="latent")
    assert out.nsfw_content_detected is None
    assert list(pipe.progress_bar(range(3))) == [0, 1, 2]
    with pipe.progress_bar(total=2) as bar:
        bar.update(2)
    assert capsys.readouterr().err == ""  # disable=True from set_progress_bar_config
    with pytest.raises(ValueError, match="iterable or a total"):
        pipe.progress_bar()


# ------------------------------------------------------------------ (5) call arguments
@pytest.fixture(scope="module")
def bundled(tmp_path_factory):
    """The bundled model without its recommended_settings.json (so a call's defaults are the reference's)."""
    from helpers import bundled_for_the_reference

    return bundled_for_the_reference(tmp_path_factory.mktemp("bundled") / "tiny-shapes")


@pytest.fixture(scope="module")
def pair(bundled):
    """(reference, sdkit) pipelines of the bundled model."""
    import diffusers

    ref = diffusers.StableDiffusionPipeline.from_pretrained(bundled, safety_checker=None)
    ref.set_progress_bar_config(disable=True)
    mine = StableDiffusionPipeline.from_pretrained(bundled)
    mine.set_progress_bar_config(disable=True)
    return ref, mine


def test_the_bundled_model_s_recommended_settings_are_the_only_difference(pair):
    """With recommended_settings.json, a call that passes no guidance is the reference's call at those
    settings, its guidance end done by diffusers' documented dynamic-guidance callback."""
    import json
    import math

    from helpers import drop_guidance_after

    ref, _ = pair
    mine = StableDiffusionPipeline.from_pretrained(TINY)
    mine.set_progress_bar_config(disable=True)
    settings = json.loads(open(TINY + "/recommended_settings.json").read())
    steps = 5
    guided = math.ceil(settings["guidance_end"] * steps)
    assert 0 < guided < steps

    expected = ref("a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                   output_type="np", guidance_scale=settings["guidance_scale"],
                   guidance_rescale=settings["guidance_rescale"], callback_on_step_end=drop_guidance_after(guided),
                   callback_on_step_end_tensor_inputs=["prompt_embeds"]).images
    got = mine("a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
               output_type="np").images
    close(expected, got)
    every_step = mine("a red circle", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                      output_type="np", guidance_end=1.0).images
    assert np.abs(every_step - got).max() > 1e-2  # the guidance end made a difference


def both(pair, scheduler=None, **kw):
    """The same call on both pipelines (with ``scheduler``, a class name, swapped in for it): np images of each."""
    import diffusers

    out = []
    for p in pair:
        library = diffusers if type(p).__module__.startswith("diffusers") else sdkit
        sch = getattr(library, scheduler).from_config(p.scheduler.config) if scheduler else p.scheduler
        args = {"num_inference_steps": 4, "output_type": "np", "scheduler": sch, **kw}
        if library is diffusers:  # the reference takes no per-call scheduler: swap it in and back
            p.scheduler, original = args.pop("scheduler"), p.scheduler
        try:
            out.append(p("a red circle", generator=torch.Generator().manual_seed(0), **args).images)
        finally:
            if library is diffusers:
                p.scheduler = original
    return out


def close(a, b, tol=2 / 255):
    import numpy as np

    assert a.shape == b.shape and float(np.abs(np.asarray(a) - np.asarray(b)).max()) <= tol


def recorder(log, edit=None):
    def on_step_end(pipe, step, timestep, callback_kwargs):
        log.append((step, int(timestep), callback_kwargs["latents"].clone()))
        return edit(pipe, step, callback_kwargs) if edit else callback_kwargs

    return on_step_end


def test_step_end_callback_sees_and_replaces_latents_as_in_the_reference(pair):
    def halve(pipe, step, kwargs):
        return {"latents": kwargs["latents"] * 0.5} if step == 1 else kwargs

    logs = ([], [])
    images = [both((p,), callback_on_step_end=recorder(log, halve), callback_on_step_end_tensor_inputs=["latents"])[0]
              for p, log in zip(pair, logs)]
    close(*images)
    assert abs(images[1] - both(pair[1:])[0]).max() > 0.05
    assert [s for s, _, _ in logs[0]] == [s for s, _, _ in logs[1]] == [0, 1, 2, 3]
    assert [t for _, t, _ in logs[0]] == [t for _, t, _ in logs[1]]
    for (_, _, a), (_, _, b) in zip(*logs):
        assert (a - b).abs().max() < 1e-4


def test_dynamic_guidance_callback_from_the_reference_docs(pair):
    """The reference docs' example: guidance off after 40 % of the steps (scale 0, cond embeddings only)."""
    def stop_guidance(pipe, step, timestep, callback_kwargs):
        if step == int(pipe.num_timesteps * 0.4):
            callback_kwargs["prompt_embeds"] = callback_kwargs["prompt_embeds"].chunk(2)[-1]
            pipe._guidance_scale = 0.0
        return callback_kwargs

    images = both(pair, callback_on_step_end=stop_guidance, callback_on_step_end_tensor_inputs=["prompt_embeds"],
                  num_inference_steps=5)
    close(*images)
    assert abs(images[1] - both(pair[1:], num_inference_steps=5)[0]).max() > 0.05  # the callback changed the run


def test_interrupt_stops_only_its_own_call(pair):
    import threading

    ref, mine = pair

    def interrupt(pipe, step, timestep, callback_kwargs):
        if step == 1:
            pipe._interrupt = True
        return callback_kwargs

    stopped = both(pair, callback_on_step_end=interrupt)
    close(*stopped)
    full = both((mine,))[0]
    assert abs(stopped[1] - full).max() > 0.05
    results = {}

    def run(name, **kw):
        results[name] = mine("a red circle", num_inference_steps=4, output_type="np",
                             generator=torch.Generator().manual_seed(0), **kw)

    threads = [threading.Thread(target=run, args=("stopped",), kwargs={"callback_on_step_end": interrupt}),
               threading.Thread(target=run, args=("full",))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results["stopped"].interrupted and not results["full"].interrupted
    assert (results["full"].images == full).all()
    with pytest.raises(AttributeError, match="only during a call"):
        mine._interrupt


def test_old_callback_every_callback_steps_as_the_reference(bundled):
    import diffusers

    logs = ([], [])
    for cls, log in zip((diffusers.StableDiffusionPipeline, StableDiffusionPipeline), logs):
        p = cls.from_pretrained(bundled, safety_checker=None)
        p.set_progress_bar_config(disable=True)
        with __import__("warnings").catch_warnings():
            __import__("warnings").simplefilter("ignore", FutureWarning)
            p("a circle", num_inference_steps=5, output_type="latent", callback_steps=2,
              callback=lambda i, t, latents, log=log: log.append((i, int(t), latents.clone())))
    assert [x[:2] for x in logs[0]] == [x[:2] for x in logs[1]] and len(logs[0]) == 3


def test_return_dict_false_gives_the_reference_tuple(pair):
    ref, mine = pair
    images, nsfw = mine("a circle", num_inference_steps=2, output_type="np", return_dict=False)
    ref_images, ref_nsfw = ref("a circle", num_inference_steps=2, output_type="np", return_dict=False)
    assert nsfw is None is ref_nsfw and images.shape == ref_images.shape


@pytest.mark.parametrize("kind", ["timesteps", "sigmas"])
def test_custom_schedules_in_a_call_give_the_reference_pixels(pair, kind):
    values = sdkit.AysSchedules["StableDiffusion" + kind.capitalize()]
    images = both(pair, scheduler="EulerDiscreteScheduler", **{kind: values})  # num_inference_steps is ignored
    close(*images)
    assert abs(images[1] - both(pair[1:], scheduler="EulerDiscreteScheduler")[0]).max() > 0.02


def test_call_argument_errors_are_clear(pipe):
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs \\['mask'\\] are not offered"):
        pipe("a circle", callback_on_step_end=lambda *a: a[-1], callback_on_step_end_tensor_inputs=["mask"])
    with pytest.raises(ValueError, match="DDIMScheduler takes no custom timesteps"):
        pipe("a circle", timesteps=[999, 500])
    with pytest.raises(ValueError, match="callback_steps must be an integer >= 1"):
        pipe("a circle", callback_steps=0)
    with pytest.raises(TypeError, match="return the callback_kwargs dict"):
        pipe("a circle", num_inference_steps=1, callback_on_step_end=lambda *a: None)


def test_outdated_scheduler_configs_are_fixed_as_the_reference_constructors_do(pipe):
    """The reference's SD pipelines set steps_offset=1 and clip_sample=False on the scheduler they are given."""
    import diffusers

    config = {**dict(pipe.scheduler.config), "steps_offset": 0, "clip_sample": True}
    ref = diffusers.StableDiffusionPipeline(**{**pipe.components, "scheduler": diffusers.DDIMScheduler.from_config(
        config)}, safety_checker=None, feature_extractor=None, requires_safety_checker=False).scheduler
    with pytest.warns(UserWarning, match="steps_offset=0 -> 1, clip_sample=True -> False"):
        mine = StableDiffusionPipeline(**{**pipe.components,
                                          "scheduler": sdkit.DDIMScheduler.from_config(config)}).scheduler
    assert (mine.config.steps_offset, mine.config.clip_sample) == (ref.config.steps_offset, ref.config.clip_sample) \
        == (1, False)
