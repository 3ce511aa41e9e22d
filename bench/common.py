"""Helpers shared by the benchmarks: device sync, autocast choice, the timed training-step loop."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """``auto|fp32|bf16|fp16`` -> the autocast dtype (None for fp32); auto is the trainers' choice."""
    if precision == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def precision_name(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def scaled_optimizer_step(loss, optimizer, scaler, parameters, max_grad_norm: float = 1.0) -> None:
    """The trainers' update: (fp16-scaled) backward, unscale, clip, step, zero."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device) -> tuple[float, float]:
    """Run ``warmup`` untimed then ``steps`` timed calls; (seconds, peak GiB of the timed part, NaN on CPU)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    seconds = time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak
