"""No-reference underwater image quality: UIQM (Panetta et al. 2016) and UCIQE (Yang and Sowmya 2015).

Neither metric has one library implementation; papers report the values of a few public scripts, which differ
from the papers' formulas in small ways. To make our numbers comparable with the underwater-enhancement
literature, each function reproduces one widely used public implementation, and tests/test_eval_underwater.py
checks it against values measured by running that implementation on scikit-image's photographs:

* :func:`uiqm`: FUnIE-GAN's ``Evaluation/uqim_utils.py`` (xahidbuffon/FUnIE-GAN, Islam et al. 2020), the Python UIQM
  most underwater papers use (its script first resizes images to 256x256; pass ``resize=256`` for that). It
  keeps that script's details, which differ from the paper: the alpha-trimmed mean drops one more low value
  (``x[T_L + 1 : K - T_R]``), the blue weight of UISM is 0.144 (the paper's 0.114 mistyped), the EME blocks are
  10x10 with the remainder cut off, and UIConM uses the plain (non-PLIP) logAMEE over the three channels.
  UIQM = 0.0282 UICM + 0.2953 UISM + 3.5753 UIConM.
* :func:`uciqe`: the UCIQE authors' group's Python release (JOU-UIP/UCIQE ``UCIQE.py``, the port of their
  ``UCIQE.m``), on OpenCV's 8-bit Lab encoding (L * 255 / 100, a + 128, b + 128), here computed with
  scikit-image's Lab and rounded like OpenCV (OpenCV is not a dependency; its fixed-point conversion differs
  in a few pixels by one level). UCIQE = 0.4680 sigma_chroma + 0.2745 con_lum + 0.2576 mean_saturation.

Both take one RGB image (uint8 array HxWx3, or a float tensor/array in [0, 1]) and return a Python float;
higher is better for both.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from scipy import ndimage

UIQM_WEIGHTS = (0.0282, 0.2953, 3.5753)
UISM_CHANNEL_WEIGHTS = (0.299, 0.587, 0.144)  # FUnIE-GAN's values (the paper's blue weight is 0.114)
UCIQE_WEIGHTS = (0.4680, 0.2745, 0.2576)
UIQM_BLOCK = 10


def to_uint8_rgb(image) -> np.ndarray:
    """An HxWx3 uint8 array from a uint8 array, a [0, 1] float array, or a [0, 1] CHW tensor."""
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        image = image.permute(1, 2, 0).float().clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    image = np.asarray(image)
    if image.dtype != np.uint8:
        image = np.clip(np.round(image.astype(np.float64) * 255), 0, 255).astype(np.uint8)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape HxWx3, got {image.shape}")
    return image


def _trimmed_mean(values: np.ndarray, alpha_low: float = 0.1, alpha_high: float = 0.1) -> float:
    values = np.sort(values, kind="stable")
    count = len(values)
    low, high = math.ceil(alpha_low * count), math.floor(alpha_high * count)
    # FUnIE-GAN sums x[T_L + 1 : K - T_R] but divides by K - T_L - T_R.
    return float(values[low + 1 : count - high].astype(np.float64).sum() / (count - low - high))


def _uicm(rgb: np.ndarray) -> float:
    red, green, blue = (rgb[..., c].ravel() for c in range(3))
    rg, yb = red - green, (red + green) / 2 - blue
    mu_rg, mu_yb = _trimmed_mean(rg), _trimmed_mean(yb)
    var_rg = float(((rg.astype(np.float64) - mu_rg) ** 2).mean())
    var_yb = float(((yb.astype(np.float64) - mu_yb) ** 2).mean())
    return -0.0268 * math.sqrt(mu_rg**2 + mu_yb**2) + 0.1586 * math.sqrt(var_rg + var_yb)


def _blocks(x: np.ndarray, size: int) -> np.ndarray:
    """``[k2, k1, ...]`` blocks of ``size`` px; the remainder is cut off (as the reference does)."""
    k2, k1 = x.shape[0] // size, x.shape[1] // size
    x = x[: k2 * size, : k1 * size]
    return x.reshape(k2, size, k1, size, *x.shape[2:]).swapaxes(1, 2).reshape(k2, k1, -1)


def _eme(x: np.ndarray, size: int) -> float:
    blocks = _blocks(x, size)
    high, low = blocks.max(-1).astype(np.float64), blocks.min(-1).astype(np.float64)
    valid = (low != 0) & (high != 0)
    terms = np.zeros_like(high)
    terms[valid] = np.log(high[valid] / low[valid])
    return 2.0 / (blocks.shape[0] * blocks.shape[1]) * float(terms.sum())


def _uism(rgb: np.ndarray) -> float:
    total = 0.0
    for channel, weight in zip(range(3), UISM_CHANNEL_WEIGHTS):
        x = rgb[..., channel]
        magnitude = np.hypot(ndimage.sobel(x, 0), ndimage.sobel(x, 1))
        magnitude *= 255.0 / np.max(magnitude)
        total += weight * _eme(magnitude * x, UIQM_BLOCK)
    return total


def _uiconm(rgb: np.ndarray) -> float:
    blocks = _blocks(rgb, UIQM_BLOCK)
    high, low = blocks.max(-1).astype(np.float64), blocks.min(-1).astype(np.float64)
    top, bottom = high - low, high + low
    valid = (top != 0) & (bottom != 0)
    ratio = np.ones_like(top)
    ratio[valid] = top[valid] / bottom[valid]
    return -1.0 / (blocks.shape[0] * blocks.shape[1]) * float((ratio * np.log(ratio))[valid].sum())


def uiqm_components(image, resize: int | None = None) -> dict[str, float]:
    """UICM, UISM, UIConM and UIQM of one RGB image (``resize``: resized to that square first with PIL's default
    filter, as FUnIE-GAN's script does with 256; None keeps the size)."""
    rgb = to_uint8_rgb(image)
    if resize:
        from PIL import Image

        rgb = np.asarray(Image.fromarray(rgb).resize((resize, resize)))
    x = rgb.astype(np.float32)
    if min(x.shape[:2]) < UIQM_BLOCK:
        raise ValueError(f"UIQM needs images of at least {UIQM_BLOCK}x{UIQM_BLOCK} px, got {x.shape[1]}x{x.shape[0]}")
    parts = {"uicm": _uicm(x), "uism": _uism(x), "uiconm": _uiconm(x)}
    parts["uiqm"] = sum(w * parts[name] for w, name in zip(UIQM_WEIGHTS, ("uicm", "uism", "uiconm")))
    return parts


def uiqm(image, resize: int | None = None) -> float:
    """UIQM of one RGB image, as FUnIE-GAN's script computes it (see the module docstring)."""
    return uiqm_components(image, resize)["uiqm"]


def opencv_lab_8bit(rgb: np.ndarray) -> np.ndarray:
    """Lab in OpenCV's 8-bit encoding (L * 255 / 100, a + 128, b + 128, rounded and clipped), from scikit-image's Lab."""
    from skimage.color import rgb2lab

    lab = rgb2lab(rgb)
    encoded = np.stack([lab[..., 0] * 255.0 / 100.0, lab[..., 1] + 128.0, lab[..., 2] + 128.0], axis=-1)
    return np.clip(np.round(encoded), 0, 255).astype(np.uint8)


def uciqe(image) -> float:
    """UCIQE of one RGB image, as JOU-UIP/UCIQE's ``UCIQE.py`` computes it (see the module docstring)."""
    lab = opencv_lab_8bit(to_uint8_rgb(image)).astype(np.float64) / 255.0
    lum, a, b = lab[..., 0], lab[..., 1], lab[..., 2]
    chroma = np.sqrt(a**2 + b**2)
    saturation = chroma / np.sqrt(chroma**2 + lum**2)
    mean_chroma = chroma.mean()
    sigma_chroma = np.sqrt(np.mean(np.abs(1 - (mean_chroma / chroma) ** 2)))
    # MATLAB's stretchlim as the reference ports it: a 65536-bin histogram over the values' own range, the first
    # bins past 1 % and at 99 % of the CDF, read as fractions of the bin count.
    bins = 65536
    hist, _ = np.histogram(lum, bins)
    cdf = np.cumsum(hist) / hist.sum()
    low, high = np.flatnonzero(cdf > 0.01)[0], np.flatnonzero(cdf >= 0.99)[0]
    con_lum = ((high - 1) - (low - 1)) / (bins - 1)
    c1, c2, c3 = UCIQE_WEIGHTS
    return float(c1 * sigma_chroma + c2 * con_lum + c3 * np.mean(saturation))
