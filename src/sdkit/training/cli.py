"""``python -m sdkit.training`` (and ``sdkit train``): train the bundled model's stages.

    python -m sdkit.training vae --out runs/vae
    python -m sdkit.training decoder --vae runs/vae --out runs/decoder      # optional: sharper colours
    python -m sdkit.training unet --vae runs/vae --out runs/unet
    python -m sdkit.training decoder --vae runs/decoder --unet runs/unet --out runs/decoder-denoised
        # optional: the decoder also learns to draw the finished UNet's denoised latents as clean shapes
    python -m sdkit.training export --vae runs/decoder-denoised --unet runs/unet --out src/sdkit/assets/tiny-shapes
    accelerate launch --multi_gpu --num_processes 2 -m sdkit.training all --work runs/tiny-shapes \
        --out src/sdkit/assets/tiny-shapes       # the bundled model (vae, decoder, unet, decoder --unet, export)

``unet --init-from RUN`` fine-tunes: the UNet and text encoder start from RUN's weights (a UNet
run or a pipeline folder of the same architecture). Every field of ``VAEConfig`` / ``UNetConfig`` is a flag (``--batch-size 8``, ``--min-snr-gamma none``).
Runs resume from ``OUT/checkpoint`` when it exists (``--no-resume`` starts over). The same
commands run multi-process with ``accelerate launch --multi_gpu --num_processes 2 -m sdkit.training ...``
(or ``torchrun --nproc_per_node 2 -m sdkit.training ...``); without a GPU the processes use the CPU.
``accelerate launch --cpu --num_processes 2`` starts only one process unless mpirun is configured
(accelerate issue #2741).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

from .config import ConfigError, UNetConfig, VAEConfig, decoder_config, parse_value
from .state import CheckpointError


def _add_config_flags(parser, cls):
    group = parser.add_argument_group(f"{cls.__name__} fields (see sdkit/training/config.py)")
    for f in dataclasses.fields(cls):
        group.add_argument("--" + f.name.replace("_", "-"), dest="cfg_" + f.name, metavar="VALUE",
                           default=None, help=f"default: {f.default}")


def _config(cls, args, defaults=None):
    defaults = defaults or cls()
    overrides = {}
    for f in dataclasses.fields(cls):
        text = getattr(args, "cfg_" + f.name, None)
        if text is not None:
            try:
                overrides[f.name] = parse_value(text, getattr(defaults, f.name))
            except ValueError as e:
                raise SystemExit(f"--{f.name.replace('_', '-')}: {e}") from None
    return dataclasses.replace(defaults, **overrides)


def build_parser():
    parser = argparse.ArgumentParser(prog="python -m sdkit.training", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    def stage(name, help, cls, out_help, needs_vae=False):
        p = sub.add_parser(name, help=help)
        if needs_vae:
            p.add_argument("--vae", required=True, help="the VAE run folder (holding vae/)")
        p.add_argument("--out", required=True, help=out_help)
        p.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
        _add_config_flags(p, cls)

    stage("vae", "stage 1: train the autoencoder into OUT/vae", VAEConfig, "run folder (checkpoint, log.jsonl, vae/)")
    stage("decoder", "stage 1b: fine-tune only the decoder of a VAE run (latents unchanged)", VAEConfig,
          "run folder (checkpoint, log.jsonl, vae/)", needs_vae=True)
    sub.choices["decoder"].add_argument("--unet", help="a finished UNet run trained on this VAE's latents (the "
                                                       "recipe's last stage): half of each batch is what it makes "
                                                       "of noised encodings (training.denoised)")
    stage("unet", "stage 2: train UNet + text encoder on the latents of a VAE run", UNetConfig,
          "run folder (checkpoint, latents.pt, unet/, text_encoder/, tokenizer/)", needs_vae=True)

    p = sub.add_parser("export", help="assemble a pipeline folder from a VAE run and a UNet run")
    p.add_argument("--vae", required=True)
    p.add_argument("--unet", required=True)
    p.add_argument("--out", required=True, help="pipeline folder to write (diffusers layout)")

    p = sub.add_parser("all", help="the whole bundled model from scratch: vae, decoder, unet, decoder --unet, export")
    p.add_argument("--work", required=True, help="folder for the four run folders (work/vae, work/decoder, work/unet, "
                                                 "work/decoder-denoised)")
    p.add_argument("--out", required=True, help="pipeline folder to write")
    return parser


def _run_vae(out, cfg, resume):
    from .loop import train
    from .stages import VAEStage

    started = time.time()
    train(VAEStage(cfg), cfg, out, resume=resume)
    return time.time() - started


def _run_unet(vae, out, cfg, resume):
    from .loop import train
    from .stages import UNetStage

    started = time.time()
    train(UNetStage(cfg, vae), cfg, out, resume=resume)
    return time.time() - started


def _export(vae, unet, out):
    from .export import export_pipeline, folder_size

    path = os.path.join(unet, "train_config.json")
    if not os.path.isfile(path):
        raise SystemExit(f"export: {path} not found; the UNet run has not finished.")
    with open(path) as f:
        saved = json.load(f)
    cfg = UNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in saved.items()})
    export_pipeline(vae, unet, out, cfg)
    print(f"wrote {out} ({folder_size(out) / 1e6:.1f} MB)")


def main(argv=None) -> int:
    """Entry point of ``python -m sdkit.training`` and ``sdkit train``; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except (ConfigError, CheckpointError) as e:  # options that cannot work, a checkpoint that cannot be read
        raise SystemExit(f"sdkit train {args.command}: {e}") from None


def _main(args) -> int:
    if args.command == "vae":
        seconds = _run_vae(args.out, _config(VAEConfig, args), not args.no_resume)
        print(f"vae stage: {seconds / 60:.1f} min")
    elif args.command == "decoder":
        defaults = decoder_config(os.path.join(args.vae, "vae"), args.unet)
        seconds = _run_vae(args.out, _config(VAEConfig, args, defaults), not args.no_resume)
        print(f"decoder stage: {seconds / 60:.1f} min")
    elif args.command == "unet":
        seconds = _run_unet(args.vae, args.out, _config(UNetConfig, args), not args.no_resume)
        print(f"unet stage: {seconds / 60:.1f} min")
    elif args.command == "export":
        _export(args.vae, args.unet, args.out)
    elif args.command == "all":
        vae_dir, decoder_dir, unet_dir, denoised_dir = (os.path.join(args.work, n)
                                                        for n in ("vae", "decoder", "unet", "decoder-denoised"))
        t_vae = _run_vae(vae_dir, VAEConfig(), True)
        t_decoder = _run_vae(decoder_dir, decoder_config(os.path.join(vae_dir, "vae")), True)
        t_unet = _run_unet(vae_dir, unet_dir, UNetConfig(), True)
        t_denoised = _run_vae(denoised_dir, decoder_config(os.path.join(decoder_dir, "vae"), unet_dir), True)
        from accelerate import PartialState

        if PartialState().is_main_process:
            _export(denoised_dir, unet_dir, args.out)
        print(f"vae {t_vae / 60:.1f} min, decoder {t_decoder / 60:.1f} min, unet {t_unet / 60:.1f} min, "
              f"decoder --unet {t_denoised / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
