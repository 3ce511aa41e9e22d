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

source scripts/lib/launch_on_gpus.sh
CONFIG="${CONFIG:-configs/phaseformer_lsui.yaml}"
launch_on_gpus train_phaseformer.py --config "$CONFIG" "$@"
