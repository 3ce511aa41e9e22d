"""The tree is ruff clean under the settings in pyproject.toml (line length 140, rules E, F, W, I, B, UP)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_check_passes():
    pytest.importorskip("ruff", reason="ruff is not installed (pip install -r requirements.txt)")
    result = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "."], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, f"ruff check . failed:\n{result.stdout}{result.stderr}"
