"""Devices, mixed precision and the one ``Accelerator`` of a training run.

Every trainer builds its ``accelerate.Accelerator`` here, so all four behave alike:

* mixed precision chosen for the hardware: ``auto`` is bf16 on GPUs that support it (Ampere and newer), fp16
  with loss scaling on older ones (Kaggle's T4 and P100), off on CPU; ``no`` forces fp32;
* gradient accumulation through ``accelerator.accumulate(model)``;
* one process per GPU (DDP) when started by ``accelerate launch`` or ``torchrun``, with no code change;
* TF32 matmuls on Ampere+ (free speed, a 10-bit mantissa that diffusion training tolerates);
* seeding through ``accelerate.utils.set_seed`` (Python, NumPy, torch, CUDA), offset per process so that each
  rank draws different noise.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from utils.errors import UserError

PRECISION_CHOICES = ("auto", "no", "fp16", "bf16")
PRECISION_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}  # accelerate's names -> autocast dtypes; "no" is fp32


def precision_name(dtype: torch.dtype | None) -> str:
    """An autocast dtype as logs, manifests and benchmark tables name it: ``bf16``, ``fp16``, or ``fp32`` for None."""
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolve_device(choice: str = "auto") -> torch.device:
    """``--device auto|cuda|cpu`` -> a torch device; asking for CUDA where there is none is an error."""
    if choice == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {choice}: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    try:
        return torch.device(choice)
    except RuntimeError as err:
        raise UserError(f"--device {choice}: not a device; use auto, cuda, cuda:N or cpu.") from err


def resolve_mixed_precision(requested: str, device: torch.device | str) -> str:
    """Map ``auto|no|fp16|bf16`` to what ``Accelerator(mixed_precision=...)`` takes on this device."""
    if requested not in PRECISION_CHOICES:
        raise UserError(f"mixed precision '{requested}' is not one of {', '.join(PRECISION_CHOICES)}.")
    device = torch.device(device)
    if device.type != "cuda":
        if requested == "fp16":
            raise UserError("--mixed_precision fp16 needs a CUDA GPU; use no, bf16 or auto on the CPU.")
        return "bf16" if requested == "bf16" else "no"
    if requested == "auto":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if requested == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp16 "
                        "(loss-scaled) or auto.")
    return requested


def autocast_dtype(requested: str, device: torch.device | str) -> torch.dtype | None:
    """``--mixed_precision`` -> the autocast dtype on ``device`` (None: fp32), by :func:`resolve_mixed_precision`'s rules."""
    return PRECISION_DTYPES.get(resolve_mixed_precision(requested, device))


def enable_fast_math() -> None:
    """TF32 for matmuls and convolutions, cuDNN autotuning for fixed input sizes."""
    if torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def create_accelerator(
    mixed_precision: str = "auto",
    gradient_accumulation_steps: int = 1,
    cpu: bool = False,
    seed: int | None = None,
    compile_model: bool = False,
    project_dir: str | None = None,
    report_to: str = "none",
    logging_dir: str | None = None,
):
    """The run's ``Accelerator``; ``mixed_precision`` is resolved for the device it lands on.

    ``report_to`` (``tensorboard``, ``wandb`` or ``none``) becomes ``log_with``; TensorBoard writes its event files
    under ``logging_dir`` (default ``<project_dir>/logs``). Without a visible GPU the run is a CPU run even when
    ``cpu`` is False: then a ``torchrun`` launch with ``WORLD_SIZE`` > 1 trains as one multi-process (gloo) job
    instead of as independent single-process copies (accelerate picks no distributed type for one local CUDA-less
    process that was not told to use the CPU).
    """
    from accelerate import Accelerator, DataLoaderConfiguration, PartialState
    from accelerate.utils import ProjectConfiguration, set_seed

    cpu = cpu or not torch.cuda.is_available()
    device = PartialState(cpu=cpu).device
    precision = resolve_mixed_precision(mixed_precision, device)
    log_with = None if report_to in (None, "none") else report_to
    if log_with and logging_dir is None and project_dir is not None:
        logging_dir = str(Path(project_dir) / "logs")
    accelerator = Accelerator(
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        cpu=cpu,
        dynamo_backend="inductor" if compile_model and device.type == "cuda" else None,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=project_dir, logging_dir=logging_dir),
        step_scheduler_with_optimizer=False,
        # Shuffling seeded by (seed, epoch) and identical on every process: exact resumes, no rank overlap.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=seed is not None, data_seed=seed),
    )
    enable_fast_math()
    if seed is not None:
        set_seed(seed, device_specific=True)
    return accelerator


def reset_accelerate_state() -> None:
    """Forget accelerate's process-wide singletons so a second in-process run (tests, notebooks) starts clean."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    PartialState._reset_state()


def describe_device(device: torch.device) -> str:
    """'NVIDIA H100 80GB HBM3, 78.6 GiB free of 79.1 GiB' or 'CPU (2 threads)'."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return f"{torch.cuda.get_device_name(device)}, {free / 2**30:.1f} GiB free of {total / 2**30:.1f} GiB"
    return f"CPU ({torch.get_num_threads()} threads)"


def log_run_header(logger: logging.Logger, accelerator, batch_size: int, extra: str = "") -> None:
    """Log the total batch (per device x processes x accumulation), precision and device once at start."""
    total = batch_size * accelerator.num_processes * accelerator.gradient_accumulation_steps
    logger.info(
        "batch %d per device x %d process(es) x accumulation %d = %d per optimiser step | precision %s | %s%s",
        batch_size,
        accelerator.num_processes,
        accelerator.gradient_accumulation_steps,
        total,
        accelerator.mixed_precision,
        describe_device(accelerator.device),
        f" | {extra}" if extra else "",
    )
