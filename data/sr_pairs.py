"""Super-resolution training data: HR folders degraded on the fly, or prepared LR/HR folders.

Both datasets return per sample::

    {"lr_upsampled": [3, R, R] in [0, 1]   # the LR crop bicubic-upsampled to HR size: the ControlNet input
     "hr":           [3, R, R] in [-1, 1]  # the VAE's input range
     "lr":           [3, R/s, R/s] in [0, 1]
     "prompt":       str                   # the tag file beside the image, or "" (null prompt)
     "path":         str}                  # the HR image

* :class:`HRFolderDegradedDataset` -- random ``resolution`` crops of every image under a folder (recursive),
  degraded by :func:`data.degradations.degrade` (Real-ESRGAN two-stage pipeline; with
  ``DegradationConfig.seesr()`` as SeeSR's ``make_paired_data.py``: USM-sharpened GT, which is also the target).
  The crop is taken as SeeSR's ``basicsr/data/realesrgan_dataset.py`` takes it (:func:`random_gt_crop`): the image
  flipped, then padded at the bottom and right by mirroring (OpenCV's ``BORDER_REFLECT_101``) when a side is under
  the crop, then cropped; with ``DegradationConfig.dape()`` the GT is the whole image resized (:func:`whole_image_gt`).
  With ``degrade_on_device=True`` its items hold only the HR crop (``hr``, not sharpened) and their drawn degradation
  (``degradation``: :class:`data.degradations.DegradationParams` as tensors), and the training loop completes the
  batch on its device (:func:`data.degradations_batched.degrade_training_batch`, as Real-ESRGAN does on the GPU).
* :class:`SeeSRPreparedDataset` -- SeeSR's prepared training folders (``train_seesr.py --root_folders``), each
  with ``gt/``, ``sr_bicubic/`` (the LR already bicubic-upsampled to the GT size), optionally ``lr/``, and
  ``tag/<stem>.txt`` (``make_tags.py``: RAM tags of the GT); matched by stem, not zipped unsorted as SeeSR does.
* :func:`write_prepared_pairs` -- writes those folders once, as SeeSR's ``utils_data/make_paired_data.py`` and
  ``make_paired_data_DAPE.py`` do (``scripts/make_paired_data*.py``): numbered ``gt/``, ``lr/``, ``sr_bicubic/`` PNGs,
  each pair seeded on its own, a rerun skipping the pairs already written.
* :class:`PairedSRFolderDataset` -- prepared LR and HR folders matched by file stem after sorting; unpaired
  files are an error that names them. (SeeSR's ``PairedCaptionDataset`` zips three unsorted globs, which
  misaligns LR, HR and tags whenever the listings differ in order.)

Prompts: ``<stem>.txt`` beside the image (or in ``tag/``) holds its tags (as SeeSR's RAM tags or any caption);
with probability ``null_prompt_ratio`` the prompt is replaced by "" (SeeSR's ``null_text_ratio``), which also
trains the unconditional branch for classifier-free guidance. ``tag_source`` says where the prompt came from:
``"file"``, ``"null"`` (dropped) or ``"none"`` (no tag file: the trainer may tag the GT with RAM instead).
Shuffling is the DataLoader's job (``shuffle=True``).

:func:`check_training_images` opens every image once (header and size) so that a corrupt or too-small file is
reported before any model loads.

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

from data.degradations import DegradationConfig, bicubic_upsample, degrade_batch, sample_degradation, usm_sharpen
from utils.errors import DataError, UserError
from utils.images import images_by_stem, list_images, load_rgb, pil_to_tensor, require_images


def load_image_tensor(path: str | Path) -> torch.Tensor:
    """Read an image as ``[3, H, W]`` float32 in [0, 1]; an unreadable file is a DataError naming it."""
    return pil_to_tensor(load_rgb(path), (0.0, 1.0)).contiguous()


def _reflect_101_index(length: int, target: int) -> np.ndarray:
    """Source rows for output rows ``0 .. max(length, target) - 1``: OpenCV's ``borderInterpolate`` with
    ``BORDER_REFLECT_101`` (mirror without repeating the edge, again and again when the padding exceeds the image)."""
    index = np.arange(max(length, target))
    if length == 1:
        return np.zeros_like(index)
    period = 2 * (length - 1)
    index = index % period
    return np.where(index >= length, period - index, index)


def pad_reflect_101(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``[C, H, W]`` padded at the bottom and right to at least ``height`` x ``width`` as SeeSR's
    ``RealESRGANDataset`` pads small GT images (``cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, BORDER_REFLECT_101)``)."""
    rows = _reflect_101_index(image.shape[-2], height)
    cols = _reflect_101_index(image.shape[-1], width)
    if len(rows) == image.shape[-2] and len(cols) == image.shape[-1]:
        return image
    return image[:, torch.from_numpy(rows)][:, :, torch.from_numpy(cols)]


def random_gt_crop(image: torch.Tensor, size: int, rng: np.random.Generator, flip: bool) -> torch.Tensor:
    """A ``size`` x ``size`` GT crop as SeeSR's ``RealESRGANDataset``: flipped with probability 0.5 (``use_hflip``),
    padded (:func:`pad_reflect_101`) where a side is under ``size``, then cropped at a uniform position."""
    if flip and rng.uniform() < 0.5:
        image = image.flip(-1)
    image = pad_reflect_101(image, size, size)
    height, width = image.shape[-2:]
    top, left = int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))
    return image[:, top : top + size, left : left + size]


def whole_image_gt(path: str | Path, size: int) -> torch.Tensor:
    """The whole image resized to ``size`` x ``size`` with PIL's LANCZOS (aspect ratio not kept), as SeeSR's DAPE data
    (``dataloaders/simple_dataset.py``)."""
    from PIL import Image

    return pil_to_tensor(load_rgb(path).resize((size, size), Image.LANCZOS), (0.0, 1.0)).contiguous()


def read_tag_prompt(*image_paths: str | Path) -> str:
    """The text of ``<stem>.txt`` beside the first of ``image_paths`` that has one, else ""."""
    for image_path in image_paths:
        tag_file = Path(image_path).with_suffix(".txt")
        if tag_file.is_file():
            return " ".join(tag_file.read_text(encoding="utf-8").split())
    return ""


def check_training_images(files: list[Path], min_size: tuple[int, int] = (0, 0), what: str = "training image",
                          hint: str = "") -> None:
    """Open every file's header (and verify it): the first unreadable one, or one smaller than ``min_size``
    (height, width), is a DataError naming it, how many others fail too, and ``hint`` (the flag to change)."""
    from PIL import Image

    bad: list[str] = []
    for path in files:
        try:
            with Image.open(path) as image:
                width, height = image.size
                image.verify()
        except Exception as error:  # PIL raises many kinds (OSError, SyntaxError, ValueError, struct.error)
            bad.append(f"cannot read {path} ({type(error).__name__}: {error})")
            continue
        if height < min_size[0] or width < min_size[1]:
            bad.append(f"{path} is {width}x{height} px, smaller than {min_size[1]}x{min_size[0]}{hint}")
    if bad:
        more = f" (and {len(bad) - 1} more such file(s))" if len(bad) > 1 else ""
        raise DataError(f"Bad {what}: {bad[0]}{more}; remove or replace it.")


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

    def _prompt(self, rng: np.random.Generator, *tag_sources) -> tuple[str, str]:
        """``(prompt, tag_source)``: the tag file's text, or "" when dropped (null) or when there is no tag file."""
        prompt = read_tag_prompt(*tag_sources)
        has_file = any(Path(p).with_suffix(".txt").is_file() for p in tag_sources)
        if rng.uniform() < self.null_prompt_ratio:
            return "", "null"
        return prompt, "file" if has_file else "none"

    def _sample(self, lr: torch.Tensor, hr: torch.Tensor, prompt: tuple[str, str], path: Path,
                lr_upsampled: torch.Tensor | None = None) -> dict:
        return {
            "lr_upsampled": bicubic_upsample(lr, hr.shape[-2:]) if lr_upsampled is None else lr_upsampled,
            "hr": hr * 2.0 - 1.0,
            "lr": lr,
            "prompt": prompt[0],
            "tag_source": prompt[1],
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
        degrade_on_device: bool = False,
    ):
        self.degradation = degradation or DegradationConfig()
        # True: items carry the HR crop and their drawn degradation only; the training loop sharpens and degrades
        # the batch on its device (data.degradations_batched.degrade_training_batch).
        self.degrade_on_device = degrade_on_device
        super().__init__(resolution, self.degradation.scale, null_prompt_ratio, seed, random_flip)
        self.files = require_images(hr_dir, "HR image folder")

    def __len__(self) -> int:
        return len(self.files)

    def check_images(self) -> None:
        """Every HR image readable (before any model loads); smaller ones are padded, as SeeSR's dataset."""
        check_training_images(self.files, what="HR training image")

    def __getitem__(self, index: int) -> dict:
        path = self.files[index]
        rng = self._rng(index)
        size = self.resolution
        if self.degradation.resize_whole:
            hr = whole_image_gt(path, size)
        else:
            hr = random_gt_crop(load_image_tensor(path), size, rng, self.random_flip)
        # The same draws in the same order on both paths: item i gets the same degradation either way.
        params = sample_degradation(self.degradation, rng)
        if self.degrade_on_device:
            prompt, tag_source = self._prompt(rng, path)
            return {"hr": hr * 2.0 - 1.0, "degradation": params.to_tensors(), "prompt": prompt,
                    "tag_source": tag_source, "path": str(path)}
        if self.degradation.usm_sharpen:
            hr = usm_sharpen(hr)
        lr = degrade_batch(hr[None], [params], self.degradation)[0]
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

    def check_images(self) -> None:
        """Every image readable and every LR image at least one crop large (before any model loads)."""
        lr_size = self.resolution // self.scale
        check_training_images([lr for lr, _ in self.pairs], (lr_size, lr_size), "LR training image",
                              " px, the LR crop (--resolution / scale; lower --resolution)")
        check_training_images([hr for _, hr in self.pairs], what="HR training image")

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


class SeeSRPreparedDataset(_SRDataset):
    """SeeSR's prepared folders (``--root_folders a,b``): ``gt/``, ``sr_bicubic/``, [``lr/``], ``tag/`` by stem.

    ``make_paired_data.py`` writes 512 px GT and bicubic-upsampled LR (``sr_bicubic``) of the same size, and
    ``make_tags.py`` the GT's RAM tags into ``tag/<stem>.txt``. The ControlNet input is the ``sr_bicubic`` crop
    itself (as SeeSR); ``lr`` is the ``lr/`` image when there is one, else ``sr_bicubic`` area-downsampled by
    ``scale``. A GT without its ``sr_bicubic`` partner (or the reverse) is an error naming it; a missing tag file
    gives ``tag_source "none"``.
    """

    def __init__(
        self,
        root_folders: str | list[str],
        resolution: int = 512,
        scale: int = 4,
        null_prompt_ratio: float = 0.5,
        seed: int | None = None,
        random_flip: bool = False,
    ):
        super().__init__(resolution, scale, null_prompt_ratio, seed, random_flip)
        roots = [r for r in root_folders.split(",") if r.strip()] if isinstance(root_folders, str) else root_folders
        if not roots:
            raise UserError("--root_folders is empty; pass comma-separated folders holding gt/, sr_bicubic/ and tag/.")
        self.items: list[tuple[Path, Path, Path | None, Path]] = []  # (sr_bicubic, gt, lr or None, tag file)
        for root in map(Path, (r.strip() for r in roots)):
            if not (root / "gt").is_dir() or not (root / "sr_bicubic").is_dir():
                raise DataError(
                    f"--root_folders {root} lacks gt/ or sr_bicubic/; expected the folders SeeSR's "
                    "make_paired_data.py writes (gt/, sr_bicubic/, lr/) plus tag/ from make_tags.py."
                )
            pairs = pair_by_stem(require_images(root / "sr_bicubic", "sr_bicubic folder"),
                                 require_images(root / "gt", "gt folder"))
            lr_files = images_by_stem(list_images(root / "lr", recursive=False), "LR") if (root / "lr").is_dir() else {}
            for sr_bicubic, gt in pairs:
                self.items.append((sr_bicubic, gt, lr_files.get(gt.stem), root / "tag" / f"{gt.stem}.txt"))

    def __len__(self) -> int:
        return len(self.items)

    def check_images(self) -> None:
        """Every image readable and every GT at least one crop large (before any model loads)."""
        size = self.resolution
        check_training_images([gt for _, gt, _, _ in self.items], (size, size), "GT training image",
                              " px, the training crop (lower --resolution)")
        check_training_images([sr for sr, _, _, _ in self.items] + [lr for _, _, lr, _ in self.items if lr],
                              what="sr_bicubic/lr training image")

    def __getitem__(self, index: int) -> dict:
        sr_path, gt_path, lr_path, tag_path = self.items[index]
        rng = self._rng(index)
        gt, sr = load_image_tensor(gt_path), load_image_tensor(sr_path)
        if gt.shape != sr.shape:
            raise DataError(
                f"{sr_path} is {sr.shape[-1]}x{sr.shape[-2]} px, expected the size of its GT {gt_path} "
                f"({gt.shape[-1]}x{gt.shape[-2]}): sr_bicubic/ holds the LR upsampled to the GT size."
            )
        height, width = gt.shape[-2:]
        size = self.resolution
        if height < size or width < size:
            raise DataError(f"GT image {gt_path} is {width}x{height} px, smaller than the {size} px training crop "
                            "(--resolution); remove it or lower --resolution.")
        s = self.scale
        top = int(rng.integers(0, (height - size) // s + 1)) * s
        left = int(rng.integers(0, (width - size) // s + 1)) * s
        gt, sr = gt[:, top : top + size, left : left + size], sr[:, top : top + size, left : left + size]
        if lr_path is not None:
            lr = load_image_tensor(lr_path)[:, top // s : (top + size) // s, left // s : (left + size) // s]
        else:
            lr = torch.nn.functional.interpolate(sr[None], scale_factor=1 / s, mode="area")[0]
        if self.random_flip and rng.uniform() < 0.5:
            gt, sr, lr = gt.flip(-1), sr.flip(-1), lr.flip(-1)
        return self._sample(lr, gt, self._prompt(rng, tag_path), gt_path, lr_upsampled=sr)


# ------------------------------------------------------------------------------------------------ offline pairs
# SeeSR's utils_data/make_paired_data.py and make_paired_data_DAPE.py write each degraded pair once, so that every
# run and every variant trains on the same pairs: gt/, lr/ and sr_bicubic/ PNGs of one numbered name.

PREPARED_FOLDERS = ("gt", "lr", "sr_bicubic")
PREPARED_SETTINGS_NAME = "make_paired_data.json"


def prepared_pair(path: str | Path, config: DegradationConfig, gt_size: int, rng: np.random.Generator) -> dict:
    """One pair as SeeSR's tools compute it: ``{"gt", "lr", "sr_bicubic"}`` as ``[3, h, w]`` floats in [0, 1].

    GT: a random crop (:func:`random_gt_crop`, flipped half the time) or, with ``config.resize_whole``, the whole
    image resized (:func:`whole_image_gt`); USM-sharpened when ``config.usm_sharpen``, and the LR is degraded from
    the sharpened GT (``realesrgan_degradation(use_usm=True)``). ``sr_bicubic`` is ``F.interpolate(lr, gt size,
    'bicubic')`` of the LR before its 8-bit rounding, as the reference computes it from its float batch.
    """
    if config.resize_whole:
        gt = whole_image_gt(path, gt_size)
    else:
        gt = random_gt_crop(load_image_tensor(path), gt_size, rng, flip=True)
    params = sample_degradation(config, rng)
    if config.usm_sharpen:
        gt = usm_sharpen(gt)
    lr = degrade_batch(gt[None], [params], config, quantize=False)[0]
    return {"gt": gt.clamp(0.0, 1.0), "lr": lr, "sr_bicubic": bicubic_upsample(lr, gt.shape[-2:])}


def prepared_name(number: int) -> str:
    """SeeSR's file name: the running number, seven digits (``'{}.png'.format(str(step).zfill(7))``)."""
    return f"{number:07d}.png"


class _PreparedPairJobs(Dataset):
    """The pairs still to write, one per item; a worker computes and writes its pair (PNG encoding in parallel too)."""

    def __init__(self, jobs: list[tuple[str, Path, int]], save_dir: Path, config: DegradationConfig, gt_size: int,
                 seed_key: list[int]):
        self.jobs, self.save_dir, self.config, self.gt_size, self.seed_key = jobs, save_dir, config, gt_size, seed_key

    def __len__(self) -> int:
        return len(self.jobs)

    def __getitem__(self, index: int) -> str:
        from utils.images import save_png_complete, tensor_to_pil

        name, path, key = self.jobs[index]
        # Each pair's randomness is a function of (seed, copy, round and image index) only: any worker, any order.
        pair = prepared_pair(path, self.config, self.gt_size, np.random.default_rng([*self.seed_key, *key]))
        for folder in PREPARED_FOLDERS:
            save_png_complete(tensor_to_pil(pair[folder], (0.0, 1.0)), self.save_dir / folder / name)
        return name


def write_prepared_pairs(
    gt_files: list[Path],
    save_dir: str | Path,
    config: DegradationConfig,
    gt_size: int = 512,
    epochs: int = 1,
    start_gpu: int = 1,
    seed: int = 0,
    num_workers: int = 0,
    settings: dict | None = None,
) -> dict:
    """Write ``epochs`` degraded pairs of every file in ``gt_files`` into ``save_dir/{gt,lr,sr_bicubic}/<number>.png``.

    Numbers follow SeeSR's scripts: ``len(gt_files) * epochs * start_gpu + 1`` onwards, round by round, so copies made
    with different ``start_gpu`` never collide. A pair whose three files exist is skipped (each file is written under
    a temporary name and renamed, so an existing file is complete): a rerun finishes an interrupted one. The settings
    (``settings`` plus the sources) are saved as ``make_paired_data.json``; a rerun with other settings into the same
    folder is a UserError, since its numbers would mean other pairs. Returns ``{"written", "skipped", "names"}``.
    """
    import json

    save_dir = Path(save_dir)
    recorded = {**(settings or {}), "gt_size": gt_size, "epoch": epochs, "start_gpu": start_gpu, "seed": seed,
                "degradation": config.to_dict(), "sources": [str(Path(path).resolve()) for path in gt_files]}
    settings_file = save_dir / PREPARED_SETTINGS_NAME
    if settings_file.is_file():
        try:
            previous = json.loads(settings_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as err:
            raise DataError(f"Cannot read {settings_file} ({err}); delete it or pass a new --save_dir.") from err
        changed = sorted(key for key in set(previous) | set(recorded) if previous.get(key) != recorded.get(key))
        if changed:
            raise UserError(f"--save_dir {save_dir} holds pairs made with other settings (changed: {', '.join(changed)}); "
                            "pass a new --save_dir, or the same flags and images to finish that run.")
    else:
        from utils.checkpoint import atomic_write_text

        atomic_write_text(json.dumps(recorded, indent=1) + "\n", settings_file)
    for folder in PREPARED_FOLDERS:
        (save_dir / folder).mkdir(parents=True, exist_ok=True)

    count = len(gt_files)
    first = count * epochs * start_gpu + 1
    names, jobs = [], []
    for round_index in range(epochs):
        for index, path in enumerate(gt_files):
            name = prepared_name(first + round_index * count + index)
            names.append(name)
            if not all((save_dir / folder / name).is_file() for folder in PREPARED_FOLDERS):
                jobs.append((name, path, (round_index, index)))
    workers = _PreparedPairJobs(jobs, save_dir, config, gt_size, [seed, start_gpu])
    loader = torch.utils.data.DataLoader(workers, batch_size=None, num_workers=num_workers)
    from tqdm import tqdm

    for _ in tqdm(loader, total=len(jobs), desc="pairs", unit="pair", disable=not jobs):
        pass
    return {"written": len(jobs), "skipped": len(names) - len(jobs), "names": names}


def add_paired_data_arguments(parser, save_dir: str) -> None:
    """The flags of SeeSR's ``make_paired_data*.py`` (same names and defaults) and ours, for both tools."""
    from utils.cli import add_flag

    parser.add_argument("--gt_path", nargs="+", required=True,
                        help="folders of high-resolution images (searched recursively; every common image type)")
    parser.add_argument("--save_dir", default=save_dir,
                        help=f"where gt/, lr/ and sr_bicubic/ are written (default {save_dir}, SeeSR's)")
    parser.add_argument("--start_gpu", type=int, default=1,
                        help="which copy this is (SeeSR runs one per GPU, 1..N): its file numbers start after "
                        "images x epoch x start_gpu and its default seed is 24 + 1000 x start_gpu (default 1)")
    parser.add_argument("--batch_size", type=int, default=10,
                        help="accepted for SeeSR's command lines; changes nothing here, since every pair draws its "
                        "own degradation (SeeSR's batches share the resize, noise kind and order) (default 10)")
    parser.add_argument("--epoch", type=int, default=1,
                        help="rounds over the images: each round writes one newly degraded pair per image (default 1)")
    parser.add_argument("--gt_size", type=int, default=512,
                        help="GT side in pixels, divisible by 4; the LR is a quarter of it (default 512, SeeSR's)")
    parser.add_argument("--seed", type=int, default=None,
                        help="seed of every crop, flip and degradation (default 24 + 1000 x start_gpu, SeeSR's "
                        "seed_everything); the same seed writes the same files, with any number of workers")
    add_flag(parser, "--dataloader_num_workers", "--num_workers", type=int, default=None,
             help="worker processes computing and writing pairs (default: the CPU count, at most 8)")


def check_paired_data_arguments(parser, args) -> None:
    """One-line errors for numbers out of range (parse time)."""
    if args.epoch < 1:
        parser.error(f"--epoch must be at least 1, found {args.epoch}")
    if args.start_gpu < 0:
        parser.error(f"--start_gpu must be 0 or more, found {args.start_gpu}")
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, found {args.batch_size}")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        parser.error(f"--seed must be in 0..2^32-1, found {args.seed}")
    if args.gt_size < 8 or args.gt_size % 4:
        parser.error(f"--gt_size must be a multiple of 4 (the x4 LR size) of at least 8, found {args.gt_size}")
    if args.dataloader_num_workers is not None and args.dataloader_num_workers < 0:
        parser.error(f"--dataloader_num_workers must be 0 or more, found {args.dataloader_num_workers}")


def make_paired_data(args, config: DegradationConfig, tool: str) -> dict:
    """Check the inputs (folders, every image readable, where the output goes), then :func:`write_prepared_pairs`."""
    import os

    save_dir = Path(args.save_dir).resolve()
    files: list[Path] = []
    for folder in args.gt_path:
        if save_dir.is_relative_to(Path(folder).resolve()):
            raise UserError(f"--save_dir {args.save_dir} lies inside --gt_path {folder}; a rerun would read the written "
                            "pairs as new images: pass a folder outside it.")
        files += require_images(folder, "GT image folder", "--gt_path")
    if save_dir.exists() and not save_dir.is_dir():
        raise UserError(f"--save_dir {args.save_dir} is a file; pass a folder.")
    check_training_images(files, what="GT image")
    seed = 24 + 1000 * args.start_gpu if args.seed is None else args.seed
    workers = min(8, os.cpu_count() or 1) if args.dataloader_num_workers is None else args.dataloader_num_workers
    result = write_prepared_pairs(files, save_dir, config, args.gt_size, args.epoch, args.start_gpu, seed, workers,
                                  settings={"tool": tool})
    names = result["names"]
    print(f"{tool}: {result['written']} pairs written, {result['skipped']} already complete, in {args.save_dir} "
          f"(gt/, lr/, sr_bicubic/ {names[0]} .. {names[-1]}; seed {seed})")
    return result
