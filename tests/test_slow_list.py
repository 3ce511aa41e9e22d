"""``tests/slow_tests.txt`` names only tests that exist, so ``pytest -m "not slow"`` deselects what it says it does."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_slow_entry_names_an_existing_test():
    entries = [line.strip() for line in (ROOT / "tests/slow_tests.txt").read_text().splitlines()]
    missing = []
    for entry in entries:
        if not entry or entry.startswith("#"):
            continue
        path, _, function = entry.partition("::")
        source = ROOT / path
        if not source.is_file() or (function and not re.search(rf"^def {re.escape(function)}\(", source.read_text(), re.M)):
            missing.append(entry)
    assert not missing, f"tests/slow_tests.txt names tests that do not exist: {missing}"
