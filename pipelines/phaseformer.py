"""``infer.py phaseformer``: enhance an image or a folder with a Phaseformer checkpoint, scored against ground truth.

The network call is ``models.phaseformer_enhance.enhance``, the function train_phaseformer.py's evaluation calls, so the
numbers a training run logs are the numbers inference reproduces; this module reads and pairs the images (by file
stem), writes ``OUTPUT_DIR/{L,H}/<stem>.png`` and, with ``--gt_dir``, a per-image ``metrics.csv`` (BasicSR-equivalent
PSNR/SSIM, utils/metrics.py; LPIPS with ``--lpips_weights``). ``--underwater_metrics`` adds the no-reference UIQM and
UCIQE of each input and output (utils/underwater_metrics.py, the values the underwater literature reports).
"""

from __future__ import annotations

import argparse
import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.phaseformer import Phaseformer
from models.phaseformer_enhance import enhance
from utils.accelerator import autocast_dtype
from utils.cli import add_device_flag, add_precision_flags
from utils.errors import DataError, UserError
from utils.validators import check_output_dir, int_at_least, non_negative_int

OUTPUT_CHOICES = ("L", "H", "both")
MIN_TILE = 16  # the network pads to a multiple of 8; a tile must hold more than padding


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "phaseformer",
        help="enhance underwater images with a Phaseformer checkpoint; PSNR/SSIM against ground truth",
        description="Enhance an image or a folder with a train_phaseformer.py checkpoint or official weights converted by "
        "scripts/convert_phaseformer.py; writes OUTPUT_DIR/L/<name>.png (input size) and OUTPUT_DIR/H/<name>.png (2x), "
        "and with --gt_dir a per-image metrics.csv and the mean PSNR/SSIM of L (BasicSR-equivalent).",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="netG_model_*.pth from train_phaseformer.py, or a .safetensors from scripts/convert_phaseformer.py")
    parser.add_argument("--input", required=True, help="an image or a folder of images (any size)")
    parser.add_argument("--output_dir", required=True, help="where to write L/ and H/ (created)")
    parser.add_argument("--gt_dir", default=None, help="ground-truth folder, paired by file stem: score L and write metrics.csv")
    parser.add_argument("--outputs", choices=OUTPUT_CHOICES, default="both",
                        help="L: input resolution, H: twice it, both (default both)")
    parser.add_argument("--tile", type=non_negative_int, default=0,
                        help=f"enhance images larger than N px in overlapping NxN tiles to save memory, N >= {MIN_TILE} "
                        "(default 0: whole image)")
    parser.add_argument("--tile_overlap", type=non_negative_int, default=None,
                        help="with --tile: pixels shared by neighbouring tiles, less than the tile (default 32, or tile/2 "
                        "for tiles of 64 px and less)")
    parser.add_argument("--resize", type=int_at_least(16), default=None,
                        help="resize inputs (and ground truth) to NxN first, e.g. 256 for the training evaluation protocol")
    parser.add_argument("--eca", choices=("feature", "phase"), default=None,
                        help="override the ECA gate recorded in the checkpoint (default: the checkpoint's)")
    parser.add_argument("--value_range", choices=("unit", "signed", "signed_reference"), default=None,
                        help="override the input range recorded in the checkpoint (default: the checkpoint's; [-1, 1] for "
                        "official weights)")
    parser.add_argument("--test_y_channel", action="store_true", help="with --gt_dir: score the BT.601 Y channel instead of RGB")
    parser.add_argument("--crop_border", type=non_negative_int, default=0,
                        help="with --gt_dir: pixels cropped from each border before scoring (default 0)")
    parser.add_argument("--underwater_metrics", action="store_true",
                        help="add UIQM and UCIQE (no reference needed) of each input and its L output to metrics.csv")
    parser.add_argument("--lpips_weights", default=None,
                        help="with --gt_dir: LPIPS (v0.1 AlexNet) of L against the ground truth; lpips' weights/v0.1/alex.pth")
    parser.add_argument("--lpips_backbone", default=None,
                        help="with --lpips_weights: torchvision's alexnet-owt-7be5be79.pth (default: torch hub's cache)")
    parser.add_argument("--split_file", default=None,
                        help="enhance only the 'test' images of this split list (split_*.txt in a training run folder)")
    add_device_flag(parser)
    add_precision_flags(parser, "no", "autocast of the convolutions on the GPU: no (fp32, the precision of the training "
                        "evaluation), auto (bf16 where supported, else fp16), fp16 or bf16", amp=True)


def run(args: argparse.Namespace) -> dict:
    from models.phaseformer_enhance import load_phaseformer_for_inference
    from utils.accelerator import resolve_device
    from utils.metrics import SSIM_WINDOW_SIZE

    if args.tile and args.tile < MIN_TILE:
        raise UserError(f"--tile {args.tile} is too small; use 0 (whole images) or at least {MIN_TILE} px.")
    if args.tile_overlap is not None and not args.tile:
        raise UserError("--tile_overlap applies to tiled enhancement; add --tile N or drop --tile_overlap.")
    tile_overlap = args.tile_overlap if args.tile_overlap is not None else min(32, args.tile // 2)
    if args.tile and tile_overlap >= args.tile:
        raise UserError(f"--tile_overlap {tile_overlap} must be less than --tile {args.tile}.")
    if args.gt_dir is None and (args.crop_border or args.test_y_channel):
        raise UserError("--crop_border and --test_y_channel set how outputs are scored against ground truth; add --gt_dir or drop them.")
    if args.resize is not None and args.resize - 2 * args.crop_border < SSIM_WINDOW_SIZE:
        raise UserError(f"--crop_border {args.crop_border} leaves less than {SSIM_WINDOW_SIZE} px of a --resize {args.resize} "
                        f"image to score; use at most {(args.resize - SSIM_WINDOW_SIZE) // 2}.")
    if args.gt_dir is None and (args.lpips_weights or args.lpips_backbone):
        raise UserError("LPIPS compares outputs with ground truth; add --gt_dir or drop --lpips_weights/--lpips_backbone.")
    check_output_dir(args.output_dir)
    _input_images(Path(args.input))  # a missing or empty --input is reported before the checkpoint loads
    device = resolve_device(args.device)
    lpips_model = None
    if args.lpips_weights or args.lpips_backbone:
        from utils.iqa_metrics import load_lpips

        if not args.lpips_weights:
            raise UserError("--lpips_backbone needs --lpips_weights (lpips' weights/v0.1/alex.pth).")
        lpips_model, note = load_lpips(args.lpips_weights, args.lpips_backbone, device)
        if lpips_model is None:
            raise UserError(note)
    autocast = autocast_dtype(args.mixed_precision, device)
    model, info = load_phaseformer_for_inference(args.checkpoint, eca=args.eca, value_range=args.value_range)
    print(f"loaded {info['description']}")
    report = enhance_folder(
        model.to(device), args.input, args.output_dir, value_range=info["value_range"], outputs=args.outputs,
        gt_dir=args.gt_dir, resize=args.resize, tile=args.tile, tile_overlap=tile_overlap, autocast_dtype=autocast,
        crop_border=args.crop_border, test_y_channel=args.test_y_channel, split_file=args.split_file,
        underwater_metrics=args.underwater_metrics, lpips_model=lpips_model,
    )
    print(f"wrote {len(report['written'])} images to {args.output_dir}")
    if "mean_psnr" in report:
        channel = "Y" if args.test_y_channel else "RGB"
        lpips = f", LPIPS {report['means']['lpips']:.4f}" if "lpips" in report["means"] else ""
        print(f"mean over {len(report['metrics'])} images ({channel}, border {args.crop_border} px): "
              f"PSNR {report['mean_psnr']:.3f} dB, SSIM {report['mean_ssim']:.4f}{lpips}; per image: {report['csv']}")
    if args.underwater_metrics:
        means = report["means"]
        print(f"UIQM {means['uiqm_input']:.4f} -> {means['uiqm']:.4f}, UCIQE {means['uciqe_input']:.4f} -> {means['uciqe']:.4f} "
              f"(input -> L, mean over {len(report['metrics'])} images; higher is better); per image: {report['csv']}")
    return report


# --------------------------------------------------------------------------------------- folders of images

def _input_images(source: Path) -> dict[str, Path]:
    from utils.images import IMAGE_EXTENSIONS, images_by_stem

    if source.is_file():
        if source.suffix.lower() not in IMAGE_EXTENSIONS:
            raise DataError(f"--input {source} is not an image ({', '.join(IMAGE_EXTENSIONS)}).")
        return {source.stem: source}
    if not source.exists():
        raise DataError(f"--input {source} does not exist; pass an image or a folder of images.")
    images = images_by_stem(source, "input")
    if not images:
        raise DataError(f"--input {source} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    return images


def load_image(path: Path, size: int | None = None) -> torch.Tensor:
    """``[1, 3, H, W]`` in [0, 1]: the image as RGB (as the training data loader reads it), resized to ``size`` when given."""
    from PIL import Image

    from data.paired import load_rgb, to_tensor

    image = load_rgb(path)
    if size:
        image = image.resize((size, size), Image.BILINEAR)
    return to_tensor(image)[None]


def _check_scorable(path: Path, reference: Path, resize: int | None, crop_border: int) -> None:
    """Before anything is enhanced: the pair has one size and leaves an SSIM window after the border crop."""
    from PIL import Image

    from utils.metrics import SSIM_WINDOW_SIZE

    if resize:
        size = (resize, resize)
    else:
        sizes = []
        for file in (path, reference):
            try:
                with Image.open(file) as image:  # reads the header only
                    sizes.append(image.size)
            except (OSError, ValueError, Image.DecompressionBombError) as err:
                raise DataError(f"Cannot read image {file} ({err}); remove or replace the file.") from err
        if sizes[0] != sizes[1]:
            raise DataError(f"{path} is {sizes[0][0]}x{sizes[0][1]} px but its ground truth {reference} is "
                            f"{sizes[1][0]}x{sizes[1][1]} px; pass --resize N to score both at NxN.")
        size = sizes[0]
    if min(size) - 2 * crop_border < SSIM_WINDOW_SIZE:
        raise UserError(f"--crop_border {crop_border} leaves less than {SSIM_WINDOW_SIZE} px of {path} ({size[0]}x{size[1]} px) "
                        f"to score; use at most {max(0, (min(size) - SSIM_WINDOW_SIZE) // 2)}.")


def enhance_folder(
    model: Phaseformer,
    source: str | Path,
    output_dir: str | Path,
    *,
    value_range: str = "unit",
    outputs: str = "both",
    gt_dir: str | Path | None = None,
    resize: int | None = None,
    tile: int = 0,
    tile_overlap: int = 32,
    autocast_dtype: torch.dtype | None = None,
    crop_border: int = 0,
    test_y_channel: bool = False,
    split_file: str | Path | None = None,
    progress: bool = True,
    underwater_metrics: bool = False,
    lpips_model: torch.nn.Module | None = None,
) -> dict[str, Any]:
    """Enhance one image or a folder, write ``output_dir/{L,H}/<stem>.png``; with ``gt_dir``, score L and write a CSV.

    ``split_file`` (a split list written by train_phaseformer.py for a single folder of pairs) keeps only the
    images on its ``test`` lines. Returns ``{"written": [paths], "metrics": [{"name", "psnr", "ssim"}],
    "mean_psnr", "mean_ssim", "csv"}``. Metrics are BasicSR-equivalent (utils/metrics.py) on the 8-bit outputs
    as written. ``underwater_metrics`` adds ``uiqm_input``, ``uiqm``, ``uciqe_input``, ``uciqe`` (of each input and its
    L output) to the rows, ``lpips_model`` (utils.iqa_metrics.LPIPSAlex) an ``lpips`` column; ``means`` holds every
    column's mean.
    """
    from tqdm.auto import tqdm

    from utils.images import images_by_stem, load_rgb
    from utils.log import progress_kwargs

    if outputs not in OUTPUT_CHOICES:
        raise UserError(f"--outputs must be one of {', '.join(OUTPUT_CHOICES)}, got {outputs!r}.")
    if crop_border < 0:
        raise UserError(f"--crop_border must not be negative, got {crop_border}.")
    images = _input_images(Path(source))
    if split_file is not None:
        from data.paired import read_split_file

        if not Path(split_file).is_file():
            raise DataError(f"--split_file {split_file} does not exist; pass the split_*.txt of the training run folder.")
        try:
            test_stems = set(read_split_file(split_file)[1])
        except UnicodeDecodeError:
            raise DataError(f"--split_file {split_file} is not a text file; pass the split_*.txt of the training run folder.") from None
        if not test_stems:
            raise DataError(f"--split_file {split_file} lists no 'test' images; pass the split_*.txt of the training run folder.")
        missing = sorted(test_stems - set(images))
        if missing:
            raise DataError(f"--split_file {split_file} lists {missing[0]!r} as a test image, but {source} has no image with that stem.")
        images = {stem: path for stem, path in images.items() if stem in test_stems}
    targets: dict[str, Path] = {}
    if gt_dir is not None:
        gt_dir = Path(gt_dir)
        if not gt_dir.is_dir():
            raise DataError(f"--gt_dir {gt_dir} is not a folder; pass the folder of ground-truth images.")
        targets = images_by_stem(gt_dir, "ground-truth")
        for stem, path in images.items():
            if stem not in targets:
                raise DataError(f"Input image {path} has no ground truth with the stem {stem!r} in {gt_dir}; add it or drop --gt_dir.")
            _check_scorable(path, targets[stem], resize, crop_border)
    for path in [*images.values(), *(targets[stem] for stem in images if targets)]:
        load_rgb(path)  # a truncated or unreadable file stops here, before any output folder exists
    heads = ["L", "H"] if outputs == "both" else [outputs]
    output_dir = Path(output_dir)
    for head in heads:
        (output_dir / head).mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    bar = progress_kwargs() if progress else {"disable": True}  # no carriage-return bars in notebooks and log files
    for stem, path in tqdm(images.items(), desc="phaseformer", **bar):
        image = load_image(path, resize).to(device)
        reference = load_image(targets[stem], resize).to(device) if targets else None
        if reference is not None and reference.shape != image.shape:
            raise DataError(
                f"{path} is {image.shape[-1]}x{image.shape[-2]} px but its ground truth {targets[stem]} is "
                f"{reference.shape[-1]}x{reference.shape[-2]} px; pass --resize N to score both at NxN."
            )
        outputs_of, scores = enhance_image(
            model, image, value_range=value_range, heads=heads, tile=tile, tile_overlap=tile_overlap,
            autocast_dtype=autocast_dtype, reference=reference, crop_border=crop_border, test_y_channel=test_y_channel,
            underwater_metrics=underwater_metrics, lpips_model=lpips_model, name=str(path),
        )
        for head, picture in outputs_of.items():
            target_path = output_dir / head / f"{stem}.png"
            picture.save(target_path)
            written.append(target_path)
        if scores:
            rows.append({"name": stem, **scores})
    report: dict[str, Any] = {"written": written, "metrics": rows, "csv": None, "means": {}}
    if rows:
        report["means"] = {key: sum(row[key] for row in rows) / len(rows) for key in rows[0] if key != "name"}
        if targets:
            report["mean_psnr"], report["mean_ssim"] = report["means"]["psnr"], report["means"]["ssim"]
        report["csv"] = write_metrics_csv(rows, output_dir / "metrics.csv", report["means"])
    return report


def enhance_image(
    model: Phaseformer,
    image: torch.Tensor,
    *,
    value_range: str = "unit",
    heads: Sequence[str] = ("L", "H"),
    tile: int = 0,
    tile_overlap: int = 32,
    autocast_dtype: torch.dtype | None = None,
    reference: torch.Tensor | None = None,
    crop_border: int = 0,
    test_y_channel: bool = False,
    underwater_metrics: bool = False,
    lpips_model: torch.nn.Module | None = None,
    name: str = "the image",
) -> tuple[dict[str, Any], dict[str, float]]:
    """One ``[1, 3, H, W]`` image in [0, 1] (from :func:`load_image`): ``({head: PIL image}, scores)``.

    ``heads`` picks the outputs (``L`` at the input size, ``H`` at twice it); the PIL images are what
    :func:`enhance_folder` writes. ``scores`` holds ``psnr``/``ssim`` (and ``lpips`` with ``lpips_model``) of L against
    ``reference`` (same shape as ``image``), and with ``underwater_metrics`` the UIQM/UCIQE of the input and of L.
    """
    from utils.images import tensor_to_pil
    from utils.metrics import batch_psnr, batch_ssim

    try:
        result = enhance(model, image, value_range=value_range, return_high="H" in heads, tile=tile,
                         tile_overlap=tile_overlap, autocast_dtype=autocast_dtype)
    except torch.OutOfMemoryError:
        raise UserError(
            f"Out of memory enhancing {name} ({image.shape[-1]}x{image.shape[-2]} px); pass --tile 512 (or smaller), "
            "--outputs L, or --resize."
        ) from None
    pictures = {head: tensor_to_pil(tensor[0], value_range=(0.0, 1.0))
                for head, tensor in (("L", result.fake_b_L), ("H", result.fake_b_H)) if head in heads}
    scores: dict[str, float] = {}
    if reference is not None:
        scores["psnr"] = float(batch_psnr(result.fake_b_L, reference, crop_border, test_y_channel)[0])
        scores["ssim"] = float(batch_ssim(result.fake_b_L, reference, crop_border, test_y_channel)[0])
        if lpips_model is not None:
            # On the 8-bit output as written, like PSNR/SSIM.
            output_8bit = result.fake_b_L.float().clamp(0, 1).mul(255).round().div(255)
            scores["lpips"] = float(lpips_model(output_8bit * 2 - 1, reference.float() * 2 - 1)[0])
    if underwater_metrics:
        from utils.underwater_metrics import uciqe, uiqm

        scores.update(uiqm_input=uiqm(image[0]), uiqm=uiqm(result.fake_b_L[0]), uciqe_input=uciqe(image[0]),
                      uciqe=uciqe(result.fake_b_L[0]))
    return pictures, scores


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: Path, means: dict[str, float]) -> Path:
    """One row per image (``name`` and the metric columns: ``psnr,ssim`` first when scored), then a ``mean`` row."""
    from utils.checkpoint import atomic_write

    columns = [key for key in rows[0] if key != "name"]
    digits = {"psnr": 4}  # dB: 4 decimals; the [0, 1]-ish scores 6

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", *columns])
            for row in rows:
                writer.writerow([row["name"], *(f"{row[key]:.{digits.get(key, 6)}f}" for key in columns)])
            writer.writerow(["mean", *(f"{means[key]:.{digits.get(key, 6)}f}" for key in columns)])

    return atomic_write(path, write)
