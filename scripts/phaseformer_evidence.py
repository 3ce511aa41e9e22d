"""Evidence for Phaseformer on CPU: synthetic underwater pairs, a fixed training budget, one run per setting.

Builds the synthetic underwater set of ``data/underwater.py`` (physically based degradation of scikit-image's
photographs; the test split uses photographs the training split never sees), then trains the official-size
``phaseformer`` preset with ``train_phaseformer.py`` once per setting and reports, on the held-out split, the
PSNR/SSIM of the degraded inputs and of the enhanced L outputs (BasicSR-equivalent, RGB, 8-bit), with the final
loss weights of each run.

Settings (default): each loss weighting (softmax, softmax_frozen, uncertainty, fixed) with the standard ECA gate
(``feature``), and the official phase-pooled gate (``phase``) with the default softmax weighting; ``--full_grid``
runs every weighting with both gates. ``--with_reference`` adds a run with ``--reference_behaviour``.

Budget choices, all flags: 48 px images, 96 training and 24 test pairs, 12 epochs (6 flat + 6 linear decay),
batch 8, lr 1e-3 with one epoch of warm-up. The perceptual term is off (``--no_perceptual``: no ImageNet VGG
weights offline). The loss weights get their own learning rate of 0.02 (``--loss_weights_lr``): at the model's
1e-3 they would move by at most ~0.15 in the 144 optimiser steps of this budget, where a real LSUI run takes
~250k steps; the larger rate lets the short run show where each weighting drifts. About 3 minutes per run on 2
idle CPU cores (7 training images/s at 48 px), 20-40 minutes in all on a shared machine.

    python scripts/phaseformer_evidence.py                       # writes outputs/phaseformer_evidence/
    python scripts/phaseformer_evidence.py --epochs 4 --runs softmax:feature   # a quick look
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

import train_phaseformer  # noqa: E402
from data.underwater import build_synthetic_underwater  # noqa: E402
from losses.weighted import WEIGHTING_MODES  # noqa: E402
from models.phaseformer import ECA_GATES  # noqa: E402
from utils.config import ArgumentParser  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.validators import int_at_least, non_negative_float, positive_float, positive_int, seed  # noqa: E402

DEFAULT_RUNS = ["softmax:feature", "softmax_frozen:feature", "uncertainty:feature", "fixed:feature", "softmax:phase"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="outputs/phaseformer_evidence", help="data, runs and the table go here")
    parser.add_argument("--model", default="phaseformer", help="preset to train (default phaseformer, the official size)")
    parser.add_argument("--size", type=int_at_least(16), default=48, help="image side in pixels (default 48)")
    parser.add_argument("--train_count", type=positive_int, default=96, help="training pairs (default 96)")
    parser.add_argument("--test_count", type=positive_int, default=24, help="held-out test pairs (default 24)")
    parser.add_argument("--epochs", type=positive_int, default=12, help="epochs per run, half flat and half decaying (default 12)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="batch size (default 8)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="initial learning rate (default 1e-3, the note's)")
    parser.add_argument("--warmup", type=non_negative_float, default=1.0, help="warm-up epochs (default 1)")
    parser.add_argument("--loss_weights_lr", type=non_negative_float, default=0.02,
                        help="learning rate of the loss weights (default 0.02, see above)")
    parser.add_argument("--eval_every", type=positive_int, default=4, help="evaluate every N epochs and at the end (default 4)")
    parser.add_argument("--seed", type=seed, default=123, help="training seed, the same for every run (default 123)")
    parser.add_argument("--threads", type=positive_int, default=1,
                        help="CPU threads (default 1: on a machine shared with other jobs, waiting OpenMP threads make "
                        "every op much slower; 2 is ~1.5x faster on two idle cores)")
    parser.add_argument("--runs", nargs="+", default=None, metavar="WEIGHTING:ECA",
                        help=f"settings to run (default {' '.join(DEFAULT_RUNS)})")
    parser.add_argument("--full_grid", action="store_true", help="every weighting with both ECA gates (8 runs)")
    parser.add_argument("--with_reference", action="store_true", help="add a --reference_behaviour run")
    args = parser.parse_args(argv)
    if args.full_grid:
        args.runs = [f"{mode}:{gate}" for gate in ECA_GATES for mode in WEIGHTING_MODES]
    args.runs = list(args.runs or DEFAULT_RUNS)
    for run in args.runs:
        mode, _, gate = run.partition(":")
        if mode not in WEIGHTING_MODES or gate not in ECA_GATES:
            parser.error(f"--runs {run}: expected WEIGHTING:ECA with WEIGHTING in {WEIGHTING_MODES} and ECA in {ECA_GATES}")
    if args.with_reference:
        args.runs.append("reference")
    return args


def train_one(args, data_dir: Path, run: str) -> dict:
    """One training run through train_phaseformer.py's own parse_args and main; returns the table row."""
    flags = [
        "--dataset_path", str(data_dir), "--name", run.replace(":", "_"), "--output_dir", str(Path(args.out_dir) / "runs"),
        "--model", args.model, "--crop_size", str(args.size), "--eval_size", str(args.size), "--batch_size", str(args.batch_size),
        "--niter", str(args.epochs // 2), "--niter_decay", str(args.epochs - args.epochs // 2), "--lr", str(args.lr),
        "--warmup", str(args.warmup), "--eval_every", str(args.eval_every), "--seed", str(args.seed), "--no_perceptual",
        "--device", "cpu", "--keep_last", "1", "--save_every", str(args.epochs),
    ]
    if run == "reference":
        flags += ["--reference_behaviour"]
    else:
        mode, _, gate = run.partition(":")
        flags += ["--loss_weighting", mode, "--eca", gate, "--loss_weights_lr", str(args.loss_weights_lr)]
    started = time.perf_counter()
    result = train_phaseformer.main(train_phaseformer.parse_args(flags))
    final = result["history"][-1]
    return {
        "run": run,
        "input_psnr": result["input_scores"]["psnr"],
        "input_ssim": result["input_scores"]["ssim"],
        "psnr": final["psnr"],
        "ssim": final["ssim"],
        "best_psnr": result["best_psnr"],
        "weights": result["final_weights"],
        "minutes": (time.perf_counter() - started) / 60,
        "flags": flags,
    }


def markdown_table(rows: list[dict], args) -> str:
    lines = [
        f"Synthetic underwater pairs ({args.size} px, {args.train_count} train / {args.test_count} held-out test pairs from "
        f"unseen photographs), `{args.model}`, {args.epochs} epochs, batch {args.batch_size}, lr {args.lr:g}, "
        f"loss weights lr {args.loss_weights_lr:g}, no perceptual term, CPU. Metrics: RGB, 8-bit, no border crop, "
        "BasicSR SSIM (11 px Gaussian window), L output at the input resolution, last epoch.",
        "",
        "| weighting | ECA gate | input PSNR | input SSIM | output PSNR | output SSIM | best PSNR "
        "| final term weights (pixel / gradient / MS-SSIM) | L / H weights | minutes |",
        "|---|---|---:|---:|---:|---:|---:|---|---|---:|",
    ]
    for row in rows:
        mode, _, gate = row["run"].partition(":")
        if row["run"] == "reference":
            mode, gate = "reference behaviour (softmax_frozen)", "phase"
        w = row["weights"]
        lines.append(
            f"| {mode} | {gate} | {row['input_psnr']:.2f} | {row['input_ssim']:.4f} | {row['psnr']:.2f} | {row['ssim']:.4f} | "
            f"{row['best_psnr']:.2f} | {w['w_pixel']:.3f} / {w['w_gradient']:.3f} / {w['w_msssim']:.3f} | "
            f"{w['w_L']:.3f} / {w['w_H']:.3f} | {row['minutes']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> list[dict]:
    out_dir = Path(args.out_dir)
    data_dir = out_dir / "data"
    if not (data_dir / "train").is_dir():
        build_synthetic_underwater(data_dir, args.size, args.train_count, args.test_count, seed=0)
    elif not (data_dir / "degradation.json").is_file() or json.loads((data_dir / "degradation.json").read_text())["size"] != args.size:
        raise UserError(f"{data_dir} holds another synthetic set; delete it or pass another --out_dir.")
    torch.set_num_threads(args.threads)
    rows = []
    for run in args.runs:
        print(f"=== {run}", flush=True)
        rows.append(train_one(args, data_dir, run))
        (out_dir / "results.json").write_text(json.dumps(rows, indent=1))
        table = markdown_table(rows, args)
        (out_dir / "evidence.md").write_text(table)
    print()
    print(table)
    return rows


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
