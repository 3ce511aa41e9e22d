"""train_phaseformer.py and infer.py phaseformer end to end: the note's two commands on a tiny LSUI-layout set,
exact resumes, the NaN guard, inference with metrics, tiling, converted official weights and one-line errors."""

from __future__ import annotations

import csv
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import infer
import train_phaseformer as train
from data.underwater import build_synthetic_underwater
from losses import PhaseformerLoss
from models.phaseformer import PhaseformerOutput, build_phaseformer
from models.phaseformer_enhance import enhance, load_phaseformer_for_inference
from tests.launch import run_in_process
from utils.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "phaseformer_tiny.yaml"), "--crop_size", "16", "--eval_size", "16", "--device", "cpu"]



@pytest.fixture(scope="module")
def lsui(tmp_path_factory) -> Path:
    """8 train and 4 test synthetic underwater pairs of 16 px in the LSUI layout."""
    return build_synthetic_underwater(tmp_path_factory.mktemp("data") / "LSUI", size=16, train_count=8, test_count=4)


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory) -> Path:
    """Random weights in torchvision's VGG16 file layout (features.N.*), so the perceptual term runs."""
    from torchvision.models.vgg import cfgs, make_layers

    torch.manual_seed(0)
    features = make_layers(cfgs["D"])[:23]
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, path)
    return path


def note_command(lsui: Path, vgg_file: Path, *extra: str) -> list[str]:
    """The note's first command with the tiny preset: batch 2 x accumulation 2, 1 + 2 epochs."""
    return ["--dataset_path", str(lsui), "--batch_size", "2", "--grad_accum", "2", "--niter", "1", "--niter_decay", "2",
            "--lr", "0.001", *TINY, "--vgg_weights", str(vgg_file), *extra]


@pytest.fixture(scope="module")
def runs(lsui, vgg_file, tmp_path_factory):
    """An uninterrupted run, and the same run stopped after epoch 1 then resumed by the note's second command."""
    straight_dir, paused_dir = tmp_path_factory.mktemp("straight"), tmp_path_factory.mktemp("paused")
    cwd = os.getcwd()
    try:
        os.chdir(straight_dir)  # as the note: checkpoint/<dataset>/ under the working directory
        straight = train.main(train.parse_args(note_command(lsui, vgg_file)))
        os.chdir(paused_dir)
        first = train.main(train.parse_args(note_command(lsui, vgg_file, "--stop_epoch", "1")))
        resumed = train.main(train.parse_args(["--resume", "checkpoint/LSUI/netG_model_epoch_1.pth", "--dataset_path", str(lsui)]))
    finally:
        os.chdir(cwd)
    return {"straight": straight, "first": first, "resumed": resumed, "straight_dir": straight_dir, "paused_dir": paused_dir}


def test_note_commands_write_the_run_folder_and_state_dict_checkpoints(runs):
    run = runs["straight_dir"] / "checkpoint" / "LSUI"
    files = {str(p.relative_to(run)) for p in run.rglob("*") if p.is_file()}
    assert {"netG_model_epoch_1.pth", "netG_model_epoch_2.pth", "netG_model_epoch_3.pth", "netG_model_best.pth",
            "netG_model_latest.pth", "args.yaml", "train.log", "history.csv", "loss_curves.png", "loss_weights.png",
            "psnr.png", "ssim.png", "samples/epoch_3.png"} <= files
    checkpoint = torch.load(run / "netG_model_epoch_3.pth", map_location="cpu", weights_only=True)
    assert checkpoint["kind"] == "phaseformer" and checkpoint["epoch"] == 3 and checkpoint["step"] == 6
    assert checkpoint["model_config"]["channels"] == [8, 16, 32, 64] and checkpoint["model_config"]["eca"] == "feature"
    assert set(checkpoint["loss_weighting"]["state"]) == {"term_weights.raw_weights", "branch_weights.raw_weights"}
    assert {"optimizer", "lr_scheduler", "rng", "history", "best_psnr"} <= set(checkpoint)
    assert len(checkpoint["optimizer"]["param_groups"]) == 2  # the model, then the loss weights (no weight decay)
    assert checkpoint["config"]["model"] == "phaseformer_tiny" and "given_flags" not in checkpoint["config"]
    log = (run / "train.log").read_text()
    assert "batch 2 per device x 1 process(es) x accumulation 2 = 4 per optimiser step" in log
    assert "evaluation protocol: test split" in log and "| RGB | border crop 0 px |" in log and "window 11 px" in log
    assert "loss: pixel, perceptual, gradient, msssim | weighting softmax" in log
    rows = list(csv.DictReader(open(run / "history.csv")))
    assert [row["epoch"] for row in rows] == ["1", "2", "3"]
    assert abs(sum(float(rows[-1][f"w_{term}"]) for term in ("pixel", "perceptual", "gradient", "msssim")) - 1) < 1e-5
    # The learned softmax weights moved away from their seeded initial values (they are in the optimiser).
    initial = PhaseformerLoss("softmax", use_perceptual=False, seed=123).term_weights.raw_weights
    assert not torch.equal(checkpoint["loss_weighting"]["state"]["term_weights.raw_weights"][:, :1], initial[:, :1])



def test_tensorboard_has_the_losses_the_loss_weights_and_the_preview(runs):
    """--report_to defaults to tensorboard when it is installed: losses, learned weights, PSNR and images."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = runs["straight_dir"] / "checkpoint" / "LSUI" / "logs" / "LSUI"
    events = EventAccumulator(str(logs)).Reload()
    tags = events.Tags()
    assert {"epoch/loss", "epoch/w_pixel", "epoch/w_L", "epoch/psnr", "epoch/ssim"} <= set(tags["scalars"])
    assert [e.step for e in events.Scalars("epoch/loss")] == [2, 4, 6]  # logged at the optimiser step of each epoch end
    assert "test/preview" in tags["images"]


def test_resume_continues_the_lr_schedule_and_losses_exactly(runs):
    straight, first, resumed = runs["straight"], runs["first"], runs["resumed"]
    # 8 images / (2 x 2) = 2 optimiser steps per epoch; 1 epoch flat then 2 epochs linear decay to zero, per step.
    expected = [1e-3, 1e-3, 1e-3, 7.5e-4, 5e-4, 2.5e-4]
    np.testing.assert_allclose(straight["lr_per_step"], expected, rtol=1e-9)
    np.testing.assert_allclose(first["lr_per_step"] + resumed["lr_per_step"], expected, rtol=1e-9)
    assert resumed["step"] == straight["step"] == 6
    for key in ("loss", "loss_L", "loss_H", "perceptual_H", "w_pixel", "w_L", "psnr", "ssim"):
        np.testing.assert_allclose([r[key] for r in resumed["history"]], [r[key] for r in straight["history"]], rtol=1e-5, err_msg=key)
    a = torch.load(runs["straight_dir"] / "checkpoint/LSUI/netG_model_latest.pth", weights_only=True)
    b = torch.load(runs["paused_dir"] / "checkpoint/LSUI/netG_model_latest.pth", weights_only=True)
    for name, tensor in a["model"].items():
        torch.testing.assert_close(b["model"][name], tensor, rtol=1e-5, atol=1e-6)
    # The note's spellings (--grad_accum, --lr) are stored under the house names and come back from the checkpoint.
    assert b["config"]["gradient_accumulation_steps"] == 2 and b["config"]["learning_rate"] == 1e-3
    assert b["config"]["vgg_weights"] == a["config"]["vgg_weights"]


def test_resume_refuses_to_change_the_model(runs, lsui):
    checkpoint = runs["paused_dir"] / "checkpoint/LSUI/netG_model_epoch_1.pth"
    args = train.parse_args(["--resume", str(checkpoint), "--dataset_path", str(lsui), "--model", "phaseformer"])
    with pytest.raises(UserError, match="was trained with --model phaseformer_tiny, not phaseformer"):
        train.main(args)


def test_inference_reproduces_the_training_metrics_and_writes_a_csv(runs, lsui, tmp_path):
    run = runs["straight_dir"] / "checkpoint" / "LSUI"
    best = torch.load(run / "netG_model_best.pth", weights_only=True)
    report = infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(run / "netG_model_best.pth"), "--input",
                                          str(lsui / "test" / "input"), "--output_dir", str(tmp_path), "--gt_dir",
                                          str(lsui / "test" / "gt"), "--device", "cpu"]))
    assert len(report["metrics"]) == 4 and len(report["written"]) == 8
    assert Image.open(tmp_path / "L" / "chelsea_00000.png").size == (16, 16)
    assert Image.open(tmp_path / "H" / "chelsea_00000.png").size == (32, 32)
    # The same enhancement function as the training evaluation: the same numbers.
    trained = next(row for row in best["history"] if row["epoch"] == best["best_epoch"])
    assert report["mean_psnr"] == pytest.approx(trained["psnr"], abs=1e-4)
    assert report["mean_ssim"] == pytest.approx(trained["ssim"], abs=1e-5)
    rows = list(csv.reader(open(tmp_path / "metrics.csv")))
    assert rows[0] == ["name", "psnr", "ssim"] and rows[-1][0] == "mean" and len(rows) == 6
    # metrics.csv keeps 4 decimals: rounding up to 5e-5 dB (measured 3.3e-5); 5e-4 is 10x the worst case.
    assert float(rows[-1][1]) == pytest.approx(report["mean_psnr"], abs=5e-4)


def test_any_image_size_and_tiles_cover_every_pixel(tmp_path):
    class Identity(torch.nn.Module):
        """Stands in for the model: L is the input, H its nearest-neighbour 2x, so tiling must give them back."""

        def forward(self, x, return_high=True):
            return PhaseformerOutput(x, F.interpolate(x, scale_factor=2, mode="nearest") if return_high else None)

    image = torch.rand(1, 3, 37, 23)
    low, high = enhance(Identity(), image, tile=16, tile_overlap=6)
    torch.testing.assert_close(low, image)
    torch.testing.assert_close(high, F.interpolate(image, scale_factor=2, mode="nearest"))
    torch.manual_seed(0)
    model = build_phaseformer("phaseformer_tiny").eval()
    tiled = enhance(model, image, tile=16, tile_overlap=6)
    assert tiled.fake_b_L.shape == (1, 3, 37, 23) and tiled.fake_b_H.shape == (1, 3, 74, 46)
    assert 0 <= float(tiled.fake_b_L.min()) and float(tiled.fake_b_H.max()) <= 1


def test_converted_official_weights_run_in_the_signed_range(tmp_path):
    import importlib.util

    torch.manual_seed(0)
    source = build_phaseformer("phaseformer_tiny", eca="phase").eval()
    official = tmp_path / "best_state.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}, official)
    spec = importlib.util.spec_from_file_location("convert_phaseformer", ROOT / "scripts" / "convert_phaseformer.py")
    converter = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(converter)
    converted = tmp_path / "phaseformer.safetensors"
    converter.main(converter.parse_args([str(official), str(converted)]))
    model, info = load_phaseformer_for_inference(converted)
    assert info["value_range"] == "signed" and info["eca"] == "phase"
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        expected_low, expected_high = source(x * 2 - 1)
    low, high = enhance(model, x, value_range=info["value_range"])
    torch.testing.assert_close(low, ((expected_low + 1) / 2).clamp(0, 1))
    torch.testing.assert_close(high, ((expected_high + 1) / 2).clamp(0, 1))
    Image.fromarray((x[0].permute(1, 2, 0).numpy() * 255).astype(np.uint8)).save(tmp_path / "odd.png")
    report = infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(converted), "--input", str(tmp_path / "odd.png"),
                                          "--output_dir", str(tmp_path / "out"), "--outputs", "H", "--device", "cpu"]))
    assert [p.name for p in report["written"]] == ["odd.png"] and Image.open(report["written"][0]).size == (48, 32)


def test_training_starts_from_converted_weights(lsui, tmp_path):
    torch.manual_seed(1)
    source = build_phaseformer("phaseformer_tiny", eca="phase")
    torch.save(source.state_dict(), tmp_path / "weights.pth")  # a plain state dict: configuration from the shapes
    result = train.main(train.parse_args(["--dataset_path", str(lsui), *TINY, "--batch_size", "4", "--niter", "1",
                                          "--niter_decay", "0", "--lr", "1e-12", "--eca", "phase", "--no_perceptual",
                                          "--init_weights", str(tmp_path / "weights.pth"), "--output_dir", str(tmp_path)]))
    trained = torch.load(result["run_dir"] / "netG_model_latest.pth", weights_only=True)["model"]
    for name, tensor in source.state_dict().items():
        torch.testing.assert_close(trained[name], tensor, rtol=0, atol=1e-8)
    assert "initial weights: " in (result["run_dir"] / "train.log").read_text()


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(lsui, tmp_path, monkeypatch):
    class ExplodingLoss(PhaseformerLoss):
        calls = 0

        def forward(self, *args, **kwargs):
            total, logs = super().forward(*args, **kwargs)
            ExplodingLoss.calls += 1
            return (total * float("nan"), logs) if ExplodingLoss.calls >= 3 else (total, logs)

    import recipes.phaseformer

    monkeypatch.setattr(recipes.phaseformer, "PhaseformerLoss", ExplodingLoss)  # the family's builder makes the loss
    args = train.parse_args(["--dataset_path", str(lsui), "--batch_size", "4", "--niter", "2", "--niter_decay", "0",
                             *TINY, "--no_perceptual", "--output_dir", str(tmp_path)])
    with pytest.raises(UserError, match=r"loss became nan by optimiser step 3; nothing was saved over the last good checkpoint"):
        train.main(args)
    latest = torch.load(tmp_path / "checkpoint/LSUI/netG_model_latest.pth", weights_only=True)
    assert latest["epoch"] == 1 and not (tmp_path / "checkpoint/LSUI/netG_model_epoch_2.pth").exists()


def test_flags_reference_behaviour_and_schedule():
    args = train.parse_args(["--dataset_path", "x"])
    assert {k: getattr(args, k) for k in train.CORRECT_BEHAVIOUR} == train.CORRECT_BEHAVIOUR
    args = train.parse_args(["--dataset_path", "x", "--reference_behaviour", "--eca", "feature"])
    assert {k: getattr(args, k) for k in train.REFERENCE_BEHAVIOUR} == {**train.REFERENCE_BEHAVIOUR, "eca": "feature"}
    assert "loss_weighting" in args.given_flags and "train_batch_size" not in args.given_flags
    cosine = train.parse_args(["--dataset_path", "x", "--niter", "1", "--niter_decay", "2", "--lr_schedule", "cosine", "--warmup", "0.5"])
    factors = [train.lr_factor(step, 4, cosine.warmup, cosine.niter, cosine.niter_decay, cosine.lr_schedule) for step in range(12)]
    np.testing.assert_allclose(factors[:4], [0.5, 1.0, 1.0, 1.0])  # warm-up over half an epoch (2 steps)
    np.testing.assert_allclose(factors[4:], [0.5 * (1 + np.cos(np.pi * k / 8)) for k in range(8)])
    with pytest.raises(SystemExit):
        train.parse_args(["--batch_size", "2"])  # no --dataset_path and nothing to resume


def one_line_error(capsys, main) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert exit_info.value.code == 2 and "Traceback" not in err
    assert lines[-1].startswith("error: ") and sum(line.startswith("error: ") for line in lines) == 1, err
    return lines[-1]


def write_pair(root: Path, split: str, stem: str, partner: bool = True) -> None:
    for folder in ("input", "gt") if partner else ("input",):
        (root / split / folder).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((16, 16, 3), 100, np.uint8)).save(root / split / folder / f"{stem}.png")


def test_bad_input_is_one_line_in_process(tmp_path, capsys, monkeypatch, lsui):
    def train_on(root, *extra):
        return lambda: train.main(train.parse_args(["--dataset_path", str(root), *TINY, "--batch_size", "2",
                                                    "--output_dir", str(tmp_path / "out"), "--no_perceptual", *extra]))

    unpaired = tmp_path / "unpaired"
    for stem in "abc":
        write_pair(unpaired, "train", stem)
        write_pair(unpaired, "test", stem)
    write_pair(unpaired, "train", "lonely", partner=False)
    assert "Input image" in (line := one_line_error(capsys, train_on(unpaired))) and "lonely.png has no ground truth" in line

    unreadable = tmp_path / "unreadable"
    for stem in "abcd":
        write_pair(unreadable, "train", stem)
    write_pair(unreadable, "test", "a")
    (unreadable / "train" / "input" / "b.png").write_bytes(b"not an image")
    assert "Cannot read image" in (line := one_line_error(capsys, train_on(unreadable))) and "b.png" in line

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no VGG weights in the hub cache
    argv = ["--dataset_path", str(lsui), *TINY, "--output_dir", str(tmp_path / "v")]
    line = one_line_error(capsys, lambda: train.main(train.parse_args(argv)))
    assert "needs ImageNet VGG16 weights" in line and "--vgg_weights PATH" in line and "--no_perceptual" in line

    ddpm = tmp_path / "ddpm_last.pt"
    torch.save({"kind": "ddpm", "model": {}, "config": {}}, ddpm)
    line = one_line_error(capsys, train_on(lsui, "--resume", str(ddpm)))
    assert "is a 'ddpm' checkpoint, but train_phaseformer.py --resume_from_checkpoint needs a 'phaseformer' checkpoint" in line


def test_bad_input_is_one_line_from_the_command_line(tmp_path):
    no_test = tmp_path / "LSUI"
    for stem in "ab":
        write_pair(no_test, "train", stem)
    result = run_in_process("train_phaseformer.py", "--dataset_path", str(no_test), *TINY, "--no_perceptual", cwd=tmp_path)
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 2 and "Traceback" not in result.stderr and len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "has neither test/input + test/gt (LSUI layout)" in lines[0]
    ddpm = tmp_path / "ddpm_last.pt"
    torch.save({"kind": "ddpm", "model": {}}, ddpm)
    result = run_in_process("infer.py", "phaseformer", "--checkpoint", str(ddpm), "--input", str(no_test / "train" / "input"),
                        "--output_dir", str(tmp_path / "out"), "--device", "cpu")
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"error: {ddpm} is a 'ddpm' checkpoint, but infer.py phaseformer needs a 'phaseformer' checkpoint from "
        "train_phaseformer.py or official weights converted by scripts/convert_phaseformer.py."
    ]


def test_single_folder_split_is_saved_and_inference_scores_its_test_lines(lsui, tmp_path):
    pairs = tmp_path / "pairs"
    for folder in ("input", "gt"):
        (pairs / folder).mkdir(parents=True)
        for split in ("train", "test"):
            for image in (lsui / split / folder).iterdir():
                shutil.copy(image, pairs / folder / image.name)
    result = train.main(train.parse_args(["--dataset_path", str(pairs), *TINY, "--batch_size", "4", "--niter", "1",
                                          "--niter_decay", "0", "--test_split", "3", "--no_perceptual", "--output_dir", str(tmp_path)]))
    split_file = result["run_dir"] / "split_0_pairs.txt"
    from data.paired import read_split_file

    train_stems, test_stems = read_split_file(split_file)
    assert len(test_stems) == 3 and len(train_stems) == 9 and not set(train_stems) & set(test_stems)
    assert f"split file {split_file} (3 pairs; 9 training pairs)" in (result["run_dir"] / "train.log").read_text()
    report = infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(result["run_dir"] / "netG_model_latest.pth"),
                                          "--input", str(pairs / "input"), "--gt_dir", str(pairs / "gt"), "--split_file",
                                          str(split_file), "--output_dir", str(tmp_path / "out"), "--outputs", "L", "--device", "cpu"]))
    assert sorted(row["name"] for row in report["metrics"]) == sorted(test_stems)
    assert report["mean_psnr"] == pytest.approx(result["history"][-1]["psnr"], abs=1e-4)
