"""Train Phaseformer (Khan et al., WACV 2025) for underwater image enhancement on paired data (the users' ``trains.py``).

The network, its weighted loss (Charbonnier, VGG perceptual, Laplacian gradient, 1 - MS-SSIM per output, then the
two outputs) and Adam's parameter groups come from ``recipes/phaseformer.py``; the paper's behaviour is the default
and each behaviour of the official ``train.py`` is a flag (``--reference_behaviour`` sets them all). Writes
``<output_dir>/checkpoint/<dataset name>/netG_model_{epoch_N,best,latest}.pth``, ``history.csv`` and plots. The full
guide (every flag, the reference differences, outputs, Kaggle cells): docs/phaseformer.md.

    python train_phaseformer.py --dataset_path /data/LSUI --batch_size 8 --niter 50 --niter_decay 500 --lr 0.001
    python train_phaseformer.py --resume checkpoint/LSUI/netG_model_epoch_100.pth --dataset_path /data/LSUI
    python train_phaseformer.py --dataset_path /data/LSUI /data/UIEB --resume_from_checkpoint latest   # union of two sets
    accelerate launch --multi_gpu train_phaseformer.py --dataset_path /data/LSUI --train_batch_size 4
    python train_phaseformer.py --dataset_path /data/LSUI --reference_behaviour            # the official train.py
    python train_phaseformer.py --dataset_path /data/LSUI --checkpointing_minutes 30      # Kaggle: never lose more than 30 min
"""

from __future__ import annotations

import argparse
import csv
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from data.paired import FLIP_MODES, H_TARGETS, RESIZE_MODES
from losses import PhaseformerLoss, loss_weight_parameters
from losses.weighted import WEIGHTING_MODES
from models.phaseformer import ECA_GATES, PHASEFORMER_PRESETS
from models.phaseformer_enhance import (
    VALUE_RANGES,
    enhance,
    plain_model_config,
)
from recipes.phaseformer import build_phaseformer_training
from utils.accelerator import create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import atomic_write, load_checkpoint, resolve_resume, save_checkpoint_files
from utils.cli import add_training_arguments, parse_training_args
from utils.config import ArgumentParser, add_config_argument, save_config
from utils.errors import CheckpointError, UserError, run_cli
from utils.images import save_grid
from utils.log import TrainingProgress, log_image, log_scalars, setup_logger, start_tracking
from utils.metrics import SSIM_SIGMA, SSIM_WINDOW_SIZE, batch_psnr, batch_ssim
from utils.plots import plot_curves
from utils.resume import check_saved_path, find_latest_run_checkpoint, given_flags, resolve_resumed_config
from utils.training import (
    BestMetric,
    CheckpointCadence,
    NonFiniteGuard,
    backward_and_step,
    fused_optimizer,
    make_loader,
    out_of_memory_message,
    restore_rng,
    restore_training_checkpoint,
    training_checkpoint,
    unwrap,
)
from utils.validators import fraction_below_one, int_at_least, non_negative_float, non_negative_int, positive_int, seed

CHECKPOINT_KIND = "phaseformer"
LOG_EVERY = 10  # optimiser steps between tracker scalars (each one a host sync)
RESUME_PATTERNS = ["netG_model_latest.pth", "netG_model_epoch_*.pth"]

# What the official train.py does (--reference_behaviour) and what the paper means (the defaults).
REFERENCE_BEHAVIOUR = {
    "pixel_loss": "smoothl1", "msssim_as_similarity": True, "value_range": "signed_reference", "vgg_resize_224": True,
    "loss_weighting": "softmax_frozen", "h_target": "resize_gt", "eca": "phase",
}
CORRECT_BEHAVIOUR = {
    "pixel_loss": "charbonnier", "msssim_as_similarity": False, "value_range": "unit", "vgg_resize_224": False,
    "loss_weighting": "softmax", "h_target": "upsample", "eca": "feature",
}
# A resumed run cannot change these: they change the network or the shape of the loss weights.
FIXED_ON_RESUME = ("model", "eca", "loss_weighting", "no_perceptual", "value_range")
# Never taken from a resumed checkpoint (beside utils.resume.SESSION_SETTINGS): they describe this session.
NOT_INHERITED = ("stop_epoch", "init_weights", "reference_behaviour")
NAN_HINT = (", or train in bf16/fp32 instead of fp16; a learned loss weighting whose term reaches zero can also diverge "
            "(try --loss_weighting fixed)")


def eval_size_type(value: str) -> int | str:
    if str(value).lower() == "full":
        return "full"
    try:
        size = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a side in pixels (e.g. 256) or 'full', got {value!r}") from None
    if size < 16:
        raise argparse.ArgumentTypeError(f"--eval_size must be at least 16 px, got {size}")
    return size


def test_split_type(value: str) -> int | float:
    """A count of test pairs (a whole number >= 1) or a fraction of the pairs in (0, 1)."""
    try:
        number = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a count or a fraction, got {value!r}") from None
    if not (0 < number < 1 or (number >= 1 and number == int(number))):
        raise argparse.ArgumentTypeError(f"must be a count of test pairs (1, 2, ...) or a fraction in (0, 1), got {value}")
    return int(number) if number >= 1 else number


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_config_argument(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--dataset_path", nargs="+", default=None,
                      help="one or more dataset folders in the LSUI layout (train/input, train/gt, test/input, test/gt) or "
                      "with input/ and gt/ only (split by --test_split); several folders train on their union")
    data.add_argument("--name", default=None, help="run name under checkpoint/ (default: the dataset folder names joined by '+')")
    data.add_argument("--crop_size", type=int_at_least(16), default=256,
                      help="training image side in pixels (default 256 as the reference)")
    data.add_argument("--resize_mode", choices=RESIZE_MODES, default="resize",
                      help="resize whole images to --crop_size (the reference) or take random crops of that size (default resize)")
    data.add_argument("--flips", choices=FLIP_MODES, default="horizontal", help="flip augmentation (default horizontal)")
    data.add_argument("--h_target", choices=H_TARGETS, default=None,
                      help="2x target of the H output: upsample (bilinear x2 of the target, the users' note; default) or "
                      "resize_gt (the original ground truth resized to 2x, the reference code)")
    data.add_argument("--test_split", type=test_split_type, default=400,
                      help="for a folder of input/ and gt/ without train/test: test pairs held out, a count or a fraction "
                      "(default 400, the LSUI convention 3879/400); the split is saved in the run folder")
    data.add_argument("--split_seed", type=seed, default=0,
                      help="seed of that split, apart from --seed so the test set stays put (default 0)")

    model = parser.add_argument_group("model and optimisation")
    model.add_argument("--model", choices=list(PHASEFORMER_PRESETS), default="phaseformer",
                       help="preset: phaseformer (official, 1.78M parameters), phaseformer_wide (Restormer widths), "
                       "phaseformer_tiny (tests, CPU demos); default phaseformer")
    model.add_argument("--eca", choices=ECA_GATES, default=None,
                       help="ECA gate on the skips: feature (standard ECA, default for new training) or phase (the official "
                       "gate, a constant of about 0.5)")
    model.add_argument("--init_weights", default=None,
                       help="start from these weights (our .pth or a converted official .safetensors) with a fresh schedule")
    model.add_argument("--niter", type=non_negative_int, default=50, help="epochs at the initial learning rate (default 50)")
    model.add_argument("--niter_decay", type=non_negative_int, default=500, help="epochs of decay to zero after --niter (default 500)")
    model.add_argument("--lr_schedule", choices=("linear", "cosine"), default="linear",
                       help="shape of the decay over --niter_decay epochs (default linear, as the reference)")
    model.add_argument("--warmup", type=non_negative_float, default=0.0,
                       help="linear LR warm-up in epochs, may be fractional (default 0 as the reference; 1-5 helps at lr 1e-3)")
    model.add_argument("--beta1", type=fraction_below_one, default=0.5, help="Adam beta1 (default 0.5 as the reference; beta2 is 0.999)")

    loss = parser.add_argument_group("loss (see the table above for the reference behaviours)")
    loss.add_argument("--loss_weighting", choices=WEIGHTING_MODES, default=None,
                      help="softmax (learned, the note; default), softmax_frozen (the reference: random weights never "
                      "optimised), uncertainty (Kendall et al. 2018) or fixed (equal weights)")
    loss.add_argument("--loss_weights_lr", type=non_negative_float, default=None, help="learning rate of the loss weights (default: --lr)")
    loss.add_argument("--no_perceptual", action="store_true", help="drop the VGG perceptual term (no VGG weights needed)")
    loss.add_argument("--vgg_weights", default=None,
                      help="torchvision's vgg16-397923af.pth (default: torch's hub cache, <TORCH_HOME>/hub/checkpoints/)")
    loss.add_argument("--pixel_loss", choices=("charbonnier", "smoothl1"), default=None,
                      help="pixel term: charbonnier (default) or smoothl1 (what the reference trains with)")
    loss.add_argument("--msssim_as_similarity", action=argparse.BooleanOptionalAction, default=None,
                      help="add MS-SSIM to the loss instead of 1 - MS-SSIM (the reference's sign error; default off)")
    loss.add_argument("--value_range", choices=VALUE_RANGES, default=None,
                      help="unit: images in [0, 1] (default); signed: [-1, 1] for the network, mapped back for the losses; "
                      "signed_reference: [-1, 1] fed to the losses as is (the reference)")
    loss.add_argument("--vgg_resize_224", action=argparse.BooleanOptionalAction, default=None,
                      help="resize both images to 224x224 before VGG (the reference; default off)")
    loss.add_argument("--reference_behaviour", action="store_true",
                      help="reproduce the official train.py: every flag of the table above at its reference value "
                      "unless given explicitly")

    evaluation = parser.add_argument_group("evaluation")
    evaluation.add_argument("--eval_every", type=positive_int, default=1,
                            help="PSNR/SSIM on the test split every N epochs and at the end (default 1)")
    evaluation.add_argument("--eval_size", type=eval_size_type, default=256,
                            help="test images resized to NxN (default 256, as the reference) or 'full' for full resolution (batch 1)")
    evaluation.add_argument("--test_y_channel", action="store_true", help="score the BT.601 Y channel instead of RGB (default RGB)")
    evaluation.add_argument("--crop_border", type=non_negative_int, default=0,
                            help="pixels cropped from each border before scoring (default 0)")
    evaluation.add_argument("--num_preview", type=non_negative_int, default=4,
                            help="test images in each samples/epoch_N.png grid, 0 for none (default 4)")

    add_training_arguments(
        parser,
        defaults=dict(
            train_batch_size=8, gradient_accumulation_steps=1, learning_rate=3e-4, max_grad_norm=1.0, mixed_precision="auto",
            compile=False, dataloader_num_workers=None, seed=123, output_dir=".", resume_from_checkpoint=None,
            checkpointing_steps=0, checkpointing_minutes=0, checkpoints_total_limit=5, report_to=None, device="auto",
        ),
        help={
            "gradient_accumulation_steps": "forward passes per optimiser step (the note: the dual-output loss costs 40-50%% "
                                           "more memory); images per step = batch x processes x this",
            "learning_rate": "initial learning rate (3e-4 as the official train.py; the note suggests 1e-4..1e-3 with --warmup)",
            "max_grad_norm": "clip the model's gradient norm to this value; 0 turns clipping off",
            "seed": "seed of initialisation, loss weights, data order and crops (123 as the reference)",
            "dataloader_num_workers": "data-loader worker processes (up to 8 on CUDA, 0 on CPU when not given); raise it "
                                      "when the log says loading is slow",
            "output_dir": "root of the outputs; checkpoints go to <output_dir>/checkpoint/<name>/",
            "resume_from_checkpoint": "a netG_model_*.pth to continue from (model, loss weights, optimiser, schedule, scaler, "
                                      "epoch; every setting not given), or 'latest' for this run's newest",
            "checkpointing_steps": "also rewrite netG_model_latest.pth every N optimiser steps within an epoch (its resume "
                                   "continues at the next batch; crops and flips then differ from an uninterrupted run), 0 off",
            "checkpointing_minutes": "also rewrite netG_model_latest.pth every N minutes within an epoch (Kaggle), 0 off",
            "checkpoints_total_limit": "keep the newest K netG_model_epoch_N.pth, 0 keeps all",
        },
    )
    out = parser.add_argument_group("outputs")
    out.add_argument("--save_every", type=positive_int, default=1, help="write netG_model_epoch_N.pth every N epochs (default 1)")
    out.add_argument("--stop_epoch", type=positive_int, default=None,
                     help="stop after this epoch, the schedule still planned for niter + niter_decay (e.g. Kaggle's session "
                     "limit; continue with --resume latest)")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_training_args(parser, argv)
    for key, correct in CORRECT_BEHAVIOUR.items():
        if getattr(args, key) is None:
            setattr(args, key, REFERENCE_BEHAVIOUR[key] if args.reference_behaviour else correct)
            if args.reference_behaviour:  # the reference's behaviour is kept on resume as if typed
                args.given_flags = sorted({*args.given_flags, key})
    for flag in ("eval_every", "save_every"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.niter < 0 or args.niter_decay < 0 or args.niter + args.niter_decay < 1:
        parser.error("--niter and --niter_decay must be >= 0 with at least one epoch in total")
    if args.crop_size < 16:
        parser.error("--crop_size must be at least 16 (MS-SSIM's window is 11 px)")
    if args.warmup < 0 or args.crop_border < 0:
        parser.error("--warmup and --crop_border must not be negative")
    if args.stop_epoch is not None and args.stop_epoch < 1:
        parser.error("--stop_epoch must be at least 1")
    if args.eval_size != "full" and 2 * args.crop_border >= int(args.eval_size):
        parser.error(f"--crop_border {args.crop_border} leaves nothing of the {args.eval_size} px test images (--eval_size); "
                     f"pass a border below {(int(args.eval_size) + 1) // 2}")
    if not args.dataset_path and not args.resume_from_checkpoint:  # `latest` finds the run and its data in main()
        parser.error("--dataset_path is required: one or more folders in the LSUI layout (train/input, train/gt, test/input, test/gt)")
    return args


# ------------------------------------------------------------------------------------------------ helpers

def run_name(name: str | None, dataset_paths: list[str]) -> str:
    return name or "+".join(Path(path).resolve().name or "dataset" for path in dataset_paths)


def lr_factor(step: int, steps_per_epoch: int, warmup: float, niter: int, niter_decay: int, schedule: str) -> float:
    """LR multiplier for optimiser step ``step``: ``warmup`` epochs of warm-up, ``niter`` epochs flat, ``niter_decay``
    epochs down to zero (``schedule`` linear or cosine)."""
    factor = 1.0
    warmup_steps = warmup * steps_per_epoch
    if warmup_steps > 0 and step < warmup_steps:
        factor = (step + 1) / warmup_steps
    decay_start, decay_steps = niter * steps_per_epoch, niter_decay * steps_per_epoch
    if decay_steps and step >= decay_start:
        progress = min(1.0, (step - decay_start) / decay_steps)
        factor *= 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return factor


def resolve_config(args: argparse.Namespace, checkpoint: dict | None, source: str) -> argparse.Namespace:
    """The run's settings: the flags, and (resuming) the checkpoint's for every flag not given."""
    saved = checkpoint["config"] if checkpoint is not None else None
    config = resolve_resumed_config(args, None, saved, fixed=FIXED_ON_RESUME, session=NOT_INHERITED, source=source)
    return config


def all_reduce_loss_weight_grads(accelerator, parameters: list[torch.nn.Parameter]) -> None:
    """Average the loss weights' gradients over processes: they live outside the DDP-wrapped model."""
    if accelerator.num_processes == 1 or not parameters:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in parameters]
    flat = accelerator.reduce(torch.cat([g.reshape(-1) for g in grads]), reduction="mean")
    offset = 0
    for parameter in parameters:
        count = parameter.numel()
        parameter.grad = flat[offset : offset + count].view_as(parameter).clone()
        offset += count


def describe_protocol(args, sources: list[str]) -> str:
    resolution = "full resolution" if args.eval_size == "full" else f"resized to {args.eval_size}x{args.eval_size} (bilinear)"
    channel = "Y channel (BT.601 of RGB)" if args.test_y_channel else "RGB"
    return (
        f"evaluation protocol: test split {'; '.join(sources)} | {resolution} | {channel} | border crop {args.crop_border} px | "
        f"8-bit | SSIM Gaussian window {SSIM_WINDOW_SIZE} px, sigma {SSIM_SIGMA}, valid region (BasicSR) | "
        f"output L (1x head) | test loader not shuffled"
    )


@torch.no_grad()
def evaluate(accelerator, model, loader, args, preview_path: Path | None) -> dict[str, float]:
    """Mean PSNR/SSIM of the L output and of the inputs over the test split, sharded over processes."""
    bare = unwrap(accelerator, model)
    bare.eval()
    sums: dict[str, list[torch.Tensor]] = {"psnr": [], "ssim": [], "input_psnr": [], "input_ssim": []}
    for index, batch in enumerate(loader):
        try:
            output = enhance(bare, batch["input"], value_range=args.value_range, return_high=False).fake_b_L
        except torch.OutOfMemoryError:
            raise UserError("Out of memory evaluating the test split; use --eval_size 256 instead of full resolution.") from None
        scores = (
            batch_psnr(output, batch["target"], args.crop_border, args.test_y_channel),
            batch_ssim(output, batch["target"], args.crop_border, args.test_y_channel),
            batch_psnr(batch["input"], batch["target"], args.crop_border, args.test_y_channel),
            batch_ssim(batch["input"], batch["target"], args.crop_border, args.test_y_channel),
        )
        for key, values in zip(sums, accelerator.gather_for_metrics(scores)):
            sums[key].append(values.float())
        if index == 0 and preview_path is not None and accelerator.is_main_process:
            count = min(args.num_preview, output.shape[0])
            tiles = [image for i in range(count) for image in (batch["input"][i], output[i], batch["target"][i])]
            save_grid(tiles, preview_path, nrow=3, value_range=(0.0, 1.0), captions=["input", "output", "target"] * count)
    bare.train()
    return {key: float(torch.cat(values).mean()) for key, values in sums.items()}


def write_history_csv(history: list[dict], path: Path) -> None:
    columns = list(dict.fromkeys(key for row in history for key in row))

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns)
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def plot_history(history: list[dict], run_dir: Path, args) -> None:
    losses = {key: [row[key] for row in history] for key in ("loss", "loss_L", "loss_H")}
    plot_curves(losses, run_dir / "loss_curves.png", title=f"{run_dir.name}: training loss", log_y=all(v > 0 for v in losses["loss"]))
    weights = {key[2:]: [row[key] for row in history] for key in history[-1] if key.startswith("w_")}
    plot_curves(weights, run_dir / "loss_weights.png", title=f"loss weights ({args.loss_weighting})", ylabel="weight")
    evaluated = [row for row in history if "psnr" in row and row["psnr"] != ""]
    if evaluated:
        xlabel = f"evaluation (every {args.eval_every} epochs)" if args.eval_every > 1 else "epoch"
        plot_curves({"PSNR (dB)": [row["psnr"] for row in evaluated]}, run_dir / "psnr.png", title="test PSNR", xlabel=xlabel, ylabel="dB")
        plot_curves({"SSIM": [row["ssim"] for row in evaluated]}, run_dir / "ssim.png", title="test SSIM", xlabel=xlabel, ylabel="SSIM")


# --------------------------------------------------------------------------------------------------- main

@dataclass
class Run:
    """The objects one training run holds while it loops (what the checkpoint and epoch-end helpers read)."""

    config: argparse.Namespace
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate
    loss_fn: PhaseformerLoss
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    test_loader: object
    run_dir: Path
    steps_per_epoch: int
    best: BestMetric
    history: list = field(default_factory=list)
    input_scores: dict | None = None
    step: int = 0


def save_run(run: Run, epoch: int, is_best: bool = False, is_final: bool = False, batches_done: int = 0, sums=None) -> None:
    """Rewrite the resumable ``netG_model_latest.pth`` (and the epoch and best copies that are due), atomically."""
    config, loss_fn = run.config, run.loss_fn
    state = training_checkpoint(
        CHECKPOINT_KIND, run.accelerator, run.model, run.optimizer, vars(config), run.step, epoch, run.lr_scheduler,
        model_preset=config.model,
        model_config=plain_model_config(unwrap(run.accelerator, run.model)),
        loss_weighting={"mode": config.loss_weighting, "terms": loss_fn.term_names,
                        "state": {k: v.detach().cpu() for k, v in loss_fn.weighting_state_dict().items()},
                        "weights": loss_fn.weights_dict()},
        history=run.history, best_psnr=run.best.best, best_epoch=run.best.epoch, input_scores=run.input_scores,
        steps_per_epoch=run.steps_per_epoch, dataset_name=run.run_dir.name, batches_done=batches_done,
        epoch_log_sums={k: float(v) for k, v in sums.items()} if sums else None,
    )
    if not run.accelerator.is_main_process:
        return
    copies = [run.run_dir / f"netG_model_epoch_{epoch}.pth"] if batches_done == 0 and (epoch % config.save_every == 0 or is_final) else []
    if is_best:
        copies.append(run.run_dir / "netG_model_best.pth")
    save_checkpoint_files(state, run.run_dir / "netG_model_latest.pth", copies, rotate_pattern="netG_model_epoch_*.pth",
                          keep=config.checkpoints_total_limit)


def restore_run(run: Run, checkpoint: dict, resume_path, logger) -> tuple[int, int, dict | None]:
    """Load a resumed checkpoint into ``run``; ``(start epoch, batches done within it, their summed logs)``."""
    try:
        run.loss_fn.load_weighting_state_dict(checkpoint["loss_weighting"]["state"])
    except (KeyError, ValueError) as err:
        raise CheckpointError(f"{resume_path} holds loss weights that do not fit this loss ({err}).") from None
    try:
        restore_training_checkpoint(checkpoint, run.accelerator, run.model, run.optimizer, run.lr_scheduler)
    except ValueError as err:  # the optimiser's parameter groups differ
        raise CheckpointError(f"{resume_path}: the optimiser state does not fit this run ({err}).") from None
    run.step, start_epoch = checkpoint["step"], checkpoint["epoch"]
    run.history, run.input_scores = list(checkpoint["history"]), checkpoint.get("input_scores")
    run.best.best, run.best.epoch = checkpoint["best_psnr"], checkpoint["best_epoch"]
    skip_batches, partial = int(checkpoint.get("batches_done", 0)), checkpoint.get("epoch_log_sums")
    if checkpoint.get("steps_per_epoch") != run.steps_per_epoch:
        logger.warning("%s had %s optimiser steps per epoch, this run has %d (another batch size or data): the LR "
                       "schedule is followed by step count, so its epochs shift",
                       resume_path, checkpoint.get("steps_per_epoch"), run.steps_per_epoch)
    restore_rng(checkpoint, run.accelerator)
    logger.info("resumed at epoch %d%s, optimiser step %d, lr %.3e", start_epoch,
                f" (+{skip_batches} batches)" if skip_batches else "", run.step, run.lr_scheduler.get_last_lr()[0])
    return start_epoch, skip_batches, partial


def end_of_epoch(run: Run, done: int, log_sums: dict, batches_done: int, seconds: float, data_wait: float, steps: int,
                 last_epoch: int, logger) -> None:
    """Log the epoch's means and weights, evaluate when due, checkpoint, and write the history and plots."""
    config, accelerator, device = run.config, run.accelerator, run.accelerator.device
    total_epochs = config.niter + config.niter_decay
    keys = list(log_sums)
    means = accelerator.reduce(torch.stack([log_sums[k] for k in keys]) / batches_done, reduction="mean").tolist()
    row: dict = {"epoch": done, "lr": run.lr_scheduler.get_last_lr()[0], **dict(zip(keys, means)), **run.loss_fn.weights_dict()}
    weights_text = " ".join(f"{k[2:]} {v:.3f}" for k, v in row.items() if k.startswith("w_"))
    logger.info("epoch %d/%d | loss %.4f (L %.4f, H %.4f) | lr %.3e | step %d | weights %s | %.1f s, %.1f img/s",
                done, total_epochs, row["loss"], row["loss_L"], row["loss_H"], row["lr"], run.step, weights_text, seconds,
                steps * config.train_batch_size * accelerator.num_processes / seconds)
    for warning in run.loss_fn.collapse_warnings():
        logger.warning("epoch %d: %s", done, warning)
    if device.type == "cuda" and data_wait > 0.3 * seconds:
        logger.warning("data loading took %.0f%% of epoch %d; raise --dataloader_num_workers (now %s) or store the "
                       "images smaller", 100 * data_wait / seconds, done, config.dataloader_num_workers)

    is_final = done == total_epochs
    is_best = False
    if done % config.eval_every == 0 or is_final or done == last_epoch:
        preview = run.run_dir / "samples" / f"epoch_{done}.png" if config.num_preview else None
        scores = evaluate(accelerator, run.model, run.test_loader, config, preview)
        if run.input_scores is None:
            run.input_scores = {"psnr": scores["input_psnr"], "ssim": scores["input_ssim"]}
            logger.info("test inputs as they are: PSNR %.3f dB, SSIM %.4f", run.input_scores["psnr"], run.input_scores["ssim"])
        row.update(psnr=scores["psnr"], ssim=scores["ssim"])
        is_best = run.best.update(scores["psnr"], done)
        logger.info("epoch %d: test PSNR %.3f dB, SSIM %.4f (best %.3f dB at epoch %d)", done, scores["psnr"], scores["ssim"],
                    run.best.best, run.best.epoch)
        if preview is not None and preview.is_file():
            log_image(accelerator, "test/preview", preview, run.step)
    run.history.append(row)
    log_scalars(accelerator, {f"epoch/{k}": v for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))}, run.step)
    save_run(run, done, is_best, is_final)
    if accelerator.is_main_process:
        write_history_csv(run.history, run.run_dir / "history.csv")
        plot_history(run.history, run.run_dir, config)
    accelerator.wait_for_everyone()


def main(args: argparse.Namespace) -> dict:
    reset_accelerate_state()
    checkpoint, resume_path = None, None
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        resume_path = resolve_resume(resume, ".", RESUME_PATTERNS)
        checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_phaseformer.py --resume_from_checkpoint")
    config = resolve_config(args, checkpoint, str(resume_path))
    runs = Path(config.output_dir) / "checkpoint"
    run_dir = runs / run_name(config.name, config.dataset_path) if config.dataset_path else None
    if resume == "latest":
        # The run --name/--dataset_path name, else the newest run under <output_dir>/checkpoint/ (`latest` alone).
        named = run_dir is not None and {"name", "dataset_path"} & given_flags(args)
        resume_path = find_latest_run_checkpoint(run_dir if named else runs, RESUME_PATTERNS, run_dir=run_dir, max_depth=1)
        if resume_path is not None:
            checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_phaseformer.py --resume_from_checkpoint")
            config = resolve_config(args, checkpoint, str(resume_path))
            run_dir = resume_path.parent
        elif run_dir is None:
            raise UserError(f"--resume_from_checkpoint latest: no run under {runs} to continue; pass --dataset_path to start one "
                            "(folders in the LSUI layout).")
    if checkpoint is not None and "dataset_path" not in given_flags(args):
        check_saved_path(config, "dataset_path", resume_path, "dataset folder")

    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.device == "cpu", seed=config.seed, compile_model=config.compile, project_dir=str(run_dir), report_to=config.report_to,
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    device, is_main = accelerator.device, accelerator.is_main_process
    logger = setup_logger(run_dir, is_main)
    logger.info("run %s: %s", run_dir, f"resuming from {resume_path}" if resume_path else "new run")
    if resume == "latest" and resume_path is None:
        logger.info("--resume latest: no checkpoint in %s yet, starting a new run", run_dir)

    with accelerator.main_process_first():  # the main process writes the split files, the others read them
        parts = build_phaseformer_training(config, device, split_dir=run_dir, checkpoint=checkpoint)
    model, loss_fn, train_set, test_set = parts.model, parts.models["loss"], parts.datasets["train"], parts.datasets["test"]
    for note in parts.extras["notes"]:
        (logger.warning if note.startswith("warning: ") else logger.info)(note.removeprefix("warning: "))
    logger.info("Phaseformer '%s' (eca %s): %.3fM parameters", config.model, config.eca, sum(p.numel() for p in model.parameters()) / 1e6)

    weight_parameters = loss_weight_parameters(loss_fn)
    optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused_optimizer(device))
    eval_batch = 1 if config.eval_size == "full" else config.train_batch_size
    workers = config.dataloader_num_workers
    train_loader = make_loader(train_set, config.train_batch_size, shuffle=True, workers=workers, device_type=device.type)
    test_loader = make_loader(test_set, eval_batch, shuffle=False, workers=workers, drop_last=False, device_type=device.type)
    model, optimizer, train_loader, test_loader = accelerator.prepare(model, optimizer, train_loader, test_loader)
    steps_per_epoch = math.ceil(len(train_loader) / config.gradient_accumulation_steps)
    total_epochs = config.niter + config.niter_decay
    schedule = (config.warmup, config.niter, config.niter_decay, config.lr_schedule)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, steps_per_epoch, *schedule))
    run = Run(config, accelerator, model, loss_fn, optimizer, lr_scheduler, test_loader, run_dir, steps_per_epoch,
              BestMetric("max"))  # best: test PSNR

    start_epoch, skip_batches, partial = 0, 0, None  # a checkpoint written within an epoch: batches done, their summed logs
    if checkpoint is not None:
        start_epoch, skip_batches, partial = restore_run(run, checkpoint, resume_path, logger)
        del checkpoint
    if is_main:
        save_config(vars(config), run_dir / "args.yaml")
    start_tracking(accelerator, run_dir.name, vars(config))
    log_run_header(logger, accelerator, config.train_batch_size,
                   f"{steps_per_epoch} optimiser steps per epoch, {total_epochs} epochs ({config.niter} + {config.niter_decay} "
                   f"{config.lr_schedule} decay), lr {config.learning_rate:g}, Adam betas ({config.beta1}, 0.999)")
    logger.info("training data: %d pairs, %s, crop %d px, flips %s, 2x target %s", len(train_set), config.resize_mode,
                config.crop_size, config.flips, config.h_target)
    logger.info("loss: %s | weighting %s | pixel %s | MS-SSIM as %s | value range %s | VGG resize 224 %s",
                ", ".join(loss_fn.term_names), config.loss_weighting, config.pixel_loss,
                "similarity (reference)" if config.msssim_as_similarity else "1 - MS-SSIM", config.value_range, config.vgg_resize_224)
    logger.info(describe_protocol(config, parts.extras["sources"]))

    last_epoch = min(total_epochs, config.stop_epoch or total_epochs)
    guard = NonFiniteGuard(device, NAN_HINT, model=model)  # also stops diverging weights whose loss stays finite
    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    lr_per_step: list[float] = []
    for epoch in range(start_epoch, last_epoch):
        model.train()
        loss_fn.train()
        train_loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(train_loader, skip_batches) if skip_batches else train_loader
        progress = TrainingProgress(len(train_loader), f"epoch {epoch + 1}/{total_epochs}", enabled=is_main, initial=skip_batches)
        log_sums: dict[str, torch.Tensor] = {k: torch.tensor(v, device=device) for k, v in (partial or {}).items()}
        batches_done, skip_batches, partial = skip_batches, 0, None
        started, data_wait = time.perf_counter(), 0.0
        requested = time.perf_counter()
        for batch in batches:
            data_wait += time.perf_counter() - requested
            try:
                with accelerator.accumulate(model):
                    total, logs = parts.objective(batch, model=model, autocast=accelerator.autocast())
                    backward_and_step(
                        accelerator, total, optimizer, model.parameters(), config.max_grad_norm,
                        before_clip=lambda: all_reduce_loss_weight_grads(accelerator, weight_parameters),
                    )
            except torch.OutOfMemoryError as err:
                raise UserError(out_of_memory_message(
                    config.train_batch_size,
                    " (--gradient_accumulation_steps), or train on smaller images with --crop_size (the 2x head works at twice that side)",
                )) from err
            guard.update(total, run.step + 1)
            batches_done += 1
            lr = lr_scheduler.get_last_lr()[0]
            for key, value in logs.items():
                log_sums[key] = log_sums[key] + value if key in log_sums else value.clone()
            progress.update(total, lr)
            if progress.steps % progress.refresh_every == 0:
                guard.check(accelerator)
            if accelerator.sync_gradients:
                lr_per_step.append(lr)
                lr_scheduler.step()
                run.step += 1
                if run.step % LOG_EVERY == 0:
                    log_scalars(accelerator, {"train/loss": total, "train/lr": lr}, run.step)
                if batches_done < len(train_loader) and cadence.due(run.step, accelerator):
                    guard.check(accelerator)
                    save_run(run, epoch, batches_done=batches_done, sums=log_sums)
                    cadence.saved()
            requested = time.perf_counter()
        progress.close()
        guard.check(accelerator)
        end_of_epoch(run, epoch + 1, log_sums, batches_done, time.perf_counter() - started, data_wait, progress.steps,
                     last_epoch, logger)
        cadence.saved()

    if accelerator.num_processes > 1 and weight_parameters:  # they are outside DDP: prove the all-reduce kept them in step
        gathered = accelerator.gather(torch.cat([p.detach().reshape(-1) for p in weight_parameters])[None])
        if bool((gathered == gathered[0]).all()):
            logger.info("loss weights identical on all %d processes", accelerator.num_processes)
        else:
            logger.warning("loss weights differ between processes: %s", gathered.tolist())
    logger.info("done: %s (best test PSNR %.3f dB at epoch %d)", run_dir, run.best.best, run.best.epoch)
    accelerator.end_training()
    return {"history": run.history, "lr_per_step": lr_per_step, "run_dir": run_dir, "step": run.step, "best_psnr": run.best.best,
            "config": config, "input_scores": run.input_scores, "final_weights": loss_fn.weights_dict()}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
