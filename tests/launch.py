"""Launching a trainer as two ``torchrun`` nodes on this machine, as on two CPU servers (used by several test files).

Two ``torchrun --nnodes 2 --nproc_per_node 1`` launches meet at ``127.0.0.1`` on a free port and must train as one job
of two processes (gloo), with no GPU visible and ``--device auto``: the case in which accelerate, left alone, picks no
distributed type and each node silently trains its own copy.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


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
