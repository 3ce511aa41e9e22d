"""The validation split of user folders: by recording (subfolder, --group_pattern or a manifest), with a duplicate check."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image

from data.user_images import check_no_duplicates, recording_groups, scan_user_folders, split_train_val
from pipelines.user_features import ExtractionSettings, collect_splits, extract_features
from tests.user_pipeline_data import write_tiny_vavae
from utils.errors import DataError, UserError


def write_recordings(root, users=(1, 2), recordings=4, crops=3, nested=True):
    """ID_<u>/rec<r>/crop<c>.png (nested) or ID_<u>/rec<r>_crop<c>.png; every file's pixels differ."""
    for user in users:
        for r in range(recordings):
            for c in range(crops):
                name = f"rec{r}/crop{c}.png" if nested else f"rec{r}_crop{c}.png"
                path = root / f"ID_{user}" / name
                path.parent.mkdir(parents=True, exist_ok=True)
                value = (user * 50 + r * 10 + c) % 256
                Image.fromarray(np.full((20, 24, 3), value, dtype=np.uint8)).save(path)
    return root


def recording_of(item):
    return item.path.parent.name if item.path.parent.name.startswith("rec") else item.path.name.split("_")[0]


def test_default_groups_are_the_subfolders_and_no_recording_is_split(tmp_path):
    users = scan_user_folders(write_recordings(tmp_path / "data"))
    groups = recording_groups(users, tmp_path / "data")
    assert sorted(set(groups.values())) == ["rec0", "rec1", "rec2", "rec3"]
    train, val = split_train_val(users, 0.25, seed=3, groups=groups)
    for user in (1, 2):
        train_recs = {recording_of(i) for i in train if i.user_id == user}
        val_recs = {recording_of(i) for i in val if i.user_id == user}
        assert len(val_recs) == 1 and len(train_recs) == 3 and not train_recs & val_recs  # 1 of 4 recordings, whole
    assert len(val) == 2 * 3 and len(train) == 2 * 9
    assert split_train_val(users, 0.25, seed=3, groups=groups) == (train, val)  # seeded
    # Without groups every image is its own recording: crops of one recording land on both sides.
    _, ungrouped_val = split_train_val(users, 0.25, seed=3)
    assert len(ungrouped_val) == 2 * 3 and len({recording_of(i) for i in ungrouped_val if i.user_id == 1}) > 1


def test_group_pattern_and_manifest(tmp_path):
    data = write_recordings(tmp_path / "flat", nested=False)
    users = scan_user_folders(data)
    assert set(recording_groups(users, data).values()) == {f"rec{r}_crop{c}.png" for r in range(4) for c in range(3)}
    groups = recording_groups(users, data, pattern=r"^(rec\d+)_")
    assert set(groups.values()) == {"rec0", "rec1", "rec2", "rec3"}
    train, val = split_train_val(users, 0.5, seed=0, groups=groups)
    for user in (1, 2):
        assert not {recording_of(i) for i in train if i.user_id == user} & {recording_of(i) for i in val if i.user_id == user}
    with pytest.raises(DataError, match=r"--group_pattern '\^session' does not match rec0_crop0.png"):
        recording_groups(users, data, pattern="^session")

    manifest = tmp_path / "split.csv"
    rows = ["path,split"] + [f"ID_{u}/rec{r}_crop{c}.png,{'val' if r == 3 else 'train'}"
                             for u in (1, 2) for r in range(4) for c in range(3)]
    manifest.write_text("\n".join(rows) + "\n")
    settings = ExtractionSettings(data_dir=str(data), vavae_path="unused", output_path=str(tmp_path / "out"), split_manifest=str(manifest))
    info, train, val = collect_splits(settings)
    assert {recording_of(i) for i in val} == {"rec3"} and len(val) == 6 and len(train) == 18
    assert info["split"].endswith("(split column)")
    manifest.write_text("\n".join(rows[:-1]) + "\n")  # one image missing
    with pytest.raises(DataError, match="--split_manifest does not list .*rec3_crop2.png"):
        collect_splits(settings)
    settings.split_manifest = None
    settings.val_dir = str(data)
    settings.group_pattern = "x"
    with pytest.raises(UserError, match="already holds the validation images"):
        collect_splits(settings)


def test_a_copied_image_across_the_split_is_an_error(tmp_path):
    data = write_recordings(tmp_path / "data", users=(1,), recordings=2, crops=2)
    shutil.copy(data / "ID_1/rec0/crop0.png", data / "ID_1/rec1/copy.png")  # the same crop in two recordings
    users = scan_user_folders(data)
    train, val = split_train_val(users, 0.5, seed=0, groups=recording_groups(users, data))
    with pytest.raises(DataError, match=r"1 validation image\(s\) are identical to training images \(e.g. .*rec\d/c.*\.png = "):
        check_no_duplicates(train, val)
    check_no_duplicates(train, [])  # nothing held out, nothing to compare


def test_extraction_writes_how_the_split_was_made(tmp_path):
    data = write_recordings(tmp_path / "data", recordings=3, crops=2)
    vavae = write_tiny_vavae(tmp_path / "vavae.pt")
    result = extract_features(ExtractionSettings(data_dir=str(data), vavae_path=str(vavae), output_path=str(tmp_path / "latents"),
                                                 vavae_config="tiny", image_size=32, val_fraction=0.34, device="cpu"))
    users = json.loads((tmp_path / "latents/users.json").read_text())
    assert "by recording (recording = subfolder of the user folder, 3 recordings)" in users["split"]
    val_recordings = {(p.split("/")[-3], p.split("/")[-2]) for p in users["val_files"]}
    assert len(val_recordings) == 2 and users["counts"] == {"train": 8, "val": 4}  # one recording of each user, 2 crops each
    assert result["num_users"] == 2
