"""MS-SSIM loss (``1 - MS-SSIM``) through pytorch-msssim, with fewer scales for small crops.

Wang, Simoncelli and Bovik, "Multiscale structural similarity for image quality assessment" (2003). The
official Phaseformer ``train.py`` uses ``pytorch_msssim.MS_SSIM(win_size=11, win_sigma=1.5, data_range=1)``
and *adds* the similarity to the loss (so training lowers MS-SSIM); that behaviour is kept behind
``as_similarity=True`` for reproduction.

pytorch-msssim asserts that the smaller side exceeds ``(win_size - 1) * 2**4`` (160 px) for its five
scales. Smaller crops use the largest number of scales ``L`` with ``side > (win_size - 1) * 2**(L - 1)``
and the first ``L`` standard scale weights renormalised to sum to 1.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from pytorch_msssim import ms_ssim
from pytorch_msssim.ssim import _fspecial_gauss_1d, _ssim

from utils.errors import UserError

MS_SSIM_SCALE_WEIGHTS = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)


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
    # The library's own per-scale SSIM; only its five-scale size assertion is bypassed.
    weights = torch.tensor(MS_SSIM_SCALE_WEIGHTS[:levels], dtype=x.dtype, device=x.device)
    weights = weights / weights.sum()
    window = _fspecial_gauss_1d(win_size, win_sigma).repeat([x.shape[1], 1, 1, 1])
    contrast_terms = []
    for level in range(levels):
        ssim_per_channel, contrast = _ssim(x, y, data_range=data_range, win=window, size_average=False)
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
