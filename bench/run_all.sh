#!/usr/bin/env bash
# Every benchmark of the repository at the settings the README's and docs/benchmarks.md's tables use, each bounded
# in time, then the GPU-marked tests.
#
# Usage: bash bench/run_all.sh [OUT_DIR [ROW ...]]   (tables are printed and written to OUT_DIR/ROW.md; rows named
#        after OUT_DIR run alone, in the order given; without names every row runs)
#
# The side-by-side rows read the reference code from local checkouts (never committed), skipped with one line when
# absent:
#   DIFFUSERS_EXAMPLES  the examples/ folder of github.com/huggingface/diffusers (default outputs/refs/diffusers_examples)
#   LIGHTNINGDIT_REPO   a checkout of github.com/hustvl/LightningDiT (default outputs/refs/LightningDiT; needs pip
#                       install einops torchdiffeq)
#   SEESR_REPO          a checkout of github.com/cswry/SeeSR (default outputs/refs/SeeSR), run by SEESR_PYTHON (default
#                       outputs/refs/seesr-venv/bin/python: a venv with diffusers==0.21.0 transformers==4.36.2
#                       huggingface_hub==0.20.3 tokenizers==0.15.2 einops, and this repository's torch)
# outputs/ is git-ignored: copy the checkouts there to carry them to a GPU machine with the working tree.
#
# On a GPU lent for a few minutes (10 per command, 15 in all), the rows still empty in docs/benchmarks.md, as two
# commands whose time limits add up to under 10 minutes each (most rows end well before their limit):
#   bash bench/run_all.sh bench_results/gpu ddpm_vs_diffusers dit_vs_lightningdit throughput            # <= 580 s
#   bash bench/run_all.sh bench_results/gpu loop_overhead throughput_fp16 ddpm seesr_injector degradations gpu_tests  # <= 570 s
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_results}"
shift || true
ROWS=("$@")
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
DIFFUSERS_EXAMPLES="${DIFFUSERS_EXAMPLES:-outputs/refs/diffusers_examples}"
LIGHTNINGDIT_REPO="${LIGHTNINGDIT_REPO:-outputs/refs/LightningDiT}"
SEESR_REPO="${SEESR_REPO:-outputs/refs/SeeSR}"
SEESR_PYTHON="${SEESR_PYTHON:-outputs/refs/seesr-venv/bin/python}"

wanted() {  # wanted NAME: true when no rows were named or NAME is one of them
  [ ${#ROWS[@]} -eq 0 ] && return 0
  local row
  for row in "${ROWS[@]}"; do [ "$row" = "$1" ] && return 0; done
  return 1
}

run() {  # run NAME SECONDS COMMAND...
  local name=$1 seconds=$2
  shift 2
  wanted "$name" || return 0
  echo "== $name"
  timeout "$seconds" "$@" 2>&1 | grep -v -E "it/s\]|s/it\]" | tee "$OUT/$name.md"
}

# The README's tables (fixed small batches).
run ddpm 90 "$PY" bench/bench_ddpm.py --no-compile --batch 8 --train_steps 10 --warmup 3 --sample_batch 64
run ddpm_compile 180 "$PY" bench/bench_ddpm.py --sizes 32 64 --batch 64 --train_steps 20 --warmup 5 --skip_sampling
run dit_user 60 "$PY" bench/bench_dit_user.py --batch 32 --train_steps 10 --warmup 3 --sample_sizes B XL
run phaseformer 40 "$PY" bench/bench_phaseformer.py --batch 8 --train_steps 10 --warmup 3
run seesr_injector 120 "$PY" bench/bench_seesr_injector.py --repeats 30 --tile_rounds 1
run seesr_tiled_vae 600 "$PY" bench/bench_seesr_tiled_vae.py
run seesr_pipeline 900 "$PY" bench/bench_seesr_pipeline.py
run degradations 60 "$PY" bench/bench_degradations.py --rounds 3

# Issue 13: side by side with the references, loop overhead, throughput at the batch users get, fast samplers.
run ddpm_vs_diffusers 150 "$PY" bench/bench_ddpm_vs_diffusers.py --diffusers_examples "$DIFFUSERS_EXAMPLES" \
  --size 32 --preset 32 --batch 128 --images 3072 --rounds 2 --workers 8
run loop_overhead 90 "$PY" bench/bench_loop_overhead.py --size 32 --preset 32 --batch 128 --images 3072 --rounds 2 \
  --workers 8
run dit_vs_lightningdit 150 "$PY" bench/bench_dit_vs_lightningdit.py --lightningdit_repo "$LIGHTNINGDIT_REPO" \
  --size B --batch 32 --train_steps 10 --rounds 3 --compile
run loop_overhead_families 120 "$PY" bench/bench_loop_overhead_families.py --rounds 3 --workers 8
# Issue 19: infer.py seesr against SeeSR's test_seesr.py / test_seesr_turbo.py on the CPU (ours alone without a checkout).
run seesr_vs_reference 900 "$PY" bench/bench_seesr_vs_reference.py --reference_checkout "$SEESR_REPO" \
  --reference_python "$SEESR_PYTHON" --rounds 3 --images 2
run throughput 280 "$PY" bench/bench_throughput.py --models ddpm32 ditB --batch probe --probe_limit 512 \
  --compile_modes none default --train_steps 20 --warmup 5
run throughput_fp16 90 "$PY" bench/bench_throughput.py --models ddpm32 ditB --batch 64 --precision fp16 \
  --compile_modes none --train_steps 20 --warmup 5
# Needs a trained checkpoint (docs/benchmarks.md: the tiny demo model); skipped without one.
SAMPLER_CHECKPOINT="${SAMPLER_CHECKPOINT:-outputs/refs/sampler_model.pt}"
if [ -f "$SAMPLER_CHECKPOINT" ]; then
  run fast_samplers 900 "$PY" bench/bench_fast_samplers.py --checkpoint "$SAMPLER_CHECKPOINT" --samples 64 --batch 64
fi
run latent_samplers 300 "$PY" bench/bench_latent_samplers.py
run dit_samplers 1800 "$PY" bench/bench_dit_samplers.py --samples_per_user 60
run latent_unet_vs_note 600 "$PY" bench/bench_latent_unet_vs_note.py --rounds 3

# The GPU-marked tests (skipped without a GPU).
run gpu_tests 120 "$PY" -m pytest -m gpu -q -p no:cacheprovider
