import random

import numpy as np
import pytest
import torch

from utils.checkpoint import (
    atomic_torch_save,
    atomic_write,
    capture_rng_state,
    find_latest_checkpoint,
    load_checkpoint,
    load_state_file,
    resolve_resume,
    restore_rng_state,
    rotate_checkpoints,
)
from utils.errors import CheckpointError
from utils.training import keeping_configured_learning_rates, keeping_optimizer_implementation


def test_atomic_save_round_trip(tmp_path):
    state = {"kind": "ddpm", "model": {"w": torch.arange(6.0).reshape(2, 3)}, "step": 7, "config": {"lr": 1e-4}}
    atomic_torch_save(state, tmp_path / "a.pt")
    loaded = load_checkpoint(tmp_path / "a.pt", "ddpm")
    torch.testing.assert_close(loaded["model"]["w"], state["model"]["w"])
    assert loaded["step"] == 7 and loaded["config"] == {"lr": 1e-4}


def test_crash_while_saving_keeps_the_last_good_checkpoint(tmp_path):
    target = tmp_path / "ddpm_last.pt"
    atomic_torch_save({"kind": "ddpm", "step": 1}, target)

    def crashing_writer(tmp):
        tmp.write_bytes(b"half a checkpoint")
        raise KeyboardInterrupt  # the process is killed mid-write

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crashing_writer)
    assert load_checkpoint(target, "ddpm")["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm_last.pt"]  # no temporary left behind


def test_wrong_kind_and_foreign_files_are_one_line_errors(tmp_path):
    atomic_torch_save({"kind": "phaseformer"}, tmp_path / "p.pt")
    with pytest.raises(CheckpointError, match="is a 'phaseformer' checkpoint, but infer.py needs a 'ddpm'"):
        load_checkpoint(tmp_path / "p.pt", "ddpm", "infer.py")
    torch.save({"weight": torch.zeros(1)}, tmp_path / "bare.pt")
    with pytest.raises(CheckpointError, match="not a checkpoint written by this repository"):
        load_checkpoint(tmp_path / "bare.pt", "ddpm")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match="not a torch checkpoint or a .safetensors file"):
        load_checkpoint(tmp_path / "notes.txt", "ddpm")
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pt", "ddpm")


class Pickled:
    pass


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"kind": "ddpm", "net": Pickled()}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_state_file(tmp_path / "pickled.pt")


def test_rotation_keeps_the_newest_numbers(tmp_path):
    for epoch in (1, 2, 10, 20, 3):
        (tmp_path / f"ddpm_epoch_{epoch}.pt").write_bytes(b"x")
    removed = rotate_checkpoints(tmp_path, "ddpm_epoch_*.pt", keep=2)
    assert sorted(p.name for p in removed) == ["ddpm_epoch_1.pt", "ddpm_epoch_2.pt", "ddpm_epoch_3.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddpm_epoch_10.pt", "ddpm_epoch_20.pt"]
    assert rotate_checkpoints(tmp_path, "ddpm_epoch_*.pt", keep=0) == []


def test_latest_is_the_newest_written(tmp_path):
    import os

    assert resolve_resume("latest", tmp_path, ["*.pt"]) is None
    for index, name in enumerate(["ddpm_epoch_10.pt", "ddpm_last.pt", "ddpm_epoch_5.pt"]):
        (tmp_path / name).write_bytes(b"x")
        os.utime(tmp_path / name, ns=(10**18 + index * 10**9, 10**18 + index * 10**9))
    assert find_latest_checkpoint(tmp_path, ["ddpm_last.pt", "ddpm_epoch_*.pt"]).name == "ddpm_epoch_5.pt"
    with pytest.raises(CheckpointError, match="--resume_from_checkpoint nope.pt"):
        resolve_resume("nope.pt", tmp_path, ["*.pt"])


def test_rng_state_round_trip_through_a_safe_checkpoint(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    atomic_torch_save({"kind": "x", "rng": capture_rng_state()}, tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_state(load_checkpoint(tmp_path / "rng.pt", "x")["rng"])
    assert random.random() == expected[0]
    assert np.random.rand() == expected[1]
    torch.testing.assert_close(torch.rand(3), expected[2])


def test_a_resumed_optimiser_keeps_this_runs_fused_choice():
    """PyTorch takes every param-group option from a saved optimiser state, fused/foreach included; a run resumed from
    a checkpoint of the unfused path must stay fused (as this run built it) and still get the saved moments."""
    model = torch.nn.Linear(4, 4)
    earlier = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    earlier.step()
    saved = earlier.state_dict()
    assert saved["param_groups"][0]["fused"] is None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    with keeping_optimizer_implementation(optimizer):
        optimizer.load_state_dict(saved)
    assert optimizer.param_groups[0]["fused"] is True
    assert float(optimizer.state[model.weight]["step"]) == 1.0
    torch.testing.assert_close(optimizer.state[model.weight]["exp_avg"], earlier.state[model.weight]["exp_avg"])


def warmup_run(lr: float, steps: int):
    """An AdamW with a 4-step linear warm-up (LambdaLR, as the trainers build it) after ``steps`` optimiser steps."""
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / 5))
    for _ in range(steps):
        optimizer.step()
        schedule.step()
    return optimizer, schedule


@pytest.mark.parametrize("wrapped", [False, True])
def test_a_learning_rate_given_on_resume_replaces_the_checkpoints(wrapped, caplog):
    """Optimiser and schedule states both carry the saved run's rates; the rate this run was given (recorded in its
    config) must be the one it trains with, at the schedule's factor for the restored step, and the change logged."""
    from accelerate.scheduler import AcceleratedScheduler

    saved_optimizer, saved_schedule = warmup_run(2e-3, steps=2)  # factor 3/5 at step 2
    for new_rate, expected in ((5e-4, 5e-4 * 3 / 5), (2e-3, 2e-3 * 3 / 5)):  # a new rate; the same rate (no flag)
        optimizer, schedule = warmup_run(new_rate, steps=0)
        handle = AcceleratedScheduler(schedule, optimizer) if wrapped else schedule
        caplog.clear()
        with caplog.at_level("INFO"), keeping_configured_learning_rates(optimizer, handle):
            optimizer.load_state_dict(saved_optimizer.state_dict())
            schedule.load_state_dict(saved_schedule.state_dict())
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected) and schedule.get_last_lr() == [optimizer.param_groups[0]["lr"]]
        assert schedule.base_lrs == [new_rate] and optimizer.param_groups[0]["initial_lr"] == new_rate
        schedule.step()  # the warm-up goes on from the restored step, on this run's base rate
        assert optimizer.param_groups[0]["lr"] == pytest.approx(new_rate * 4 / 5)
        assert ("0.002 -> 0.0005" in caplog.text) == (new_rate != 2e-3)


def test_stale_temporaries_of_a_killed_save_are_removed_with_a_log_note(tmp_path):
    from utils.checkpoint import remove_stale_temporaries
    from utils.log import setup_logger

    run = tmp_path / "run"
    (run / "checkpoints" / ".checkpoint-4.tmp").mkdir(parents=True)  # a folder checkpoint's staging folder
    (run / ".netG_model_latest.pth.k2j3.tmp").write_bytes(b"")  # atomic_write's temporary name, 0 bytes after SIGKILL
    (run / "checkpoints" / ".last.ckpt.abcd.tmp").write_bytes(b"half")
    kept = run / "netG_model_latest.pth"
    kept.write_bytes(b"good")
    logger = setup_logger(run)
    for handler in logger.handlers:
        handler.flush()
    log = (run / "train.log").read_text()
    assert sorted(p.name for p in run.rglob("*") if p.name.endswith(".tmp")) == [] and kept.exists()
    assert log.count("removed ") == 3 and "left by a save that was killed before it finished" in log
    assert remove_stale_temporaries(run) == []


def test_checkpoint_folders_are_ordered_rotated_and_published_by_step(tmp_path):
    """diffusers-style checkpoint-<step>/ folders: by step number (10 after 9), temporary and foreign names hidden."""
    from utils.checkpoint import (
        checkpoint_folders,
        latest_checkpoint_folder,
        publish_checkpoint_folder,
        rotate_checkpoint_folders,
        staging_folder,
    )

    for name in ("checkpoint-9", "checkpoint-10", "checkpoint-100", ".checkpoint-200.tmp", "checkpoint-x", "logs"):
        (tmp_path / name).mkdir()
    (tmp_path / "checkpoint-300").write_text("a file, not a checkpoint")
    assert [p.name for p in checkpoint_folders(tmp_path)] == ["checkpoint-9", "checkpoint-10", "checkpoint-100"]
    assert latest_checkpoint_folder(tmp_path).name == "checkpoint-100" and latest_checkpoint_folder(tmp_path / "new") is None
    assert [p.name for p in rotate_checkpoint_folders(tmp_path, 2)] == ["checkpoint-9"] and not (tmp_path / "checkpoint-9").exists()
    assert rotate_checkpoint_folders(tmp_path, None) == []

    final = tmp_path / "checkpoint-100"  # published again over an existing folder: the new content replaces it whole
    staging = staging_folder(final)
    assert staging.name == ".checkpoint-100.tmp"
    staging.mkdir()
    (staging / "state.json").write_text("new")
    (final / "old.json").write_text("old")
    publish_checkpoint_folder(staging, final)
    assert sorted(p.name for p in final.iterdir()) == ["state.json"] and not staging.exists()
    assert not list(tmp_path.glob(".checkpoint-100.*"))
