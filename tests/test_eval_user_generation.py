"""scripts/eval_user_generation.py on a small procedural ID_n set: a classifier trained on the training split, and
"generated" folders with known answers (held-out copies, training copies, the wrong user), through a tiny VA-VAE.

The judging classifier is a ResNet-18 at 32 px, trained on 36 images for 12 epochs.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity")

from utils.errors import DataError, UserError  # noqa: E402

USERS = (1, 2, 3)


def user_image(user: int, index: int, rng: np.random.Generator, size: int = 32) -> np.ndarray:
    """A spectrogram-like picture: a user-specific colour and stripe frequency, a random phase and noise."""
    x = np.arange(size)[None, :, None]
    y = np.arange(size)[:, None, None]
    phase = rng.uniform(0, 2 * np.pi)
    stripes = 0.5 + 0.5 * np.sin(2 * np.pi * (user + 1) * (x + 0.3 * y) / size + phase)
    colour = np.array([[60, 200, 90], [220, 60, 60], [60, 80, 230]][user - 1])[None, None, :]
    image = colour * (0.4 + 0.6 * stripes) + rng.normal(0, 8, (size, size, 3))
    return np.clip(image, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def user_set(tmp_path_factory):
    from tests.user_pipeline_data import write_tiny_vavae

    root = tmp_path_factory.mktemp("users")
    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("val", 4)):
        for user in USERS:
            folder = root / "data" / split / f"ID_{user}"
            folder.mkdir(parents=True)
            for index in range(count):
                Image.fromarray(user_image(user, index, rng)).save(folder / f"s{index}.png")
    generated = root / "generated"
    # user 1: its held-out images; user 2: copies of training images (memorised); user 3: user 1's pictures.
    for user, source in ((1, root / "data" / "val" / "ID_1"), (2, root / "data" / "train" / "ID_2"), (3, root / "data" / "val" / "ID_1")):
        (generated / f"user_{user:02d}").mkdir(parents=True)
        for index, path in enumerate(sorted(source.glob("*.png"))[:4]):
            shutil.copy(path, generated / f"user_{user:02d}" / f"generated_{index:03d}.png")
    return root, write_tiny_vavae(root / "vavae.pt")


def run(root: Path, out: Path, *flags: str) -> dict:
    from scripts import eval_user_generation

    return eval_user_generation.main(eval_user_generation.parse_args([
        "--data_dir", str(root / "data"), "--output_dir", str(out), "--image_size", "32", "--classifier_size", "32",
        "--classifier_epochs", "12", "--classifier_batch_size", "8", "--device", "cpu", *flags]))


def test_report_known_answers(user_set, tmp_path):
    root, vavae = user_set
    report = run(root, tmp_path / "eval", "--generated_dir", str(root / "generated"), "--vavae_path", str(vavae),
                 "--vavae_config", "tiny")
    assert report["num_train"] == 36 and report["num_val"] == 12
    assert report["classifier"]["accuracy_held_out_real"] == 1.0  # colour and stripes tell the users apart
    per_user = {row["user"]: row for row in report["generated"]["per_user"]}
    # user 1's samples are its held-out images: right user, zero FID, the real diversity.
    # FID of two equal sets: torch-fidelity's eigenvalues of a rank-3 512x512 product give -4e-5 (measured).
    assert per_user[1]["accuracy"] == 1.0 and per_user[1]["fid"] == pytest.approx(0.0, abs=1e-3)
    assert per_user[1]["diversity_generated"] == pytest.approx(per_user[1]["diversity_real"])
    # user 2's samples are training images: distance 0 to the training set, all suspiciously close.
    assert per_user[2]["nn_train_distance_generated"] == 0.0 and per_user[2]["suspiciously_close"] == 1.0
    assert per_user[2]["nn_train_distance_real"] > 0
    # user 3 was given user 1's pictures: never classified as user 3, a large FID against user 3's real images.
    assert per_user[3]["accuracy"] == 0.0 and per_user[3]["fid"] > per_user[1]["fid"] + 1
    matrix = np.array(report["generated"]["confusion_matrix"])
    assert matrix.sum() == 12 and matrix[2, 0] == 4 and matrix[0, 0] == 4
    assert report["generated"]["accuracy"] == pytest.approx(8 / 12)
    vae = report["vavae"]
    assert 0 < vae["psnr"] < 60 and -1 <= vae["ssim"] <= 1 and 0 <= vae["classifier_accuracy_on_reconstructions"] <= 1
    assert (tmp_path / "eval" / "confusion_matrix.png").stat().st_size > 1000
    rows = list(csv.DictReader(open(tmp_path / "eval" / "per_user.csv")))
    assert [row["user"] for row in rows] == ["1", "2", "3"]
    assert "| user | num_generated | accuracy |" in (tmp_path / "eval" / "report.md").read_text()
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["users"] == [1, 2, 3]
    # The saved classifier is reused (same predictions, no training).
    saved = str(tmp_path / "eval" / "classifier.pt")
    again = run(root, tmp_path / "again", "--generated_dir", str(root / "generated"), "--classifier", saved)
    assert again["generated"]["confusion_matrix"] == report["generated"]["confusion_matrix"]
    assert again["classifier"]["source"].endswith("classifier.pt")


def test_errors(user_set, tmp_path):
    root, _ = user_set
    expected = r"--classifier_weights .*nope.pth does not exist: torchvision's ImageNet ResNet-18 is resnet18-f37072fd.pth"
    with pytest.raises(UserError, match=expected):
        run(root, tmp_path / "a", "--classifier_weights", str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="--classifier .*missing.pt does not exist"):
        run(root, tmp_path / "b", "--classifier", str(tmp_path / "missing.pt"))
    with pytest.raises(DataError, match="--generated_dir .* does not exist"):
        run(root, tmp_path / "c", "--generated_dir", str(tmp_path / "none"))
    (tmp_path / "g" / "user_09").mkdir(parents=True)
    Image.fromarray(np.zeros((32, 32, 3), np.uint8)).save(tmp_path / "g" / "user_09" / "generated_000.png")
    with pytest.raises(DataError, match=r"samples of user\(s\) \[9\]"):
        run(root, tmp_path / "d", "--generated_dir", str(tmp_path / "g"))
    torch.save({"model": {}, "user_ids": [1, 2], "classifier_size": 32}, tmp_path / "other.pt")
    with pytest.raises(UserError, match=r"was trained for users \[1, 2\] at 32 px, not users \[1, 2, 3\]"):
        run(root, tmp_path / "e", "--classifier", str(tmp_path / "other.pt"))
