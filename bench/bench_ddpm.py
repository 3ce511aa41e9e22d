"""Pixel DDPM benchmarks: training images/s and peak memory per resolution, sampling seconds per image.

    python bench/bench_ddpm.py                       # all presets, on the GPU if there is one
    python bench/bench_ddpm.py --sizes 32 64 --batch 8 --train_steps 20
    python bench/bench_ddpm.py --no-compile --no-amp --sample_batch 16

Training: the real training step of train_ddpm_highres.py (``ddpm_loss``, backward, fused AdamW, EMA update,
channels-last, autocast as the trainer picks it) at a fixed small batch, after warm-up steps. Sampling:
``sample_ddpm`` with DDPM-1000 and DDIM-50 on the 32 px model; seconds per image = wall time / batch.
Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import autocast_dtype, precision_name, scaled_optimizer_step, synchronize, time_steps  # noqa: E402
from models.ddpm_sampling import ddpm_loss, make_noise_scheduler, sample_ddpm  # noqa: E402
from models.ddpm_unet import build_ddpm_unet, preset_for_size  # noqa: E402
from utils.accelerator import describe_device, enable_fast_math, resolve_device  # noqa: E402
from utils.ema import EMA  # noqa: E402


def bench_training(size: int, batch: int, steps: int, warmup: int, device, amp: bool, compile_model: bool,
                   preset: str | None = None) -> dict:
    unet = build_ddpm_unet(preset or preset_for_size(size), size).to(device)
    if device.type == "cuda":
        unet = unet.to(memory_format=torch.channels_last)
    ema = EMA(unet, decay=0.9999)
    model = torch.compile(unet) if compile_model else unet
    scheduler = make_noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    dtype = autocast_dtype(device, "auto" if amp else "fp32")
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    images = torch.randn(batch, 3, size, size, device=device)
    if device.type == "cuda":
        images = images.contiguous(memory_format=torch.channels_last)

    def step():
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = ddpm_loss(model, scheduler, images)["loss"]
        scaled_optimizer_step(loss, optimizer, scaler, unet.parameters())
        ema.update(unet)

    seconds, peak = time_steps(step, warmup, steps, device)
    params = sum(p.numel() for p in unet.parameters()) / 1e6
    return {"size": size, "params": params, "batch": batch, "img_s": batch * steps / seconds, "peak_gib": peak}


def bench_sampling(size: int, batch: int, sampler: str, steps: int, device, amp: bool, preset: str | None = None) -> float:
    unet = build_ddpm_unet(preset or preset_for_size(size), size).to(device).eval()
    config = dict(make_noise_scheduler().config)
    dtype = autocast_dtype(device, "auto" if amp else "fp32")
    sample_ddpm(unet, config, batch, min(steps, 3), sampler, seed=0, batch_size=batch, autocast_dtype=dtype)  # warm-up
    synchronize(device)
    started = time.perf_counter()
    sample_ddpm(unet, config, batch, steps, sampler, seed=0, batch_size=batch, autocast_dtype=dtype)
    synchronize(device)
    return (time.perf_counter() - started) / batch


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 64, 128, 256])
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8, small enough for 256 px)")
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--sample_batch", type=int, default=16)
    parser.add_argument("--ddpm_steps", type=int, default=1000)
    parser.add_argument("--ddim_steps", type=int, default=50)
    parser.add_argument("--no-amp", dest="amp", action="store_false")
    parser.add_argument("--no-compile", dest="compile", action="store_false")
    parser.add_argument("--skip_sampling", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (tiny UNet at 16 px, batch 2, "
                        "one step of each kind; overrides the sizes, batches and steps)")
    args = parser.parse_args(argv)
    preset, sample_size = None, 32
    if args.smoke:
        preset, sample_size = "tiny", 16
        args.sizes, args.batch, args.train_steps, args.warmup = [16], 2, 1, 0
        args.sample_batch, args.ddpm_steps, args.ddim_steps, args.device = 2, 2, 2, "cpu"

    device = resolve_device(args.device)
    enable_fast_math()
    compile_model = args.compile and device.type == "cuda"
    precision = precision_name(autocast_dtype(device, "auto" if args.amp else "fp32"))
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | compile {compile_model}\n")
    print("| size | parameters | batch | train img/s | peak GiB |")
    print("|---:|---:|---:|---:|---:|")
    for size in args.sizes:
        r = bench_training(size, args.batch, args.train_steps, args.warmup, device, args.amp, compile_model, preset)
        print(f"| {size} | {r['params']:.1f}M | {r['batch']} | {r['img_s']:.1f} | {r['peak_gib']:.2f} |", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.skip_sampling:
        return
    print(f"\n| sampler ({sample_size} px, batch {args.sample_batch}) | s per image |")
    print("|---|---:|")
    for sampler, steps in (("ddpm", args.ddpm_steps), ("ddim", args.ddim_steps)):
        seconds = bench_sampling(sample_size, args.sample_batch, sampler, steps, device, args.amp, preset)
        print(f"| {sampler.upper()}-{steps} | {seconds:.3f} |", flush=True)


if __name__ == "__main__":
    main()
