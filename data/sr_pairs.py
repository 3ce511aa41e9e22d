"""Super-resolution training data: HR folders degraded on the fly, or prepared LR/HR folders.

Both datasets return per sample::

    {"lr_upsampled": [3, R, R] in [0, 1]   # the LR crop bicubic-upsampled to HR size: the ControlNet input
     "hr":           [3, R, R] in [-1, 1]  # the VAE's input range
     "lr":           [3, R/s, R/s] in [0, 1]
     "prompt":       str                   # the tag file beside the image, or "" (null prompt)
     "path":         str}                  # the HR image

* :class:`HRFolderDegradedDataset` -- random ``resolution`` crops of every image under a folder (recursive),
  degraded by :func:`data.degradations.degrade` (Real-ESRGAN two-stage pipeline, as SeeSR trains).
* :class:`PairedSRFolderDataset` -- prepared LR and HR folders matched by file stem after sorting; unpaired
  files are an error that names them. (SeeSR's ``PairedCaptionDataset`` zips three unsorted globs, which
  misaligns LR, HR and tags whenever the listings differ in order.)

Prompts: ``<stem>.txt`` beside the image holds its tags (as SeeSR's RAM tags or any caption); with
probability ``null_prompt_ratio`` the prompt is replaced by "" (SeeSR's ``null_text_ratio``), which also
trains the unconditional branch for classifier-free guidance. Shuffling is the DataLoader's job
(``shuffle=True``).

Randomness: with ``seed=None`` every item draws a fresh seed from torch's global generator (which the
DataLoader seeds per worker and per epoch, and ``accelerate.utils.set_seed`` makes reproducible), so crops and
degradations change every epoch. With an integer ``seed`` item ``i`` is always the same (validation, tests),
unless ``set_epoch(epoch)`` was called: then item ``i`` of epoch ``e`` is a function of ``(seed, e, i)`` only,
different every epoch yet independent of worker count, batch order and of batches skipped when a run resumes
mid-epoch (the trainer's exact resume relies on it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from data.degradations import DegradationConfig, bicubic_upsample, degrade
from utils.errors import DataError, UserError
from utils.images import load_rgb, pil_to_tensor, require_images


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """Read an image as ``[3, H, W]`` float32 in [0, 1]; an unreadable file is a DataError naming it."""
    return pil_to_tensor(load_rgb(path), (0.0, 1.0)).contiguous()


def read_tag_prompt(*image_paths: str | Path) -> str:
    """The text of ``<stem>.txt`` beside the first of ``image_paths`` that has one, else ""."""
    for image_path in image_paths:
        tag_file = Path(image_path).with_suffix(".txt")
        if tag_file.is_file():
            return " ".join(tag_file.read_text(encoding="utf-8").split())
    return ""


def pair_by_stem(lr_files: list[Path], hr_files: list[Path]) -> list[tuple[Path, Path]]:
    """Match LR and HR files by stem (sorted); duplicates or files without a partner are a DataError."""

    def by_stem(files, what):
        mapping = {}
        for path in files:
            if path.stem in mapping:
                raise DataError(f"Two {what} images share the stem {path.stem!r}: {mapping[path.stem]} and {path}.")
            mapping[path.stem] = path
        return mapping

    lr_by_stem, hr_by_stem = by_stem(lr_files, "LR"), by_stem(hr_files, "HR")
    lr_only = sorted(set(lr_by_stem) - set(hr_by_stem))
    hr_only = sorted(set(hr_by_stem) - set(lr_by_stem))
    if lr_only or hr_only:
        parts = []
        if lr_only:
            parts.append(f"LR without HR: {', '.join(lr_only[:5])}" + (" ..." if len(lr_only) > 5 else ""))
        if hr_only:
            parts.append(f"HR without LR: {', '.join(hr_only[:5])}" + (" ..." if len(hr_only) > 5 else ""))
        raise DataError(f"Unpaired files ({'; '.join(parts)}); LR and HR images are matched by file name stem.")
    return [(lr_by_stem[stem], hr_by_stem[stem]) for stem in sorted(lr_by_stem)]


class _SRDataset(Dataset):
    """Shared seeding, prompt and output logic."""

    def __init__(self, resolution: int, scale: int, null_prompt_ratio: float, seed: int | None, random_flip: bool):
        if resolution % 8 or resolution % scale:
            raise UserError(f"Expected --resolution divisible by 8 and by the scale {scale}, found {resolution}.")
        if not 0.0 <= null_prompt_ratio <= 1.0:
            raise UserError(f"Expected a null-prompt ratio in [0, 1], found {null_prompt_ratio}.")
        self.resolution = resolution
        self.scale = scale
        self.null_prompt_ratio = null_prompt_ratio
        self.seed = seed
        self.random_flip = random_flip
        self.epoch: int | None = None

    def set_epoch(self, epoch: int) -> None:
        """Draw epoch ``epoch``'s crops and degradations (with an integer seed; accelerate calls this too)."""
        self.epoch = int(epoch)

    def _rng(self, index: int) -> np.random.Generator:
        if self.seed is None:
            return np.random.default_rng(int(torch.randint(0, 2**62, ()).item()))
        if self.epoch is None:
            return np.random.default_rng([self.seed, index])
        return np.random.default_rng([self.seed, self.epoch, index])

    def _prompt(self, rng: np.random.Generator, *image_paths) -> str:
        prompt = read_tag_prompt(*image_paths)
        return "" if rng.uniform() < self.null_prompt_ratio else prompt

    def _sample(self, lr: torch.Tensor, hr: torch.Tensor, prompt: str, path: Path) -> dict:
        return {
            "lr_upsampled": bicubic_upsample(lr, hr.shape[-2:]),
            "hr": hr * 2.0 - 1.0,
            "lr": lr,
            "prompt": prompt,
            "path": str(path),
        }


class HRFolderDegradedDataset(_SRDataset):
    """Random ``resolution`` crops of HR images, degraded on the fly into LR (Real-ESRGAN pipeline)."""

    def __init__(
        self,
        hr_dir: str | Path,
        resolution: int = 512,
        degradation: DegradationConfig | None = None,
        null_prompt_ratio: float = 0.0,
        seed: int | None = None,
        random_flip: bool = True,
    ):
        self.degradation = degradation or DegradationConfig()
        super().__init__(resolution, self.degradation.scale, null_prompt_ratio, seed, random_flip)
        self.files = require_images(hr_dir, "HR image folder")

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        rng = self._rng(index)
        image = load_image_tensor(path)
        height, width = image.shape[-2:]
        size = self.resolution
        if height < size or width < size:
            raise DataError(
                f"Image {path} is {width}x{height} px, smaller than the {size} px training crop (--resolution); "
                "remove it or lower --resolution."
            )
        top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
        hr = image[:, top : top + size, left : left + size]
        if self.random_flip and rng.uniform() < 0.5:
            hr = hr.flip(-1)
        lr = degrade(hr, self.degradation, rng)
        return self._sample(lr, hr, self._prompt(rng, path), path)


class PairedSRFolderDataset(_SRDataset):
    """Prepared LR/HR folders matched by file stem; aligned random crops (``resolution`` px on the HR side)."""

    def __init__(
        self,
        lr_dir: str | Path,
        hr_dir: str | Path,
        resolution: int = 512,
        scale: int = 4,
        null_prompt_ratio: float = 0.0,
        seed: int | None = None,
        random_flip: bool = True,
    ):
        super().__init__(resolution, scale, null_prompt_ratio, seed, random_flip)
        self.pairs = pair_by_stem(require_images(lr_dir, "LR image folder"), require_images(hr_dir, "HR image folder"))

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lr_path, hr_path = self.pairs[index]
        rng = self._rng(index)
        lr_image, hr_image = load_image_tensor(lr_path), load_image_tensor(hr_path)
        lr_height, lr_width = lr_image.shape[-2:]
        if tuple(hr_image.shape[-2:]) != (lr_height * self.scale, lr_width * self.scale):
            raise DataError(
                f"HR image {hr_path} is {hr_image.shape[-1]}x{hr_image.shape[-2]} px, expected {self.scale}x its LR "
                f"image {lr_path} ({lr_width}x{lr_height} px); check the pair or --upscale/scale."
            )
        lr_size = self.resolution // self.scale
        if lr_height < lr_size or lr_width < lr_size:
            raise DataError(
                f"LR image {lr_path} is {lr_width}x{lr_height} px, smaller than the {lr_size} px LR crop "
                f"(--resolution {self.resolution} / scale {self.scale}); remove it or lower --resolution."
            )
        top, left = int(rng.integers(0, lr_height - lr_size + 1)), int(rng.integers(0, lr_width - lr_size + 1))
        lr = lr_image[:, top : top + lr_size, left : left + lr_size]
        s = self.scale
        hr = hr_image[:, top * s : (top + lr_size) * s, left * s : (left + lr_size) * s]
        if self.random_flip and rng.uniform() < 0.5:
            lr, hr = lr.flip(-1), hr.flip(-1)
        return self._sample(lr, hr, self._prompt(rng, lr_path, hr_path), hr_path)
