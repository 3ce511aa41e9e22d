#!/usr/bin/env bash
# User-conditioned generation on a GPU server: extract VA-VAE latents once (if not done), then train on all GPUs.
#
#   DATA=/data/micro_doppler VAVAE=/models/vavae-imagenet256-f16d32-dinov2.pt OUT=/runs/user_dit \
#     bash scripts/train_dit_user.sh
#   ... bash scripts/train_dit_user.sh --model_size XL --init_from /models/lightningdit-xl-imagenet256-800ep.pt
#   ... bash scripts/train_dit_user.sh --backbone unet --learning_rate 1e-4      # the latent UNet instead
#   ... bash scripts/train_dit_user.sh --resume_from_checkpoint latest           # continue after an interruption
#   CUDA_VISIBLE_DEVICES=0,1 ... bash scripts/train_dit_user.sh                  # two of the GPUs
#
# DATA holds ID_1 ... ID_31 (or train/ and val/ holding them); latents go to $OUT/latent_features (skipped when
# train.safetensors is already there), the run to $OUT/trained_models. Every argument goes to train_dit_user.py after
# --config $CONFIG (default configs/user_dit_b.yaml: DiT-B, batch 32 per GPU, lr 1e-4, 100 epochs); flags override it.
# --num_processes is the number of visible GPUs: train_dit_user.py starts one DDP process per GPU itself.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
: "${DATA:?set DATA to the folder of ID_<n> user folders}"
: "${VAVAE:?set VAVAE to vavae-imagenet256-f16d32-dinov2.pt}"
OUT="${OUT:-runs/user_generation}"
CONFIG="${CONFIG:-configs/user_dit_b.yaml}"
GPUS="${GPUS:-$("$PYTHON" -c 'import torch; print(torch.cuda.device_count())')}"
if [ "$GPUS" -lt 1 ]; then
  echo "error: no CUDA GPU is visible; on a CPU run: $PYTHON train_dit_user.py --device cpu ..." >&2
  exit 2
fi

if [ ! -f "$OUT/latent_features/train.safetensors" ]; then
  "$PYTHON" scripts/extract_features.py --data_dir "$DATA" --vavae_path "$VAVAE" --output_path "$OUT/latent_features" \
    --batch_size 64
fi
echo "training on $GPUS GPU(s) with $CONFIG"
exec "$PYTHON" train_dit_user.py --config "$CONFIG" --latent_dir "$OUT/latent_features" --output_dir "$OUT/trained_models" \
  --vavae_path "$VAVAE" --num_processes "$GPUS" "$@"
