"""Train DAPE, SeeSR's stage 1: a LoRA on RAM so that degraded images give the tags and embeddings of clean ones.

SeeSR (Wu et al., CVPR 2024; cswry/SeeSR ``scripts/train_dape.sh`` = ``basicsr/train.py -opt basicsr/options/dape.yaml``
with ``basicsr/models/dape_model.py``) trains its degradation-aware prompt extractor before the ControlNet: RAM's
weights frozen, a rank-8 LoRA on the Swin's ``attn.qkv`` (query and value) and on the tagging head's query/key
(models/dape.py); plain RAM on the clean image is the teacher, RAM + LoRA on the degraded image the student; loss =
MSE of the image embeddings + binary cross-entropy of the tag probabilities. AdamW (lr 1e-4, betas 0.9/0.999, no
weight decay), MultiStepLR halving at steps 20k and 30k, batch 8, 300k steps, seed 10, a checkpoint every 1000 steps:
``configs/dape.yaml`` holds these.

    python train_dape.py --config configs/dape.yaml --ram_path preset/models/ram_swin_large_14m.pth \\
        --root_folders preset/datasets/train_datasets/training_for_dape --output_dir experiments/DAPE
    python train_dape.py --output_dir experiments/DAPE --resume_from_checkpoint latest     # continue, nothing repeated
    python train_dape.py --config configs/dape.yaml --root_folders my_domain --ram_ft_path preset/models/DAPE.pth  # fine-tune
    accelerate launch --multi_gpu train_dape.py --config configs/dape.yaml --root_folders ...   # or --num_processes N
    python infer.py seesr ... --ram_ft_path experiments/DAPE/DAPE.pth                           # use it

A trainer of its own, as SeeSR has a script of its own for this stage: its flags are about the tagger (LoRA rank,
RAM files, tag agreement), the SeeSR trainer's about the ControlNet and the injector, and the output of this
stage (a DAPE.pth) is an input of the next one (``train_seesr_timestep.py --ram_ft_path``).

Data: folders written by SeeSR's ``make_paired_data_DAPE.py`` (``gt/`` and ``sr_bicubic/``, paired by name).
Writes into ``--output_dir``::

    DAPE.pth                 the LoRA tensors under SeeSR's names (rewritten at every checkpoint and at the end)
    checkpoints/dape_last.pt, checkpoints/dape_step_N.pt    resumable (LoRA, optimiser, schedule, scaler, RNG, config)
    tag_agreement.json, tag_agreement.csv   F1 of the degraded image's tags against the clean image's (held-out set)
    args.yaml  train.log  logs/ (tensorboard)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import sys
from functools import partial
from pathlib import Path

import torch

from models.dape import (
    DAPE_RANK,
    REFERENCE_DROP_PATH,
    REFERENCE_HEAD_DROPOUT,
    LoRAState,
    lora_parameters,
    ram_pixels,
    save_dape,
    tag_f1,
)
from recipes.dape import build_dape_datasets, build_dape_training
from utils.accelerator import PRECISION_DTYPES, create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import atomic_write_text, load_checkpoint, resolve_resume, save_checkpoint_files
from utils.cli import SEESR_RAM_PATH, add_training_arguments, parse_training_args
from utils.config import ArgumentParser, add_config_argument, save_config
from utils.errors import CheckpointError, UserError
from utils.launch import cli_main, start_processes, under_launcher
from utils.log import TrainingProgress, log_scalars, setup_logger, start_tracking
from utils.resume import resolve_resumed_config
from utils.training import (
    CheckpointCadence,
    NonFiniteGuard,
    backward_and_step,
    fused_optimizer,
    make_loader,
    out_of_memory_message,
    restore_rng,
    restore_training_checkpoint,
    training_checkpoint,
)

CHECKPOINT_KIND = "dape"
CHECKPOINT_DIR = "checkpoints"
RESUME_PATTERNS = ["dape_last.pt", "dape_step_*.pt"]
LOG_EVERY = 10  # optimiser steps between tracker scalars (each one a host sync)
FIXED_ON_RESUME = ("lora_rank",)  # the LoRA tensors' shapes
F1_DEFINITION = ("per image: F1 = 2|D & C| / (|D| + |C|) of the student's tags D on the degraded image against plain RAM's "
                 "tags C on the clean image (1 when both are empty), averaged over images (mean_f1); micro_f1 pools the counts")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_config_argument(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--root_folders", default=None,
                      help="comma-separated folders written by SeeSR's make_paired_data_DAPE.py, each with gt/ and "
                      "sr_bicubic/ (paired by file name); required unless resuming")
    data.add_argument("--validation_root_folders", default=None,
                      help="comma-separated held-out folders of the same layout for the tag agreement (default: "
                      "--num_validation_images pairs held out of --root_folders)")
    data.add_argument("--num_validation_images", type=int, default=50,
                      help="pairs held out of --root_folders (seed 0) for the tag agreement when no "
                      "--validation_root_folders is given; 0 turns the evaluation off (default 50)")
    data.add_argument("--image_size", type=int, default=512,
                      help="both images resized to this square before RAM's 384 px input, as SeeSR's dataset (default 512)")

    model = parser.add_argument_group("RAM and the LoRA")
    model.add_argument("--ram_path", default=SEESR_RAM_PATH,
                       help="RAM's weights ram_swin_large_14m.pth: the teacher, and the student's frozen base (default "
                       f"{SEESR_RAM_PATH}, where SeeSR's dape.yaml reads it)")
    model.add_argument("--ram_ft_path", default=None,
                       help="a DAPE.pth (SeeSR's release or ours) to start the LoRA from, e.g. to fine-tune on a new "
                       "domain (default none: a fresh LoRA, so the student starts as plain RAM)")
    model.add_argument("--ram_tag_list", default=None,
                       help="RAM's ram_tag_list.txt (default: beside --ram_path, else ram/data/ under the current folder)")
    model.add_argument("--ram_tag_thresholds", default=None,
                       help="RAM's ram_tag_list_threshold.txt, per-tag thresholds for the tag agreement (default: beside the tag list)")
    model.add_argument("--lora_rank", type=int, default=DAPE_RANK, help=f"LoRA rank (default {DAPE_RANK}, as SeeSR's ram_lora)")
    model.add_argument("--drop_path_rate", type=float, default=REFERENCE_DROP_PATH,
                       help=f"stochastic depth of the student's Swin while training (default {REFERENCE_DROP_PATH}, RAM's)")
    model.add_argument("--head_dropout", type=float, default=REFERENCE_HEAD_DROPOUT,
                       help=f"dropout of the student's tagging head while training (default {REFERENCE_HEAD_DROPOUT}, "
                       "RAM's q2l_config.json)")

    optim = parser.add_argument_group("schedule")
    optim.add_argument("--max_train_steps", type=int, default=300000, help="optimiser steps (default 300000, dape.yaml's total_iter)")
    optim.add_argument("--lr_milestones", type=int, nargs="+", default=[20000, 30000],
                       help="optimiser steps after which the learning rate is multiplied by --lr_gamma (default 20000 30000)")
    optim.add_argument("--lr_gamma", type=float, default=0.5, help="factor at each milestone (default 0.5)")
    optim.add_argument("--adam_weight_decay", type=float, default=0.0, help="AdamW weight decay (default 0, as dape.yaml)")
    optim.add_argument("--validation_steps", type=int, default=0,
                       help="also measure the tag agreement every N optimiser steps (default 0: before and after training only)")

    add_training_arguments(
        parser,
        defaults=dict(
            train_batch_size=8, gradient_accumulation_steps=1, learning_rate=1e-4, lr_warmup_steps=50, max_grad_norm=0.0,
            mixed_precision="auto", dataloader_num_workers=None, seed=10, output_dir="experiments/DAPE",
            resume_from_checkpoint=None, checkpointing_steps=1000, checkpointing_minutes=0, checkpoints_total_limit=5,
            report_to=None, device="auto", num_processes=1,
        ),
        help={
            "train_batch_size": "image pairs per device and forward pass (8 as dape.yaml)",
            "learning_rate": "AdamW's learning rate (1e-4 as dape.yaml)",
            "lr_warmup_steps": "linear warm-up over the first N optimiser steps, lr x step/N as BasicSR (50 as dape.yaml)",
            "max_grad_norm": "clip the LoRA's gradient norm to this value; 0 turns clipping off (SeeSR does not clip)",
            "seed": "seed of the LoRA's initialisation, data order and dropout (10 as dape.yaml)",
            "output_dir": "run folder: DAPE.pth, checkpoints/, tag_agreement.json, args.yaml, train.log",
            "checkpointing_steps": "write checkpoints/dape_step_N.pt (and refresh DAPE.pth) every N optimiser steps "
                                   "(1000 as dape.yaml), 0 only at the end",
            "checkpoints_total_limit": "dape_step_N.pt files kept, 0 keeps all",
        },
    )
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_training_args(parser, argv)
    for flag in ("lora_rank", "max_train_steps", "image_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    for flag in ("num_validation_images", "validation_steps", "adam_weight_decay"):
        if getattr(args, flag) < 0:
            parser.error(f"--{flag} must not be negative, got {getattr(args, flag)}")
    for flag in ("drop_path_rate", "head_dropout"):
        if not 0 <= getattr(args, flag) < 1:
            parser.error(f"--{flag} must be in [0, 1), got {getattr(args, flag)}")
    if not 0 < args.lr_gamma <= 1:
        parser.error(f"--lr_gamma must be in (0, 1], got {args.lr_gamma}")
    if any(m < 1 for m in args.lr_milestones) or sorted(args.lr_milestones) != list(args.lr_milestones):
        parser.error(f"--lr_milestones must be increasing positive step counts, got {' '.join(map(str, args.lr_milestones))}")
    if not args.root_folders and not args.resume_from_checkpoint:
        parser.error("--root_folders is required: folders with gt/ and sr_bicubic/ as SeeSR's make_paired_data_DAPE.py writes")
    return args


# ------------------------------------------------------------------------------------------------ helpers

def lr_factor(step: int, warmup: int, milestones: list[int], gamma: float) -> float:
    """LR multiplier of optimiser step ``step`` (0-based; BasicSR's iteration ``step + 1``): x iteration/warmup while
    the iteration is under ``warmup`` (BasicSR's warm-up), x gamma for each milestone already passed (its
    MultiStepRestartLR lowers the rate at iteration milestone + 1)."""
    iteration = step + 1
    factor = gamma ** sum(milestone <= step for milestone in milestones)
    return factor * (iteration / warmup if iteration < warmup else 1.0)


def resolve_run(args: argparse.Namespace) -> tuple[argparse.Namespace, dict | None, Path | None]:
    """(resolved config, checkpoint, its path): ``latest`` looks in ``<output_dir>/checkpoints``."""
    resume = args.resume_from_checkpoint
    folder = Path(args.output_dir) / CHECKPOINT_DIR if resume == "latest" else "."
    path = resolve_resume(resume, folder, RESUME_PATTERNS)
    checkpoint = load_checkpoint(path, CHECKPOINT_KIND, "train_dape.py --resume_from_checkpoint") if path else None
    config = resolve_resumed_config(args, None, checkpoint["config"] if checkpoint else None, fixed=FIXED_ON_RESUME, source=str(path))
    if not config.root_folders:
        raise UserError("--root_folders is required for a new run (no checkpoint in "
                        f"{Path(args.output_dir) / CHECKPOINT_DIR}); pass folders with gt/ and sr_bicubic/.")
    return config, checkpoint, path


def check_inputs(config: argparse.Namespace) -> None:
    """Files and folders, before any model loads or anything is written."""
    if not Path(config.ram_path).is_file():
        raise CheckpointError(f"--ram_path {config.ram_path} does not exist; give RAM's ram_swin_large_14m.pth.")
    if config.ram_ft_path and not Path(config.ram_ft_path).is_file():
        raise CheckpointError(f"--ram_ft_path {config.ram_ft_path} does not exist; give a DAPE.pth or leave the flag out.")
    build_dape_datasets(config)  # the folders' layout, the pairing and the held-out count


@torch.no_grad()
def tag_agreement(tagger, teacher, dataset, batch_size: int, step: int) -> dict:
    """Tags of the student (eval mode) on each degraded image against the teacher's on its clean image."""
    size = teacher.config.image_size
    was_training = tagger.training
    tagger.eval()
    rows, totals = [], torch.zeros(3)
    # its own generator: starting a loader draws a seed, and the global RNG must not see it (exact resumes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for batch in loader:
        clean = teacher.logits(teacher.encode(ram_pixels(batch["gt"].to(teacher.device), size).to(teacher.dtype)))
        degraded = tagger.logits(tagger.encode(ram_pixels(batch["lq"].to(tagger.device), size)))
        fired_clean = torch.sigmoid(clean) > teacher.class_threshold.to(clean.device)
        fired_degraded = torch.sigmoid(degraded) > tagger.class_threshold.to(degraded.device)
        scores = {k: v.cpu() for k, v in tag_f1(fired_degraded, fired_clean).items()}
        totals += torch.stack([scores["hits"].sum(), scores["predicted"].sum(), scores["reference"].sum()])
        tags_clean, tags_degraded = teacher.tags_from_logits(clean), tagger.tags_from_logits(degraded)
        for i, path in enumerate(batch["path"]):
            rows.append({"step": step, "image": Path(path).name, "f1": float(scores["f1"][i]), "precision": float(scores["precision"][i]),
                         "recall": float(scores["recall"][i]), "clean_tags": tags_clean[i], "degraded_tags": tags_degraded[i]})
    tagger.train(was_training)
    hits, predicted, reference = totals.tolist()
    micro = 1.0 if predicted + reference == 0 else 2 * hits / (predicted + reference)
    mean = lambda key: sum(row[key] for row in rows) / len(rows)  # noqa: E731
    summary = {"step": step, "images": len(rows), "mean_f1": mean("f1"), "mean_precision": mean("precision"),
               "mean_recall": mean("recall"), "micro_f1": micro}
    return {"summary": summary, "rows": rows}


def write_agreement(output_dir: Path, evaluations: list[dict], rows: list[dict]) -> None:
    """tag_agreement.json (every evaluation's summary; before = the first, after = the last) and rows into the CSV.

    Rows of the same or a later step already in the CSV were written by a run that stopped before its next checkpoint;
    the resumed run evaluates those steps again, so they are replaced, not repeated.
    """
    report = {"definition": F1_DEFINITION, "before": evaluations[0], "after": evaluations[-1], "evaluations": evaluations}
    atomic_write_text(json.dumps(report, indent=2) + "\n", output_dir / "tag_agreement.json")
    path = output_dir / "tag_agreement.csv"
    kept = []
    if path.is_file():
        with open(path, newline="", encoding="utf-8") as handle:
            kept = [row for row in csv.DictReader(handle) if int(row["step"]) < rows[0]["step"]]
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows([*kept, *rows])
    atomic_write_text(text.getvalue(), path)


# --------------------------------------------------------------------------------------------------- main

def main(args: argparse.Namespace) -> dict:
    reset_accelerate_state()
    config, checkpoint, resume_path = resolve_run(args)
    check_inputs(config)
    out = Path(config.output_dir)
    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.device == "cpu", seed=config.seed, project_dir=str(out), report_to=config.report_to,
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    device, is_main = accelerator.device, accelerator.is_main_process
    logger = setup_logger(out, is_main)
    logger.info("run %s: %s", out, f"resuming from {resume_path}" if resume_path else "new run")

    parts = build_dape_training(config, device)
    student, teacher, objective = parts.models["student"], parts.models["teacher"], parts.objective
    tagger = student.tagger
    teacher.to(dtype=PRECISION_DTYPES.get(accelerator.mixed_precision, torch.float32))
    train_set, val_set = parts.datasets["train"], parts.datasets["val"]
    optimizer = torch.optim.AdamW(parts.param_groups, lr=config.learning_rate, betas=(0.9, 0.999), fused=fused_optimizer(device))
    # seed=: the loader's own generator, so starting an epoch (or a resumed one) leaves the global RNG, which drives
    # the student's dropout, as an uninterrupted run has it
    loader = make_loader(train_set, config.train_batch_size, shuffle=True, workers=config.dataloader_num_workers,
                         device_type=device.type, seed=config.seed)
    student, optimizer, loader = accelerator.prepare(student, optimizer, loader)
    schedule = partial(lr_factor, warmup=config.lr_warmup_steps, milestones=list(config.lr_milestones), gamma=config.lr_gamma)
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    lora_state = LoRAState(tagger)

    step, epoch, batches_done, evaluations = 0, 0, 0, []
    if checkpoint is not None:
        restore_training_checkpoint(checkpoint, accelerator, lora_state, optimizer, lr_scheduler)
        step, epoch, batches_done = checkpoint["step"], checkpoint["epoch"], int(checkpoint.get("batches_done", 0))
        evaluations = list(checkpoint.get("evaluations", []))
        restore_rng(checkpoint, accelerator)
        logger.info("resumed at step %d (epoch %d + %d batches), lr %.3e", step, epoch, batches_done, lr_scheduler.get_last_lr()[0])
        del checkpoint
    run_config = vars(config)
    if is_main:
        save_config(run_config, out / "args.yaml")
    start_tracking(accelerator, out.name or "dape", run_config)
    log_run_header(logger, accelerator, config.train_batch_size,
                   f"{config.max_train_steps} steps, AdamW lr {config.learning_rate:g}, x{config.lr_gamma} after steps "
                   f"{', '.join(map(str, config.lr_milestones))}, warm-up {config.lr_warmup_steps}")
    logger.info("DAPE student: RAM %s + LoRA rank %d on %d layers (%d trainable parameters)%s; teacher: plain RAM", config.ram_path,
                config.lora_rank, sum(1 for p in lora_parameters(tagger)) // 2, sum(p.numel() for p in lora_parameters(tagger)),
                f", LoRA from {config.ram_ft_path}" if config.ram_ft_path else "")
    logger.info("data: %d training pairs, %d held out (%s)", len(train_set), len(val_set) if val_set else 0, config.root_folders)

    def evaluate() -> None:
        if val_set is not None and is_main and (not evaluations or evaluations[-1]["step"] < step):
            result = tag_agreement(tagger, teacher, val_set, config.train_batch_size, step)
            evaluations.append(result["summary"])
            write_agreement(out, evaluations, result["rows"])
            logger.info("tag agreement at step %d on %d held-out images: mean F1 %.4f (micro %.4f)", step,
                        result["summary"]["images"], result["summary"]["mean_f1"], result["summary"]["micro_f1"])
        accelerator.wait_for_everyone()

    def save(numbered: bool) -> None:
        state = training_checkpoint(CHECKPOINT_KIND, accelerator, lora_state, optimizer, run_config, step, epoch, lr_scheduler,
                                    batches_done=batches_done, evaluations=evaluations)
        cadence.saved()
        if is_main:
            copies = [out / CHECKPOINT_DIR / f"dape_step_{step}.pt"] if numbered else []
            save_checkpoint_files(state, out / CHECKPOINT_DIR / "dape_last.pt", copies, rotate_pattern="dape_step_*.pt",
                                  keep=config.checkpoints_total_limit)
            save_dape(tagger, out / "DAPE.pth")
        accelerator.wait_for_everyone()

    if not evaluations:
        evaluate()  # before training
    guard = NonFiniteGuard(device)
    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    progress = TrainingProgress(config.max_train_steps, "DAPE", enabled=is_main, initial=step)
    losses, lr_per_step, micro, pending = [], [], [], []
    while step < config.max_train_steps:
        if batches_done >= len(loader):
            epoch, batches_done = epoch + 1, 0
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, batches_done) if batches_done else loader
        for batch in batches:
            try:
                with accelerator.accumulate(student):
                    with accelerator.autocast():
                        loss, terms = objective(batch, student, teacher)
                    backward_and_step(accelerator, loss, optimizer, lora_parameters(student), config.max_grad_norm)
            except torch.OutOfMemoryError as err:
                raise UserError(out_of_memory_message(config.train_batch_size, " (--gradient_accumulation_steps)")) from err
            batches_done += 1
            micro.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            step_loss, micro = torch.stack(micro).mean(), []
            guard.update(step_loss, step + 1)
            lr = lr_scheduler.get_last_lr()[0]
            lr_scheduler.step()
            step += 1
            pending.append(step_loss)
            lr_per_step.append(lr)
            progress.update(step_loss, lr)
            if step % LOG_EVERY == 0 or step == config.max_train_steps:
                guard.check(accelerator)
                losses += torch.stack(pending).tolist()
                pending = []
                log_scalars(accelerator, {"train/loss": accelerator.reduce(step_loss, "mean"), "train/lr": lr,
                                          **{f"train/{k}": accelerator.reduce(v, "mean") for k, v in terms.items()}}, step)
            if step == config.max_train_steps or (config.validation_steps and step % config.validation_steps == 0):
                evaluate()
            if step == config.max_train_steps or cadence.due(step, accelerator):
                guard.check(accelerator)
                save(numbered=step == config.max_train_steps or bool(config.checkpointing_steps and step % config.checkpointing_steps == 0))
            if step >= config.max_train_steps:
                break
        else:
            continue  # the epoch ended: next one
        break
    progress.close()
    evaluate()
    if evaluations:
        logger.info("tag agreement (mean F1): %.4f before, %.4f after (%s)", evaluations[0]["mean_f1"], evaluations[-1]["mean_f1"],
                    out / "tag_agreement.json")
    logger.info("done: %s (step %d)", out / "DAPE.pth", step)
    accelerator.end_training()
    if pending:
        losses += torch.stack(pending).tolist()
    return {"losses": losses, "lr_per_step": lr_per_step, "step": step, "evaluations": evaluations,
            "output_dir": out, "config": config, "tagger": tagger}


def launch(argv: list[str] | None = None) -> None:
    """Command-line entry: one process, or ``--num_processes N`` processes through torch.distributed.run."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.num_processes > 1 and not under_launcher():
        config, _, _ = resolve_run(args)  # the device may come from a resumed checkpoint
        start_processes(__file__, argv, args.num_processes, config.device, lambda: check_inputs(config))
        return
    main(args)


if __name__ == "__main__":
    cli_main(launch)
