"""Shared fixtures: small offline data built once per session, and a fixed seed for every test.

On a machine whose cores are busy with other jobs, run the suite with ``OMP_NUM_THREADS=1``: intra-op threads that
wait for each other make the tiny ops of these tests 10-100x slower there.
"""

from __future__ import annotations

import random

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


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
