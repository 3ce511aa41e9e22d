"""The Real-ESRGAN second-order degradation batched on the training device, with kornia's filters and colour ops.

Real-ESRGAN (xinntao/Real-ESRGAN ``realesrgan/models/realesrgan_model.py`` ``feed_data``; SeeSR's copy in
cswry/SeeSR ``basicsr/models/realesrgan_model.py``) draws the blur kernels per sample in its dataset's workers and
degrades each batch on the GPU: BasicSR's ``filter2D`` (one kernel per sample, grouped convolution), ``DiffJPEG``
(per-sample quality) and ``USMSharp``. This module does the same with kornia's ``filters.filter2d`` (one kernel per
sample), ``filters.filter2d_separable`` (USM) and ``color`` conversions, and a batched baseline JPEG codec in torch
(:func:`jpeg_torch`), and runs the very pipeline of :func:`data.degradations.degrade_batch`, so the two paths draw
the same degradations:

* the data-loader workers draw each sample's :class:`~data.degradations.DegradationParams` (kernels, factors,
  modes, noise kinds and levels, JPEG qualities, order) from the sample's own seeded generator, exactly as the
  per-sample path draws them, and the loader stacks them (``HRFolderDegradedDataset(degrade_on_device=True)``);
* :func:`degrade_training_batch` sharpens (USM) and degrades the whole batch on the device.

Differences from the per-sample CPU path, on purpose: JPEG is :func:`jpeg_torch` (libjpeg's tables, hard rounding,
4:2:0, 8-bit levels like PIL; floating-point DCT where libjpeg uses fixed point, so single pixels differ by a few
levels while the error per image matches libjpeg's to about 1%) instead of PIL; on CUDA the noise comes from CUDA
generators (same seeds, other streams).

Differences from Real-ESRGAN, on purpose: every random choice is per sample (Real-ESRGAN draws the resize factor and
mode, the noise kind and the final order once per batch and mixes batches through a 180-sample queue instead); the
samples of a batch then differ in size between the first resize and the last, and are kept as crops of one tensor
(:func:`data.degradations.pad_per_sample` pads each around its own crop).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from data.degradations import (
    DegradationConfig,
    DegradationParams,
    Sizes,
    bicubic_upsample,
    degrade_batch,
    usm_sharpen,
)
from utils.errors import UserError

DEGRADATION_DEVICES = ("auto", "cpu", "cuda")


def replicate_beyond_crops(images: torch.Tensor, sizes: Sizes) -> torch.Tensor:
    """Each sample's crop continued to the tensor's size by repeating its last row and column (libjpeg's padding)."""
    batch, _, height, width = images.shape
    if all(size == (height, width) for size in sizes):
        return images
    device = images.device
    rows = torch.stack([torch.arange(height, device=device).clamp(max=h - 1) for h, _ in sizes])
    cols = torch.stack([torch.arange(width, device=device).clamp(max=w - 1) for _, w in sizes])
    samples = torch.arange(batch, device=device)[:, None, None]
    return images[samples, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


# libjpeg's base quantisation tables (ITU-T T.81 Annex K), scaled per quality by jpeg_quality_scaling below.
_LUMA_TABLE = (
    (16, 11, 10, 16, 24, 40, 51, 61), (12, 12, 14, 19, 26, 58, 60, 55), (14, 13, 16, 24, 40, 57, 69, 56),
    (14, 17, 22, 29, 51, 87, 80, 62), (18, 22, 37, 56, 68, 109, 103, 77), (24, 35, 55, 64, 81, 104, 113, 92),
    (49, 64, 78, 87, 103, 121, 120, 101), (72, 92, 95, 98, 112, 100, 103, 99),
)
_CHROMA_CORNER = ((17, 18, 24, 47), (18, 21, 26, 66), (24, 26, 56, 99), (47, 66, 99, 99))  # the rest is 99


def jpeg_tables(qualities: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """libjpeg's luma and chroma quantisation tables ``[B, 8, 8]`` at integer qualities (baseline: 1..255)."""
    quality = torch.tensor(qualities, dtype=torch.float64).clamp(1, 100)
    scale = torch.where(quality < 50, torch.floor(5000 / quality), 200 - 2 * quality)
    chroma = torch.full((8, 8), 99.0, dtype=torch.float64)
    chroma[:4, :4] = torch.tensor(_CHROMA_CORNER, dtype=torch.float64)
    luma = torch.tensor(_LUMA_TABLE, dtype=torch.float64)

    def scaled(base):
        return torch.floor((base[None] * scale[:, None, None] + 50) / 100).clamp(1, 255)

    return scaled(luma), scaled(chroma)


def _dct_matrix(device, dtype) -> torch.Tensor:
    """The orthonormal 8-point DCT-II as a matrix: ``coefficients = D @ block @ D.T``."""
    k = torch.arange(8, dtype=torch.float64)
    matrix = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * 0.5
    matrix[0] /= math.sqrt(2)
    return matrix.to(device, dtype)


def _code_plane(plane: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """8x8 DCT, quantise (hard rounding), dequantise, inverse DCT of ``[B, H, W]`` 8-bit levels (H, W multiples of 8)."""
    batch, height, width = plane.shape
    blocks = (plane - 128.0).reshape(batch, height // 8, 8, width // 8, 8).transpose(2, 3)
    dct = _dct_matrix(plane.device, plane.dtype)
    table = table.to(plane.device, plane.dtype)[:, None, None]
    coefficients = torch.round(dct @ blocks @ dct.T / table) * table
    blocks = dct.T @ coefficients @ dct + 128.0
    return blocks.transpose(2, 3).reshape(batch, height, width).round().clamp(0, 255)


def jpeg_torch(images: torch.Tensor, sizes: Sizes, qualities: list[int]) -> torch.Tensor:
    """The batched JPEG backend: baseline JPEG as libjpeg codes it, one integer quality per sample, on the device.

    kornia's YCbCr conversion, 4:2:0 chroma (2x2 means down, libjpeg's "fancy" triangle filter up, which is bilinear
    with half-pixel centres), 8x8 DCT with libjpeg's tables and hard rounding, 8-bit levels between the steps and out.
    kornia's own codec (``enhance.jpeg_codec_differentiable``) rounds the DCT coefficients softly, for gradients, and
    filters chroma bilinearly, so it leaves visibly less error than libjpeg at the same quality, where this codec
    follows libjpeg closely (compared in tests/test_degradations_batched.py). Images are
    repeated beyond their crop and to whole 16 px blocks at the bottom and right, as libjpeg pads, so a sample's
    result does not depend on the other crops of its batch.
    """
    import kornia

    batch, _, height, width = images.shape
    padded_height, padded_width = math.ceil(height / 16) * 16, math.ceil(width / 16) * 16
    images = replicate_beyond_crops(images, sizes).clamp(0, 1)
    images = F.pad(images, (0, padded_width - width, 0, padded_height - height), mode="replicate")
    ycbcr = (kornia.color.rgb_to_ycbcr((images * 255.0).round() / 255.0) * 255.0).round()
    luma_table, chroma_table = jpeg_tables(qualities)
    luma = _code_plane(ycbcr[:, 0], luma_table)
    chroma = F.avg_pool2d(ycbcr[:, 1:], 2)
    chroma = torch.stack([_code_plane(chroma[:, channel], chroma_table) for channel in range(2)], dim=1)
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    rgb = kornia.color.ycbcr_to_rgb(torch.cat([luma[:, None], chroma], dim=1) / 255.0)
    return ((rgb * 255.0).round().clamp(0, 255) / 255.0)[..., :height, :width]


@torch.no_grad()
def degrade_on_device(hr: torch.Tensor, params: list[DegradationParams], config: DegradationConfig) -> torch.Tensor:
    """LR images ``[B, 3, H/scale, W/scale]`` of HR images ``[B, 3, H, W]`` in [0, 1], batched, on ``hr``'s device."""
    return degrade_batch(hr, params, config, jpeg=jpeg_torch)


def use_device_degradation(choice: str, device: torch.device) -> bool:
    """``--degradation_device``: ``cuda`` batched on the training device, ``cpu`` per sample in the data-loader
    workers, ``auto`` batched exactly when training runs on CUDA (as Real-ESRGAN)."""
    if choice not in DEGRADATION_DEVICES:
        raise UserError(f"--degradation_device must be one of {DEGRADATION_DEVICES}, found {choice!r}.")
    if choice == "cuda" and device.type != "cuda":
        raise UserError(f"--degradation_device cuda needs training on a CUDA device, found {device.type}; "
                        "use --degradation_device cpu or auto.")
    return choice == "cuda" or (choice == "auto" and device.type == "cuda")


@torch.no_grad()
def degrade_training_batch(batch: dict, config: DegradationConfig, device: torch.device) -> dict:
    """Complete a batch of ``HRFolderDegradedDataset(degrade_on_device=True)`` on ``device``.

    In: ``hr`` (the plain HR crops in [-1, 1]) and ``degradation`` (the stacked parameters). Out, as the per-sample
    path gives them: ``hr`` (USM-sharpened when the config says so, the training target), ``lr`` in [0, 1] and
    ``lr_upsampled`` (bicubic to the HR size, the ControlNet input), all on ``device``.
    """
    params = DegradationParams.from_batch(batch.pop("degradation"))
    hr = ((batch["hr"].to(device, non_blocking=True).float() + 1.0) / 2.0).clamp(0, 1)
    if config.usm_sharpen:
        hr = usm_sharpen(hr)
    lr = degrade_on_device(hr, params, config)
    batch.update(hr=hr * 2.0 - 1.0, lr=lr, lr_upsampled=bicubic_upsample(lr, hr.shape[-2:]))
    return batch
