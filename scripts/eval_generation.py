"""Score generated images the way generative-model papers do: FID, KID, Inception Score, precision/recall.

    python infer.py ddpm --model checkpoints/cifar10_32x32/ddpm_best.pt --output_dir samples/ddpm --samples 50000 --save_images
    python scripts/eval_generation.py --samples samples/ddpm --reference cifar10 --datasets_root data \\
        --inception_weights weights/weights-inception-2015-12-05-6726825d.pth
    python scripts/eval_generation.py --samples samples/ddpm --reference demo_output/data --inception_weights W.pth

Computed by torch-fidelity (``utils/generation_metrics.py``) with the TensorFlow-compatible InceptionV3 that
published FIDs use; its weight file is ``weights-inception-2015-12-05-6726825d.pth`` (what torch-fidelity downloads,
https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth),
read from ``--inception_weights``. ``--reference`` is a folder of real images or ``cifar10`` (CIFAR-10 train in
torchvision's layout under ``--datasets_root``). Reference features are cached in ``--cache_dir`` under a name that
changes when the folder changes, so evaluating checkpoint after checkpoint extracts them once.

Published FIDs use 50k samples against the full training set; fewer samples bias FID upwards (Binkowski et al.
2018), so compare only numbers computed with the same counts. Writes ``--out`` (JSON) with the values and counts.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.validators import output_file, positive_int, seed  # noqa: E402

METRIC_CHOICES = ("fid", "kid", "isc", "prc")
LABELS = {
    "frechet_inception_distance": "FID",
    "kernel_inception_distance_mean": "KID",
    "kernel_inception_distance_std": "KID std",
    "inception_score_mean": "IS",
    "inception_score_std": "IS std",
    "precision": "precision",
    "recall": "recall",
    "f_score": "F-score",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", required=True, help="folder of generated images (png/jpg, sub-folders included)")
    parser.add_argument(
        "--reference", default=None, help="folder of real images, or cifar10 / cifar10-val (torchvision layout under --datasets_root)"
    )
    parser.add_argument(
        "--inception_weights",
        default=None,
        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth (required; nothing is downloaded)",
    )
    parser.add_argument(
        "--metrics",
        nargs="+",
        choices=METRIC_CHOICES,
        default=list(METRIC_CHOICES),
        help="which metrics (default all: fid kid isc prc; isc alone needs no --reference)",
    )
    parser.add_argument("--datasets_root", default=None, help="folder holding cifar-10-batches-py/ (default data)")
    parser.add_argument(
        "--cache_dir", default=None, help="where reference features are cached (default <torch hub>/eval_generation_cache; 'none' disables)"
    )
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images per Inception forward (default 64)")
    parser.add_argument(
        "--kid_subset_size",
        type=positive_int,
        default=1000,
        help="KID subset size (default 1000 as published; lowered to the smaller set with a note)",
    )
    parser.add_argument("--kid_subsets", type=positive_int, default=100, help="KID subsets (default 100 as published)")
    parser.add_argument("--isc_splits", type=positive_int, default=10, help="Inception Score splits (default 10 as published)")
    parser.add_argument("--prc_neighborhood", type=positive_int, default=3, help="k of precision/recall (default 3 as published)")
    parser.add_argument("--seed", type=seed, default=2020, help="seed of KID subsets and IS splits (default 2020, torch-fidelity's)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto")
    parser.add_argument("--out", default=None, type=output_file, help="JSON with the values (default <samples>/generation_metrics.json)")
    parser.add_argument("--verbose", action="store_true", help="torch-fidelity's progress output")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    import torch

    from utils.accelerator import resolve_device
    from utils.generation_metrics import compute_generation_metrics, image_files

    device = resolve_device(args.device)
    if args.cache_dir is None:
        cache_dir = Path(torch.hub.get_dir()) / "eval_generation_cache"
    else:
        cache_dir = None if args.cache_dir.lower() == "none" else Path(args.cache_dir)
    values = compute_generation_metrics(
        args.samples,
        args.reference,
        args.inception_weights,
        tuple(args.metrics),
        batch_size=args.batch_size,
        device=str(device),
        cache_dir=cache_dir,
        datasets_root=args.datasets_root,
        kid_subset_size=args.kid_subset_size,
        kid_subsets=args.kid_subsets,
        prc_neighborhood=args.prc_neighborhood,
        isc_splits=args.isc_splits,
        seed=args.seed,
        verbose=args.verbose,
    )
    notes = values.pop("notes")
    report = {
        "samples": str(args.samples),
        "num_samples": len(image_files(Path(args.samples))),
        "reference": args.reference,
        "num_reference": len(image_files(Path(args.reference))) if args.reference and Path(args.reference).is_dir() else None,
        "inception_weights": str(args.inception_weights),
        "metrics": values,
        "notes": notes,
    }
    out = Path(args.out) if args.out else Path(args.samples) / "generation_metrics.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    for note in notes:
        print(f"note: {note}")
    counts = f"{report['num_samples']} samples" + (f" vs {args.reference}" if args.reference else "")
    print(f"{counts}: " + ", ".join(f"{LABELS.get(key, key)} {value:.4f}" for key, value in values.items()))
    print(f"written: {out}")
    return report


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
