"""Paired datasets (LSUI layout, single folder with a saved split, unions, errors) and the synthetic
underwater builder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import ConcatDataset, DataLoader

from data.paired import PairedImageFolder, build_paired_dataset, read_split_file, to_tensor
from data.underwater import TEST_PHOTOGRAPHS, build_synthetic_underwater
from utils.errors import DataError


def write_image(path: Path, seed: int, size=(20, 14)) -> np.ndarray:
    """A seeded random RGB image of ``size`` (width, height), saved losslessly unless the suffix is .jpg."""
    array = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return array


def make_lsui(root: Path, train=("a", "b", "c"), test=("d", "e"), same_images=False) -> Path:
    for split, stems in (("train", train), ("test", test)):
        for stem in stems:
            seed = sum(map(ord, stem))
            write_image(root / split / "input" / f"{stem}.png", seed)
            write_image(root / split / "gt" / f"{stem}.png", seed if same_images else seed + 1000)
    return root


def test_lsui_layout_pairs_by_stem_across_extensions(tmp_path):
    root = make_lsui(tmp_path / "lsui")
    (root / "train" / "input" / "b.png").rename(root / "train" / "input" / "b.bmp")
    dataset = PairedImageFolder(root, "train", crop_size=16)
    assert [stem for stem, _, _ in dataset.pairs] == ["a", "b", "c"]
    item = dataset[1]
    assert item["name"] == "b" and item["input"].shape == (3, 16, 16) and item["target_2x"].shape == (3, 32, 32)
    assert item["input"].dtype == torch.float32 and 0.0 <= float(item["input"].min()) and float(item["input"].max()) <= 1.0
    upsampled = F.interpolate(item["target"][None], scale_factor=2, mode="bilinear", align_corners=False)[0]
    torch.testing.assert_close(item["target_2x"], upsampled)
    batch = next(iter(DataLoader(dataset, batch_size=2)))
    assert batch["input"].shape == (2, 3, 16, 16) and batch["name"] == ["a", "b"]

    test_items = PairedImageFolder(root, "test", eval_size=None)
    assert len(test_items) == 2 and test_items[0]["input"].shape == (3, 14, 20) and "target_2x" not in test_items[0]
    assert PairedImageFolder(root, "test", eval_size=8)[0]["target"].shape == (3, 8, 8)


def test_flips_are_identical_for_input_and_targets(tmp_path):
    root = make_lsui(tmp_path / "same", same_images=True)
    dataset = PairedImageFolder(root, "train", crop_size=12, flips="both")
    torch.manual_seed(0)
    unflipped = PairedImageFolder(root, "train", crop_size=12, flips="none")[0]["input"]
    seen = set()
    for _ in range(24):
        item = dataset[0]
        torch.testing.assert_close(item["input"], item["target"])
        seen.add((torch.equal(item["input"], unflipped), torch.equal(item["input"], unflipped.flip(-1))))
    assert len(seen) > 1  # flipped and unflipped both happen


def test_resize_gt_target_is_the_original_ground_truth_resized(tmp_path):
    root = make_lsui(tmp_path / "lsui")
    item = PairedImageFolder(root, "train", crop_size=8, h_target="resize_gt", flips="none")[0]
    original = Image.open(root / "train" / "gt" / "a.png").convert("RGB")
    torch.testing.assert_close(item["target_2x"], to_tensor(original.resize((16, 16), Image.BILINEAR)))
    assert not torch.allclose(item["target_2x"], F.interpolate(item["target"][None], scale_factor=2, mode="bilinear")[0])


def test_random_crops_stay_aligned_and_refuse_small_images(tmp_path):
    root = make_lsui(tmp_path / "same", same_images=True)
    dataset = PairedImageFolder(root, "train", crop_size=10, resize_mode="random_crop", h_target="resize_gt")
    for _ in range(5):
        item = dataset[2]
        torch.testing.assert_close(item["input"], item["target"])
        assert item["target_2x"].shape == (3, 20, 20)
    with pytest.raises(DataError, match=r"a.png is 20x14, smaller than the crop size 16"):
        PairedImageFolder(root, "train", crop_size=16, resize_mode="random_crop")[0]


def test_missing_partner_empty_split_and_unreadable_image_name_the_file(tmp_path):
    root = make_lsui(tmp_path / "lsui")
    (root / "train" / "gt" / "c.png").unlink()
    with pytest.raises(DataError, match=r"Input image .*train/input/c.png has no ground truth"):
        PairedImageFolder(root, "train")
    write_image(root / "train" / "gt" / "c.png", 1)
    write_image(root / "train" / "gt" / "z.jpg", 2)
    with pytest.raises(DataError, match=r"Ground-truth image .*z.jpg has no input"):
        PairedImageFolder(root, "train")
    (root / "train" / "gt" / "z.jpg").unlink()

    for path in (root / "test" / "input").iterdir():
        path.unlink()
    for path in (root / "test" / "gt").iterdir():
        path.unlink()
    with pytest.raises(DataError, match="test split of .* is empty"):
        PairedImageFolder(root, "test")

    (root / "train" / "input" / "b.png").write_bytes(b"not an image")
    dataset = PairedImageFolder(root, "train")
    with pytest.raises(DataError, match=r"Cannot read image .*train/input/b.png"):
        dataset[1]
    with pytest.raises(DataError, match="does not exist"):
        PairedImageFolder(tmp_path / "nowhere")
    (tmp_path / "flat").mkdir()
    with pytest.raises(DataError, match="has neither train/input"):
        PairedImageFolder(tmp_path / "flat")


def test_single_folder_split_is_seeded_saved_and_reused(tmp_path):
    root = tmp_path / "pairs"
    for index in range(10):
        write_image(root / "input" / f"{index:03d}.png", index)
        write_image(root / "gt" / f"{index:03d}.png", index + 50)
    train = PairedImageFolder(root, "train", test_split=3, split_seed=0)
    test = PairedImageFolder(root, "test", test_split=3, split_seed=0)
    train_stems, test_stems = [s for s, _, _ in train.pairs], [s for s, _, _ in test.pairs]
    assert len(train_stems) == 7 and len(test_stems) == 3 and not set(train_stems) & set(test_stems)
    assert train.split_file == root / "split_test3_seed0.txt" and read_split_file(train.split_file) == (train_stems, test_stems)

    other_seed = [s for s, _, _ in PairedImageFolder(root, "test", test_split=3, split_seed=1).pairs]
    assert other_seed != test_stems  # a different seed draws (and saves) a different split
    explicit = tmp_path / "runs" / "split.txt"
    fraction = PairedImageFolder(root, "test", test_split=0.2, split_seed=0, split_file=explicit)
    assert len(fraction) == 2 and explicit.is_file()
    # A saved split is authoritative: reading it back gives the same pairs whatever the seed now says.
    again = PairedImageFolder(root, "test", test_split=0.2, split_seed=5, split_file=explicit)
    assert [s for s, _, _ in again.pairs] == [s for s, _, _ in fraction.pairs]

    with pytest.raises(DataError, match="Cannot hold out 10 test pairs from 10 pairs"):
        PairedImageFolder(root, "train", test_split=10)
    write_image(root / "input" / "new.png", 99)
    write_image(root / "gt" / "new.png", 98)
    with pytest.raises(DataError, match="are not in split file"):
        PairedImageFolder(root, "train", test_split=3, split_seed=0)


def test_several_roots_train_on_their_union(tmp_path):
    first = make_lsui(tmp_path / "one")
    second = make_lsui(tmp_path / "two", train=("x", "y"))
    union = build_paired_dataset([first, second], "train", crop_size=8)
    assert isinstance(union, ConcatDataset) and len(union) == 5
    assert [union[i]["name"] for i in range(5)] == ["a", "b", "c", "x", "y"]
    assert isinstance(build_paired_dataset(str(first), "test"), PairedImageFolder)


def test_synthetic_underwater_set_has_held_out_photographs(tmp_path):
    root = build_synthetic_underwater(tmp_path / "uw", size=32, train_count=8, test_count=3, seed=0)
    train = PairedImageFolder(root, "train", crop_size=32, flips="none")
    test = PairedImageFolder(root, "test", eval_size=None)
    assert len(train) == 8 and len(test) == 3
    assert all(stem.startswith(TEST_PHOTOGRAPHS) for stem, _, _ in test.pairs)
    assert not any(stem.startswith(TEST_PHOTOGRAPHS) for stem, _, _ in train.pairs)
    degraded = torch.stack([train[i]["input"] for i in range(len(train))])
    clean = torch.stack([train[i]["target"] for i in range(len(train))])
    assert (degraded - clean).abs().mean() > 0.05
    # Red is attenuated far more than green and blue: the degraded images lose red relative to the clean ones.
    red_ratio = degraded[:, 0].mean() / clean[:, 0].mean()
    blue_green_ratio = degraded[:, 1:].mean() / clean[:, 1:].mean()
    assert red_ratio < blue_green_ratio
    again = build_synthetic_underwater(tmp_path / "uw2", size=32, train_count=8, test_count=3, seed=0)
    first_input = sorted((root / "train" / "input").iterdir())[0]
    assert first_input.read_bytes() == (again / "train" / "input" / first_input.name).read_bytes()
