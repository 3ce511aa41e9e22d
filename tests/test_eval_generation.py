"""scripts/eval_generation.py and utils/generation_metrics.py: torch-fidelity's FID/KID/IS/PR against the formulas
computed here from the same Inception features, reference caching, every missing-file error; infer.py ddpm
--save_images (resumable folder sampling) and train_ddpm_highres.py --fid_every.

The Inception weights are random values in torch-fidelity's exact FeatureExtractorInceptionV3 layout (He-scaled,
so that 90 random layers keep informative features). Most of the module's time is Inception at 299 px and
torch-fidelity's 2048x2048 eigenvalues per FID (the training test computes two).
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("torch_fidelity")

from utils.errors import CheckpointError, DataError, UserError  # noqa: E402
from utils.generation_metrics import INCEPTION_WEIGHTS_FILE, compute_generation_metrics  # noqa: E402


def random_inception_weights(path: Path, seed: int = 0) -> Path:
    """A random state dict with the keys and shapes of torch-fidelity's InceptionV3 weight file."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    torch.manual_seed(seed)
    # Build the module without its weight file: load_state_dict and torch.load are bypassed only here, in the test.
    with (
        mock.patch.object(FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None),
        mock.patch("torch.load", return_value={}),
    ):
        model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path="unused")
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def photo_folder(folder: Path, count: int, seed: int, size: int = 32) -> Path:
    """``count`` seeded crops of scikit-image's photographs (the demo data), flat in ``folder``."""
    from data.demo_data import load_sample_photographs, random_crops

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    photos = list(load_sample_photographs().values())
    for index in range(count):
        crop = random_crops(photos[index % len(photos)], 1, size, rng)[0]
        Image.fromarray(crop).save(folder / f"{index:04d}.png")
    return folder


def inception_features(weights: Path, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Pool features and unbiased logits of every image, extracted here without torch-fidelity's pipeline."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    model = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"], feature_extractor_weights_path=str(weights))
    images = torch.stack([torch.from_numpy(np.array(Image.open(p).convert("RGB"))).permute(2, 0, 1) for p in sorted(folder.glob("*.png"))])
    with torch.no_grad():
        pool, logits = model(images)
    return pool.double(), logits.double()


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    weights = random_inception_weights(root / INCEPTION_WEIGHTS_FILE)
    fake, real = photo_folder(root / "fake", 8, seed=1), photo_folder(root / "real", 8, seed=2)
    return root, weights, fake, real


def test_metrics_equal_the_formulas_on_the_same_features(setup):
    root, weights, fake, real = setup
    values = compute_generation_metrics(str(fake), str(real), weights, batch_size=5, cache_dir=root / "cache", kid_subsets=1, isc_splits=1)
    assert values["notes"] == ["KID subset size lowered from 1000 to 8 (the smaller set)"]
    (f1, l1), (f2, _) = inception_features(weights, fake), inception_features(weights, real)
    # FID (Heusel et al.): |mu1 - mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^1/2). With S = X^T X / (n - 1) of centred
    # features X (n << d), S1 S2 has the nonzero eigenvalues of the n x n matrix X1 X2^T X2 X1^T / (n - 1)^2.
    n = len(f1)
    x1, x2 = f1 - f1.mean(0), f2 - f2.mean(0)
    gram = x1 @ x2.T @ x2 @ x1.T / (n - 1) ** 2
    tr_sqrt = torch.linalg.eigvalsh((gram + gram.T) / 2).clamp(min=0).sqrt().sum()
    fid = float(((f1.mean(0) - f2.mean(0)) ** 2).sum() + (x1**2).sum() / (n - 1) + (x2**2).sum() / (n - 1) - 2 * tr_sqrt)
    # float32 features through two extraction paths: 1e-3 relative is >10x the 4e-5 measured at 1 and 2 threads.
    assert values["frechet_inception_distance"] == pytest.approx(fid, rel=1e-3)
    assert fid > 1.0
    # KID with one subset of all images: the unbiased MMD^2 with the cubic kernel (x.y / d + 1)^3.
    d = f1.shape[1]
    k = lambda a, b: (a @ b.T / d + 1) ** 3  # noqa: E731
    kxx, kyy, kxy = k(f1, f1), k(f2, f2), k(f1, f2)
    mmd = (kxx.sum() - kxx.trace() + kyy.sum() - kyy.trace()) / (n * (n - 1)) - 2 * kxy.mean()
    assert values["kernel_inception_distance_mean"] == pytest.approx(float(mmd), rel=1e-3, abs=1e-6)
    # IS with one split: exp(E_x KL(p(y|x) || p(y))).
    p = l1.softmax(1)
    inception_score = float(torch.exp((p * (p.log() - p.mean(0, keepdim=True).log())).sum(1).mean()))
    assert values["inception_score_mean"] == pytest.approx(inception_score, rel=1e-4)
    # Precision / recall (k = 3): share of one set inside the other's k-NN balls.
    radius = lambda f: torch.cdist(f, f).kthvalue(4, dim=1).values  # noqa: E731 (k + 1: the point itself is at 0)
    precision = float((torch.cdist(f1, f2) <= radius(f2)[None]).any(1).double().mean())
    recall = float((torch.cdist(f2, f1) <= radius(f1)[None]).any(1).double().mean())
    assert (values["precision"], values["recall"]) == (pytest.approx(precision), pytest.approx(recall))


def test_same_folder_scores_zero_and_the_cache_follows_the_folder(setup, tmp_path):
    root, weights, fake, real = setup
    same = compute_generation_metrics(str(real), str(real), weights, metrics=("fid", "prc"), cache_dir=tmp_path)
    assert same["frechet_inception_distance"] == pytest.approx(0.0, abs=1e-3)  # measured ~1e-6: float32 covariances
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert cached and all(name.startswith("folder-real-") for name in cached)
    # A changed reference folder gets new statistics, never the stale cached ones.
    photo_folder(real, 9, seed=3)
    compute_generation_metrics(str(fake), str(real), weights, metrics=("prc",), cache_dir=tmp_path)
    new = [p for p in tmp_path.iterdir() if p.name not in cached and p.name.endswith("features-2048.pt")]
    assert len(new) == 1 and torch.load(new[0], weights_only=True).shape == (9, 2048)  # the 9 images, not the stale 8


def test_script_writes_json(setup, tmp_path, capsys):
    from scripts import eval_generation

    root, weights, fake, real = setup
    out = tmp_path / "m.json"
    report = eval_generation.main(
        eval_generation.parse_args(
            [
                "--samples",
                str(fake),
                "--inception_weights",
                str(weights),
                "--metrics",
                "isc",
                "--isc_splits",
                "2",
                "--device",
                "cpu",
                "--out",
                str(out),
                "--cache_dir",
                "none",
            ]
        )
    )
    saved = json.loads(out.read_text())
    assert saved["num_samples"] == 8 and saved["metrics"]["inception_score_mean"] == pytest.approx(
        report["metrics"]["inception_score_mean"]
    )
    assert 1.0 <= saved["metrics"]["inception_score_mean"] <= 10.0
    assert "IS " in capsys.readouterr().out


def test_missing_and_wrong_files_are_one_line_errors(setup, tmp_path):
    root, weights, fake, real = setup
    with pytest.raises(
        UserError,
        match=rf"--inception_weights {tmp_path}/nope.pth does not exist: download {INCEPTION_WEIGHTS_FILE} from https://github.com/toshas",
    ):
        compute_generation_metrics(str(fake), str(real), tmp_path / "nope.pth")
    with pytest.raises(UserError, match="--inception_weights is required"):
        compute_generation_metrics(str(fake), str(real), None)
    torch.save({"fc.weight": torch.zeros(1000, 2048), "Mixed_7c.branch_pool.conv.weight": torch.zeros(1)}, tmp_path / "tv.pth")
    with pytest.raises(CheckpointError, match=r"fc.weight is \[1000, 2048\], expected \[1008, 2048\]"):
        compute_generation_metrics(str(fake), str(real), tmp_path / "tv.pth")
    torch.save({"conv.weight": torch.zeros(1)}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match="does not hold torch-fidelity's InceptionV3"):
        compute_generation_metrics(str(fake), str(real), tmp_path / "other.pth")
    with pytest.raises(DataError, match="cifar-10-batches-py/ is missing"):
        compute_generation_metrics(str(fake), "cifar10", weights, datasets_root=str(tmp_path))
    with pytest.raises(DataError, match="is not a folder of images"):
        compute_generation_metrics(str(fake), str(tmp_path / "none"), weights)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .png/.jpg/.jpeg images"):
        compute_generation_metrics(str(tmp_path / "empty"), str(real), weights)
    with pytest.raises(UserError, match="need --reference"):
        compute_generation_metrics(str(fake), None, weights, metrics=("fid",))


def test_infer_ddpm_save_images_is_batched_and_resumable(tmp_path, capsys):
    """``infer.py ddpm --save_images``: N single PNGs in chunks of --batch_size, each depending only on its index;
    a rerun keeps existing files and samples only what is missing; other settings are refused."""
    from diffusers import DDPMScheduler, UNet2DModel

    import infer
    from models.ddpm_unet import ddpm_unet_config

    model = tmp_path / "ddpm-tiny-16"
    torch.manual_seed(0)
    UNet2DModel(**ddpm_unet_config("tiny", 16)).save_pretrained(model)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(model)
    flags = ["ddpm", "--model", str(model), "--samples", "5", "--batch_size", "2", "--steps", "2", "--device", "cpu", "--save_images"]
    infer.main(infer.parse_args(flags + ["--output_dir", str(tmp_path / "a")]))
    folder = tmp_path / "a" / "samples"
    files = sorted(folder.glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(5)] and (tmp_path / "a" / "ddpm_samples.png").is_file()
    first = {f.name: np.array(Image.open(f)) for f in files}
    assert not np.array_equal(first["000000.png"], first["000002.png"])  # chunks have their own seeds
    # Interrupted run: two files lost, one kept file marked so that keeping it is visible.
    (folder / "000001.png").unlink()
    (folder / "000004.png").unlink()
    marker = np.zeros_like(first["000003.png"])
    Image.fromarray(marker).save(folder / "000003.png")
    capsys.readouterr()
    infer.main(infer.parse_args(flags + ["--output_dir", str(tmp_path / "a")]))
    assert "3 of 5 samples already in" in capsys.readouterr().out
    again = {f.name: np.array(Image.open(f)) for f in sorted(folder.glob("*.png"))}
    assert np.array_equal(again["000003.png"], marker)  # existing files are kept
    for name in ("000001.png", "000004.png"):  # the missing ones come back identical
        assert np.array_equal(again[name], first[name])
    assert not list(folder.glob("*.tmp"))
    with pytest.raises(UserError, match=r"holds samples made with other settings \(seed 0 -> 1\)"):
        infer.main(infer.parse_args(flags + ["--output_dir", str(tmp_path / "a"), "--seed", "1"]))
    with pytest.raises(UserError, match="--save_images writes the samples of one --model"):
        infer.main(infer.parse_args(["ddpm", "--compare", str(model), str(model), "--save_images", "--output_dir", str(tmp_path / "b")]))


def test_training_logs_fid_every_n_epochs(setup, tmp_path):
    """train_ddpm_highres.py --fid_every 1: FID of EMA samples against the training folder in the log, each epoch;
    a missing Inception file stops the run before any training."""
    import re

    import train_ddpm_highres as train

    root, weights, fake, real = setup
    tiny = ["--dataset", "folder", "--data_dir", str(real), "--size", "16", "--model", "tiny", "--train_batch_size", "4",
            "--effective_batch", "4", "--lr_warmup_steps", "1", "--num_samples", "4", "--sample_steps", "2", "--quick_every", "0",
            "--device", "cpu", "--report_to", "none", "--epochs", "2", "--save_every", "2", "--sample_every", "2",
            "--fid_every", "1", "--fid_samples", "6", "--sampler", "ddim"]
    result = train.main(train.parse_args(tiny + ["--output_dir", str(tmp_path / "run"), "--inception_weights", str(weights)]))
    log = (result["paths"]["run"] / "train.log").read_text()
    fids = [float(x) for x in re.findall(r"FID ([0-9.]+) \(6 EMA samples, ddim 2 steps", log)]
    assert len(fids) == 2 and all(f > 0 for f in fids)
    with pytest.raises(UserError, match=r"--inception_weights .*nope.pth does not exist"):
        train.main(train.parse_args(tiny + ["--output_dir", str(tmp_path / "b"), "--inception_weights", str(tmp_path / "nope.pth")]))
    assert not (tmp_path / "b").exists() or not list((tmp_path / "b").rglob("*.pt"))
