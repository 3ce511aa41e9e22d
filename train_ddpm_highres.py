"""Train a pixel-space DDPM (Ho et al. 2020) at 32, 64, 128 or 256 px.

The UNet is chosen per resolution (models/ddpm_unet.py), the batch size is probed on the GPU and gradient
accumulation fills up the effective batch, mixed precision and torch.compile are on by default on CUDA, and the
sampler used for the sample grids is the one ``infer.py ddpm`` uses.

    python train_ddpm_highres.py --dataset cifar10 --data_dir data --size 64
    python train_ddpm_highres.py --dataset cifar10 --data_dir data --size 64 --no-amp --no-compile
    python train_ddpm_highres.py --dataset cifar10 --data_dir data --size 64 --resume latest
    accelerate launch --multi_gpu train_ddpm_highres.py --dataset celeba --data_dir data --size 128

Writes (``--output_dir checkpoints``, experiment name ``<dataset>_<size>x<size>`` unless ``--name``)::

    checkpoints/<name>/ddpm_best.pt, ddpm_final.pt, ddpm_epoch_N.pt, ddpm_last.pt, args.yaml, train.log
    checkpoints/samples/<name>/epoch_N_samples.png, loss_curve_epoch_N.png
    checkpoints/training_progress/<name>/quick_epoch_N.png
"""

from __future__ import annotations

import argparse
import math
import shutil
import time
from pathlib import Path

import torch

from data.image_datasets import DATASET_CHOICES, build_image_dataset
from models.ddpm_sampling import SAMPLERS, ddpm_loss, make_noise_scheduler, sample_ddpm
from models.ddpm_unet import DDPM_PRESETS, build_ddpm_unet, default_learning_rate, preset_for_size
from utils.accelerator import create_accelerator, describe_device, log_run_header, reset_accelerate_state
from utils.batch_size import plan_batches, probe_max_batch_size
from utils.checkpoint import atomic_torch_save, atomic_write, load_checkpoint, resolve_resume, rotate_checkpoints
from utils.config import add_config_argument, parse_with_config, save_config
from utils.ema import EMA
from utils.errors import UserError, run_cli
from utils.images import save_grid
from utils.log import TrainingProgress, setup_logger
from utils.plots import plot_curves
from utils.training import (
    backward_and_step,
    check_finite,
    make_loader,
    out_of_memory_message,
    restore_rng,
    restore_training_checkpoint,
    training_checkpoint,
    unwrap,
)

CHECKPOINT_KIND = "ddpm"
RESUME_PATTERNS = ["ddpm_last.pt", "ddpm_epoch_*.pt", "ddpm_final.pt"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
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
    data.add_argument("--size", type=int, default=None,
                      help="image side in pixels: 32, 64, 128 or 256; picks the UNet (default 32, or the resumed run's)")
    data.add_argument("--no-hflip", dest="hflip", action="store_false", help="turn off random horizontal flips")
    data.add_argument("--workers", type=int, default=None,
                      help="data-loader worker processes (default: up to 8 on CUDA, 0 on CPU)")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--model", choices=list(DDPM_PRESETS), default=None,
                       help="UNet preset; default: the paper-sized one for --size ('tiny' is for tests and the demo)")
    model.add_argument("--epochs", type=int, default=50, help="epochs to train in total (default 50)")
    model.add_argument("--lr", type=float, default=None,
                       help="peak learning rate (default per size: 2e-4 at 32 px as DDPM, 1e-4 at 64/128 px as "
                       "iDDPM, 2e-5 at 256 px as DDPM's LSUN models)")
    model.add_argument("--warmup_steps", type=int, default=5000,
                       help="linear LR warm-up in optimiser steps (default 5000 as DDPM; lower it for short runs)")
    model.add_argument("--batch_size", type=int, default=None,
                       help="batch per device and forward pass (default: the largest that fits, probed on the GPU)")
    model.add_argument("--effective_batch", type=int, default=32,
                       help="images per optimiser step over all devices and accumulation steps (default 32)")
    model.add_argument("--grad_clip", type=float, default=1.0, help="gradient-norm clipping, 0 turns it off (default 1.0 as DDPM)")
    model.add_argument("--ema_decay", type=float, default=0.9999,
                       help="EMA decay of the weights used for sampling, reached after a warm-up (default 0.9999)")
    model.add_argument("--no-amp", dest="amp", action="store_false",
                       help="train in fp32 (default on CUDA: bf16 where supported, else fp16 with loss scaling)")
    model.add_argument("--no-compile", dest="compile", action="store_false",
                       help="do not torch.compile the UNet (default: compiled on CUDA)")
    model.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                       help="auto uses the GPU when there is one (default auto)")
    model.add_argument("--seed", type=int, default=42, help="seed of initialisation, data order and noise (default 42)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--output_dir", default="checkpoints", help="root of all outputs (default ./checkpoints)")
    out.add_argument("--name", default=None, help="experiment name (default <dataset>_<size>x<size>)")
    out.add_argument("--resume", default=None,
                     help="checkpoint to continue from, or 'latest' for the newest one of this experiment")
    out.add_argument("--save_every", type=int, default=10, help="write ddpm_epoch_N.pt every N epochs (default 10)")
    out.add_argument("--keep_last", type=int, default=5,
                     help="keep only the newest K ddpm_epoch_N.pt files, 0 keeps all (default 5)")
    out.add_argument("--sample_every", type=int, default=10,
                     help="sample grid and loss curve every N epochs, and at the end (default 10)")
    out.add_argument("--quick_every", type=int, default=5,
                     help="few-step quick samples every N epochs to watch progress, 0 turns them off (default 5)")
    out.add_argument("--num_samples", type=int, default=16, help="images in each sample grid (default 16)")
    out.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                     help="sampler of the sample grids, as infer.py ddpm (default ddim)")
    out.add_argument("--sample_steps", type=int, default=100, help="denoising steps of the sample grids (default 100)")
    out.add_argument("--quick_steps", type=int, default=25, help="DDIM steps of the quick samples (default 25)")
    args = parse_with_config(parser, argv)

    for flag in ("epochs", "effective_batch", "save_every", "sample_every", "num_samples", "sample_steps", "quick_steps"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch_size must be at least 1")
    if args.size is not None and args.model is None:
        try:
            preset_for_size(args.size)
        except UserError as err:
            parser.error(str(err))
    return args


def experiment_paths(args) -> dict[str, Path]:
    name = args.name or f"{args.dataset}_{args.size}x{args.size}"
    root = Path(args.output_dir)
    return {
        "run": root / name,
        "samples": root / "samples" / name,
        "progress": root / "training_progress" / name,
    }


def plan_batch_size(args, unet, scheduler, accelerator, logger):
    """Probe the largest batch on the GPU (unless --batch_size), then accumulate to --effective_batch."""
    device = accelerator.device
    processes = accelerator.num_processes
    effective = args.effective_batch
    probed = None
    if args.batch_size:
        max_batch = args.batch_size
        effective = max(effective, args.batch_size * processes)
    elif device.type == "cuda":
        def training_step(model, optimizer, batch):
            images = torch.randn(batch, 3, args.size, args.size, device=device)
            with accelerator.autocast():
                loss = ddpm_loss(model, scheduler, images)
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


def main(args: argparse.Namespace) -> dict:
    reset_accelerate_state()
    checkpoint, resume_path = None, None
    if args.resume and args.resume != "latest":  # an explicit file supplies the size and UNet not given as flags
        resume_path = resolve_resume(args.resume, ".", RESUME_PATTERNS)
        checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_ddpm_highres.py --resume")
        args.size = args.size or checkpoint["config"]["size"]
        args.model = args.model or checkpoint["config"]["model_preset"]
    args.size = args.size or 32
    paths = experiment_paths(args)
    if args.resume == "latest":
        resume_path = resolve_resume("latest", paths["run"], RESUME_PATTERNS)
        if resume_path is not None:
            checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_ddpm_highres.py --resume")
    preset = args.model or preset_for_size(args.size)
    if checkpoint is not None:
        trained = checkpoint["config"]
        if (trained["size"], trained["model_preset"]) != (args.size, preset):
            raise UserError(
                f"{resume_path} was trained at {trained['size']} px with the '{trained['model_preset']}' UNet, not "
                f"{args.size} px with '{preset}'; resume with --size {trained['size']} --model {trained['model_preset']}."
            )
    args.model_preset = preset
    if args.lr is None:
        args.lr = default_learning_rate(preset)

    accelerator = create_accelerator(
        mixed_precision="auto" if args.amp else "no",
        cpu=args.device == "cpu",
        seed=args.seed,
        compile_model=args.compile,
    )
    if args.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    is_main = accelerator.is_main_process
    logger = setup_logger(paths["run"], is_main)
    logger.info("experiment %s: %s", paths["run"].name, f"resuming from {resume_path}" if resume_path else "new run")

    dataset = build_image_dataset(args.dataset, args.data_dir, args.size, hflip=args.hflip, download=args.download)
    if args.dataset == "imagenet":
        logger.info("--dataset imagenet is STL-10 (96 px, 105k images of 10 ImageNet-like classes), resized to %d px", args.size)
    unet = build_ddpm_unet(preset, args.size).to(accelerator.device)
    channels_last = accelerator.device.type == "cuda"
    if channels_last:  # convolution-heavy: NHWC kernels are faster under AMP
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = make_noise_scheduler()
    logger.info("UNet '%s' at %d px: %.1fM parameters", preset, args.size, sum(p.numel() for p in unet.parameters()) / 1e6)

    plan = plan_batch_size(args, unet, scheduler, accelerator, logger)
    if checkpoint is not None and args.batch_size is None:
        plan.batch_size, plan.accumulation = checkpoint["config"]["batch_plan"]  # same batches as before the pause
    args.batch_plan = [plan.batch_size, plan.accumulation]
    accelerator.gradient_accumulation_steps = plan.accumulation
    loader = make_loader(dataset, plan.batch_size, workers=args.workers, device_type=accelerator.device.type)
    optimizer = torch.optim.AdamW(
        unet.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=0.0, fused=accelerator.device.type == "cuda"
    )
    unet, optimizer, loader = accelerator.prepare(unet, optimizer, loader)
    steps_per_epoch = max(1, len(loader) // plan.accumulation)
    warmup = args.warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup + 1)))
    ema = EMA(unwrap(accelerator, unet), decay=args.ema_decay)

    step, start_epoch, history, best_loss = 0, 0, [], math.inf
    if checkpoint is not None:
        restore_training_checkpoint(checkpoint, accelerator, unet, optimizer, lr_scheduler, ema)
        step, start_epoch = checkpoint["step"], checkpoint["epoch"]
        history, best_loss = list(checkpoint["loss_history"]), checkpoint["best_loss"]
        restore_rng(checkpoint, accelerator)
        logger.info("resumed at epoch %d, optimiser step %d", start_epoch, step)
        del checkpoint
    if is_main:
        save_config(args, paths["run"] / "args.yaml")
    log_run_header(logger, accelerator, plan.batch_size, f"{steps_per_epoch} optimiser steps per epoch, lr {args.lr:g}")

    def save(epoch: int, epoch_loss: float, is_best: bool, is_final: bool) -> None:
        state = training_checkpoint(
            CHECKPOINT_KIND, accelerator, unet, optimizer, args, step, epoch, lr_scheduler, ema,
            model_config=dict(unwrap(accelerator, unet).config),
            scheduler_config=dict(scheduler.config),
            loss_history=history,
            best_loss=best_loss,
        )
        if not is_main:
            return
        run = paths["run"]
        last = atomic_torch_save(state, run / "ddpm_last.pt")
        copies = []
        if epoch % args.save_every == 0:
            copies.append(run / f"ddpm_epoch_{epoch}.pt")
        if is_best:
            copies.append(run / "ddpm_best.pt")
        if is_final:
            copies.append(run / "ddpm_final.pt")
        for target in copies:
            atomic_write(target, lambda tmp: shutil.copyfile(last, tmp))
        rotate_checkpoints(run, "ddpm_epoch_*.pt", args.keep_last)

    def sample_grid(path: Path, steps: int, sampler: str, epoch: int) -> None:
        bare = unwrap(accelerator, unet)
        with ema.averaged_weights(bare):
            images = sample_ddpm(
                bare, dict(scheduler.config), args.num_samples, steps, sampler, seed=args.seed,
                autocast_dtype=_autocast_dtype(accelerator),
            )
        save_grid(images, path, nrow=math.ceil(math.sqrt(args.num_samples)))
        logger.info("epoch %d: %s", epoch, path)

    for epoch in range(start_epoch, args.epochs):
        unet.train()
        loader.set_epoch(epoch)
        progress = TrainingProgress(len(loader), f"epoch {epoch + 1}/{args.epochs}", enabled=is_main)
        started = time.perf_counter()
        for images in loader:
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            try:
                with accelerator.accumulate(unet):
                    loss = ddpm_loss(unet, scheduler, images)
                    backward_and_step(accelerator, loss, optimizer, unet.parameters(), args.grad_clip)
            except torch.OutOfMemoryError as err:
                raise UserError(out_of_memory_message(plan.batch_size, " (--effective_batch)")) from err
            if accelerator.sync_gradients:
                lr_scheduler.step()
                ema.update(unwrap(accelerator, unet))
                step += 1
            progress.update(loss, lr_scheduler.get_last_lr()[0])
        progress.close()

        epoch_loss = float(accelerator.gather(progress.epoch_meter.total[None] / progress.epoch_meter.count).mean())
        check_finite(epoch_loss, step)
        history.append(epoch_loss)
        done = epoch + 1
        is_best = epoch_loss < best_loss
        best_loss = min(best_loss, epoch_loss)
        seconds = time.perf_counter() - started
        logger.info(
            "epoch %d/%d | loss %.4f | best %.4f | step %d | lr %.2e | %.1f s, %.1f img/s",
            done, args.epochs, epoch_loss, best_loss, step, lr_scheduler.get_last_lr()[0], seconds,
            len(loader) * plan.batch_size * accelerator.num_processes / seconds,
        )
        is_final = done == args.epochs
        save(done, epoch_loss, is_best, is_final)
        if is_main:
            if args.quick_every and done % args.quick_every == 0:
                sample_grid(paths["progress"] / f"quick_epoch_{done}.png", args.quick_steps, "ddim", done)
            if done % args.sample_every == 0 or is_final:
                sample_grid(paths["samples"] / f"epoch_{done}_samples.png", args.sample_steps, args.sampler, done)
                plot_curves({"train loss (epoch mean)": history}, paths["samples"] / f"loss_curve_epoch_{done}.png",
                            title=f"{paths['run'].name}: epsilon MSE", log_y=True)
        accelerator.wait_for_everyone()

    logger.info("done: checkpoints in %s, samples in %s", paths["run"], paths["samples"])
    accelerator.end_training()
    return {"history": history, "paths": paths, "step": step}


def _autocast_dtype(accelerator) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
