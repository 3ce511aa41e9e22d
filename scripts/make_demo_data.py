"""Build the offline demo data sets from scikit-image's bundled photographs (no network).

    python scripts/make_demo_data.py images demo_output/data --size 32 --count 256
    python scripts/make_demo_data.py underwater demo_output/underwater --size 128 --train_count 96 --test_count 24

``images``: a folder of seeded square crops for the pixel DDPM and the SR trainers (:mod:`data.demo_data`).
``underwater``: synthetic underwater pairs in the LSUI layout for Phaseformer (:mod:`data.underwater`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.validators import positive_int, seed  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="{images,underwater}")
    images = kinds.add_parser("images", help="square crops for the pixel DDPM and the SR trainers")
    images.add_argument("out_dir", help="folder to write the crops into (created)")
    images.add_argument("--size", type=positive_int, default=32, help="side of each square crop in pixels (default 32)")
    images.add_argument("--count", type=positive_int, default=256, help="number of crops in total (default 256)")
    images.add_argument("--seed", type=seed, default=0, help="seed of the crop positions (default 0)")
    water = kinds.add_parser("underwater", help="synthetic underwater pairs (LSUI layout) for Phaseformer")
    water.add_argument("out_dir", help="folder to write train/ and test/ into (created)")
    water.add_argument("--size", type=positive_int, default=128, help="side of each square image in pixels (default 128: fast on CPU)")
    water.add_argument("--train_count", type=positive_int, default=96, help="number of training pairs (default 96)")
    water.add_argument("--test_count", type=positive_int, default=24, help="number of test pairs, from held-out photographs (default 24)")
    water.add_argument("--seed", type=seed, default=0, help="seed of the crops and degradations (default 0)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    if args.kind == "images":
        from data.demo_data import build_demo_image_folder

        out = build_demo_image_folder(args.out_dir, args.size, args.count, args.seed)
        print(f"wrote {args.count} demo images of {args.size}x{args.size} px to {out}")
    elif args.kind == "underwater":
        from data.underwater import build_synthetic_underwater

        out = build_synthetic_underwater(args.out_dir, args.size, args.train_count, args.test_count, args.seed)
        print(f"wrote {args.train_count} train and {args.test_count} test underwater pairs of {args.size}x{args.size} px to {out}")
    else:  # argparse refuses other kinds; kept for callers that build the namespace themselves
        raise UserError(f"Expected images or underwater, found {args.kind!r}.")
    return out


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
