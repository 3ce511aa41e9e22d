"""The shared vocabulary (utils/cli.py), the resume rule (utils/resume.py), progress off a terminal and tensorboard.

Every command line of the users' notes (quoted in docs/) for the DDPM, Phaseformer and user-generation trainers must parse to the same
settings as before, now under the house names; --help lists each old spelling as an alias.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pytest
import torch

import train_ddpm_highres
import train_dit_user
import train_phaseformer
from tests.launch import two_node_launch
from utils.cli import add_training_arguments, upgrade_saved_config
from utils.config import ArgumentParser, explicitly_given, parse_with_config
from utils.errors import CheckpointError
from utils.resume import resolve_resumed_config

ROOT = Path(__file__).resolve().parents[1]


def settings(args, *names):
    return {name: getattr(args, name) for name in names}


# ------------------------------------------------------------------------------------ the spec's command lines
def test_ddpm_spec_command_lines():
    args = train_ddpm_highres.parse_args(["--dataset", "cifar10", "--size", "64"])
    assert settings(args, "dataset", "size", "mixed_precision", "compile") == {
        "dataset": "cifar10", "size": 64, "mixed_precision": "auto", "compile": True}
    args = train_ddpm_highres.parse_args(["--dataset", "cifar10", "--size", "64", "--no-amp", "--no-compile"])
    assert (args.mixed_precision, args.compile) == ("no", False)
    args = train_ddpm_highres.parse_args(["--size", "64", "--resume", "latest", "--batch_size", "8", "--lr", "1e-3",
                                          "--warmup_steps", "2", "--grad_clip", "0.5", "--workers", "2", "--keep_last", "3"])
    assert settings(args, "resume_from_checkpoint", "train_batch_size", "learning_rate", "lr_warmup_steps", "max_grad_norm",
                    "dataloader_num_workers", "checkpoints_total_limit") == {
        "resume_from_checkpoint": "latest", "train_batch_size": 8, "learning_rate": 1e-3, "lr_warmup_steps": 2,
        "max_grad_norm": 0.5, "dataloader_num_workers": 2, "checkpoints_total_limit": 3}
    # An alias counts as its house flag for the resume rule.
    assert {"train_batch_size", "learning_rate", "lr_warmup_steps", "resume_from_checkpoint"} <= set(args.given_flags)
    assert train_ddpm_highres.parse_args(["--dataset", "imagenet", "--size", "96"]).size == 96  # the note's STL-10 command


def test_phaseformer_spec_command_lines():
    args = train_phaseformer.parse_args(["--dataset_path", "/data/LSUI", "--batch_size", "8", "--niter", "50", "--niter_decay",
                                         "500", "--lr", "0.001"])
    assert settings(args, "dataset_path", "train_batch_size", "niter", "niter_decay", "learning_rate") == {
        "dataset_path": ["/data/LSUI"], "train_batch_size": 8, "niter": 50, "niter_decay": 500, "learning_rate": 0.001}
    args = train_phaseformer.parse_args(["--resume", "checkpoint/LSUI/netG_model_epoch_100.pth", "--dataset_path", "/data/LSUI"])
    assert args.resume_from_checkpoint == "checkpoint/LSUI/netG_model_epoch_100.pth"
    args = train_phaseformer.parse_args(["--dataset_path", "x", "--threads", "4", "--grad_accum", "2", "--clip_grad", "0.5"])
    assert (args.dataloader_num_workers, args.gradient_accumulation_steps, args.max_grad_norm) == (4, 2, 0.5)
    assert args.compile is False  # one default for every trainer but the DDPM (its note turns compile on)


def test_user_generation_spec_command_line():
    args = train_dit_user.parse_args([
        "--latent_dir", "/kaggle/working/latent_features", "--output_dir", "/kaggle/working/trained_models",
        "--batch_size", "32", "--max_epochs", "100", "--lr", "1e-4", "--devices", "2", "--precision", "16-mixed"])
    assert settings(args, "train_batch_size", "max_epochs", "learning_rate", "num_processes", "mixed_precision") == {
        "train_batch_size": 32, "max_epochs": 100, "learning_rate": 1e-4, "num_processes": 2, "mixed_precision": "fp16"}
    args = train_dit_user.parse_args(["--latent_dir", "x", "--num_workers", "2", "--keep_last", "1", "--grad_clip", "0.3",
                                      "--precision", "bf16-mixed"])
    assert (args.dataloader_num_workers, args.checkpoints_total_limit, args.max_grad_norm, args.mixed_precision) == (2, 1, 0.3, "bf16")
    assert train_dit_user.parse_args(["--latent_dir", "x", "--precision", "32"]).mixed_precision == "no"


@pytest.mark.parametrize("module, aliases", [
    (train_ddpm_highres, ["--batch_size", "--lr", "--warmup_steps", "--grad_clip", "--workers", "--resume", "--keep_last"]),
    (train_phaseformer, ["--batch_size", "--grad_accum", "--lr", "--clip_grad", "--threads", "--resume", "--keep_last"]),
    (train_dit_user, ["--batch_size", "--lr", "--grad_clip", "--num_workers", "--resume", "--keep_last", "--devices"]),
])
def test_help_lists_the_house_names_and_the_aliases_as_such(module, aliases, monkeypatch):
    monkeypatch.setenv("COLUMNS", "1000")  # one line per flag: argparse wraps at the terminal's width
    text = module.build_parser().format_help()
    for house in ("--train_batch_size", "--learning_rate", "--max_grad_norm", "--mixed_precision", "--resume_from_checkpoint",
                  "--checkpoints_total_limit", "--checkpointing_minutes", "--report_to", "--compile, --no-compile", "--seed",
                  "--dataloader_num_workers", "--output_dir", "--device"):
        assert house in text, house
    for alias in aliases:
        assert any(f"[alias: {alias}" in line or ("alias: " in line and f" {alias}" in line) for line in text.splitlines()), alias
    assert "--precision P" in text and "alias of --mixed_precision" in text and "--no-amp" in text


def test_bad_house_values_are_one_line(capsys):
    for argv, message in ((["--train_batch_size", "0"], "--train_batch_size must be at least 1, got 0"),
                          (["--lr", "-1"], "--learning_rate must be positive"),
                          (["--mixed_precision", "fp8"], "'fp8' is not one of"),
                          (["--keep_last", "-2"], "--checkpoints_total_limit must not be negative")):
        with pytest.raises(SystemExit) as exit_info:
            train_ddpm_highres.parse_args(argv)
        lines = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


# ---------------------------------------------------------------------------------------------- presets
def make_parser():
    parser = ArgumentParser()
    add_training_arguments(parser, defaults=dict(train_batch_size=8, learning_rate=1e-4, mixed_precision="auto", compile=True,
                                                 max_grad_norm=1.0, report_to="none"))
    return parser


def test_presets_take_house_names_and_aliases(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("batch_size: 4\nlr: 3.0e-4\nprecision: 32\nno-compile: true\ngrad_clip: 0.5\n")
    args = parse_with_config(make_parser(), ["--config", str(preset)])
    assert settings(args, "train_batch_size", "learning_rate", "mixed_precision", "compile", "max_grad_norm") == {
        "train_batch_size": 4, "learning_rate": 3e-4, "mixed_precision": "no", "compile": False, "max_grad_norm": 0.5}
    preset.write_text("precision: 16-mixed\nno-amp: false\ncompile: true\n")
    parser = make_parser()
    args = parse_with_config(parser, ["--config", str(preset)])
    assert (args.mixed_precision, args.compile) == ("fp16", True)
    assert explicitly_given(parser, ["--config", str(preset)], str(preset)) == {"mixed_precision", "compile"}
    preset.write_text("mixed_precision: fp64\n")
    with pytest.raises(Exception, match="fp64"):
        parse_with_config(make_parser(), ["--config", str(preset)])


# ------------------------------------------------------------------------------------------ the resume rule
def test_resume_rule_inherits_what_was_not_given_and_refuses_fixed_changes():
    args = argparse.Namespace(size=16, learning_rate=None, epochs=10, device="cpu", model="tiny", resume_from_checkpoint="x.pt")
    saved = {"size": 16, "learning_rate": 2e-3, "epochs": 3, "device": "cuda", "model": "tiny", "resume_from_checkpoint": None,
             "only_in_the_checkpoint": 1}
    config = resolve_resumed_config(args, {"epochs", "device", "resume_from_checkpoint"}, saved, fixed=("size", "model"))
    assert settings(config, "learning_rate", "epochs", "device", "resume_from_checkpoint") == {
        "learning_rate": 2e-3, "epochs": 10, "device": "cpu", "resume_from_checkpoint": "x.pt"}
    assert not hasattr(config, "only_in_the_checkpoint") and args.learning_rate is None  # args is not modified
    args.size = 32
    with pytest.raises(CheckpointError, match=r"x\.pt was trained with --size 16, not 32; resume without --size"):
        resolve_resumed_config(args, {"size"}, saved, fixed=("size", "model"), source="x.pt")
    # Checkpoints written before the house names resume under them.
    old = {"batch_size": 8, "lr": 1e-3, "grad_accum": 2, "clip_grad": 0.5, "threads": 4, "keep_last": 2, "amp": False}
    assert upgrade_saved_config(old) == {"train_batch_size": 8, "learning_rate": 1e-3, "gradient_accumulation_steps": 2,
                                         "max_grad_norm": 0.5, "dataloader_num_workers": 4, "checkpoints_total_limit": 2,
                                         "mixed_precision": "no"}


# ------------------------------------------------------------------------------------- progress off a terminal
def test_progress_is_plain_lines_when_the_output_is_not_a_terminal(capsys, monkeypatch):
    from utils.log import TrainingProgress, setup_logger

    monkeypatch.setenv("PROGRESS", "lines")  # as in a Kaggle log or `> train.log`
    setup_logger(None)
    progress = TrainingProgress(100, "epoch 1/1")
    for step in range(100):
        progress.update(torch.tensor(1.0 / (step + 1)), 1e-3)
    progress.close()
    captured = capsys.readouterr()
    lines = [line for line in captured.out.splitlines() if line.startswith("epoch 1/1 step")]
    assert len(lines) == 10 and lines[-1].startswith("epoch 1/1 step 100/100 | loss 0.0100")
    assert "\r" not in captured.err + captured.out
    # A long epoch (hours at 256 px) still shows a line every LINE_SECONDS, checked at every refresh.
    monkeypatch.setattr("utils.log.LINE_SECONDS", 0.0)
    progress = TrainingProgress(1000, "epoch 1/1")
    for _ in range(30):
        progress.update(torch.tensor(1.0), 1e-3)
    assert len([line for line in capsys.readouterr().out.splitlines() if "step" in line]) == 3  # steps 10, 20, 30


# ---------------------------------------------------------------------------------------------- tensorboard
def test_report_to_tensorboard_writes_losses_lr_and_sample_grids(demo_images, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = train_ddpm_highres.parse_args([
        "--dataset", "folder", "--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--size", "16", "--model", "tiny",
        "--train_batch_size", "4", "--effective_batch", "4", "--epochs", "2", "--num_samples", "4", "--sample_steps", "2",
        "--quick_every", "0", "--device", "cpu", "--report_to", "tensorboard"])
    result = train_ddpm_highres.main(args)
    events = EventAccumulator(str(tmp_path / "folder_16x16" / "logs" / "folder_16x16")).Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/lr", "epoch/loss"} <= set(scalars)
    assert [e.step for e in events.Scalars("train/loss")] == [10]  # every 10 optimiser steps; 12 steps in all
    np.testing.assert_allclose([e.value for e in events.Scalars("epoch/loss")], result["history"], rtol=1e-6)
    assert "samples/epoch_2_samples" in events.Tags()["images"]


# ----------------------------------------------------------------------------------------- multi-node launch
@pytest.mark.slow
def test_two_node_launch_on_cpu_machines_is_one_job(demo_images, tmp_path):
    """Two ``torchrun --nnodes 2 --nproc_per_node 1`` launches (as on two CPU machines) train as one job of two
    processes, not as two independent copies (accelerate picks no distributed type for one CUDA-less local process
    unless told to use the CPU). Every trainer takes its Accelerator from the same function (the next test), and
    trains as two processes in its Kaggle cells (tests/test_kaggle_cells.py)."""
    flags = ["--dataset", "folder", "--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--size", "16", "--model",
             "tiny", "--train_batch_size", "4", "--effective_batch", "8", "--epochs", "1", "--quick_every", "0", "--num_samples", "2",
             "--sample_steps", "2", "--report_to", "none"]
    outputs = two_node_launch("train_ddpm_highres.py", flags)
    assert "batch 4 x 2 processes x accumulation 1 = effective 8" in outputs[0][0]
    checkpoint = torch.load(tmp_path / "folder_16x16/ddpm_final.pt", weights_only=True)
    assert checkpoint["num_processes"] == 2 and checkpoint["step"] == 3  # 24 images / (4 per process x 2 processes)
    assert len(checkpoint["rng"]) == 2  # one RNG state per process


def test_every_trainer_takes_its_accelerator_from_create_accelerator():
    """The two-node case above holds for every trainer only if none builds an ``Accelerator`` of its own."""
    import ast

    for path in sorted(ROOT.glob("train_*.py")) + sorted((ROOT / "recipes").glob("*.py")) + sorted((ROOT / "utils").glob("*.py")):
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", None)
                 for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Call)}
        if path.name.startswith("train_"):
            assert "create_accelerator" in calls, f"{path.name} does not call utils.accelerator.create_accelerator"
        assert "Accelerator" not in calls or path.name == "accelerator.py", f"{path.name} builds an Accelerator itself"
