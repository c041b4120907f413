"""Text to image: start from pure noise (Rombach et al. 2022, LDM; Ho & Salimans 2022 guidance)."""

from .base import DiffusionPipeline, Start

CALL_DOC = """
        prompt: a string or a list of strings (one image group per prompt).
        negative_prompt: replaces the empty unconditional prompt; a string or one per prompt.
        num_inference_steps: sampler steps (img2img/inpaint run int(steps * strength) of them).
        guidance_scale: classifier-free guidance weight; <= 1 runs the conditional half only.
        num_images_per_prompt: images made for each prompt.
        generator: a torch.Generator, or a list with one per image (image k then equals the same
            image made alone with that generator).
        eta: DDIM's noise weight (only schedulers whose step takes ``eta``).
        output_type: "pil" (list of images), "np" (B, H, W, 3) float [0, 1], "pt" (B, 3, H, W)
            tensor in [0, 1], or "latent" (the final latents, not decoded).
        callback: ``callback(step, timestep, latents)`` after every scheduler step (step counts
            from 0, latents are the new ones); return False to stop the run there. A stopped run
            decodes the latents it has and returns ``interrupted=True``.
        scheduler: an sdkit scheduler for this call only (default: ``pipe.scheduler``).
        guidance_rescale: in [0, 1]; matches the guided prediction's std to the conditional one's
            by this fraction (Lin et al. 2024; 0.7 there, 0 = off as in diffusers).

        Returns a PipelineOutput with ``.images`` and ``.interrupted``.
"""


class StableDiffusionPipeline(DiffusionPipeline):
    """Text to image with a Stable Diffusion 1.x / 2.x model (diffusers folder layout)."""

    reference_class_name = "StableDiffusionPipeline"

    def __call__(self, prompt, negative_prompt=None, height=None, width=None, num_inference_steps=50,
                 guidance_scale=7.5, num_images_per_prompt=1, generator=None, eta=0.0, latents=None,
                 output_type="pil", callback=None, scheduler=None, guidance_rescale=0.0):
        """Generate images for `prompt`.

        height, width: image size, multiples of the VAE factor (default: the UNet's sample_size
            times the VAE factor).
        latents: (B, C, h, w) initial noise to use instead of drawing it (scaled by the
            scheduler's init_noise_sigma, as drawn noise is).
        """
        default = self.unet.config.sample_size * self.vae_scale_factor
        height, width = height or default, width or default

        def start(run):
            shape = self._latent_shape(run)
            if latents is None:
                noise = self._noise(run, shape)
            else:
                if tuple(latents.shape) != shape:
                    raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} "
                                     f"(images, latent channels, height / {self.vae_scale_factor}, "
                                     f"width / {self.vae_scale_factor}).")
                noise = latents.to(device=run.device, dtype=run.dtype)
            return Start(noise * run.state.init_noise_sigma)

        return self._generate(start, prompt=prompt, negative_prompt=negative_prompt, height=height,
                              width=width, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                              generator=generator, eta=eta, output_type=output_type, callback=callback,
                              scheduler=scheduler, guidance_rescale=guidance_rescale)

    __call__.__doc__ += CALL_DOC

