"""Shared fixtures: small offline data built once per session, a fixed seed for every test, the ``slow`` marks.

``scripts/test.sh`` runs the suite in two pytest-xdist workers with one intra-op thread each; on a machine whose
cores are busy with other jobs, run a serial ``pytest`` with ``OMP_NUM_THREADS=1`` too: intra-op threads that wait
for each other make the tiny ops of these tests 10-100x slower there. ``pytest -m "not slow"`` leaves out the tests
listed in ``tests/slow_tests.txt`` (processes, training runs, the app and the benches): the edit-run loop.
"""

from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def demo_images(tmp_path_factory):
    """A folder of 24 RGB crops (16 px) of scikit-image's sample photographs, in sub-folders."""
    from data.demo_data import build_demo_image_folder

    return build_demo_image_folder(tmp_path_factory.mktemp("demo_images"), size=16, count=24, seed=0)


def _slow_tests() -> tuple[set[str], set[str]]:
    """``tests/slow_tests.txt``: the files and test functions ``pytest -m "not slow"`` leaves out."""
    entries = [line.strip() for line in (Path(__file__).parent / "slow_tests.txt").read_text().splitlines()]
    entries = [line for line in entries if line and not line.startswith("#")]
    return {line for line in entries if "::" not in line}, {line for line in entries if "::" in line}


def pytest_configure(config):
    # One intra-op thread per xdist worker: two workers on two cores, each with two threads waiting on each other,
    # run these tiny ops many times slower. Subprocesses the tests start inherit the setting.
    if os.environ.get("PYTEST_XDIST_WORKER"):
        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


# Files whose tests run longest (processes, docs cells run as written, every bench): started first, so that the
# xdist workers end on short tests instead of one waiting for the other's long one. Each file stays in one block,
# so its module fixtures are built once per worker.
LONGEST_FIRST = ("tests/test_kaggle_cells.py", "tests/test_smoke_everything.py", "tests/test_train_dit_user.py",
                 "tests/test_eval_generation.py", "tests/test_train_seesr.py", "tests/test_cli.py")


def pytest_collection_modifyitems(config, items):
    first = {path: rank for rank, path in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: first.get(item.nodeid.split("::")[0], len(first)))  # stable: file order kept otherwise
    slow_files, slow_functions = _slow_tests()
    for item in items:
        path = item.nodeid.split("::")[0]
        if path in slow_files or item.nodeid.split("[")[0] in slow_functions:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
