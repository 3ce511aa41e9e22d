"""Where the pixel DDPM trainer's time goes beyond the bare forward/backward: EMA, data, logging, progress.

    python bench/bench_loop_overhead.py                               # CPU or GPU: tiny UNet, 32 px, batch 16
    python bench/bench_loop_overhead.py --size 32 --preset 32 --batch 128 --rounds 3 --workers 8     # a GPU's setting
    python bench/bench_loop_overhead.py --smoke

Rows, on the same model configuration and batch (``bench/bench_ddpm_vs_diffusers.py`` has the pieces), in each
round the four bare variants stepping in turn (one step each, then the next, so a load spike on a shared machine
hits them alike), then the trainer: the bare step (forward, loss, backward, clipping, fused AdamW as the trainer, one
batch resident on the device); the same with PyTorch's default AdamW (``foreach``; the trainer used it on the CPU
before); the bare step plus our EMA update (``utils.ema.EMA``, one ``torch._foreach_lerp_``); the bare step plus
diffusers' ``EMAModel.step`` (``foreach``, what the EMA update was before); and ``train_ddpm_highres.py`` whole,
timed per step on its progress bar (data loading and flips, EMA, the loss kept on the device, a tracker scalar every
10 steps). Each row's ratio to the bare step is the overhead (the target: the whole loop at most 5% over bare); the
optimiser and EMA columns time those parts alone inside each step. Prints a Markdown table; not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_ddpm_vs_diffusers import make_bare_step, run_ours  # noqa: E402
from bench.common import bench_device, median  # noqa: E402
from data.demo_data import build_demo_image_folder  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--preset", default="tiny", help="UNet preset (default tiny; 32 = the paper's CIFAR-10 network)")
    parser.add_argument("--batch", type=int, default=16, help="batch per step (default 16)")
    parser.add_argument("--images", type=int, default=192, help="images in the generated folder (default 192)")
    parser.add_argument("--epochs", type=int, default=1, help="trainer epochs per round (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each epoch not counted (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="the trainer's data loader workers (default 0)")
    parser.add_argument("--report_to", choices=("tensorboard", "none"), default="tensorboard",
                        help="the trainer's tracker (default tensorboard, its default)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.preset, args.batch, args.images, args.rounds, args.device = 16, "tiny", 8, 32, 1, "cpu"
        args.report_to = "none"
    return args


def main(args: argparse.Namespace) -> dict:
    device, dtype, precision = bench_device(args.device, args.precision)
    work = Path(tempfile.mkdtemp(prefix="bench_loop_overhead_"))
    folder = build_demo_image_folder(work / "images", size=args.size, count=args.images)
    steps = max(args.images // args.batch - args.skip, 1)
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | UNet '{args.preset}' at "
          f"{args.size} px | batch {args.batch} | {args.rounds} rounds | logs in {work}\n")
    variants = {
        "bare (fused AdamW, as the trainer)": dict(),
        "bare, PyTorch's default AdamW (foreach)": dict(fused=False),
        "bare + EMA, ours (foreach lerp)": dict(ema="lerp"),
        "bare + EMA, diffusers EMAModel.step (foreach)": dict(ema="diffusers"),
    }
    steppers = {name: make_bare_step(args, device, dtype, **options) for name, options in variants.items()}
    parts: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
    trainer: list[float] = []
    for _ in range(args.rounds):
        for index in range(steps + args.skip):  # the bare variants step by step in turn: load spikes hit them alike
            for name, step in steppers.items():
                result = step()
                if index >= args.skip:
                    parts[name].append(result)
        trainer += run_ours(folder, work, args, precision)
    bare = median([p[0] for p in parts["bare (fused AdamW, as the trainer)"]])
    print("| step | median s per step | img/s | optimiser ms | EMA ms | timings (steps; epochs on a GPU for the trainer) | over bare |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    seconds = {}
    for name, results in parts.items():
        seconds[name] = median([r[0] for r in results])
        print(f"| {name} | {seconds[name]:.4f} | {args.batch / seconds[name]:.1f} | {1e3 * median([r[1] for r in results]):.1f} | "
              f"{1e3 * median([r[2] for r in results]):.1f} | {len(results)} | {100 * (seconds[name] / bare - 1):+.1f}% |")
    seconds["train_ddpm_highres.py"] = median(trainer)
    print(f"| train_ddpm_highres.py (whole loop) | {seconds['train_ddpm_highres.py']:.4f} | "
          f"{args.batch / seconds['train_ddpm_highres.py']:.1f} | | | {len(trainer)} | "
          f"{100 * (seconds['train_ddpm_highres.py'] / bare - 1):+.1f}% |")
    times = {"parts": parts, "trainer": trainer}
    return {"seconds": seconds, "times": times}


if __name__ == "__main__":
    main(parse_args())
