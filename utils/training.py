"""Training-loop plumbing shared by the trainers: resumable state, NaN guard, unwrapping, data loaders, the "best"
metric and the checkpoint cadence (steps and minutes).

A training checkpoint (one ``.pt`` file, ``torch.load(weights_only=True)``-safe) holds::

    kind, format_version, config          what it is and the resolved configuration of the run
    model                                 raw weights of the trained module (DDP / torch.compile stripped)
    ema                                   EMA weights by parameter name and the EMA's step counter
    optimizer, lr_scheduler, scaler       optimiser state, LR schedule, fp16 loss-scaler state
    step, epoch                           optimiser steps taken, epochs completed
    rng                                   RNG states, one entry per process
    ...                                   whatever the trainer adds (model config, noise schedule, history)
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import torch
from torch.utils.data import DataLoader, Dataset

from utils.checkpoint import CHECKPOINT_FORMAT_VERSION, capture_rng_state, restore_rng_state
from utils.config import config_to_dict
from utils.errors import CheckpointError, UserError
from utils.log import get_logger


def unwrap(accelerator, model: torch.nn.Module) -> torch.nn.Module:
    """The bare module under DDP and ``torch.compile`` wrappers (what gets saved)."""
    return accelerator.unwrap_model(model, keep_torch_compile=False)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    shuffle: bool = True,
    workers: int | None = None,
    drop_last: bool = True,
    device_type: str = "cpu",
    seed: int | None = None,
) -> DataLoader:
    """A DataLoader that keeps a GPU fed: worker processes, pinned memory, persistent workers."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device_type == "cuda" else 0
    if drop_last and len(dataset) < batch_size:
        raise UserError(
            f"The data set has {len(dataset)} images, fewer than one batch of {batch_size}; "
            "add images or lower --train_batch_size."
        )
    generator = torch.Generator().manual_seed(seed) if seed is not None else None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        pin_memory=device_type == "cuda",
        persistent_workers=workers > 0,
        drop_last=drop_last,
        generator=generator,
    )


def training_checkpoint(
    kind: str,
    accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    config,
    step: int,
    epoch: int,
    lr_scheduler=None,
    ema=None,
    **extra,
) -> dict:
    """Everything needed to resume (and, with ``extra``, to sample). Call on every process: RNG is gathered."""
    from accelerate.utils import gather_object

    bare = unwrap(accelerator, model)
    rng_states = gather_object([capture_rng_state()]) if accelerator.num_processes > 1 else [capture_rng_state()]
    check_finite_weights(bare, step)
    if ema is not None:
        check_finite_weights(ema.state_dict(), step, "EMA weights")
    checkpoint = {
        "kind": kind,
        "format_version": CHECKPOINT_FORMAT_VERSION,
        "config": config_to_dict(config),
        "model": {k: v.detach().cpu() for k, v in bare.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "step": step,
        "epoch": epoch,
        "rng": rng_states,
        "num_processes": accelerator.num_processes,
    }
    if ema is not None:
        checkpoint["ema"] = ema.state_dict()
    if lr_scheduler is not None:
        checkpoint["lr_scheduler"] = lr_scheduler.state_dict()
    if accelerator.scaler is not None:
        checkpoint["scaler"] = accelerator.scaler.state_dict()
    checkpoint.update(extra)
    return checkpoint


@contextlib.contextmanager
def keeping_optimizer_implementation(optimizer):
    """Load optimiser state inside this block without taking the saved run's ``fused``/``foreach`` switches.

    PyTorch's ``Optimizer.load_state_dict`` copies every param-group option from the saved state, implementation
    switches included, so a checkpoint written with the default path would resume unfused (2.6x slower steps on the
    CPU), and one written fused on CUDA would resume fused where this run chose otherwise. They are not
    hyperparameters: this run's choice (:func:`fused_optimizer`) stays.
    """
    kept = [{key: group[key] for key in ("fused", "foreach") if key in group} for group in optimizer.param_groups]
    yield
    for group, switches in zip(optimizer.param_groups, kept, strict=True):
        group.update(switches)


@contextlib.contextmanager
def keeping_configured_learning_rates(optimizer, lr_scheduler=None):
    """Load optimiser and LR-schedule state inside this block and keep this run's base learning rates.

    Both states carry the saved run's rates (each group's ``lr`` and ``initial_lr``, the schedule's ``base_lrs``), so a
    ``--learning_rate`` given with ``--resume_from_checkpoint`` (which the resumed config records) would be ignored.
    The schedule's factor at the restored step is kept: lr = this run's base x (saved lr / saved base). A change is
    logged with both values; resuming without the flag changes nothing (the config inherits the saved rate).
    """
    schedule = getattr(lr_scheduler, "scheduler", lr_scheduler)  # accelerate wraps prepared schedulers
    configured = [group.get("initial_lr", group["lr"]) for group in optimizer.param_groups]
    yield
    saved = list(schedule.base_lrs) if schedule is not None else [group["lr"] for group in optimizer.param_groups]
    changed = []
    for group, new, old in zip(optimizer.param_groups, configured, saved, strict=True):
        if new == old:
            continue
        group["lr"] = group["lr"] * new / old if old else new
        group["initial_lr"] = new
        changed.append(f"{old:g} -> {new:g}")
    if changed:
        if schedule is not None:  # new lists: a loaded state dict may share its lists with the schedule that saved it
            schedule.base_lrs = list(configured)
            schedule._last_lr = [group["lr"] for group in optimizer.param_groups]
        get_logger().info("learning rate %s: the rate given for this run replaces the checkpoint's", ", ".join(changed))


def restore_training_checkpoint(checkpoint: dict, accelerator, model, optimizer, lr_scheduler=None, ema=None) -> None:
    """Load model, optimiser, LR schedule, loss scaler and EMA from ``checkpoint`` (RNG: see :func:`restore_rng`)."""
    bare = unwrap(accelerator, model)
    try:
        bare.load_state_dict(checkpoint["model"])
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        raise CheckpointError(
            f"The checkpoint's weights do not fit this model ({detail}); resume with the model flags the run started with."
        ) from err
    with keeping_optimizer_implementation(optimizer), keeping_configured_learning_rates(optimizer, lr_scheduler):
        optimizer.load_state_dict(checkpoint["optimizer"])
        if lr_scheduler is not None and "lr_scheduler" in checkpoint:
            lr_scheduler.load_state_dict(checkpoint["lr_scheduler"])
    if accelerator.scaler is not None and "scaler" in checkpoint:
        accelerator.scaler.load_state_dict(checkpoint["scaler"])
    if ema is not None and "ema" in checkpoint:
        ema.load_state_dict(checkpoint["ema"])


def restore_rng(checkpoint: dict, accelerator) -> None:
    """Give each process its own saved RNG state; with another process count, reseed per process instead."""
    states = checkpoint.get("rng") or []
    if len(states) == accelerator.num_processes:
        restore_rng_state(states[accelerator.process_index])
        return
    from accelerate.utils import set_seed

    seed = int(checkpoint.get("config", {}).get("seed") or 0) + int(checkpoint.get("step", 0))
    set_seed(seed, device_specific=True)
    get_logger().warning(
        "The checkpoint was written by %d process(es) and this run has %d: random state reseeded, so the run "
        "continues correctly but not bit-identically.",
        len(states),
        accelerator.num_processes,
    )


def backward_and_step(accelerator, loss, optimizer, parameters, max_grad_norm: float, before_clip=None) -> None:
    """What follows the loss inside ``with accelerator.accumulate(model):``.

    Backward; when the gradients synchronise (the last micro-batch of an accumulation), ``before_clip()`` (e.g. an
    all-reduce of parameters outside DDP) and norm clipping when ``max_grad_norm > 0``; then the optimiser step,
    which accelerate turns into a no-op between accumulation steps, and zeroing.
    """
    accelerator.backward(loss)
    if accelerator.sync_gradients:
        if before_clip is not None:
            before_clip()
        if max_grad_norm > 0:
            accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def fused_optimizer(device: torch.device) -> bool:
    """Whether Adam/AdamW should run fused (``fused=True``) on ``device``: one kernel for all parameters on CUDA, and
    on the CPU faster than PyTorch's default ``foreach`` path too (``bench/bench_loop_overhead.py``, docs/benchmarks.md)."""
    return torch.device(device).type in ("cuda", "cpu")


def check_finite(value: float, step: int, hint: str = "") -> None:
    """Stop with advice when the (averaged) loss is NaN or infinite; the last good checkpoint is untouched."""
    if not math.isfinite(value):
        raise UserError(
            f"The loss became {value} by optimiser step {step}; nothing was saved over the last good checkpoint. "
            "Lower --learning_rate, keep gradient clipping on (--max_grad_norm), check that the inputs are normalised"
            f"{hint or ', or train with bf16 or fp32 instead of fp16'}."
        )


def check_finite_weights(weights, step: int, what: str = "weights") -> None:
    """Refuse to checkpoint NaN or infinite ``weights`` (a module or a nested dict of tensors): the last good checkpoint
    stays the newest one on disk."""
    tensors = weights.state_dict().values() if isinstance(weights, torch.nn.Module) else _tensors(weights)
    for tensor in tensors:
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserError(
                f"The {what} became NaN or infinite by optimiser step {step}; nothing was saved over the last good "
                "checkpoint. Lower --learning_rate and keep gradient clipping on (--max_grad_norm)."
            )


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def parameter_norm(model: torch.nn.Module) -> torch.Tensor:
    """The L2 norm of all of ``model``'s floating-point parameters, on their device (no host sync)."""
    parameters = [p.detach().float() for p in model.parameters() if p.is_floating_point()]
    if not parameters:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(parameters)))


# A run whose weights' norm grows past this multiple of its start has diverged: healthy training moves the global norm
# by a few times at most, while a learning rate far too large (1e9) multiplies it by millions while the loss can stay
# finite (normalisation layers absorb the scale), and samples from such weights are NaN.
PARAMETER_GROWTH_LIMIT = 100.0


def out_of_memory_message(batch_size: int, hint: str = "") -> str:
    return (
        f"CUDA ran out of memory with a batch of {batch_size} per device; lower --train_batch_size and raise the gradient "
        f"accumulation to keep the effective batch{hint}."
    )


class NonFiniteGuard:
    """Remembers on the device the first step whose loss was NaN or infinite: no host sync per step.

    ``update`` every micro-batch; ``check`` (a small collective, on all processes together) where a host sync is
    cheap, e.g. when the progress display refreshes and at the end of an epoch. An fp16 gradient overflow leaves the
    loss finite, and accelerate's loss scaler skips that step and lowers its scale. With ``model``, ``check`` also
    compares the weights' norm with the norm at the guard's creation: past ``growth_limit`` times it the run has
    diverged even where the loss stays finite, and it stops before a checkpoint is written from such weights.
    """

    def __init__(self, device: torch.device, hint: str = "", model: torch.nn.Module | None = None,
                 growth_limit: float = PARAMETER_GROWTH_LIMIT):
        self.first_bad_step = torch.full((), -1, dtype=torch.long, device=device)
        self.bad_value = torch.zeros((), device=device)
        self.hint = hint
        self.model, self.growth_limit, self.last_step = model, growth_limit, 0
        self.start_norm = float(parameter_norm(model)) if model is not None else None

    def update(self, loss: torch.Tensor, step: int) -> None:
        self.last_step = step
        newly_bad = ~torch.isfinite(loss.detach()) & (self.first_bad_step < 0)
        self.first_bad_step = torch.where(newly_bad, step, self.first_bad_step)
        self.bad_value = torch.where(newly_bad, loss.detach().float(), self.bad_value)

    def check(self, accelerator) -> None:
        """Raise on every process if any process saw a bad loss."""
        steps = accelerator.gather(self.first_bad_step[None])
        values = accelerator.gather(self.bad_value[None])
        bad = (steps >= 0).nonzero()
        if len(bad):
            index = int(bad[0, 0])
            check_finite(float(values[index]), int(steps[index]), self.hint)
        if self.model is not None:  # the same weights on every process under DDP: all raise together
            norm = float(parameter_norm(self.model))
            if not math.isfinite(norm) or norm > self.growth_limit * max(self.start_norm, 1e-12):
                raise UserError(
                    f"The weights diverged by optimiser step {self.last_step}: their norm grew from {self.start_norm:.3g} to "
                    f"{norm:.3g} (the limit is {self.growth_limit:g}x); nothing was saved over the last good checkpoint. "
                    "Lower --learning_rate and keep gradient clipping on (--max_grad_norm)."
                )


class BestMetric:
    """Tracks the best value of a metric for ``*_best`` checkpoints, optionally smoothed.

    ``smoothing`` > 0 compares an exponential moving average of the values (bias-corrected as Adam's moments, so
    the first values are not pulled toward zero) instead of the raw values: an epoch's mean training loss jumps by
    more than the progress between two epochs, so the raw minimum picks a lucky epoch, not the best weights.
    """

    def __init__(self, mode: str = "min", smoothing: float = 0.0):
        if mode not in ("min", "max"):
            raise ValueError(f"mode must be 'min' or 'max', not {mode!r}")
        self.mode, self.smoothing = mode, smoothing
        self.best = math.inf if mode == "min" else -math.inf
        self.epoch = 0
        self.average, self.updates = 0.0, 0

    def update(self, value: float, epoch: int) -> bool:
        """Record ``value`` (of ``epoch``); True when it is the best so far."""
        self.updates += 1
        self.average = self.smoothing * self.average + (1 - self.smoothing) * value
        tracked = self.average / (1 - self.smoothing**self.updates) if self.smoothing else value
        better = tracked < self.best if self.mode == "min" else tracked > self.best
        if better:
            self.best, self.epoch = tracked, epoch
        return better

    def state_dict(self) -> dict:
        return {"mode": self.mode, "smoothing": self.smoothing, "best": self.best, "epoch": self.epoch,
                "average": self.average, "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        for key in ("best", "epoch", "average", "updates"):
            setattr(self, key, state[key])


class CheckpointCadence:
    """When to write a mid-epoch checkpoint: every ``steps`` optimiser steps and/or every ``minutes`` of training.

    The time test is decided on the main process and broadcast, so every process saves at the same step (saving
    gathers RNG states: a process that skipped it would hang the others).
    """

    def __init__(self, steps: int = 0, minutes: float = 0.0):
        self.steps, self.seconds = steps, minutes * 60.0
        self.last = time.monotonic()

    def due(self, step: int, accelerator) -> bool:
        if self.steps and step % self.steps == 0:
            return True
        if not self.seconds:
            return False
        elapsed = torch.tensor([time.monotonic() - self.last >= self.seconds], dtype=torch.uint8, device=accelerator.device)
        if accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            elapsed = broadcast(elapsed, from_process=0)
        return bool(elapsed.item())

    def saved(self) -> None:
        """Restart the clock (call after every save, epoch-end ones too)."""
        self.last = time.monotonic()
