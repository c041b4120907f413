"""Inpainting: repaint the white part of a mask, keep the rest (Rombach et al. 2022; RePaint-style
latent blending for ordinary models, Lugmayr et al. 2022, arXiv 2201.09865)."""

import torch
import torch.nn.functional as F

from ..noise import SeedNoise
from ..schedulers.schedules import randn
from .base import DiffusionPipeline, Start, encode_latents, repeat_to_batch
from .denoising import with_extra_channels
from .images import feather, image_size, load_images, load_masks
from .img2img import size_from_image
from .options import InpaintOptions


class InpaintPipeline(DiffusionPipeline):
    """Inpaint with a 9-channel inpainting UNet (mask and masked image as extra input channels) or
    with an ordinary 4-channel UNet (outside the mask the latents are reset to the noised original
    after every step, then the original pixels are pasted back with a feathered edge).

    ``pipe(prompt, image, mask_image, **options)``: the options are
    :class:`~sdkit.pipelines.options.InpaintOptions`.
    """

    reference_class_name = "StableDiffusionInpaintPipeline"
    options_class = InpaintOptions

    def _inpainting_unet(self):
        """True for a 9-channel inpainting UNet, False for an ordinary one; anything else is refused."""
        in_channels, latent_channels = self.unet.config.in_channels, self.vae.config.latent_channels
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(f"InpaintPipeline needs a UNet with {latent_channels} (ordinary) or "
                             f"{2 * latent_channels + 1} (inpainting) input channels; this one has {in_channels}.")
        return in_channels == 2 * latent_channels + 1

    def image_size(self, options):
        self._inpainting_unet()
        if image_size(options.image) != image_size(options.mask_image):
            raise ValueError(f"mask_image is {image_size(options.mask_image)} (width, height) but image is "
                             f"{image_size(options.image)}: pass a mask of the image's size.")
        return size_from_image(options, self.vae_scale_factor)

    def prepare_start(self, run, options):
        """Latents, the mask at latent size, and either the extra UNet channels or the latent blend."""
        inpainting_unet = self._inpainting_unet()
        paste_back = not inpainting_unet if options.paste_back is None else options.paste_back
        B, scheduler, state = run.batch_size, run.scheduler, run.state
        pixels = load_images(options.image, size=(run.width, run.height))
        masks = load_masks(options.mask_image, size=(run.width, run.height))
        init = pixels * 2 - 1  # (b, 3, H, W) in [-1, 1]
        full = options.strength == 1.0
        # 1. initial latents: noise, or the encoded image noised to the first timestep
        z0 = None
        if not inpainting_unet or not full:
            z0 = encode_latents(self.vae, init, B, run.generator, run.dtype)
        noise = self._noise(run, self._latent_shape(run))
        if full:
            latents = noise * state.init_noise_sigma
        else:
            latents = scheduler.add_noise(z0, noise, state.latent_timestep.repeat(B), state)
        # 2. the mask at latent size; the masked image's latents (inpainting UNets only)
        mask_pixels = repeat_to_batch(masks, B, "mask").to(run.device)
        mask = F.interpolate(mask_pixels, size=latents.shape[-2:]).to(run.dtype)  # (B, 1, h, w)
        masked = init * (masks < 0.5)
        finish = _paste(pixels, mask_pixels, options.mask_blur, B) if paste_back else None
        if inpainting_unet:
            extra = torch.cat([mask, encode_latents(self.vae, masked, B, run.generator, run.dtype)], dim=1)
            return Start(latents, pieces=(with_extra_channels(extra),), finish=finish)  # (B, 1 + C, h, w)
        # the reference encodes the masked image here too: take the same random draws
        _skip_posterior_draws(run.generator, masked.shape[0], self._latent_shape(run), self.vae.dtype)

        def blend(x, new_state):
            """Outside the mask: the original noised to the next timestep (the original itself at the end)."""
            if new_state.step_index >= len(new_state.schedule):
                return (1 - mask) * z0 + mask * x
            t_next = new_state.schedule[new_state.step_index].reshape(1)
            return (1 - mask) * scheduler.add_noise(z0, noise, t_next, new_state) + mask * x

        return Start(latents, after_step=blend, finish=finish)


def _paste(pixels, mask_pixels, mask_blur, batch_size):
    """finish(images): the original pixels outside the mask, blended over a feathered edge inside it."""
    def finish(images):
        original = repeat_to_batch(pixels, batch_size, "image").to(images.device, images.dtype)
        soft = feather(mask_pixels, mask_blur).to(images.device, images.dtype)  # (B, 1, H, W)
        return original * (1 - soft) + images * soft
    return finish


def _skip_posterior_draws(generator, num_images, latent_shape, dtype):
    """Advance the generator(s) as sampling the VAE posterior of `num_images` images would."""
    if generator is None or isinstance(generator, SeedNoise):  # A1111 seeds sample posteriors apart
        return
    B, C, h, w = latent_shape
    if isinstance(generator, (list, tuple)):
        for g in generator:
            torch.randn((1, C, h, w), generator=g, device=g.device, dtype=dtype)
    else:
        randn((num_images, C, h, w), generator, generator.device, dtype)
