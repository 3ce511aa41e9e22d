#!/usr/bin/env bash
# Every benchmark of the repository at the settings the README's tables use, each bounded in time.
# Usage: bash bench/run_all.sh [OUT_DIR]   (tables are printed and written to OUT_DIR/*.md)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_results}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1

run() {  # run NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  echo "== $name"
  timeout "$seconds" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/$name.md"
}

run ddpm 70 "$PY" bench/bench_ddpm.py --no-compile --batch 8 --train_steps 10 --warmup 3 --sample_batch 64
run dit_user 60 "$PY" bench/bench_dit_user.py --batch 32 --train_steps 10 --warmup 3 --sample_sizes B XL
run phaseformer 40 "$PY" bench/bench_phaseformer.py --batch 8 --train_steps 10 --warmup 3
run seesr_injector 70 "$PY" bench/bench_seesr_injector.py --repeats 30
run seesr_tiled_vae 600 "$PY" bench/bench_seesr_tiled_vae.py
run seesr_pipeline 900 "$PY" bench/bench_seesr_pipeline.py
