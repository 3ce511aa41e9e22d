"""Laplacian gradient loss: L1 distance between the per-channel Laplacians of two images.

From the official Phaseformer ``train.py`` (``Gradient_Loss``): a fixed 3x3 Laplacian
``[[0, 1, 0], [1, -4, 1], [0, 1, 0]]`` applied depth-wise to each channel without padding, then
``nn.L1Loss`` (mean) between the two responses. The filtering is kornia's ``filters.filter2d`` (``padding="valid"``:
the same depth-wise convolution, so the same values as the official grouped ``conv2d``).
"""

from __future__ import annotations

import kornia
import torch
import torch.nn as nn
import torch.nn.functional as F

LAPLACIAN_3X3 = ((0.0, 1.0, 0.0), (1.0, -4.0, 1.0), (0.0, 1.0, 0.0))


class LaplacianGradientLoss(nn.Module):
    """``mean(|laplacian(prediction) - laplacian(target)|)`` over the valid (unpadded) region, in fp32."""

    def __init__(self, channels: int = 3):
        super().__init__()
        # A constant, not a weight: kept out of the state dict and of the optimiser.
        self.register_buffer("kernel", torch.tensor(LAPLACIAN_3X3)[None], persistent=False)
        self.channels = channels

    def laplacian(self, image: torch.Tensor) -> torch.Tensor:
        return kornia.filters.filter2d(image.float(), self.kernel, padding="valid")

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.autocast(device_type=prediction.device.type, enabled=False):
            return F.l1_loss(self.laplacian(prediction), self.laplacian(target))
