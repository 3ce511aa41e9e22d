"""Unconditional image data sets for the pixel DDPM: a folder of images and the torchvision classics.

``build_image_dataset(name, data_dir, size)`` returns a dataset of (3, size, size) tensors in [-1, 1]:

=========== ============================================================ ====================================
name        what is read from ``--data_dir``                              native size
=========== ============================================================ ====================================
folder      any images below ``data_dir`` (recursive)                     any
cifar10     ``cifar-10-batches-py/`` (torchvision layout), train split    32
cifar100    ``cifar-100-python/``, train split                             32
stl10       ``stl10_binary/``, train + unlabeled splits (105k images)      96
imagenet    alias of stl10: the users' note calls STL-10 "imagenet"         96
celeba      ``celeba/img_align_celeba/*.jpg``, centre 140 px crop (DDIM)   178x218
=========== ============================================================ ====================================

Nothing is downloaded unless ``download=True`` (``--download``); a missing data set is a one-line
:class:`~utils.errors.DataError` saying where the files belong.

Random flips can run in the dataset (``hflip=True``: torchvision's ``RandomHorizontalFlip`` on the global RNG) or
on the batch (:func:`random_hflip`, the trainer's choice): the batch flips are drawn from a generator seeded by
(seed, epoch, batch, process), so they do not depend on data-loader workers or prefetching and a run resumed
within an epoch flips the same images as the uninterrupted one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision import transforms

from utils.errors import DataError
from utils.images import load_rgb, require_images

DATASET_CHOICES = ("folder", "cifar10", "cifar100", "stl10", "imagenet", "celeba")
DATASET_ALIASES = {"imagenet": "stl10"}
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32, "stl10": 96, "celeba": 64}


def image_transform(size: int, hflip: bool = True, center_crop: int | None = None) -> transforms.Compose:
    """Resize the short side to ``size``, centre-crop a square, optional flip, scale to [-1, 1]."""
    steps = []
    if center_crop:
        steps.append(transforms.CenterCrop(center_crop))
    steps += [
        transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC, antialias=True),
        transforms.CenterCrop(size),
    ]
    if hflip:
        steps.append(transforms.RandomHorizontalFlip())
    steps += [transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)]
    return transforms.Compose(steps)


def random_hflip(images: torch.Tensor, seed: int, epoch: int, batch: int, process: int = 0) -> torch.Tensor:
    """Flip each image of an NCHW batch left-right with probability 1/2, drawn from its own seeded generator."""
    state = np.random.SeedSequence([seed, epoch, batch, process, 7919]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    flips = torch.rand(images.shape[0], generator=torch.Generator().manual_seed(int(state))) < 0.5
    flips = flips.to(images.device).view(-1, 1, 1, 1)
    return torch.where(flips, images.flip(-1), images)


class ImageFolderDataset(Dataset):
    """Every image below ``root`` (recursive, common extensions), as RGB, through ``transform``."""

    def __init__(self, root: str | Path, transform=None):
        self.root = Path(root)
        self.files = require_images(self.root, "image folder", "--data_dir")
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> torch.Tensor:
        image = load_rgb(self.files[index])
        return self.transform(image) if self.transform else image


class _ImagesOnly(Dataset):
    """Drop the labels of a torchvision classification data set."""

    def __init__(self, dataset: Dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.dataset[index][0]


def _torchvision(name: str, data_dir: Path, transform, download: bool) -> Dataset:
    from torchvision import datasets

    expected = {
        "cifar10": (datasets.CIFAR10, "cifar-10-batches-py/", {"train": True}),
        "cifar100": (datasets.CIFAR100, "cifar-100-python/", {"train": True}),
        "stl10": (datasets.STL10, "stl10_binary/", {"split": "train+unlabeled"}),
    }[name]
    cls, folder, kwargs = expected
    try:
        return _ImagesOnly(cls(root=str(data_dir), transform=transform, download=download, **kwargs))
    except RuntimeError as err:
        if download:
            raise DataError(f"Downloading {name} into {data_dir} failed ({err}); check the network or copy the files by hand.") from err
        raise DataError(
            f"{name} not found in {data_dir}: expected the extracted torchvision files in {data_dir / folder}; "
            f"put them there (or pass the right --data_dir), or add --download to fetch them."
        ) from err


def _celeba(data_dir: Path, transform, download: bool) -> Dataset:
    images = data_dir / "celeba" / "img_align_celeba"
    if not images.is_dir() and download:
        from torchvision import datasets

        try:
            datasets.CelebA(root=str(data_dir), split="all", download=True)
        except Exception as err:
            raise DataError(
                f"Downloading CelebA failed ({str(err).splitlines()[0]}); Google Drive often refuses it: download "
                f"img_align_celeba.zip by hand from the CelebA website and unzip it into {images.parent}/."
            ) from err
    if not images.is_dir() or not any(images.glob("*.jpg")):
        raise DataError(
            f"CelebA not found: expected the aligned JPEGs in {images}/ (unzip img_align_celeba.zip from the CelebA "
            f"website into {images.parent}/), or pass --data_dir pointing at the folder that holds celeba/."
        )
    return ImageFolderDataset(images, transform)


def build_image_dataset(
    name: str, data_dir: str | Path | None, size: int, hflip: bool = True, download: bool = False
) -> Dataset:
    """The training images of data set ``name`` at ``size`` x ``size`` in [-1, 1]."""
    if name not in DATASET_CHOICES:
        raise DataError(f"--dataset {name} is unknown; choose one of {', '.join(DATASET_CHOICES)}.")
    name = DATASET_ALIASES.get(name, name)
    if data_dir is None:
        raise DataError(f"--data_dir is required for --dataset {name}: the folder that holds (or will hold) the files.")
    data_dir = Path(data_dir)
    if name == "folder":
        return ImageFolderDataset(data_dir, image_transform(size, hflip))
    if name == "celeba":
        return _celeba(data_dir, image_transform(size, hflip, center_crop=140), download)
    return _torchvision(name, data_dir, image_transform(size, hflip), download)
