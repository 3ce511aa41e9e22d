#!/usr/bin/env bash
# Enhance a folder (or one image) with a Phaseformer checkpoint on a GPU server, with PSNR/SSIM when ground truth is given.
#
#   bash scripts/infer_phaseformer.sh CHECKPOINT INPUT OUTPUT_DIR [GT_DIR] [more infer.py phaseformer flags]
#   bash scripts/infer_phaseformer.sh checkpoint/LSUI/netG_model_best.pth /data/LSUI/test/input results/LSUI /data/LSUI/test/gt
#   bash scripts/infer_phaseformer.sh phaseformer_uieb.safetensors photos/ results/photos "" --outputs L --tile 512
#
# CHECKPOINT: a netG_model_*.pth from train_phaseformer.py or official weights converted by
# scripts/convert_phaseformer.py. Writes OUTPUT_DIR/L/ (input size), OUTPUT_DIR/H/ (2x) and, with GT_DIR,
# OUTPUT_DIR/metrics.csv (per image and the mean). Inference runs on one GPU (pick it with CUDA_VISIBLE_DEVICES);
# large images: --tile 512. The training evaluation protocol at 256 px: --resize 256.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$#" -lt 3 ]; then
  echo "usage: bash scripts/infer_phaseformer.sh CHECKPOINT INPUT OUTPUT_DIR [GT_DIR] [flags]" >&2
  exit 2
fi
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
CHECKPOINT="$1"; INPUT="$2"; OUTPUT_DIR="$3"; shift 3
GT=()
if [ "$#" -gt 0 ]; then
  if [ -n "$1" ]; then GT=(--gt_dir "$1"); fi
  shift
fi
exec "$PYTHON" infer.py phaseformer --checkpoint "$CHECKPOINT" --input "$INPUT" --output_dir "$OUTPUT_DIR" ${GT[@]+"${GT[@]}"} "$@"
