#!/usr/bin/env bash
# The users' comparison loop: super-resolve the same LR images with each variant's checkpoint, put one image of each
# side by side, score every variant against the ground truth, and plot the learned w(t).
#
#   bash scripts/compare_seesr_variants.sh
#   STEP=100000 GPU=1 LR=preset/datasets/test_datasets/DIV2K/LR GT=preset/datasets/test_datasets/DIV2K/HR \
#       bash scripts/compare_seesr_variants.sh
#
# Environment: SD2 (SD2 base diffusers folder), LR (test LR images), GT (their HR images; leave empty to skip the
# metrics), STEP (checkpoint-<STEP> of every run, default latest: each run's newest), GPU (CUDA_VISIBLE_DEVICES,
# default 0), VARIANTS, EXPERIENCE (run folders), RESULTS (output root), IMAGE (the file shown in the grid, default the
# first LR image), STEPS / GUIDANCE / PROCESS_SIZE (sampling), RAM / DAPE (RAM's weights and SeeSR's DAPE.pth, for
# checkpoints with image attention; defaults preset/models/ram_swin_large_14m.pth and preset/models/DAPE.pth when it
# exists), SEED (default 42, the same noise for every variant), EXTRA (more infer.py flags, e.g. tile sizes).
# Outputs: $RESULTS/<variant>/sample00/<name>.png (SeeSR's layout), $RESULTS/<variant>/metrics.csv, $RESULTS/comparison.png,
# $RESULTS/timestep_weights_visualization.png.
set -euo pipefail
cd "$(dirname "$0")/.."

SD2=${SD2:-preset/models/stable-diffusion-2-base}
LR=${LR:-preset/datasets/test_datasets/DIV2K/LR}
GT=${GT:-}
STEP=${STEP:-latest}
GPU=${GPU:-0}
PYTHON=${PYTHON:-python}
# Every registered injector variant unless VARIANTS names some (the registry is the one list of them).
VARIANTS=${VARIANTS:-$($PYTHON -m utils.registry models.timestep_adaptive INJECTORS)}
EXPERIENCE=${EXPERIENCE:-experience}
RESULTS=${RESULTS:-results}
STEPS=${STEPS:-50}
GUIDANCE=${GUIDANCE:-5.5}
PROCESS_SIZE=${PROCESS_SIZE:-512}
RAM=${RAM:-preset/models/ram_swin_large_14m.pth}
DAPE=${DAPE:-}
if [ -z "$DAPE" ] && [ -f preset/models/DAPE.pth ]; then
    DAPE=preset/models/DAPE.pth
fi
SEED=${SEED:-42}
EXTRA=${EXTRA:-}

checkpoint_of() {  # the run's checkpoint-$STEP, or its newest
    if [ "$STEP" = latest ]; then
        ls -d "$EXPERIENCE/$1"/checkpoint-* 2>/dev/null | sort -t- -k2 -n | tail -n 1
    else
        echo "$EXPERIENCE/$1/checkpoint-$STEP"
    fi
}

grid_inputs=()
for variant in $VARIANTS; do
    checkpoint=$(checkpoint_of "$variant")
    if [ -z "$checkpoint" ] || [ ! -d "$checkpoint" ]; then
        echo "error: no checkpoint for $variant in $EXPERIENCE/$variant (STEP=$STEP)" >&2
        exit 2
    fi
    echo "=== $variant: $checkpoint"
    # shellcheck disable=SC2086  # EXTRA is a list of flags
    CUDA_VISIBLE_DEVICES=$GPU $PYTHON infer.py seesr \
        --pretrained_model_path "$SD2" \
        --prompt '' \
        --seesr_model_path "$checkpoint" \
        --image_path "$LR" \
        --output_dir "$RESULTS/$variant" \
        --start_point lr \
        --num_inference_steps "$STEPS" \
        --guidance_scale "$GUIDANCE" \
        --process_size "$PROCESS_SIZE" --seed "$SEED" --ram_path "$RAM" ${DAPE:+--ram_ft_path "$DAPE"} $EXTRA
done

if [ -z "${IMAGE:-}" ]; then
    first=$(find "$LR" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.bmp' \
        -o -iname '*.tif' -o -iname '*.tiff' -o -iname '*.webp' \) | sort | head -n 1)
    if [ -n "$first" ]; then
        IMAGE=$(basename "${first%.*}").png
    else
        IMAGE=$(basename "${LR%.*}").png  # LR is a single image
    fi
fi
for variant in $VARIANTS; do
    grid_inputs+=("$RESULTS/$variant/sample00/$IMAGE")
done
$PYTHON scripts/create_comparison_grid.py --inputs "${grid_inputs[@]}" --output "$RESULTS/comparison.png"

if [ -n "$GT" ]; then
    for variant in $VARIANTS; do
        echo "=== metrics: $variant"
        $PYTHON scripts/eval_sr.py --results "$RESULTS/$variant" --gt "$GT" --crop_border 4
    done
fi

for variant in $VARIANTS; do
    checkpoint=$(checkpoint_of "$variant")
    if [ -d "$checkpoint/multi_scale_injector" ]; then
        $PYTHON scripts/plot_timestep_weights.py --checkpoint "$checkpoint" \
            --output "$RESULTS/timestep_weights_visualization_$variant.png"
    fi
done
