"""Paired image datasets (degraded input, ground truth) for image-to-image restoration such as Phaseformer.

Layouts, detected per root folder:

* **Split layout** (LSUI, UIEB, the synthetic underwater set of ``data.underwater``)::

      ROOT/train/input/  ROOT/train/gt/  ROOT/test/input/  ROOT/test/gt/

* **Single folder of pairs** ``ROOT/input/``, ``ROOT/gt/``: split into train/test by a seeded random draw
  (LSUI has no official split; the convention is 3879 train / 400 test, hence ``test_split=400``) that is
  written to a text file the first time and read back afterwards, so the split is reproducible and can be
  reported. Delete the file to draw again.

Input and ground truth are paired by file stem across extensions (``0001.jpg`` with ``0001.png``). A
missing partner, an empty split or an unreadable image is a :class:`DataError` naming the file. Several
roots train on their union (:func:`build_paired_dataset` returns a ``ConcatDataset``).

Training items are resized (the reference ``train.py`` resizes whole images to 256x256) or randomly
cropped to ``crop_size``, flipped identically, and carry a 2x target: ``h_target="upsample"`` (bilinear x2
of the training target, the users' note) or ``"resize_gt"`` (the original ground truth resized to twice the
crop, the reference code). Test items are resized to ``eval_size`` or kept at full resolution
(``eval_size=None``). Every item is a dict with tensors in [0, 1] and the file stem under ``"name"``.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from utils.errors import DataError
from utils.images import images_by_stem, load_rgb

SPLITS = ("train", "test")
RESIZE_MODES = ("resize", "random_crop")
FLIP_MODES = ("horizontal", "both", "none")
H_TARGETS = ("upsample", "resize_gt")
INPUT_DIR, GT_DIR = "input", "gt"


# ------------------------------------------------------------------------------------------- pairing

def find_pairs(input_dir: str | Path, gt_dir: str | Path) -> list[tuple[str, Path, Path]]:
    """``[(stem, input_path, gt_path)]`` sorted by stem; every image must have a partner."""
    inputs, targets = images_by_stem(Path(input_dir), "input"), images_by_stem(Path(gt_dir), "ground-truth")
    for stem, path in inputs.items():
        if stem not in targets:
            raise DataError(f"Input image {path} has no ground truth with the stem {stem!r} in {gt_dir}; add it or remove the input.")
    for stem, path in targets.items():
        if stem not in inputs:
            raise DataError(
                f"Ground-truth image {path} has no input with the stem {stem!r} in {input_dir}; "
                "add it or remove the ground truth."
            )
    return [(stem, inputs[stem], targets[stem]) for stem in sorted(inputs)]


# ---------------------------------------------------------------------------------------- split files

def split_stems(stems: Sequence[str], test_split: int | float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded random (train, test) split; ``test_split`` is a count (int) or a fraction in (0, 1)."""
    stems = sorted(stems)
    if isinstance(test_split, float) and 0 < test_split < 1:
        test_count = max(1, round(len(stems) * test_split))
    elif isinstance(test_split, int) and test_split > 0:
        test_count = test_split
    else:
        raise DataError(f"test_split must be a count >= 1 or a fraction in (0, 1), got {test_split!r}.")
    if test_count >= len(stems):
        raise DataError(
            f"Cannot hold out {test_count} test pairs from {len(stems)} pairs; pass a smaller --test_split (a count or a fraction)."
        )
    shuffled = list(stems)
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[test_count:]), sorted(shuffled[:test_count])


def write_split_file(path: str | Path, train: Sequence[str], test: Sequence[str], note: str = "") -> None:
    """One ``<split> <stem>`` line per pair after ``#`` comment lines."""
    path = Path(path)
    lines = [f"# train/test split of paired images: {len(train)} train, {len(test)} test. {note}".rstrip()]
    lines += [f"train {stem}" for stem in train] + [f"test {stem}" for stem in test]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def read_split_file(path: str | Path) -> tuple[list[str], list[str]]:
    """(train stems, test stems) from a file written by :func:`write_split_file`."""
    train, test = [], []
    for number, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        split, _, stem = line.partition(" ")
        if split not in SPLITS or not stem:
            raise DataError(f"Line {number} of split file {path} is {line!r}; expected 'train STEM' or 'test STEM'.")
        (train if split == "train" else test).append(stem)
    return train, test


def default_split_file(root: Path, test_split: int | float, seed: int) -> Path:
    return root / f"split_test{test_split}_seed{seed}.txt"


def single_folder_split(
    root: Path, split: str, test_split: int | float, seed: int, split_file: str | Path | None
) -> tuple[list[tuple[str, Path, Path]], Path]:
    """The pairs of one split of ``root/input`` + ``root/gt``, and the split file used (created if absent)."""
    pairs = find_pairs(root / INPUT_DIR, root / GT_DIR)
    if not pairs:
        raise DataError(f"No image pairs in {root / INPUT_DIR} and {root / GT_DIR}; add images or check the path.")
    by_stem = {stem: (stem, inp, gt) for stem, inp, gt in pairs}
    split_path = Path(split_file) if split_file else default_split_file(root, test_split, seed)
    if split_path.is_file():
        train, test = read_split_file(split_path)
        for stem in train + test:
            if stem not in by_stem:
                raise DataError(
                    f"Split file {split_path} lists {stem!r}, "
                    f"which has no pair in {root}; delete the file to draw a new split."
                )
        unlisted = set(by_stem) - set(train) - set(test)
        if unlisted:
            raise DataError(
                f"{len(unlisted)} pairs in {root} (e.g. {sorted(unlisted)[0]!r}) are not in split file {split_path}; "
                "delete the file to draw a new split."
            )
    else:
        train, test = split_stems(list(by_stem), test_split, seed)
        try:
            write_split_file(split_path, train, test, note=f"seed {seed}, test_split {test_split}, folder {root}")
        except OSError as err:
            raise DataError(f"Cannot write the split file {split_path} ({err.strerror}); pass a writable split_file path.") from None
    stems = train if split == "train" else test
    return [by_stem[stem] for stem in stems], split_path


# -------------------------------------------------------------------------------------------- dataset

def to_tensor(image: Image.Image) -> torch.Tensor:
    """HWC uint8 PIL image -> CHW float tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div_(255.0)


class PairedImageFolder(Dataset):
    """One split of one root folder of (input, ground truth) pairs; see the module docstring.

    ``train`` (default: ``split == "train"``) selects the training transform (resize or random crop to
    ``crop_size``, flips, a 2x target); otherwise images are resized to ``eval_size`` (None: full
    resolution). ``with_target_2x`` adds the 2x target to test items too.
    """

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        *,
        train: bool | None = None,
        crop_size: int = 256,
        resize_mode: str = "resize",
        flips: str = "horizontal",
        h_target: str = "upsample",
        eval_size: int | None = 256,
        with_target_2x: bool | None = None,
        test_split: int | float = 400,
        split_seed: int = 0,
        split_file: str | Path | None = None,
    ):
        if split not in SPLITS:
            raise DataError(f"split must be one of {SPLITS}, got {split!r}.")
        for name, value, choices in (
            ("resize_mode", resize_mode, RESIZE_MODES), ("flips", flips, FLIP_MODES), ("h_target", h_target, H_TARGETS)
        ):
            if value not in choices:
                raise DataError(f"{name} must be one of {', '.join(choices)}, got {value!r}.")
        self.root = Path(root)
        if not self.root.is_dir():
            raise DataError(f"Dataset folder {self.root} does not exist; pass the folder that holds train/ and test/ (or input/ and gt/).")
        self.split = split
        self.train = split == "train" if train is None else train
        self.crop_size = crop_size
        self.resize_mode = resize_mode
        self.flips = flips
        self.h_target = h_target
        self.eval_size = eval_size
        self.with_target_2x = self.train if with_target_2x is None else with_target_2x
        self.split_file: Path | None = None

        split_dir = self.root / split
        if (split_dir / INPUT_DIR).is_dir() or (split_dir / GT_DIR).is_dir():
            self.pairs = find_pairs(split_dir / INPUT_DIR, split_dir / GT_DIR)
        elif (self.root / INPUT_DIR).is_dir():
            self.pairs, self.split_file = single_folder_split(self.root, split, test_split, split_seed, split_file)
        else:
            raise DataError(
                f"{self.root} has neither {split}/{INPUT_DIR} + {split}/{GT_DIR} (LSUI layout) "
                f"nor {INPUT_DIR}/ + {GT_DIR}/ (one folder of pairs)."
            )
        if not self.pairs:
            raise DataError(f"The {split} split of {self.root} is empty; add image pairs or check the path.")

    def __len__(self) -> int:
        return len(self.pairs)

    def _training_views(self, image: Image.Image, target: Image.Image, path: Path) -> tuple[Image.Image, Image.Image, Image.Image]:
        """(input, target, target_2x) after resize or crop, before flips."""
        size = self.crop_size
        if image.size != target.size:
            # The reference resizes both to 256 anyway; a crop needs aligned images.
            if self.resize_mode == "random_crop":
                raise DataError(f"{path} is {image.size} but its ground truth is {target.size}; random crops need equal sizes.")
        if self.resize_mode == "resize":
            box = None
            view, view_target = image.resize((size, size), Image.BILINEAR), target.resize((size, size), Image.BILINEAR)
        else:
            width, height = image.size
            if width < size or height < size:
                raise DataError(
                    f"Image {path} is {width}x{height}, smaller than the crop size {size}; "
                    "pass a smaller --crop_size or --resize_mode resize."
                )
            # torch's RNG: DataLoader seeds it per worker, so crops are reproducible under a fixed seed.
            left, top = int(torch.randint(0, width - size + 1, ())), int(torch.randint(0, height - size + 1, ()))
            box = (left, top, left + size, top + size)
            view, view_target = image.crop(box), target.crop(box)
        if self.h_target == "resize_gt":
            source = target if box is None else target.crop(box)
            target_2x = source.resize((2 * size, 2 * size), Image.BILINEAR)
        else:
            target_2x = None
        return view, view_target, target_2x

    def __getitem__(self, index: int) -> dict[str, Any]:
        stem, input_path, gt_path = self.pairs[index]
        image, target = load_rgb(input_path), load_rgb(gt_path)
        target_2x_image = None
        if self.train:
            image, target, target_2x_image = self._training_views(image, target, input_path)
        elif self.eval_size is not None:
            size = (self.eval_size, self.eval_size)
            if self.h_target == "resize_gt" and self.with_target_2x:
                target_2x_image = target.resize((2 * self.eval_size, 2 * self.eval_size), Image.BILINEAR)
            image, target = image.resize(size, Image.BILINEAR), target.resize(size, Image.BILINEAR)
        elif image.size != target.size:
            raise DataError(
                f"{input_path} is {image.size} but its ground truth {gt_path} is {target.size}; "
                "full-resolution evaluation needs equal sizes."
            )
        elif self.h_target == "resize_gt" and self.with_target_2x:
            target_2x_image = target.resize((2 * target.width, 2 * target.height), Image.BILINEAR)

        item: dict[str, Any] = {"input": to_tensor(image), "target": to_tensor(target), "name": stem}
        if self.with_target_2x:
            if target_2x_image is not None:
                item["target_2x"] = to_tensor(target_2x_image)
            else:
                item["target_2x"] = F.interpolate(item["target"][None], scale_factor=2, mode="bilinear", align_corners=False)[0]
        if self.train and self.flips != "none":
            flip_dims = [dims for dims, allowed in (([-1], True), ([-2], self.flips == "both")) if allowed and torch.rand(()) < 0.5]
            for dims in flip_dims:
                for key in ("input", "target", "target_2x"):
                    if key in item:
                        item[key] = item[key].flip(dims)
        return item


def build_paired_dataset(roots: str | Path | Sequence[str | Path], split: str = "train", **kwargs: Any) -> Dataset:
    """A :class:`PairedImageFolder` per root; several roots give their union (``ConcatDataset``)."""
    if isinstance(roots, (str, Path)):
        roots = [roots]
    datasets = [PairedImageFolder(root, split, **kwargs) for root in roots]
    if not datasets:
        raise DataError("No dataset path given; pass at least one --dataset_path.")
    return datasets[0] if len(datasets) == 1 else ConcatDataset(datasets)
