"""Image I/O and labelled grids.

* ``list_images`` / ``require_images`` / ``images_by_stem``: the image files of a folder, the one definition of
  what counts as an image (``IMAGE_EXTENSIONS``) and of pairing files by name stem.
* ``load_rgb``: any image file as RGB (grey, palette and RGBA converted); an unreadable file is a
  :class:`~utils.errors.DataError` naming it.
* ``to_uint8`` / ``tensor_to_pil``: model outputs in [-1, 1] or [0, 1] to 8-bit images.
* ``create_comparison_grid``: several models' outputs side by side, letterboxed, a label under each
  (the users' comparison tool, ``scripts/create_comparison_grid.py``).
* ``make_grid_image``: torchvision's grid plus optional captions under each tile and labels left of each row,
  used for sample grids, interpolation strips, checkpoint comparisons and per-user grids.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from utils.errors import DataError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def list_images(folder: str | Path, recursive: bool = True) -> list[Path]:
    """Image files under ``folder`` (common extensions, any case), sorted for a reproducible order."""
    folder = Path(folder)
    pattern = "**/*" if recursive else "*"
    return sorted(
        p for p in folder.glob(pattern) if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
    )


def require_images(folder: str | Path, what: str = "image folder", flag: str = "") -> list[Path]:
    """:func:`list_images`, but a missing or empty folder is a :class:`DataError` naming ``what`` (and ``flag``)."""
    folder = Path(folder)
    hint = f"; check {flag}" if flag else ""
    if not folder.is_dir():
        raise DataError(f"The {what} {folder} does not exist{hint or '; pass a folder of images'}.")
    files = list_images(folder)
    if not files:
        raise DataError(f"The {what} {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)}){hint}.")
    return files


def images_by_stem(files: Sequence[Path] | str | Path, what: str = "image") -> dict[str, Path]:
    """``{stem: path}`` of ``files`` (or of the images directly in a folder); two files with one stem are an error.

    Pairing by stem (``0801.png`` with ``0801.jpg``) is how every paired data set and evaluation here matches
    files; a repeated stem would make the pairing ambiguous, so it is refused rather than resolved silently.
    """
    if isinstance(files, (str, Path)):
        folder = Path(files)
        if not folder.is_dir():
            raise DataError(f"Expected an image folder at {folder}, but it does not exist.")
        files = list_images(folder, recursive=False)
    mapping: dict[str, Path] = {}
    for path in sorted(files):
        if path.stem in mapping:
            raise DataError(
                f"Two {what} images share the stem {path.stem!r}: {mapping[path.stem]} and {path}; keep one."
            )
        mapping[path.stem] = path
    return mapping


def load_rgb(path: str | Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGBA", "LA") or (image.mode == "P" and "transparency" in image.info):
                # Composite on white instead of letting convert("RGB") expose whatever the hidden pixels hold.
                image = image.convert("RGBA")
                background = Image.new("RGBA", image.size, (255, 255, 255, 255))
                return Image.alpha_composite(background, image).convert("RGB")
            return image.convert("RGB")
    except (OSError, ValueError, Image.DecompressionBombError) as err:
        raise DataError(f"Cannot read image {path} ({err}); remove or replace the file.") from err


def to_uint8(images: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    """(B,C,H,W) or (C,H,W) float images in ``value_range`` -> uint8 in [0, 255] on the CPU.

    NaN or infinite pixels are refused (a :class:`~utils.errors.UserError`): clamping would write them as black or white
    images that look like a result; every sampler writes through here, so none writes a non-finite image.
    """
    low, high = value_range
    images = images.detach().float().cpu()
    if not torch.isfinite(images).all():
        from utils.errors import UserError

        raise UserError("The model produced NaN or infinite pixels, so no image was written from them: the checkpoint holds "
                        "diverged weights or the settings (guidance scale, steps, precision) overflow; try another checkpoint "
                        "(an earlier one), fp32 (--mixed_precision no) or a smaller --guidance_scale.")
    images = (images - low) / (high - low)
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


def tensor_to_pil(image: torch.Tensor, value_range: tuple[float, float] = (-1.0, 1.0)) -> Image.Image:
    array = to_uint8(image, value_range).permute(1, 2, 0).numpy()
    return Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)


def pil_to_tensor(image: Image.Image, value_range: tuple[float, float] = (-1.0, 1.0)) -> torch.Tensor:
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255.0
    low, high = value_range
    return array * (high - low) + low


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def make_grid_image(
    images: torch.Tensor | Sequence[torch.Tensor],
    nrow: int,
    value_range: tuple[float, float] = (-1.0, 1.0),
    padding: int = 2,
    captions: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    tile_size: int | None = None,
) -> Image.Image:
    """A grid of ``nrow`` tiles per row; ``captions`` go under each tile, ``row_labels`` left of each row.

    Tiles of different sizes (checkpoints of different resolutions) are resized to ``tile_size``, by default the
    largest side present, so that every row is shown at a common size.
    """
    from torchvision.utils import make_grid

    tiles = list(images)
    if not tiles:
        raise ValueError("make_grid_image needs at least one image")
    side = tile_size or max(max(t.shape[-2:]) for t in tiles)
    tiles = [
        t
        if tuple(t.shape[-2:]) == (side, side)
        else F.interpolate(t[None].float(), size=(side, side), mode="bilinear", antialias=True, align_corners=False)[0]
        for t in tiles
    ]
    batch = to_uint8(torch.stack(tiles), value_range).float() / 255.0
    if batch.shape[1] == 1:
        batch = batch.repeat(1, 3, 1, 1)
    grid = make_grid(batch, nrow=nrow, padding=padding, pad_value=1.0)
    image = Image.fromarray((grid.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    if not captions and not row_labels:
        return image

    font_size = max(10, min(18, side // 5))
    font = _font(font_size)
    caption_height = font_size + 6 if captions else 0
    rows = (len(tiles) + nrow - 1) // nrow
    label_width = 0
    if row_labels:
        probe = ImageDraw.Draw(image)
        label_width = 8 + max(probe.textlength(str(label), font=font) for label in row_labels)
        label_width = int(label_width)
    cell = side + padding
    canvas = Image.new(
        "RGB", (image.width + label_width, image.height + rows * caption_height), (255, 255, 255)
    )
    draw = ImageDraw.Draw(canvas)
    for row in range(rows):
        strip = image.crop((0, row * cell, image.width, row * cell + cell + padding))
        top = row * (cell + caption_height)
        canvas.paste(strip, (label_width, top))
        if row_labels and row < len(row_labels):
            draw.text((4, top + padding + side // 2), str(row_labels[row]), fill=(0, 0, 0), font=font, anchor="lm")
        if captions:
            for col in range(nrow):
                index = row * nrow + col
                if index >= len(captions) or index >= len(tiles):
                    break
                x = label_width + padding + col * cell + side // 2
                draw.text((x, top + cell + 2), str(captions[index]), fill=(0, 0, 0), font=font, anchor="mt")
    return canvas


def save_png_complete(picture: Image.Image, path: str | Path) -> Path:
    """Write ``picture`` as a PNG that exists only once complete: written as ``<name>.tmp``, then renamed.

    For sample folders of many files (FID sets, per-user sets) that a rerun resumes: a file on disk is a finished
    image, so an interrupted save is redone and no tool ever reads half a PNG. No fsync per file (unlike
    utils.checkpoint.atomic_write): losing the last few files in a power cut only means sampling them again.
    """
    import os

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    picture.save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_grid(images, path: str | Path, nrow: int, **kwargs) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    make_grid_image(images, nrow, **kwargs).save(path)
    return path


# ------------------------------------------------------------------------------------------ comparison grids


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
    # SeeSR's layout results/<run>/sample00/<name>.png: the run is the folder above sampleNN/.
    labels = list(labels) if labels else [
        (path.parent.parent.name if re.fullmatch(r"sample\d+", path.parent.name) else path.parent.name) or path.stem
        for path in paths
    ]
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
