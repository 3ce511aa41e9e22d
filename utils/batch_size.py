"""Automatic batch size: probe the largest batch that fits, then accumulate to the target effective batch.

The probe runs real training steps (forward, backward and an optimiser step, so Adam's state is allocated) on
a throw-away copy of the model with doubling batch sizes, under the run's autocast, until one runs out of
memory or its peak use exceeds ``headroom`` of the card. Nothing is read from a table of GPUs, so it adapts to
any card and resolution. Per process the same probe runs; the smallest answer wins.

The plan then picks ``batch x accumulation >= effective`` with the batch as large as memory allows and no
larger than the effective batch: ``batch 16 x accumulation 2 = effective 32``.
"""

from __future__ import annotations

import copy
import gc
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass
class BatchPlan:
    batch_size: int  # per device and per forward pass
    accumulation: int
    num_processes: int = 1
    probed_max: int | None = None  # largest batch the probe found to fit (None when not probed)

    @property
    def effective(self) -> int:
        return self.batch_size * self.accumulation * self.num_processes

    def describe(self, device_description: str) -> str:
        procs = f" x {self.num_processes} processes" if self.num_processes > 1 else ""
        probed = f" (largest that fits: {self.probed_max})" if self.probed_max else ""
        return (
            f"batch {self.batch_size}{procs} x accumulation {self.accumulation} = effective {self.effective}"
            f" on {device_description}{probed}"
        )


def plan_batches(effective: int, max_batch: int, num_processes: int = 1, probed_max: int | None = None) -> BatchPlan:
    """Largest per-device batch <= ``max_batch`` whose accumulation reaches ``effective`` over all processes."""
    per_process = max(1, math.ceil(effective / num_processes))
    fewest = math.ceil(per_process / max(1, min(max_batch, per_process)))
    # Prefer an exact split (4 x 8 rather than 5 x 7 for 32) unless it costs more than twice the accumulation.
    for accumulation in range(fewest, 2 * fewest + 1):
        if per_process % accumulation == 0:
            return BatchPlan(per_process // accumulation, accumulation, num_processes, probed_max)
    return BatchPlan(math.ceil(per_process / fewest), fewest, num_processes, probed_max)


def probe_max_batch_size(
    model: torch.nn.Module,
    make_step: Callable[[torch.nn.Module, torch.optim.Optimizer, int], None],
    device: torch.device,
    limit: int = 512,
    start: int = 1,
    headroom: float = 0.9,
) -> int:
    """Largest power-of-two batch in ``[start, limit]`` whose training step fits on ``device``.

    ``make_step(model, optimizer, batch_size)`` must run one full training step (forward, backward,
    ``optimizer.step()``) on random data of that batch size. On CPU there is nothing to probe: ``limit`` is
    returned.
    """
    if device.type != "cuda":
        return limit
    probe_model = copy.deepcopy(model).to(device).train()
    optimizer = torch.optim.AdamW([p for p in probe_model.parameters() if p.requires_grad], lr=1e-12)
    total = torch.cuda.get_device_properties(device).total_memory
    best, batch = 0, start
    while batch <= limit:
        try:
            torch.cuda.reset_peak_memory_stats(device)
            make_step(probe_model, optimizer, batch)
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.synchronize(device)
            if torch.cuda.max_memory_allocated(device) > headroom * total:
                break
            best = batch
            batch *= 2
        except torch.OutOfMemoryError:
            break
        finally:
            optimizer.zero_grad(set_to_none=True)
            gc.collect()
            torch.cuda.empty_cache()
    del probe_model, optimizer
    gc.collect()
    torch.cuda.empty_cache()
    if best == 0:
        raise torch.OutOfMemoryError(f"not even a batch of {start} fits on {torch.cuda.get_device_name(device)}")
    return best
