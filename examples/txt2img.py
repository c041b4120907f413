"""Text to image with any Stable Diffusion folder (diffusers layout), or the bundled tiny model.

    python examples/txt2img.py [MODEL] -p "a large red circle on a white background" -o out.png
"""

import argparse
import os
import sys

import torch

import sdkit
from sdkit import StableDiffusionPipeline


def model_argument(parser, model):
    """The model folder or repo id to load; without one, the bundled tiny model (if it is there)."""
    if model:
        return model
    if os.path.isdir(sdkit.TINY_MODEL):
        return sdkit.TINY_MODEL
    parser.error(f"no model was given and the bundled model is missing ({sdkit.TINY_MODEL}); pass a "
                 f"Stable Diffusion folder in the diffusers layout or a Hub repo id.")


def settings_arguments(parser, steps_help="sampler steps"):
    """--steps and --guidance; left out, a call uses the model's recommended settings (its folder's
    recommended_settings.json), else the reference's defaults (50 steps, guidance 7.5)."""
    parser.add_argument("--steps", type=int, help=f"{steps_help} (default: the model's recommended steps)")
    parser.add_argument("--guidance", type=float, help="guidance scale (default: the model's recommended scale)")


def given_settings(args):
    """The --steps and --guidance given on the command line, as call options."""
    chosen = {"num_inference_steps": args.steps, "guidance_scale": args.guidance}
    return {name: value for name, value in chosen.items() if value is not None}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub repo id (default: sdkit.TINY_MODEL)")
    parser.add_argument("-p", "--prompt", default="a large red circle on a white background")
    parser.add_argument("-n", "--negative-prompt", default=None)
    parser.add_argument("-o", "--output", default="txt2img.png", help="image file to write")
    settings_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--height", type=int, default=None)
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(model_argument(parser, args.model)).to(args.device)
    image = pipe(args.prompt, negative_prompt=args.negative_prompt, height=args.height, width=args.width,
                 generator=torch.Generator().manual_seed(args.seed), **given_settings(args)).images[0]
    image.save(args.output)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
