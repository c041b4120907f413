"""Inpainting: repaint the white part of a mask and keep the rest.

    python examples/inpaint.py [MODEL] -i in.png -m mask.png -p "a green triangle" -o out.png

Works with inpainting models (9-channel UNet) and ordinary ones (4-channel: latent blending,
then the original pixels are pasted back outside the mask). Without --image/--mask, a drawn
picture is used and its right half is repainted.
"""

import argparse
import sys

import torch
from PIL import Image, ImageDraw

from sdkit import InpaintPipeline


def main(argv=None):
    from img2img import demo_picture  # the examples folder is on sys.path when run as a script
    from txt2img import given_settings, model_argument, settings_arguments  # examples/ is on sys.path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub repo id (default: sdkit.TINY_MODEL)")
    parser.add_argument("-i", "--image", help="input image (default: a drawn red circle)")
    parser.add_argument("-m", "--mask", help="mask image of the same size, white = repaint (default: right half)")
    parser.add_argument("-p", "--prompt", default="a small green triangle on the right")
    parser.add_argument("-n", "--negative-prompt", default=None)
    parser.add_argument("-o", "--output", default="inpaint.png", help="image file to write")
    parser.add_argument("--strength", type=float, default=1.0)
    settings_arguments(parser)
    parser.add_argument("--mask-blur", type=int, default=4, help="feathered edge in pixels (4-channel models)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipe = InpaintPipeline.from_pretrained(model_argument(parser, args.model)).to(args.device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    image = Image.open(args.image).convert("RGB") if args.image else demo_picture(size)
    if args.mask:
        mask = Image.open(args.mask)
    else:
        mask = Image.new("L", image.size, 0)
        ImageDraw.Draw(mask).rectangle((image.width // 2, 0, image.width, image.height), fill=255)
    out = pipe(args.prompt, image=image, mask_image=mask, strength=args.strength,
               negative_prompt=args.negative_prompt, mask_blur=args.mask_blur,
               generator=torch.Generator().manual_seed(args.seed), **given_settings(args)).images[0]
    out.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
