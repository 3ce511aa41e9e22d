"""One entry point for inference of every model family: ``python infer.py {ddpm,...} [flags]``.

Each subcommand loads a checkpoint that carries its own configuration (no training flags needed) and calls the
same sampling or enhancement function the training loop uses for its previews.

    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --samples 16
    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --interpolate
    python infer.py ddpm --compare checkpoints/cifar10_32x32/ddpm_best.pt checkpoints/cifar10_64x64/ddpm_best.pt
    python infer.py ddpm --model path/to/ddpm-cifar10-32        # a diffusers folder (UNet2DModel + scheduler)
    python infer.py phaseformer --checkpoint checkpoint/LSUI/netG_model_best.pth --input LSUI/test/input \
        --output_dir enhanced --gt_dir LSUI/test/gt
    python infer.py user --dit_checkpoint trained_models/checkpoints/best.ckpt --vavae_path vavae-imagenet256-f16d32-dinov2.pt \
        --output_dir generated_images --user_ids 1 2 3 4 5 --num_samples_per_user 4 --guidance_scale 4.0 --num_steps 250
    python infer.py seesr --pretrained_model_path preset/models/stable-diffusion-2-base --prompt '' \
        --seesr_model_path experience/timestep_multiscale/checkpoint-100000 --image_path LR --output_dir results/x

Run ``python infer.py <subcommand> --help`` for the flags of one family. Each subcommand is a module of ``pipelines/``
(``add_parser`` and ``run``); the flags every subcommand shares are ``utils/cli.py``'s inference vocabulary.
"""

from __future__ import annotations

import argparse

from pipelines import ddpm, phaseformer, seesr, user
from utils.config import ArgumentParser
from utils.errors import run_cli

COMMANDS = {"ddpm": ddpm, "phaseformer": phaseformer, "seesr": seesr, "user": user}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for module in COMMANDS.values():
        module.add_parser(subparsers)
    return parser.parse_args(argv)


def main(args: argparse.Namespace):
    return COMMANDS[args.command].run(args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
