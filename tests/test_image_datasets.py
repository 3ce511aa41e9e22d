import pickle

import numpy as np
import pytest
import torch
from PIL import Image

from data.image_datasets import ImageFolderDataset, build_image_dataset, image_transform
from utils.errors import DataError


def test_folder_is_recursive_and_scaled_to_minus_one_one(demo_images):
    dataset = build_image_dataset("folder", demo_images, size=8, hflip=False)
    assert len(dataset) == 24  # crops live in one sub-folder per photograph
    image = dataset[0]
    assert image.shape == (3, 8, 8) and image.dtype == torch.float32
    assert -1.0 <= image.min() and image.max() <= 1.0


def test_grey_and_rgba_become_rgb(tmp_path):
    Image.fromarray(np.full((10, 12), 200, np.uint8), "L").save(tmp_path / "grey.png")
    rgba = np.zeros((10, 10, 4), np.uint8)
    rgba[..., 0] = 255  # red where opaque, alpha 0 on the left half
    rgba[:, 5:, 3] = 255
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.PNG")  # upper-case extension too
    dataset = ImageFolderDataset(tmp_path, transform=image_transform(8, hflip=False))
    assert [p.name for p in dataset.files] == ["grey.png", "rgba.PNG"]
    grey, rgba_image = dataset[0], dataset[1]
    assert grey.shape == rgba_image.shape == (3, 8, 8)
    torch.testing.assert_close(grey[0], grey[2])
    # Transparent pixels are composited on white, not exposed as black.
    assert rgba_image[:, :, 0].mean() > 0.9


def test_unreadable_image_is_named(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "good.png")
    (tmp_path / "broken.jpg").write_bytes(b"not a jpeg")
    dataset = ImageFolderDataset(tmp_path, transform=image_transform(8))
    with pytest.raises(DataError, match=r"Cannot read image .*broken\.jpg"):
        dataset[0]  # sorted: broken.jpg first


def test_missing_and_empty_folders(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        build_image_dataset("folder", tmp_path / "nope", size=8)
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="holds no images"):
        build_image_dataset("folder", tmp_path, size=8)


def test_unknown_dataset():
    with pytest.raises(DataError, match="--dataset mnist is unknown"):
        build_image_dataset("mnist", "data", size=32)


@pytest.mark.parametrize(
    "name, folder",
    [("cifar10", "cifar-10-batches-py"), ("cifar100", "cifar-100-python"), ("stl10", "stl10_binary"), ("imagenet", "stl10_binary")],
)
def test_missing_torchvision_dataset_says_where_files_go(tmp_path, name, folder):
    with pytest.raises(DataError) as err:
        build_image_dataset(name, tmp_path, size=32)
    message = str(err.value)
    assert str(tmp_path / folder) in message and "--download" in message


def test_missing_celeba_says_where_files_go(tmp_path):
    with pytest.raises(DataError, match=r"img_align_celeba"):
        build_image_dataset("celeba", tmp_path, size=64)


def test_celeba_reads_the_aligned_jpegs(tmp_path):
    folder = tmp_path / "celeba" / "img_align_celeba"
    folder.mkdir(parents=True)
    for index in range(3):
        Image.new("RGB", (178, 218), (index * 40, 0, 0)).save(folder / f"{index:06d}.jpg")
    dataset = build_image_dataset("celeba", tmp_path, size=16)
    assert len(dataset) == 3 and dataset[2].shape == (3, 16, 16)


def test_cifar10_in_torchvision_layout_is_read_without_labels(tmp_path, monkeypatch):
    import torchvision.datasets.cifar as cifar

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)]:
        batch = {"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), "labels": [0, 1]}
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": ["plane", "car"]}))
    # The fake files cannot match torchvision's MD5 sums; everything else is torchvision's own reader.
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(cifar.CIFAR10, "_check_integrity", lambda self: True)
    dataset = build_image_dataset("cifar10", tmp_path, size=64, hflip=False)
    assert len(dataset) == 10
    image = dataset[0]
    assert image.shape == (3, 64, 64)  # 32 px native, resized
