"""Same prompt and seed through several schedulers, side by side in one image.

    python examples/swap_scheduler.py [MODEL] -s DDIM "Euler a" "DPM++ 2M Karras" -o grid.png

Schedulers are named by class (EulerDiscreteScheduler) or by A1111 sampler name (Euler a). Each
is built on the model's own scheduler config, so betas and spacing stay those of the model:

    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)   # for every later call
    pipe(prompt, scheduler=DDIMScheduler.from_config(...))              # for one call only
"""

import argparse
import sys

import torch
from PIL import Image

from sdkit import StableDiffusionPipeline
from sdkit.schedulers import SAMPLER_NAMES, SCHEDULER_CLASSES, from_name


def build_scheduler(name, base):
    """A scheduler by class name or A1111 sampler name, on the model's scheduler config."""
    if name in SCHEDULER_CLASSES:
        return SCHEDULER_CLASSES[name].from_config(base.config)
    return from_name(name, base.config)


def main(argv=None):
    from txt2img import given_settings, model_argument, settings_arguments  # examples/ is on sys.path

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", nargs="?", help="pipeline folder or Hub repo id (default: sdkit.TINY_MODEL)")
    parser.add_argument("-s", "--schedulers", nargs="+", default=list(SCHEDULER_CLASSES),
                        help=f"class names or sampler names ({', '.join(SAMPLER_NAMES)})")
    parser.add_argument("-p", "--prompt", default="a large yellow square at the top")
    parser.add_argument("-o", "--output", default="schedulers.png", help="grid image to write")
    settings_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)

    pipe = StableDiffusionPipeline.from_pretrained(model_argument(parser, args.model)).to(args.device)
    try:
        schedulers = [build_scheduler(name, pipe.scheduler) for name in args.schedulers]
    except ValueError as e:
        parser.error(str(e))
    images = []
    for name, scheduler in zip(args.schedulers, schedulers):
        images += pipe(args.prompt, generator=torch.Generator().manual_seed(args.seed), scheduler=scheduler,
                       **given_settings(args)).images
        print(f"{name}: done")
    w, h = images[0].size
    grid = Image.new("RGB", (w * len(images), h))
    for k, image in enumerate(images):
        grid.paste(image, (k * w, 0))
    grid.save(args.output)
    print(f"wrote {args.output} ({', '.join(args.schedulers)}, left to right)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
