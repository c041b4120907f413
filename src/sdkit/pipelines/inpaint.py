"""Inpainting: repaint the white part of a mask, keep the rest (Rombach et al. 2022; RePaint-style
latent blending for ordinary models, Lugmayr et al. 2022, arXiv 2201.09865)."""

import torch
import torch.nn.functional as F

from ..schedulers.schedules import randn
from .base import DiffusionPipeline, Start, encode_latents, repeat_to_batch
from .images import feather, image_size, load_images, load_masks
from .txt2img import CALL_DOC


class InpaintPipeline(DiffusionPipeline):
    """Inpaint with a 9-channel inpainting UNet (mask and masked image as extra input channels) or
    with an ordinary 4-channel UNet (outside the mask the latents are reset to the noised original
    after every step, then the original pixels are pasted back with a feathered edge)."""

    reference_class_name = "StableDiffusionInpaintPipeline"

    def __call__(self, prompt, image, mask_image, strength=1.0, negative_prompt=None, height=None,
                 width=None, num_inference_steps=50, guidance_scale=7.5, num_images_per_prompt=1,
                 generator=None, eta=0.0, output_type="pil", callback=None, scheduler=None, guidance_rescale=0.0,
                 paste_back=None, mask_blur=4):
        """Repaint the masked part of `image` guided by `prompt`.

        image: as for Img2ImgPipeline. mask_image: same size as image; white (>= 0.5) is repainted,
            black kept. PIL (any mode, read as gray), (H, W) array or (1, H, W) tensor in [0, 1].
        strength: in [0, 1]; 1.0 starts the masked region from pure noise.
        height, width: default to the image's size rounded down to the VAE factor.
        paste_back: put the original pixels back outside the mask after decoding (default: on
            for 4-channel UNets, off for inpainting UNets). mask_blur: width in pixels of the
            feathered edge, which lies inside the mask (unmasked pixels are kept exactly).
        """
        in_channels = self.unet.config.in_channels
        latent_channels = self.vae.config.latent_channels
        if in_channels not in (latent_channels, 2 * latent_channels + 1):
            raise ValueError(f"InpaintPipeline needs a UNet with {latent_channels} (ordinary) or "
                             f"{2 * latent_channels + 1} (inpainting) input channels; this one has {in_channels}.")
        inpainting_unet = in_channels == 2 * latent_channels + 1
        if image_size(image) != image_size(mask_image):
            raise ValueError(f"mask_image is {image_size(mask_image)} (width, height) but image is "
                             f"{image_size(image)}: pass a mask of the image's size.")
        if isinstance(mask_blur, bool) or not isinstance(mask_blur, int) or mask_blur < 0:
            raise ValueError(f"mask_blur must be a whole number of pixels >= 0, got {mask_blur!r}.")
        paste_back = not inpainting_unet if paste_back is None else paste_back
        f = self.vae_scale_factor
        w, h = image_size(image)
        height, width = height or h - h % f, width or w - w % f
        sized = height % f == 0 and width % f == 0  # else _generate raises the size error
        pixels = load_images(image, size=(width, height)) if sized else None
        masks = load_masks(mask_image, size=(width, height)) if sized else None

        def start(run):
            B, scheduler, state = run.batch_size, run.scheduler, run.state
            init = pixels * 2 - 1  # (b, 3, H, W) in [-1, 1]
            full = strength == 1.0
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
            if inpainting_unet:
                extra = torch.cat([mask, encode_latents(self.vae, masked, B, run.generator, run.dtype)], dim=1)
                extra = torch.cat([extra] * 2) if run.guidance else extra  # (2B, 1 + C, h, w)
                finish = _paste(pixels, mask_pixels, mask_blur, B) if paste_back else None
                return Start(latents, unet_extra=extra, finish=finish)
            # the reference encodes the masked image here too: take the same random draws
            _skip_posterior_draws(run.generator, masked.shape[0], self._latent_shape(run), self.vae.dtype)

            def blend(x, t_next, new_state):
                known = z0 if t_next is None else scheduler.add_noise(z0, noise, t_next.reshape(1), new_state)
                return (1 - mask) * known + mask * x

            finish = _paste(pixels, mask_pixels, mask_blur, B) if paste_back else None
            return Start(latents, blend=blend, finish=finish)

        return self._generate(start, prompt=prompt, negative_prompt=negative_prompt, height=height,
                              width=width, num_inference_steps=num_inference_steps,
                              guidance_scale=guidance_scale, num_images_per_prompt=num_images_per_prompt,
                              generator=generator, eta=eta, output_type=output_type, callback=callback,
                              scheduler=scheduler, guidance_rescale=guidance_rescale, strength=strength)

    __call__.__doc__ += CALL_DOC


def _paste(pixels, mask_pixels, mask_blur, batch_size):
    """finish(images): the original pixels outside the mask, blended over a feathered edge inside it."""
    def finish(images):
        original = repeat_to_batch(pixels, batch_size, "image").to(images.device, images.dtype)
        soft = feather(mask_pixels, mask_blur).to(images.device, images.dtype)  # (B, 1, H, W)
        return original * (1 - soft) + images * soft
    return finish


def _skip_posterior_draws(generator, num_images, latent_shape, dtype):
    """Advance the generator(s) as sampling the VAE posterior of `num_images` images would."""
    if generator is None:
        return
    B, C, h, w = latent_shape
    if isinstance(generator, (list, tuple)):
        for g in generator:
            torch.randn((1, C, h, w), generator=g, device=g.device, dtype=dtype)
    else:
        randn((num_images, C, h, w), generator, generator.device, dtype)
