"""Latent files (LightningDiT tensor names + metadata), latent statistics and the normalising dataset."""

import pytest
import torch
from safetensors.torch import save_file

from data.latents import (
    STATS_FILENAME,
    LatentDataset,
    LatentStats,
    compute_latent_stats,
    load_latent_file,
    save_latent_file,
)
from utils.errors import DataError, UserError

FINGERPRINT = "336000000-0123456789abcdef01234567"


def make_latents(n=40, channels=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    scale = torch.linspace(0.5, 3.0, channels).view(1, -1, 1, 1)
    offset = torch.linspace(-2.0, 2.0, channels).view(1, -1, 1, 1)
    return torch.randn(n, channels, 4, 4, generator=generator) * scale + offset


def test_latent_file_round_trip_uses_lightningdit_names(tmp_path):
    latents, flips = make_latents(), make_latents(seed=1)
    user_ids = torch.arange(40) % 12 + 1
    path = tmp_path / "train.safetensors"
    save_latent_file(
        path, latents, user_ids, num_users=12, vae_fingerprint=FINGERPRINT, posterior="mode", image_size=256, latents_flip=flips
    )
    data = load_latent_file(path)
    assert torch.equal(data.latents, latents) and torch.equal(data.latents_flip, flips)
    assert torch.equal(data.labels, user_ids - 1) and torch.equal(data.user_ids, user_ids)  # rows = user ID - 1
    assert data.vae_fingerprint == FINGERPRINT and data.num_users == 12
    assert data.metadata["posterior"] == "mode" and data.metadata["image_size"] == "256"
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert set(handle.keys()) == {"latents", "labels", "latents_flip"}
    assert not (tmp_path / "train.safetensors.tmp").exists()


def test_lightningdit_files_without_metadata_are_readable(tmp_path):
    path = tmp_path / "latents_rank00_shard000.safetensors"
    save_file({"latents": make_latents(8), "labels": torch.arange(8)}, str(path), metadata={"total_size": "8"})
    data = load_latent_file(path)
    assert data.latents_flip is None and data.vae_fingerprint is None and data.labels.tolist() == list(range(8))


def test_bad_user_ids_and_files_are_errors(tmp_path):
    with pytest.raises(UserError, match=r"\[0, 13\] are outside 1\.\.12"):
        save_latent_file(
            tmp_path / "x.safetensors", make_latents(3), [0, 5, 13],
            num_users=12, vae_fingerprint=FINGERPRINT, posterior="mode", image_size=256,
        )
    with pytest.raises(DataError, match="run scripts/extract_features.py"):
        load_latent_file(tmp_path / "missing.safetensors")
    path = tmp_path / "nolabels.safetensors"
    save_file({"latents": make_latents(2)}, str(path))
    with pytest.raises(DataError, match="no 'labels' tensor"):
        load_latent_file(path)


def test_stats_match_torch_and_round_trip(tmp_path):
    latents = make_latents(50)
    stats = compute_latent_stats(latents, FINGERPRINT, chunk_size=7)
    assert stats.mean.shape == stats.std.shape == (1, 6, 1, 1) and stats.num_samples == 50
    torch.testing.assert_close(stats.mean, latents.mean(dim=(0, 2, 3), keepdim=True), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats.std, latents.std(dim=(0, 2, 3), keepdim=True), atol=1e-5, rtol=1e-5)  # unbiased, as the reference
    stats.save(tmp_path / STATS_FILENAME)
    loaded = LatentStats.load(tmp_path)  # a folder means the file beside the latents
    assert loaded.vae_fingerprint == FINGERPRINT and loaded.num_samples == 50
    torch.testing.assert_close(loaded.mean, stats.mean, atol=0, rtol=0)
    again = LatentStats.from_dict(stats.to_dict())
    assert again.vae_fingerprint == FINGERPRINT
    torch.testing.assert_close(again.denormalize(again.normalize(latents)), latents, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match="constant"):
        compute_latent_stats(torch.ones(3, 2, 2, 2), FINGERPRINT)
    with pytest.raises(DataError, match=STATS_FILENAME):
        LatentStats.load(tmp_path / "elsewhere")


def test_dataset_normalises_with_train_statistics(tmp_path):
    train = make_latents(60)
    path = tmp_path / "train.safetensors"
    save_latent_file(path, train, torch.arange(60) % 3 + 1, num_users=3, vae_fingerprint=FINGERPRINT, posterior="sample", image_size=256)
    stats = compute_latent_stats(load_latent_file(path).latents, FINGERPRINT)
    dataset = LatentDataset(path, stats)
    assert len(dataset) == 60 and dataset.num_users == 3
    latent, label = dataset[4]
    assert latent.shape == (6, 4, 4) and latent.dtype == torch.float32 and label.item() == 4 % 3
    everything = torch.stack([dataset[i][0] for i in range(len(dataset))])
    torch.testing.assert_close(everything.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(everything.std(dim=(0, 2, 3)), torch.ones(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(stats.denormalize(latent), train[4], atol=1e-5, rtol=1e-5)


def test_dataset_refuses_statistics_of_another_vae_and_missing_flips(tmp_path):
    path = tmp_path / "train.safetensors"
    save_latent_file(path, make_latents(10), [1] * 10, num_users=2, vae_fingerprint=FINGERPRINT, posterior="mode", image_size=256)
    stale = compute_latent_stats(make_latents(10), "999-ffffffffffffffffffffffff")
    with pytest.raises(UserError, match="fingerprint 999-ffffffffffffffffffffffff.*has 336000000-"):
        LatentDataset(path, stale)
    stats = compute_latent_stats(make_latents(10), FINGERPRINT)
    with pytest.raises(DataError, match="no 'latents_flip'"):
        LatentDataset(path, stats, use_flip=True)


def test_dataset_flips_when_asked(tmp_path):
    latents = make_latents(4)
    path = tmp_path / "train.safetensors"
    save_latent_file(
        path, latents, [1, 2, 1, 2],
        num_users=2, vae_fingerprint=FINGERPRINT, posterior="mode", image_size=256, latents_flip=latents + 100,
    )
    stats = LatentStats(torch.zeros(1, 6, 1, 1), torch.ones(1, 6, 1, 1), FINGERPRINT)
    dataset = LatentDataset(path, stats, use_flip=True)
    torch.manual_seed(0)
    seen = {bool(dataset[0][0].mean() > 50) for _ in range(40)}
    assert seen == {True, False}
    assert all(LatentDataset(path, stats)[0][0].mean() < 50 for _ in range(5))  # off by default
