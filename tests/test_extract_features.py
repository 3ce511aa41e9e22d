"""Stage 1 (scripts/extract_features.py): ID_<n> folders map to user n, splits, statistics, flips, errors."""

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from data.latents import STATS_FILENAME, LatentStats, compute_latent_stats, load_latent_file
from data.user_images import center_crop_arr, natural_key, scan_user_folders, split_train_val, user_id_from_folder
from models.vavae import file_fingerprint, load_vavae
from tests.user_pipeline_data import user_colour, write_tiny_vavae, write_user_folders
from utils.errors import DataError, UserError

ROOT = Path(__file__).resolve().parents[1]


def load_extract():
    spec = importlib.util.spec_from_file_location("extract_features_under_test", ROOT / "scripts" / "extract_features.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


extract = load_extract()



@pytest.fixture(scope="module")
def vavae(tmp_path_factory):
    return write_tiny_vavae(tmp_path_factory.mktemp("vae") / "vavae-tiny.pt")


def run(data_dir, output, vavae, *extra):
    return extract.main(extract.parse_args([
        "--data_dir", str(data_dir), "--vavae_path", str(vavae), "--vavae_config", "tiny", "--output_path", str(output),
        "--image_size", "32", "--batch_size", "5", "--device", "cpu", *extra,
    ]))


def test_folder_names_map_to_user_ids_by_number():
    assert [user_id_from_folder(n) for n in ("ID_1", "ID_10", "id-7", "user_03", "User12", "ID_x", "misc")] == [1, 10, 7, 3, 12, None, None]
    names = [f"ID_{n}" for n in range(1, 13)]
    assert sorted(names)[:4] == ["ID_1", "ID_10", "ID_11", "ID_12"]  # the string order that shifted labels
    assert sorted(map(user_id_from_folder, names)) == list(range(1, 13))
    ordered = sorted(map(Path, ["img10.png", "img2.png", "img1.png"]), key=natural_key)
    assert [p.name for p in ordered] == ["img1.png", "img2.png", "img10.png"]


def test_id_1_to_12_latents_carry_their_folders_user(tmp_path, vavae):
    counts = {user: 2 + user % 3 for user in range(1, 13)}
    data = write_user_folders(tmp_path / "data", range(1, 13), counts)
    result = run(data, tmp_path / "out", vavae, "--posterior", "mode", "--val_fraction", "0.3", "--seed", "3")
    train, val = load_latent_file(tmp_path / "out/train.safetensors"), load_latent_file(tmp_path / "out/val.safetensors")
    assert result["num_users"] == 12 and train.num_users == 12
    # Every image of user n is one colour, so its latent is the encoding of that colour: compare row by row.
    vae = load_vavae(vavae, config="tiny")
    reference = {}
    for user in range(1, 13):
        image = torch.tensor(user_colour(user), dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, 32, 32) / 127.5 - 1
        reference[user] = vae.encode(image)[0]
    for data_file in (train, val):
        for latent, user in zip(data_file.latents, data_file.user_ids.tolist()):
            torch.testing.assert_close(latent, reference[user], atol=1e-4, rtol=1e-4)
    both = torch.cat([train.user_ids, val.user_ids])
    assert {u: int((both == u).sum()) for u in range(1, 13)} == counts
    assert (val.user_ids.bincount(minlength=13)[1:] >= 1).all() and len(val.labels) == sum(round(0.3 * c) or 1 for c in counts.values())
    assert train.metadata["posterior"] == "mode" and train.metadata["image_size"] == "32"
    assert train.vae_fingerprint == file_fingerprint(vavae) and train.latents_flip is None
    # Statistics: train split only, carrying the fingerprint.
    stats = LatentStats.load(tmp_path / "out" / STATS_FILENAME)
    expected = compute_latent_stats(train.latents, train.vae_fingerprint)
    torch.testing.assert_close(stats.mean, expected.mean)
    torch.testing.assert_close(stats.std, expected.std)
    assert stats.vae_fingerprint == train.vae_fingerprint and stats.num_samples == len(train.labels)
    manifest = (tmp_path / "out/users.json").read_text()
    assert '"10": ' in manifest and "seeded split" in manifest


def test_split_is_seeded_per_user():
    users = {1: [Path(f"a{i}.png") for i in range(10)], 2: [Path(f"b{i}.png") for i in range(3)], 3: [Path("c.png")]}
    train, val = split_train_val(users, 0.2, seed=5)
    assert [v.user_id for v in val] == [1, 1, 2]  # 2 of 10, at least 1 of 3, none of a single image
    assert len(train) == 11
    again, _ = split_train_val(users, 0.2, seed=5)
    assert again == train
    other, _ = split_train_val(users, 0.2, seed=6)
    assert other != train
    first_user_only, _ = split_train_val({1: users[1]}, 0.2, seed=5)
    assert [t for t in train if t.user_id == 1] == first_user_only  # a user's draw ignores the other users


def test_train_val_folders_user_names_flips_and_sampled_posterior(tmp_path, vavae):
    write_user_folders(tmp_path / "data/train", [1, 2, 3], 2, prefix="user_", pattern="ramp")
    write_user_folders(tmp_path / "data/val", [1, 3], 1, prefix="user_", pattern="ramp", size=(52, 48))  # not copies of train
    run(tmp_path / "data", tmp_path / "out", vavae, "--flip", "--num_users", "4")
    train = load_latent_file(tmp_path / "out/train.safetensors")
    val = load_latent_file(tmp_path / "out/val.safetensors")
    assert train.user_ids.tolist() == [1, 1, 2, 2, 3, 3] and val.user_ids.tolist() == [1, 3]
    assert train.num_users == 4 and train.metadata["posterior"] == "sample"  # LightningDiT's extractor samples
    assert train.latents_flip is not None and not torch.allclose(train.latents_flip, train.latents, atol=1e-3)
    with safe_open(str(tmp_path / "out/train.safetensors"), framework="pt") as handle:
        assert set(handle.keys()) == {"latents", "labels", "latents_flip"}
    run(tmp_path / "data", tmp_path / "again", vavae, "--flip", "--num_users", "4")  # same seed: same posterior samples
    assert torch.equal(load_latent_file(tmp_path / "again/train.safetensors").latents, train.latents)


def test_centre_crop_is_adms():
    from PIL import Image

    image = Image.new("RGB", (600, 100))
    image.paste((255, 0, 0), (0, 0, 250, 100))  # red left part
    cropped = center_crop_arr(image, 32)
    assert cropped.size == (32, 32)
    assert cropped.getpixel((16, 16))[0] < 30  # the centre of a wide image, not its red left edge


def test_bad_folders_are_one_sentence_errors(tmp_path, vavae):
    (tmp_path / "zero/ID_0").mkdir(parents=True)
    with pytest.raises(DataError, match="names user 0, but user IDs count from 1"):
        scan_user_folders(tmp_path / "zero")
    write_user_folders(tmp_path / "dup", [1], 1)
    write_user_folders(tmp_path / "dup", [1], 1, prefix="user_")
    with pytest.raises(DataError, match="ID_1 and user_1 .* both name user 1"):
        scan_user_folders(tmp_path / "dup")
    write_user_folders(tmp_path / "mixed", [1, 2], 1)
    (tmp_path / "mixed/misc").mkdir()
    (tmp_path / "mixed/.ipynb_checkpoints").mkdir()  # hidden: ignored
    with pytest.raises(DataError, match="folders that name no user: misc"):
        scan_user_folders(tmp_path / "mixed")
    with pytest.raises(DataError, match="does not exist"):
        run(tmp_path / "missing", tmp_path / "out", vavae)
    write_user_folders(tmp_path / "many", [1, 5], 2)
    with pytest.raises(UserError, match="--num_users 3 is smaller than the highest user folder number 5"):
        run(tmp_path / "many", tmp_path / "out", vavae, "--num_users", "3")


def test_grayscale_and_rgba_are_converted_with_one_note_per_folder(tmp_path, vavae, capsys):
    from PIL import Image

    data = write_user_folders(tmp_path / "data", users=[1, 2], per_user=3)
    for index, mode in enumerate(("L", "RGBA")):
        path = data / "ID_1" / f"img{index}.png"
        Image.open(path).convert(mode).save(path)
    path = data / "ID_2" / "img0.png"
    Image.open(path).convert("L").save(path)
    run(data, tmp_path / "out", vavae, "--val_fraction", "0")
    notes = [line for line in capsys.readouterr().out.splitlines() if line.startswith("note: ")]
    assert notes == [
        f"note: {data / 'ID_1'}: 2 image(s) converted to RGB (1 L, 1 RGBA; grayscale copied to the three channels, "
        "transparency composited on white)",
        f"note: {data / 'ID_2'}: 1 image(s) converted to RGB (1 L; grayscale copied to the three channels, transparency "
        "composited on white)",
    ]


@pytest.mark.parametrize("size,fragment", [((1, 1), "is 1x1 px, smaller than the VA-VAE's"),
                                           ((8, 2000), "is 2000x8 px, smaller than the VA-VAE's"),
                                           ((16, 2000), "is 2000x16 px, an aspect ratio beyond 8:1"),
                                           ((2000, 16), "is 16x2000 px, an aspect ratio beyond 8:1"),
                                           ((40, 400), "is 400x40 px, an aspect ratio beyond 8:1")])
def test_tiny_and_extreme_aspect_images_are_refused_naming_the_file(tmp_path, vavae, size, fragment):
    import numpy as np
    from PIL import Image

    data = write_user_folders(tmp_path / "data", users=[1, 2], per_user=2)
    bad = data / "ID_2" / "odd.png"
    Image.fromarray(np.full((size[0], size[1], 3), 128, np.uint8)).save(bad)
    with pytest.raises(DataError, match=f"{bad}.*{fragment}".replace("(", r"\(").replace(")", r"\)")):
        run(data, tmp_path / "out", vavae, "--val_fraction", "0")
    assert not (tmp_path / "out" / "train.safetensors").exists()
