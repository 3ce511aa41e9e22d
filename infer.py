"""One entry point for inference of every model family: ``python infer.py {ddpm,...} [flags]``.

Each subcommand loads a checkpoint that carries its own configuration (no training flags needed) and calls the
same sampling or enhancement function the training loop uses for its previews.

    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --samples 16
    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --interpolate
    python infer.py ddpm --compare checkpoints/cifar10_32x32/ddpm_best.pt checkpoints/cifar10_64x64/ddpm_best.pt
    python infer.py ddpm --model path/to/ddpm-cifar10-32        # a diffusers folder (UNet2DModel + scheduler)

Run ``python infer.py <subcommand> --help`` for the flags of one family.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from utils.errors import UserError, run_cli


# ------------------------------------------------------------------------------------------------------- ddpm
def add_ddpm_parser(subparsers) -> None:
    from models.ddpm_sampling import SAMPLERS

    parser = subparsers.add_parser(
        "ddpm",
        help="sample, interpolate or compare pixel-space DDPM checkpoints",
        description="Sample from a train_ddpm_highres.py checkpoint (EMA weights) or a diffusers DDPM folder.",
    )
    parser.add_argument("--model", help="our ddpm_*.pt checkpoint, or a diffusers folder with a UNet2DModel and "
                        "scheduler_config.json (e.g. google/ddpm-cifar10-32 downloaded beforehand)")
    parser.add_argument("--samples", type=int, default=None,
                        help="images to generate (default 16; with --compare, images per checkpoint row, default 8)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                        help="ddim (deterministic, default) or ddpm (ancestral, the paper's sampler)")
    parser.add_argument("--steps", type=int, default=None,
                        help="denoising steps (default 100 for ddim, 1000 for ddpm); more steps, higher quality")
    parser.add_argument("--seed", type=int, default=0, help="seed of the starting noise (default 0)")
    parser.add_argument("--output", default=None,
                        help="PNG to write (default ddpm_samples.png, ddpm_interpolation.png or ddpm_comparison.png)")
    parser.add_argument("--batch_size", type=int, default=64, help="images denoised at once (default 64)")
    parser.add_argument("--interpolate", action="store_true",
                        help="one strip: spherical interpolation between two seeded noises, denoised the same way")
    parser.add_argument("--frames", type=int, default=8, help="images in the interpolation strip (default 8)")
    parser.add_argument("--compare", nargs="+", metavar="CKPT", default=None,
                        help="checkpoints to compare: one row each, same seed, shown at a common size")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto (GPU if present)")
    parser.add_argument("--no-amp", dest="amp", action="store_false", help="sample in fp32 on the GPU (default: bf16/fp16 autocast)")


def run_ddpm(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    from models.ddpm_sampling import interpolation_noise, load_ddpm_for_sampling, sample_ddpm
    from utils.accelerator import resolve_device
    from utils.images import save_grid

    if not args.model and not args.compare:
        raise UserError("infer.py ddpm needs --model CKPT (or --compare CKPT ...).")
    if args.interpolate and args.compare:
        raise UserError("--interpolate and --compare are separate modes; give one of them.")
    steps = args.steps or (1000 if args.sampler == "ddpm" else 100)
    device = resolve_device(args.device)
    autocast = None
    if device.type == "cuda" and args.amp:
        autocast = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16

    def load(path):
        unet, scheduler_config, description = load_ddpm_for_sampling(path)
        print(f"loaded {description}")
        return unet.to(device), scheduler_config

    def generate(unet, scheduler_config, count, noise=None):
        bar = lambda timesteps: tqdm(timesteps, desc=f"{args.sampler} {steps} steps", leave=False)  # noqa: E731
        return sample_ddpm(unet, scheduler_config, count, steps, args.sampler, args.seed, noise=noise,
                           batch_size=args.batch_size, autocast_dtype=autocast, progress=bar)

    if args.compare:
        per_row = args.samples or 8
        rows, labels = [], []
        for path in args.compare:
            unet, scheduler_config = load(path)
            rows.extend(generate(unet, scheduler_config, per_row))
            labels.append(_checkpoint_label(path, unet.config.sample_size))
            del unet
        output = save_grid(rows, args.output or "ddpm_comparison.png", nrow=per_row, row_labels=labels)
    elif args.interpolate:
        unet, scheduler_config = load(args.model)
        noise = interpolation_noise(unet.config.in_channels, unet.config.sample_size, args.frames, args.seed)
        images = generate(unet, scheduler_config, args.frames, noise=noise)
        captions = [f"{a:.2f}" for a in torch.linspace(0, 1, args.frames).tolist()]
        output = save_grid(images, args.output or "ddpm_interpolation.png", nrow=args.frames, captions=captions)
    else:
        unet, scheduler_config = load(args.model)
        count = args.samples or 16
        images = generate(unet, scheduler_config, count)
        output = save_grid(images, args.output or "ddpm_samples.png", nrow=math.ceil(math.sqrt(count)))
    print(f"wrote {output}")
    return output


def _checkpoint_label(path: str, size: int) -> str:
    path = Path(path)
    name = f"{path.parent.name}/{path.stem}" if path.is_file() else path.name
    return f"{name} ({size} px)"


# ------------------------------------------------------------------------------------------------ entry point
COMMANDS = {
    "ddpm": (add_ddpm_parser, run_ddpm),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    return parser.parse_args(argv)


def main(args: argparse.Namespace):
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
