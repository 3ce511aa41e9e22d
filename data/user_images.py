"""Folders of images, one per user, for VA-VAE feature extraction (stage 1 of user-conditioned generation).

The users' data: one folder per person named ``ID_<n>`` (or ``user_<n>``), n = 1..num_users, optionally under
``train/`` and ``val/``. Folder names are mapped to user IDs explicitly with :func:`user_id_from_folder`;
sorting the names as strings would put ``ID_10`` before ``ID_2`` and silently shift every label.

A split made here (no ``train/``/``val/`` folders) is seeded, per user, and by recording: crops of one recording
(by default the subfolder inside the user folder; ``--group_pattern`` or ``--split_manifest`` otherwise) stay on
one side, and a validation file identical to a training file is an error (:func:`check_no_duplicates`).

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


def recording_groups(
    users: dict[int, list[Path]], root: str | Path, *, pattern: str | None = None, manifest: dict[Path, str] | None = None
) -> dict[Path, str]:
    """The recording (session) each image comes from, so that a split keeps a recording's crops on one side.

    Default: the first subfolder inside the user folder (``ID_3/session_2/crop_07.png`` -> ``session_2``); an image
    directly in the user folder is a recording of its own. ``pattern`` (a regular expression searched in the path
    relative to the user folder; its first group, or the whole match, names the recording) or ``manifest`` (path ->
    group, from :func:`read_split_manifest`) replace that.
    """
    root = Path(root)
    regex = re.compile(pattern) if pattern else None
    groups = {}
    for user, paths in users.items():
        for path in paths:
            if manifest is not None:
                if path.resolve() not in manifest:
                    raise DataError(f"--split_manifest does not list {path}; list every image (path,group) or drop the flag.")
                groups[path] = manifest[path.resolve()]
                continue
            user_dir = next((parent for parent in path.parents if user_id_from_folder(parent.name) == user), path.parent)
            relative = path.relative_to(user_dir).as_posix()
            if regex is not None:
                match = regex.search(relative)
                if match is None:
                    raise DataError(f"--group_pattern {pattern!r} does not match {relative} (in {user_dir}); write a pattern that "
                                    "matches every image path relative to its user folder.")
                groups[path] = match.group(1) if regex.groups else match.group(0)
            else:
                parts = relative.split("/")
                groups[path] = parts[0] if len(parts) > 1 else relative
    return groups


def read_split_manifest(path: str | Path, data_dir: str | Path) -> tuple[dict[Path, str], str]:
    """A CSV with a header ``path,group`` or ``path,split`` (train/val); paths relative to ``data_dir`` or absolute.

    Returns ``({resolved path: group or split}, column)``.
    """
    import csv

    path, data_dir = Path(path), Path(data_dir)
    if not path.is_file():
        raise DataError(f"--split_manifest {path} does not exist; expected a CSV with columns path,group or path,split.")
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    columns = set(rows[0]) if rows else set()
    column = "split" if "split" in columns else "group"
    if not rows or "path" not in columns or column not in columns:
        raise DataError(f"--split_manifest {path} needs a header path,group or path,split and one row per image.")
    table = {}
    for row in rows:
        file = Path(row["path"])
        value = (row[column] or "").strip()
        if column == "split" and value not in ("train", "val"):
            raise DataError(f"--split_manifest {path}: split {value!r} for {row['path']}; use train or val.")
        table[(file if file.is_absolute() else data_dir / file).resolve()] = value
    return table, column


def split_train_val(
    users: dict[int, list[Path]], val_fraction: float, seed: int, groups: dict[Path, str] | None = None
) -> tuple[list[UserImage], list[UserImage]]:
    """Seeded split, stratified per user and grouped by recording: ``round(k * val_fraction)`` of a user's ``k``
    recordings (``groups``, from :func:`recording_groups`; each image its own when None) go to validation whole.

    A user with at least two recordings keeps at least one on each side (when ``val_fraction > 0``). The draw for
    a user depends only on (seed, user ID, its recordings), not on the other users.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"--val_fraction must be in [0, 1), got {val_fraction}.")
    train, val = [], []
    for user, paths in users.items():
        keys = [groups[path] if groups is not None else str(index) for index, path in enumerate(paths)]
        recordings = list(dict.fromkeys(keys))  # first-seen order, i.e. the natural order of the files
        count = len(recordings)
        n_val = int(round(count * val_fraction))
        if val_fraction > 0 and count >= 2:
            n_val = min(max(n_val, 1), count - 1)
        else:
            n_val = min(n_val, max(count - 1, 0))
        chosen = {recordings[i] for i in np.random.default_rng([seed, user]).permutation(count)[:n_val].tolist()}
        for key, path in zip(keys, paths):
            (val if key in chosen else train).append(UserImage(path, user))
    return train, val


def check_no_duplicates(train: list[UserImage], val: list[UserImage]) -> None:
    """A DataError when a validation image is byte for byte a training image (a copied file, a re-exported crop)."""
    import hashlib

    def digest(path: Path) -> str:
        return hashlib.sha256(path.read_bytes()).hexdigest()

    seen = {digest(item.path): item.path for item in train}
    copies = [(item.path, seen[key]) for item in val if (key := digest(item.path)) in seen]
    if copies:
        example = f"{copies[0][0]} = {copies[0][1]}"
        raise DataError(f"{len(copies)} validation image(s) are identical to training images (e.g. {example}); remove the copies "
                        "or keep them in one recording group (--group_pattern / --split_manifest).")


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
