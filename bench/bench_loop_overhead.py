"""Where the pixel DDPM trainer's time goes beyond the bare forward/backward: EMA, data, logging, progress.

    python bench/bench_loop_overhead.py                               # CPU or GPU: tiny UNet, 32 px, batch 16
    python bench/bench_loop_overhead.py --size 32 --preset 32 --batch 128 --rounds 3 --workers 8     # a GPU's setting
    python bench/bench_loop_overhead.py --smoke

Rows, in alternating rounds on the same model configuration and batch (``bench/bench_ddpm_vs_diffusers.py`` has the
pieces): the bare step (forward, loss, backward, clipping, fused AdamW as the trainer, one batch resident on the
device); the same with PyTorch's default AdamW (``foreach``; the trainer used it on the CPU before); the bare step
plus our EMA update (``utils.ema.EMA``, one ``torch._foreach_lerp_``); the bare step plus diffusers' ``EMAModel.step``
(``foreach``, what the EMA update was before); and ``train_ddpm_highres.py`` whole, timed per step on its progress bar
(data loading and flips, EMA, the loss kept on the device, a tracker scalar every 10 steps). Each row's ratio to the
bare step is the overhead (issue 13: the whole loop at most 5% over bare). Prints a Markdown table; not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_ddpm_vs_diffusers import bare_step_seconds, run_ours  # noqa: E402
from bench.common import autocast_dtype, median, precision_name  # noqa: E402
from data.demo_data import build_demo_image_folder  # noqa: E402
from utils.accelerator import describe_device, enable_fast_math, resolve_device  # noqa: E402


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
    device = resolve_device(args.device)
    enable_fast_math()
    dtype = autocast_dtype(device, args.precision)
    precision = precision_name(dtype)
    work = Path(tempfile.mkdtemp(prefix="bench_loop_overhead_"))
    folder = build_demo_image_folder(work / "images", size=args.size, count=args.images)
    steps = max(args.images // args.batch - args.skip, 1)
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | UNet '{args.preset}' at "
          f"{args.size} px | batch {args.batch} | {args.rounds} rounds | logs in {work}\n")
    times: dict[str, list[float]] = {"bare": [], "bare, AdamW foreach (PyTorch's default) instead of fused": [],
                                     "bare + EMA (ours, foreach lerp)": [],
                                     "bare + EMA (diffusers EMAModel.step, foreach)": [], "train_ddpm_highres.py": []}
    for _ in range(args.rounds):
        times["bare"] += bare_step_seconds(args, device, dtype, steps)
        times["bare, AdamW foreach (PyTorch's default) instead of fused"] += bare_step_seconds(args, device, dtype, steps,
                                                                                               fused=False)
        times["bare + EMA (ours, foreach lerp)"] += bare_step_seconds(args, device, dtype, steps, ema="lerp")
        times["bare + EMA (diffusers EMAModel.step, foreach)"] += bare_step_seconds(args, device, dtype, steps, ema="diffusers")
        times["train_ddpm_highres.py"] += run_ours(folder, work, args, precision)
    seconds = {name: median(values) for name, values in times.items()}
    print("| step | median s per step | img/s | steps timed | over bare |")
    print("|---|---:|---:|---:|---:|")
    for name, value in seconds.items():
        print(f"| {name} | {value:.4f} | {args.batch / value:.1f} | {len(times[name])} | "
              f"{100 * (value / seconds['bare'] - 1):+.1f}% |")
    return {"seconds": seconds, "times": times}


if __name__ == "__main__":
    main(parse_args())
