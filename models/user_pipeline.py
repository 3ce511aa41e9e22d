"""What the user-generation trainer's previews and ``infer.py user`` share: checkpoints, images and grids.

The users' notes record an inference script that drifted from the training-time sampler (it guessed configs
from files and patched dimension mismatches) and a fallback to random condition-encoder weights. Here a
``user_generation`` checkpoint (written by ``train_dit_user.py``) carries everything generation needs: the
backbone and its constructor arguments, raw and EMA weights, the number of users, the latent statistics with
the VA-VAE fingerprint, the DDPM noise-scheduler config (UNet) and the sampling defaults. The model is rebuilt
from that configuration and loaded strictly; anything that does not fit is a one-line CheckpointError.

:func:`generate_user_images` is the one path from a model to images (``generate_latents`` in
``models/user_generation.py``, denormalise with the checkpoint's statistics, decode with the VA-VAE), so a
preview and ``infer.py user`` with the same seed, users and settings compute identical pixels. Reading the
users' folder layouts and writing images and grids is folder I/O and lives in ``pipelines/user_io.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from data.latents import LatentStats
from models.user_generation import BACKBONES, build_backbone, build_noise_scheduler, generate_latents
from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

CHECKPOINT_KIND = "user_generation"

AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------


@dataclass
class UserModel:
    """A generation-ready model with what it was trained with."""

    model: nn.Module
    backbone: str
    num_users: int
    stats: LatentStats | None  # None for a UNet folder until pipelines.user_io.folder_latent_stats sets it
    noise_scheduler: DDPMScheduler | None
    sampling: dict
    source: str
    weights: str  # "ema", "raw" or "folder"
    checkpoint: dict = field(default_factory=dict, repr=False)  # the other entries (config, history, preview)

    @property
    def vae_fingerprint(self) -> str | None:
        return self.stats.vae_fingerprint if self.stats is not None else None


def load_user_checkpoint(path: str | Path, *, use_ema: bool = True, command: str = "infer.py user") -> UserModel:
    """Rebuild the model of a ``user_generation`` checkpoint and load its EMA (or raw) weights strictly."""
    checkpoint = load_checkpoint(path, CHECKPOINT_KIND, command)
    missing = [key for key in ("backbone", "model_config", "model", "latent_stats", "num_users") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it was not written by train_dit_user.py.")
    backbone = checkpoint["backbone"]
    model = build_backbone(backbone, checkpoint["model_config"])
    try:
        model.load_state_dict(checkpoint["model"], strict=True)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(f"The weights in {path} do not fit the model its own configuration describes ({detail}).") from err
    weights = "raw"
    if use_ema and checkpoint.get("ema"):
        averaged = checkpoint["ema"]["weights"]
        names = [name for name, _ in model.named_parameters()]
        absent = [name for name in names if name not in averaged]
        if absent:
            raise CheckpointError(
                f"The EMA weights in {path} lack {len(absent)} parameters (e.g. {absent[0]}); "
                "use --no_ema for the raw weights."
            )
        with torch.no_grad():
            for name, parameter in model.named_parameters():
                parameter.copy_(averaged[name])
        weights = "ema"
    model.eval().requires_grad_(False)
    num_users = int(checkpoint["num_users"])
    spec = BACKBONES.get(backbone)
    if spec.num_users(model) != num_users:
        raise CheckpointError(f"{path} says {num_users} users but its model was built for {spec.num_users(model)}.")
    scheduler = None
    if spec.objective.uses_noise_scheduler:
        scheduler = DDPMScheduler.from_config(checkpoint.get("noise_scheduler_config") or dict(build_noise_scheduler().config))
    sampling = dict(spec.sampling_defaults, **(checkpoint.get("sampling") or {}))
    rest = {k: v for k, v in checkpoint.items() if k not in ("model", "ema", "optimizer", "rng", "lr_scheduler", "scaler")}
    return UserModel(model, backbone, num_users, LatentStats.from_dict(checkpoint["latent_stats"]), scheduler, sampling,
                     str(path), weights, rest)


# --------------------------------------------------------------------------------------------------
# Latents -> images
# --------------------------------------------------------------------------------------------------


def sampling_kwargs(settings: dict) -> dict:
    """Sampling settings (as stored in checkpoints) -> keyword arguments of ``generate_latents``."""
    interval = settings.get("guidance_interval") or [0.0, 1.0]
    return {
        "sampler": settings.get("sampler"),
        "num_steps": int(settings["num_steps"]),
        "guidance_scale": float(settings.get("guidance_scale", 1.0)),
        "guidance_interval": (float(interval[0]), float(interval[1])),
        "shift": float(settings.get("shift", 1.0)),
        "guidance_channels": settings.get("guidance_channels"),
        "eta": float(settings.get("eta", 0.0)),
        "timestep_spacing": settings.get("timestep_spacing", "trailing"),
    }


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor, batch_size: int = 64, device: torch.device | str | None = None) -> torch.Tensor:
    """VA-VAE latents (VAE scale, not normalised) -> images in [-1, 1], float32 on the CPU, in ``batch_size`` chunks."""
    device = torch.device(device) if device is not None else next(vae.parameters()).device
    images = [vae.decode(latents[start:start + batch_size].to(device)).float().clamp(-1, 1).cpu()
              for start in range(0, latents.shape[0], batch_size)]
    return torch.cat(images)


def latent_channel_images(latents: torch.Tensor, min_side: int = 64) -> torch.Tensor:
    """What previews show without a VA-VAE: latent channels 0-2 as RGB, each stretched to [-1, 1] over the batch.

    Not images: a way to watch training (structure per user, collapse, NaNs) when no decoder is at hand.
    """
    channels = latents[:, :3].float()
    if channels.shape[1] < 3:
        channels = torch.cat([channels, channels[:, -1:].expand(-1, 3 - channels.shape[1], -1, -1)], dim=1)
    low = channels.amin(dim=(0, 2, 3), keepdim=True)
    high = channels.amax(dim=(0, 2, 3), keepdim=True)
    channels = (channels - low) / (high - low).clamp_min(1e-8) * 2 - 1
    if channels.shape[-1] < min_side:
        channels = F.interpolate(channels, scale_factor=min_side // channels.shape[-1] or 1, mode="nearest")
    return channels


def generate_user_images(
    model: nn.Module,
    backbone: str,
    user_ids,
    num_per_user: int,
    *,
    stats: LatentStats,
    vae=None,
    seed: int,
    batch_size: int = 64,
    first_index: int = 0,
    items=None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    noise_scheduler: DDPMScheduler | None = None,
    progress: bool = False,
    **sampling,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (user-major, in [-1, 1]) and their VAE-scale latents for 1-based ``user_ids``.

    ``sampling`` are :func:`sampling_kwargs`; ``items`` explicit (user, index) samples as ``generate_latents`` takes them.
    Without ``vae`` the images are :func:`latent_channel_images`.
    """
    latents = generate_latents(
        model, backbone, user_ids, num_per_user, seed=seed, batch_size=batch_size, first_index=first_index, items=items,
        device=device,
        autocast_dtype=autocast_dtype, noise_scheduler=noise_scheduler, progress=progress, **sampling,
    )
    vae_latents = stats.denormalize(latents)
    if vae is None:
        return latent_channel_images(vae_latents), vae_latents
    return decode_latents(vae, vae_latents, batch_size, device), vae_latents


def check_vae_matches(stats: LatentStats, vae_path: str | Path, what: str = "--vavae_path") -> str:
    """Fingerprint of ``vae_path``; a UserError if the latent statistics were computed with another VA-VAE file."""
    from models.vavae import file_fingerprint

    fingerprint = file_fingerprint(vae_path)
    stats.check_fingerprint(fingerprint, f"{what} {vae_path}")
    return fingerprint
