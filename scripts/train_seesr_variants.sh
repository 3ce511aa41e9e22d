#!/usr/bin/env bash
# Train the SeeSR injector variants the users compare, one after the other, on a GPU server: by default every key of
# models.timestep_adaptive.INJECTORS (`python -m utils.registry models.timestep_adaptive INJECTORS` lists them: SeeSR
# itself, w(t) alone, s[level] * w(t)), into experience/<variant>/checkpoint-<step>/. Re-running the script resumes
# every variant from its newest checkpoint.
#
#   bash scripts/train_seesr_variants.sh
#   GPUS=0,1,2,3 DATA=datasets/DIV2K_HR bash scripts/train_seesr_variants.sh
#   VARIANTS="timestep_multiscale" EXTRA="--timestep_weights mlp --max_train_steps 20000" bash scripts/train_seesr_variants.sh
#   LR_DIR=datasets/pairs/LR DATA=datasets/pairs/HR bash scripts/train_seesr_variants.sh     # prepared LR/HR pairs
#   ROOT_FOLDERS=preset/datasets/training_datasets bash scripts/train_seesr_variants.sh   # SeeSR's prepared folders
#   SEESR=preset/models/seesr VARIANTS=timestep_multiscale bash scripts/train_seesr_variants.sh  # on SeeSR's release
#   EXTRA=--no_image_cross_attention bash scripts/train_seesr_variants.sh   # plain ControlNet, no RAM (earlier runs)
#
# Environment: SD2 (the SD2 base diffusers folder), DATA (HR images, degraded on the fly; or the HR half of prepared
# pairs with LR_DIR), ROOT_FOLDERS (SeeSR's gt/ sr_bicubic/ tag/ folders, comma-separated; replaces DATA), RAM (RAM's
# weights, default preset/models/ram_swin_large_14m.pth), DAPE (SeeSR's DAPE.pth, default preset/models/DAPE.pth when
# it exists), SEESR (start from SeeSR's release folder), VARIANTS, GPUS (comma-separated ids, default all visible),
# CONFIG (shared settings, default configs/seesr_sd2_base.yaml), EXPERIENCE (root of the run folders), EXTRA (more
# flags for every variant).
set -euo pipefail
cd "$(dirname "$0")/.."

SD2=${SD2:-preset/models/stable-diffusion-2-base}
DATA=${DATA:-preset/datasets/train_datasets/HR}
LR_DIR=${LR_DIR:-}
ROOT_FOLDERS=${ROOT_FOLDERS:-}
RAM=${RAM:-preset/models/ram_swin_large_14m.pth}
DAPE=${DAPE:-}
if [ -z "$DAPE" ] && [ -f preset/models/DAPE.pth ]; then
    DAPE=preset/models/DAPE.pth
fi
SEESR=${SEESR:-}
PYTHON=${PYTHON:-python}
# Every registered injector variant unless VARIANTS names some (the registry is the one list of them).
VARIANTS=${VARIANTS:-$($PYTHON -m utils.registry models.timestep_adaptive INJECTORS)}
CONFIG=${CONFIG:-configs/seesr_sd2_base.yaml}
EXPERIENCE=${EXPERIENCE:-experience}
EXTRA=${EXTRA:-}

if [ -n "${GPUS:-}" ]; then
    export CUDA_VISIBLE_DEVICES=$GPUS
fi
NUM_GPUS=$($PYTHON -c "import torch; print(max(1, torch.cuda.device_count()))")
LAUNCH=(accelerate launch --num_processes "$NUM_GPUS" --num_machines 1 --dynamo_backend no)
if [ "$NUM_GPUS" -gt 1 ]; then
    LAUNCH+=(--multi_gpu)
fi
if [ -n "$ROOT_FOLDERS" ]; then
    DATA_FLAGS=(--root_folders "$ROOT_FOLDERS")
elif [ -n "$LR_DIR" ]; then
    DATA_FLAGS=(--lr_dir "$LR_DIR" --hr_dir "$DATA")
else
    DATA_FLAGS=(--train_data_dir "$DATA")
fi
MODEL_FLAGS=(--ram_path "$RAM")
if [ -n "$DAPE" ]; then
    MODEL_FLAGS+=(--ram_ft_path "$DAPE")
fi
if [ -n "$SEESR" ]; then
    MODEL_FLAGS+=(--seesr_model_path "$SEESR")
fi

for variant in $VARIANTS; do
    echo "=== $variant: $NUM_GPUS process(es) -> $EXPERIENCE/$variant"
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    "${LAUNCH[@]}" train_seesr_timestep.py --config "$CONFIG" --pretrained_model_path "$SD2" "${DATA_FLAGS[@]}" "${MODEL_FLAGS[@]}" \
        --injector "$variant" --output_dir "$EXPERIENCE/$variant" --resume_from_checkpoint latest $EXTRA
done
