"""Train a shapes text-to-image model from scratch, then generate with it.

    python examples/train.py --out runs/demo --quick      # a few minutes: a rough model
    python examples/train.py --out runs/tiny-shapes       # the bundled model's full recipe (~53 min)

The full recipe is ``python -m sdkit.training all``, the one that produced ``sdkit.TINY_MODEL`` (see
its MODEL_CARD.md). Each stage resumes from its checkpoint, so an interrupted run continues where
it stopped. For two processes:

    accelerate launch --multi_gpu --num_processes 2 examples/train.py --out runs/tiny-shapes
"""

import argparse
import os

from sdkit.training.cli import main as train

QUICK_VAE = ["--steps", "200"]
QUICK_UNET = ["--steps", "300", "--num-images", "2000"]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="work folder: vae/, unet/ runs and pipeline/")
    parser.add_argument("--quick", action="store_true", help="short stages, to see the whole flow")
    parser.add_argument("--prompt", default="a large red circle on the left on a white background")
    args = parser.parse_args()

    vae, unet, pipeline = (os.path.join(args.out, name) for name in ("vae", "unet", "pipeline"))
    if args.quick:
        train(["vae", "--out", vae, *QUICK_VAE])
        train(["unet", "--vae", vae, "--out", unet, *QUICK_UNET])
    else:  # vae, decoder fine-tuning, unet, export
        train(["all", "--work", args.out, "--out", pipeline])

    from accelerate import PartialState

    if not PartialState().is_main_process:
        return
    if args.quick:
        train(["export", "--vae", vae, "--unet", unet, "--out", pipeline])

    import torch

    from sdkit import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(pipeline)  # its recommended_settings.json: steps, guidance
    image = pipe(args.prompt, generator=torch.Generator().manual_seed(0)).images[0]
    path = os.path.join(args.out, "sample.png")
    image.save(path)
    print(f"pipeline: {pipeline}\nsample:   {path} ({args.prompt!r})")


if __name__ == "__main__":
    main()
