"""Text to image: start from pure noise (Rombach et al. 2022, LDM; Ho & Salimans 2022 guidance)."""

from .base import DiffusionPipeline, Start
from .options import TextToImageOptions


class StableDiffusionPipeline(DiffusionPipeline):
    """Text to image with a Stable Diffusion 1.x / 2.x model (diffusers folder layout).

    ``pipe(prompt, **options)``: the options are :class:`~sdkit.pipelines.options.TextToImageOptions`.
    """

    reference_class_name = "StableDiffusionPipeline"
    options_class = TextToImageOptions

    def prepare_start(self, run, options):
        """Drawn (or given) N(0, I) latents scaled by the scheduler's init_noise_sigma."""
        shape, latents = self._latent_shape(run), options.latents
        if latents is None:
            noise = self._noise(run, shape)
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} "
                                 f"(images, latent channels, height / {self.vae_scale_factor}, "
                                 f"width / {self.vae_scale_factor}).")
            noise = latents.to(device=run.device, dtype=run.dtype)
        return Start(noise * run.state.init_noise_sigma)
