#!/usr/bin/env bash
# Train Phaseformer on a GPU server: `accelerate launch`, one process (DDP) per visible GPU.
#
#   bash scripts/train_phaseformer.sh --dataset_path /data/LSUI
#   bash scripts/train_phaseformer.sh --dataset_path /data/LSUI /data/UIEB --train_batch_size 4 --gradient_accumulation_steps 2
#   bash scripts/train_phaseformer.sh --dataset_path /data/LSUI --resume_from_checkpoint latest   # continue the run
#   CUDA_VISIBLE_DEVICES=0,1 bash scripts/train_phaseformer.sh --dataset_path /data/LSUI  # two of the GPUs
#   CONFIG=configs/phaseformer_reference.yaml bash scripts/train_phaseformer.sh --dataset_path /data/LSUI
#
# Every argument goes to train_phaseformer.py after --config $CONFIG (default configs/phaseformer_lsui.yaml:
# the note's 256 px, batch 8 per GPU, 50 + 500 epochs at lr 1e-3 with warm-up); flags override the preset.
# --train_batch_size (alias --batch_size) is per GPU: the log's first lines give the total per optimiser step.
# Checkpoints: ./checkpoint/<dataset name>/netG_model_epoch_N.pth (or under --output_dir).
# The perceptual loss needs torchvision's vgg16-397923af.pth in ~/.cache/torch/hub/checkpoints/ or --vgg_weights PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
CONFIG="${CONFIG:-configs/phaseformer_lsui.yaml}"
GPUS="${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$GPUS" -lt 1 ]; then
  echo "error: no CUDA GPU is visible; on a CPU run: $PYTHON train_phaseformer.py --config $CONFIG --device cpu ..." >&2
  exit 2
fi
MULTI=()
if [ "$GPUS" -gt 1 ]; then MULTI=(--multi_gpu); fi
echo "training on $GPUS GPU(s) with $CONFIG"
# Mixed precision is chosen by the script (--mixed_precision auto: bf16 where supported, else fp16).
exec "$PYTHON" -m accelerate.commands.launch ${MULTI[@]+"${MULTI[@]}"} --num_processes "$GPUS" --num_machines 1 \
  --mixed_precision no --dynamo_backend no \
  train_phaseformer.py --config "$CONFIG" "$@"
