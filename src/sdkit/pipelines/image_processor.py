"""``pipe.image_processor``: the reference's VaeImageProcessor calls on sdkit's image helpers (images.py).

    x = pipe.image_processor.preprocess(pil_image)            # (B, 3, H, W) in [-1, 1]
    z = pipe.vae.encode(x).latent_dist.mode() * pipe.vae.config.scaling_factor
    pil = pipe.image_processor.postprocess(pipe.vae.decode(z / 0.18215).sample)   # list of PIL images
"""

import numpy as np
import PIL.Image
import torch

from .images import image_size, load_images, to_output


class VaeImageProcessor:
    """Images to and from the VAE's range, as the reference's ``VaeImageProcessor`` converts them."""

    def __init__(self, vae_scale_factor=8):
        self.vae_scale_factor = vae_scale_factor

    def get_default_height_width(self, image, height=None, width=None):
        """(height, width): the given ones, else the image's, rounded down to the VAE factor."""
        w, h = image_size(image)
        f = self.vae_scale_factor
        return (height or h // f * f), (width or w // f * f)

    def preprocess(self, image, height=None, width=None):
        """PIL images, arrays or tensors (in [0, 1]; tensors with values below 0 are taken as already in
        [-1, 1], as the reference takes them) -> a float32 (B, 3, H, W) tensor in [-1, 1]."""
        if isinstance(image, torch.Tensor) and image.ndim == 4 and image.shape[1] == 3 and image.min() < 0:
            return image
        height, width = self.get_default_height_width(image, height, width)
        return load_images(image, size=(width, height)) * 2 - 1

    def postprocess(self, image, output_type="pil", do_denormalize=None):
        """A (B, 3, H, W) tensor in [-1, 1] (the VAE's output) -> "pil" images, an "np" array or a "pt" tensor
        in [0, 1]; "latent" returns it unchanged. ``do_denormalize``: one flag per image (False: already in [0, 1])."""
        if output_type == "latent":
            return image
        if do_denormalize is None:
            do_denormalize = [True] * image.shape[0]
        image = torch.stack([(x / 2 + 0.5).clamp(0, 1) if d else x for x, d in zip(image, do_denormalize)])
        return to_output(image, output_type)

    @staticmethod
    def numpy_to_pil(images):
        """(B, H, W, C) or (H, W, C) float array in [0, 1] -> a list of PIL images."""
        images = images[None] if images.ndim == 3 else images
        return [PIL.Image.fromarray(a.squeeze(-1) if a.shape[-1] == 1 else a)
                for a in (images * 255).round().astype(np.uint8)]

    @staticmethod
    def pil_to_numpy(images):
        """PIL image(s) -> a (B, H, W, C) float32 array in [0, 1]."""
        images = images if isinstance(images, list) else [images]
        return np.stack([np.array(i).astype(np.float32) / 255.0 for i in images])
