"""Training throughput at the batch users get: probed (or large) batches, eager and torch.compile, peak memory, MFU.

    python bench/bench_throughput.py                                          # GPU: DDPM 32 px and DiT-B, probed batch
    python bench/bench_throughput.py --models ddpm32 ditB --batch probe --compile_modes none default max-autotune-no-cudagraphs
    python bench/bench_throughput.py --models ddpm32 --batch 128 --precision fp16   # a T4's setting: fp16 + loss scaling
    python bench/bench_throughput.py --smoke                                   # tiny CPU setting (seconds)

Each row is the trainers' own step (``ddpm_loss`` or ``flow_matching_loss``, backward with loss scaling under fp16,
clipping, AdamW fused on CUDA, the ``foreach`` EMA update; channels-last for the UNet on CUDA) at one batch:
``probe`` takes the largest power of two that fits (``utils.batch_size.probe_max_batch_size``, as
train_ddpm_highres.py does without ``--train_batch_size``), capped by ``--probe_limit``. Model FLOP utilisation =
(FLOPs of one forward and backward, counted by ``torch.utils.flop_counter`` on the eager model) x steps/s / the
device's dense peak for the compute dtype (``bench.common.PEAK_TFLOPS``; ``--peak_tflops`` where the table has no
entry, e.g. a CPU). Compile modes: ``none`` (eager), ``default``, ``reduce-overhead`` (CUDA graphs),
``max-autotune-no-cudagraphs``. Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    bench_device,
    count_flops,
    peak_tflops,
    precision_name,
    scaled_optimizer_step,
    time_steps,
)
from models.ddpm_sampling import ddpm_loss, make_noise_scheduler  # noqa: E402
from models.ddpm_unet import build_ddpm_unet  # noqa: E402
from models.dit import build_dit  # noqa: E402
from models.user_generation import flow_matching_loss  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402
from utils.batch_size import probe_max_batch_size  # noqa: E402
from utils.ema import EMA  # noqa: E402

NUM_USERS = 31
LATENT = (32, 16, 16)
MODELS = {"ddpm32": ("ddpm", "32", 32), "ddpm64": ("ddpm", "64", 64), "ddpm128": ("ddpm", "128", 128),
          "ddpm256": ("ddpm", "256", 256), "ddpm_tiny16": ("ddpm", "tiny", 16),
          "ditS": ("dit", "S", 16), "ditB": ("dit", "B", 16), "ditXL": ("dit", "XL", 16), "dit_tiny": ("dit", "tiny", 16)}


class Workload:
    """One family's model, batch maker and loss: ``loss(model, batch)``."""

    def __init__(self, name: str, device: torch.device):
        family, preset, size = MODELS[name]
        self.family, self.device = family, device
        torch.manual_seed(0)
        if family == "ddpm":
            self.model = build_ddpm_unet(preset, size).to(device)
            self.channels_last = device.type == "cuda"
            if self.channels_last:
                self.model = self.model.to(memory_format=torch.channels_last)
            self.shape, self.scheduler = (3, size, size), make_noise_scheduler()
        else:
            self.model = build_dit(preset, num_users=NUM_USERS, use_qknorm=True).to(device)
            self.channels_last, self.shape = False, LATENT

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(size, *self.shape, device=self.device)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x, torch.randint(0, NUM_USERS, (size,), device=self.device)

    def loss(self, model, batch) -> torch.Tensor:
        x, labels = batch
        if self.family == "ddpm":
            return ddpm_loss(model, self.scheduler, x)["loss"]
        return flow_matching_loss(model, x, labels)["loss"]


def probe(work: Workload, dtype, limit: int) -> int:
    def step(model, optimizer, batch):
        with torch.autocast(work.device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = work.loss(model, work.batch(batch))
        loss.backward()
        optimizer.step()

    return probe_max_batch_size(work.model, step, work.device, limit=limit)


def bench(work: Workload, batch_size: int, mode: str, dtype, steps: int, warmup: int, peak: float | None) -> dict:
    device = work.device
    model = work.model.train()
    compiled = model if mode == "none" else torch.compile(model, mode=None if mode == "default" else mode)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    ema = EMA(model, decay=0.9999)
    batch = work.batch(batch_size)
    amp = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def forward_backward():
        with torch.autocast(**amp):
            loss = work.loss(model, batch)
        loss.backward()
        model.zero_grad(set_to_none=True)

    def step():
        with torch.autocast(**amp):
            loss = work.loss(compiled, batch)
        scaled_optimizer_step(loss, optimizer, scaler, model.parameters())
        ema.update(model)

    flops = count_flops(forward_backward)
    seconds, peak_gib = time_steps(step, warmup, steps, device)
    achieved = flops * steps / seconds / 1e12
    return {"items_s": batch_size * steps / seconds, "peak_gib": peak_gib, "tflops": achieved,
            "mfu": achieved / peak if peak else None, "gflop_per_item": flops / batch_size / 1e9}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=["ddpm32", "ditB"])
    parser.add_argument("--batch", default="probe", help="'probe' (default) or a fixed batch")
    parser.add_argument("--probe_limit", type=int, default=256, help="largest batch the probe tries (default 256)")
    parser.add_argument("--compile_modes", nargs="+", default=["none", "default"],
                        choices=["none", "default", "reduce-overhead", "max-autotune-no-cudagraphs"])
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation happens here)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 where supported, else fp16 with loss scaling; fp32 on the CPU")
    parser.add_argument("--peak_tflops", type=float, default=None, help="the device's dense peak for the dtype, where "
                        "bench.common.PEAK_TFLOPS does not know it")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite")
    args = parser.parse_args(argv)
    if args.smoke:
        args.models, args.batch, args.compile_modes, args.train_steps, args.warmup = ["ddpm_tiny16", "dit_tiny"], "2", ["none"], 2, 1
        args.device = "cpu"
    if args.batch != "probe" and not args.batch.isdigit():
        parser.error("--batch is 'probe' or a whole number")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    device, dtype, _ = bench_device(args.device, args.precision)
    peak = peak_tflops(device, dtype, args.peak_tflops)
    peak_text = f"peak {peak:g} TFLOP/s" if peak else "peak unknown (MFU n/a; --peak_tflops)"
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision_name(dtype)} | {peak_text}\n")
    print("| model | batch | compile | items/s | peak GiB | GFLOP per item (fwd+bwd) | TFLOP/s | MFU |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    rows = []
    for name in args.models:
        work = Workload(name, device)
        batch = probe(work, dtype, args.probe_limit) if args.batch == "probe" else int(args.batch)
        for mode in args.compile_modes:
            try:
                r = bench(work, batch, mode, dtype, args.train_steps, args.warmup, peak)
            except torch.OutOfMemoryError:
                print(f"| {name} | {batch} | {mode} | out of memory | | | | |", flush=True)
                torch.cuda.empty_cache()
                continue
            rows.append(dict(r, model=name, batch=batch, mode=mode))
            peak_gib = f"{r['peak_gib']:.2f}" if device.type == "cuda" else "n/a"
            mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
            print(f"| {name} | {batch} | {mode} | {r['items_s']:.1f} | {peak_gib} | {r['gflop_per_item']:.2f} | "
                  f"{r['tflops']:.3g} | {mfu} |", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


if __name__ == "__main__":
    main(parse_args())
