"""Stage 1 of user-conditioned generation as a library: user folders -> VA-VAE latents, statistics and users.json.

After hustvl/LightningDiT ``extract_features.py``: images centre-cropped to 256 px and scaled to [-1, 1], encoded
by the VA-VAE (f16d32: 3x256x256 -> 32x16x16), written with LightningDiT's tensor names (``latents``,
``labels``, and ``latents_flip`` only with ``flip``) plus metadata (VA-VAE file fingerprint, posterior mode
or sample, image size, number of users). Per-channel statistics (1,C,1,1) come from the train split only and
are saved beside the latents with the fingerprint, so training and decoding can check they belong together.

``scripts/extract_features.py`` (the command line) and ``scripts/run_user_pipeline.py`` (all three stages) call
:func:`collect_splits` and :func:`extract_features`. Without ``train/``/``val/`` folders the split is seeded, per
user and by recording (``data.user_images.recording_groups``: the subfolder inside the user folder by default, or
``group_pattern`` / ``split_manifest``), and a validation file identical to a training file is an error.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from data.latents import STATS_FILENAME, compute_latent_stats, save_latent_file
from data.user_images import (
    UserImageDataset,
    as_user_images,
    check_no_duplicates,
    find_split_folders,
    read_split_manifest,
    recording_groups,
    scan_user_folders,
    split_train_val,
)
from utils.errors import DataError, UserError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Longest side over shortest side an input may have. The centre crop keeps a square of the short side (so a wider image
# loses most of its time axis) and --resize stretch squeezes it by the same factor; beyond 8, cut it into crops first.
MAX_ASPECT = 8.0


@dataclass
class ExtractionSettings:
    """What stage 1 needs (the flags of ``scripts/extract_features.py``, same names)."""

    data_dir: str
    vavae_path: str
    output_path: str
    vavae_config: str = "f16d32"
    val_dir: str | None = None
    batch_size: int = 32
    image_size: int = 256
    resize: str = "crop"
    val_fraction: float = 0.1
    group_pattern: str | None = None
    split_manifest: str | None = None
    num_users: int | None = None
    posterior: str = "sample"
    flip: bool = False
    seed: int = 0
    device: str = "auto"
    precision: str = "fp32"
    num_workers: int | None = None


def collect_splits(settings: ExtractionSettings) -> tuple[dict, list, list]:
    """The user folders, the train items and the validation items (explicit folders, a manifest or a grouped split)."""
    data_dir = Path(settings.data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir} does not exist; expected one folder per user (ID_1, ID_2, ...) or train/ and val/.")
    splits = find_split_folders(data_dir)
    train_root, val_root = (splits if splits else (data_dir, None))
    if settings.val_dir:
        val_root = Path(settings.val_dir)
    if val_root is not None and (settings.group_pattern or settings.split_manifest):
        raise UserError(f"--group_pattern/--split_manifest split one folder, but {val_root} already holds the validation images; "
                        "drop the flag or the val/ folder.")
    train_users = scan_user_folders(train_root)
    folders = {"train": {str(user): len(paths) for user, paths in train_users.items()}}
    if val_root is not None:
        val_users = scan_user_folders(val_root)
        unseen = sorted(set(val_users) - set(train_users))
        if unseen:
            raise DataError(
                f"Users {unseen} have validation images in {val_root} but no training folder in {train_root}; "
                "add their training images."
            )
        train_items, val_items = as_user_images(train_users), as_user_images(val_users)
        folders["val"] = {str(user): len(paths) for user, paths in val_users.items()}
        split = f"folders {train_root} and {val_root}"
    elif settings.split_manifest:
        table, column = read_split_manifest(settings.split_manifest, data_dir)
        groups = recording_groups(train_users, train_root, manifest=table)
        if column == "split":
            items = as_user_images(train_users)
            train_items = [item for item in items if groups[item.path] == "train"]
            val_items = [item for item in items if groups[item.path] == "val"]
        else:
            train_items, val_items = split_train_val(train_users, settings.val_fraction, settings.seed, groups)
        split = f"--split_manifest {settings.split_manifest} ({column} column)"
    else:
        groups = recording_groups(train_users, train_root, pattern=settings.group_pattern)
        train_items, val_items = split_train_val(train_users, settings.val_fraction, settings.seed, groups)
        by = f"--group_pattern {settings.group_pattern!r}" if settings.group_pattern else "recording = subfolder of the user folder"
        split = (f"seeded split of {train_root} by recording ({by}, {len(set(groups.values()))} recordings): "
                 f"val_fraction {settings.val_fraction}, seed {settings.seed}")
    check_no_duplicates(train_items, val_items)
    highest = max(train_users)
    num_users = settings.num_users or highest
    if num_users < highest:
        raise UserError(f"--num_users {num_users} is smaller than the highest user folder number {highest}; raise it or drop the flag.")
    return {"num_users": num_users, "train_root": str(train_root), "val_root": str(val_root) if val_root else None,
            "split": split, "images_per_user": folders}, train_items, val_items


def inspect_images(items, min_side: int) -> dict[Path, dict[str, int]]:
    """Read every image's header (not its pixels): a file smaller than ``min_side`` (the VA-VAE's patch) or with an
    aspect ratio beyond :data:`MAX_ASPECT` is a :class:`DataError` naming it. Returns, per folder, how many images of
    each non-RGB mode (grayscale ``L``, ``RGBA``, palette ``P``...) will be converted to RGB."""
    from PIL import Image

    converted: dict[Path, dict[str, int]] = {}
    for item in items:
        path = Path(item.path)
        try:
            with Image.open(path) as image:
                (width, height), mode = image.size, image.mode
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise DataError(f"Cannot read image {path} ({err}); remove or replace the file.") from err
        if min(width, height) < min_side:
            raise DataError(f"{path} is {width}x{height} px, smaller than the VA-VAE's {min_side} px patch; remove it or "
                            "replace it with a larger spectrogram.")
        if max(width, height) > MAX_ASPECT * min(width, height):
            raise DataError(f"{path} is {width}x{height} px, an aspect ratio beyond {MAX_ASPECT:g}:1 (the crop or stretch to a "
                            "square would lose or squash most of it); cut it into shorter crops first.")
        if mode != "RGB":
            counts = converted.setdefault(path.parent, {})
            counts[mode] = counts.get(mode, 0) + 1
    return converted


def describe_conversions(converted: dict[Path, dict[str, int]]) -> list[str]:
    """One note per folder: how many images of which modes become RGB (transparent pixels composited on white)."""
    notes = []
    for folder, counts in sorted(converted.items()):
        modes = ", ".join(f"{count} {mode}" for mode, count in sorted(counts.items()))
        notes.append(f"note: {folder}: {sum(counts.values())} image(s) converted to RGB ({modes}; grayscale copied to the "
                     "three channels, transparency composited on white)")
    return notes


@torch.no_grad()
def encode_split(vae, items, settings: ExtractionSettings, device, generator, desc: str):
    """Latents (N,C,h,w) float32 on the CPU, flipped latents (or None) and the user IDs, in item order."""
    dataset = UserImageDataset(items, settings.image_size, settings.resize)
    workers = settings.num_workers if settings.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(dataset, batch_size=settings.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    sample = settings.posterior == "sample"
    latents, flips, users = [], [], []
    for images, user_ids in tqdm(loader, desc=desc, unit="batch"):
        images = images.to(device, non_blocking=True)
        latents.append(vae.encode(images, sample=sample, generator=generator).float().cpu())
        if settings.flip:
            flips.append(vae.encode(torch.flip(images, dims=[-1]), sample=sample, generator=generator).float().cpu())
        users.append(user_ids)
    return torch.cat(latents), (torch.cat(flips) if settings.flip else None), torch.cat(users)


def extract_features(settings: ExtractionSettings, splits: tuple[dict, list, list] | None = None) -> dict:
    """Encode the train and validation images and write the latent files, the statistics and ``users.json``.

    ``splits`` is :func:`collect_splits`'s result when the caller already has it.
    """
    from models.vavae import file_fingerprint, load_vavae
    from utils.accelerator import resolve_device
    from utils.checkpoint import atomic_write_text

    started = time.perf_counter()
    info, train_items, val_items = splits if splits is not None else collect_splits(settings)
    if not train_items:
        raise DataError(f"No training images found under {info['train_root']}.")
    device = resolve_device(settings.device)
    dtype = DTYPES[settings.precision]
    if dtype != torch.float32 and device.type != "cuda":
        raise UserError(f"--precision {settings.precision} needs a CUDA GPU; use fp32 on the CPU.")
    vae = load_vavae(settings.vavae_path, device=device, dtype=dtype, config=settings.vavae_config)
    factor = vae.downsample_factor
    if settings.image_size % factor:
        raise UserError(f"--image_size {settings.image_size} is not a multiple of the VA-VAE's downsampling factor {factor}.")
    for note in describe_conversions(inspect_images([*train_items, *val_items], factor)):
        print(note)
    fingerprint = file_fingerprint(settings.vavae_path)
    print(f"VA-VAE {settings.vavae_path} (fingerprint {fingerprint}): {vae.latent_channels} channels, "
          f"{settings.image_size} px -> {settings.image_size // factor}x{settings.image_size // factor} latents on {device}")
    print(f"{info['num_users']} users; {len(train_items)} training and {len(val_items)} validation images ({info['split']})")

    generator = torch.Generator(device=device).manual_seed(settings.seed)
    output = Path(settings.output_path)
    extra = {"vae_config": settings.vavae_config, "resize": settings.resize, "source": info["train_root"], "seed": settings.seed}
    written = {}
    stats = None
    for split, items in (("train", train_items), ("val", val_items)):
        path = output / f"{split}.safetensors"
        if not items:
            if path.exists():
                path.unlink()  # a stale validation file from an earlier extraction must not be picked up
            continue
        latents, flips, users = encode_split(vae, items, settings, device, generator, f"encoding {split}")
        if split == "train":
            stats = compute_latent_stats(latents, fingerprint)
        save_latent_file(path, latents, users, num_users=info["num_users"], vae_fingerprint=fingerprint,
                         posterior=settings.posterior, image_size=settings.image_size, latents_flip=flips,
                         extra_metadata=dict(extra, split=split))
        written[split] = path
        print(f"wrote {path}: latents {tuple(latents.shape)}{' + flips' if flips is not None else ''}")
    stats.save(output / STATS_FILENAME)
    manifest = dict(info, vavae_path=str(settings.vavae_path), vae_fingerprint=fingerprint, posterior=settings.posterior,
                    image_size=settings.image_size, resize=settings.resize, flip=settings.flip,
                    latent_shape=list(stats.mean.shape[1:2]) + [settings.image_size // factor] * 2,
                    counts={"train": len(train_items), "val": len(val_items)},
                    val_files=sorted(str(item.path) for item in val_items))
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", output / "users.json")
    print(f"wrote {output / STATS_FILENAME} (train split, {stats.num_samples} latents) and users.json "
          f"in {time.perf_counter() - started:.1f} s")
    return {"files": written, "stats": stats, "num_users": info["num_users"], "manifest": manifest}
