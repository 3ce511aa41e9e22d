"""Running the programs' command lines in tests: in this process as ``__main__``, or as two ``torchrun`` nodes.

:func:`run_in_process` runs ``python SCRIPT ARGS`` inside the test process: the file executes as ``__main__`` with that
``sys.argv`` (runpy), so its ``if __name__ == "__main__"`` block, its one-line error handler and its exit status are
the real ones, without the several seconds a fresh interpreter spends importing torch and diffusers again. A program's
behaviour that needs a process of its own (torchrun, ``--num_processes``, a killed run) is tested with one.

Two ``torchrun --nnodes 2 --nproc_per_node 1`` launches meet at ``127.0.0.1`` on a free port and must train as one job
of two processes (gloo), with no GPU visible and ``--device auto``: the case in which accelerate, left alone, picks no
distributed type and each node silently trains its own copy.
"""

from __future__ import annotations

import contextlib
import io
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_in_process(script: str | Path, *args: str, cwd: str | Path = ROOT) -> subprocess.CompletedProcess:
    """``python script *args`` (a path relative to the repository, or absolute), run in this process from ``cwd``:
    its exit status and what it printed on stdout and stderr, as :func:`subprocess.run` would return them."""
    path = Path(script) if Path(script).is_absolute() else ROOT / script
    argv = [str(path), *map(str, args)]
    stdout, stderr = io.StringIO(), io.StringIO()
    saved_argv, saved_path, saved_cwd = sys.argv, list(sys.path), os.getcwd()
    status = 0
    try:
        sys.argv = argv
        os.chdir(cwd)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
            try:
                runpy.run_path(str(path), run_name="__main__")
            except SystemExit as stop:
                if isinstance(stop.code, str):  # sys.exit("message"): Python prints it and exits with 1
                    print(stop.code, file=sys.stderr)
                status = stop.code if isinstance(stop.code, int) else 0 if stop.code is None else 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(argv, status, stdout.getvalue(), stderr.getvalue())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def two_node_launch(script: str, flags: list[str], timeout: float = 600) -> list[tuple[str, str]]:
    """Run ``script`` as node 0 and node 1 of a two-node job; asserts both exit 0 and returns each (stdout, stderr)."""
    torchrun = Path(sys.executable).with_name("torchrun")
    port = free_port()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc_per_node", "1", "--node_rank", str(rank), "--master_addr",
                               "127.0.0.1", "--master_port", str(port), script, *flags],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for rank in (0, 1)]
    try:
        outputs = [node.communicate(timeout=timeout) for node in nodes]
    finally:
        for node in nodes:
            node.kill()
    assert all(node.returncode == 0 for node in nodes), outputs[0][1][-3000:] + outputs[1][1][-3000:]
    return outputs
