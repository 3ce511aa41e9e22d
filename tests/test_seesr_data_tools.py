"""SeeSR's offline data tools (make_paired_data.py, make_paired_data_dape.py, make_tags.py) and the data-side behaviour
they share with the on-the-fly dataset: small images padded by mirroring, the DAPE data as make_paired_data_DAPE.py
makes it, and train_seesr_timestep.py --root_folders reading what the tools write."""

from __future__ import annotations

import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.degradations import DegradationConfig, usm_sharpen
from data.sr_pairs import HRFolderDegradedDataset, SeeSRPreparedDataset, pad_reflect_101, prepared_pair
from utils.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]
GT_SIZE = 64
SIZES = {"a": (80, 72), "b": (48, 90), "c": (40, 50)}  # (height, width): b is short on one side, c on both


def load_script(name: str):
    path = ROOT / "scripts" / f"{name}.py"
    module_name = f"_data_tools_{name}"
    if module_name not in sys.modules:
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    return sys.modules[module_name]


def read01(path: Path) -> torch.Tensor:
    return torch.from_numpy(np.array(Image.open(path).convert("RGB"))).permute(2, 0, 1).float() / 255


def smooth_photo(height: int, width: int, seed: int) -> np.ndarray:
    """Coarse random colour blobs plus fine noise: crops at different positions differ clearly."""
    rng = np.random.default_rng(seed)
    coarse = torch.from_numpy(rng.random((1, 3, height // 8 + 2, width // 8 + 2))).float()
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)[0]
    image = smooth.permute(1, 2, 0).numpy() * 200 + rng.integers(0, 50, (height, width, 3))
    return image.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hr_folder(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hr")
    for seed, (stem, (height, width)) in enumerate(SIZES.items()):
        Image.fromarray(smooth_photo(height, width, seed)).save(folder / f"{stem}.png")
    return folder


def paired_args(hr_folder: Path, save_dir: Path, *extra: str) -> list[str]:
    return ["--gt_path", str(hr_folder), "--save_dir", str(save_dir), "--gt_size", str(GT_SIZE), "--epoch", "2",
            "--num_workers", "0", *extra]


@pytest.fixture(scope="module")
def made(hr_folder, tmp_path_factory) -> Path:
    tool = load_script("make_paired_data")
    save_dir = tmp_path_factory.mktemp("made") / "training_for_seesr"
    result = tool.main(tool.parse_args(paired_args(hr_folder, save_dir)))
    assert result["written"] == 6 and result["skipped"] == 0
    return save_dir


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*.png"))}


def test_layout_and_names_are_seesrs(made):
    # 3 images x 2 epochs x start_gpu 1 = 6: SeeSR numbers from 7, seven digits, the same name in all three folders.
    names = [f"{n:07d}.png" for n in range(7, 13)]
    for folder, side in (("gt", GT_SIZE), ("lr", GT_SIZE // 4), ("sr_bicubic", GT_SIZE)):
        assert sorted(p.name for p in (made / folder).iterdir()) == names
        assert all(Image.open(made / folder / name).size == (side, side) for name in names)
    settings = json.loads((made / "make_paired_data.json").read_text())
    assert settings["tool"] == "make_paired_data" and settings["seed"] == 1024 and settings["degradation"]["usm_sharpen"]


def test_gt_is_the_usm_of_a_flipped_padded_crop(made, hr_folder):
    """Round r, image i -> number 7 + 3r + i; its GT = USM(crop of the image, flipped or not, mirrored at the bottom
    and right to the crop size): found among every position and flip, then compared by value."""
    for number, stem in ((7, "a"), (8, "b"), (9, "c"), (12, "c")):
        image = np.array(Image.open(hr_folder / f"{stem}.png"))
        gt = read01(made / "gt" / f"{number:07d}.png")
        best = None
        for flipped in (image, image[:, ::-1]):
            padded = np.pad(flipped, ((0, max(0, GT_SIZE - flipped.shape[0])), (0, max(0, GT_SIZE - flipped.shape[1])),
                                      (0, 0)), mode="reflect")  # numpy's reflect = OpenCV's BORDER_REFLECT_101
            height, width = padded.shape[:2]
            for top in range(height - GT_SIZE + 1):
                for left in range(width - GT_SIZE + 1):
                    crop = padded[top : top + GT_SIZE, left : left + GT_SIZE]
                    distance = np.abs(crop.astype(np.float32) / 255 - gt.permute(1, 2, 0).numpy()).mean()
                    if best is None or distance < best[0]:
                        best = (distance, crop)
        expected = usm_sharpen(torch.from_numpy(best[1].copy()).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(gt, (expected * 255).round() / 255, rtol=0, atol=1.01 / 255)


def test_sr_bicubic_is_the_float_lr_upsampled_as_the_reference(tmp_path):
    """prepared_pair: sr_bicubic = F.interpolate(lr, GT size, 'bicubic') of the LR before 8-bit rounding."""
    path = tmp_path / "photo.png"
    Image.fromarray(smooth_photo(64, 64, 9)).save(path)
    rounded = []
    for seed in range(4):  # the last step is JPEG (8-bit) or the resize + sinc (not rounded), half the time each
        pair = prepared_pair(path, DegradationConfig.seesr(), 64, np.random.default_rng(seed))
        lr = pair["lr"]
        assert lr.shape == (3, 16, 16)
        rounded.append(torch.equal(lr, (lr * 255).round() / 255))
        expected = F.interpolate(lr[None], size=(64, 64), mode="bicubic")[0].clamp(0, 1)
        torch.testing.assert_close(pair["sr_bicubic"], expected, rtol=0, atol=1e-6)
    assert not all(rounded)


def test_same_seed_same_bytes_with_any_worker_count(made, hr_folder, tmp_path):
    tool = load_script("make_paired_data")
    again = tmp_path / "again"
    tool.main(tool.parse_args([*paired_args(hr_folder, again)[:-2], "--num_workers", "2", "--batch_size", "4"]))
    assert files_of(again) == files_of(made)
    other = tmp_path / "other"
    tool.main(tool.parse_args([*paired_args(hr_folder, other), "--seed", "7", "--epoch", "1"]))
    assert (other / "gt/0000004.png").read_bytes() != (made / "gt/0000007.png").read_bytes()


def test_a_rerun_finishes_an_interrupted_run_and_refuses_other_settings(made, hr_folder, tmp_path, capsys):
    tool = load_script("make_paired_data")
    copy = tmp_path / "copy"
    shutil.copytree(made, copy)
    (copy / "lr/0000010.png").unlink()  # the run stopped between the files of one pair
    (copy / "sr_bicubic/0000011.png.tmp").write_bytes(b"half a png")  # and while writing another
    (copy / "sr_bicubic/0000011.png").unlink()
    before = {p: p.stat().st_mtime_ns for p in (copy / "gt").iterdir()}
    result = tool.main(tool.parse_args(paired_args(hr_folder, copy)))
    assert (result["written"], result["skipped"]) == (2, 4)
    assert files_of(copy) == files_of(made)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p.name not in ("0000010.png", "0000011.png"))

    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: tool.main(tool.parse_args([*paired_args(hr_folder, copy), "--seed", "5"])))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: --save_dir") and "seed" in err and err.count("\n") == 1


@pytest.mark.parametrize("case", ["missing", "empty", "unreadable", "inside", "gt_size", "epoch"])
def test_bad_inputs_are_one_line_before_anything_is_written(case, hr_folder, tmp_path, capsys):
    tool = load_script("make_paired_data")
    gt, save_dir, extra = tmp_path / "gt", tmp_path / "out", []
    gt.mkdir()
    if case in ("unreadable", "inside", "gt_size", "epoch"):
        shutil.copy(hr_folder / "a.png", gt / "a.png")
    if case == "unreadable":
        (gt / "broken.png").write_bytes(b"not a png")
    if case == "missing":
        gt = tmp_path / "nowhere"
    if case == "inside":
        save_dir = gt / "pairs"
    extra = {"gt_size": ["--gt_size", "30"], "epoch": ["--epoch", "0"]}.get(case, [])
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: tool.main(tool.parse_args(["--gt_path", str(gt), "--save_dir", str(save_dir), *extra])))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert {"missing": "does not exist", "empty": "holds no images", "unreadable": "broken.png",
            "inside": "lies inside --gt_path", "gt_size": "--gt_size", "epoch": "--epoch"}[case] in err
    assert not save_dir.exists()


def test_dape_pairs_are_whole_images_resized_with_lanczos(hr_folder, tmp_path):
    tool = load_script("make_paired_data_dape")
    save_dir = tmp_path / "training_for_dape"
    tool.main(tool.parse_args(["--gt_path", str(hr_folder), "--save_dir", str(save_dir), "--gt_size", "32",
                               "--num_workers", "0"]))
    assert json.loads((save_dir / "make_paired_data.json").read_text())["tool"] == "make_paired_data_dape"
    for number, stem in ((4, "a"), (5, "b"), (6, "c")):  # 3 images x 1 epoch x start_gpu 1
        resized = Image.open(hr_folder / f"{stem}.png").convert("RGB").resize((32, 32), Image.LANCZOS)
        expected = usm_sharpen(torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255)
        torch.testing.assert_close(read01(save_dir / "gt" / f"{number:07d}.png"), (expected * 255).round() / 255,
                                   rtol=0, atol=1.01 / 255)
        assert Image.open(save_dir / "lr" / f"{number:07d}.png").size == (8, 8)
        assert Image.open(save_dir / "sr_bicubic" / f"{number:07d}.png").size == (32, 32)
    if (ROOT / "recipes/dape.py").is_file():  # what train_dape.py reads from --root_folders: every pair, by name
        from recipes.dape import DAPEPairs, dape_pairs

        pairs = DAPEPairs(dape_pairs([str(save_dir)]), image_size=32)
        assert [gt.name for _, gt in pairs.pairs] == ["0000004.png", "0000005.png", "0000006.png"]
        torch.testing.assert_close(pairs[2]["gt"], read01(save_dir / "gt/0000006.png"))
        torch.testing.assert_close(pairs[2]["lq"], read01(save_dir / "sr_bicubic/0000006.png"))


def test_dape_degradation_is_make_paired_data_dapes():
    """--degradation dape: the x4plus ranges on the USM GT, whole images resized (not params_realesrgan.yml)."""
    dape = DegradationConfig.dape()
    x4plus = {"resize_range": (0.15, 1.5), "noise_range": (1.0, 30.0), "poisson_scale_range": (0.05, 3.0),
              "jpeg_range": (30.0, 95.0), "second_blur_prob": 0.8, "resize_range2": (0.3, 1.2),
              "noise_range2": (1.0, 25.0), "poisson_scale_range2": (0.05, 2.5), "jpeg_range2": (30.0, 95.0),
              "blur_sigma": (0.2, 3.0), "blur_sigma2": (0.2, 1.5), "final_sinc_prob": 0.8, "sinc_prob": 0.1,
              "resize_prob": (0.2, 0.7, 0.1), "resize_prob2": (0.3, 0.4, 0.3), "gray_noise_prob": 0.4}
    assert {key: getattr(dape, key) for key in x4plus} == x4plus
    assert dape.usm_sharpen and dape.resize_whole
    assert DegradationConfig.from_dict(dape.to_dict()) == dape
    mild = DegradationConfig.params_realesrgan()  # the yml's values stay available, as data
    assert (mild.jpeg_range, mild.second_blur_prob, mild.noise_range2) == ((60.0, 95.0), 0.5, (1.0, 12.0))


def test_the_dape_dataset_gt_is_the_whole_image_lanczos_resized_and_sharpened(hr_folder):
    dataset = HRFolderDegradedDataset(hr_folder, resolution=32, degradation=DegradationConfig.dape(), seed=0)
    for index, stem in enumerate(SIZES):
        resized = Image.open(hr_folder / f"{stem}.png").convert("RGB").resize((32, 32), Image.LANCZOS)
        expected = usm_sharpen(torch.from_numpy(np.array(resized)).permute(2, 0, 1).float() / 255)
        sample = dataset[index]
        torch.testing.assert_close((sample["hr"] + 1) / 2, expected, rtol=0, atol=1e-5)
        assert sample["lr"].shape == (3, 8, 8)


def test_images_smaller_than_the_crop_are_mirrored_at_the_bottom_and_right(hr_folder):
    """SeeSR's RealESRGANDataset: cv2.copyMakeBorder(img, 0, pad_h, 0, pad_w, BORDER_REFLECT_101) after the flip."""
    dataset = HRFolderDegradedDataset(hr_folder, resolution=GT_SIZE, seed=0)  # plain GT: no USM
    dataset.check_images()  # small images are no longer refused
    image = np.array(Image.open(hr_folder / "c.png"))  # 40 x 50, under the crop on both sides
    seen = set()
    for epoch in range(6):
        dataset.set_epoch(epoch)
        sample = dataset[2]
        hr = ((sample["hr"] + 1) / 2 * 255).round().permute(1, 2, 0).numpy().astype(np.uint8)
        matches = []
        for flip, source in ((False, image), (True, image[:, ::-1])):
            expected = np.pad(source, ((0, GT_SIZE - 40), (0, GT_SIZE - 50), (0, 0)), mode="reflect")
            matches += [flip] if np.array_equal(hr, expected) else []
        assert len(matches) == 1
        seen.add(matches[0])
        assert sample["lr"].shape == (3, GT_SIZE // 4, GT_SIZE // 4)
    assert seen == {False, True}
    tall = torch.arange(2 * 3 * 3.0).reshape(3, 2, 3)
    assert torch.equal(pad_reflect_101(tall, 7, 3)[0, :, 0], torch.tensor([0.0, 3, 0, 3, 0, 3, 0]))


@pytest.fixture()
def tiny_ram(tmp_path, monkeypatch):
    import models.ram
    from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram

    monkeypatch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)
    return write_tiny_ram(tmp_path / "ram")


def test_make_tags_writes_plain_rams_tags_of_the_gt(made, tiny_ram, tmp_path, capsys):
    from models.ram import load_ram_tagger
    from tests.ram_tiny import TINY_RAM_CONFIG

    tool = load_script("make_tags")
    root = tmp_path / "root"
    shutil.copytree(made, root)
    ram_flags = ["--ram_path", str(tiny_ram["ram"]), "--ram_tag_list", str(tiny_ram["tag_list"]),
                 "--ram_tag_thresholds", str(tiny_ram["thresholds"]), "--device", "cpu"]
    result = tool.main(tool.parse_args(["--root_path", str(root), *ram_flags]))
    assert len(result["written"]) == 6
    tagger = load_ram_tagger(tiny_ram["ram"], None, tiny_ram["tag_list"], tiny_ram["thresholds"], config=TINY_RAM_CONFIG)
    for name in ("0000007", "0000012"):
        image = read01(root / "gt" / f"{name}.png")[None]
        pixels = F.interpolate(image, size=(64, 64), mode="bilinear", align_corners=False)  # RAM's resize, no antialias
        mean, std = torch.tensor([0.485, 0.456, 0.406])[:, None, None], torch.tensor([0.229, 0.224, 0.225])[:, None, None]
        logits = tagger.logits(tagger.encode((pixels - mean) / std))
        fired = [tag for tag, p, t in zip(tagger.tag_list, torch.sigmoid(logits[0]), tagger.class_threshold) if p > t]
        assert (root / "tag" / f"{name}.txt").read_text() == ", ".join(fired) + ","  # SeeSR's f"{tags},"
    assert tool.main(tool.parse_args(["--root_path", str(root), *ram_flags]))["written"] == []  # resumable

    shard = tmp_path / "shard"
    shutil.copytree(made, shard)
    assert len(tool.main(tool.parse_args(["--root_path", str(shard), "--start_gpu", "1", "--all_gpu", "2",
                                          *ram_flags]))["written"]) == 3
    capsys.readouterr()
    for flags, needle in ((["--ram_ft_path", str(tiny_ram["dape"])], "plain RAM"),
                          (["--root_path", str(tmp_path / "nowhere")], "does not exist")):
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda flags=flags: tool.main(tool.parse_args([*ram_flags, *flags])))
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and needle in err and err.count("\n") == 1


def test_root_folders_dataset_reads_the_tools_output(made):
    (made / "tag").mkdir(exist_ok=True)
    (made / "tag/0000008.txt").write_text("cat, grass,")
    dataset = SeeSRPreparedDataset(str(made), resolution=GT_SIZE, null_prompt_ratio=0.0, seed=0)
    assert len(dataset) == 6
    dataset.check_images()
    sample = dataset[1]
    torch.testing.assert_close((sample["hr"] + 1) / 2, read01(made / "gt/0000008.png"))
    torch.testing.assert_close(sample["lr_upsampled"], read01(made / "sr_bicubic/0000008.png"))
    torch.testing.assert_close(sample["lr"], read01(made / "lr/0000008.png"))
    assert (sample["prompt"], sample["tag_source"]) == ("cat, grass,", "file")
    assert dataset[0]["tag_source"] == "none"
    shutil.rmtree(made / "tag")


def test_train_seesr_timestep_trains_from_the_tools_folder(made, tmp_path):
    """One step of the tiny preset with --root_folders pointing at make_paired_data.py's folder."""
    import train_seesr_timestep as train
    from tests.sd2_tiny import build_tiny_sd2

    sd2 = build_tiny_sd2(tmp_path / "sd2", light_attention=True)
    args = train.parse_args(["--config", str(ROOT / "configs/seesr_tiny.yaml"), "--pretrained_model_path", str(sd2),
                             "--root_folders", str(made), "--train_data_dir", "", "--output_dir", str(tmp_path / "run"),
                             "--max_train_steps", "1", "--validation_steps", "0", "--checkpointing_steps", "1"])
    result = train.main(args)
    assert result["step"] == 1 and np.isfinite(result["history"][-1][1])
    assert "6 images" in (tmp_path / "run/train.log").read_text()


@pytest.mark.parametrize("name", ["make_paired_data", "make_paired_data_dape", "make_tags"])
def test_help_parses(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        load_script(name).parse_args(["--help"])
    out = capsys.readouterr().out
    assert exit_info.value.code == 0 and "SeeSR" in out and ("--gt_path" in out or "--root_path" in out)


def test_the_script_itself_ends_with_one_error_line(tmp_path):
    import subprocess

    result = subprocess.run([sys.executable, str(ROOT / "scripts/make_paired_data.py"), "--gt_path", str(tmp_path / "none"),
                             "--save_dir", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.startswith("error: The GT image folder") and "Traceback" not in result.stderr
