#!/usr/bin/env bash
# The offline demo: set up .venv, build a small image set from scikit-image's sample photographs, train the
# tiny pixel DDPM on it for a few minutes (CPU is enough), and show where the sample grid and loss curve are.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh

OUT=demo_output
.venv/bin/python scripts/make_demo_data.py images "$OUT/data" --size 32 --count 256
.venv/bin/python train_ddpm_highres.py --config configs/ddpm_demo.yaml
.venv/bin/python infer.py ddpm --model "$OUT/checkpoints/demo_32x32/ddpm_final.pt" --samples 16 --sampler ddpm --steps 250 \
  --output "$OUT/infer_samples.png"

echo
echo "demo finished:"
echo "  sample grid    $OUT/checkpoints/samples/demo_32x32/epoch_$(.venv/bin/python -c 'import yaml; print(yaml.safe_load(open("configs/ddpm_demo.yaml"))["epochs"])')_samples.png"
echo "  loss curve     $(ls "$OUT"/checkpoints/samples/demo_32x32/loss_curve_epoch_*.png | tail -n 1)"
echo "  quick samples  $OUT/checkpoints/training_progress/demo_32x32/"
echo "  checkpoint     $OUT/checkpoints/demo_32x32/ddpm_final.pt"
echo "  infer.py ddpm  $OUT/infer_samples.png"
echo "  tensorboard    .venv/bin/tensorboard --logdir $OUT/checkpoints/demo_32x32/logs   (when tensorboard is installed)"
