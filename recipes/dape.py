"""DAPE training (SeeSR's stage 1): ``build_dape_training(config, device) -> TrainingParts``.

Wires RAM (``models/ram.py``), the LoRA student and objective (``models/dape.py``) and SeeSR's DAPE data (cswry/SeeSR
``basicsr/data/dape_dataset.py``): folders written by ``utils_data/make_paired_data_DAPE.py``, each with ``gt/`` (the
clean 512 px images) and ``sr_bicubic/`` (their degraded versions, upsampled back to the GT size); ``lr/`` is not
read. SeeSR zips two unsorted globs; here files pair by name and a file without its partner is an error. Both images
are resized to ``image_size`` (512, torchvision's tensor resize, bilinear without antialiasing, as SeeSR; a no-op on
512 px data) and then to RAM's 384 px input on the device.

The held-out set for the tag agreement: ``validation_root_folders`` when given, else ``num_validation_images`` pairs
drawn once (seed 0, so a resumed run holds out the same ones) from the training folders and left out of training.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from data.sr_pairs import load_image_tensor, pair_by_stem
from models.dape import DAPEStudent, add_dape_lora, dape_loss, load_dape, lora_parameters, ram_pixels, set_training_noise
from models.ram import load_ram_tagger
from recipes import TrainingParts
from utils.errors import DataError, UserError
from utils.images import require_images

HOLD_OUT_SEED = 0


def split_folders(value: str | list[str] | None) -> list[str]:
    """``a,b`` (SeeSR's --root_folders spelling) or a list -> folder names."""
    if not value:
        return []
    items = value.split(",") if isinstance(value, str) else [part for item in value for part in str(item).split(",")]
    return [item.strip() for item in items if item.strip()]


def dape_pairs(root_folders: list[str], flag: str = "--root_folders") -> list[tuple[Path, Path]]:
    """(degraded, clean) image pairs of SeeSR's DAPE folders, matched by name, in sorted order."""
    pairs: list[tuple[Path, Path]] = []
    for root in map(Path, root_folders):
        if not (root / "gt").is_dir() or not (root / "sr_bicubic").is_dir():
            raise DataError(f"{flag} {root} lacks gt/ or sr_bicubic/; expected the folders SeeSR's make_paired_data_DAPE.py "
                            "writes (gt/, lr/, sr_bicubic/).")
        degraded, clean = require_images(root / "sr_bicubic", "sr_bicubic folder", flag), require_images(root / "gt", "gt folder", flag)
        pairs += pair_by_stem(degraded, clean)
    return pairs


class DAPEPairs(Dataset):
    """SeeSR's ``DAPEDataset``: ``{"lq", "gt"}`` as [3, S, S] tensors in [0, 1] (S = ``image_size``) and the LQ path."""

    def __init__(self, pairs: list[tuple[Path, Path]], image_size: int = 512):
        self.pairs, self.image_size = list(pairs), image_size

    def __len__(self) -> int:
        return len(self.pairs)

    def _load(self, path: Path) -> torch.Tensor:
        image = load_image_tensor(path)
        if image.shape[-2:] != (self.image_size, self.image_size):
            size = [self.image_size, self.image_size]
            image = TF.resize(image, size, interpolation=InterpolationMode.BILINEAR, antialias=False)
        return image

    def __getitem__(self, index: int) -> dict:
        lq_path, gt_path = self.pairs[index]
        return {"lq": self._load(lq_path), "gt": self._load(gt_path), "path": str(lq_path)}


def build_dape_datasets(config) -> tuple[DAPEPairs, DAPEPairs | None]:
    """(train, held-out) sets; see the module docstring for how the held-out set is chosen."""
    pairs = dape_pairs(split_folders(config.root_folders))
    held_out_folders = split_folders(config.validation_root_folders)
    if held_out_folders:
        held_out = dape_pairs(held_out_folders, "--validation_root_folders")
    elif config.num_validation_images:
        if config.num_validation_images >= len(pairs):
            raise UserError(f"--num_validation_images {config.num_validation_images} leaves no training pairs of the {len(pairs)} "
                            "found; lower it or give --validation_root_folders.")
        order = np.random.default_rng(HOLD_OUT_SEED).permutation(len(pairs))
        chosen = set(order[: config.num_validation_images].tolist())
        held_out = [pair for i, pair in enumerate(pairs) if i in chosen]
        pairs = [pair for i, pair in enumerate(pairs) if i not in chosen]
    else:
        held_out = []
    val = DAPEPairs(held_out, config.image_size) if held_out else None
    return DAPEPairs(pairs, config.image_size), val


class DAPEObjective:
    """``objective(batch, student, teacher) -> (loss, {"l_fea", "l_logits"})``: the teacher (plain RAM, eval mode, no
    gradient) on the clean image, the student on the degraded one, :func:`models.dape.dape_loss` between them."""

    def __init__(self, image_size: int):
        self.image_size = image_size

    def __call__(self, batch: dict, student: torch.nn.Module, teacher) -> tuple[torch.Tensor, dict]:
        device = teacher.device
        gt = ram_pixels(batch["gt"].to(device), self.image_size).to(teacher.dtype)
        lq = ram_pixels(batch["lq"].to(device), self.image_size)
        with torch.no_grad():
            features_gt = teacher.encode(gt)
            logits_gt = teacher.logits(features_gt)
        features_lq, logits_lq = student(lq)
        return dape_loss(features_lq, logits_lq, features_gt, logits_gt)


def build_dape_training(config, device: torch.device | str = "cpu") -> TrainingParts:
    """The teacher (RAM as released) and the student (a copy with LoRA) on ``device`` in fp32, the LoRA parameter
    group (AdamW's weight decay from ``config.adam_weight_decay``), the objective and the data sets.

    ``config`` needs ``ram_path``, ``ram_ft_path`` (a DAPE.pth to start from, or None), ``ram_tag_list``,
    ``ram_tag_thresholds``, ``lora_rank``, ``drop_path_rate``, ``head_dropout``, ``learning_rate``,
    ``adam_weight_decay``, ``root_folders``, ``validation_root_folders``, ``num_validation_images``, ``image_size``.
    """
    train_set, val_set = build_dape_datasets(config)
    teacher = load_ram_tagger(config.ram_path, None, config.ram_tag_list, config.ram_tag_thresholds, device="cpu")
    tagger = copy.deepcopy(teacher)
    add_dape_lora(tagger, config.lora_rank)
    if config.ram_ft_path:
        load_dape(tagger, config.ram_ft_path)
    set_training_noise(tagger, config.drop_path_rate, config.head_dropout)
    student = DAPEStudent(tagger).to(device).train()
    teacher.to(device)
    param_groups = [{"params": lora_parameters(student), "lr": config.learning_rate, "weight_decay": config.adam_weight_decay}]
    return TrainingParts(
        models={"student": student, "teacher": teacher},
        param_groups=param_groups,
        objective=DAPEObjective(teacher.config.image_size),
        datasets={"train": train_set, "val": val_set},
        extras={"tag_list": teacher.tag_list},
    )
