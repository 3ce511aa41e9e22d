#!/usr/bin/env bash
# Set up .venv if needed, then run the test suite (extra arguments go to pytest).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# The evaluation extras (torch-fidelity, lpips, piq: small wheels, no new heavy dependencies) so that the metric
# tests run instead of skipping; pyiqa is not among them (see requirements-eval.txt). The web demo's extras (gradio,
# gradio_client, selenium) so that app.py is tested everywhere; its browser tests also need Debian's chromium and
# chromium-driver, which .ci/run installs (elsewhere they skip and say why).
.venv/bin/python -m pip install --quiet -r requirements-eval.txt -r requirements-app.txt
# Two workers (pytest-xdist) with one intra-op thread each on a 2-core machine; up to 4 where there are more cores.
# Pass -n 0 to run serially, -m "not slow" for the fast edit-run subset; the 15 slowest tests are listed at the end.
OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" .venv/bin/python -m pytest -n auto --maxprocesses 4 --dist worksteal --durations=15 "$@"
