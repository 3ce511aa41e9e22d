"""Put several models' outputs side by side with a label under each tile (the users' comparison tool).

    python scripts/create_comparison_grid.py --inputs results/*/sample00/image_001.png --output comparison.png
    python scripts/create_comparison_grid.py --inputs LR/image_001.png results/*/sample00/image_001.png \\
        --labels LR baseline timestep_only timestep_multiscale --output comparison.png --tile_size 512

Each label defaults to the name of the image's folder, the run name (``results/<run>/image_001.png``, or the folder
above ``sampleNN/`` in ``infer.py seesr``'s layout ``results/<run>/sample00/image_001.png``). Tiles are
scaled to a common size with their aspect ratio kept (letterboxed on white), so a bicubic LR input can sit beside
the SR outputs; by default the largest image side, and at least wide enough for the longest label. Built on
:func:`utils.images.create_comparison_grid`. ``python utils/create_comparison_grid.py``
(the users' note's spelling) runs this script.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import DataError, run_cli  # noqa: E402
from utils.images import create_comparison_grid  # noqa: E402
from utils.validators import int_at_least, positive_int  # noqa: E402


def expand_inputs(patterns: list[str]) -> list[Path]:
    """Paths as given; patterns the shell did not expand (quoted, or on Windows) are globbed here, sorted."""
    paths = []
    for pattern in patterns:
        if Path(pattern).exists() or not glob.has_magic(pattern):
            paths.append(Path(pattern))
            continue
        matches = sorted(glob.glob(pattern))
        if not matches:
            raise DataError(f"--inputs {pattern} matches no file.")
        paths.extend(Path(match) for match in matches)
    return paths


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="images to compare, e.g. results/*/image_001.png (globs are expanded if the shell did not)")
    parser.add_argument("--output", default="comparison.png", help="PNG to write (default comparison.png)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per image (default: each image's folder name, i.e. the run)")
    parser.add_argument("--tile_size", type=int_at_least(8), default=None,
                        help="side of each tile in px (default: the largest image side, at least the longest label)")
    parser.add_argument("--columns", type=positive_int, default=None, help="tiles per row (default: all in one row)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    paths = expand_inputs(args.inputs)
    output = create_comparison_grid(paths, args.output, args.labels, args.tile_size, args.columns)
    rows = math.ceil(len(paths) / (args.columns or len(paths)))
    print(f"wrote {output} ({len(paths)} images, {rows} row(s))")
    return output


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
