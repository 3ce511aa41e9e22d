"""Colour correction of a super-resolved image against its upscaled low-resolution input.

Diffusion SR drifts in colour; SeeSR (cswry/SeeSR, ``utils/wavelet_color_fix.py``, itself from Li Yi's
sd-webui-stablesr ``colorfix.py``) pulls it back after decoding with one of two fixes:

* **AdaIN** (SeeSR's default): give every channel of the result the mean and standard deviation of the
  reference (unbiased variance + 1e-5, as the reference code);
* **wavelet**: split both images into high and low frequencies with a 5-level a-trous decomposition (3x3
  binomial blur, dilation 1, 2, 4, 8, 16, replicate padding) and keep the result's high frequencies on the
  reference's low frequencies.

Written on tensors (``[B, 3, H, W]`` or ``[3, H, W]`` in [0, 1]); outputs are clamped to [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from utils.errors import UserError

COLOR_FIX_METHODS = ("adain", "wavelet", "nofix")


def _as_batch(image: torch.Tensor) -> tuple[torch.Tensor, bool]:
    if image.ndim == 3:
        return image.unsqueeze(0), True
    if image.ndim != 4:
        raise UserError(f"Expected an image tensor [3, H, W] or [B, 3, H, W], found shape {tuple(image.shape)}.")
    return image, False


def channel_mean_std(image: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample, per-channel mean and ``sqrt(unbiased variance + eps)``, shaped ``[B, C, 1, 1]``."""
    flat = image.flatten(2)
    mean = flat.mean(dim=2)[..., None, None]
    std = (flat.var(dim=2) + eps).sqrt()[..., None, None]
    return mean, std


def adain_color_fix(image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Match each channel's mean and standard deviation of ``image`` to those of ``reference``."""
    batch, squeeze = _as_batch(image.float())
    reference, _ = _as_batch(reference.float().to(batch.device))
    mean, std = channel_mean_std(batch)
    reference_mean, reference_std = channel_mean_std(reference)
    fixed = ((batch - mean) / std * reference_std + reference_mean).clamp(0.0, 1.0)
    return fixed[0] if squeeze else fixed


def wavelet_blur(image: torch.Tensor, dilation: int) -> torch.Tensor:
    """3x3 binomial blur with the given dilation (one a-trous wavelet level), replicate-padded."""
    kernel_1d = torch.tensor([0.25, 0.5, 0.25], dtype=image.dtype, device=image.device)
    kernel = torch.outer(kernel_1d, kernel_1d)[None, None].repeat(image.shape[1], 1, 1, 1)
    padded = F.pad(image, (dilation, dilation, dilation, dilation), mode="replicate")
    return F.conv2d(padded, kernel, groups=image.shape[1], dilation=dilation)


def wavelet_decomposition(image: torch.Tensor, levels: int = 5) -> tuple[torch.Tensor, torch.Tensor]:
    """``(high, low)`` with ``high + low == image``: ``low`` is the image blurred at all ``levels``."""
    low = image
    for level in range(levels):
        low = wavelet_blur(low, 2**level)
    return image - low, low


def wavelet_color_fix(image: torch.Tensor, reference: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Keep the high frequencies of ``image`` and take the low ones (colour, shading) from ``reference``."""
    batch, squeeze = _as_batch(image.float())
    reference, _ = _as_batch(reference.float().to(batch.device))
    if reference.shape != batch.shape:
        raise UserError(
            f"The wavelet colour fix needs the reference at the result's size {tuple(batch.shape[-2:])}, "
            f"found {tuple(reference.shape[-2:])}."
        )
    high, _ = wavelet_decomposition(batch, levels)
    _, reference_low = wavelet_decomposition(reference, levels)
    fixed = (high + reference_low).clamp(0.0, 1.0)
    return fixed[0] if squeeze else fixed


def apply_color_fix(image: torch.Tensor, reference: torch.Tensor, method: str = "adain") -> torch.Tensor:
    """``method``: ``"adain"`` (SeeSR's default), ``"wavelet"`` or ``"nofix"``."""
    if method == "adain":
        return adain_color_fix(image, reference)
    if method == "wavelet":
        return wavelet_color_fix(image, reference)
    if method == "nofix":
        return image.clamp(0.0, 1.0)
    raise UserError(f"Expected --align_method adain, wavelet or nofix, found {method!r}.")
