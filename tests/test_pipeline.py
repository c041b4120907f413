"""Pipeline behaviour: batch independence, threads, callbacks, outputs, input checks, loading."""

import copy
import json
import shutil
import warnings

import numpy as np
import pytest
import torch

import sdkit.schedulers as sch
from helpers import build_reference_pipeline, concurrently, one_torch_thread, sample_image, sample_mask
from sdkit import Img2ImgPipeline, InpaintPipeline, StableDiffusionPipeline

SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "PNDMScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler", "LMSDiscreteScheduler"]


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


def gen(seed):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_reference_pipeline(str(tmp_path_factory.mktemp("sd1")), "sd1")


@pytest.fixture(scope="module")
def pipe(folder):
    p = StableDiffusionPipeline.from_pretrained(folder)
    p.set_progress_bar_config(disable=True)
    return p


def scheduler(pipe, name, **overrides):
    return getattr(sch, name).from_config(pipe.scheduler.config, **overrides)


# -- reproducibility --------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SCHEDULERS)
def test_image_k_of_a_batch_equals_the_image_made_alone(pipe, name):
    s = scheduler(pipe, name)
    prompts = ["a red circle", "a blue square"]
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0, output_type="np", scheduler=s)
    batch = pipe(prompts, generator=[gen(10 + k) for k in range(2)], **kwargs).images
    for k, prompt in enumerate(prompts):
        alone = pipe(prompt, generator=gen(10 + k), **kwargs).images
        np.testing.assert_allclose(batch[k], alone[0], atol=1e-5, err_msg=f"image {k}")


def test_img2img_and_inpaint_batches_are_per_image_reproducible(pipe):
    s = scheduler(pipe, "EulerAncestralDiscreteScheduler")
    for p, extra in ((Img2ImgPipeline.from_pipe(pipe), dict(image=sample_image(), strength=0.7)),
                     (InpaintPipeline.from_pipe(pipe), dict(image=sample_image(), mask_image=sample_mask(),
                                                            strength=0.8))):
        kwargs = dict(num_inference_steps=4, output_type="np", scheduler=s, **extra)
        batch = p("a red circle", num_images_per_prompt=2, generator=[gen(1), gen(2)], **kwargs).images
        for k in range(2):
            alone = p("a red circle", generator=gen(k + 1), **kwargs).images
            np.testing.assert_allclose(batch[k], alone[0], atol=1e-5)


def with_memory_settings(pipe):
    """The pipeline on copies of its UNet and VAE, with attention slicing, VAE slicing and VAE tiling on
    (tiles of 32 pixels, smaller than the images, so every decode is tiled)."""
    pipe = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae))
    pipe.enable_attention_slicing("max")
    pipe.enable_vae_slicing()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tiles smaller than the VAE's sample_size: wanted here
        pipe.enable_vae_tiling(tile_sample_min_size=32)
    return pipe


@pytest.mark.parametrize("memory_settings", [False, True], ids=["plain", "sliced-and-tiled"])
def test_eight_threads_give_the_sequential_images(pipe, memory_settings):
    pipe = with_memory_settings(pipe) if memory_settings else StableDiffusionPipeline.from_pipe(pipe)
    pipe.scheduler = scheduler(pipe, "DDIMScheduler")  # set beforehand; some calls pass their own
    jobs = [dict(prompt=p, generator_seed=i, num_inference_steps=2 + i % 3,
                 scheduler=None if i % 2 else scheduler(pipe, SCHEDULERS[i % len(SCHEDULERS)]))
            for i, p in enumerate(["a red circle", "a blue square", "a green triangle", "a small yellow circle",
                                   "a large red square", "a triangle on the left", "a circle at the top",
                                   "a blue square on a white background"])]

    def run(job):
        return pipe(job["prompt"], generator=gen(job["generator_seed"]), num_inference_steps=job["num_inference_steps"],
                    scheduler=job["scheduler"], output_type="np").images

    expected = [run(job) for job in jobs]
    results = concurrently(lambda i: run(jobs[i]), len(jobs))
    for i, (a, b) in enumerate(zip(expected, results)):
        np.testing.assert_array_equal(a, b, err_msg=f"job {i}")


# -- call behaviour ---------------------------------------------------------------------------------

def test_output_types(pipe):
    def run(output_type):
        return pipe("a red circle", num_inference_steps=2, generator=gen(0), output_type=output_type).images

    pil, arr, pt, latents = run("pil"), run("np"), run("pt"), run("latent")
    assert len(pil) == 1 and pil[0].size == (64, 64) and pil[0].mode == "RGB"
    assert arr.shape == (1, 64, 64, 3) and arr.dtype == np.float32 and 0 <= arr.min() and arr.max() <= 1
    assert pt.shape == (1, 3, 64, 64)
    np.testing.assert_array_equal(pt.permute(0, 2, 3, 1).numpy(), arr)
    assert latents.shape == (1, 4, 8, 8)
    np.testing.assert_array_equal(np.asarray(pil[0]), (arr[0] * 255).round().astype(np.uint8))
    wide = pipe("a red circle", height=32, width=48, output_type="np", num_inference_steps=1).images
    assert wide.shape == (1, 32, 48, 3)


def test_guidance_batches_uncond_and_cond_together_and_skips_uncond_at_scale_1(pipe):
    sizes, s = [], scheduler(pipe, "DDIMScheduler")
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    try:
        pipe("a red circle", num_inference_steps=2, guidance_scale=7.5, output_type="latent", scheduler=s)
        pipe("a red circle", num_inference_steps=2, guidance_scale=1.0, output_type="latent", scheduler=s)
        pipe(["a", "b"], num_images_per_prompt=3, num_inference_steps=1, guidance_scale=2.0, output_type="latent",
             scheduler=s)
    finally:
        handle.remove()
    assert sizes == [2, 2, 1, 1, 12]


def test_callback_sees_every_step_and_can_stop_the_run(pipe):
    seen, pipe = [], StableDiffusionPipeline.from_pipe(pipe, scheduler=scheduler(pipe, "EulerDiscreteScheduler"))
    out = pipe("a red circle", num_inference_steps=4, output_type="latent",
               callback=lambda i, t, latents: seen.append((i, float(t), latents.shape)))
    assert [s[0] for s in seen] == [0, 1, 2, 3] and not out.interrupted
    assert seen[0][2] == (1, 4, 8, 8) and seen[0][1] > seen[-1][1]
    seen.clear()
    out = pipe("a red circle", num_inference_steps=4, output_type="np",
               callback=lambda i, t, latents: seen.append(i) or i < 1)
    assert seen == [0, 1] and out.interrupted and out.images.shape == (1, 64, 64, 3)


def test_progress_bar_can_be_switched_off(pipe, capsys, folder):
    loud = StableDiffusionPipeline.from_pipe(pipe)
    loud.set_progress_bar_config(disable=False)
    loud("a", num_inference_steps=2, output_type="latent")
    assert "100%" in capsys.readouterr().err
    pipe("a", num_inference_steps=2, output_type="latent")
    assert "100%" not in capsys.readouterr().err


def test_paste_back_keeps_pixels_outside_the_mask(pipe):
    image, mask = sample_image(seed=3), sample_mask()
    p = InpaintPipeline.from_pipe(pipe)
    out = p("a red circle", image=image, mask_image=mask, num_inference_steps=4, generator=gen(0),
            output_type="np").images[0]
    original = np.asarray(image, dtype=np.float32) / 255
    inside = np.asarray(mask) > 127
    np.testing.assert_allclose(out[~inside], original[~inside], atol=1e-6)
    assert np.abs(out[inside] - original[inside]).mean() > 0.02
    raw = p("a red circle", image=image, mask_image=mask, num_inference_steps=4, generator=gen(0),
            output_type="np", paste_back=False).images[0]
    assert np.abs(raw[~inside] - original[~inside]).max() > 1e-3  # the VAE round trip changes them
    # the feathered edge lies inside the mask: mask_blur only changes pixels there
    hard = p("a red circle", image=image, mask_image=mask, num_inference_steps=4, generator=gen(0),
             output_type="np", mask_blur=0).images[0]
    np.testing.assert_array_equal(hard[~inside], out[~inside])
    np.testing.assert_allclose(hard[inside], raw[inside], atol=1e-6)


def test_nan_guard_decodes_again_in_float32(pipe):
    vae = copy.deepcopy(pipe.vae)
    with torch.no_grad():
        vae.post_quant_conv.weight.mul_(3e4)  # overflows float16 (max 65504), fine in float32
    fp16 = StableDiffusionPipeline.from_pipe(pipe, vae=copy.deepcopy(vae).half())
    fp32 = StableDiffusionPipeline.from_pipe(pipe, vae=copy.deepcopy(fp16.vae).float())  # same rounded weights
    kwargs = dict(num_inference_steps=2, generator=gen(0), output_type="np")
    with pytest.warns(UserWarning, match="float32"):
        out = fp16("a red circle", **kwargs).images
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, fp32("a red circle", **dict(kwargs, generator=gen(0))).images, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per pipeline
        fp16("a red circle", **dict(kwargs, generator=gen(0)))


# -- input checks -----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(height=60), "multiple of 8"),
    (dict(width=12), "multiple of 8"),
    (dict(num_inference_steps=0), "num_inference_steps"),
    (dict(negative_prompt=["x", "y"]), "negative_prompt has 2 entries for 1"),
    (dict(generator=[torch.Generator(), torch.Generator()]), "2 generators for 1 images"),
    (dict(num_images_per_prompt=2, generator=[torch.Generator()]), "1 generators for 2 images"),
    (dict(output_type="jpeg"), "output_type"),
    (dict(prompt=3), "prompt must be"),
    (dict(latents=torch.zeros(1, 4, 4, 4)), "latents have shape"),
    (dict(guidance_rescale=1.5), r"guidance_rescale must be a number in \[0, 1\]"),
    (dict(guidance_rescale="0.7"), r"guidance_rescale must be a number in \[0, 1\]"),
])
def test_txt2img_input_checks(pipe, kwargs, match):
    kwargs = {"prompt": "a red circle", "num_inference_steps": 1, **kwargs}
    with pytest.raises(ValueError, match=match):
        pipe(**kwargs)


def test_long_prompts_warn_about_truncation_and_eta_without_ddim_warns(pipe):
    with pytest.warns(UserWarning, match="Prompt truncated"):
        pipe(" ".join(["a red circle"] * 10), num_inference_steps=1, output_type="latent")
    with pytest.warns(UserWarning, match="eta=0.5 is ignored"):
        pipe("a", num_inference_steps=1, output_type="latent", eta=0.5,
             scheduler=scheduler(pipe, "EulerDiscreteScheduler"))


def test_foreign_scheduler_is_refused(pipe):
    class NotOurs:
        config = {}
    with pytest.raises(TypeError, match="sdkit scheduler"):
        pipe("a", scheduler=NotOurs())


@pytest.mark.parametrize("strength", [-0.1, 1.5])
def test_strength_outside_0_1(pipe, strength):
    for p, extra in ((Img2ImgPipeline.from_pipe(pipe), {}), (InpaintPipeline.from_pipe(pipe), {"mask_image": sample_mask()})):
        with pytest.raises(ValueError, match=r"strength must be a number in \[0, 1\]"):
            p("a", image=sample_image(), strength=strength, num_inference_steps=2, **extra)


def test_strength_too_small_for_any_step(pipe):
    with pytest.raises(ValueError, match="0 denoising steps"):
        Img2ImgPipeline.from_pipe(pipe)("a", image=sample_image(), strength=0.1, num_inference_steps=5)


def test_mask_and_image_sizes_must_match(pipe):
    with pytest.raises(ValueError, match="mask_image is"):
        InpaintPipeline.from_pipe(pipe)("a", image=sample_image(64), mask_image=sample_mask(48, (0, 0, 8, 8)))


@pytest.mark.parametrize("image, match", [
    (np.zeros((64, 64, 2), dtype=np.float32), "cannot be read as RGB"),
    ("picture.png", "has type str"),
    (np.full((64, 64, 3), 2.0, dtype=np.float32), r"must be in \[0, 1\]"),
])
def test_image_that_is_not_rgb(pipe, image, match):
    with pytest.raises(ValueError, match=match):
        Img2ImgPipeline.from_pipe(pipe)("a", image=image, num_inference_steps=2)


def test_image_inputs_accepted_alike(pipe):
    p = Img2ImgPipeline.from_pipe(pipe)
    image = sample_image()
    array = np.array(image)  # a writable copy: torch.from_numpy warns on read-only arrays
    kwargs = dict(strength=0.5, num_inference_steps=2, output_type="np")
    a = p("a", image=image, generator=gen(0), **kwargs).images
    b = p("a", image=array.astype(np.float32) / 255, generator=gen(0), **kwargs).images
    c = p("a", image=torch.from_numpy(array).permute(2, 0, 1).float() / 255, generator=gen(0), **kwargs).images
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(a, c)
    rgba = p("a", image=image.convert("RGBA"), generator=gen(0), **kwargs).images
    np.testing.assert_array_equal(a, rgba)


# -- parts and loading ------------------------------------------------------------------------------

def test_pipelines_share_parts_without_copies(pipe):
    for other in (Img2ImgPipeline(**pipe.components), InpaintPipeline.from_pipe(pipe)):
        for name, part in pipe.components.items():
            assert getattr(other, name) is part
    ddim = type(scheduler(pipe, "DDIMScheduler")).from_config(pipe.scheduler.config, clip_sample=False)
    assert Img2ImgPipeline.from_pipe(pipe, scheduler=ddim).scheduler is ddim  # (clip_sample=True: the reference's fix)


def test_to_moves_and_casts(pipe):
    p = StableDiffusionPipeline.from_pipe(pipe, unet=copy.deepcopy(pipe.unet), vae=copy.deepcopy(pipe.vae),
                                          text_encoder=copy.deepcopy(pipe.text_encoder))
    assert p.to(torch.float64) is p and p.dtype == torch.float64 and p.vae.dtype == torch.float64
    out = p("a", num_inference_steps=1, output_type="latent").images
    assert out.dtype == torch.float64 and p.to("cpu").device.type == "cpu"


def _edit_index(folder, tmp_path, **changes):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    index = json.loads((target / "model_index.json").read_text())
    index.update(changes)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def test_unused_and_null_entries_are_skipped(folder, tmp_path):
    target = _edit_index(folder, tmp_path, safety_checker=["stable_diffusion", "StableDiffusionSafetyChecker"],
                         feature_extractor=["transformers", "CLIPImageProcessor"], image_encoder=[None, None],
                         requires_safety_checker=True)
    p = StableDiffusionPipeline.from_pretrained(target)
    assert set(p.components) == {"unet", "vae", "text_encoder", "tokenizer", "scheduler"}


def test_unknown_scheduler_lists_what_sdkit_has(folder, tmp_path):
    target = _edit_index(folder, tmp_path, scheduler=["diffusers", "UniPCMultistepScheduler"])
    with pytest.raises(ValueError, match="UniPCMultistepScheduler.*EulerDiscreteScheduler"):
        StableDiffusionPipeline.from_pretrained(target)
    ours = StableDiffusionPipeline.from_pretrained(target, scheduler=sch.DDIMScheduler())  # an override works
    assert isinstance(ours.scheduler, sch.DDIMScheduler)


def test_model_index_scheduler_becomes_the_sdkit_scheduler(folder, tmp_path):
    target = _edit_index(folder, tmp_path, scheduler=["diffusers", "EulerAncestralDiscreteScheduler"])
    p = StableDiffusionPipeline.from_pretrained(target)
    assert type(p.scheduler) is sch.EulerAncestralDiscreteScheduler
    assert p.scheduler.config["beta_schedule"] == "scaled_linear"


def test_missing_folder_and_offline_repo_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="model_index.json"):
        StableDiffusionPipeline.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="sdkit-tests/not-a-model.*hf download"):
        StableDiffusionPipeline.from_pretrained("sdkit-tests/not-a-model")


def test_repo_id_loads_from_the_hub_cache(folder, tmp_path, monkeypatch):
    """A repo id already in the huggingface_hub cache loads offline, without a download."""
    import huggingface_hub.constants

    revision = "0" * 40
    repo = tmp_path / "models--sdkit-tests--tiny"
    shutil.copytree(folder, repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    p = StableDiffusionPipeline.from_pretrained("sdkit-tests/tiny")
    assert p.unet.config.sample_size == 8
