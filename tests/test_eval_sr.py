"""scripts/eval_sr.py's Real-ISR table: LPIPS equal to the lpips package, DISTS by piq equal to the authors' DISTS,
FID by torch-fidelity, pyiqa's no-reference metrics (a stand-in module: pyiqa is not installed by CI), the per-image
CSV, the Markdown summary, --compare, and the missing-file errors.

Weights are random values in the public layouts (torchvision's AlexNet and VGG16 state dicts, the lpips heads,
DISTS' alpha/beta); most of the module's time is writing and reading the VGG16 file.
"""

from __future__ import annotations

import csv
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import UserError

pytest.importorskip("piq")


def image_pairs(root: Path, count: int = 3, size: int = 64) -> tuple[Path, Path, Path]:
    """HR crops of scikit-image photographs, and two "SR" versions of them (mild and strong blur-noise)."""
    from PIL import ImageFilter

    from data.demo_data import load_sample_photographs, random_crops

    rng = np.random.default_rng(0)
    folders = [root / "hr", root / "sr_good", root / "sr_bad"]
    for folder in folders:
        folder.mkdir(parents=True, exist_ok=True)
    photos = list(load_sample_photographs().values())
    for index in range(count):
        crop = Image.fromarray(random_crops(photos[index], 1, size, rng)[0])
        crop.save(folders[0] / f"{index:03d}.png")
        crop.filter(ImageFilter.GaussianBlur(0.6)).save(folders[1] / f"{index:03d}.png")
        noisy = np.asarray(crop.filter(ImageFilter.GaussianBlur(2.0))).astype(int) + rng.integers(-20, 21, (size, size, 3))
        Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)).save(folders[2] / f"{index:03d}.png")
    return tuple(folders)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """Random AlexNet and VGG16 (fp16 to halve the files: loading casts back) and LPIPS heads; DISTS' published
    alpha/beta as bundled with the authors' package when it is installed, else random."""
    from torchvision.models import alexnet, vgg16

    from scripts.eval_sr import LPIPS_CHANNELS

    root = tmp_path_factory.mktemp("w")
    torch.manual_seed(0)
    torch.save({k: v.half() for k, v in alexnet(weights=None).state_dict().items()}, root / "alexnet-owt-7be5be79.pth")
    torch.save({f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(LPIPS_CHANNELS)}, root / "alex.pth")
    torch.save({k: v.half() for k, v in vgg16(weights=None).state_dict().items()}, root / "vgg16-397923af.pth")
    try:
        import DISTS_pytorch

        dists = torch.load(Path(DISTS_pytorch.__file__).parent / "weights.pt", weights_only=True)
    except ImportError:
        dists = {"alpha": torch.rand(1, 1475, 1, 1) * 0.2, "beta": torch.rand(1, 1475, 1, 1) * 0.2}
    torch.save(dists, root / "dists_weights.pt")
    return root


def test_lpips_equals_the_lpips_package(weights):
    lpips = pytest.importorskip("lpips")
    from scripts.eval_sr import load_lpips

    ours, _ = load_lpips(str(weights / "alex.pth"), str(weights / "alexnet-owt-7be5be79.pth"), torch.device("cpu"))
    reference = lpips.LPIPS(net="alex", pretrained=False, pnet_rand=True, verbose=False)
    backbone = torch.load(weights / "alexnet-owt-7be5be79.pth", weights_only=True)
    # lpips' slices keep torchvision's feature indices: features.<i> -> net.slice<k>.<i>.
    for slice_ in (reference.net.slice1, reference.net.slice2, reference.net.slice3, reference.net.slice4, reference.net.slice5):
        for name, param in slice_.named_parameters():
            param.data.copy_(backbone[f"features.{name}"])
    heads = torch.load(weights / "alex.pth", weights_only=True)
    for i, lin in enumerate(reference.lins):
        lin.model[1].weight.data.copy_(heads[f"lin{i}.model.1.weight"])
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(2, 3, 48, 48, generator=generator) * 2 - 1, torch.rand(2, 3, 48, 48, generator=generator) * 2 - 1
    with torch.no_grad():
        expected = reference(x, y).flatten()
    torch.testing.assert_close(ours(x, y), expected, rtol=1e-4, atol=1e-6)  # measured equal; the margin covers sum order


def test_dists_equals_the_authors_dists(weights, monkeypatch):
    dists_pytorch = pytest.importorskip("DISTS_pytorch")
    from utils.iqa_metrics import load_dists, torch_hub_dir

    ours, note = load_dists(str(weights / "dists_weights.pt"), str(weights / "vgg16-397923af.pth"), torch.device("cpu"))
    assert ours is not None and note.startswith("DISTS (piq)")
    # The authors' DISTS (dingkeyan93/DISTS, DISTS_pytorch) on the same VGG16 file (its torchvision lookup in the hub
    # cache) and the same alpha/beta.
    hub = weights / "hub"
    (hub / "checkpoints").mkdir(parents=True, exist_ok=True)
    if not (hub / "checkpoints" / "vgg16-397923af.pth").exists():
        (hub / "checkpoints" / "vgg16-397923af.pth").symlink_to(weights / "vgg16-397923af.pth")
    with torch_hub_dir(hub):
        reference = dists_pytorch.DISTS(load_weights=False)
    state = torch.load(weights / "dists_weights.pt", weights_only=True)
    reference.alpha.data, reference.beta.data = state["alpha"], state["beta"]
    generator = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, 64, 64, generator=generator)
    y = (x + 0.1 * torch.randn(2, 3, 64, 64, generator=generator)).clamp(0, 1)
    with torch.no_grad():
        value, expected = ours(x, y), reference(x, y)
    # Values ~4e-3 with the published alpha/beta on a random VGG: 3e-7 apart measured (float32 sums in another order).
    torch.testing.assert_close(value, expected, rtol=1e-4, atol=5e-6)
    assert float(ours(x, x).abs().max()) < 1e-5 and float(value.min()) > 1e-4


def fake_pyiqa(monkeypatch, calls: list) -> None:
    """A stand-in for pyiqa's create_metric: a metric returning each image's mean (known answers per image)."""
    module, utils_module, download = (types.ModuleType(n) for n in ("pyiqa", "pyiqa.utils", "pyiqa.utils.download_util"))
    download.DEFAULT_CACHE_DIR = "/nowhere"

    def create_metric(name, device=None, as_loss=False):
        calls.append((name, download.DEFAULT_CACHE_DIR, torch.hub.get_dir()))
        return lambda images: images.mean(dim=(1, 2, 3)) * (2 if name == "musiq" else 1)

    module.create_metric, module.utils, utils_module.download_util = create_metric, utils_module, download
    for name, value in (("pyiqa", module), ("pyiqa.utils", utils_module), ("pyiqa.utils.download_util", download)):
        monkeypatch.setitem(sys.modules, name, value)


def test_table_csv_summary_and_compare(weights, tmp_path, monkeypatch, capsys):
    pytest.importorskip("torch_fidelity")
    from scripts import eval_sr
    from tests.test_eval_generation import random_inception_weights

    hr, good, bad = image_pairs(tmp_path)
    inception = random_inception_weights(tmp_path / "weights-inception-2015-12-05-6726825d.pth")
    iqa = tmp_path / "iqa"
    for rel in ("pyiqa/niqe_modelparameters.mat", "pyiqa/musiq_koniq_ckpt-e95806b9.pth"):
        (iqa / rel).parent.mkdir(parents=True, exist_ok=True)
        (iqa / rel).write_bytes(b"")
    calls = []
    fake_pyiqa(monkeypatch, calls)
    flags = ["--gt", str(hr), "--crop_border", "0", "--device", "cpu", "--lpips_weights", str(weights / "alex.pth"),
             "--lpips_backbone", str(weights / "alexnet-owt-7be5be79.pth"), "--dists_weights", str(weights / "dists_weights.pt"),
             "--vgg16_weights", str(weights / "vgg16-397923af.pth"), "--inception_weights", str(inception),
             "--pyiqa_metrics", "niqe", "musiq", "--pyiqa_weights_dir", str(iqa)]
    report = eval_sr.main(eval_sr.parse_args(["--compare", str(good), str(bad), *flags]))
    assert [c[0] for c in calls] == ["niqe", "musiq"] and calls[0][1:] == (str(iqa / "pyiqa"), str(iqa))
    assert sys.modules["pyiqa.utils.download_util"].DEFAULT_CACHE_DIR == "/nowhere"  # restored after building
    good_report, bad_report = report["reports"]
    from utils.metrics import calculate_psnr

    sr, gt = (np.asarray(Image.open(folder / "001.png").convert("RGB")) for folder in (good, hr))
    assert good_report["rows"][1]["psnr"] == pytest.approx(calculate_psnr(sr, gt, 0, True))
    assert good_report["rows"][1]["niqe"] == pytest.approx(sr.mean() / 255, abs=1e-6)
    assert good_report["rows"][1]["musiq"] == pytest.approx(2 * sr.mean() / 255, abs=1e-6)
    for name in ("psnr", "ssim"):
        assert good_report["means"][name] > bad_report["means"][name]
    for name in ("lpips", "dists", "fid"):
        assert name in good_report["means"] and np.isfinite(good_report["means"][name])
    with open(good / "metrics.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["image", "psnr", "ssim", "lpips", "dists", "niqe", "musiq", "note"]
    assert rows[-1]["image"] == "mean" and float(rows[-1]["psnr"]) == pytest.approx(good_report["means"]["psnr"], abs=1e-5)
    table = report["table"].read_text().splitlines()
    assert table[2] == "| method | PSNR ↑ | SSIM ↑ | LPIPS ↓ | DISTS ↓ | FID ↓ | NIQE ↓ | MUSIQ ↑ |"
    assert table[4].startswith(f"| sr_good | {good_report['means']['psnr']:.4f} |") and table[5].startswith("| sr_bad |")
    assert "0 px border crop" in table[0]
    assert (good / "metrics.md").read_text().count("| sr_good |") == 1


def test_missing_files_and_packages_are_one_line_errors(weights, tmp_path, monkeypatch):
    from scripts import eval_sr

    hr, good, _ = image_pairs(tmp_path, count=1, size=32)
    base = ["--results", str(good), "--gt", str(hr), "--device", "cpu"]
    with pytest.raises(UserError, match=r"--dists_weights .*nope.pt does not exist: download dists_weights.pt from https://github.com/photosynthesis-team"):
        eval_sr.main(eval_sr.parse_args(base + ["--dists_weights", str(tmp_path / "nope.pt")]))
    with pytest.raises(UserError, match=r"--vgg16_weights .*vgg.pth does not exist: download vgg16-397923af.pth from https://download.pytorch.org"):
        eval_sr.main(eval_sr.parse_args(base + ["--vgg16_weights", str(tmp_path / "vgg.pth")]))
    with pytest.raises(UserError, match="--inception_weights .* does not exist: download weights-inception-2015-12-05-6726825d.pth"):
        eval_sr.main(eval_sr.parse_args(base + ["--inception_weights", str(tmp_path / "inc.pth")]))
    monkeypatch.setitem(sys.modules, "pyiqa", None)  # an import of pyiqa fails as if it were not installed
    with pytest.raises(UserError, match=r"--pyiqa_metrics niqe needs the pyiqa package, which is not installed: pip install"):
        eval_sr.main(eval_sr.parse_args(base + ["--pyiqa_metrics", "niqe"]))
    fake_pyiqa(monkeypatch, [])
    clip_url = "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"
    expected = rf"--pyiqa_weights_dir .* lacks clip/RN50.pt for CLIPIQA: download {clip_url} into .*\(and 1 more: pyiqa/ckpt_koniq10k.pt\)"
    with pytest.raises(UserError, match=expected):
        eval_sr.main(eval_sr.parse_args(base + ["--pyiqa_metrics", "clipiqa", "maniqa", "--pyiqa_weights_dir", str(tmp_path)]))
    with pytest.raises(SystemExit):
        eval_sr.parse_args(["--gt", str(hr)])  # neither --results nor --compare
