#!/usr/bin/env bash
# Train DAPE (SeeSR's stage 1; SeeSR's scripts/train_dape.sh) on a GPU server: `accelerate launch`, one process per GPU.
#
#   bash scripts/train_dape.sh --root_folders preset/datasets/train_datasets/training_for_dape
#   bash scripts/train_dape.sh --root_folders my_domain --ram_ft_path preset/models/DAPE.pth   # fine-tune the release
#   bash scripts/train_dape.sh --resume_from_checkpoint latest                                 # continue the run
#   CUDA_VISIBLE_DEVICES=0,1 bash scripts/train_dape.sh --root_folders ...                     # two of the GPUs
#
# Every argument goes to train_dape.py after --config $CONFIG (default configs/dape.yaml: SeeSR's dape.yaml,
# batch 8 per GPU, AdamW 1e-4 halved after 20k and 30k steps, 300k steps); flags override the preset. RAM's weights
# are read from preset/models/ram_swin_large_14m.pth (--ram_path). Outputs: experiments/DAPE/DAPE.pth (for
# infer.py seesr --ram_ft_path and train_seesr_timestep.py --ram_ft_path), checkpoints/, tag_agreement.json.
set -euo pipefail
cd "$(dirname "$0")/.."

source scripts/lib/launch_on_gpus.sh
CONFIG="${CONFIG:-configs/dape.yaml}"
launch_on_gpus train_dape.py --config "$CONFIG" "$@"
