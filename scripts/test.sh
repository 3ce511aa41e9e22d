#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The evaluation extras (torch-fidelity, lpips, piq: small wheels, no new heavy dependencies) so that the metric
# tests run instead of skipping; pyiqa is not among them (see requirements-eval.txt).
.venv/bin/python -m pip install --quiet -r requirements-eval.txt
.venv/bin/python -m pytest "$@"
