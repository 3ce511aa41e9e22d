#!/usr/bin/env bash
# Create .venv (Python 3.10+) and install requirements.txt into it. Safe to run again: pip skips what is there.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-python3}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "error: $PYTHON is missing or older than Python 3.10; set PYTHON=/path/to/python3.10+ and run again." >&2
  exit 2
fi
if [ ! -x .venv/bin/python ]; then
  echo "creating .venv with $("$PYTHON" --version)"
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -r requirements.txt
echo "environment ready: .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__, "| CUDA" if torch.cuda.is_available() else "| CPU only")'))"
