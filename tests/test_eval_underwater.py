"""UIQM and UCIQE (utils/underwater_metrics.py) against values measured with the public implementations they follow.

The reference numbers were measured on 2026-12-01 by running, in a throwaway folder outside the repository:

* FUnIE-GAN ``Evaluation/uqim_utils.py`` (xahidbuffon/FUnIE-GAN at 8f934c8; ``k1``/``k2`` cast to int, which is
  what its Python 2 division did) -> ``getUIQM(image)`` and its ``_uicm``/``_uism``/``_uiconm`` on float32 images;
* JOU-UIP/UCIQE ``UCIQE.py`` (at 02a3cf3) with opencv-python-headless 5.0.0 on the PNG of each image, once as
  published and once with ``cv2.cvtColor`` replaced by our scikit-image Lab in OpenCV's 8-bit encoding;

on scikit-image's ``astronaut`` (512x512), ``coffee`` (400x600) and ``chelsea`` (300x451) photographs.
"""

from __future__ import annotations

import numpy as np
import pytest
import skimage.data
import torch

from utils.underwater_metrics import uciqe, uiqm, uiqm_components

# name: (UIQM, UICM, UISM, UIConM) by FUnIE-GAN's script.
FUNIE_UIQM = {
    "astronaut": (2.4076257501, 8.4247080149, 5.6610652307, 0.1393831067),
    "coffee": (2.5204029265, 4.6218231763, 6.2337213685, 0.1536233583),
    "chelsea": (2.8693667360, 1.8628485410, 6.1483084888, 0.2800433280),
}
# name: (UCIQE as published with OpenCV's Lab, UCIQE of the published formula on our Lab).
JOU_UCIQE = {
    "astronaut": (0.6882703096, 0.6883591997),
    "coffee": (0.6631892450, 0.6622070500),
    "chelsea": (0.5646103277, 0.5658488078),
}


@pytest.mark.parametrize("name", sorted(FUNIE_UIQM))
def test_uiqm_matches_funie_gan(name):
    image = getattr(skimage.data, name)()
    parts = uiqm_components(image)
    expected_uiqm, expected_uicm, expected_uism, expected_uiconm = FUNIE_UIQM[name]
    # The reference sums its trimmed mean in float32 (Python's sum over float32 scalars), we in float64: UICM
    # differs by up to 1e-5 relative (coffee), UIQM by 5e-7; the tolerances are 10-20x those.
    assert parts["uicm"] == pytest.approx(expected_uicm, rel=1e-4)
    assert parts["uism"] == pytest.approx(expected_uism, rel=1e-7)
    assert parts["uiconm"] == pytest.approx(expected_uiconm, rel=1e-7)
    assert parts["uiqm"] == pytest.approx(expected_uiqm, rel=1e-5)


@pytest.mark.parametrize("name", sorted(JOU_UCIQE))
def test_uciqe_matches_the_authors_python_release(name):
    image = getattr(skimage.data, name)()
    published, same_lab = JOU_UCIQE[name]
    # The formula, given the same Lab values: equal to 1e-10 measured.
    assert uciqe(image) == pytest.approx(same_lab, abs=1e-8)
    # As published (OpenCV's fixed-point Lab: ~14 % of pixels one level apart): 2.2e-3 at most measured (chelsea),
    # the luminance-contrast term moving by whole levels. 0.025 is >10x that and still separates the images below.
    assert uciqe(image) == pytest.approx(published, abs=0.025)


def test_inputs_and_known_behaviour():
    image = skimage.data.coffee()[:200, :200]
    tensor = torch.from_numpy(image).permute(2, 0, 1).float() / 255
    assert uiqm(tensor) == pytest.approx(uiqm(image), rel=1e-12) and uciqe(tensor[None]) == pytest.approx(uciqe(image), rel=1e-12)
    # A blue-green cast with lowered contrast (the underwater look) scores lower on both than the photograph.
    degraded = (image.astype(np.float64) * [0.35, 0.75, 0.85] * 0.6 + [10, 50, 60]).clip(0, 255).astype(np.uint8)
    assert uiqm(degraded) < uiqm(image) and uciqe(degraded) < uciqe(image)
    assert uiqm(image, resize=256) != pytest.approx(uiqm(image))  # FUnIE-GAN's script's 256x256 resize is a choice
    with pytest.raises(ValueError, match="at least 10x10"):
        uiqm(image[:8, :8])
    with pytest.raises(ValueError, match="HxWx3"):
        uciqe(image[..., 0])
