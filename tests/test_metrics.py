"""BasicSR-style PSNR/SSIM against scikit-image and hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from utils.metrics import batch_psnr, batch_ssim, calculate_psnr, calculate_ssim, rgb_to_y


def noisy_pair(seed: int = 0, shape=(40, 48, 3), noise: int = 20):
    rng = np.random.default_rng(seed)
    clean = rng.integers(0, 256, shape, dtype=np.uint8)
    noisy = np.clip(clean.astype(int) + rng.integers(-noise, noise + 1, shape), 0, 255).astype(np.uint8)
    return clean, noisy


def skimage_ssim(a: np.ndarray, b: np.ndarray) -> float:
    kwargs = dict(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=255)
    if a.ndim == 3:
        kwargs["channel_axis"] = -1
    return structural_similarity(a.astype(np.float64), b.astype(np.float64), **kwargs)


def test_psnr_known_values():
    zeros = np.zeros((8, 8, 3), dtype=np.uint8)
    assert calculate_psnr(zeros + 1, zeros) == pytest.approx(10 * math.log10(255**2))  # mse 1: 48.13 dB
    assert calculate_psnr(zeros, zeros) == math.inf
    clean, noisy = noisy_pair()
    assert calculate_psnr(noisy, clean) == pytest.approx(peak_signal_noise_ratio(clean, noisy, data_range=255), abs=1e-10)
    assert calculate_psnr(noisy, clean, crop_border=4) == pytest.approx(
        peak_signal_noise_ratio(clean[4:-4, 4:-4], noisy[4:-4, 4:-4], data_range=255), abs=1e-10
    )


def test_ssim_matches_skimage_gaussian_ssim():
    clean, noisy = noisy_pair(1)
    assert calculate_ssim(noisy, clean) == pytest.approx(skimage_ssim(noisy, clean), abs=1e-10)
    assert calculate_ssim(noisy, clean, crop_border=3) == pytest.approx(skimage_ssim(noisy[3:-3, 3:-3], clean[3:-3, 3:-3]), abs=1e-10)
    assert calculate_ssim(noisy[..., 0], clean[..., 0]) == pytest.approx(skimage_ssim(noisy[..., 0], clean[..., 0]), abs=1e-10)
    assert calculate_ssim(clean, clean) == pytest.approx(1.0)


def test_y_channel_is_bt601_of_rgb():
    white, black = np.full((1, 1, 3), 255, np.uint8), np.zeros((1, 1, 3), np.uint8)
    pure_red = np.zeros((1, 1, 3), np.uint8)
    pure_red[..., 0] = 255
    to_y = lambda a: rgb_to_y(torch.from_numpy(a.astype(np.float64)).permute(2, 0, 1)[None]).item()  # noqa: E731
    assert to_y(white) == pytest.approx(235.0, abs=1e-3) and to_y(black) == pytest.approx(16.0)
    assert to_y(pure_red) == pytest.approx(16.0 + 65.481)  # the red weight, not the blue one (BGR would give 24.966)
    clean, noisy = noisy_pair(2)
    weights = np.array([65.481, 128.553, 24.966])
    y_clean, y_noisy = clean @ weights / 255 + 16, noisy @ weights / 255 + 16
    assert calculate_psnr(noisy, clean, test_y_channel=True) == pytest.approx(
        peak_signal_noise_ratio(y_clean, y_noisy, data_range=255), abs=1e-9
    )
    assert calculate_ssim(noisy, clean, test_y_channel=True) == pytest.approx(skimage_ssim(y_noisy, y_clean), abs=1e-9)


def test_tensors_are_quantised_like_basicsr_and_batches_match_single_images():
    clean, noisy = noisy_pair(3)
    batch_clean = torch.from_numpy(np.stack([clean, noisy, clean])).permute(0, 3, 1, 2).float() / 255
    batch_noisy = torch.from_numpy(np.stack([noisy, clean, noisy])).permute(0, 3, 1, 2).float() / 255
    # A float tensor off the 8-bit grid rounds to the same 8-bit image.
    jittered = (batch_noisy + 0.3 / 255).clamp(0, 1)
    assert calculate_psnr(jittered[0], batch_clean[0]) == pytest.approx(calculate_psnr(noisy, clean), abs=1e-10)
    psnr = batch_psnr(jittered, batch_clean, crop_border=2, test_y_channel=True)
    ssim = batch_ssim(jittered, batch_clean, crop_border=2)
    assert psnr.shape == (3,) and ssim.shape == (3,)
    for index, (a, b) in enumerate(((noisy, clean), (clean, noisy), (noisy, clean))):
        assert psnr[index].item() == pytest.approx(calculate_psnr(a, b, crop_border=2, test_y_channel=True), abs=1e-9)
        assert ssim[index].item() == pytest.approx(calculate_ssim(a, b, crop_border=2), abs=1e-9)
    unquantised = batch_psnr(jittered, batch_clean, quantize=False)
    assert not torch.allclose(unquantised, batch_psnr(jittered, batch_clean))
    with pytest.raises(ValueError, match="shapes differ"):
        calculate_psnr(clean, clean[:-1])
