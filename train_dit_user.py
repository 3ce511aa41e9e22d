"""Stage 2 of user-conditioned generation: train a diffusion model on pre-extracted VA-VAE latents.

The user ID is a class label with a null user for classifier-free guidance (hustvl/LightningDiT ``train.py``, with
the user as the class). The backbone (``--backbone``: ``models.user_generation.BACKBONES``, LightningDiT with
rectified flow or the users' latent UNet with DDPM), its objective and AdamW's group come from ``recipes/user.py``;
the previews and ``infer.py user`` call the same generation function. Writes ``OUTPUT_DIR/checkpoints/{last,best}.ckpt``
(``best_unet/`` in the users' layout for the UNet), previews and loss curves. The full guide (every flag, the three
losses in the log, resuming, multi-GPU, Kaggle cells): docs/user_generation.md.

    python train_dit_user.py --latent_dir /kaggle/working/latent_features --output_dir /kaggle/working/trained_models \\
        --batch_size 32 --max_epochs 100 --lr 1e-4 --devices 2 --precision 16-mixed
    python train_dit_user.py --latent_dir latents --output_dir runs/user --backbone unet --resume_from_checkpoint latest
    python train_dit_user.py --resume_from_checkpoint runs/user/checkpoints/last.ckpt        # every other setting from it
    python train_dit_user.py --config configs/user_dit_tiny.yaml --latent_dir latents --output_dir runs/tiny
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.latents import LatentDataset, LatentStats
from models.user_generation import BACKBONES, TIME_SAMPLINGS, TIMESTEP_SPACINGS, plain_config, sampler_names, validate_user_ids
from models.user_pipeline import CHECKPOINT_KIND, check_vae_matches, generate_user_images, sampling_kwargs
from models.vavae import VAVAE_CONFIGS
from pipelines.user_io import export_unet_folder, save_user_grid
from recipes.user import build_user_training, complete_config, load_latents
from utils.accelerator import create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import load_checkpoint, resolve_resume, save_checkpoint_files
from utils.cli import add_training_arguments, parse_training_args
from utils.config import ArgumentParser, add_config_argument, save_config
from utils.ema import EMA
from utils.errors import UserError
from utils.launch import cli_main, start_processes, under_launcher
from utils.log import TrainingProgress, log_image, log_scalars, setup_logger, start_tracking
from utils.plots import plot_curves
from utils.resume import check_saved_path, given_flags, resolve_resumed_config
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
from utils.validators import (
    fraction,
    fraction_below_one,
    guidance_scale,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

RESUME_PATTERNS = ["last.ckpt", "epoch_*.ckpt"]
# Settings a resumed run cannot change: the network and its objective.
FIXED_ON_RESUME = ("backbone", "model_size", "patch_size", "prediction_type", "num_train_timesteps", "beta_schedule")
# Never taken from a checkpoint (beside utils.resume.SESSION_SETTINGS): the start-only weights.
NOT_INHERITED = ("init_from",)
LOG_EVERY = 10  # optimiser steps between tracker scalars (each one a host sync)
NAN_HINT = ", or train with bf16 or fp32 (or --qk_norm) instead of fp16"
UNET_FOLDER = "best_unet"  # checkpoints/best_unet/: config.json + weights, condition_encoder.pt, scheduler and latent stats


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_config_argument(parser)
    data = parser.add_argument_group("data")
    data.add_argument("--latent_dir", default=None,
                      help="output of scripts/extract_features.py: train.safetensors, latents_stats.safetensors and, for the "
                      "validation loss, val.safetensors")
    data.add_argument("--use_flip", action="store_true",
                      help="train on the stored flipped copies half of the time (needs extraction with --flip; off by default: "
                      "time reversal is not label-safe for gait)")

    model = parser.add_argument_group("model")
    model.add_argument("--backbone", choices=BACKBONES.names(), default=None,
                       help=f"{BACKBONES.help_text()} (default: {BACKBONES.names()[0]}, or the resumed run's)")
    model.add_argument("--model_size", default=None,
                       help="; ".join(f"{name}: {', '.join(spec.sizes)} (default {spec.default_size})" for name, spec in BACKBONES.items())
                       + "; XL is the released LightningDiT-XL/1 (use it with --init_from)")
    model.add_argument("--patch_size", type=positive_int, default=1,
                       help="DiT patch size on the latent grid (default 1, as LightningDiT on 16x16 latents)")
    model.add_argument("--num_users", type=positive_int, default=None,
                       help="users the model knows, IDs 1..N (default: recorded in the latent files; must agree with them)")
    model.add_argument("--cfg_dropout", type=fraction_below_one, default=0.1,
                       help="probability of replacing a user by the null user in training, for classifier-free guidance "
                       "(default 0.1, as DiT/LightningDiT; 0 makes guidance impossible)")
    model.add_argument("--qk_norm", action=argparse.BooleanOptionalAction, default=None,
                       help="DiT QK-norm, recommended for fp16 (default: on; with --init_from, the release's setting)")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute activations in the backward pass: less memory, about 30%% slower")
    model.add_argument("--init_from", default=None,
                       help="DiT only: start from a released LightningDiT checkpoint: every tensor, and its trained null class (row 1000) "
                       "as the null user (row num_users); user rows start new; pick the matching --model_size (XL for "
                       "lightningdit-xl-imagenet256-*.pt); the log lists what was loaded, resized and left new")

    objective = parser.add_argument_group("objective")
    objective.add_argument("--time_sampling", choices=TIME_SAMPLINGS, default="logit_normal",
                           help="DiT training times: logit_normal (LightningDiT's use_lognorm, default) or uniform")
    objective.add_argument("--no-cosine_loss", dest="cosine_loss", action="store_false",
                           help="DiT: drop the cosine-similarity term LightningDiT adds to the velocity MSE")
    objective.add_argument("--prediction_type", choices=("epsilon", "v_prediction", "sample"), default="epsilon",
                           help="UNet: what the network predicts (default epsilon, as the users' note)")
    objective.add_argument("--num_train_timesteps", type=positive_int, default=1000, help="UNet: DDPM timesteps (default 1000)")
    objective.add_argument("--beta_schedule", choices=("linear", "scaled_linear", "squaredcos_cap_v2"), default="linear",
                           help="UNet: DDPM beta schedule (default linear, diffusers' DDPMScheduler default)")

    add_training_arguments(
        parser,
        defaults=dict(
            train_batch_size=32, gradient_accumulation_steps=1, learning_rate=1e-4, lr_warmup_steps=0, max_grad_norm=1.0,
            mixed_precision="auto", compile=False, dataloader_num_workers=0, seed=42, output_dir="trained_models",
            resume_from_checkpoint=None, checkpointing_steps=0, checkpointing_minutes=0, checkpoints_total_limit=3,
            report_to=None, device="auto", num_processes=1,
        ),
        help={
            "train_batch_size": "latents per device and step",
            "learning_rate": "AdamW learning rate (the note suggests 5e-5 if the loss does not converge)",
            "dataloader_num_workers": "data-loader workers (0: the latents are in memory, workers only add start-up time)",
            "mixed_precision": "auto: bf16 where supported, fp16 with loss scaling on older GPUs such as the T4, fp32 on CPU",
            "output_dir": "run folder",
            "resume_from_checkpoint": "checkpoint to continue from (every setting not given comes from it), or 'latest' "
                                      "(OUTPUT_DIR/checkpoints/last.ckpt)",
            "checkpointing_steps": "also rewrite checkpoints/last.ckpt every N optimiser steps within an epoch, 0 turns it off",
            "checkpointing_minutes": "also rewrite checkpoints/last.ckpt every N minutes within an epoch (Kaggle), 0 turns it off",
            "checkpoints_total_limit": "epoch_NNNN.ckpt files kept, 0 keeps all",
        },
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--max_epochs", type=positive_int, default=100, help="epochs in total (default 100)")
    optim.add_argument("--adam_beta2", type=fraction_below_one, default=0.999,
                       help="AdamW beta2 (default 0.999; LightningDiT uses 0.95 at batch 1024)")
    optim.add_argument("--weight_decay", type=non_negative_float, default=0.0, help="AdamW weight decay (default 0, as DiT/LightningDiT)")
    optim.add_argument("--ema_decay", type=fraction_below_one, default=0.9999,
                       help="EMA decay of the weights used for validation, previews and inference (default 0.9999, reached "
                       "through a warm-up so small data sets do not sample from an average stuck near initialisation)")
    optim.add_argument("--no-ema_warmup", dest="ema_warmup", action="store_false",
                       help="use the EMA decay from the first step (not advised for short runs)")

    check = parser.add_argument_group("validation and previews")
    check.add_argument("--val_every", type=positive_int, default=1, help="validation loss every N epochs and at the end (default 1)")
    check.add_argument("--val_time_bins", type=fraction, nargs="+", default=None,
                       help="also log the EMA validation loss at these flow times (0 noise, 1 data) with seeded noise, a "
                       "diagnostic (e.g. 0.1 0.3 0.5 0.7 0.9; for the UNet, timestep = (1 - t) x num_train_timesteps; default off). "
                       "The validation loss itself is the training objective on seeded draws, with raw and EMA weights")
    check.add_argument("--preview_every", type=non_negative_int, default=5,
                       help="preview grid every N epochs and at the end; 0 turns it off (default 5)")
    check.add_argument("--preview_users", type=positive_int, nargs="+", default=None,
                       help="user IDs in the preview grid (default the first 8)")
    check.add_argument("--preview_samples", type=positive_int, default=4, help="samples per user in the preview grid (default 4)")
    check.add_argument("--preview_steps", type=positive_int, default=50, help="sampling steps of the previews (default 50)")
    check.add_argument("--preview_batch_size", type=positive_int, default=64,
                       help="samples generated at once in previews (default 64, infer.py user's default, so inference "
                       "reproduces a preview bit for bit)")
    check.add_argument("--vavae_path", default=None,
                       help="VA-VAE used for extraction, to decode previews (its fingerprint must match the latents); "
                       "without it previews show latent channels")
    check.add_argument("--vavae_config", choices=sorted(VAVAE_CONFIGS), default="f16d32",
                       help="architecture of a .pt VA-VAE (default f16d32)")

    sample = parser.add_argument_group("sampling defaults (stored in checkpoints, used by previews and infer.py user)")
    sample.add_argument("--sampler", choices=sampler_names(), default=None,
                        help="DiT: euler (default) or heun; UNet: ddim (default), dpmsolver++, unipc or ddpm (ancestral)")
    sample.add_argument("--sample_steps", type=positive_int, default=None,
                        help="inference steps (default 250 for the DiT, 50 for the UNet)")
    sample.add_argument("--guidance_scale", type=guidance_scale, default=None,
                        help="classifier-free guidance scale, 1 = none, at most 100 (default 4.0)")
    sample.add_argument("--guidance_interval", type=fraction, nargs=2, default=None, metavar=("START", "END"),
                        help="flow-time interval where guidance acts (default 0.11 1.0 for the DiT as LightningDiT, 0 1 for the UNet)")
    sample.add_argument("--shift", type=positive_float, default=None, help="DiT timestep shift, LightningDiT's convention (default 0.3)")
    sample.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default=None,
                        help="UNet DDIM step placement: trailing (default: the first of 50 steps is t=999) or leading "
                        "(DDIMScheduler.from_config of the DDPM config, the note's: t=980) or linspace")
    sample.add_argument("--guidance_channels", type=positive_int, default=None,
                        help="guide only the first N latent channels (the reference's 3-channel bug; default: all)")

    out = parser.add_argument_group("outputs")
    out.add_argument("--save_every", type=non_negative_int, default=0,
                     help="also keep checkpoints/epoch_NNNN.ckpt every N epochs (default 0: off)")
    out.add_argument("--slim_best", action="store_true",
                     help="write best.ckpt without the optimiser and RNG state: half the size, enough for inference "
                     "(resume from last.ckpt); useful for XL on a small disk")
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parse_training_args(parser, argv)

    if args.latent_dir is None and not args.resume_from_checkpoint:  # `latest` takes it from the run's checkpoint
        parser.error("--latent_dir is required (the output folder of scripts/extract_features.py)")
    for flag in ("max_epochs", "val_every", "preview_samples", "preview_steps", "preview_batch_size", "patch_size"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if not 0.0 <= args.cfg_dropout < 1.0:
        parser.error("--cfg_dropout must be in [0, 1)")
    if any(not 0.0 <= t <= 1.0 for t in args.val_time_bins or []):
        parser.error("--val_time_bins must lie in [0, 1]")
    return args


# --------------------------------------------------------------------------------------------------
# Multi-process launch
# --------------------------------------------------------------------------------------------------


def launch(argv: list[str] | None = None) -> int:
    """Command-line entry: one process, or ``--devices N`` processes through torch.distributed.run.

    With N > 1 every flag, path and file check (:func:`prepare_run`) runs here, in the parent, before any process
    starts; a user error found later inside a process is raised here once as a UserError.
    """
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    if args.num_processes > 1 and not under_launcher():
        return start_processes(__file__, argv, args.num_processes, args.device, lambda: prepare_run(args))
    main(args)
    return 0


# --------------------------------------------------------------------------------------------------
# Building blocks
# --------------------------------------------------------------------------------------------------


def resolve_sampling(args, backbone: str) -> dict:
    """Sampling defaults of the backbone, overridden by the flags given."""
    settings = dict(BACKBONES.get(backbone).sampling_defaults)
    if args.sampler is not None:
        allowed = BACKBONES.get(backbone).objective.samplers
        if args.sampler not in allowed:
            raise UserError(f"--sampler {args.sampler} does not sample the {backbone} backbone; use {' or '.join(allowed)}.")
        settings["sampler"] = args.sampler
    for flag, key in (("sample_steps", "num_steps"), ("guidance_scale", "guidance_scale"), ("shift", "shift"),
                      ("guidance_channels", "guidance_channels"), ("timestep_spacing", "timestep_spacing")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.guidance_interval is not None:
        settings["guidance_interval"] = list(args.guidance_interval)
    # Checked here, not at the first preview an epoch later.
    if settings["num_steps"] < 1 or settings["guidance_scale"] < 0 or settings["shift"] <= 0:
        raise UserError("--sample_steps must be at least 1, --guidance_scale at least 0 and --shift positive.")
    if settings["guidance_channels"] is not None and settings["guidance_channels"] < 1:
        raise UserError("--guidance_channels must be a positive channel count (leave it out to guide all channels).")
    if args.cfg_dropout == 0:
        if args.guidance_scale not in (None, 1.0):
            raise UserError(f"--cfg_dropout 0 trains no null user, so --guidance_scale {args.guidance_scale:g} is impossible; "
                            "drop --guidance_scale (no guidance) or pass a --cfg_dropout above 0.")
        settings["guidance_scale"] = 1.0  # the users' latent-UNet layout: no null row, unguided sampling
    return settings


def _seeded(seed: int, salt: int, index: int) -> torch.Generator:
    state = np.random.SeedSequence([seed, salt, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1)
    return torch.Generator().manual_seed(int(state))


def val_noise(seed: int, time_bin: int, indices: list[int], shape) -> torch.Tensor:
    """The same N(0, I) noise for validation sample ``index`` at ``time_bin`` in every epoch and process."""
    return torch.stack([torch.randn(shape, generator=_seeded(seed, 104729 + time_bin, index)) for index in indices])


def validation_draws(seed: int, indices: list[int], shape, *, objective, setup, cfg_dropout: float) -> dict[str, torch.Tensor]:
    """Per validation sample, drawn as the training step draws them but seeded by the sample's index: the label
    dropout, the time (logit-normal or uniform flow time; uniform DDPM timestep) and the noise, so every epoch
    and every process measures the training objective on the same draws."""
    drops, times, noises = [], [], []
    for index in indices:
        generator = _seeded(seed, 7919, index)
        drops.append(bool(torch.rand((), generator=generator) < cfg_dropout))
        times.append(objective.draw_time(generator, setup))
        noises.append(torch.randn(shape, generator=generator))
    return {"drop": torch.tensor(drops), "t": torch.stack(times), "noise": torch.stack(noises)}


@torch.no_grad()
def validation_objective(model, config, val_set: LatentDataset, accelerator, objective, setup) -> float:
    """The training objective on the validation set: the same loss, label dropout and time distribution as the
    training step, on seeded draws (:func:`validation_draws`), averaged over all processes. Run it with the raw
    weights to compare with the training loss, with the EMA weights to judge what inference samples with."""
    device = accelerator.device
    inner = model
    null_label = inner.null_label
    indices = list(range(accelerator.process_index, len(val_set), accelerator.num_processes))
    shape = tuple(val_set.latents.shape[1:])
    total = torch.zeros((), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()  # eval: no label dropout inside the model; the seeded draws apply it instead
    try:
        for start in range(0, len(indices), config.train_batch_size):
            chunk = indices[start:start + config.train_batch_size]
            draws = validation_draws(config.seed, chunk, shape, objective=objective, setup=setup,
                                     cfg_dropout=config.cfg_dropout if null_label is not None else 0.0)
            latents = val_set.latents[chunk].to(device)
            labels = val_set.labels[chunk].clone()
            if null_label is not None:
                labels[draws["drop"]] = null_label
            labels = labels.to(device)
            with accelerator.autocast():
                terms = objective.loss(model, latents, labels, setup, times=draws["t"].to(device), noise=draws["noise"].to(device))
            per_sample = terms["mse_per_sample"].double()
            if terms.get("cos_per_sample") is not None:  # the flow objective's cosine term, per sample as well
                per_sample = per_sample + terms["cos_per_sample"].double()
            total += per_sample.sum()
    finally:
        model.train(was_training)
    total = accelerator.reduce(total, reduction="sum") if accelerator.num_processes > 1 else total
    return float(total) / max(len(val_set), 1)


@torch.no_grad()
def validation_at_times(model, args, val_set: LatentDataset, accelerator, objective, setup) -> list[float]:
    """A diagnostic: the objective at each of ``--val_time_bins`` with seeded noise and no label dropout."""
    device = accelerator.device
    indices = list(range(accelerator.process_index, len(val_set), accelerator.num_processes))
    shape = tuple(val_set.latents.shape[1:])
    totals = torch.zeros(len(args.val_time_bins), device=device, dtype=torch.float64)
    was_training = model.training
    model.eval()
    try:
        for bin_index, t_value in enumerate(args.val_time_bins):
            for start in range(0, len(indices), args.train_batch_size):
                chunk = indices[start:start + args.train_batch_size]
                latents = val_set.latents[chunk].to(device)
                labels = val_set.labels[chunk].to(device)
                noise = val_noise(args.seed, bin_index, chunk, shape).to(device)
                times = torch.full((len(chunk),), objective.time_at(float(t_value), setup), device=device)
                with accelerator.autocast():
                    terms = objective.loss(model, latents, labels, setup, times=times, noise=noise)
                totals[bin_index] += terms["loss"].double() * len(chunk)
    finally:
        model.train(was_training)
    totals = accelerator.reduce(totals, reduction="sum") if accelerator.num_processes > 1 else totals
    return (totals / max(len(val_set), 1)).tolist()


def _connect_gaps(values: list[float]) -> list[float]:
    """For the plot only: draw the validation curve straight through epochs that --val_every skipped (NaN)."""
    values = np.asarray(values, dtype=float)
    known = np.flatnonzero(np.isfinite(values))
    if len(known) == 0:
        return values.tolist()
    filled = np.interp(np.arange(len(values)), known, values[known])
    filled[: known[0]] = np.nan  # nothing before the first validation
    return filled.tolist()


def _autocast_dtype(accelerator) -> torch.dtype | None:
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(accelerator.mixed_precision)


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------


def resolve_config(args: argparse.Namespace, checkpoint: dict | None, source: str) -> argparse.Namespace:
    """The run's settings: the flags, and (resuming) the checkpoint's for every flag not given."""
    saved = checkpoint["config"] if checkpoint is not None else None
    config = resolve_resumed_config(args, None, saved, fixed=FIXED_ON_RESUME, session=NOT_INHERITED, source=source)
    return complete_config(config)


@dataclass
class RunPlan:
    """What :func:`prepare_run` checked and read: the run's settings, its data and the checkpoint it resumes."""

    config: argparse.Namespace
    checkpoint: dict | None
    resume_path: Path | None
    stats: LatentStats
    train_set: LatentDataset
    val_set: LatentDataset | None
    num_users: int
    sampling: dict
    preview_users: list[int]


def prepare_run(args: argparse.Namespace, logger=None) -> RunPlan:
    """Every check that needs no process group: flags, the resumed checkpoint, the latents, the VA-VAE, --init_from.

    ``launch`` runs it in the parent before ``--devices N`` processes start, so a user error is one line, once.
    """
    checkpoint, resume_path = None, None
    resume = args.resume_from_checkpoint
    if resume and resume != "latest":
        resume_path = resolve_resume(resume, ".", RESUME_PATTERNS)
        checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_dit_user.py --resume_from_checkpoint")
    config = resolve_config(args, checkpoint, str(resume_path))
    checkpoint_dir = Path(config.output_dir) / "checkpoints"
    if resume == "latest":
        resume_path = resolve_resume("latest", checkpoint_dir, RESUME_PATTERNS)
        if resume_path is not None:
            checkpoint = load_checkpoint(resume_path, CHECKPOINT_KIND, "train_dit_user.py --resume_from_checkpoint")
            config = resolve_config(args, checkpoint, str(resume_path))
    if checkpoint is not None and "optimizer" not in checkpoint:
        raise UserError(f"{resume_path} was written with --slim_best and holds no optimiser state; resume from last.ckpt.")
    if config.latent_dir is None:
        raise UserError("--latent_dir is required (the output folder of scripts/extract_features.py)"
                        + (f"; --resume_from_checkpoint latest found no run in {checkpoint_dir}" if resume == "latest" else ""))
    if checkpoint is not None and "latent_dir" not in given_flags(args):
        check_saved_path(config, "latent_dir", resume_path, "latent folder (scripts/extract_features.py's output)")
    spec = BACKBONES.get(config.backbone)
    if config.model_size.lower() not in {name.lower() for name in spec.sizes}:
        raise UserError(f"--model_size {config.model_size} is not a {config.backbone} size; choose one of {', '.join(spec.sizes)}.")
    if config.init_from and not spec.supports_init_from:
        raise UserError(f"--init_from loads LightningDiT weights and works with --backbone "
                        f"{' or '.join(name for name, other in BACKBONES.items() if other.supports_init_from)} only.")
    if config.init_from and checkpoint is None and not Path(config.init_from).is_file():
        raise UserError(f"--init_from {config.init_from} does not exist; expected a LightningDiT .pt file such as "
                        "lightningdit-xl-imagenet256-800ep.pt.")
    sampling = resolve_sampling(config, config.backbone)
    if config.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")

    stats, train_set, val_set, num_users = load_latents(config)
    channels, height, width = train_set.latents.shape[1:]
    if height != width:
        raise UserError(f"The latents are {height}x{width}; the DiT and UNet here need square latents "
                        "(extract with a square --image_size).")
    preview_users = validate_user_ids(config.preview_users or list(range(1, min(num_users, 8) + 1)), num_users, "--preview_users")
    if config.vavae_path:
        check_vae_matches(stats, config.vavae_path)  # previews decode with it: it must be the extraction's VA-VAE
    if checkpoint is not None:
        old = LatentStats.from_dict(checkpoint["latent_stats"])
        same_stats = torch.allclose(old.mean, stats.mean) and torch.allclose(old.std, stats.std)
        if old.vae_fingerprint != stats.vae_fingerprint or not same_stats:
            raise UserError(f"The latents in {config.latent_dir} are not the ones {resume_path} was trained on (other statistics or "
                            "VA-VAE); resume with the same --latent_dir or start a new --output_dir.")
        if int(checkpoint["num_users"]) != num_users:
            raise UserError(f"{resume_path} was trained for {checkpoint['num_users']} users, the latents have {num_users}.")
    return RunPlan(config, checkpoint, resume_path, stats, train_set, val_set, num_users, sampling, preview_users)


@dataclass
class Run:
    """The objects one training run holds while it loops (what the checkpoint, preview and validation helpers read)."""

    config: argparse.Namespace
    accelerator: object
    model: torch.nn.Module  # as prepared by accelerate (DDP-wrapped on several processes)
    bare: torch.nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    ema: EMA
    parts: object  # recipes.TrainingParts
    output: Path
    sampling: dict
    preview: dict
    history: dict
    best: BestMetric
    best_on: str
    step: int = 0

    @property
    def checkpoint_dir(self) -> Path:
        return self.output / "checkpoints"


def save_run(run: Run, epoch: int, is_best: bool = False, batches_done: int = 0, meter=None) -> None:
    """Write ``last.ckpt`` (and ``best.ckpt``, ``epoch_NNNN.ckpt``, the users' UNet folder where due), atomically."""
    config, extras = run.config, run.parts.extras
    noise_scheduler = extras["noise_scheduler"]
    state = training_checkpoint(
        CHECKPOINT_KIND, run.accelerator, run.model, run.optimizer, vars(config), run.step, epoch, run.lr_scheduler, run.ema,
        backbone=config.backbone, model_config=extras["model_config"], num_users=extras["num_users"],
        latent_stats=extras["stats"].to_dict(), latent_shape=[int(n) for n in run.parts.datasets["train"].latents.shape[1:]],
        noise_scheduler_config=plain_config(noise_scheduler.config) if noise_scheduler is not None else None,
        sampling=run.sampling, preview=run.preview, history=run.history,
        best={"metric": run.best.best, "epoch": run.best.epoch, "on": run.best_on}, batches_done=batches_done,
        epoch_loss_sum=[float(meter.total), meter.count] if meter is not None and meter.count else None,
    )
    if not run.accelerator.is_main_process:
        return
    copies, variants = [], {}
    if is_best and config.slim_best:  # inference only: half the size (resume from last.ckpt)
        resume_only = ("optimizer", "rng", "lr_scheduler", "scaler")
        variants[run.checkpoint_dir / "best.ckpt"] = {k: v for k, v in state.items() if k not in resume_only}
    elif is_best:
        copies.append(run.checkpoint_dir / "best.ckpt")
    if batches_done == 0 and config.save_every and epoch % config.save_every == 0:
        copies.append(run.checkpoint_dir / f"epoch_{epoch:04d}.ckpt")
    save_checkpoint_files(state, run.checkpoint_dir / "last.ckpt", copies, rotate_pattern="epoch_*.ckpt",
                          keep=config.checkpoints_total_limit, variants=variants)
    if is_best and extras["spec"].exports_unet_folder:  # the users' latent-UNet layout, EMA weights, for their generation script
        with run.ema.averaged_weights(run.bare):
            export_unet_folder(run.bare, noise_scheduler, extras["stats"], run.checkpoint_dir / UNET_FOLDER)


def write_preview(run: Run, epoch: int, vae, logger) -> Path:
    """A grid with a row per preview user, sampled with the EMA weights as ``infer.py user`` samples."""
    config, preview = run.config, run.preview
    with run.ema.averaged_weights(run.bare):
        images, _ = generate_user_images(
            run.bare, config.backbone, preview["users"], config.preview_samples, stats=run.parts.extras["stats"], vae=vae,
            seed=config.seed, batch_size=config.preview_batch_size, device=run.accelerator.device,
            autocast_dtype=_autocast_dtype(run.accelerator), noise_scheduler=run.parts.extras["noise_scheduler"],
            **sampling_kwargs(preview["settings"]),
        )
    path = save_user_grid(images, preview["users"], config.preview_samples, run.output / "previews" / f"epoch_{epoch:04d}.png")
    log_image(run.accelerator, "previews", path, run.step)
    logger.info("epoch %d: preview %s%s", epoch, path, "" if vae is not None else " (latent channels 0-2: no --vavae_path)")
    return path


def validate(run: Run, done: int, is_final: bool) -> tuple[float | None, float | None]:
    """``(val with raw weights, val with EMA weights)`` when validation is due, else ``(None, None)``."""
    config, val_set = run.config, run.parts.datasets["val"]
    if val_set is None or not (done % config.val_every == 0 or is_final):
        return None, None
    objective, setup = run.parts.extras["spec"].objective, run.parts.extras["setup"]
    val_loss = validation_objective(run.bare, config, val_set, run.accelerator, objective, setup)
    with run.ema.averaged_weights(run.bare):
        val_ema = validation_objective(run.bare, config, val_set, run.accelerator, objective, setup)
        if config.val_time_bins:
            run.history["val_per_bin"].append(validation_at_times(run.bare, config, val_set, run.accelerator, objective, setup))
    check_finite(val_loss, run.step)
    check_finite(val_ema, run.step)
    return val_loss, val_ema


def restore_run(run: Run, checkpoint: dict, logger) -> tuple[int, int, list | None]:
    """Load a resumed checkpoint into ``run``; ``(start epoch, batches done within it, their loss sum)``."""
    restore_training_checkpoint(checkpoint, run.accelerator, run.model, run.optimizer, run.lr_scheduler, run.ema)
    run.step, start_epoch = checkpoint["step"], checkpoint["epoch"]
    run.history = dict({"val_ema": [float("nan")] * len(checkpoint["history"]["train"])},
                       **{k: list(v) for k, v in checkpoint["history"].items()})
    run.best_on, run.best.best, run.best.epoch = checkpoint["best"]["on"], checkpoint["best"]["metric"], checkpoint["best"]["epoch"]
    skip_batches, partial = int(checkpoint.get("batches_done", 0)), checkpoint.get("epoch_loss_sum")
    logger.info("resumed at epoch %d%s, optimiser step %d", start_epoch, f" (+{skip_batches} batches)" if skip_batches else "", run.step)
    return start_epoch, skip_batches, partial


def end_of_epoch(run: Run, done: int, epoch_loss: float, seconds: float, steps: int, vae, logger) -> None:
    """Validate, log, checkpoint, plot and preview after epoch ``done``."""
    config, history, best = run.config, run.history, run.best
    is_final = done == config.max_epochs
    val_loss, val_ema = validate(run, done, is_final)
    history["train"].append(epoch_loss)
    history["val"].append(val_loss if val_loss is not None else float("nan"))
    history["val_ema"].append(val_ema if val_ema is not None else float("nan"))
    metric = epoch_loss if run.best_on == "train" else val_ema
    is_best = metric is not None and best.update(metric, done)
    val_text = f" | val {val_loss:.4f} (raw weights, same objective) | val EMA {val_ema:.4f}" if val_loss is not None else ""
    logger.info("epoch %d/%d | train %.4f (raw weights, epoch mean)%s | best %s %.4f (epoch %d) | step %d | lr %.2e | "
                "%.1f s, %.0f latents/s",
                done, config.max_epochs, epoch_loss, val_text, run.best_on, best.best, best.epoch, run.step,
                run.lr_scheduler.get_last_lr()[0], seconds,
                steps * config.train_batch_size * run.accelerator.num_processes / max(seconds, 1e-9))
    scalars = {"epoch/train_loss": epoch_loss, "epoch/val_loss": val_loss, "epoch/val_loss_ema": val_ema}
    if val_loss is not None and config.val_time_bins:
        scalars.update({f"val_ema/t_{t:g}": value for t, value in zip(config.val_time_bins, history["val_per_bin"][-1])})
    log_scalars(run.accelerator, scalars, run.step)
    save_run(run, done, is_best)
    if run.accelerator.is_main_process:
        curves = {"train (raw weights)": history["train"]}
        if run.parts.datasets["val"] is not None:
            curves["validation (raw weights)"] = _connect_gaps(history["val"])
            curves["validation (EMA weights)"] = _connect_gaps(history["val_ema"])
        plot_curves(curves, run.output / "loss_curves.png", title=f"{config.backbone} {config.model_size}: training objective", log_y=True)
        if config.preview_every and (done % config.preview_every == 0 or is_final):
            write_preview(run, done, vae, logger)
    run.accelerator.wait_for_everyone()


def main(args: argparse.Namespace) -> dict:
    if args.num_processes > 1 and not under_launcher():
        raise UserError(f"--devices {args.num_processes} starts {args.num_processes} processes from the command line "
                        "(python train_dit_user.py ... --devices N); from Python call train_dit_user.launch(argv) or use torchrun.")
    reset_accelerate_state()
    plan = prepare_run(args)
    config, checkpoint, resume_path = plan.config, plan.checkpoint, plan.resume_path
    config.num_users = plan.num_users
    output = Path(config.output_dir)
    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.device == "cpu", seed=config.seed, compile_model=config.compile, project_dir=str(output),
        report_to=config.report_to,
    )
    is_main = accelerator.is_main_process
    logger = setup_logger(output, is_main)
    if under_launcher() and config.num_processes not in (1, accelerator.num_processes):
        logger.warning("--num_processes %d, but the launcher started %d processes; training on %d", config.num_processes,
                       accelerator.num_processes, accelerator.num_processes)
    logger.info("run %s: %s", output, f"resuming from {resume_path}" if resume_path else "new run")
    if plan.val_set is None:
        logger.warning("no %s: no validation loss; best.ckpt follows the training loss", Path(config.latent_dir) / "val.safetensors")

    parts = build_user_training(config, accelerator.device, checkpoint=checkpoint,
                                data=(plan.stats, plan.train_set, plan.val_set, plan.num_users))
    train_set, val_set, model = parts.datasets["train"], parts.datasets["val"], parts.model
    if checkpoint is None:
        config.qk_norm = parts.extras["qk_norm"]
    if parts.extras["note"]:
        logger.info(parts.extras["note"])
    channels, height, width = train_set.latents.shape[1:]
    logger.info("%s %s: %.2fM parameters, %d users%s, latents %dx%dx%d", config.backbone, config.model_size,
                sum(p.numel() for p in model.parameters()) / 1e6, plan.num_users,
                " (+ null user)" if model.null_label is not None else " (no null user: unguided sampling)", channels, height, width)

    vae = None
    if config.vavae_path and is_main and config.preview_every:
        from models.vavae import load_vavae

        vae = load_vavae(config.vavae_path, device=accelerator.device, config=config.vavae_config)

    # The loader's own generator: creating an iterator draws nothing from the global RNG (exact resumes within an epoch).
    loader = make_loader(train_set, config.train_batch_size, workers=config.dataloader_num_workers,
                         device_type=accelerator.device.type, seed=config.seed)
    optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused_optimizer(accelerator.device))
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    warmup = config.lr_warmup_steps
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / (warmup + 1)) if warmup else 1.0)
    bare = unwrap(accelerator, model)
    ema = EMA(bare, decay=config.ema_decay, warmup=config.ema_warmup)
    steps_per_epoch = max(1, len(loader) // config.gradient_accumulation_steps)
    autocast_dtype = _autocast_dtype(accelerator)
    preview = {"users": plan.preview_users, "samples_per_user": config.preview_samples, "seed": config.seed,
               "batch_size": config.preview_batch_size, "autocast": accelerator.mixed_precision if autocast_dtype else None,
               "settings": dict(plan.sampling, num_steps=config.preview_steps)}
    run = Run(config, accelerator, model, bare, optimizer, lr_scheduler, ema, parts, output, plan.sampling, preview,
              history={"train": [], "val": [], "val_ema": [], "val_per_bin": []}, best=BestMetric("min"),
              best_on="val_ema" if val_set is not None else "train")  # best.ckpt is sampled with its EMA weights
    del plan

    start_epoch, skip_batches, partial = 0, 0, None  # a checkpoint written within an epoch: batches done, their loss sum
    if checkpoint is not None:
        start_epoch, skip_batches, partial = restore_run(run, checkpoint, logger)
    if is_main:
        save_config(vars(config), output / "args.yaml")
    start_tracking(accelerator, output.name, vars(config))
    log_run_header(logger, accelerator, config.train_batch_size,
                   f"{len(train_set)} training latents, {len(val_set) if val_set else 0} validation, {steps_per_epoch} steps per epoch, "
                   f"lr {config.learning_rate:g}")
    if checkpoint is not None:
        restore_rng(checkpoint, accelerator)  # last thing before the loop: nothing after it may draw random numbers
        del checkpoint
    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    guard = NonFiniteGuard(accelerator.device, NAN_HINT, model=model)  # also stops diverging weights
    for epoch in range(start_epoch, config.max_epochs):
        model.train()
        loader.set_epoch(epoch)
        batches = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        progress = TrainingProgress(len(loader), f"epoch {epoch + 1}/{config.max_epochs}", enabled=is_main, initial=skip_batches)
        if partial:
            progress.epoch_meter.total = torch.tensor(partial[0], device=accelerator.device)
            progress.epoch_meter.count = int(partial[1])
        batches_done, skip_batches, partial = skip_batches, 0, None
        started = time.perf_counter()
        for latents, labels in batches:
            try:
                with accelerator.accumulate(model):
                    loss = parts.objective(latents, labels, model=model)["loss"]
                    backward_and_step(accelerator, loss, optimizer, model.parameters(), config.max_grad_norm)
            except torch.OutOfMemoryError as err:
                raise UserError(out_of_memory_message(config.train_batch_size,
                                                      " (--gradient_accumulation_steps), or add --gradient_checkpointing")) from err
            guard.update(loss, run.step + 1)
            batches_done += 1
            progress.update(loss, lr_scheduler.get_last_lr()[0])
            if accelerator.sync_gradients:
                lr_scheduler.step()
                ema.update(bare)
                run.step += 1
                if run.step % LOG_EVERY == 0:
                    guard.check(accelerator)
                    log_scalars(accelerator, {"train/loss": loss, "train/lr": lr_scheduler.get_last_lr()[0]}, run.step)
                if batches_done < len(loader) and cadence.due(run.step, accelerator):
                    guard.check(accelerator)
                    save_run(run, epoch, batches_done=batches_done, meter=progress.epoch_meter)
                    cadence.saved()
        progress.close()
        guard.check(accelerator)
        seconds = time.perf_counter() - started
        epoch_loss = float(accelerator.gather(progress.epoch_meter.total[None] / progress.epoch_meter.count).mean())
        check_finite(epoch_loss, run.step, NAN_HINT)
        end_of_epoch(run, epoch + 1, epoch_loss, seconds, progress.steps, vae, logger)
        cadence.saved()

    best_dict = {"metric": run.best.best, "epoch": run.best.epoch, "on": run.best_on}
    logger.info("done: %s (best %s loss %.4f at epoch %d)", run.checkpoint_dir, run.best_on, run.best.best, run.best.epoch)
    accelerator.end_training()
    return {"history": run.history, "step": run.step, "best": best_dict, "output_dir": output, "checkpoints": run.checkpoint_dir,
            "config": config}


if __name__ == "__main__":
    cli_main(launch)
