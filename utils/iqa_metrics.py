"""Perceptual and no-reference image-quality metrics of the Real-ISR tables, from their libraries, weights from local files.

The tables of SeeSR (Wu et al., CVPR 2024) and OSEDiff (Wu et al., NeurIPS 2024) report PSNR/SSIM (Y, no border
crop), LPIPS, DISTS, FID (SR vs HR) and the no-reference NIQE, MUSIQ, MANIQA and CLIP-IQA, all computed with pyiqa
(chaofengc/IQA-PyTorch). Here:

* DISTS (Ding et al., TPAMI 2020) by piq (photosynthesis-team/piq ``piq.DISTS``): VGG16 features with the DISTS
  alpha/beta weights. Its two files: piq's ``dists_weights.pt`` and torchvision's ``vgg16-397923af.pth``.
* NIQE, MUSIQ, MANIQA, CLIP-IQA by pyiqa itself (heavy dependencies: install it apart, see requirements-eval.txt),
  with pyiqa's default settings for those names (NIQE on Y; MUSIQ KonIQ; MANIQA KonIQ; CLIP-IQA RN50), so the
  values are pyiqa's. Its weight files are read from a folder laid out like pyiqa's own cache.

Nothing is downloaded: both libraries look their files up in torch hub's cache before downloading, so the files are
linked into a private cache folder under the names the libraries expect, and a missing file is a one-line error
naming the flag, the file and where to get it.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import torch

from utils.errors import CheckpointError, UserError

DISTS_WEIGHTS_FILE = "dists_weights.pt"
DISTS_WEIGHTS_URL = f"https://github.com/photosynthesis-team/piq/releases/download/v0.4.1/{DISTS_WEIGHTS_FILE}"
VGG16_FILE = "vgg16-397923af.pth"
VGG16_URL = f"https://download.pytorch.org/models/{VGG16_FILE}"
PYIQA_WEIGHTS_URL = "https://huggingface.co/chaofengc/IQA-PyTorch-Weights/resolve/main/"
CLIP_RN50_URL = (
    "https://openaipublic.azureedge.net/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt"
)
# pyiqa metric name -> (files under the pyiqa-style folder, where each comes from). MANIQA's checkpoint holds its ViT,
# but pyiqa first builds timm's vit_base_patch8_224 with pretrained=True: that one comes from the Hugging Face cache.
PYIQA_FILES = {
    "niqe": [("pyiqa/niqe_modelparameters.mat", PYIQA_WEIGHTS_URL + "niqe_modelparameters.mat")],
    "musiq": [("pyiqa/musiq_koniq_ckpt-e95806b9.pth", PYIQA_WEIGHTS_URL + "musiq_koniq_ckpt-e95806b9.pth")],
    "maniqa": [("pyiqa/ckpt_koniq10k.pt", PYIQA_WEIGHTS_URL + "ckpt_koniq10k.pt")],
    "clipiqa": [("clip/RN50.pt", CLIP_RN50_URL)],
}
LOWER_IS_BETTER = {"psnr": False, "ssim": False, "lpips": True, "dists": True, "fid": True,
                   "niqe": True, "musiq": False, "maniqa": False, "clipiqa": False}


@contextlib.contextmanager
def torch_hub_dir(path: str | Path):
    """Point torch hub's cache (``torch.hub.get_dir()``) at ``path`` for the block, then back."""
    previous = torch.hub.get_dir()
    torch.hub.set_dir(str(path))
    try:
        yield Path(path)
    finally:
        torch.hub.set_dir(previous)


def _required_file(flag: str, given: str | None, default: Path, name: str, url: str) -> Path | None:
    """The file a flag names (must exist), else the default location if the file is there, else None."""
    if given:
        if not Path(given).is_file():
            raise UserError(f"{flag} {given} does not exist: download {name} from {url} and pass its path.")
        return Path(given)
    return default if default.is_file() else None


def load_dists(weights: str | None, backbone: str | None, device: torch.device) -> tuple[torch.nn.Module | None, str]:
    """piq's DISTS, or None and why it is skipped (files neither named nor in torch hub's cache)."""
    try:
        import piq
    except ImportError:
        if weights or backbone:
            raise UserError("DISTS needs the piq package: pip install -r requirements-eval.txt.") from None
        return None, "DISTS skipped: piq is not installed (pip install -r requirements-eval.txt)"
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    dists_path = _required_file("--dists_weights", weights, cache / DISTS_WEIGHTS_FILE, DISTS_WEIGHTS_FILE, DISTS_WEIGHTS_URL)
    vgg_path = _required_file("--vgg16_weights", backbone, cache / VGG16_FILE, VGG16_FILE, VGG16_URL)
    if dists_path is None or vgg_path is None:
        missing = [f"{flag} {name} ({url})" for flag, path, name, url in (
            ("--dists_weights", dists_path, DISTS_WEIGHTS_FILE, DISTS_WEIGHTS_URL), ("--vgg16_weights", vgg_path, VGG16_FILE, VGG16_URL))
            if path is None]
        return None, f"DISTS skipped: pass {' and '.join(missing)}"
    with tempfile.TemporaryDirectory(prefix="dists_hub_") as hub, torch_hub_dir(hub):
        (Path(hub) / "checkpoints").mkdir()
        # The names piq and torchvision look up in the hub cache; they then load with weights_only=True.
        os.symlink(dists_path.resolve(), Path(hub) / "checkpoints" / DISTS_WEIGHTS_FILE)
        os.symlink(vgg_path.resolve(), Path(hub) / "checkpoints" / VGG16_FILE)
        try:
            model = piq.DISTS(reduction="none")
        except (RuntimeError, KeyError) as error:
            raise CheckpointError(
                f"--vgg16_weights {vgg_path} / --dists_weights {dists_path} do not fit piq's DISTS (torchvision's VGG16 "
                f"{VGG16_FILE} and piq's {DISTS_WEIGHTS_FILE} with alpha and beta): {str(error).splitlines()[0]}"
            ) from error
    return model.eval().to(device), f"DISTS (piq): {dists_path}, VGG16 {vgg_path}"


def check_pyiqa_files(metrics: list[str], weights_dir: str | Path) -> None:
    """Every file the requested pyiqa metrics read must be in ``weights_dir`` (pyiqa's cache layout)."""
    missing = [(name, rel, url) for name in metrics for rel, url in PYIQA_FILES[name] if not (Path(weights_dir) / rel).is_file()]
    if missing:
        name, rel, url = missing[0]
        more = f" (and {len(missing) - 1} more: {', '.join(m[1] for m in missing[1:])})" if len(missing) > 1 else ""
        raise UserError(
            f"--pyiqa_weights_dir {weights_dir} lacks {rel} for {name.upper()}: download {url} into "
            f"{Path(weights_dir) / rel}{more}."
        )


def load_pyiqa_metrics(metrics: list[str], weights_dir: str | Path | None, device: torch.device) -> dict:
    """``{name: pyiqa metric}`` built offline from ``weights_dir`` (default: torch hub's cache, where pyiqa itself
    keeps them)."""
    if not metrics:
        return {}
    try:
        import pyiqa  # noqa: F401 (imported here first so that its cache folder is read below)
    except ImportError as error:
        raise UserError(
            f"--pyiqa_metrics {' '.join(metrics)} needs the pyiqa package, which is not installed: pip install \"pyiqa>=0.1.16\" "
            "(heavy; see requirements-eval.txt)."
        ) from error
    weights_dir = Path(weights_dir) if weights_dir else Path(torch.hub.get_dir())
    check_pyiqa_files(metrics, weights_dir)
    import pyiqa.utils.download_util as download_util

    built = {}
    previous_cache, previous_offline = download_util.DEFAULT_CACHE_DIR, os.environ.get("HF_HUB_OFFLINE")
    # pyiqa fixes its cache folder at import; CLIP's loader asks torch hub when called; timm asks the HF cache.
    download_util.DEFAULT_CACHE_DIR = str(weights_dir / "pyiqa")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        with torch_hub_dir(weights_dir):
            for name in metrics:
                try:
                    built[name] = pyiqa.create_metric(name, device=device, as_loss=False)
                except OSError as error:
                    raise CheckpointError(
                        f"pyiqa could not build {name.upper()} offline ({str(error).splitlines()[0]}); MANIQA also needs "
                        "timm's vit_base_patch8_224 in the Hugging Face cache (HF_HOME)."
                    ) from error
    finally:
        download_util.DEFAULT_CACHE_DIR = previous_cache
        if previous_offline is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous_offline
    return built


def markdown_table(rows: list[dict], columns: list[str], first: str = "method") -> str:
    """A Markdown table: one row per dict, ``columns`` in order with an arrow saying which way is better."""
    def arrow(name: str) -> str:
        if name not in LOWER_IS_BETTER:
            return name
        return f"{name.upper() if name not in ('clipiqa',) else 'CLIP-IQA'} {'↓' if LOWER_IS_BETTER[name] else '↑'}"

    header = [first] + [arrow(name) for name in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row[first])]
        for name in columns:
            value = row.get(name)
            cells.append("" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
