"""Image to image: noise an encoded image part-way, then denoise (SDEdit, Meng et al. 2021, arXiv 2108.01073)."""

from .base import DiffusionPipeline, Start, encode_latents
from .images import image_size, load_images
from .options import ImageToImageOptions


def small_image_error(width, height, factor):
    """Why a width x height image cannot set the output size (None if it can): a side under the VAE factor."""
    if width >= factor and height >= factor:
        return None
    return (f"is {width}x{height} pixels, smaller than the VAE's factor {factor}: use an image of at least "
            f"{factor}x{factor} pixels, or give the output height and width")


def size_from_image(options, factor):
    """The options' height and width, else the image's size rounded down to the VAE factor."""
    w, h = image_size(options.image)
    error = small_image_error(w, h, factor) if not (options.height and options.width) else None
    if error:
        raise ValueError(f"image {error}.")
    return options.height or h - h % factor, options.width or w - w % factor


class Img2ImgPipeline(DiffusionPipeline):
    """Repaint a whole image guided by a prompt; ``strength`` sets how far from the input it may go.

    ``pipe(prompt, image, **options)``: the options are :class:`~sdkit.pipelines.options.ImageToImageOptions`.
    """

    reference_class_name = "StableDiffusionImg2ImgPipeline"
    options_class = ImageToImageOptions

    def image_size(self, options):
        return size_from_image(options, self.vae_scale_factor)

    def prepare_start(self, run, options):
        """The encoded image noised to the run's first timestep."""
        pixels = load_images(options.image, size=(run.width, run.height))
        z0 = encode_latents(self.vae, pixels * 2 - 1, run.batch_size, run.generator, run.dtype)
        noise = self._noise(run, z0.shape)
        timestep = run.state.latent_timestep.repeat(run.batch_size)
        return Start(run.scheduler.add_noise(z0, noise, timestep, run.state))
