"""VA-VAE: the f16d32 vision-foundation-aligned autoencoder that LightningDiT trains on (inference only).

Paper: Yao, Yang, Wang, "Reconstruction vs. Generation: Taming Optimization Dilemma in Latent Diffusion
Models" (VA-VAE, 2025). Reference code: hustvl/LightningDiT ``tokenizer/autoencoder.py`` and
``vavae/ldm/models/autoencoder.py`` (the LDM ``AutoencoderKL`` of CompVis/latent-diffusion).

The architecture is the LDM KL autoencoder with ch 128, ch_mult (1, 1, 2, 2, 4), two res blocks per level,
single-head attention at 16 px (the last encoder level, the first decoder level and both mid blocks) and
32 latent channels: a 256x256x3 image in [-1, 1] <-> a 32x16x16 latent. It runs here as a diffusers
``AutoencoderKL`` built with ``AttnDownEncoderBlock2D`` / ``AttnUpDecoderBlock2D`` at that level, so
slicing, tiling and ``save_pretrained`` come from diffusers.

The public ``vavae-imagenet256-f16d32-dinov2.pt`` holds an LDM state dict (possibly under ``state_dict``)
plus training-only entries: ``loss.*`` (LPIPS and discriminator), ``foundation_model.*`` (DINOv2) and
``linear_proj.*`` (the alignment projection). :func:`load_vavae` drops exactly those, renames the LDM keys
to diffusers' layout with :func:`ldm_to_diffusers_key`, and loads strictly: any missing or unexpected
encoder/decoder key is a :class:`~utils.errors.CheckpointError` that lists the keys. (The reference loads
with ``strict=False``, so a missing weight passes silently there.) diffusers' own single-file converter
(``convert_ldm_vae_checkpoint``) is not used: it knows only the SD VAE, which has no attention inside the
down/up levels, and leaves this model's ``encoder.down.4.attn.*`` and ``decoder.up.4.attn.*`` unmapped.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import torch
from diffusers import AutoencoderKL
from torch import nn

from utils.errors import CheckpointError

# Entries of the training checkpoint that inference does not need (loss networks, DINOv2, alignment head).
TRAINING_ONLY_PREFIXES = ("loss.", "foundation_model.", "linear_proj.")

VAVAE_CONFIGS = {
    # The released model: LDM ddconfig ch=128, ch_mult=(1,1,2,2,4), num_res_blocks=2, attn_resolutions=(16,).
    "f16d32": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 128, 256, 256, 512),
        layers_per_block=2,
        latent_channels=32,
        norm_num_groups=32,
        sample_size=256,
        # Latents are normalised with per-channel statistics (data/latents.py), not a global factor.
        scaling_factor=1.0,
        force_upcast=False,
    ),
    # Same structure (five levels, attention in the last one and the mid blocks), small channels: tests.
    "tiny": dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4 + ("AttnDownEncoderBlock2D",),
        up_block_types=("AttnUpDecoderBlock2D",) + ("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 32, 32, 64),
        layers_per_block=1,
        latent_channels=8,
        norm_num_groups=32,
        sample_size=32,
        scaling_factor=1.0,
        force_upcast=False,
    ),
}


class VAVAE(nn.Module):
    """Frozen VA-VAE with the two calls the pipeline needs: images in [-1, 1] <-> latents."""

    def __init__(self, autoencoder: AutoencoderKL):
        super().__init__()
        self.autoencoder = autoencoder.eval().requires_grad_(False)

    @property
    def latent_channels(self) -> int:
        return self.autoencoder.config.latent_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.autoencoder.config.block_out_channels) - 1)

    @property
    def dtype(self) -> torch.dtype:
        return next(self.autoencoder.parameters()).dtype

    @torch.no_grad()
    def encode(self, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B,3,H,W) in [-1,1] -> (B,C,H/16,W/16): the posterior mean, or a posterior sample if ``sample``."""
        posterior = self.autoencoder.encode(images.to(self.dtype)).latent_dist
        return posterior.sample(generator=generator) if sample else posterior.mode()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B,C,h,w) latents (VAE scale, not normalised) -> (B,3,16h,16w) images, roughly in [-1,1]."""
        return self.autoencoder.decode(latents.to(self.dtype)).sample


def build_vavae_autoencoder(config: str = "f16d32") -> AutoencoderKL:
    """A randomly initialised diffusers ``AutoencoderKL`` in the VA-VAE layout (``f16d32`` or ``tiny``)."""
    if config not in VAVAE_CONFIGS:
        raise ValueError(f"Unknown VA-VAE config {config!r}; choose one of {sorted(VAVAE_CONFIGS)}.")
    return AutoencoderKL(**VAVAE_CONFIGS[config])


# --------------------------------------------------------------------------------------------------
# LDM <-> diffusers key names
# --------------------------------------------------------------------------------------------------

_RESNET_LDM_TO_DIFFUSERS = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_ATTN_LDM_TO_DIFFUSERS = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET_DIFFUSERS_TO_LDM = {v: k for k, v in _RESNET_LDM_TO_DIFFUSERS.items()}
_ATTN_DIFFUSERS_TO_LDM = {v: k for k, v in _ATTN_LDM_TO_DIFFUSERS.items()}


def ldm_to_diffusers_key(key: str, num_levels: int = 5) -> str | None:
    """The diffusers ``AutoencoderKL`` name of an LDM autoencoder key, or None if it is not an LDM VAE key.

    LDM numbers decoder levels by resolution (``up.4`` is the 16 px level, run first); diffusers numbers
    them in execution order, so ``decoder.up.{i}`` becomes ``decoder.up_blocks.{num_levels - 1 - i}``.
    """
    if re.fullmatch(
        r"(quant_conv|post_quant_conv|encoder\.conv_in|decoder\.conv_in|encoder\.conv_out|decoder\.conv_out)\.(weight|bias)", key
    ):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.conv_norm_out.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.block_([12])\.(\w+)\.(weight|bias)", key)
    if m and m[3] in _RESNET_LDM_TO_DIFFUSERS:
        return f"{m[1]}.mid_block.resnets.{int(m[2]) - 1}.{_RESNET_LDM_TO_DIFFUSERS[m[3]]}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid\.attn_1\.(\w+)\.(weight|bias)", key)
    if m and m[2] in _ATTN_LDM_TO_DIFFUSERS:
        return f"{m[1]}.mid_block.attentions.0.{_ATTN_LDM_TO_DIFFUSERS[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder\.down|decoder\.up)\.(\d+)\.(block|attn)\.(\d+)\.(\w+)\.(weight|bias)", key)
    if m:
        part, level, kind, index, layer, param = m.groups()
        side, blocks, level = (
            ("encoder", "down_blocks", int(level)) if part == "encoder.down" else ("decoder", "up_blocks", num_levels - 1 - int(level))
        )
        table = _RESNET_LDM_TO_DIFFUSERS if kind == "block" else _ATTN_LDM_TO_DIFFUSERS
        if layer not in table:
            return None
        group = "resnets" if kind == "block" else "attentions"
        return f"{side}.{blocks}.{level}.{group}.{index}.{table[layer]}.{param}"
    m = re.fullmatch(r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down_blocks.{m[1]}.downsamplers.0.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up\.(\d+)\.upsample\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up_blocks.{num_levels - 1 - int(m[1])}.upsamplers.0.conv.{m[2]}"
    return None


def diffusers_to_ldm_key(key: str, num_levels: int = 5) -> str:
    """Inverse of :func:`ldm_to_diffusers_key` (used to name missing keys the way the checkpoint names them)."""
    if re.fullmatch(
        r"(quant_conv|post_quant_conv|encoder\.conv_in|decoder\.conv_in|encoder\.conv_out|decoder\.conv_out)\.(weight|bias)", key
    ):
        return key
    m = re.fullmatch(r"(encoder|decoder)\.conv_norm_out\.(weight|bias)", key)
    if m:
        return f"{m[1]}.norm_out.{m[2]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d)\.(\w+)\.(weight|bias)", key)
    if m and m[3] in _RESNET_DIFFUSERS_TO_LDM:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{_RESNET_DIFFUSERS_TO_LDM[m[3]]}.{m[4]}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(\w+(?:\.0)?)\.(weight|bias)", key)
    if m and m[2] in _ATTN_DIFFUSERS_TO_LDM:
        return f"{m[1]}.mid.attn_1.{_ATTN_DIFFUSERS_TO_LDM[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(encoder\.down_blocks|decoder\.up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(\w+(?:\.0)?)\.(weight|bias)", key)
    if m:
        part, level, group, index, layer, param = m.groups()
        prefix, level = ("encoder.down", int(level)) if part == "encoder.down_blocks" else ("decoder.up", num_levels - 1 - int(level))
        table = _RESNET_DIFFUSERS_TO_LDM if group == "resnets" else _ATTN_DIFFUSERS_TO_LDM
        if layer in table:
            kind = "block" if group == "resnets" else "attn"
            return f"{prefix}.{level}.{kind}.{index}.{table[layer]}.{param}"
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.downsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"encoder.down.{m[1]}.downsample.conv.{m[2]}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.conv\.(weight|bias)", key)
    if m:
        return f"decoder.up.{num_levels - 1 - int(m[1])}.upsample.conv.{m[2]}"
    return key  # not an LDM-representable name; report it as diffusers spells it


def _is_attention_projection(diffusers_key: str) -> bool:
    return bool(re.search(r"\.attentions\.\d+\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


def read_state_dict(path: str | Path, what: str = "checkpoint") -> dict:
    """Tensors of a ``.safetensors`` file or a ``.pt``/``.ckpt``/``.pth`` file read with ``weights_only=True``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except Exception as err:  # a truncated download or a file of another format
            raise CheckpointError(f"Cannot read the {what} {path} as safetensors ({err}); re-download or re-export the file.") from err
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights_only" in str(err) or "Unsupported global" in str(err):
            raise CheckpointError(
                f"The {what} {path} contains pickled Python objects besides tensors, which this repository does "
                f"not unpickle; in a Python you trust, re-save only its tensors, e.g. "
                f"torch.save(torch.load(path, weights_only=False)['state_dict'], 'vavae_state_dict.pt')."
            ) from err
        raise CheckpointError(f"Cannot read the {what} {path} ({type(err).__name__}: {err}); re-download the file.") from err


def _format_keys(keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def _ldm_state_to_diffusers(state: dict, num_levels: int) -> tuple[dict, dict, list[str]]:
    """Rename LDM keys to diffusers keys (1x1-conv attention weights become linear).

    Returns the renamed tensors, each new name's original name, and the keys that are no LDM VAE key.
    """
    converted, original, unknown = {}, {}, []
    for key, value in state.items():
        new_key = ldm_to_diffusers_key(key, num_levels)
        if new_key is None:
            unknown.append(key)
            continue
        if _is_attention_projection(new_key) and value.ndim == 4:
            value = value[:, :, 0, 0]
        converted[new_key] = value
        original[new_key] = key
    return converted, original, unknown


def load_vavae_state_dict(autoencoder: AutoencoderKL, state: dict, source: str = "checkpoint") -> None:
    """Load an LDM-layout (or diffusers-layout) VA-VAE state dict into ``autoencoder`` strictly.

    Drops ``loss.*``, ``foundation_model.*`` and ``linear_proj.*``; anything else that does not fit is a
    CheckpointError naming the missing, unexpected and wrongly shaped keys (in the checkpoint's own names).
    """
    if "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    state = {k: v for k, v in state.items() if not k.startswith(TRAINING_ONLY_PREFIXES)}
    non_tensors = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
    state = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    num_levels = len(autoencoder.config.block_out_channels)
    diffusers_layout = any(k.startswith(("encoder.down_blocks.", "decoder.up_blocks.")) for k in state)
    if diffusers_layout:
        converted, original, unexpected = dict(state), {k: k for k in state}, []
        name = lambda k: k  # noqa: E731 - report in the file's own (diffusers) names
    else:
        converted, original, unexpected = _ldm_state_to_diffusers(state, num_levels)
        name = lambda k: original.get(k) or diffusers_to_ldm_key(k, num_levels)  # noqa: E731
    expected = autoencoder.state_dict()
    missing = sorted(name(k) for k in expected if k not in converted)
    unexpected = sorted(unexpected + [original[k] for k in converted if k not in expected] + non_tensors)
    wrong_shape = sorted(
        f"{name(k)} {tuple(v.shape)} (expected {tuple(expected[k].shape)})"
        for k, v in converted.items()
        if k in expected and v.shape != expected[k].shape
    )
    if missing or unexpected or wrong_shape:
        problems = []
        if missing:
            problems.append(f"{len(missing)} missing keys [{_format_keys(missing)}]")
        if unexpected:
            problems.append(f"{len(unexpected)} unexpected keys [{_format_keys(unexpected)}]")
        if wrong_shape:
            problems.append(f"{len(wrong_shape)} keys with the wrong shape [{_format_keys(wrong_shape)}]")
        error = CheckpointError(
            f"The VA-VAE {source} does not fit the {len(autoencoder.config.block_out_channels)}-level "
            f"{autoencoder.config.latent_channels}-channel LDM AutoencoderKL: {'; '.join(problems)}; expected the "
            f"encoder/decoder state dict of vavae-imagenet256-f16d32-dinov2.pt (training-only loss.*, "
            f"foundation_model.* and linear_proj.* entries are dropped automatically)."
        )
        error.missing_keys, error.unexpected_keys, error.wrong_shape_keys = missing, unexpected, wrong_shape
        raise error
    autoencoder.load_state_dict(converted, strict=True)


def load_vavae(
    path: str | Path,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    config: str = "f16d32",
) -> VAVAE:
    """Load a VA-VAE for inference: the public LDM ``.pt``, an LDM-key ``.safetensors``, or a diffusers folder.

    ``config`` selects the architecture (``f16d32`` for the released model, ``tiny`` for tests); a diffusers
    folder carries its own config. The returned :class:`VAVAE` is in eval mode with gradients off.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(
            f"VA-VAE checkpoint {path} does not exist; expected the file vavae-imagenet256-f16d32-dinov2.pt from the "
            f"LightningDiT release (or a diffusers AutoencoderKL folder); pass its path with --vavae_path."
        )
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(
                f"{path} is a folder without config.json; "
                "expected a diffusers AutoencoderKL folder or the .pt file itself."
            )
        try:
            autoencoder = AutoencoderKL.from_pretrained(str(path), local_files_only=True, low_cpu_mem_usage=False)
        except Exception as err:
            raise CheckpointError(f"Cannot load the diffusers AutoencoderKL folder {path} ({type(err).__name__}: {err}).") from err
    else:
        state = read_state_dict(path, "VA-VAE checkpoint")
        if not isinstance(state, dict):
            raise CheckpointError(
                f"VA-VAE checkpoint {path} holds a {type(state).__name__}, "
                "not a state dict; expected vavae-imagenet256-f16d32-dinov2.pt."
            )
        autoencoder = build_vavae_autoencoder(config)
        load_vavae_state_dict(autoencoder, state, source=f"checkpoint {path}")
    autoencoder = autoencoder.to(device)
    if autoencoder.dtype != dtype:
        autoencoder = autoencoder.to(dtype=dtype)
    return VAVAE(autoencoder)


def file_fingerprint(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """A fast identity for large weight files: ``"<size>-<sha256 of size, first and last MiB>"`` (24 hex digits).

    Reads at most 2 MiB, so a multi-GB VAE is fingerprinted in milliseconds; good enough to notice latents or
    statistics made with another VAE file. A folder is fingerprinted over its weight and config files.
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".bin", ".pt", ".json"})
        if not files:
            raise CheckpointError(f"Cannot fingerprint {path}: the folder holds no weight or config files.")
        digest = hashlib.sha256()
        total = 0
        for file in files:
            part = file_fingerprint(file, chunk_bytes)
            digest.update(f"{file.relative_to(path).as_posix()}:{part};".encode())
            total += file.stat().st_size
        return f"{total}-{digest.hexdigest()[:24]}"
    if not path.is_file():
        raise CheckpointError(f"Cannot fingerprint {path}: the file does not exist.")
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with open(path, "rb") as handle:
        digest.update(handle.read(chunk_bytes))
        if size > chunk_bytes:
            handle.seek(max(size - chunk_bytes, chunk_bytes))
            digest.update(handle.read(chunk_bytes))
    return f"{size}-{digest.hexdigest()[:24]}"
