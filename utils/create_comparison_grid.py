"""Put several models' outputs side by side with a label under each tile (the users' comparison tool).

    python utils/create_comparison_grid.py --inputs results/*/image_001.png --output comparison.png
    python utils/create_comparison_grid.py --inputs LR/image_001.png results/*/image_001.png \\
        --labels LR baseline timestep_only timestep_multiscale --output comparison.png --tile_size 512

Each label defaults to the name of the image's folder (the run name: ``results/<run>/image_001.png``). Tiles are
scaled to a common size with their aspect ratio kept (letterboxed on white), so a bicubic LR input can sit beside
the SR outputs; by default the largest image side, and at least wide enough for the longest label. Built on
:func:`utils.images.make_grid_image`.
"""

from __future__ import annotations

import argparse
import glob
import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from utils.errors import DataError, UserError, run_cli  # noqa: E402
from utils.images import load_rgb, make_grid_image, pil_to_tensor  # noqa: E402


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


def letterbox(image: torch.Tensor, side: int) -> torch.Tensor:
    """Scale ``[3, H, W]`` in [0, 1] so its long side is ``side`` and pad it to ``side x side`` with white."""
    height, width = image.shape[-2:]
    scale = side / max(height, width)
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    if size != (height, width):
        image = F.interpolate(image[None], size=size, mode="bicubic", antialias=scale < 1, align_corners=False)[0]
    canvas = torch.ones(3, side, side)
    top, left = (side - size[0]) // 2, (side - size[1]) // 2
    canvas[:, top : top + size[0], left : left + size[1]] = image.clamp(0, 1)
    return canvas


def label_width(labels: list[str], font_size: int = 18) -> int:
    """Pixels the longest label needs at make_grid_image's caption size (tiles of 90 px and more use 18 px)."""
    from PIL import Image, ImageDraw, ImageFont

    try:
        font = ImageFont.load_default(size=font_size)
    except TypeError:  # Pillow < 10.1: a fixed small bitmap font
        font = ImageFont.load_default()
    draw = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    return max(90, int(max(draw.textlength(str(label), font=font) for label in labels)) + 8)


def create_comparison_grid(
    inputs: list[str | Path], output: str | Path, labels: list[str] | None = None, tile_size: int | None = None,
    columns: int | None = None,
) -> Path:
    """Write the grid of ``inputs`` (one tile each, ``columns`` per row, default all in one row) to ``output``."""
    paths = [Path(p) for p in inputs]
    if not paths:
        raise UserError("--inputs needs at least one image.")
    for path in paths:
        if not path.is_file():
            raise DataError(f"--inputs {path} does not exist.")
    labels = list(labels) if labels else [path.parent.name or path.stem for path in paths]
    if len(labels) != len(paths):
        raise UserError(f"--labels gives {len(labels)} labels for {len(paths)} images; give one per image.")
    images = [pil_to_tensor(load_rgb(path), (0.0, 1.0)) for path in paths]
    side = tile_size or max(max(max(image.shape[-2:]) for image in images), label_width(labels))
    tiles = [letterbox(image, side) for image in images]
    columns = columns or len(tiles)
    grid = make_grid_image(tiles, nrow=columns, value_range=(0.0, 1.0), captions=labels, tile_size=side)
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    grid.save(output)
    return output


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--inputs", nargs="+", required=True,
                        help="images to compare, e.g. results/*/image_001.png (globs are expanded if the shell did not)")
    parser.add_argument("--output", default="comparison.png", help="PNG to write (default comparison.png)")
    parser.add_argument("--labels", nargs="+", default=None,
                        help="one label per image (default: each image's folder name, i.e. the run)")
    parser.add_argument("--tile_size", type=int, default=None,
                        help="side of each tile in px (default: the largest image side, at least the longest label)")
    parser.add_argument("--columns", type=int, default=None, help="tiles per row (default: all in one row)")
    args = parser.parse_args(argv)
    if args.tile_size is not None and args.tile_size < 8:
        parser.error("--tile_size must be at least 8")
    if args.columns is not None and args.columns < 1:
        parser.error("--columns must be at least 1")
    return args


def main(args: argparse.Namespace) -> Path:
    paths = expand_inputs(args.inputs)
    output = create_comparison_grid(paths, args.output, args.labels, args.tile_size, args.columns)
    rows = math.ceil(len(paths) / (args.columns or len(paths)))
    print(f"wrote {output} ({len(paths)} images, {rows} row(s))")
    return output


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
