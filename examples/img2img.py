"""Image to image: redraw a picture guided by a prompt; --strength sets how far it may move.

    python examples/img2img.py [MODEL] -i in.png -p "a blue square" --strength 0.7 -o out.png

Without --image, a simple drawn picture (a red circle on white) is used.
"""

import argparse
import sys

import torch
from PIL import Image, ImageDraw

from sdkit import Img2ImgPipeline


def demo_picture(size=64):
    image = Image.new("RGB", (size, size), (240, 240, 240))
    ImageDraw.Draw(image).ellipse((size // 4, size // 4, 3 * size // 4, 3 * size // 4), fill=(220, 40, 40))
    return image


def main(argv=None):
    from txt2img import given_settings, model_argument, settings_arguments  # examples/ is on sys.path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub repo id (default: sdkit.TINY_MODEL)")
    parser.add_argument("-i", "--image", help="input image (default: a drawn red circle)")
    parser.add_argument("-p", "--prompt", default="a large blue square on a white background")
    parser.add_argument("-n", "--negative-prompt", default=None)
    parser.add_argument("-o", "--output", default="img2img.png", help="image file to write")
    parser.add_argument("--strength", type=float, default=0.7, help="0: keep the input, 1: ignore it")
    settings_arguments(parser, "sampler steps before the strength cut")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipe = Img2ImgPipeline.from_pretrained(model_argument(parser, args.model)).to(args.device)
    size = pipe.unet.config.sample_size * pipe.vae_scale_factor
    init = Image.open(args.image).convert("RGB") if args.image else demo_picture(size)
    image = pipe(args.prompt, image=init, strength=args.strength, negative_prompt=args.negative_prompt,
                 generator=torch.Generator().manual_seed(args.seed), **given_settings(args)).images[0]
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
