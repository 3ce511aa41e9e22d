"""AdaIN and wavelet colour fixes (SeeSR's utils/wavelet_color_fix.py) against hand checks."""

import pytest
import torch

from utils.color_fix import (
    adain_color_fix,
    apply_color_fix,
    channel_mean_std,
    wavelet_color_fix,
    wavelet_decomposition,
)
from utils.errors import UserError


def test_adain_matches_reference_channel_mean_and_std():
    generator = torch.Generator().manual_seed(0)
    image = 0.1 + 0.8 * torch.rand(2, 3, 32, 32, generator=generator)
    reference = 0.3 + 0.4 * torch.rand(2, 3, 32, 32, generator=generator) + torch.tensor([0.1, 0.0, -0.1]).view(3, 1, 1)
    fixed = adain_color_fix(image, reference)
    assert fixed.min() > 0 and fixed.max() < 1  # nothing clipped, so the statistics must match
    (mean, std), (reference_mean, reference_std) = channel_mean_std(fixed), channel_mean_std(reference)
    torch.testing.assert_close(mean, reference_mean, rtol=0, atol=1e-6)
    # Both sides carry SeeSR's +1e-5 in the variance: a deterministic relative offset, measured 2.9e-4 at 1 and 2
    # threads; 3e-3 is 10x that, and an AdaIN that did not match the std would be off by tens of percent.
    torch.testing.assert_close(std, reference_std, rtol=3e-3, atol=0)
    # Per channel it is an affine map of the input: correlation with the input stays 1.
    flat_in, flat_out = image[0, 1].flatten(), fixed[0, 1].flatten()
    correlation = torch.corrcoef(torch.stack([flat_in, flat_out]))[0, 1]
    assert correlation > 0.9999


def test_adain_accepts_single_images():
    image, reference = torch.rand(3, 8, 8), torch.rand(3, 16, 16)  # any reference size
    assert adain_color_fix(image, reference).shape == (3, 8, 8)


def test_wavelet_decomposition_sums_back():
    image = torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    high, low = wavelet_decomposition(image)
    torch.testing.assert_close(high + low, image)
    assert low.std() < image.std()


def test_wavelet_keeps_detail_and_takes_low_frequencies_from_reference():
    # Detail: a +-0.1 checkerboard, which the 3x3 binomial blur removes exactly (0.25 - 0.5 + 0.25 = 0),
    # on a flat 0.5. Reference: a horizontal ramp, which every symmetric blur leaves unchanged away from the
    # border (the 5 levels reach 1 + 2 + 4 + 8 + 16 = 31 px). So inside, the result is ramp + checkerboard.
    size = 96
    y, x = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    checker = 0.1 * (1 - 2 * ((x + y) % 2)).float()
    image = (0.5 + checker).expand(3, size, size)
    ramp = (0.2 + 0.6 * x.float() / (size - 1)).expand(3, size, size)
    fixed = wavelet_color_fix(image, ramp)
    inside = slice(31, size - 31)
    torch.testing.assert_close(fixed[:, inside, inside], (ramp + checker)[:, inside, inside], rtol=0, atol=1e-5)
    # Identity: fixing an image against itself changes nothing.
    torch.testing.assert_close(wavelet_color_fix(ramp, ramp), ramp)


def test_apply_color_fix_dispatch_and_errors():
    image, reference = torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8)
    assert torch.equal(apply_color_fix(image, reference, "nofix"), image)
    torch.testing.assert_close(apply_color_fix(image, reference, "adain"), adain_color_fix(image, reference))
    with pytest.raises(UserError, match="--align_method"):
        apply_color_fix(image, reference, "histogram")
    with pytest.raises(UserError, match="reference at the result's size"):
        wavelet_color_fix(image, torch.rand(1, 3, 16, 16))
