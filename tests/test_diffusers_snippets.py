"""The drop-in promise: code written against the reference (diffusers 0.42.1) runs on sdkit with only
the import line changed, and gives the reference's pixels.

Each snippet below is in a form the reference's documentation uses (written for this file, with
few steps and tiny sizes). It runs twice: as written, on diffusers, and with every
``from diffusers...`` import turned into ``from sdkit...`` (lines marked ``#sdkit:`` are the one
line a hand-written loop adds). Both runs load the same folder: a tiny random SD 1 pipeline
(tests/helpers.py) and the bundled model (without recommended_settings.json, sdkit's own file,
which fills the options a call leaves out: test_diffusers_api.py shows that it is the only
difference). The images (``image`` at the snippet's end) must agree
within 2/255. Inpainting with a 4-channel UNet (the bundled model) is the exception: sdkit pastes
the original pixels back outside the mask by design, so there it must run and keep them; a
9-channel inpainting pipeline is compared pixel for pixel.

The scheduler swap matrix (every class from every class's config) is at the end.
"""

import re
import textwrap
import warnings

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch

import sdkit
from helpers import build_reference_pipeline, bundled_for_the_reference, one_torch_thread, sample_image, sample_mask

TOL = 2 / 255
WORST = {}


@pytest.fixture(scope="module", autouse=True)
def _single_thread():
    yield from one_torch_thread()


@pytest.fixture(scope="module", autouse=True)
def _report():
    yield
    if WORST:
        print(f"\nworst max abs pixel difference over {len(WORST)} snippet runs: {max(WORST.values()):.2e}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return {"tiny": str(build_reference_pipeline(tmp_path_factory.mktemp("sd1"), "sd1")),
            "inpaint": str(build_reference_pipeline(tmp_path_factory.mktemp("inpaint"), "inpaint", seed=3)),
            "bundled": bundled_for_the_reference(tmp_path_factory.mktemp("bundled") / "tiny-shapes")}


S = {}  # name -> (snippet, kind): kind "txt" (tiny and bundled), "inpaint" (9-channel and bundled)


def snippet(name, code, kind="txt"):
    S[name] = (textwrap.dedent(code).strip() + "\n", kind)


# ---------------------------------------------------------------- loading
snippet("from_pretrained", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, torch_dtype=torch.float32, use_safetensors=True)
    pipe = pipe.to("cpu")
    image = pipe("a red circle", num_inference_steps=3, generator=torch.Generator("cpu").manual_seed(0)).images[0]
""")
snippet("no_safety_checker", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, requires_safety_checker=False)
    image = pipe("a blue square", num_inference_steps=3, generator=torch.manual_seed(1)).images[0]
""")
snippet("feature_extractor_none", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL, safety_checker=None, feature_extractor=None,
                                                   low_cpu_mem_usage=True)
    image = pipe("a green triangle", num_inference_steps=3, generator=torch.manual_seed(2)).images[0]
""")
snippet("diffusion_pipeline", """
    import torch
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(MODEL, use_safetensors=True)
    image = pipeline("a yellow circle", num_inference_steps=3, generator=torch.manual_seed(3)).images[0]
""")
snippet("auto_text2image", """
    import torch
    from diffusers import AutoPipelineForText2Image

    pipeline = AutoPipelineForText2Image.from_pretrained(MODEL, torch_dtype=torch.float32, use_safetensors=True)
    image = pipeline("a red square on the left", num_inference_steps=3, generator=torch.manual_seed(4)).images[0]
""")
snippet("components_constructor", """
    import torch
    from diffusers import StableDiffusionPipeline

    base = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe = StableDiffusionPipeline(**base.components)
    image = pipe("a circle", num_inference_steps=3, generator=torch.manual_seed(5)).images[0]
""")
snippet("parts_from_subfolders", """
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", use_safetensors=True)
    scheduler = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, vae=vae, unet=unet, scheduler=scheduler)
    image = pipe("a red circle", num_inference_steps=3, generator=torch.manual_seed(6)).images[0]
""")
snippet("save_and_reload", """
    import torch
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.from_pretrained(MODEL).save_pretrained(TMP + "/saved")
    pipe = StableDiffusionPipeline.from_pretrained(TMP + "/saved")
    image = pipe("a blue circle", num_inference_steps=3, generator=torch.manual_seed(7)).images[0]
""")

# ---------------------------------------------------------------- call arguments
snippet("negative_prompt", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", negative_prompt="blurry", num_inference_steps=3,
                 generator=torch.manual_seed(8)).images[0]
""")
snippet("guidance_scale", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", guidance_scale=3.0, num_inference_steps=3, generator=torch.manual_seed(9)).images[0]
""")
snippet("no_guidance", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", guidance_scale=1.0, num_inference_steps=3, generator=torch.manual_seed(9)).images[0]
""")
snippet("images_per_prompt", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a green square", num_images_per_prompt=2, num_inference_steps=3,
                 generator=torch.manual_seed(10)).images
""")
snippet("generator_list", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    generator = [torch.Generator("cpu").manual_seed(i) for i in range(3)]
    prompts = ["a red circle", "a blue square", "a yellow triangle"]
    image = pipe(prompts, generator=generator, num_inference_steps=3).images
""")
snippet("size", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", height=48, width=64, num_inference_steps=3, generator=torch.manual_seed(11)).images[0]
""")
snippet("output_np", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", output_type="np", num_inference_steps=3, generator=torch.manual_seed(12)).images
""")
snippet("output_pt", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", output_type="pt", num_inference_steps=3, generator=torch.manual_seed(13)).images
""")
snippet("latents_then_decode", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    latents = pipe("a red circle", output_type="latent", num_inference_steps=3, generator=torch.manual_seed(14)).images
    with torch.no_grad():
        decoded = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False)[0]
    image = pipe.image_processor.postprocess(decoded, output_type="pil")[0]
""")
snippet("return_dict_false", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    images, has_nsfw = pipe("a red circle", num_inference_steps=3, generator=torch.manual_seed(15), return_dict=False)
    assert has_nsfw is None
    image = images[0]
""")
snippet("nsfw_flags", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    output = pipe("a red circle", num_inference_steps=3, generator=torch.manual_seed(16))
    assert output.nsfw_content_detected is None
    image = output.images[0]
""")
snippet("given_latents", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    generator = torch.Generator("cpu").manual_seed(17)
    shape = (1, pipe.unet.config.in_channels, 64 // pipe.vae_scale_factor, 64 // pipe.vae_scale_factor)
    latents = torch.randn(shape, generator=generator)
    image = pipe("a red circle", latents=latents, num_inference_steps=3).images[0]
""")
snippet("guidance_rescale", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", guidance_rescale=0.7, num_inference_steps=3, generator=torch.manual_seed(18)).images[0]
""")
snippet("prompt_embeds", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    tokens = pipe.tokenizer(["a red circle"], padding="max_length", max_length=pipe.tokenizer.model_max_length,
                            truncation=True, return_tensors="pt")
    with torch.no_grad():
        prompt_embeds = pipe.text_encoder(tokens.input_ids)[0]
    image = pipe(prompt_embeds=prompt_embeds, num_inference_steps=3, generator=torch.manual_seed(19)).images[0]
""")
# ---------------------------------------------------------------- schedulers
for _name in ("DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
              "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler"):
    snippet(f"swap_{_name}", f"""
        import torch
        from diffusers import {_name}, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(MODEL)
        pipe.scheduler = {_name}.from_config(pipe.scheduler.config)
        image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(21)).images[0]
    """)
snippet("karras_sigmas", """
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, use_karras_sigmas=True)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(22)).images[0]
""")
snippet("zero_snr_trailing", """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, rescale_betas_zero_snr=True,
                                               timestep_spacing="trailing")
    image = pipe("a red circle", guidance_rescale=0.7, num_inference_steps=4, generator=torch.manual_seed(23)).images[0]
""")
snippet("ddim_eta", """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red circle", eta=1.0, num_inference_steps=4, generator=torch.manual_seed(24)).images[0]
""")
snippet("scheduler_keyword", """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline

    scheduler = EulerDiscreteScheduler.from_pretrained(MODEL, subfolder="scheduler")
    pipe = StableDiffusionPipeline.from_pretrained(MODEL, scheduler=scheduler)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(25)).images[0]
""")
snippet("compatibles", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    euler = [c for c in pipe.scheduler.compatibles if c.__name__ == "EulerAncestralDiscreteScheduler"][0]
    pipe.scheduler = euler.from_config(pipe.scheduler.config)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(26)).images[0]
""")
snippet("config_attributes", """
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    kind = pipe.scheduler.config.prediction_type
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, prediction_type=kind)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(27)).images[0]
""")
snippet("ays_timesteps", """
    import torch
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline
    from diffusers.schedulers import AysSchedules

    sampling_schedule = AysSchedules["StableDiffusionTimesteps"]
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red circle", timesteps=sampling_schedule, generator=torch.manual_seed(28)).images[0]
""")
snippet("ays_sigmas", """
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionPipeline
    from diffusers.schedulers import AysSchedules

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red circle", sigmas=AysSchedules["StableDiffusionSigmas"], generator=torch.manual_seed(29)).images[0]
""")

# ---------------------------------------------------------------- callbacks
snippet("dynamic_cfg_callback", """
    import torch
    from diffusers import StableDiffusionPipeline

    def callback_dynamic_cfg(pipe, step_index, timestep, callback_kwargs):
        if step_index == int(pipe.num_timesteps * 0.4):
            prompt_embeds = callback_kwargs["prompt_embeds"]
            prompt_embeds = prompt_embeds.chunk(2)[-1]
            pipe._guidance_scale = 0.0
            callback_kwargs["prompt_embeds"] = prompt_embeds
        return callback_kwargs

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", num_inference_steps=5, generator=torch.manual_seed(30),
                 callback_on_step_end=callback_dynamic_cfg,
                 callback_on_step_end_tensor_inputs=["prompt_embeds"]).images[0]
""")
snippet("interrupt_callback", """
    import torch
    from diffusers import StableDiffusionPipeline

    def interrupt_callback(pipeline, i, t, callback_kwargs):
        if i == 2:
            pipeline._interrupt = True
        return callback_kwargs

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", num_inference_steps=5, generator=torch.manual_seed(31),
                 callback_on_step_end=interrupt_callback).images[0]
""")
snippet("latents_callback", """
    import torch
    from diffusers import StableDiffusionPipeline

    seen = []

    def decode_tensors(pipe, step, timestep, callback_kwargs):
        latents = callback_kwargs["latents"]
        seen.append(float(latents.abs().mean()))
        if step == 1:
            callback_kwargs["latents"] = latents * 0.8
        return callback_kwargs

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(32),
                 callback_on_step_end=decode_tensors, callback_on_step_end_tensor_inputs=["latents"]).images[0]
    record = len(seen)  # one per model call (PNDM repeats its first step): compared with the reference's
""")
snippet("old_callback", """
    import torch
    from diffusers import StableDiffusionPipeline

    steps = []
    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    image = pipe("a red circle", num_inference_steps=4, generator=torch.manual_seed(33),
                 callback=lambda step, timestep, latents: steps.append(step), callback_steps=2).images[0]
    record = steps  # compared with the reference's ([2, 4] with PNDM, whose first step makes two model calls)
""")
snippet("progress_bar_config", """
    import torch
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle", num_inference_steps=3, generator=torch.manual_seed(34)).images[0]
""")

# ---------------------------------------------------------------- image to image
snippet("img2img", """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL, safety_checker=None)
    image = pipe(prompt="a red circle", image=init_image, strength=0.75, guidance_scale=7.5,
                 num_inference_steps=4, generator=torch.manual_seed(35)).images[0]
""")
snippet("auto_img2img", """
    import torch
    from diffusers import AutoPipelineForImage2Image

    pipeline = AutoPipelineForImage2Image.from_pretrained(MODEL, torch_dtype=torch.float32, use_safetensors=True)
    image = pipeline("a blue square", image=init_image, strength=0.5, num_inference_steps=4,
                     generator=torch.manual_seed(36)).images[0]
""")
snippet("auto_img2img_from_pipe", """
    import torch
    from diffusers import AutoPipelineForImage2Image, AutoPipelineForText2Image

    text2image = AutoPipelineForText2Image.from_pretrained(MODEL)
    first = text2image("a red circle", num_inference_steps=3, generator=torch.manual_seed(37)).images[0]
    image2image = AutoPipelineForImage2Image.from_pipe(text2image)
    image = image2image("a red circle", image=first, strength=0.6, num_inference_steps=4,
                        generator=torch.manual_seed(38)).images[0]
""")
snippet("img2img_from_components", """
    import torch
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline

    text = StableDiffusionPipeline.from_pretrained(MODEL)
    pipe = StableDiffusionImg2ImgPipeline(**text.components)
    image = pipe("a red circle", image=init_image, strength=0.8, num_inference_steps=4,
                 generator=torch.manual_seed(39)).images[0]
""")
snippet("img2img_ddim", """
    import torch
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(MODEL)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    image = pipe("a red circle", image=init_image, strength=0.5, num_inference_steps=6,
                 generator=torch.manual_seed(40)).images[0]
""")

# ---------------------------------------------------------------- inpainting
snippet("inpaint", """
    import torch
    from diffusers import StableDiffusionInpaintPipeline

    pipe = StableDiffusionInpaintPipeline.from_pretrained(MODEL, safety_checker=None)
    image = pipe(prompt="a red circle", image=init_image, mask_image=mask_image, num_inference_steps=4,
                 generator=torch.manual_seed(41)).images[0]
""", kind="inpaint")
snippet("auto_inpaint", """
    import torch
    from diffusers import AutoPipelineForInpainting

    pipeline = AutoPipelineForInpainting.from_pretrained(MODEL, torch_dtype=torch.float32)
    image = pipeline("a blue circle", image=init_image, mask_image=mask_image, strength=0.8, num_inference_steps=5,
                     generator=torch.manual_seed(42)).images[0]
""", kind="inpaint")
snippet("auto_inpaint_from_pipe", """
    import torch
    from diffusers import AutoPipelineForInpainting, AutoPipelineForText2Image

    text2image = AutoPipelineForText2Image.from_pretrained(MODEL)
    pipeline = AutoPipelineForInpainting.from_pipe(text2image)
    image = pipeline("a green square", image=init_image, mask_image=mask_image, num_inference_steps=4,
                     generator=torch.manual_seed(43)).images[0]
""", kind="inpaint")

# ---------------------------------------------------------------- models and hand-written loops
snippet("vae_round_trip", """
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline

    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae")
    processor = StableDiffusionPipeline.from_pretrained(MODEL).image_processor
    x = processor.preprocess(init_image)
    with torch.no_grad():
        latents = vae.encode(x).latent_dist.sample(torch.manual_seed(44)) * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    image = processor.postprocess(decoded, output_type="np")
""")
snippet("unet_call", """
    import torch
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", use_safetensors=True)
    sample = torch.randn(1, unet.config.in_channels, unet.config.sample_size, unet.config.sample_size,
                         generator=torch.manual_seed(45))
    context = torch.randn(1, 4, unet.config.cross_attention_dim, generator=torch.manual_seed(46))
    with torch.no_grad():
        noise_pred = unet(sample, 500, encoder_hidden_states=context).sample
        (again,) = unet(sample, 500, context, return_dict=False)
    assert torch.equal(noise_pred, again)
    image = noise_pred
""")
snippet("denoising_loop", """
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel

    scheduler = DDPMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    #sdkit: scheduler = scheduler.stateful()
    model = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    scheduler.set_timesteps(5)
    sample_size = model.config.sample_size
    noise = torch.randn((1, 4, sample_size, sample_size), generator=torch.manual_seed(47))
    context = torch.zeros(1, 4, model.config.cross_attention_dim)
    input = noise
    for t in scheduler.timesteps:
        with torch.no_grad():
            noisy_residual = model(input, t, context).sample
        previous_noisy_sample = scheduler.step(noisy_residual, t, input, generator=torch.manual_seed(int(t))).prev_sample
        input = previous_noisy_sample
    image = input
""")
snippet("deconstructed_pipeline", """
    import torch
    from transformers import CLIPTextModel, CLIPTokenizer
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(MODEL, subfolder="vae", use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(MODEL, subfolder="tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(MODEL, subfolder="text_encoder", use_safetensors=True)
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet", use_safetensors=True)
    scheduler = EulerDiscreteScheduler.from_pretrained(MODEL, subfolder="scheduler")
    #sdkit: scheduler = scheduler.stateful()

    prompt = ["a red circle"]
    height = width = 64
    num_inference_steps = 4
    guidance_scale = 7.5
    generator = torch.manual_seed(48)
    batch_size = len(prompt)

    text_input = tokenizer(prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                           return_tensors="pt")
    with torch.no_grad():
        text_embeddings = text_encoder(text_input.input_ids)[0]
    max_length = text_input.input_ids.shape[-1]
    uncond_input = tokenizer([""] * batch_size, padding="max_length", max_length=max_length, return_tensors="pt")
    with torch.no_grad():
        uncond_embeddings = text_encoder(uncond_input.input_ids)[0]
    text_embeddings = torch.cat([uncond_embeddings, text_embeddings])

    latents = torch.randn((batch_size, unet.config.in_channels, height // 8, width // 8), generator=generator)
    scheduler.set_timesteps(num_inference_steps)
    latents = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        latent_model_input = torch.cat([latents] * 2)
        latent_model_input = scheduler.scale_model_input(latent_model_input, timestep=t)
        with torch.no_grad():
            noise_pred = unet(latent_model_input, t, encoder_hidden_states=text_embeddings).sample
        noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
        noise_pred = noise_pred_uncond + guidance_scale * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents).prev_sample

    latents = 1 / vae.config.scaling_factor * latents
    with torch.no_grad():
        image = vae.decode(latents).sample
    image = (image / 2 + 0.5).clamp(0, 1).squeeze()
    image = (image.permute(1, 2, 0) * 255).to(torch.uint8).cpu().numpy()
""")
snippet("img2img_loop_with_add_noise", """
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    scheduler = DDIMScheduler.from_pretrained(MODEL, subfolder="scheduler")
    #sdkit: scheduler = scheduler.stateful()
    unet = UNet2DConditionModel.from_pretrained(MODEL, subfolder="unet")
    context = torch.zeros(1, 4, unet.config.cross_attention_dim)
    clean = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(49)) * 0.5
    noise = torch.randn(1, 4, 8, 8, generator=torch.manual_seed(50))
    scheduler.set_timesteps(6)
    timesteps = scheduler.timesteps[3:]
    latents = scheduler.add_noise(clean, noise, timesteps[:1])
    for t in timesteps:
        with torch.no_grad():
            eps = unet(scheduler.scale_model_input(latents, t), t, context).sample
        latents = scheduler.step(eps, t, latents).prev_sample
    image = latents
""")

SNIPPETS = sorted(S)


def swap_imports(code):
    """The snippet as an sdkit user runs it: ``from diffusers...`` imports from sdkit, ``#sdkit:`` lines on."""
    code = re.sub(r"^(\s*)from diffusers(\.\w+)* import", lambda m: m.group(0).replace("diffusers", "sdkit", 1),
                  code, flags=re.M)
    return re.sub(r"^(\s*)#sdkit: ", r"\1", code, flags=re.M)


def as_array(image):
    """Images (PIL, list of PIL, array, tensor) as a float64 (B, H, W, C) array in the image's own units."""
    if isinstance(image, list):
        return np.concatenate([as_array(i) for i in image])
    if isinstance(image, PIL.Image.Image):
        return np.asarray(image, dtype=np.float64)[None] / 255
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().double().numpy()
        return image.transpose(0, 2, 3, 1) if image.ndim == 4 and image.shape[1] in (3, 4) else image
    image = np.asarray(image, dtype=np.float64)
    return image / 255 if image.max() > 1.5 else image


def run(code, model, tmp_path, library):
    namespace = {"MODEL": model, "TMP": str(tmp_path / library), "init_image": sample_image(64, seed=5),
                 "mask_image": sample_mask(64)}
    source = swap_imports(code) if library == "sdkit" else code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the reference's deprecation notes (callback_steps)
        exec(compile(source, f"<snippet on {library}>", "exec"), namespace)  # the test's own snippet text
    return as_array(namespace["image"]), namespace.get("record")


CASES = [(name, model) for name in SNIPPETS for model in (("tiny", "bundled") if S[name][1] == "txt"
                                                          else ("inpaint", "bundled"))]


def test_there_are_at_least_40_snippets():
    assert len(SNIPPETS) >= 40, len(SNIPPETS)
    for name in SNIPPETS:
        code = S[name][0]
        assert "from diffusers" in code and "from sdkit" in swap_imports(code) and "diffusers" not in \
            swap_imports(code).replace("# diffusers", ""), name


@pytest.mark.parametrize("name,model", CASES, ids=[f"{n}-{m}" for n, m in CASES])
def test_snippet_runs_on_sdkit_with_the_reference_pixels(name, model, models, tmp_path):
    code, kind = S[name]
    ours, record = run(code, models[model], tmp_path, "sdkit")
    if kind == "inpaint" and model == "bundled":  # 4-channel UNet: sdkit pastes the unmasked pixels back
        keep = np.asarray(sample_mask(64), dtype=np.float64)[None, :, :, None] < 128
        original = as_array(sample_image(64, seed=5))
        assert np.abs(np.where(keep, ours - original, 0)).max() <= 1 / 255
        return
    expected, expected_record = run(code, models[model], tmp_path, "diffusers")
    assert record == expected_record  # what the snippet recorded besides the image (callback calls)
    assert ours.shape == expected.shape, (ours.shape, expected.shape)
    diff = float(np.abs(ours - expected).max())
    WORST[name, model] = diff
    assert diff <= TOL, f"{name} on {model}: max abs difference {diff * 255:.2f}/255"


# ---------------------------------------------------------------- the scheduler swap matrix
MATRIX = list(sdkit.schedulers.SCHEDULER_CLASSES)
SD15_SCHEDULER = {"_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
                  "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
                  "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
                  "clip_sample": False}  # runwayml/stable-diffusion-v1-5's scheduler_config.json


@pytest.fixture(scope="module")
def matrix_pipes(models):
    """source -> (reference pipeline, sdkit pipeline, scheduler config): the bundled model with its own
    config, and the tiny SD 1 pipeline with SD 1.5's."""
    out = {}
    for source, model in (("bundled", "bundled"), ("sd15", "tiny")):
        ref = diffusers.StableDiffusionPipeline.from_pretrained(models[model], safety_checker=None)
        ours = sdkit.StableDiffusionPipeline.from_pretrained(models[model])
        for p in (ref, ours):
            p.set_progress_bar_config(disable=True)
        config = dict(ref.scheduler.config) if source == "bundled" else SD15_SCHEDULER
        out[source] = ref, ours, config
    return out


@pytest.mark.parametrize("source", ["bundled", "sd15"])
@pytest.mark.parametrize("first", MATRIX)
def test_scheduler_swap_matrix_gives_the_reference_pixels(matrix_pipes, source, first):
    """pipe.scheduler = Second.from_config(First.from_config(config).config), for every Second."""
    ref_pipe, our_pipe, config = matrix_pipes[source]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropped zero-SNR keys (the bundled config) warn on both sides
        ref_first, our_first = getattr(diffusers, first).from_config(config), sdkit.schedulers.SCHEDULER_CLASSES[
            first].from_config(config)
        for second in MATRIX:
            ref_pipe.scheduler = getattr(diffusers, second).from_config(ref_first.config)
            our_pipe.scheduler = sdkit.schedulers.SCHEDULER_CLASSES[second].from_config(our_first.config)
            images = [p("a red circle", num_inference_steps=3, generator=torch.manual_seed(0), output_type="np").images
                      for p in (ref_pipe, our_pipe)]
            diff = float(np.abs(images[0] - images[1]).max())
            assert diff <= TOL, f"{first} -> {second} from the {source} config: {diff * 255:.2f}/255"
