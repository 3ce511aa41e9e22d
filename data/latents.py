"""Pre-extracted VA-VAE latents: the files, their per-channel statistics and the training dataset.

Reference: hustvl/LightningDiT ``extract_features.py`` and ``datasets/img_latent_dataset.py``. The files use
LightningDiT's tensor names, so either code base reads them: ``latents`` (N,C,H,W) float32, ``labels`` (N,)
int64 and, only when flipped copies were extracted, ``latents_flip``. ``labels`` are label-table rows as in
LightningDiT (class index = user ID - 1; user IDs are 1..num_users). The safetensors metadata records the
VA-VAE file fingerprint (``models.vavae.file_fingerprint``), whether latents are posterior means
(``mode``) or samples (``sample``), the image size and the number of users.

Statistics are per channel, shape (1,C,1,1), computed on the train split only (mean and unbiased std over
samples and pixels, as the reference computes them) and saved beside the latents as
``latents_stats.safetensors`` together with the fingerprint of the VAE that made them. Unlike the reference's
``latents_stats.pt`` cache, which is silently reused when stale, a dataset refuses statistics whose
fingerprint differs from its latents'. Model checkpoints carry ``LatentStats.to_dict()`` so generation
denormalises with exactly the statistics training normalised with.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import Dataset

from utils.errors import DataError, UserError

LATENTS_KEY = "latents"
LABELS_KEY = "labels"
FLIP_KEY = "latents_flip"
STATS_FILENAME = "latents_stats.safetensors"
POSTERIOR_MODES = ("mode", "sample")


def _atomic_save(tensors: dict, path: Path, metadata: dict[str, str]) -> None:
    """Write to a temporary file and rename it, so a crash never leaves a half-written file under ``path``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(temporary), metadata=metadata)
    os.replace(temporary, path)


@dataclass
class LatentFile:
    """The contents of one latent file (one split)."""

    latents: torch.Tensor
    labels: torch.Tensor
    latents_flip: torch.Tensor | None
    metadata: dict[str, str]
    path: Path | None = None

    @property
    def vae_fingerprint(self) -> str | None:
        return self.metadata.get("vae_fingerprint")

    @property
    def num_users(self) -> int | None:
        value = self.metadata.get("num_users")
        return int(value) if value is not None else None

    @property
    def user_ids(self) -> torch.Tensor:
        return self.labels + 1


def save_latent_file(
    path: str | Path,
    latents: torch.Tensor,
    user_ids,
    *,
    num_users: int,
    vae_fingerprint: str,
    posterior: str,
    image_size: int,
    latents_flip: torch.Tensor | None = None,
    extra_metadata: dict[str, str] | None = None,
) -> None:
    """Write ``latents`` (N,C,H,W) with their 1-based ``user_ids`` (stored as rows ``user_id - 1``)."""
    if posterior not in POSTERIOR_MODES:
        raise ValueError(f"posterior must be one of {POSTERIOR_MODES}, got {posterior!r}.")
    user_ids = torch.as_tensor(user_ids, dtype=torch.long).flatten()
    if latents.ndim != 4 or latents.shape[0] != user_ids.shape[0]:
        raise ValueError(f"Expected latents (N,C,H,W) and N user IDs, got {tuple(latents.shape)} and {user_ids.shape[0]}.")
    outside = user_ids[(user_ids < 1) | (user_ids > num_users)].unique().tolist()
    if outside:
        raise UserError(f"User IDs {outside} are outside 1..{num_users}; user folders must be numbered ID_1 ... ID_{num_users}.")
    tensors = {LATENTS_KEY: latents.float().cpu(), LABELS_KEY: (user_ids - 1).cpu()}
    if latents_flip is not None:
        if latents_flip.shape != latents.shape:
            raise ValueError(f"latents_flip {tuple(latents_flip.shape)} must match latents {tuple(latents.shape)}.")
        tensors[FLIP_KEY] = latents_flip.float().cpu()
    metadata = {
        "format": "user-latents-v1",
        "vae_fingerprint": vae_fingerprint,
        "posterior": posterior,
        "image_size": str(image_size),
        "num_users": str(num_users),
        "labels": "user_id - 1",
        "total_size": str(latents.shape[0]),
    }
    metadata.update({k: str(v) for k, v in (extra_metadata or {}).items()})
    _atomic_save(tensors, Path(path), metadata)


def load_latent_file(path: str | Path) -> LatentFile:
    """Read a latent file written by :func:`save_latent_file` (or by LightningDiT's extractor)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(
            f"Latent file {path} does not exist; "
            "run scripts/extract_features.py first (it writes train.safetensors and val.safetensors)."
        )
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
        tensors = load_file(str(path))
    except Exception as err:
        raise DataError(f"Cannot read latent file {path} ({err}); re-run the feature extraction.") from err
    for key in (LATENTS_KEY, LABELS_KEY):
        if key not in tensors:
            raise DataError(f"Latent file {path} has no '{key}' tensor (found {sorted(tensors)}); expected 'latents' and 'labels'.")
    latents, labels = tensors[LATENTS_KEY].float(), tensors[LABELS_KEY].long().flatten()
    if latents.ndim != 4 or latents.shape[0] != labels.shape[0]:
        raise DataError(
            f"Latent file {path} holds latents {tuple(latents.shape)} and {labels.shape[0]} labels; "
            "expected (N,C,H,W) and N labels."
        )
    flips = tensors.get(FLIP_KEY)
    if flips is not None and flips.shape != latents.shape:
        raise DataError(f"Latent file {path}: latents_flip {tuple(flips.shape)} does not match latents {tuple(latents.shape)}.")
    result = LatentFile(latents, labels, None if flips is None else flips.float(), metadata, path)
    if labels.numel() and (labels.min() < 0 or (result.num_users is not None and labels.max() >= result.num_users)):
        raise DataError(
            f"Latent file {path} has labels outside 0..{(result.num_users or 0) - 1} (user ID - 1); "
            "re-run the feature extraction."
        )
    return result


@dataclass
class LatentStats:
    """Per-channel latent mean and std (1,C,1,1) and the fingerprint of the VAE whose latents they describe."""

    mean: torch.Tensor
    std: torch.Tensor
    vae_fingerprint: str | None
    num_samples: int = 0

    def _like(self, stat: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        stat = stat.to(latents)
        return stat.view(-1, 1, 1) if latents.ndim == 3 else stat  # one (C,H,W) latent or a (B,C,H,W) batch

    def normalize(self, latents: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the unit-scale space the diffusion model works in."""
        return (latents - self._like(self.mean, latents)) / self._like(self.std, latents)

    def denormalize(self, latents: torch.Tensor) -> torch.Tensor:
        """Model-space latents -> VAE latents, ready for ``VAVAE.decode``."""
        return latents * self._like(self.std, latents) + self._like(self.mean, latents)

    def check_fingerprint(self, fingerprint: str | None, what: str) -> None:
        """UserError unless ``fingerprint`` (of ``what``) is the VAE these statistics were computed for."""
        if fingerprint != self.vae_fingerprint:
            raise UserError(
                f"The latent statistics belong to the VA-VAE with fingerprint {self.vae_fingerprint}, but {what} "
                f"has {fingerprint}; use the same VA-VAE file for extraction, training and decoding, or re-extract."
            )

    def to_dict(self) -> dict:
        """Tensors and plain Python only, for checkpoints read with ``weights_only=True``."""
        return {
            "mean": self.mean.clone(),
            "std": self.std.clone(),
            "vae_fingerprint": self.vae_fingerprint,
            "num_samples": int(self.num_samples),
        }

    @classmethod
    def from_dict(cls, values: dict) -> LatentStats:
        return cls(values["mean"].float(), values["std"].float(), values.get("vae_fingerprint"), int(values.get("num_samples", 0)))

    def save(self, path: str | Path) -> None:
        metadata = {"num_samples": str(self.num_samples), "split": "train"}
        if self.vae_fingerprint is not None:
            metadata["vae_fingerprint"] = self.vae_fingerprint
        _atomic_save({"mean": self.mean.float().cpu(), "std": self.std.float().cpu()}, Path(path), metadata)

    @classmethod
    def load(cls, path: str | Path) -> LatentStats:
        path = Path(path)
        if path.is_dir():
            path = path / STATS_FILENAME
        if not path.is_file():
            raise DataError(
                f"Latent statistics {path} do not exist; run scripts/extract_features.py, "
                f"which writes {STATS_FILENAME} beside train.safetensors."
            )
        with safe_open(str(path), framework="pt") as handle:
            metadata = dict(handle.metadata() or {})
            if not {"mean", "std"} <= set(handle.keys()):
                raise DataError(f"Latent statistics {path} lack 'mean' and 'std' tensors; re-run the feature extraction.")
            mean, std = handle.get_tensor("mean"), handle.get_tensor("std")
        return cls(mean.float(), std.float(), metadata.get("vae_fingerprint"), int(metadata.get("num_samples", 0)))


def compute_latent_stats(latents: torch.Tensor, vae_fingerprint: str | None, chunk_size: int = 1024) -> LatentStats:
    """Per-channel mean and unbiased std over samples and pixels (float64 sums, chunked for large N)."""
    if latents.ndim != 4 or latents.shape[0] == 0:
        raise DataError(f"Cannot compute latent statistics from a tensor of shape {tuple(latents.shape)}; expected (N,C,H,W) with N >= 1.")
    channels = latents.shape[1]
    total = torch.zeros(channels, dtype=torch.float64)
    total_sq = torch.zeros(channels, dtype=torch.float64)
    for start in range(0, latents.shape[0], chunk_size):
        chunk = latents[start:start + chunk_size].to(torch.float64)
        total += chunk.sum(dim=(0, 2, 3))
        total_sq += chunk.pow(2).sum(dim=(0, 2, 3))
    count = latents.shape[0] * latents.shape[2] * latents.shape[3]
    mean = total / count
    variance = (total_sq - count * mean.pow(2)) / max(count - 1, 1)
    std = variance.clamp_min(0).sqrt()
    if not torch.isfinite(mean).all() or not torch.isfinite(std).all():
        raise DataError("The latents contain NaN or infinite values; check the VA-VAE file and the input images.")
    if (std == 0).any():
        raise DataError(
            f"Latent channels {torch.nonzero(std == 0).flatten().tolist()} are constant; "
            "the extraction produced degenerate latents."
        )
    return LatentStats(mean.float().view(1, channels, 1, 1), std.float().view(1, channels, 1, 1), vae_fingerprint, latents.shape[0])


class LatentDataset(Dataset):
    """Normalised latents and label rows of one latent file: ``(latent (C,H,W) float32, label int64)``.

    With ``use_flip`` each item is the flipped copy with probability 1/2 (the file must hold
    ``latents_flip``). Flips are off by default: time reversal is not label-safe for micro-Doppler gait.
    """

    def __init__(self, latent_file: str | Path | LatentFile, stats: LatentStats, use_flip: bool = False):
        data = latent_file if isinstance(latent_file, LatentFile) else load_latent_file(latent_file)
        where = data.path or "the latent file"
        stats.check_fingerprint(data.vae_fingerprint, f"the latents in {where}")
        if stats.mean.shape[1] != data.latents.shape[1]:
            raise UserError(
                f"The latent statistics have {stats.mean.shape[1]} channels but {where} has {data.latents.shape[1]}; "
                "re-extract."
            )
        if use_flip and data.latents_flip is None:
            raise DataError(f"Flips were requested but {where} has no 'latents_flip'; extract with flips enabled or train without them.")
        self.stats = stats
        self.metadata = data.metadata
        self.labels = data.labels
        self.latents = stats.normalize(data.latents)
        self.latents_flip = stats.normalize(data.latents_flip) if use_flip else None

    @property
    def num_users(self) -> int | None:
        value = self.metadata.get("num_users")
        return int(value) if value is not None else None

    def __len__(self) -> int:
        return self.latents.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        source = self.latents
        if self.latents_flip is not None and torch.rand(()) < 0.5:
            source = self.latents_flip
        return source[index], self.labels[index]
