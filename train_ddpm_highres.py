"""Train a pixel-space DDPM (Ho et al. 2020) at 32, 64, 96, 128 or 256 px.

The UNet preset per resolution, DDPM's objective and AdamW's group come from ``recipes/ddpm.py``; the batch size is
probed on the GPU and gradient accumulation fills ``--effective_batch``; the sample grids use the sampler
``infer.py ddpm`` uses. Writes ``checkpoints/<dataset>_<size>x<size>/ddpm_{best,final,last,epoch_N}.pt``, sample
grids and loss curves. The full guide (every flag, outputs, resuming, Kaggle cells): docs/ddpm.md.

    python train_ddpm_highres.py --dataset cifar10 --data_dir data --size 64
    python train_ddpm_highres.py --dataset cifar10 --data_dir data --size 64 --no-amp --no-compile
    python train_ddpm_highres.py --dataset imagenet --data_dir data --size 96     # STL-10 at its native 96 px
    python train_ddpm_highres.py --resume_from_checkpoint checkpoints/cifar10_64x64/ddpm_last.pt   # nothing else needed
    python train_ddpm_highres.py --dataset celeba --data_dir data --size 128 --num_processes 2   # two GPUs (DDP)
    accelerate launch --multi_gpu train_ddpm_highres.py --dataset celeba --data_dir data --size 128
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from data.image_datasets import DATASET_CHOICES, build_image_dataset, random_hflip
from models.ddpm_sampling import SAMPLERS, sample_ddpm
from models.ddpm_unet import UNET_PRESETS, preset_for_size
from recipes.ddpm import build_ddpm_training, complete_config
from utils.accelerator import PRECISION_DTYPES, create_accelerator, describe_device, log_run_header, reset_accelerate_state
from utils.batch_size import BatchPlan, plan_batches, probe_max_batch_size
from utils.checkpoint import load_checkpoint, resolve_resume, save_checkpoint_files
from utils.cli import add_training_arguments, parse_training_args
from utils.config import ArgumentParser, add_config_argument, save_config
from utils.ema import EMA
from utils.errors import UserError
from utils.images import save_grid
from utils.launch import cli_main, start_processes, under_launcher
from utils.log import TrainingProgress, log_image, log_scalars, setup_logger, start_tracking
from utils.plots import plot_curves
from utils.resume import check_saved_path, find_latest_run_checkpoint, given_flags, resolve_resumed_config
from utils.training import (
    BestMetric,
    CheckpointCadence,
    NonFiniteGuard,
    backward_and_step,
    check_finite,
    fused_optimizer,
    make_loader,
    out_of_memory_message,
    restore_rng,
    restore_training_checkpoint,
    training_checkpoint,
    unwrap,
)
from utils.validators import fraction_below_one, int_at_least, non_negative_int, positive_int

CHECKPOINT_KIND = "ddpm"
RESUME_PATTERNS = ["ddpm_last.pt", "ddpm_epoch_*.pt", "ddpm_final.pt"]
# Settings a resumed run cannot change: the network and what it learns to generate.
FIXED_ON_RESUME = ("size", "model", "dropout", "dataset")
BEST_LOSS_SMOOTHING = 0.9
LOG_EVERY = 10  # optimiser steps between tracker scalars (each one a host sync)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_config_argument(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASET_CHOICES, default="cifar10",
                      help="training images: a torchvision data set read from --data_dir, or 'folder' for any folder "
                      "of images; 'imagenet' is an alias of STL-10 (default cifar10)")
    data.add_argument("--data_dir", default="data", help="where the data set lives (default ./data)")
    data.add_argument("--download", action="store_true",
                      help="download a torchvision data set into --data_dir if it is missing (never done otherwise)")
    data.add_argument("--size", type=positive_int, default=None,
                      help="image side in pixels: 32, 64, 96 (STL-10), 128 or 256; picks the UNet (default 32, or the "
                      "resumed run's)")
    data.add_argument("--no-hflip", dest="hflip", action="store_false", help="turn off random horizontal flips")

    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=UNET_PRESETS.names(), default=None,
                       help="UNet preset; default: the paper-sized one for --size ('tiny' is for tests and the demo)")
    model.add_argument("--dropout", type=fraction_below_one, default=None,
                       help="dropout in the UNet's residual blocks (default: the preset's, 0.1 at 32/64/96 px as DDPM's "
                       "CIFAR-10 model, 0 at 128/256 px as its LSUN models); 0.1-0.2 against overfitting when a 128/256 "
                       "px model trains on a small data set (a few thousand images)")
    model.add_argument("--epochs", type=positive_int, default=50, help="epochs to train in total (default 50)")
    model.add_argument("--ema_decay", type=fraction_below_one, default=0.9999,
                       help="EMA decay of the weights used for sampling, reached after a warm-up (default 0.9999)")

    add_training_arguments(
        parser,
        defaults=dict(
            train_batch_size=None, effective_batch=32, learning_rate=None, lr_warmup_steps=5000, max_grad_norm=1.0,
            mixed_precision="auto", compile=True, dataloader_num_workers=None, seed=42, output_dir="checkpoints",
            resume_from_checkpoint=None, checkpointing_steps=0, checkpointing_minutes=0, checkpoints_total_limit=5,
            report_to=None, device="auto", num_processes=1,
        ),
        help={
            "train_batch_size": "batch per device and forward pass (the largest that fits, probed on the GPU, when not given)",
            "effective_batch": "images per optimiser step over all devices and accumulation steps; the accumulation "
                               "follows from it and the probed batch",
            "learning_rate": "peak learning rate (per size when not given: 2e-4 at 32 px as DDPM, 1e-4 at 64/96/128 px as "
                             "iDDPM, 2e-5 at 256 px as DDPM's LSUN models)",
            "lr_warmup_steps": "linear LR warm-up in optimiser steps (5000 as DDPM; lower it for short runs)",
            "max_grad_norm": "gradient-norm clipping, 0 turns it off (1.0 as DDPM)",
            "mixed_precision": "auto: bf16 where supported, else fp16 with loss scaling on CUDA; fp32 on CPU",
            # The family's written reason for the other default: the users' note turns compile on for every size.
            "compile": "torch.compile the UNet on CUDA, as the users' note (--no-compile turns it off; the other trainers "
                       "default to off)",
            "checkpointing_steps": "also rewrite the resumable ddpm_last.pt every N optimiser steps, 0 turns it off",
            "checkpointing_minutes": "also rewrite the resumable ddpm_last.pt every N minutes (Kaggle: e.g. 30), 0 turns it off",
            "checkpoints_total_limit": "keep only the newest K ddpm_epoch_N.pt files, 0 keeps all",
            "output_dir": "root of all outputs",
        },
    )

    out = parser.add_argument_group("outputs")
    out.add_argument("--name", default=None, help="experiment name (default <dataset>_<size>x<size>)")
    out.add_argument("--save_every", type=positive_int, default=10, help="write ddpm_epoch_N.pt every N epochs (default 10)")
    out.add_argument("--sample_every", type=positive_int, default=10,
                     help="sample grid and loss curve every N epochs, and at the end (default 10)")
    out.add_argument("--quick_every", type=non_negative_int, default=5,
                     help="few-step quick samples every N epochs to watch progress, 0 turns them off (default 5)")
    out.add_argument("--num_samples", type=positive_int, default=16, help="images in each sample grid (default 16)")
    out.add_argument("--sampler", choices=SAMPLERS.names(), default="dpmsolver++",
                     help="sampler of the sample grids and FID, as infer.py ddpm (default dpmsolver++: DDIM-50's accuracy in "
                     "15-20 steps, docs/benchmarks.md)")
    out.add_argument("--sample_steps", type=positive_int, default=None,
                     help="denoising steps of the sample grids (default: the sampler's, 25 for dpmsolver++/unipc, 100 for "
                     "ddim, 1000 for ddpm)")
    out.add_argument("--quick_steps", type=positive_int, default=25, help="DDIM steps of the quick samples (default 25)")
    out.add_argument("--fid_every", type=non_negative_int, default=0,
                     help="every N epochs and at the end, FID of --fid_samples EMA samples (--sampler, --sample_steps) "
                     "against the training images, logged as eval/fid (as lucidrains' Trainer; default 0: off)")
    out.add_argument("--fid_samples", type=int_at_least(2), default=1000,
                     help="samples per FID (default 1000: a trend, biased upwards against the 50k of published FIDs)")
    out.add_argument("--inception_weights", default=None,
                     help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth, needed by --fid_every")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_training_args(parser, argv)
    batch, effective = args.train_batch_size, args.effective_batch
    if batch and effective % batch and ({"train_batch_size", "effective_batch"} & set(args.given_flags)):
        parser.error(f"--effective_batch {effective} is not a multiple of --train_batch_size {batch}; pass --effective_batch "
                     f"{_multiples(effective, batch)}, or a --train_batch_size that divides it")
    for flag in ("epochs", "save_every", "sample_every", "num_samples", "sample_steps", "quick_steps"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.quick_every < 0:
        parser.error("--quick_every must not be negative")
    if args.fid_every < 0 or args.fid_samples < 2:
        parser.error("--fid_every must not be negative and --fid_samples must be at least 2")
    if args.dropout is not None and not 0.0 <= args.dropout < 1.0:
        parser.error("--dropout must be in [0, 1)")
    if args.size is not None and args.model is None:
        try:
            preset_for_size(args.size)
        except UserError as err:
            parser.error(str(err))
    return args


def _multiples(value: int, unit: int) -> str:
    """The multiples of ``unit`` nearest ``value``, as a suggestion: "8 or 16"."""
    below, above = value // unit * unit, (value // unit + 1) * unit
    return f"{below} or {above}" if below else str(above)


def experiment_paths(output_dir: str, name: str | None, dataset: str, size: int) -> dict[str, Path]:
    name = name or f"{dataset}_{size}x{size}"
    root = Path(output_dir)
    return {"run": root / name, "samples": root / "samples" / name, "progress": root / "training_progress" / name}


def resolve_config(args: argparse.Namespace, checkpoint: dict | None, source: str) -> argparse.Namespace:
    """The run's settings: the flags, then (resuming) the checkpoint's for every flag not given, then the defaults that
    depend on other settings (size, UNet preset, learning rate)."""
    saved = None
    if checkpoint is not None:
        saved = dict(checkpoint["config"])
        if saved.get("model") is None and "model_preset" in saved:  # checkpoints written before the house names
            saved["model"] = saved["model_preset"]
        if saved.get("dropout") is None:  # the preset's dropout, so a refused --dropout names the value trained with
            saved["dropout"] = checkpoint.get("model_config", {}).get("dropout")
    config = resolve_resumed_config(args, None, saved, fixed=FIXED_ON_RESUME, source=source)
    return complete_config(config)


def plan_batch_size(config, unet, objective, accelerator, logger, saved_plan: list[int] | None) -> BatchPlan:
    """Probe the largest batch on the GPU (unless --train_batch_size), then accumulate to --effective_batch.

    A resumed run keeps its batch plan (``saved_plan``: batch, accumulation, processes) unless the batch flags were
    given again; on another number of processes (a Kaggle session with one GPU instead of two) it keeps the batch and
    recomputes the accumulation, so the effective batch stays what the run was started with.
    """
    device = accelerator.device
    processes = accelerator.num_processes
    effective = config.effective_batch
    probed = None
    if saved_plan is not None:
        batch, accumulation, *planned_processes = saved_plan
        if not planned_processes or planned_processes[0] == processes:  # older checkpoints carry no process count
            plan = BatchPlan(batch, accumulation, processes)
            logger.info("%s (the resumed run's plan)", plan.describe(describe_device(device)))
            return plan
        effective = batch * accumulation * planned_processes[0]
        plan = plan_batches(effective, batch, processes)
        logger.info("%s (the resumed run's effective batch, planned for %d processes, now on %d)",
                    plan.describe(describe_device(device)), planned_processes[0], processes)
        return plan
    if config.train_batch_size:
        max_batch = config.train_batch_size
        unit = config.train_batch_size * processes
        if effective % unit:  # the plan would change the batch or the effective batch the user asked for
            raise UserError(
                f"--effective_batch {effective} is not a multiple of --train_batch_size {config.train_batch_size} x "
                f"{processes} process(es); pass --effective_batch {_multiples(effective, unit)}, or a --train_batch_size that "
                "divides it."
            )
    elif device.type == "cuda":
        def training_step(model, optimizer, batch):
            images = torch.randn(batch, 3, config.size, config.size, device=device)
            with accelerator.autocast():
                loss = objective(images, model=model)["loss"]
            loss.backward()
            optimizer.step()

        limit = math.ceil(effective / processes)
        probed = probe_max_batch_size(unet, training_step, device, limit=1 << (limit - 1).bit_length())
        probed = int(accelerator.gather(torch.tensor([probed], device=device)).min())
        max_batch = probed
    else:
        max_batch = math.ceil(effective / processes)
    plan = plan_batches(effective, max_batch, processes, probed)
    logger.info(plan.describe(describe_device(device)))
    return plan


@dataclass
class Run:
    """The objects one training run holds while it loops (what the checkpoint and sampling helpers read)."""

    config: argparse.Namespace
    accelerator: object
    unet: torch.nn.Module  # as prepared by accelerate
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMA
    scheduler_config: dict
    plan: BatchPlan
    paths: dict
    best: BestMetric
    fid_reference: tuple | None
    history: list
    step: int = 0


def save_run(run: Run, epoch: int, copies: list[Path], batches_done: int = 0, meter=None) -> None:
    """Rewrite the resumable ``ddpm_last.pt`` (and ``copies``), atomically, on the main process."""
    config, accelerator, plan = run.config, run.accelerator, run.plan
    state = training_checkpoint(
        CHECKPOINT_KIND, accelerator, run.unet, run.optimizer, dict(vars(config)), run.step, epoch, run.lr_scheduler, run.ema,
        model_preset=config.model,
        model_config=dict(unwrap(accelerator, run.unet).config),
        scheduler_config=run.scheduler_config,
        loss_history=run.history,
        best=run.best.state_dict(),
        best_loss=run.best.best,
        batch_plan=[plan.batch_size, plan.accumulation, plan.num_processes],
        batches_done=batches_done,
        epoch_loss_sum=[float(meter.total), meter.count] if meter is not None and meter.count else None,
    )
    if accelerator.is_main_process:
        save_checkpoint_files(state, run.paths["run"] / "ddpm_last.pt", copies, rotate_pattern="ddpm_epoch_*.pt",
                              keep=config.checkpoints_total_limit)


def sample_grid(run: Run, path: Path, steps: int, sampler: str, epoch: int, logger) -> None:
    """A grid of EMA samples, drawn by the function ``infer.py ddpm`` calls."""
    bare = unwrap(run.accelerator, run.unet)
    with run.ema.averaged_weights(bare):
        images = sample_ddpm(bare, run.scheduler_config, run.config.num_samples, steps, sampler, seed=run.config.seed,
                             autocast_dtype=_autocast_dtype(run.accelerator))
    save_grid(images, path, nrow=math.ceil(math.sqrt(run.config.num_samples)))
    log_image(run.accelerator, f"samples/{path.stem}", path, run.step)
    logger.info("epoch %d: %s", epoch, path)


def log_fid(run: Run, epoch: int, logger) -> None:
    config = run.config
    bare = unwrap(run.accelerator, run.unet)
    with run.ema.averaged_weights(bare):
        fid = training_fid(bare, run.scheduler_config, config, run.fid_reference, run.paths["run"] / "fid_cache",
                           _autocast_dtype(run.accelerator))
    log_scalars(run.accelerator, {"eval/fid": fid}, run.step)
    logger.info("epoch %d: FID %.3f (%d EMA samples, %s %d steps, vs %s)", epoch, fid, config.fid_samples, config.sampler,
                config.sample_steps, run.fid_reference[0])


def end_of_epoch(run: Run, done: int, epoch_loss: float, seconds: float, images_seen: int, logger) -> None:
    """Log, checkpoint, and draw the sample grids, loss curve and FID that are due after epoch ``done``."""
    config, accelerator, paths = run.config, run.accelerator, run.paths
    run.history.append(epoch_loss)
    is_best = run.best.update(epoch_loss, done)
    logger.info(
        "epoch %d/%d | loss %.4f | best %.4f (smoothed, epoch %d) | step %d | lr %.2e | %.1f s, %.1f img/s",
        done, config.epochs, epoch_loss, run.best.best, run.best.epoch, run.step, run.lr_scheduler.get_last_lr()[0], seconds,
        images_seen * accelerator.num_processes / seconds,
    )
    log_scalars(accelerator, {"epoch/loss": epoch_loss, "epoch/loss_smoothed_best": run.best.best, "epoch/epoch": done}, run.step)
    is_final = done == config.epochs
    copies = [paths["run"] / f"ddpm_epoch_{done}.pt"] if done % config.save_every == 0 else []
    copies += [paths["run"] / "ddpm_best.pt"] if is_best else []
    copies += [paths["run"] / "ddpm_final.pt"] if is_final else []
    save_run(run, done, copies)
    if accelerator.is_main_process:
        if config.quick_every and done % config.quick_every == 0:
            sample_grid(run, paths["progress"] / f"quick_epoch_{done}.png", config.quick_steps, "ddim", done, logger)
        if done % config.sample_every == 0 or is_final:
            sample_grid(run, paths["samples"] / f"epoch_{done}_samples.png", config.sample_steps, config.sampler, done, logger)
            plot_curves({"train loss (epoch mean)": run.history}, paths["samples"] / f"loss_curve_epoch_{done}.png",
                        title=f"{paths['run'].name}: epsilon MSE", log_y=True)
        if config.fid_every and (done % config.fid_every == 0 or is_final):
            log_fid(run, done, logger)
    accelerator.wait_for_everyone()


def restore_run(run: Run, checkpoint: dict, logger) -> tuple[int, int, list | None]:
    """Load a resumed checkpoint into ``run``; ``(start epoch, batches done within it, their loss sum)``."""
    restore_training_checkpoint(checkpoint, run.accelerator, run.unet, run.optimizer, run.lr_scheduler, run.ema)
    run.step, start_epoch = checkpoint["step"], checkpoint["epoch"]
    run.history = list(checkpoint["loss_history"])
    if "best" in checkpoint:
        run.best.load_state_dict(checkpoint["best"])
    skip_batches = int(checkpoint.get("batches_done", 0))
    partial = checkpoint.get("epoch_loss_sum")
    restore_rng(checkpoint, run.accelerator)
    logger.info("resumed at epoch %d%s, optimiser step %d, lr %.3e", start_epoch,
                f" (+{skip_batches} batches)" if skip_batches else "", run.step, run.lr_scheduler.get_last_lr()[0])
    return start_epoch, skip_batches, partial


def resolve_run(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None, Path | None, dict[str, Path]]:
    """``(config, checkpoint, resume_path, paths)``: the run's settings, with the checkpoint it resumes from, if any."""
    checkpoint, resume_path = None, None
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":  # an explicit file supplies every setting not given as a flag
        resume_path = resolve_resume(resume, ".", RESUME_PATTERNS)
        checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_ddpm_highres.py --resume_from_checkpoint")
    config = resolve_config(args, checkpoint, str(resume_path))
    paths = experiment_paths(config.output_dir, config.name, config.dataset, config.size)
    if resume == "latest":
        # The run folder the flags name, else (no --name given) the newest run under --output_dir: its folder name
        # depends on --dataset and --size, which `latest` alone does not repeat.
        search = paths["run"] if "name" in given_flags(args) else config.output_dir
        resume_path = find_latest_run_checkpoint(search, RESUME_PATTERNS, run_dir=paths["run"], max_depth=1)
        if resume_path is not None:
            checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_ddpm_highres.py --resume_from_checkpoint")
            config = resolve_config(args, checkpoint, str(resume_path))
            paths = experiment_paths(config.output_dir, config.name, config.dataset, config.size)
    if checkpoint is not None and "data_dir" not in given_flags(args) and config.dataset == "folder":
        check_saved_path(config, "data_dir", resume_path, "image folder")
    return config, checkpoint, resume_path, paths


def check_inputs(config: argparse.Namespace) -> None:
    """What the run reads before it trains: FID's weight file (with --fid_every) and the training images, downloaded
    here with --download (in the parent of --num_processes N, so that N processes do not download at once)."""
    if config.fid_every:
        fid_reference_for(config)
    build_image_dataset(config.dataset, config.data_dir, config.size, hflip=False, download=config.download)


def main(args: argparse.Namespace) -> dict:
    if args.num_processes > 1 and not under_launcher():
        raise UserError(f"--num_processes {args.num_processes} starts {args.num_processes} processes from the command line "
                        "(python train_ddpm_highres.py ... --num_processes N); from Python call train_ddpm_highres.launch(argv) "
                        "or use torchrun.")
    reset_accelerate_state()
    config, checkpoint, resume_path, paths = resolve_run(args)
    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision, cpu=config.device == "cpu", seed=config.seed, compile_model=config.compile,
        project_dir=str(paths["run"]), report_to=config.report_to,
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    is_main = accelerator.is_main_process
    logger = setup_logger(paths["run"], is_main)
    if under_launcher() and config.num_processes not in (1, accelerator.num_processes):
        logger.warning("--num_processes %d, but the launcher started %d processes; training on %d", config.num_processes,
                       accelerator.num_processes, accelerator.num_processes)
    logger.info("experiment %s: %s", paths["run"].name, f"resuming from {resume_path}" if resume_path else "new run")

    fid_reference = fid_reference_for(config) if config.fid_every else None  # a missing weight file stops here
    parts = build_ddpm_training(config, accelerator.device, checkpoint=checkpoint)
    unet, dataset, channels_last = parts.model, parts.datasets["train"], parts.extras["channels_last"]
    if config.dataset == "imagenet":
        logger.info("--dataset imagenet is STL-10 (96 px, 105k images of 10 ImageNet-like classes), resized to %d px", config.size)
    logger.info("UNet '%s' at %d px (dropout %g): %.1fM parameters", config.model, config.size, unet.config.dropout,
                sum(p.numel() for p in unet.parameters()) / 1e6)

    keeps_plan = checkpoint is not None and not {"train_batch_size", "effective_batch"} & given_flags(args)
    saved_plan = checkpoint.get("batch_plan", checkpoint["config"].get("batch_plan")) if keeps_plan else None
    plan = plan_batch_size(config, unet, parts.objective, accelerator, logger, saved_plan)
    accelerator.gradient_accumulation_steps = plan.accumulation
    loader = make_loader(dataset, plan.batch_size, workers=config.dataloader_num_workers, device_type=accelerator.device.type,
                         seed=config.seed)
    optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused_optimizer(accelerator.device))
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // plan.accumulation)
    warmup = config.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    ema = EMA(unwrap(accelerator, unet), decay=config.ema_decay)
    run = Run(config, accelerator, unet, optimizer, lr_scheduler, ema, dict(parts.extras["noise_scheduler"].config), plan, paths,
              BestMetric("min", smoothing=BEST_LOSS_SMOOTHING), fid_reference, history=[])

    start_epoch, skip_batches, partial = 0, 0, None  # a checkpoint written within an epoch: batches already done, their loss sum
    if checkpoint is not None:
        start_epoch, skip_batches, partial = restore_run(run, checkpoint, logger)
        del checkpoint
    if is_main:
        save_config(dict(vars(config)), paths["run"] / "args.yaml")
    start_tracking(accelerator, paths["run"].name, dict(vars(config)))
    log_run_header(logger, accelerator, plan.batch_size,
                   f"{steps_per_epoch} optimiser steps per epoch, lr {config.learning_rate:g}, warm-up {warmup} steps, "
                   f"clipping {config.max_grad_norm:g}")

    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    guard = NonFiniteGuard(accelerator.device, model=unet)  # also stops diverging weights whose loss stays finite
    for epoch in range(start_epoch, config.epochs):
        unet.train()
        loader.set_epoch(epoch)
        batches = loader
        if skip_batches:  # continue a checkpoint written within this epoch at its next batch
            batches = accelerator.skip_first_batches(loader, skip_batches)
        progress = TrainingProgress(len(loader), f"epoch {epoch + 1}/{config.epochs}", enabled=is_main, initial=skip_batches)
        if partial:
            progress.epoch_meter.total = torch.tensor(partial[0], device=accelerator.device)
            progress.epoch_meter.count = int(partial[1])
        batches_done, skip_batches, partial = skip_batches, 0, None
        started, images_seen = time.perf_counter(), 0
        for images in batches:
            if config.hflip:
                images = random_hflip(images, config.seed, epoch, batches_done, accelerator.process_index)
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            try:
                with accelerator.accumulate(unet):
                    loss = parts.objective(images, model=unet)["loss"]
                    backward_and_step(accelerator, loss, optimizer, unet.parameters(), config.max_grad_norm)
            except torch.OutOfMemoryError as err:
                raise UserError(out_of_memory_message(plan.batch_size, " (--effective_batch)")) from err
            guard.update(loss, run.step + 1)
            batches_done += 1
            images_seen += images.shape[0]
            progress.update(loss, lr_scheduler.get_last_lr()[0])
            if accelerator.sync_gradients:
                lr_scheduler.step()
                ema.update(unwrap(accelerator, unet))
                run.step += 1
                if run.step % LOG_EVERY == 0:
                    guard.check(accelerator)
                    log_scalars(accelerator, {"train/loss": loss, "train/lr": lr_scheduler.get_last_lr()[0]}, run.step)
                if batches_done < len(loader) and cadence.due(run.step, accelerator):
                    guard.check(accelerator)
                    save_run(run, epoch, [], batches_done, progress.epoch_meter)
                    cadence.saved()
        progress.close()
        guard.check(accelerator)

        epoch_loss = float(accelerator.gather(progress.epoch_meter.total[None] / progress.epoch_meter.count).mean())
        check_finite(epoch_loss, run.step)
        end_of_epoch(run, epoch + 1, epoch_loss, time.perf_counter() - started, images_seen, logger)
        cadence.saved()

    logger.info("done: checkpoints in %s, samples in %s", paths["run"], paths["samples"])
    accelerator.end_training()
    return {"history": run.history, "paths": paths, "step": run.step, "config": config, "best_epoch": run.best.epoch}


def fid_reference_for(config) -> tuple[str, str | None]:
    """``(reference, datasets_root)`` for torch-fidelity: the training folder or CIFAR-10; the weight file is checked."""
    from utils.generation_metrics import check_inception_weights, require_torch_fidelity

    require_torch_fidelity()
    check_inception_weights(config.inception_weights)
    if config.dataset == "folder":
        return str(config.data_dir), None
    if config.dataset == "cifar10":
        return "cifar10", str(config.data_dir)
    raise UserError(f"--fid_every compares with --dataset folder or cifar10, not {config.dataset}; drop it and score samples "
                    "with infer.py ddpm --save_images and scripts/eval_generation.py.")


def training_fid(unet, scheduler_config: dict, config, reference: tuple[str, str | None], cache_dir: Path, autocast) -> float:
    """FID of ``config.fid_samples`` samples (seed ``config.seed``) against the reference, through a temporary folder."""
    import tempfile

    from utils.generation_metrics import compute_generation_metrics
    from utils.images import tensor_to_pil

    with tempfile.TemporaryDirectory(prefix="ddpm_fid_") as folder:
        for start in range(0, config.fid_samples, 256):  # bounded memory at any image size
            count = min(256, config.fid_samples - start)
            images = sample_ddpm(unet, scheduler_config, count, config.sample_steps, config.sampler, seed=config.seed + start,
                                 autocast_dtype=autocast)
            for index, image in enumerate(images):
                tensor_to_pil(image).save(Path(folder) / f"{start + index:06d}.png")
        values = compute_generation_metrics(folder, reference[0], config.inception_weights, ("fid",),
                                            device=str(next(unet.parameters()).device), cache_dir=cache_dir, datasets_root=reference[1])
    return values["frechet_inception_distance"]


def _autocast_dtype(accelerator) -> torch.dtype | None:
    return PRECISION_DTYPES.get(accelerator.mixed_precision)


def launch(argv: list[str] | None = None) -> None:
    """Command-line entry: one process, or ``--num_processes N`` processes through torch.distributed.run.

    With N > 1 the settings, the resumed checkpoint and the inputs are checked here, in the parent, before any process
    starts; a user error found later inside a process is raised here once as a UserError.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.num_processes > 1 and not under_launcher():
        start_processes(__file__, argv, args.num_processes, args.device, lambda: check_inputs(resolve_run(args)[0]))
        return
    main(args)


if __name__ == "__main__":
    cli_main(launch)
