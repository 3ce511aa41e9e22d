"""Perceptual and no-reference image-quality metrics of the Real-ISR tables, from their libraries, weights from local files.

The tables of SeeSR (Wu et al., CVPR 2024) and OSEDiff (Wu et al., NeurIPS 2024) report PSNR/SSIM (Y, no border
crop), LPIPS, DISTS, FID (SR vs HR) and the no-reference NIQE, MUSIQ, MANIQA and CLIP-IQA, all computed with pyiqa
(chaofengc/IQA-PyTorch). Here:

* LPIPS (Zhang et al., CVPR 2018) v0.1 with AlexNet, the setting SeeSR reports: :class:`LPIPSAlex` on torchvision's
  AlexNet, equal to the ``lpips`` package on the same weights (tested), so that LPIPS needs no extra package; its
  files are lpips' ``weights/v0.1/alex.pth`` heads and torchvision's ``alexnet-owt-7be5be79.pth``.
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
import importlib.util
import os
import tempfile
from pathlib import Path

import torch
from torch import nn

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
ALEXNET_FILE = "alexnet-owt-7be5be79.pth"
LPIPS_CHANNELS = (64, 192, 384, 256, 256)
LOWER_IS_BETTER = {"psnr": False, "ssim": False, "lpips": True, "dists": True, "fid": True,
                   "niqe": True, "musiq": False, "maniqa": False, "clipiqa": False}


class LPIPSAlex(nn.Module):
    """LPIPS v0.1 with AlexNet: unit-normalised features of 5 ReLU layers, squared differences, 1x1 linear heads,
    spatial mean, summed over layers (Zhang et al. 2018, ``lpips/lpips.py``)."""

    def __init__(self):
        super().__init__()
        from torchvision.models import alexnet

        self.backbone = alexnet(weights=None)
        features = self.backbone.features
        # conv-relu (64) | pool-conv-relu (192) | pool-conv-relu (384) | conv-relu (256) | conv-relu (256)
        self.slices = [features[0:2], features[2:5], features[5:8], features[8:10], features[10:12]]
        self.lins = nn.ModuleList(nn.Conv2d(channels, 1, 1, bias=False) for channels in LPIPS_CHANNELS)
        # The "ScalingLayer" of LPIPS v0.1: inputs in [-1, 1] to ImageNet-normalised ones.
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1))
        self.eval().requires_grad_(False)

    def load_weights(self, heads: dict[str, torch.Tensor], backbone: dict[str, torch.Tensor]) -> None:
        """``heads``: lpips' ``alex.pth`` (``lin<k>.model.<i>.weight``); ``backbone``: torchvision's AlexNet."""
        self.backbone.load_state_dict(backbone)
        for index, lin in enumerate(self.lins):
            keys = [key for key in heads if key.startswith(f"lin{index}.") and key.endswith(".weight")]
            if len(keys) != 1 or heads[keys[0]].shape != lin.weight.shape:
                raise CheckpointError(
                    f"Expected one lin{index}.model.*.weight of shape {list(lin.weight.shape)} in the LPIPS weights "
                    f"(lpips/weights/v0.1/alex.pth), found {keys or 'none'}."
                )
            lin.weight.data.copy_(heads[keys[0]])

    @torch.no_grad()
    def forward(self, image: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
        """LPIPS distance per image of two ``[B, 3, H, W]`` batches in [-1, 1]."""
        x, y = (image - self.shift) / self.scale, (reference - self.shift) / self.scale
        total = torch.zeros(image.shape[0], device=image.device)
        for layer, lin in zip(self.slices, self.lins):
            x, y = layer(x), layer(y)
            x_unit = x / (x.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            y_unit = y / (y.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
            total += lin((x_unit - y_unit) ** 2).mean(dim=(1, 2, 3))
        return total


def default_lpips_paths() -> tuple[Path | None, Path]:
    """Where the LPIPS heads (an installed lpips package) and torchvision's AlexNet (torch hub cache) would be."""
    heads = None
    spec = importlib.util.find_spec("lpips")
    if spec is not None and spec.origin:
        heads = Path(spec.origin).parent / "weights" / "v0.1" / "alex.pth"
    return heads, Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def load_lpips(
    weights: str | None, backbone: str | None, device: torch.device, defaults: tuple[Path | None, Path] | None = None
) -> tuple[LPIPSAlex | None, str]:
    """The LPIPS network, or None and the reason it is skipped. Explicitly named files must exist; ``defaults``
    (heads, backbone) are where to look otherwise (default :func:`default_lpips_paths`)."""
    from utils.checkpoint import load_state_file

    default_heads, default_backbone = defaults or default_lpips_paths()
    for flag, given in (("--lpips_weights", weights), ("--lpips_backbone", backbone)):
        if given and not Path(given).is_file():
            raise UserError(f"{flag} {given} does not exist; pass the file or leave the flag out to skip LPIPS.")
    heads_path = Path(weights) if weights else default_heads
    backbone_path = Path(backbone) if backbone else default_backbone
    if heads_path is None or not heads_path.is_file():
        return None, ("LPIPS skipped: no linear-head weights (pass --lpips_weights lpips/weights/v0.1/alex.pth, or "
                      "install the lpips package)")
    if not backbone_path.is_file():
        return None, (f"LPIPS skipped: no AlexNet weights at {backbone_path} (pass --lpips_backbone "
                      f"{ALEXNET_FILE})")
    model = LPIPSAlex()
    model.load_weights(load_state_file(heads_path), load_state_file(backbone_path))
    return model.to(device), f"LPIPS (v0.1, AlexNet): heads {heads_path}, backbone {backbone_path}"


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
