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

from utils.errors import UserError
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


def test_infer_phaseformer_writes_uiqm_uciqe_and_lpips(tmp_path, capsys):
    """``infer.py phaseformer --underwater_metrics`` (and LPIPS with --gt_dir): the CSV's values are the library's on
    the written images; without ground truth the CSV holds the no-reference columns only."""
    import csv

    from PIL import Image
    from torchvision.models import alexnet

    import infer
    from models.phaseformer import build_phaseformer
    from utils.iqa_metrics import LPIPS_CHANNELS, load_lpips

    torch.manual_seed(0)
    torch.save(build_phaseformer("phaseformer_tiny").state_dict(), tmp_path / "weights.pth")
    # torchvision's AlexNet layout; fp16 halves the 240 MB file (loading casts back to float32).
    torch.save({k: v.half() for k, v in alexnet(weights=None).state_dict().items()}, tmp_path / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}, tmp_path / "alex.pth")
    photo = skimage.data.coffee()
    for folder, shift in (("input", 40), ("gt", 0)):
        (tmp_path / folder).mkdir()
        for index in range(2):
            crop = photo[100 * index : 100 * index + 48, 200:248].astype(int)
            tinted = np.clip(crop * [0.5, 0.9, 1.0] + [0, shift, shift], 0, 255).astype(np.uint8)
            Image.fromarray(tinted).save(tmp_path / folder / f"p{index}.png")
    base = ["phaseformer", "--checkpoint", str(tmp_path / "weights.pth"), "--input", str(tmp_path / "input"), "--device", "cpu",
            "--outputs", "L", "--underwater_metrics"]
    report = infer.main(infer.parse_args(base + ["--output_dir", str(tmp_path / "nr")]))
    rows = list(csv.reader(open(report["csv"])))
    assert rows[0] == ["name", "uiqm_input", "uiqm", "uciqe_input", "uciqe"] and rows[-1][0] == "mean" and "mean_psnr" not in report
    written = np.asarray(Image.open(tmp_path / "nr" / "L" / "p1.png"))
    source = np.asarray(Image.open(tmp_path / "input" / "p1.png"))
    assert float(rows[2][2]) == pytest.approx(uiqm(written), abs=1e-6) and float(rows[2][4]) == pytest.approx(uciqe(written), abs=1e-6)
    assert float(rows[2][1]) == pytest.approx(uiqm(source), abs=1e-6)
    assert "UIQM" in capsys.readouterr().out
    report = infer.main(infer.parse_args(base + ["--output_dir", str(tmp_path / "gt_out"), "--gt_dir", str(tmp_path / "gt"),
                                                 "--lpips_weights", str(tmp_path / "alex.pth"),
                                                 "--lpips_backbone", str(tmp_path / "alexnet-owt-7be5be79.pth")]))
    rows = list(csv.reader(open(report["csv"])))
    assert rows[0] == ["name", "psnr", "ssim", "lpips", "uiqm_input", "uiqm", "uciqe_input", "uciqe"]
    model, _ = load_lpips(str(tmp_path / "alex.pth"), str(tmp_path / "alexnet-owt-7be5be79.pth"), torch.device("cpu"))
    to_tensor = lambda a: torch.from_numpy(np.array(a)).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # noqa: E731
    gt = np.asarray(Image.open(tmp_path / "gt" / "p1.png"))
    written = np.asarray(Image.open(tmp_path / "gt_out" / "L" / "p1.png"))
    assert float(rows[2][3]) == pytest.approx(float(model(to_tensor(written), to_tensor(gt))[0]), abs=1e-5)
    with pytest.raises(UserError, match="add --gt_dir"):
        infer.main(infer.parse_args(base + ["--output_dir", str(tmp_path / "x"), "--lpips_weights", str(tmp_path / "alex.pth")]))
    with pytest.raises(UserError, match="--lpips_weights .*nope.pth does not exist"):
        infer.main(infer.parse_args(base + ["--output_dir", str(tmp_path / "y"), "--gt_dir", str(tmp_path / "gt"),
                                            "--lpips_weights", str(tmp_path / "nope.pth")]))
