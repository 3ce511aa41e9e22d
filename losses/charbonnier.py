"""Charbonnier loss, a smooth L1: ``mean(sqrt((x - y)^2 + eps^2))``.

Charbonnier et al., "Two deterministic half-quadratic regularization algorithms for computed imaging"
(ICIP 1994); the form and ``eps = 1e-3`` used by Restormer/MPRNet and by the ``CharbonnierLoss`` class that
the official Phaseformer ``train.py`` defines (but does not use: it trains with ``nn.SmoothL1Loss`` under
the Charbonnier name, kept here behind ``PhaseformerLoss(pixel_loss="smoothl1")``).
"""

from __future__ import annotations

import torch
import torch.nn as nn


class CharbonnierLoss(nn.Module):
    """``mean(sqrt((prediction - target)^2 + eps^2))``, computed in fp32."""

    def __init__(self, eps: float = 1e-3):
        super().__init__()
        self.eps = eps

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        diff = prediction.float() - target.float()
        return torch.sqrt(diff * diff + self.eps**2).mean()
