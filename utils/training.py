"""Training-loop plumbing shared by the trainers: resumable state, NaN guard, unwrapping, data loaders.

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

import math
import os

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
    dataset: Dataset, batch_size: int, shuffle: bool = True, workers: int | None = None, drop_last: bool = True, device_type: str = "cpu", seed: int | None = None
) -> DataLoader:
    """A DataLoader that keeps a GPU fed: worker processes, pinned memory, persistent workers."""
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device_type == "cuda" else 0
    if drop_last and len(dataset) < batch_size:
        raise UserError(
            f"The data set has {len(dataset)} images, fewer than one batch of {batch_size}; "
            "add images or lower --batch_size."
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


def check_finite(value: float, step: int, hint: str = "") -> None:
    """Stop with advice when the (averaged) loss is NaN or infinite; the last good checkpoint is untouched."""
    if not math.isfinite(value):
        raise UserError(
            f"The loss became {value} by optimiser step {step}; nothing was saved over the last good checkpoint. "
            "Lower --lr, keep gradient clipping on, check that the inputs are normalised"
            f"{hint or ', or train with bf16 or fp32 instead of fp16'}."
        )


def out_of_memory_message(batch_size: int, hint: str = "") -> str:
    return (
        f"CUDA ran out of memory with a batch of {batch_size} per device; lower --batch_size and raise the gradient "
        f"accumulation to keep the effective batch{hint}."
    )
