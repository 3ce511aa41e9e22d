"""utils.launch: ``--num_processes N`` as N processes through torch.distributed.run, their user errors as one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

import utils.launch as launch
from utils.errors import UserError


def test_launch_command_runs_the_script_through_torch_distributed_run(tmp_path):
    script = tmp_path / "train_x.py"
    command = launch.launch_command(script, ["--lr", "1"], 3)
    assert command[:2] == [sys.executable, "-c"] and "torch.distributed.run" in command[2]
    assert command[3:] == ["--standalone", "--nproc_per_node=3", str(script.resolve()), "--lr", "1"]


def fake_processes(monkeypatch, code: int, messages: dict[int, str]) -> list:
    """subprocess.run replaced: each process of ``messages`` leaves its line in the error folder; exit status ``code``."""
    calls = []

    def run(command, env):
        calls.append(command)
        for rank, message in messages.items():
            Path(env[launch.ERROR_DIR_ENV], f"rank{rank}.txt").write_text(message + "\n")
        return subprocess.CompletedProcess(command, code)

    monkeypatch.setattr(launch.subprocess, "run", run)
    return calls


def test_run_processes_reports_the_processes_error_once(monkeypatch, tmp_path):
    calls = fake_processes(monkeypatch, 0, {})
    assert launch.run_processes(tmp_path / "train_x.py", ["--a"], 2) == 0 and len(calls) == 1
    fake_processes(monkeypatch, 2, {0: "--init_from x does not match", 1: "--init_from x does not match"})
    with pytest.raises(UserError, match=r"^--init_from x does not match$"):
        launch.run_processes(tmp_path / "train_x.py", [], 2)
    fake_processes(monkeypatch, -6, {})
    with pytest.raises(UserError, match="a training process stopped with exit status -6"):
        launch.run_processes(tmp_path / "train_x.py", [], 2)


def test_cli_main_in_a_launched_process_leaves_the_line_for_the_parent(monkeypatch, tmp_path, capsys):
    def refuses():
        raise UserError("Traceback (most recent call last):\nDataError: no pairs in data/")

    monkeypatch.setenv(launch.ERROR_DIR_ENV, str(tmp_path))
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as exit_info:
        launch.cli_main(refuses)
    assert exit_info.value.code == 2 and capsys.readouterr().err == ""
    assert (tmp_path / "rank1.txt").read_text() == "no pairs in data/\n"
    launch.cli_main(lambda: 0)  # a finished process exits normally


def test_cli_main_from_the_command_line_prints_one_error_line(monkeypatch, capsys):
    def refuses():
        raise UserError("--lr must be positive")

    monkeypatch.delenv(launch.ERROR_DIR_ENV, raising=False)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert not launch.under_launcher()
    with pytest.raises(SystemExit) as exit_info:
        launch.cli_main(refuses)
    assert exit_info.value.code == 2 and capsys.readouterr().err == "error: --lr must be positive\n"


def test_process_kind():
    assert launch.process_kind("cpu", 4) == "CPU processes (gloo)"
    if torch.cuda.is_available():
        assert launch.process_kind("cuda", 1) == "GPUs"
        with pytest.raises(UserError, match="asks for more GPUs than"):
            launch.process_kind("auto", torch.cuda.device_count() + 1)
    else:
        assert launch.process_kind("auto", 2) == "CPU processes (gloo)"
        with pytest.raises(UserError, match="--device cuda: no CUDA GPU is visible"):
            launch.process_kind("cuda", 2)
