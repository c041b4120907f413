"""Image to image: noise an encoded image part-way, then denoise (SDEdit, Meng et al. 2021, arXiv 2108.01073)."""

from .base import DiffusionPipeline, Start, encode_latents
from .images import image_size, load_images
from .txt2img import CALL_DOC


class Img2ImgPipeline(DiffusionPipeline):
    """Repaint a whole image guided by a prompt; ``strength`` sets how far from the input it may go."""

    reference_class_name = "StableDiffusionImg2ImgPipeline"

    def __call__(self, prompt, image, strength=0.8, negative_prompt=None, height=None, width=None,
                 num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1, generator=None,
                 eta=0.0, output_type="pil", callback=None, scheduler=None, guidance_rescale=0.0):
        """Generate images for `prompt` starting from `image`.

        image: PIL image, (H, W, 3) array or (3, H, W) tensor in [0, 1] (or uint8), or a list or
            batch: one image, one per prompt, or one per output image.
        strength: in [0, 1]; the run starts int(num_inference_steps * strength) steps before the
            end, at that step's noise level (1.0: pure noise, the input only sets the mean).
        height, width: default to the image's size rounded down to the VAE factor; the image is
            resized (Lanczos for PIL) when they differ.
        """
        f = self.vae_scale_factor
        w, h = image_size(image)
        height, width = height or h - h % f, width or w - w % f
        pixels = load_images(image, size=(width, height)) if height % f == 0 and width % f == 0 else None

        def start(run):
            z0 = encode_latents(self.vae, pixels * 2 - 1, run.batch_size, run.generator, run.dtype)
            noise = self._noise(run, z0.shape)
            timestep = run.state.latent_timestep.repeat(run.batch_size)
            return Start(run.scheduler.add_noise(z0, noise, timestep, run.state))

        return self._generate(start, prompt=prompt, negative_prompt=negative_prompt, height=height,
                              width=width, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                              generator=generator, eta=eta, output_type=output_type, callback=callback,
                              scheduler=scheduler, guidance_rescale=guidance_rescale, strength=strength)

    __call__.__doc__ += CALL_DOC
