"""VGG16 perceptual loss: L1 between ImageNet-normalised VGG16 features at relu1_2, relu2_2, relu3_3, relu4_3.

Johnson et al., "Perceptual losses for real-time style transfer and super-resolution" (ECCV 2016); the
layer choice and the sum of four L1 terms follow ``VGGPerceptualLoss`` in the official Phaseformer
``utils.py``. Differences, each a choice of this module:

* The weights never come from the network: a local file (``--vgg_weights PATH``: torchvision's
  ``vgg16-397923af.pth``, a state dict of ``vgg.features`` or a safetensors file) or torch's hub cache
  (``<torch.hub.get_dir()>/checkpoints/vgg16-397923af.pth``). Missing weights are a UserError that says how to
  provide them or to turn the term off with ``--no_perceptual``.
* Inputs are images in [0, 1]. The reference resizes both images to 224x224 before VGG (which blurs 256 px
  crops and squashes 512 px ones); that is ``resize_to_224=True``, off by default.
* Only the 23 layers up to relu4_3 are built, frozen and kept in eval mode; target features are computed
  without autograd.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.errors import UserError

VGG16_WEIGHTS_FILE = "vgg16-397923af.pth"  # torchvision's IMAGENET1K_V1 file name
# VGG16 configuration "D" up to conv4_3: widths, "M" = 2x2 max-pool.
VGG16_CONFIG_TO_CONV4_3 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512)
# Ends (exclusive) of the slices that finish at relu1_2, relu2_2, relu3_3, relu4_3 in torchvision's numbering.
VGG16_SLICE_ENDS = (4, 9, 16, 23)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_vgg16_weights_path() -> Path:
    """Where torchvision caches the ImageNet VGG16 weights: ``<torch hub dir>/checkpoints/vgg16-397923af.pth``."""
    return Path(torch.hub.get_dir()) / "checkpoints" / VGG16_WEIGHTS_FILE


def build_vgg16_features() -> nn.Sequential:
    """VGG16's ``features`` up to relu4_3 (23 layers, torchvision's indices), randomly initialised."""
    layers: list[nn.Module] = []
    in_channels = 3
    for item in VGG16_CONFIG_TO_CONV4_3:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers += [nn.Conv2d(in_channels, item, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_channels = item
    return nn.Sequential(*layers)


def _read_vgg16_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise UserError(f"Cannot read VGG16 weights {path} ({type(err).__name__}); pass a state dict file with --vgg_weights.") from None
    if not isinstance(state, dict):
        raise UserError(f"VGG16 weights {path} hold a {type(state).__name__}, not a state dict; pass torchvision's vgg16-397923af.pth.")
    return state


def load_vgg16_features(weights_path: str | Path | None = None) -> nn.Sequential:
    """VGG16 features up to relu4_3 with ImageNet weights from ``weights_path`` or torch's hub cache."""
    path = Path(weights_path) if weights_path else default_vgg16_weights_path()
    if not path.is_file():
        where = f"--vgg_weights {path} does not exist" if weights_path else f"no VGG16 weights at {path}"
        raise UserError(
            f"The perceptual loss needs ImageNet VGG16 weights, but {where}: copy torchvision's {VGG16_WEIGHTS_FILE} "
            f"there or pass --vgg_weights PATH, or turn the term off with --no_perceptual."
        )
    state = _read_vgg16_state_dict(path)
    features = build_vgg16_features()
    wanted = features.state_dict().keys()
    # torchvision's file names the layers "features.N.weight"; a saved vgg.features has "N.weight".
    prefix = "features." if any(key.startswith("features.") for key in state) else ""
    selected = {key: state.get(prefix + key) for key in wanted}
    missing = [prefix + key for key, value in selected.items() if value is None]
    if missing:
        raise UserError(
            f"{path} is not a VGG16 state dict (missing {', '.join(missing[:3])}); "
            f"pass torchvision's {VGG16_WEIGHTS_FILE} with --vgg_weights."
        )
    try:
        features.load_state_dict(selected, strict=True)
    except RuntimeError:
        raise UserError(
            f"{path} has tensors of the wrong shapes for VGG16; "
            f"pass torchvision's {VGG16_WEIGHTS_FILE} with --vgg_weights."
        ) from None
    return features


class VGGPerceptualLoss(nn.Module):
    """Sum over relu1_2, relu2_2, relu3_3, relu4_3 of L1(VGG(prediction), VGG(target)); images in [0, 1]."""

    def __init__(self, weights_path: str | Path | None = None, resize_to_224: bool = False, random_weights: bool = False):
        super().__init__()
        # random_weights: same cost, meaningless loss; only for benchmarks where no ImageNet weights are at hand.
        features = build_vgg16_features() if random_weights else load_vgg16_features(weights_path)
        starts = (0,) + VGG16_SLICE_ENDS[:-1]
        self.blocks = nn.ModuleList(features[start:end] for start, end in zip(starts, VGG16_SLICE_ENDS))
        self.blocks.requires_grad_(False)
        self.blocks.eval()
        self.resize_to_224 = resize_to_224
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> VGGPerceptualLoss:
        super().train(mode)
        self.blocks.eval()  # frozen: never leaves eval mode
        return self

    def _features(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image - self.mean) / self.std
        if self.resize_to_224:
            x = F.interpolate(x, size=(224, 224), mode="bilinear", align_corners=False)
        outputs = []
        for block in self.blocks:
            x = block(x)
            outputs.append(x)
        return outputs

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            target_features = self._features(target)
        prediction_features = self._features(prediction)
        return sum(F.l1_loss(p.float(), t.float()) for p, t in zip(prediction_features, target_features))
