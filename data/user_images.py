"""Folders of images, one per user, for VA-VAE feature extraction (stage 1 of user-conditioned generation).

The users' data: one folder per person named ``ID_<n>`` (or ``user_<n>``), n = 1..num_users, optionally under
``train/`` and ``val/``. Folder names are mapped to user IDs explicitly with :func:`user_id_from_folder`;
sorting the names as strings would put ``ID_10`` before ``ID_2`` and silently shift every label.

Preprocessing follows hustvl/LightningDiT ``tokenizer/vavae.py`` (``img_transform``): ADM's
``center_crop_arr`` (box-halve while the image is at least twice the target, bicubic-resize the short side to
the target, crop the centre), then [0, 1] -> [-1, 1]. ``resize="stretch"`` instead resizes the whole image to a
square, which keeps the full time axis of a wide spectrogram. Horizontal flips are not applied here: time
reversal is not label-safe for micro-Doppler gait, so the extractor stores flipped copies only when asked.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from utils.errors import DataError
from utils.images import IMAGE_EXTENSIONS, list_images, load_rgb

# ID_7, id-7, ID7, user_07, User-7 (case-insensitive); the number is the user ID.
USER_FOLDER_PATTERN = re.compile(r"^(?:id|user)[_-]?0*(\d+)$", re.IGNORECASE)
TRAIN_FOLDER_NAMES = ("train", "training")
VAL_FOLDER_NAMES = ("val", "valid", "validation")
RESIZE_MODES = ("crop", "stretch")


def user_id_from_folder(name: str) -> int | None:
    """The user ID a folder name denotes (``ID_10`` -> 10, ``user_03`` -> 3), or None if it names no user."""
    match = USER_FOLDER_PATTERN.match(name)
    return int(match[1]) if match else None


def natural_key(path: Path) -> list:
    """Sort key that orders ``img2`` before ``img10`` (numbers compared as numbers)."""
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", path.name)]


@dataclass(frozen=True)
class UserImage:
    path: Path
    user_id: int


def scan_user_folders(root: str | Path) -> dict[int, list[Path]]:
    """``{user_id: [image paths]}`` for the user folders directly under ``root``.

    Hidden folders are skipped; any other folder whose name is not ``ID_<n>``/``user_<n>``, a user ID of 0,
    or two folders for one user are DataErrors naming the folders.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"Data folder {root} does not exist; "
            "expected one folder per user named ID_1, ID_2, ... (or train/ and val/ holding them)."
        )
    users: dict[int, list[Path]] = {}
    folders: dict[int, str] = {}
    unknown = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
        user = user_id_from_folder(folder.name)
        if user is None:
            unknown.append(folder.name)
            continue
        if user == 0:
            raise DataError(f"Folder {folder} names user 0, but user IDs count from 1 (ID_1 is the first user); renumber the folders.")
        if user in folders:
            raise DataError(f"Folders {folders[user]} and {folder.name} in {root} both name user {user}; merge or rename them.")
        folders[user] = folder.name
        users[user] = sorted(list_images(folder, recursive=True), key=natural_key)
    if unknown:
        raise DataError(
            f"{root} holds folders that name no user: {', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}; "
            f"expected ID_<n> or user_<n> (n = 1, 2, ...) or train/ and val/ holding them."
        )
    if not users:
        raise DataError(f"{root} holds no user folders; expected one folder per user named ID_1, ID_2, ... (or user_1, ...).")
    if not any(users.values()):
        raise DataError(f"The user folders in {root} hold no images (looked for {', '.join(IMAGE_EXTENSIONS)}); check --data_dir.")
    return dict(sorted(users.items()))


def find_split_folders(root: str | Path) -> tuple[Path, Path | None] | None:
    """``(train, val or None)`` when ``root`` holds ``train/`` (and ``val/``) folders, else None."""
    root = Path(root)
    children = {p.name.lower(): p for p in root.iterdir() if p.is_dir()} if root.is_dir() else {}
    train = next((children[name] for name in TRAIN_FOLDER_NAMES if name in children), None)
    if train is None:
        return None
    val = next((children[name] for name in VAL_FOLDER_NAMES if name in children), None)
    return train, val


def split_train_val(users: dict[int, list[Path]], val_fraction: float, seed: int) -> tuple[list[UserImage], list[UserImage]]:
    """Seeded split, stratified per user: ``round(n * val_fraction)`` images of each user go to validation.

    A user with at least two images keeps at least one image on each side (when ``val_fraction > 0``). The
    draw for a user depends only on (seed, user ID, its file list), not on the other users.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction}.")
    train, val = [], []
    for user, paths in users.items():
        count = len(paths)
        n_val = int(round(count * val_fraction))
        if val_fraction > 0 and count >= 2:
            n_val = min(max(n_val, 1), count - 1)
        else:
            n_val = min(n_val, max(count - 1, 0))
        chosen = set(np.random.default_rng([seed, user]).permutation(count)[:n_val].tolist())
        for index, path in enumerate(paths):
            (val if index in chosen else train).append(UserImage(path, user))
    return train, val


def as_user_images(users: dict[int, list[Path]]) -> list[UserImage]:
    return [UserImage(path, user) for user, paths in users.items() for path in paths]


def center_crop_arr(image: Image.Image, image_size: int) -> Image.Image:
    """ADM's centre crop (as LightningDiT's VA-VAE transform): halve with a box filter, resize, crop."""
    while min(*image.size) >= 2 * image_size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = image_size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    array = np.asarray(image)
    top = (array.shape[0] - image_size) // 2
    left = (array.shape[1] - image_size) // 2
    return Image.fromarray(array[top:top + image_size, left:left + image_size])


def prepare_image(image: Image.Image, image_size: int, resize: str = "crop") -> torch.Tensor:
    """RGB PIL image -> (3, S, S) float tensor in [-1, 1] (centre crop or stretch to ``image_size``)."""
    if resize == "crop":
        image = center_crop_arr(image, image_size)
    elif resize == "stretch":
        image = image.resize((image_size, image_size), resample=Image.BICUBIC)
    else:
        raise ValueError(f"resize must be one of {RESIZE_MODES}, got {resize!r}")
    array = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return array / 127.5 - 1.0


class UserImageDataset(Dataset):
    """``(image (3,S,S) in [-1,1], user_id)`` for a list of :class:`UserImage` (order kept)."""

    def __init__(self, items: list[UserImage], image_size: int = 256, resize: str = "crop"):
        self.items = list(items)
        self.image_size = image_size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        item = self.items[index]
        return prepare_image(load_rgb(item.path), self.image_size, self.resize), item.user_id
