"""The ``sdkit`` command line."""

import argparse


def build_parser():
    parser = argparse.ArgumentParser(prog="sdkit", description="sdkit: latent diffusion toolkit")
    parser.add_subparsers(dest="command")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
    return 0
