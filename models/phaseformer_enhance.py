"""Phaseformer enhancement: the one function that turns degraded images into enhanced ones, and loading weights for it.

Used by ``train_phaseformer.py``'s evaluation and by ``infer.py phaseformer`` alike, so the numbers a training
run logs are the numbers inference reproduces. Images go in and come out in [0, 1]; the model's own value
range (``unit``: [0, 1], as trained here by default; ``signed``/``signed_reference``: [-1, 1], as the official
``train.py``/``test.py`` normalise) is converted on the way in and out.

Any image size works: the model pads sides to a multiple of 8 and crops back. Large images can be enhanced in
overlapping tiles (``tile``), averaged uniformly where tiles overlap as in SwinIR's and Restormer's tiled
test scripts. Phaseformer's transposed attention and its phase-only FFTs see the whole input, so a tiled result
differs slightly from a whole-image one: tile only when the whole image does not fit in memory.

Weights: :func:`load_phaseformer_for_inference` reads our training checkpoints (``kind: phaseformer``, which
carry the model configuration and value range), safetensors files from ``scripts/convert_phaseformer.py``
(configuration and value range in the metadata) and plain state dicts (configuration from the shapes);
anything else is refused with a sentence saying what it is.
"""

from __future__ import annotations

import contextlib
import csv
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from models.phaseformer import (
    ECA_GATES,
    Phaseformer,
    PhaseformerOutput,
    extract_state_dict,
    infer_phaseformer_config,
    load_phaseformer_state_dict,
    load_torch_weights_file,
    read_weights_file,
)
from utils.errors import CheckpointError, DataError, UserError

VALUE_RANGES = ("unit", "signed", "signed_reference")
OUTPUT_CHOICES = ("L", "H", "both")
CHECKPOINT_KIND = "phaseformer"


def to_model_range(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """[0, 1] images -> what the model reads: [0, 1] (``unit``) or [-1, 1] (``signed``, ``signed_reference``)."""
    if value_range not in VALUE_RANGES:
        raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
    return images if value_range == "unit" else images * 2.0 - 1.0


def from_model_range(images: torch.Tensor, value_range: str) -> torch.Tensor:
    """Model outputs -> [0, 1] images, clamped (the inverse of :func:`to_model_range`)."""
    images = images.float() if value_range == "unit" else (images.float() + 1.0) * 0.5
    return images.clamp(0.0, 1.0)


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets that cover ``size`` with tiles of ``tile`` every ``stride`` pixels, the last flush with the end."""
    if size <= tile:
        return [0]
    return list(range(0, size - tile, stride)) + [size - tile]


def _run_tiled(model: Phaseformer, images: torch.Tensor, tile: int, overlap: int, return_high: bool) -> PhaseformerOutput:
    """The model over overlapping ``tile`` x ``tile`` windows, outputs averaged where windows overlap."""
    batch, _, height, width = images.shape
    tile_h, tile_w = min(tile, height), min(tile, width)
    stride = max(1, tile - overlap)
    out_low = images.new_zeros(batch, 3, height, width, dtype=torch.float32)
    hits_low = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    out_high = images.new_zeros(batch, 3, 2 * height, 2 * width, dtype=torch.float32) if return_high else None
    hits_high = images.new_zeros(1, 1, 2 * height, 2 * width, dtype=torch.float32) if return_high else None
    for top in _tile_starts(height, tile_h, stride):
        for left in _tile_starts(width, tile_w, stride):
            low, high = model(images[..., top : top + tile_h, left : left + tile_w], return_high=return_high)
            out_low[..., top : top + tile_h, left : left + tile_w] += low.float()
            hits_low[..., top : top + tile_h, left : left + tile_w] += 1
            if return_high:
                rows, cols = slice(2 * top, 2 * (top + tile_h)), slice(2 * left, 2 * (left + tile_w))
                out_high[..., rows, cols] += high.float()
                hits_high[..., rows, cols] += 1
    return PhaseformerOutput(out_low / hits_low, out_high / hits_high if return_high else None)


@torch.no_grad()
def enhance(
    model: Phaseformer,
    images: torch.Tensor,
    *,
    value_range: str = "unit",
    return_high: bool = True,
    tile: int = 0,
    tile_overlap: int = 32,
    autocast_dtype: torch.dtype | None = None,
) -> PhaseformerOutput:
    """Enhance (B, 3, H, W) images in [0, 1] on the model's device; both outputs come back in [0, 1], fp32.

    ``tile > 0`` runs the model on overlapping tiles of that side (``tile_overlap`` pixels shared) when the image
    is larger than one tile. ``autocast_dtype`` (bf16/fp16 on CUDA) runs the convolutions in lower precision;
    the phase attention stays fp32 either way. The caller puts the model in eval mode (it has no dropout or
    batch norm, so the mode does not change the result).
    """
    if tile < 0 or tile_overlap < 0:
        raise UserError(f"--tile ({tile}) and --tile_overlap ({tile_overlap}) must not be negative.")
    if tile and tile_overlap >= tile:
        raise UserError(f"--tile {tile} must be larger than the tile overlap ({tile_overlap} px).")
    inputs = to_model_range(images.float(), value_range)
    precision = torch.autocast(images.device.type, dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext()
    with precision:
        if tile and max(inputs.shape[-2:]) > tile:
            low, high = _run_tiled(model, inputs, tile, tile_overlap, return_high)
        else:
            low, high = model(inputs, return_high=return_high)
    return PhaseformerOutput(
        from_model_range(low, value_range), from_model_range(high, value_range) if high is not None else None
    )


# ------------------------------------------------------------------------------------------ loading weights

def plain_model_config(model: Phaseformer) -> dict[str, Any]:
    """The model's constructor arguments as plain data (lists, numbers, strings) for checkpoints."""
    return {
        key: list(value) if isinstance(value, (list, tuple)) else value
        for key, value in model.config.items()
        if not key.startswith("_")
    }


def load_phaseformer_for_inference(
    path: str | Path, eca: str | None = None, value_range: str | None = None
) -> tuple[Phaseformer, dict[str, Any]]:
    """(model on the CPU in eval mode, info) from any Phaseformer weights file this repository reads.

    ``info`` holds ``value_range`` (from the file unless given), ``eca`` and a one-line ``description``.
    ``eca`` overrides the gate recorded in the file (the shapes do not depend on it).
    """
    path = Path(path)
    if eca is not None and eca not in ECA_GATES:
        raise UserError(f"--eca must be one of {', '.join(ECA_GATES)}, got {eca!r}.")
    if value_range is not None and value_range not in VALUE_RANGES:
        raise UserError(f"--value_range must be one of {', '.join(VALUE_RANGES)}, got {value_range!r}.")
    if not path.is_file():
        found = "is a folder" if path.is_dir() else "does not exist"
        raise CheckpointError(f"Checkpoint {path} {found}; pass a train_phaseformer.py .pth or a converted .safetensors file.")
    if path.suffix == ".safetensors":
        state_dict, metadata = read_weights_file(path)
        config = json.loads(metadata["phaseformer_config"]) if "phaseformer_config" in metadata else infer_phaseformer_config(state_dict)
        stored_range = metadata.get("value_range", "unit")
        origin = f"converted from {metadata['source']}" if "source" in metadata else "a safetensors state dict"
    else:
        raw = load_torch_weights_file(path)
        if isinstance(raw, dict) and "kind" in raw:
            if raw["kind"] != CHECKPOINT_KIND:
                raise CheckpointError(
                    f"{path} is a '{raw['kind']}' checkpoint, but infer.py phaseformer needs a '{CHECKPOINT_KIND}' "
                    "checkpoint from train_phaseformer.py or official weights converted by scripts/convert_phaseformer.py."
                )
            state_dict, config = raw["model"], dict(raw["model_config"])
            stored_range = raw.get("config", {}).get("value_range", "unit")
            origin = f"train_phaseformer.py checkpoint, epoch {raw.get('epoch')}"
        else:
            state_dict = extract_state_dict(raw, str(path))
            config = infer_phaseformer_config(state_dict)
            stored_range = "unit"
            origin = "a plain state dict"
    if eca is not None:
        config["eca"] = eca
    try:
        model = Phaseformer(**config)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{path} records a Phaseformer configuration this code cannot build ({err}).") from None
    load_phaseformer_state_dict(model, state_dict, str(path))
    model.eval()
    info = {
        "value_range": value_range or stored_range,
        "eca": model.config.eca,
        "description": (
            f"{path} ({origin}; channels {list(model.config.channels)}, eca {model.config.eca}, "
            f"inputs in {'[0, 1]' if (value_range or stored_range) == 'unit' else '[-1, 1]'})"
        ),
    }
    return model, info


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


def _load(path: Path, size: int | None) -> torch.Tensor:
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
) -> dict[str, Any]:
    """Enhance one image or a folder, write ``output_dir/{L,H}/<stem>.png``; with ``gt_dir``, score L and write a CSV.

    ``split_file`` (a split list written by train_phaseformer.py for a single folder of pairs) keeps only the
    images on its ``test`` lines. Returns ``{"written": [paths], "metrics": [{"name", "psnr", "ssim"}],
    "mean_psnr", "mean_ssim", "csv"}``. Metrics are BasicSR-equivalent (utils/metrics.py) on the 8-bit outputs
    as written.
    """
    from tqdm.auto import tqdm

    from utils.images import images_by_stem, tensor_to_pil
    from utils.metrics import batch_psnr, batch_ssim

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
    heads = ["L", "H"] if outputs == "both" else [outputs]
    output_dir = Path(output_dir)
    for head in heads:
        (output_dir / head).mkdir(parents=True, exist_ok=True)
    device = next(model.parameters()).device
    written: list[Path] = []
    rows: list[dict[str, Any]] = []
    for stem, path in tqdm(images.items(), desc="phaseformer", disable=not progress, dynamic_ncols=True):
        image = _load(path, resize).to(device)
        try:
            result = enhance(model, image, value_range=value_range, return_high="H" in heads, tile=tile,
                             tile_overlap=tile_overlap, autocast_dtype=autocast_dtype)
        except torch.OutOfMemoryError:
            raise UserError(
                f"Out of memory enhancing {path} ({image.shape[-1]}x{image.shape[-2]} px); pass --tile 512 (or smaller), "
                "--outputs L, or --resize."
            ) from None
        for head, tensor in (("L", result.fake_b_L), ("H", result.fake_b_H)):
            if head in heads:
                target_path = output_dir / head / f"{stem}.png"
                tensor_to_pil(tensor[0], value_range=(0.0, 1.0)).save(target_path)
                written.append(target_path)
        if targets:
            reference = _load(targets[stem], resize).to(device)
            if reference.shape != image.shape:
                raise DataError(
                    f"{path} is {image.shape[-1]}x{image.shape[-2]} px but its ground truth {targets[stem]} is "
                    f"{reference.shape[-1]}x{reference.shape[-2]} px; pass --resize N to score both at NxN."
                )
            rows.append({
                "name": stem,
                "psnr": float(batch_psnr(result.fake_b_L, reference, crop_border, test_y_channel)[0]),
                "ssim": float(batch_ssim(result.fake_b_L, reference, crop_border, test_y_channel)[0]),
            })
    report: dict[str, Any] = {"written": written, "metrics": rows, "csv": None}
    if rows:
        report["mean_psnr"] = sum(row["psnr"] for row in rows) / len(rows)
        report["mean_ssim"] = sum(row["ssim"] for row in rows) / len(rows)
        report["csv"] = write_metrics_csv(rows, output_dir / "metrics.csv", report["mean_psnr"], report["mean_ssim"])
    return report


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: Path, mean_psnr: float, mean_ssim: float) -> Path:
    """One ``name,psnr,ssim`` row per image, then a ``mean`` row."""
    from utils.checkpoint import atomic_write

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["name", "psnr", "ssim"])
            for row in rows:
                writer.writerow([row["name"], f"{row['psnr']:.4f}", f"{row['ssim']:.6f}"])
            writer.writerow(["mean", f"{mean_psnr:.4f}", f"{mean_ssim:.6f}"])

    return atomic_write(path, write)
