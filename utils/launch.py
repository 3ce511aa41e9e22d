"""``--num_processes N`` (``--devices N``): a trainer re-launched as N processes through torch.distributed.run.

The trainer's ``launch(argv)`` checks its flags and files once in the parent, then calls :func:`run_processes` with
its own script path; its ``__main__`` runs :func:`cli_main`. Every process writes a user error (one line) into a folder
the parent reads, and torchrun ends quietly, so a mistake found inside the processes reaches the user as one
``error:`` line instead of one per process plus torchrun's ChildFailedError traceback. Started directly under torchrun
or ``accelerate launch`` (no such folder), each process reports its own errors.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from utils.errors import UserError, one_line, run_cli

ERROR_DIR_ENV = "TRAINER_ERROR_DIR"  # where launched processes leave their one-line user errors for the parent
# torch.distributed.run, but ending quietly when a process fails: the parent reports the process's own message once,
# instead of every process printing it and torchrun adding a ChildFailedError traceback.
_QUIET_TORCHRUN = (
    "import logging, sys\n"
    "from torch.distributed.elastic.multiprocessing.errors import ChildFailedError\n"
    "from torch.distributed.run import main\n"
    "for name in list(logging.root.manager.loggerDict):\n"
    "    if name.startswith('torch.distributed.elastic'):\n"
    "        logging.getLogger(name).disabled = True\n"
    "try:\n"
    "    main(sys.argv[1:])\n"
    "except ChildFailedError as err:\n"
    "    sys.exit(next((f.exitcode for f in err.failures.values() if f.exitcode), 1))\n"
)


def under_launcher() -> bool:
    """True inside torchrun / accelerate launch (they set LOCAL_RANK and WORLD_SIZE)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_kind(device: str, processes: int) -> str:
    """What ``processes`` processes run on for ``--device``: ``"GPUs"`` or ``"CPU processes (gloo)"``.

    A UserError when ``--device cuda`` finds no GPU or there are fewer GPUs than processes.
    """
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    use_cuda = device != "cpu" and torch.cuda.is_available()
    if use_cuda and processes > torch.cuda.device_count():
        raise UserError(f"--num_processes {processes} asks for more GPUs than the {torch.cuda.device_count()} visible; "
                        "lower --num_processes (--devices).")
    return "GPUs" if use_cuda else "CPU processes (gloo)"


def launch_command(script: str | Path, argv: list[str], processes: int) -> list[str]:
    """``torch.distributed.run --standalone --nproc_per_node N SCRIPT ARGV`` (without its failure traceback)."""
    return [sys.executable, "-c", _QUIET_TORCHRUN, "--standalone", f"--nproc_per_node={processes}",
            str(Path(script).resolve()), *argv]


def run_processes(script: str | Path, argv: list[str], processes: int) -> int:
    """Run ``processes`` copies of ``script``; a user error in any of them becomes one UserError here."""
    with tempfile.TemporaryDirectory(prefix="trainer_errors_") as error_dir:
        env = dict(os.environ, **{ERROR_DIR_ENV: error_dir})
        code = subprocess.run(launch_command(script, argv, processes), env=env).returncode
        if code == 0:
            return 0
        messages = []
        for file in sorted(Path(error_dir).glob("rank*.txt")):
            message = file.read_text().strip()
            if message and message not in messages:
                messages.append(message)
    if messages:
        raise UserError(messages[0])  # every process checks the same things: one message, once
    raise UserError(f"a training process stopped with exit status {code}; its message or traceback is above.")


def start_processes(script: str | Path, argv: list[str], processes: int, device: str, check: Callable[[], object]) -> int:
    """``--num_processes N`` outside a launcher: ``check()`` once here (every flag, path and file), then N copies.

    The checks run in the parent so that a user error is printed once, before any process starts.
    """
    where = process_kind(device, processes)
    check()
    print(f"starting {processes} {where} with torch.distributed.run", flush=True)
    return run_processes(script, argv, processes)


def cli_main(launch: Callable[[], object]) -> None:
    """A trainer's ``__main__``: one ``error:`` line for a user error, also from a process :func:`run_processes` started."""
    error_dir = os.environ.get(ERROR_DIR_ENV)
    if not (error_dir and under_launcher()):
        # Directly under torchrun each process reports its own error (one may be alone in it, e.g. out of memory).
        run_cli(launch)
        return

    def in_process() -> None:
        try:
            launch()
        except UserError as err:  # started by --num_processes N: the parent prints it, once
            Path(error_dir, f"rank{os.environ.get('RANK', '0')}.txt").write_text(one_line(str(err)) + "\n")
            sys.exit(2)

    run_cli(in_process)
