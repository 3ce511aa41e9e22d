"""PSNR and SSIM computed the way BasicSR computes them, so numbers compare with restoration papers.

Reference: BasicSR ``basicsr/metrics/psnr_ssim.py`` (XPixelGroup/BasicSR), which papers such as Restormer,
SwinIR and most underwater enhancement work report:

* 8-bit images: numpy arrays in [0, 255] (HWC, any dtype; uint8 as read from disk), or float tensors in
  [0, 1] (CHW or BCHW) that are first quantised like BasicSR's ``tensor2img`` (clamp, x255, round);
* optional border crop of ``crop_border`` pixels on each side;
* optional Y channel: ITU-R BT.601 luma of *RGB* input, ``Y = 16 + (65.481 R + 128.553 G + 24.966 B) / 255``
  for 8-bit R, G, B, unrounded (BasicSR's ``to_y_channel`` expects BGR arrays from cv2; our images are RGB,
  so the weights are applied in RGB order);
* PSNR in float64 against a peak of 255; identical images give ``inf``;
* SSIM: 11x11 Gaussian window, sigma 1.5, valid region only (no padding), C1 = (0.01*255)^2,
  C2 = (0.03*255)^2, mean over the map, then over channels. This equals scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)``.

:func:`calculate_psnr` / :func:`calculate_ssim` return Python floats for one image pair; :func:`batch_psnr` /
:func:`batch_ssim` return one value per image of a (B, C, H, W) batch on the batch's device, for
evaluation inside a training loop without host round trips.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# BT.601 luma weights for 8-bit R, G, B (Matlab's rgb2ycbcr, as in BasicSR's color_util).
BT601_Y_WEIGHTS_RGB = (65.481, 128.553, 24.966)
SSIM_WINDOW_SIZE = 11
SSIM_SIGMA = 1.5


def to_8bit_tensor(image: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A float64 (B, C, H, W) tensor of 8-bit values in [0, 255].

    numpy arrays are taken as [0, 255] HWC (or HW) images; tensors as [0, 1] CHW or BCHW images, quantised
    to 8 bits like BasicSR's ``tensor2img`` (clamp to [0, 1], times 255, round).
    """
    if isinstance(image, np.ndarray):
        array = image.astype(np.float64)
        if array.ndim == 2:
            array = array[..., None]
        if array.ndim != 3:
            raise ValueError(f"expected an HWC image array, got shape {image.shape}")
        return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))[None]
    tensor = image.detach()
    if tensor.ndim == 3:
        tensor = tensor[None]
    if tensor.ndim != 4:
        raise ValueError(f"expected a CHW or BCHW image tensor, got shape {tuple(image.shape)}")
    return (tensor.to(torch.float64).clamp(0, 1) * 255.0).round()


def rgb_to_y(images: torch.Tensor) -> torch.Tensor:
    """BT.601 luma (B, 1, H, W) in [16, 235] of 8-bit RGB values (B, 3, H, W), unrounded."""
    weights = images.new_tensor(BT601_Y_WEIGHTS_RGB).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True) / 255.0 + 16.0


def _prepare(images: torch.Tensor, references: torch.Tensor, crop_border: int, test_y_channel: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if images.shape != references.shape:
        raise ValueError(f"image shapes differ: {tuple(images.shape)} vs {tuple(references.shape)}")
    if crop_border:
        images = images[..., crop_border:-crop_border, crop_border:-crop_border]
        references = references[..., crop_border:-crop_border, crop_border:-crop_border]
    if test_y_channel and images.shape[1] == 3:
        images, references = rgb_to_y(images), rgb_to_y(references)
    return images, references


def _psnr_8bit(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    mse = ((images - references) ** 2).mean(dim=(1, 2, 3))
    # mse == 0 gives +inf, as BasicSR returns float('inf').
    return 10.0 * torch.log10(255.0**2 / mse)


def _gaussian_window(device: torch.device) -> torch.Tensor:
    coords = torch.arange(SSIM_WINDOW_SIZE, dtype=torch.float64, device=device) - SSIM_WINDOW_SIZE // 2
    kernel = torch.exp(-(coords**2) / (2 * SSIM_SIGMA**2))
    kernel = kernel / kernel.sum()
    return torch.outer(kernel, kernel)


def _ssim_8bit(images: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    channels = images.shape[1]
    if min(images.shape[-2:]) < SSIM_WINDOW_SIZE:
        raise ValueError(
            f"SSIM needs images of at least {SSIM_WINDOW_SIZE}x{SSIM_WINDOW_SIZE} px after the border crop, "
            f"got {tuple(images.shape[-2:])}"
        )
    window = _gaussian_window(images.device).expand(channels, 1, SSIM_WINDOW_SIZE, SSIM_WINDOW_SIZE)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)  # valid region, like BasicSR's [5:-5, 5:-5]

    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mu1, mu2 = blur(images), blur(references)
    mu1_sq, mu2_sq, mu1_mu2 = mu1**2, mu2**2, mu1 * mu2
    sigma1_sq = blur(images * images) - mu1_sq
    sigma2_sq = blur(references * references) - mu2_sq
    sigma12 = blur(images * references) - mu1_mu2
    ssim_map = ((2 * mu1_mu2 + c1) * (2 * sigma12 + c2)) / ((mu1_sq + mu2_sq + c1) * (sigma1_sq + sigma2_sq + c2))
    return ssim_map.mean(dim=(2, 3)).mean(dim=1)  # per channel, then over channels


def _batch_to_255(images: torch.Tensor, quantize: bool) -> torch.Tensor:
    if quantize:
        return to_8bit_tensor(images)
    images = images.detach().to(torch.float64).clamp(0, 1) * 255.0
    return images[None] if images.ndim == 3 else images


def batch_psnr(
    images: torch.Tensor, references: torch.Tensor, crop_border: int = 0, test_y_channel: bool = False, quantize: bool = True
) -> torch.Tensor:
    """PSNR (dB) per image of two [0, 1] (B, C, H, W) batches; ``quantize=False`` skips the 8-bit rounding."""
    images, references = _batch_to_255(images, quantize), _batch_to_255(references, quantize)
    return _psnr_8bit(*_prepare(images, references, crop_border, test_y_channel))


def batch_ssim(
    images: torch.Tensor, references: torch.Tensor, crop_border: int = 0, test_y_channel: bool = False, quantize: bool = True
) -> torch.Tensor:
    """SSIM per image of two [0, 1] (B, C, H, W) batches; ``quantize=False`` skips the 8-bit rounding."""
    images, references = _batch_to_255(images, quantize), _batch_to_255(references, quantize)
    return _ssim_8bit(*_prepare(images, references, crop_border, test_y_channel))


def calculate_psnr(
    image: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, crop_border: int = 0, test_y_channel: bool = False
) -> float:
    """BasicSR's ``calculate_psnr`` for one pair (numpy HWC in [0, 255] or tensors in [0, 1])."""
    value = _psnr_8bit(*_prepare(to_8bit_tensor(image), to_8bit_tensor(reference), crop_border, test_y_channel))
    if value.numel() != 1:
        raise ValueError("calculate_psnr takes one image pair; use batch_psnr for batches")
    return float(value)


def calculate_ssim(
    image: np.ndarray | torch.Tensor, reference: np.ndarray | torch.Tensor, crop_border: int = 0, test_y_channel: bool = False
) -> float:
    """BasicSR's ``calculate_ssim`` for one pair (numpy HWC in [0, 255] or tensors in [0, 1])."""
    value = _ssim_8bit(*_prepare(to_8bit_tensor(image), to_8bit_tensor(reference), crop_border, test_y_channel))
    if value.numel() != 1:
        raise ValueError("calculate_ssim takes one image pair; use batch_ssim for batches")
    return float(value)

