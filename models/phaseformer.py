"""Phaseformer: a small Restormer with phase-only attention, ECA-gated skips and two outputs (1x and 2x).

Paper: Khan et al., "Phaseformer: Phase-based Attention Mechanism for Underwater Image Restoration and
Beyond", WACV 2025. Official code: github.com/Mdraqibkhan/Phaseformer, ``model_with_eca.py`` (class
``Restormer``), itself built on a re-implementation of Restormer (Zamir et al., CVPR 2022,
github.com/swz30/Restormer) that uses ``nn.LayerNorm`` and no biases.

What the official file does, and what is kept here:

* MDTA (transposed, channel-wise attention) whose q and k are replaced by their *phase-only* versions
  (FFT, amplitude set to 1, inverse FFT, real part); v is unchanged. Computed here in fp32 even under
  autocast: cuFFT has no bf16 and half precision only for power-of-two sizes.
* GDFN feed-forward, PixelUnshuffle/PixelShuffle resampling, 4 levels, a refinement stage at width
  ``channels[1]``, no global input residual.
* ECA (Wang et al., CVPR 2020) on the three encoder skips. The official ECA pools the *phase-only* map,
  whose spatial mean is ``+-1/(H*W)`` (the DC bin of a unit-amplitude spectrum), so its gate is a constant
  of about ``sigmoid(0) = 0.5``: ``eca="phase"`` keeps that for loading and reproducing the official
  weights; ``eca="feature"`` (default, for new training) is standard ECA pooling of the features.
* Two heads sharing the last 3x3 convolution ``output``: ``fake_b_L = output(outputl(x))`` at the input
  resolution and ``fake_b_H = output(output1(ups1(x)))`` at twice the resolution.

Parameter names follow the official file, so its state dicts load strictly once two unused entries are
dropped: ``ups2.*`` (an upsampler the official forward never calls) and ``attention.3.*`` (a fourth ECA the
forward never calls). Unused parameters are left out rather than kept because DDP refuses parameters
that never receive a gradient. Sides that are not multiples of 8 are reflect-padded (as Restormer's test
scripts do) and the outputs cropped back.

Presets: :func:`build_phaseformer` (``phaseformer`` = official, 1.78M parameters; ``phaseformer_tiny`` for
tests; ``phaseformer_wide`` with Restormer's widths 48/96/192/384). Loading: :func:`load_phaseformer_state_dict`
refuses AGSSF/Spectroformer, Restormer and other foreign state dicts with a sentence saying what they are.
"""

from __future__ import annotations

import json
import math
import pickle
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin

from utils.errors import CheckpointError, UserError

ECA_GATES = ("feature", "phase")


def phase_only(x: torch.Tensor) -> torch.Tensor:
    """Real part of the inverse FFT of ``x``'s spectrum with every amplitude set to 1 (at least fp32, no autocast).

    The official ``inv_mag`` uses ``fft2``/``ifft2``; the spectrum of a real map is Hermitian and so is its
    phase-only version, so ``rfft2``/``irfft2`` give the same real result with half the work.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        spectrum = torch.fft.rfft2(x.to(torch.promote_types(x.dtype, torch.float32)))
        unit_spectrum = torch.polar(torch.ones_like(spectrum.real), spectrum.angle())
        return torch.fft.irfft2(unit_spectrum, s=x.shape[-2:])


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """ECA's adaptive 1-D kernel size: ``|log2(C)/gamma + b/gamma|`` rounded down, made odd."""
    k = int(abs(math.log2(channels) / gamma + b / gamma))
    return k if k % 2 else k + 1


def channel_layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    """Apply a LayerNorm over the channels of a BCHW map (the official code reshapes to B(HW)C)."""
    return norm(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2).contiguous()


class ECA(nn.Module):
    """Efficient channel attention: global average pool, 1-D conv across channels, sigmoid gate."""

    def __init__(self, channels: int, gate: str = "feature"):
        super().__init__()
        if gate not in ECA_GATES:
            raise ValueError(f"ECA gate must be one of {ECA_GATES}, got {gate!r}")
        self.gate = gate
        kernel = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, kernel_size=kernel, padding=(kernel - 1) // 2, bias=False)

    def gate_values(self, x: torch.Tensor) -> torch.Tensor:
        """The per-channel gate in (0, 1), shape (B, C)."""
        pooled = (phase_only(x) if self.gate == "phase" else x).mean(dim=(-2, -1))
        return torch.sigmoid(self.conv(pooled.unsqueeze(1)).squeeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gate_values(x)[..., None, None].to(x.dtype)


class MDTA(nn.Module):
    """Multi-Dconv-head transposed attention with phase-only queries and keys."""

    def __init__(self, channels: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.temperature = nn.Parameter(torch.ones(1, num_heads, 1, 1))
        self.qkv = nn.Conv2d(channels, channels * 3, kernel_size=1, bias=False)
        self.qkv_conv = nn.Conv2d(channels * 3, channels * 3, kernel_size=3, padding=1, groups=channels * 3, bias=False)
        self.project_out = nn.Conv2d(channels, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        q, k, v = self.qkv_conv(self.qkv(x)).chunk(3, dim=1)
        # The attention here runs across channels: the "sequence" is C/heads long and each token is H*W
        # long, far beyond what fused SDPA kernels accept, and the attention matrix is tiny, so plain
        # matmuls are as fast. Logits stay fp32: they are cosines of unit vectors of length H*W.
        with torch.autocast(device_type=x.device.type, enabled=False):
            q = F.normalize(phase_only(q).reshape(b, self.num_heads, -1, h * w), dim=-1)
            k = F.normalize(phase_only(k).reshape(b, self.num_heads, -1, h * w), dim=-1)
            attn = torch.softmax(q @ k.transpose(-2, -1) * self.temperature, dim=-1)
        v = v.reshape(b, self.num_heads, -1, h * w)
        out = (attn.to(v.dtype) @ v).reshape(b, c, h, w)
        return self.project_out(out)


class GDFN(nn.Module):
    """Gated-Dconv feed-forward network: GELU(x1) * x2 after a depth-wise 3x3 convolution."""

    def __init__(self, channels: int, expansion_factor: float):
        super().__init__()
        hidden = int(channels * expansion_factor)
        self.project_in = nn.Conv2d(channels, hidden * 2, kernel_size=1, bias=False)
        self.conv = nn.Conv2d(hidden * 2, hidden * 2, kernel_size=3, padding=1, groups=hidden * 2, bias=False)
        self.project_out = nn.Conv2d(hidden, channels, kernel_size=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.conv(self.project_in(x)).chunk(2, dim=1)
        return self.project_out(F.gelu(x1) * x2)


class TransformerBlock(nn.Module):
    """Pre-norm block: x + MDTA(LN(x)), then x + GDFN(LN(x))."""

    def __init__(self, channels: int, num_heads: int, expansion_factor: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn = MDTA(channels, num_heads)
        self.norm2 = nn.LayerNorm(channels)
        self.ffn = GDFN(channels, expansion_factor)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(channel_layer_norm(self.norm1, x))
        return x + self.ffn(channel_layer_norm(self.norm2, x))


class DownSample(nn.Module):
    """Halve the resolution, double the width: 3x3 conv to C/2, then PixelUnshuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels // 2, kernel_size=3, padding=1, bias=False), nn.PixelUnshuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class UpSample(nn.Module):
    """Double the resolution, halve the width: 3x3 conv to 2C, then PixelShuffle(2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(channels, channels * 2, kernel_size=3, padding=1, bias=False), nn.PixelShuffle(2)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class PhaseformerOutput(NamedTuple):
    """The two heads; unpacks as ``fake_b_L, fake_b_H = model(x)``."""

    fake_b_L: torch.Tensor  # enhanced image at the input resolution (B, 3, H, W)
    fake_b_H: torch.Tensor | None  # enhanced image at twice the resolution (B, 3, 2H, 2W); None if skipped


class Phaseformer(ModelMixin, ConfigMixin):
    """Four-level Restormer U-Net with phase-only attention, ECA-gated skips and a 1x and a 2x head.

    ``channels`` must double from level to level (PixelUnshuffle/PixelShuffle resampling). The decoder's
    last level and the refinement run at ``channels[1]`` with ``num_heads[0]`` heads, as in Restormer.
    ``head_channels`` is the width before the shared last conv (8 in the official model, where it is
    hard-coded; ``channels[0] // 2`` when not given).
    """

    @register_to_config
    def __init__(
        self,
        num_blocks: Sequence[int] = (2, 3, 3, 4),
        num_heads: Sequence[int] = (1, 2, 4, 8),
        channels: Sequence[int] = (16, 32, 64, 128),
        num_refinement: int = 4,
        expansion_factor: float = 2.66,
        eca: str = "feature",
        head_channels: int | None = None,
        in_channels: int = 3,
        out_channels: int = 3,
    ):
        super().__init__()
        num_blocks, num_heads, channels = list(num_blocks), list(num_heads), list(channels)
        if not (len(num_blocks) == len(num_heads) == len(channels) == 4):
            raise ValueError("Phaseformer has four levels: num_blocks, num_heads and channels need 4 entries each")
        if any(channels[i + 1] != 2 * channels[i] for i in range(3)):
            raise ValueError(f"channels must double from level to level, got {channels}")
        if any(c % h for c, h in zip(channels, num_heads)) or channels[1] % num_heads[0]:
            raise ValueError(f"every width must be divisible by its number of heads: {channels} / {num_heads}")
        if eca not in ECA_GATES:
            raise ValueError(f"eca must be one of {ECA_GATES}, got {eca!r}")
        head_channels = head_channels or channels[0] // 2
        self.downsampling_factor = 2 ** (len(channels) - 1)

        # attention[i] gates the skip of encoder level 3 - i (widths channels[2], channels[1], channels[0]).
        self.attention = nn.ModuleList([ECA(channels[2 - i], gate=eca) for i in range(3)])
        self.embed_conv_rgb = nn.Conv2d(in_channels, channels[0], kernel_size=3, padding=1, bias=False)
        self.encoders = nn.ModuleList(
            nn.Sequential(*[TransformerBlock(width, heads, expansion_factor) for _ in range(depth)])
            for depth, heads, width in zip(num_blocks, num_heads, channels)
        )
        self.downs = nn.ModuleList(DownSample(width) for width in channels[:-1])
        self.ups = nn.ModuleList(UpSample(width) for width in reversed(channels[1:]))
        self.reduces = nn.ModuleList(
            nn.Conv2d(channels[i], channels[i - 1], kernel_size=1, bias=False) for i in (3, 2)
        )
        self.decoders = nn.ModuleList(
            [
                nn.Sequential(*[TransformerBlock(channels[2], num_heads[2], expansion_factor) for _ in range(num_blocks[2])]),
                nn.Sequential(*[TransformerBlock(channels[1], num_heads[1], expansion_factor) for _ in range(num_blocks[1])]),
                # The last decoder level keeps the width of the concatenation (channels[1]), as in Restormer.
                nn.Sequential(*[TransformerBlock(channels[1], num_heads[0], expansion_factor) for _ in range(num_blocks[0])]),
            ]
        )
        self.refinement = nn.Sequential(
            *[TransformerBlock(channels[1], num_heads[0], expansion_factor) for _ in range(num_refinement)]
        )
        # Heads: L = output(outputl(x)); H = output(output1(ups1(x))), the last conv shared by both.
        self.ups1 = UpSample(channels[1])
        self.outputl = nn.Conv2d(channels[1], head_channels, kernel_size=3, padding=1, bias=False)
        self.output1 = nn.Conv2d(channels[1] // 2, head_channels, kernel_size=3, padding=1, bias=False)
        self.output = nn.Conv2d(head_channels, out_channels, kernel_size=3, padding=1, bias=False)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The refined full-resolution features both heads read (input sides must be multiples of 8)."""
        enc1 = self.encoders[0](self.embed_conv_rgb(x))
        enc2 = self.encoders[1](self.downs[0](enc1))
        enc3 = self.encoders[2](self.downs[1](enc2))
        enc4 = self.encoders[3](self.downs[2](enc3))
        dec3 = self.decoders[0](self.reduces[0](torch.cat([self.ups[0](enc4), self.attention[0](enc3)], dim=1)))
        dec2 = self.decoders[1](self.reduces[1](torch.cat([self.ups[1](dec3), self.attention[1](enc2)], dim=1)))
        dec1 = self.decoders[2](torch.cat([self.ups[2](dec2), self.attention[2](enc1)], dim=1))
        return self.refinement(dec1)

    def forward(self, x: torch.Tensor, return_high: bool = True) -> PhaseformerOutput:
        """Enhance ``x`` (B, 3, H, W), any H and W; ``return_high=False`` skips the 2x head (inference)."""
        height, width = x.shape[-2:]
        factor = self.downsampling_factor
        pad_h, pad_w = (-height) % factor, (-width) % factor
        if pad_h or pad_w:
            # Reflect needs the pad to be smaller than the side; tiny inputs fall back to replicate.
            mode = "reflect" if pad_h < height and pad_w < width else "replicate"
            x = F.pad(x, (0, pad_w, 0, pad_h), mode=mode)
        refined = self.features(x)
        fake_b_L = self.output(self.outputl(refined))[..., :height, :width]
        fake_b_H = None
        if return_high:
            fake_b_H = self.output(self.output1(self.ups1(refined)))[..., : 2 * height, : 2 * width]
        return PhaseformerOutput(fake_b_L, fake_b_H)


# --------------------------------------------------------------------------------------------- presets

PHASEFORMER_PRESETS: dict[str, dict[str, Any]] = {
    # The official model_with_eca.Restormer defaults (1.78M parameters).
    "phaseformer": dict(num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(16, 32, 64, 128), num_refinement=4),
    # For tests and CPU demos.
    "phaseformer_tiny": dict(
        num_blocks=(1, 1, 1, 1), num_heads=(1, 1, 2, 2), channels=(8, 16, 32, 64), num_refinement=1, expansion_factor=2.0
    ),
    # Restormer's widths (Zamir et al.) with Phaseformer's depths.
    "phaseformer_wide": dict(num_blocks=(2, 3, 3, 4), num_heads=(1, 2, 4, 8), channels=(48, 96, 192, 384), num_refinement=4),
}


def build_phaseformer(name: str = "phaseformer", **overrides: Any) -> Phaseformer:
    """Build a named preset; keyword arguments (``eca="phase"``, ...) override the preset's values."""
    if name not in PHASEFORMER_PRESETS:
        raise UserError(f"Unknown Phaseformer preset {name!r}; choose one of {', '.join(PHASEFORMER_PRESETS)}.")
    return Phaseformer(**{**PHASEFORMER_PRESETS[name], **overrides})


# ------------------------------------------------------------------------------------ loading weights

# Entries of the official state dicts that its forward never uses (see the module docstring).
OFFICIAL_UNUSED_PREFIXES = ("ups2.", "attention.3.")
# Where training scripts commonly nest the generator's state dict.
CONTAINER_KEYS = ("state_dict", "model", "netG", "net_g", "params_ema", "params", "generator", "model_state_dict")
# Prefixes added by DataParallel/DDP and torch.compile.
WRAPPER_PREFIXES = ("module.", "_orig_mod.")

_CONVERT_HINT = "python scripts/convert_phaseformer.py IN.pth OUT.safetensors --trust_pickle"


def extract_state_dict(checkpoint: Any, source: str = "the checkpoint") -> dict[str, torch.Tensor]:
    """The tensor dict inside ``checkpoint``: a state dict, a module, or a dict nesting one under a usual key."""
    if isinstance(checkpoint, nn.Module):
        checkpoint = checkpoint.state_dict()
    if isinstance(checkpoint, Mapping):
        for key in CONTAINER_KEYS:
            if key in checkpoint and isinstance(checkpoint[key], (Mapping, nn.Module)):
                return extract_state_dict(checkpoint[key], source)
        tensors = {k: v for k, v in checkpoint.items() if isinstance(v, torch.Tensor)}
        if tensors:
            cleaned = {}
            for key, value in tensors.items():
                for prefix in WRAPPER_PREFIXES:
                    if key.startswith(prefix):
                        key = key[len(prefix):]
                cleaned[key] = value
            return cleaned
        raise CheckpointError(
            f"{source} holds no tensors and none of the keys {', '.join(CONTAINER_KEYS)} "
            f"(top-level keys: {', '.join(map(str, list(checkpoint)[:8]))}); it is not a model checkpoint."
        )
    raise CheckpointError(
        f"{source} holds a {type(checkpoint).__name__}, not a state dict or a module; it is not a model checkpoint."
    )


def describe_foreign_state_dict(keys: Sequence[str]) -> str | None:
    """Say which other model a state dict looks like, or None if it may be a Phaseformer."""
    keys = list(keys)
    joined = "\n".join(keys)
    if any(marker in joined for marker in (".agssf.", "ups_1.", ".Fups.", "amp_fuse", "pha_fuse", "q1X1_", "project_outf")):
        return (
            "an AGSSF/Spectroformer checkpoint (the older single-output model with SFCA spatial-frequency channel "
            "attention and frequency-domain upsampling)"
        )
    if any(marker in joined for marker in ("ssfb", "q_fdfp", "spatial_upsample")):
        return "a Spectroformer checkpoint (MQCA attention and SSFB skips, a single 1x output)"
    if "patch_embed" in joined and ("encoder_level1" in joined or "latent." in joined):
        return "a Restormer checkpoint (swz30/Restormer layout: patch_embed, encoder_level1, latent)"
    if not any(key.startswith(("embed_conv_rgb.", "encoders.")) for key in keys):
        sample = ", ".join(keys[:4]) or "no keys"
        return f"not a Phaseformer checkpoint (none of its {len(keys)} keys are Phaseformer's; first: {sample})"
    return None


def _expansion_factor_for(widths: Sequence[int], hidden: Sequence[int]) -> float:
    """A GDFN expansion factor f with int(width * f) == hidden at every level (two decimals when possible)."""
    low = max(h / w for w, h in zip(widths, hidden))
    high = min((h + 1) / w for w, h in zip(widths, hidden))
    fits = lambda f: all(int(w * f) == h for w, h in zip(widths, hidden))  # noqa: E731
    two_decimals = [k / 100 for k in range(math.floor(low * 100), math.ceil(high * 100) + 1) if fits(k / 100)]
    if 2.66 in two_decimals:  # the official value
        return 2.66
    if two_decimals:
        return two_decimals[0]
    middle = (low + high) / 2
    if not fits(middle):
        raise CheckpointError(f"The GDFN widths {list(hidden)} fit no single expansion factor for widths {list(widths)}.")
    return middle


def infer_phaseformer_config(state_dict: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Constructor arguments that fit a Phaseformer-layout state dict (the ECA gate cannot be inferred)."""
    foreign = describe_foreign_state_dict(list(state_dict))
    if foreign:
        raise CheckpointError(f"The weights are {foreign}, which cannot be loaded into Phaseformer.")
    try:
        width0 = state_dict["embed_conv_rgb.weight"].shape[0]
        channels = [width0 * 2**i for i in range(4)]
        num_blocks = [
            len({key.split(".")[2] for key in state_dict if key.startswith(f"encoders.{level}.")}) for level in range(4)
        ]
        num_heads = [state_dict[f"encoders.{level}.0.attn.temperature"].shape[1] for level in range(4)]
        num_refinement = len({key.split(".")[1] for key in state_dict if key.startswith("refinement.")})
        hidden = [state_dict[f"encoders.{level}.0.ffn.project_out.weight"].shape[1] for level in range(4)]
        head_channels = state_dict["outputl.weight"].shape[0]
        in_channels = state_dict["embed_conv_rgb.weight"].shape[1]
        out_channels = state_dict["output.weight"].shape[0]
    except KeyError as missing:
        raise CheckpointError(f"The weights look like a Phaseformer but lack {missing}; the file is incomplete.") from None
    expansion = _expansion_factor_for(channels, hidden)
    return dict(
        num_blocks=num_blocks, num_heads=num_heads, channels=channels, num_refinement=num_refinement,
        expansion_factor=expansion, head_channels=head_channels, in_channels=in_channels, out_channels=out_channels,
    )


def recorded_or_inferred_config(state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The configuration a weights file records (``phaseformer_config`` in its metadata, which
    ``scripts/convert_phaseformer.py`` and our safetensors files write) or, for a file that records none (an official
    release, a plain state dict), the one its tensor shapes fit. The loaders fall back on the shapes here only;
    ``scripts/convert_phaseformer.py`` reads them from an official release, which records no configuration."""
    if metadata and "phaseformer_config" in metadata:
        return json.loads(metadata["phaseformer_config"])
    return infer_phaseformer_config(state_dict)


def _raise_if_other_size(model: Phaseformer, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """A CheckpointError naming both sizes when a complete Phaseformer state dict has another configuration."""
    try:
        found = infer_phaseformer_config(state_dict)
    except CheckpointError:
        return  # incomplete: the caller lists the missing keys
    keys = ("channels", "num_blocks", "num_heads", "num_refinement")
    ours = {key: list(model.config[key]) if key != "num_refinement" else model.config[key] for key in keys}
    theirs = {key: found[key] for key in keys}
    if ours != theirs:
        def describe(config: dict) -> str:
            return ", ".join(f"{key} {value}" for key, value in config.items())

        presets = [name for name, preset in PHASEFORMER_PRESETS.items() if list(preset["channels"]) == theirs["channels"]
                   and list(preset["num_blocks"]) == theirs["num_blocks"]]
        hint = f"the preset {presets[0]!r}" if presets else "the matching configuration"
        raise CheckpointError(
            f"{source} is a Phaseformer of another size ({describe(theirs)}; this model has {describe(ours)}); "
            f"build the model with {hint}."
        )


def load_phaseformer_state_dict(model: Phaseformer, checkpoint: Any, source: str = "the checkpoint") -> None:
    """Load official-layout or our own weights strictly; anything else is a CheckpointError sentence.

    ``checkpoint`` may be a state dict, a module, or a dict nesting one (``state_dict``, ``model``, ``netG``...).
    The official file's unused ``ups2.*`` and ``attention.3.*`` entries are dropped; every other key must match.
    """
    state_dict = extract_state_dict(checkpoint, source)
    foreign = describe_foreign_state_dict(list(state_dict))
    if foreign:
        raise CheckpointError(f"{source} is {foreign}; it cannot be loaded into Phaseformer.")
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(OFFICIAL_UNUSED_PREFIXES)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    mismatched = [
        f"{k} {tuple(state_dict[k].shape)} vs {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        _raise_if_other_size(model, state_dict, source)
    if missing or unexpected:
        raise CheckpointError(
            f"{source} does not fit this Phaseformer: {len(missing)} missing keys ({', '.join(missing[:5])}) and "
            f"{len(unexpected)} unexpected keys ({', '.join(unexpected[:5])}); check that it is a Phaseformer "
            "checkpoint of the same preset."
        )
    if mismatched:
        raise CheckpointError(
            f"{source} is a Phaseformer of another size ({len(mismatched)} shapes differ, e.g. checkpoint vs model: "
            f"{'; '.join(mismatched[:3])}); build the model with the preset it was trained with."
        )
    model.load_state_dict(state_dict, strict=True)


def read_weights_file(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a safetensors file or a ``torch.load(weights_only=True)``-able ``.pth``: (state dict, metadata).

    A whole pickled module (the official release format) is refused with the command that converts it.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; pass the path of a .safetensors or .pth file.")
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
                return {key: handle.get_tensor(key) for key in handle.keys()}, metadata
        except Exception as err:  # safetensors raises its own error types for corrupt headers
            raise CheckpointError(f"Cannot read {path} as safetensors ({err}); the file is damaged or not safetensors.") from None
    return extract_state_dict(load_torch_weights_file(path), str(path)), {}


def load_torch_weights_file(path: str | Path) -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; a pickled module or unreadable file is a CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; pass the path of a .safetensors or .pth file.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        raise CheckpointError(
            f"{path} is a pickled Python object (the official Phaseformer releases save whole modules), which is "
            f"only readable by running code from the file; if you trust its source, convert it once with "
            f"`{_CONVERT_HINT}` and use the .safetensors file."
        ) from None
    except Exception as err:
        raise CheckpointError(f"Cannot read {path} ({type(err).__name__}: {err}); is it a PyTorch checkpoint?") from None


def phaseformer_from_weights_file(path: str | Path, eca: str | None = None) -> Phaseformer:
    """Build a Phaseformer whose size fits the file and load it strictly.

    The configuration comes from the file's metadata (``scripts/convert_phaseformer.py`` writes it, with
    ``eca="phase"`` for official weights) or, without metadata, from the tensor shapes with the default
    ``eca="feature"`` (the gate leaves no trace in the shapes). ``eca`` overrides either.
    """
    state_dict, metadata = read_weights_file(path)
    config = recorded_or_inferred_config(state_dict, metadata)
    if eca is not None:
        config["eca"] = eca
    model = Phaseformer(**config)
    load_phaseformer_state_dict(model, state_dict, str(path))
    return model
