"""Helpers shared by the benchmarks: device sync, autocast choice, the timed training-step loop; for the side-by-side
benchmarks also reference checkouts, per-step clocks on a trainer's progress bar, interleaved rounds and FLOP counts."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch

from utils.accelerator import precision_name


def run_in_fresh_process(target: Callable, args: tuple, what: str):
    """``target(*args, queue)`` in a spawned process (a peak-memory reading of its own); returns what it put on the queue.

    A process that fails ends the bench with one line naming ``what``; its traceback is printed above it."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=target, args=(*args, queue))
    process.start()
    process.join()
    if process.exitcode != 0:
        raise SystemExit(f"error: {what} failed (exit {process.exitcode}); see its traceback above.")
    return queue.get()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The benches' ``auto|fp32|bf16|fp16`` -> the autocast dtype (None for fp32), by the trainers' own rules
    (utils.accelerator.autocast_dtype: auto is bf16 where the GPU has it, else fp16; fp32 on the CPU)."""
    from utils.accelerator import autocast_dtype as trainers_autocast_dtype

    return trainers_autocast_dtype("no" if precision == "fp32" else precision, device)


def bench_device(device: str, precision: str) -> tuple[torch.device, torch.dtype | None, str]:
    """``--device`` and ``--precision`` as the benches read them: the device (TF32 and cuDNN autotuning on, as the
    trainers run), its autocast dtype (None for fp32) and that dtype's name for the tables."""
    from utils.accelerator import enable_fast_math, resolve_device

    resolved = resolve_device(device)
    enable_fast_math()
    dtype = autocast_dtype(resolved, precision)
    return resolved, dtype, precision_name(dtype)


def scaled_optimizer_step(loss, optimizer, scaler, parameters, max_grad_norm: float = 1.0) -> None:
    """The trainers' update: (fp16-scaled) backward, unscale, clip (not at ``max_grad_norm`` 0), step, zero."""
    scaler.scale(loss).backward()
    scaler.unscale_(optimizer)
    if max_grad_norm > 0:
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


# ------------------------------------------------------------------------------------------ side-by-side benchmarks
# What the side-by-side benchmarks (bench_*_vs_*.py, bench_loop_overhead.py, bench_throughput.py) share: reference
# code imported from a local checkout given by flag (never committed), per-step clocks on a trainer's own progress
# bar, interleaved rounds, FLOP counts and the device's peak for model FLOP utilisation.


def missing_checkout(flag: str, root: str | None, needed: str, fetch_hint: str) -> bool:
    """True (after printing one line naming the flag) when the reference checkout ``root`` lacks ``needed``."""
    if root and (Path(root) / needed).is_file():
        return False
    where = f"{root} has no {needed}" if root else "no checkout given"
    print(f"reference row skipped: {where}; pass {flag} DIR (a checkout of {fetch_hint})")
    return True


def import_from_checkout(root: str | Path, *names: str) -> list:
    """Import modules ``names`` (e.g. ``"models.lightningdit"``, ``"transport"``) from the checkout at ``root``.

    The checkout goes first on ``sys.path`` while they import, so its own absolute imports (``from models.x import``)
    find its files; our packages of the same top-level name (``models``) are moved out of ``sys.modules`` meanwhile and
    put back after, and the checkout's modules stay reachable (through the returned modules) under ``_reference_*``
    names, so both can be used in one process.
    """
    import importlib
    import sys

    root = str(Path(root).resolve())
    top_levels = {p.name.removesuffix(".py") for p in Path(root).iterdir() if p.is_dir() or p.suffix == ".py"}

    def ours(key: str) -> bool:
        return key.split(".")[0] in top_levels

    shadowed = {key: sys.modules.pop(key) for key in list(sys.modules) if ours(key)}
    sys.path.insert(0, root)
    try:
        return [importlib.import_module(name) for name in names]
    finally:
        sys.path.remove(root)
        for key in [k for k in sys.modules if ours(k)]:
            sys.modules[f"_reference_{key}"] = sys.modules.pop(key)
        sys.modules.update(shadowed)


class StepClock:
    """Timestamps of a training loop's steps, taken where its progress bar advances (``update``).

    ``patch(module)`` swaps ``module.tqdm`` for a subclass that stamps the time on every ``update`` call (also when the
    bar is disabled, as ours is outside a terminal), so a trainer is timed exactly as it runs, data, EMA, logging and
    all, without editing it. ``intervals(skip)`` drops the first ``skip`` steps of each bar (warm-up, the loader
    starting) and the gaps between bars (end-of-epoch work, timed apart by the trainers' own logs).

    On a GPU a loop that never waits for the device (ours) enqueues steps ahead of it and a loop that reads the loss
    every step (diffusers' example) does not, so single gaps mean different things; ``sync`` (e.g.
    ``torch.cuda.synchronize``) is then called before the stamp of step ``skip`` and of each bar's last step only, and
    ``window_means(skip)`` gives each bar's (last - step ``skip``) / steps between: the average over the window, exact
    at both ends, with two waits per epoch added to the loop.
    """

    def __init__(self, skip: int = 2, sync: Callable[[], None] | None = None):
        self.bars: list[list[float]] = []
        self.skip, self.sync = skip, sync

    def patch(self, module) -> Callable[[], None]:
        original = module.tqdm
        clock = self

        class StampedTqdm(original):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self._stamps: list[float] = []
                clock.bars.append(self._stamps)

            def update(self, n=1):
                index = len(self._stamps)
                if clock.sync is not None and (index == clock.skip or (self.total and index == self.total - 1)):
                    clock.sync()
                self._stamps.append(time.perf_counter())
                return super().update(n)

        module.tqdm = StampedTqdm

        def restore() -> None:
            module.tqdm = original

        return restore

    def intervals(self, skip: int | None = None) -> list[float]:
        skip = self.skip if skip is None else skip
        out = []
        for stamps in self.bars:
            kept = stamps[skip:]
            out += [b - a for a, b in zip(kept, kept[1:])]
        return out

    def window_means(self, skip: int | None = None) -> list[float]:
        skip = self.skip if skip is None else skip
        return [(s[-1] - s[skip]) / (len(s) - 1 - skip) for s in self.bars if len(s) - 1 > skip]


def median(values: list[float]) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else 0.5 * (ordered[middle - 1] + ordered[middle])


def interleave(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Call each run once per round, in turn (so load on a shared machine hits all alike); each returns seconds."""
    results: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            results[name].append(run())
    return results


def count_flops(fn: Callable[[], None]) -> int:
    """FLOPs of one call of ``fn`` (forward and backward, as it runs), counted by ``torch.utils.flop_counter``."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


# Dense peak TFLOP/s per device and compute dtype (vendor data sheets, no sparsity): MFU = achieved / peak.
PEAK_TFLOPS = {
    "H200": {torch.bfloat16: 989.0, torch.float16: 989.0, None: 67.0},
    "H100": {torch.bfloat16: 989.0, torch.float16: 989.0, None: 67.0},
    "A100": {torch.bfloat16: 312.0, torch.float16: 312.0, None: 19.5},
    "L4": {torch.bfloat16: 121.0, torch.float16: 121.0, None: 30.3},
    "T4": {torch.float16: 65.0, None: 8.1},
    "P100": {torch.float16: 18.7, None: 9.3},
}


def peak_tflops(device: torch.device, dtype: torch.dtype | None, override: float | None = None) -> float | None:
    """The device's dense peak for ``dtype`` (None = fp32; TF32 matmuls count as fp32 here), or None when unknown."""
    if override:
        return override
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, table in PEAK_TFLOPS.items():
        if key in name:
            return table.get(dtype)
    return None
