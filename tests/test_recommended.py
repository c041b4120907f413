"""A model folder's recommended settings (recommended_settings.json) and the scheduler-swap warning."""

import dataclasses
import json
import shutil
import threading
import warnings

import numpy as np
import pytest
import torch

import sdkit.schedulers as sch
from helpers import build_reference_pipeline, one_torch_thread
from sdkit import Img2ImgPipeline, StableDiffusionPipeline
from sdkit.pipelines import recommended
from sdkit.schedulers import base as scheduler_base

PROMPT = "a red circle on a white background"
SETTINGS = {"guidance_scale": 3.0, "guidance_rescale": 0.7, "num_inference_steps": 7,
            "scheduler": "EulerAncestralDiscreteScheduler"}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_reference_pipeline(str(tmp_path_factory.mktemp("sd2")), "sd2")


@pytest.fixture(scope="module")
def with_file(folder, tmp_path_factory):
    target = tmp_path_factory.mktemp("with-settings") / "model"
    shutil.copytree(folder, target)
    (target / recommended.FILE).write_text(json.dumps(SETTINGS))
    return target


def load(path, **kwargs):
    pipe = StableDiffusionPipeline.from_pretrained(path, **kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def ours(pipe, **kwargs):
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def reference(path, scheduler_class=None, **kwargs):
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(path, safety_checker=None)
    if scheduler_class:
        pipe.scheduler = getattr(diffusers, scheduler_class).from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe(PROMPT, generator=torch.Generator().manual_seed(0), output_type="np", **kwargs).images


def test_without_the_file_a_call_keeps_the_reference_defaults(folder):
    pipe = load(folder)
    assert pipe.recommended == recommended.RecommendedSettings()
    image = ours(pipe)  # no guidance_scale, no num_inference_steps: 7.5 and 50, as diffusers
    assert np.abs(image - reference(folder)).max() <= 1e-4
    assert np.array_equal(image, ours(pipe, guidance_scale=7.5, num_inference_steps=50, guidance_rescale=0.0))


def test_a_call_uses_the_folder_s_settings_and_a_passed_value_wins(with_file):
    pipe = load(with_file)
    assert pipe.recommended == recommended.RecommendedSettings(**SETTINGS)
    assert type(pipe.scheduler) is sch.EulerAncestralDiscreteScheduler  # on the folder's config
    assert pipe.scheduler.config["prediction_type"] == "v_prediction"
    expected = reference(with_file, "EulerAncestralDiscreteScheduler", guidance_scale=3.0, guidance_rescale=0.7,
                         num_inference_steps=7)
    assert np.abs(ours(pipe) - expected).max() <= 1e-4
    passed = reference(with_file, "EulerAncestralDiscreteScheduler", guidance_scale=5.0, guidance_rescale=0.7,
                       num_inference_steps=7)
    assert np.abs(ours(pipe, guidance_scale=5.0) - passed).max() <= 1e-4
    assert np.abs(ours(pipe, guidance_scale=5.0) - expected).max() > 1e-3  # the passed value made a difference
    off = ours(pipe, guidance_rescale=0.0, num_inference_steps=4)
    assert np.abs(off - reference(with_file, "EulerAncestralDiscreteScheduler", guidance_scale=3.0,
                                  num_inference_steps=4)).max() <= 1e-4


def test_a_recommended_guidance_end_is_the_call_default_and_a_passed_one_wins(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    (target / recommended.FILE).write_text(json.dumps({"guidance_end": 0.5, "num_inference_steps": 6}))
    pipe, plain = load(target), load(folder)
    assert pipe.recommended.guidance_end == 0.5
    image = ours(pipe)
    assert np.array_equal(image, ours(plain, guidance_end=0.5, num_inference_steps=6))
    assert np.abs(image - ours(plain, num_inference_steps=6)).max() > 1e-2  # guidance did stop half-way
    every_step = ours(pipe, guidance_end=1.0)  # the passed value wins: the reference's call
    assert np.abs(every_step - reference(folder, num_inference_steps=6)).max() <= 1e-4


def test_an_a1111_sampler_name_gives_a1111_sampling(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    (target / recommended.FILE).write_text(json.dumps({"scheduler": "Euler a"}))
    pipe = load(target)
    assert type(pipe.scheduler) is sch.KEulerAncestralScheduler
    assert pipe.scheduler.config["prediction_type"] == "v_prediction"


def test_a_scheduler_passed_to_from_pretrained_wins(with_file):
    pipe = load(with_file, scheduler=sch.DDIMScheduler.from_pretrained(with_file, subfolder="scheduler"))
    assert type(pipe.scheduler) is sch.DDIMScheduler and pipe.recommended.guidance_scale == 3.0


def test_settings_are_saved_carried_by_from_pipe_and_frozen(with_file, tmp_path):
    pipe = load(with_file)
    pipe.save_pretrained(tmp_path / "saved")
    assert json.loads((tmp_path / "saved" / recommended.FILE).read_text()) == SETTINGS
    assert load(tmp_path / "saved").recommended == pipe.recommended
    assert Img2ImgPipeline.from_pipe(pipe).recommended == pipe.recommended
    assert Img2ImgPipeline(**pipe.components).recommended == recommended.RecommendedSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        pipe.recommended.guidance_scale = 9.0
    plain = load(tmp_path / "saved", scheduler=pipe.scheduler)
    plain.recommended = recommended.RecommendedSettings()
    plain.save_pretrained(tmp_path / "none")
    assert not (tmp_path / "none" / recommended.FILE).exists()


def test_concurrent_calls_with_and_without_settings_equal_their_serial_runs(with_file):
    pipe = load(with_file)
    calls = [{}, {"guidance_scale": 6.0}, {"num_inference_steps": 3}, {}]
    serial = [ours(pipe, **kw) for kw in calls]
    results = [None] * len(calls)

    def work(i):
        results[i] = ours(pipe, **calls[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(np.array_equal(a, b) for a, b in zip(serial, results))
    assert pipe.recommended == recommended.RecommendedSettings(**SETTINGS)


@pytest.mark.parametrize("content, match", [
    ("{not json", "not valid JSON"),
    ("[3.0]", "JSON object"),
    ('{"guidance_scale": "high"}', "guidance_scale must be a finite number"),
    ('{"guidance_rescale": 1.5}', r"guidance_rescale must be a number in \[0, 1\]"),
    ('{"num_inference_steps": 0}', "num_inference_steps must be an integer >= 1"),
    ('{"guidance_end": 1.5}', r"guidance_end must be a number in \[0, 1\]"),
    ('{"scheduler": "Heun++"}', "Unknown sampler name 'Heun\\+\\+'"),
])
def test_a_bad_file_is_one_clear_error_naming_it(folder, tmp_path, content, match):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    (target / recommended.FILE).write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        StableDiffusionPipeline.from_pretrained(target)
    assert recommended.FILE in str(info.value) and "\n" not in str(info.value)


def test_unknown_keys_warn_and_are_ignored(folder, tmp_path):
    target = tmp_path / "model"
    shutil.copytree(folder, target)
    (target / recommended.FILE).write_text('{"guidance_scale": 2.0, "sharpness": 9}')
    with pytest.warns(UserWarning, match="unknown keys \\['sharpness'\\]"):
        pipe = StableDiffusionPipeline.from_pretrained(target)
    assert pipe.recommended.guidance_scale == 2.0


def test_diffusers_loads_a_folder_with_the_file(with_file):
    image = reference(with_file, num_inference_steps=3)
    assert image.shape == (1, 64, 64, 3)


# -- the warning when a swapped-in scheduler drops the model's schedule ------------------------------

ZERO_SNR = {**sch.DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction",
                                rescale_betas_zero_snr=True, timestep_spacing="trailing").config}


@pytest.mark.parametrize("cls", [sch.PNDMScheduler, sch.LMSDiscreteScheduler])
def test_dropping_zero_snr_warns_once_naming_the_key(cls, monkeypatch):
    monkeypatch.setattr(scheduler_base, "_warned_dropped", set())
    with pytest.warns(UserWarning, match=f"{cls.__name__} has no 'rescale_betas_zero_snr'.*DDIMScheduler") as record:
        cls.from_config(ZERO_SNR)
        cls.from_config(ZERO_SNR)
    assert len([w for w in record if "rescale_betas_zero_snr" in str(w.message)]) == 1


@pytest.mark.parametrize("name", ["DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler",
                                  "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"])
def test_classes_that_keep_zero_snr_do_not_warn(name, monkeypatch):
    monkeypatch.setattr(scheduler_base, "_warned_dropped", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        swapped = getattr(sch, name).from_config(ZERO_SNR)
    assert swapped.config["rescale_betas_zero_snr"] is True


def test_a_config_without_zero_snr_swaps_silently(monkeypatch):
    monkeypatch.setattr(scheduler_base, "_warned_dropped", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sch.PNDMScheduler.from_config({**ZERO_SNR, "rescale_betas_zero_snr": False})
        sch.LMSDiscreteScheduler.from_config({**ZERO_SNR, "rescale_betas_zero_snr": False})
