"""MS-SSIM loss (``1 - MS-SSIM``) through pytorch-msssim, with fewer scales for small crops.

Wang, Simoncelli and Bovik, "Multiscale structural similarity for image quality assessment" (2003). The
official Phaseformer ``train.py`` uses ``pytorch_msssim.MS_SSIM(win_size=11, win_sigma=1.5, data_range=1)``
and *adds* the similarity to the loss (so training lowers MS-SSIM); that behaviour is kept behind
``as_similarity=True`` for reproduction.

pytorch-msssim asserts that the smaller side exceeds ``(win_size - 1) * 2**4`` (160 px) for its five
scales. Smaller crops use the largest number of scales ``L`` with ``side > (win_size - 1) * 2**(L - 1)``
and the first ``L`` standard scale weights renormalised to sum to 1. The per-scale SSIM for those is computed
here (:func:`ssim_and_contrast`, the same separable Gaussian window and constants as pytorch-msssim), since the
library's public ``ms_ssim`` keeps its five-scale size assertion whatever the weights.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim import ms_ssim

from utils.errors import UserError

MS_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


def gaussian_window(win_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """The normalised 1-D Gaussian window ``[win_size]`` of SSIM (Wang et al. 2004: 11 taps, sigma 1.5)."""
    coords = torch.arange(win_size, dtype=torch.float32) - win_size // 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim_and_contrast(
    x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, window: torch.Tensor | None = None,
    k1: float = 0.01, k2: float = 0.03,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel SSIM and contrast-structure term ``[B, C]`` of two ``[B, C, H, W]`` batches.

    Valid (unpadded) separable Gaussian filtering, as pytorch-msssim and the reference MATLAB code.
    """
    if window is None:
        window = gaussian_window()
    channels = x.shape[1]
    window = window.to(x)
    rows = window.view(1, 1, 1, -1).repeat(channels, 1, 1, 1)
    cols = window.view(1, 1, -1, 1).repeat(channels, 1, 1, 1)

    def blur(image: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(image, rows, groups=channels), cols, groups=channels)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_x, mu_y = blur(x), blur(y)
    sigma_xx = blur(x * x) - mu_x**2
    sigma_yy = blur(y * y) - mu_y**2
    sigma_xy = blur(x * y) - mu_x * mu_y
    contrast_map = (2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x**2 + mu_y**2 + c1) * contrast_map
    return ssim_map.flatten(2).mean(-1), contrast_map.flatten(2).mean(-1)


def msssim_levels(smaller_side: int, win_size: int = 11) -> int:
    """The number of MS-SSIM scales (1..5) an image with this smaller side supports."""
    levels = 0
    while levels < len(MS_SSIM_SCALE_WEIGHTS) and smaller_side > (win_size - 1) * 2**levels:
        levels += 1
    return levels


def ms_ssim_adaptive(
    x: torch.Tensor,
    y: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    win_sigma: float = 1.5,
    levels: int | None = None,
) -> torch.Tensor:
    """Mean MS-SSIM of two (B, C, H, W) batches with as many scales as their size allows (or ``levels``)."""
    smaller_side = min(x.shape[-2:])
    if levels is None:
        levels = msssim_levels(smaller_side, win_size)
    if levels < 1 or smaller_side < win_size:
        raise UserError(
            f"Images of {tuple(x.shape[-2:])} px are too small for (MS-)SSIM with an {win_size} px window; "
            f"use crops of at least {win_size + 1} px."
        )
    if levels == len(MS_SSIM_SCALE_WEIGHTS):
        return ms_ssim(x, y, data_range=data_range, win_size=win_size, win_sigma=win_sigma)
    weights = torch.tensor(MS_SSIM_SCALE_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    window = gaussian_window(win_size, win_sigma)
    contrast_terms = []
    for level in range(levels):
        ssim_per_channel, contrast = ssim_and_contrast(x, y, data_range, window)
        if level < levels - 1:
            contrast_terms.append(torch.relu(contrast))
            padding = [side % 2 for side in x.shape[2:]]
            x = F.avg_pool2d(x, kernel_size=2, padding=padding)
            y = F.avg_pool2d(y, kernel_size=2, padding=padding)
    stacked = torch.stack(contrast_terms + [torch.relu(ssim_per_channel)], dim=0)
    return torch.prod(stacked ** weights.view(-1, 1, 1), dim=0).mean()


class MSSSIMLoss(nn.Module):
    """``1 - MS-SSIM(prediction, target)`` in fp32 (``as_similarity=True``: ``+MS-SSIM``, the reference bug)."""

    def __init__(self, data_range: float = 1.0, win_size: int = 11, win_sigma: float = 1.5, as_similarity: bool = False):
        super().__init__()
        self.data_range = data_range
        self.win_size = win_size
        self.win_sigma = win_sigma
        self.as_similarity = as_similarity

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            similarity = ms_ssim_adaptive(
                prediction.float(), target.float(), self.data_range, self.win_size, self.win_sigma
            )
        return similarity if self.as_similarity else 1.0 - similarity
