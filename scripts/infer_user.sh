#!/usr/bin/env bash
# Generate spectrograms for chosen users from a train_dit_user.py checkpoint (the training-time sampler).
#
#   VAVAE=/models/vavae-imagenet256-f16d32-dinov2.pt bash scripts/infer_user.sh /runs/user_dit/trained_models/checkpoints/best.ckpt \
#     --user_ids 1 2 3 4 5 --num_samples_per_user 16
#   ... bash scripts/infer_user.sh CKPT --user_ids 7 --num_samples_per_user 200 --start_index 200   # 200 more, new seeds
#   ... bash scripts/infer_user.sh CKPT --guidance_scale 6.0 --num_steps 500                         # the note's "poor samples" advice
#
# Writes $OUT (default generated_images/): micro_doppler_userXX_NNN.png, user_XX/generated_NNN.png,
# micro_doppler_grid.png and manifest.json. Sampling defaults (Euler 250, shift 0.3, guidance 4 from t = 0.11) come
# from the checkpoint; every flag of `infer.py user --help` can follow the checkpoint path.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
if [ $# -lt 1 ]; then
  echo "usage: VAVAE=... bash scripts/infer_user.sh CHECKPOINT [infer.py user flags]" >&2
  exit 2
fi
: "${VAVAE:?set VAVAE to the VA-VAE file the latents were extracted with}"
CHECKPOINT="$1"
shift
exec "$PYTHON" infer.py user --dit_checkpoint "$CHECKPOINT" --vavae_path "$VAVAE" --output_dir "${OUT:-generated_images}" "$@"
