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
from pathlib import Path
from typing import Any

import torch

from models.phaseformer import (
    ECA_GATES,
    Phaseformer,
    PhaseformerOutput,
    extract_state_dict,
    load_phaseformer_state_dict,
    load_torch_weights_file,
    read_weights_file,
    recorded_or_inferred_config,
)
from utils.errors import CheckpointError, UserError

VALUE_RANGES = ("unit", "signed", "signed_reference")
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
    path: str | Path, eca: str | None = None, value_range: str | None = None, needed_by: str = "infer.py phaseformer"
) -> tuple[Phaseformer, dict[str, Any]]:
    """(model on the CPU in eval mode, info) from any Phaseformer weights file this repository reads.

    ``info`` holds ``value_range`` (from the file unless given), ``eca`` and a one-line ``description``.
    ``eca`` overrides the gate recorded in the file (the shapes do not depend on it). ``needed_by`` names the command
    and flag that read the file in a wrong-kind error (``train_phaseformer.py --init_weights``).
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
        config = recorded_or_inferred_config(state_dict, metadata)
        stored_range = metadata.get("value_range", "unit")
        origin = f"converted from {metadata['source']}" if "source" in metadata else "a safetensors state dict"
    else:
        raw = load_torch_weights_file(path)
        if isinstance(raw, dict) and "kind" in raw:
            if raw["kind"] != CHECKPOINT_KIND:
                raise CheckpointError(
                    f"{path} is a '{raw['kind']}' checkpoint, but {needed_by} needs a '{CHECKPOINT_KIND}' "
                    "checkpoint from train_phaseformer.py or official weights converted by scripts/convert_phaseformer.py."
                )
            state_dict, config = raw["model"], dict(raw["model_config"])
            stored_range = raw.get("config", {}).get("value_range", "unit")
            origin = f"train_phaseformer.py checkpoint, epoch {raw.get('epoch')}"
        else:
            state_dict = extract_state_dict(raw, str(path))
            config = recorded_or_inferred_config(state_dict)
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
