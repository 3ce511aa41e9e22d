"""Train SeeSR (ControlNet + the UNet's image cross-attention) with the timestep-adaptive multi-scale injector.

SeeSR (Wu et al., CVPR 2024, https://github.com/cswry/SeeSR ``train_seesr.py``) on diffusers' ControlNet-training
conventions (``examples/controlnet/train_controlnet.py``: flag names, ``accelerate`` state in ``checkpoint-<step>/``
folders, ``--resume_from_checkpoint latest``), with our injector (``--injector``, the keys of
``models.timestep_adaptive.INJECTORS``) between ControlNet and UNet. The models, optimiser groups, objective and data
come from ``recipes.seesr.build_seesr_training``; this script parses, builds and runs the loop.

    python train_seesr_timestep.py --pretrained_model_path preset/models/stable-diffusion-2-base \
        --train_data_dir datasets/HR --output_dir experience/timestep_multiscale --injector timestep_multiscale
    python train_seesr_timestep.py --resume_from_checkpoint latest --output_dir experience/timestep_multiscale

Every flag, the data layouts, the run folder's files and the differences from SeeSR's script: docs/seesr.md.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import torch

from models.timestep_adaptive import INJECTORS
from recipes import TrainingParts
from recipes.seesr import (
    UNET_FOLDER,
    add_ram_inputs,
    build_seesr_datasets,
    build_seesr_training,
    default_workers,
    loss_generator,
)
from utils.accelerator import create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import (
    atomic_write_text,
    checkpoint_folders,
    latest_checkpoint_folder,
    publish_checkpoint_folder,
    rotate_checkpoint_folders,
    staging_folder,
)
from utils.cli import add_ram_arguments, add_training_arguments, parse_training_args
from utils.config import ArgumentParser, add_config_argument, config_to_dict, save_config
from utils.errors import CheckpointError, UserError, run_cli
from utils.log import LossMeter, TrainingProgress, log_image, log_scalars, setup_logger, start_tracking
from utils.resume import given_flags, resolve_resumed_config
from utils.training import (
    CheckpointCadence,
    NonFiniteGuard,
    backward_and_step,
    fused_optimizer,
    keeping_configured_learning_rates,
    keeping_optimizer_implementation,
    out_of_memory_message,
    unwrap,
)
from utils.validators import (
    fraction,
    fraction_below_one,
    guidance_scale,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
)

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
CHECKPOINT_KIND = "seesr_timestep"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Flags a resumed run must share with the run that wrote the checkpoint (they fix what is being trained).
RESUME_FIXED_FLAGS = ("injector", "timestep_weights", "injector_grouping", "timestep_weights_per_group",
                      "timestep_table_bins", "train_injector_only", "conditioning_embedding_channels",
                      "no_image_cross_attention", "trainable_modules")
# Never taken from a checkpoint (beside utils.resume.SESSION_SETTINGS): settings of this machine and session.
NOT_INHERITED = ("given_flags", "allow_tf32", "enable_xformers_memory_efficient_attention", "set_grads_to_none",
                 "prompt_cache_size")
# Alternatives: giving one of a group on a resumed run replaces the whole group's saved values.
DATA_SOURCE_FLAGS = frozenset({"root_folders", "train_data_dir", "hr_dir", "lr_dir"})
START_WEIGHT_FLAGS = frozenset({"seesr_model_path", "controlnet_model_path", "unet_model_path"})
W_T_LOGGED_AT = (999, 750, 500, 250, 1)  # timesteps whose w(t) goes to the tracker as scalars
# SeeSR's train_seesr.py flags refused here: flag -> (takes a value, reason).
REFUSED_SEESR_FLAGS = {
    "revision": (True, "nothing is downloaded: pass local folders"),
    "tokenizer_name": (True, "the tokenizer is --pretrained_model_path's tokenizer/"),
    "cache_dir": (True, "nothing is downloaded, so there is no cache"),
    "push_to_hub": (False, "nothing is uploaded"),
    "hub_token": (True, "nothing is uploaded"),
    "hub_model_id": (True, "nothing is uploaded"),
    "use_8bit_adam": (False, "bitsandbytes is not a dependency; AdamW is used"),
    "dataset_name": (True, "Hugging Face datasets are not read: use --root_folders or --train_data_dir"),
    "dataset_config_name": (True, "Hugging Face datasets are not read: use --root_folders or --train_data_dir"),
    "image_column": (True, "Hugging Face datasets are not read: use --root_folders or --train_data_dir"),
    "conditioning_image_column": (True, "Hugging Face datasets are not read: use --root_folders or --train_data_dir"),
    "caption_column": (True, "Hugging Face datasets are not read: use --root_folders or --train_data_dir"),
    "max_train_samples": (True, "Hugging Face datasets are not read: pass a smaller folder"),
    "validation_prompt": (True, "validation prompts are the images' tags (tag files or RAM)"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_config_argument(parser)

    model = parser.add_argument_group("models")
    model.add_argument("--pretrained_model_path", "--pretrained_model_name_or_path", dest="pretrained_model_path",
                       default=None,
                       help="local diffusers Stable Diffusion 2 base folder (unet/ vae/ text_encoder/ tokenizer/ "
                       "scheduler/); required, nothing is downloaded")
    model.add_argument("--controlnet_model_path", "--controlnet_model_name_or_path", dest="controlnet_model_path",
                       default=None,
                       help="start from a trained ControlNet: a folder holding controlnet/ (checkpoint-<step>/, SeeSR's "
                       "release) or a diffusers ControlNet folder (default: a new ControlNet copied from the UNet's "
                       "encoder, as SeeSR) [alias: --controlnet_model_name_or_path, SeeSR's]")
    model.add_argument("--unet_model_path", "--unet_model_name_or_path", dest="unet_model_path", default=None,
                       help="start from a trained UNet with image attention: a folder holding unet/ (SeeSR's release, "
                       "our checkpoint-<step>/) or a diffusers UNet folder (default: SD2's UNet with new image "
                       "attention, as SeeSR) [alias: --unet_model_name_or_path, SeeSR's]")
    model.add_argument("--seesr_model_path", default=None,
                       help="start from a whole SeeSR model: SeeSR's release folder (unet/ + controlnet/) or one of our "
                       "checkpoint-<step>/ folders (its ControlNet, UNet and injector); the same as "
                       "--controlnet_model_path + --unet_model_path on that folder")
    model.add_argument("--no_image_cross_attention", action="store_true",
                       help="train the plain SD2 ControlNet of this repository's earlier versions: no RAM embeddings, "
                       "no UNet training (default: SeeSR's image cross-attention in UNet and ControlNet)")
    model.add_argument("--trainable_modules", nargs="*", default=["image_attentions"],
                       help="UNet modules trained with the ControlNet: those whose names end with one of these (default "
                       "image_attentions, as SeeSR; give the flag alone to freeze the whole UNet)")
    add_ram_arguments(model)
    model.add_argument("--conditioning_embedding_channels", type=positive_int, nargs=4, default=None, metavar="C",
                       help="channels of a new ControlNet's LR-image encoder, 4 stages down to the latent size "
                       "(default diffusers' 16 32 96 256, as SeeSR; tiny presets use fewer)")
    model.add_argument("--injector", choices=INJECTORS.names(), default="timestep_multiscale",
                       help=INJECTORS.help_text())
    model.add_argument("--timestep_weights", choices=("table", "mlp"), default="table",
                       help="w(t) as a lookup table over the 1000 training timesteps or an MLP on the timestep "
                       "embedding (default table)")
    model.add_argument("--injector_grouping", choices=("tensor", "level"), default="level",
                       help="one scale weight per ControlNet residual (tensor: 13 for SD2) or per resolution level "
                       "+ mid (level: 5 for SD2, default)")
    model.add_argument("--timestep_weights_per_group", action="store_true",
                       help="one w(t) curve per group (level or residual) instead of one shared curve")
    model.add_argument("--timestep_table_bins", type=positive_int, default=None,
                       help="bins of the w(t) table (default 1000, one per training timestep; fewer bins share "
                       "entries between neighbouring timesteps and see more samples each)")
    model.add_argument("--train_injector_only", action="store_true",
                       help="freeze the ControlNet (from --controlnet_model_path) and train the injector alone")
    model.add_argument("--gradient_checkpointing", action=argparse.BooleanOptionalAction, default=False,
                       help="recompute ControlNet and UNet activations in the backward pass: much less memory, "
                       "about 20-30%% slower (default off; --no-gradient_checkpointing turns off a resumed run's)")

    data = parser.add_argument_group("data")
    data.add_argument("--root_folders", default=None,
                      help="SeeSR's prepared training folders, comma-separated, each with gt/, sr_bicubic/ (+ lr/) and "
                      "tag/ as make_paired_data.py and make_tags.py write them")
    data.add_argument("--train_data_dir", default=None,
                      help="folder of HR images (recursive), cropped and degraded on the fly into LR inputs")
    data.add_argument("--hr_dir", default=None,
                      help="HR folder: with --lr_dir, prepared pairs matched by file stem; alone, the same as "
                      "--train_data_dir")
    data.add_argument("--lr_dir", default=None, help="prepared LR folder (needs --hr_dir; HR = scale x LR size)")
    data.add_argument("--degradation", choices=("seesr", "realesrgan", "dape"), default="seesr",
                      help="on-the-fly degradations: seesr = make_paired_data.py (Real-ESRGAN x4plus ranges on the "
                      "USM-sharpened GT, default); realesrgan = the same ranges on the plain GT; dape = "
                      "make_paired_data_DAPE.py (the seesr ranges on whole images resized to --resolution with LANCZOS, "
                      "SeeSR's DAPE data)")
    data.add_argument("--degradation_options", default=None,
                      help="YAML file overriding individual degradation settings (keys of "
                      "data.degradations.DegradationConfig)")
    data.add_argument("--degradation_device", choices=("auto", "cpu", "cuda"), default="auto",
                      help="where --train_data_dir's degradation runs: cuda = batched on the training GPU as Real-ESRGAN "
                      "(data/degradations_batched.py; the workers only crop and draw each sample's kernels), cpu = per "
                      "sample in the data-loader workers; auto (default) = cuda when training on CUDA, else cpu")
    data.add_argument("--scale", type=positive_int, default=4, help="super-resolution factor of the training pairs (default 4)")
    data.add_argument("--resolution", type=int_at_least(16), default=512,
                      help="HR training crop in pixels, divisible by 8 and --scale (default 512, SD2 base's size)")
    data.add_argument("--null_text_ratio", "--null_prompt_ratio", "--proportion_empty_prompts", dest="null_text_ratio",
                      type=fraction, default=0.5,
                      help="probability of replacing an image's tag prompt by '' so that the unconditional branch of "
                      "classifier-free guidance is trained too (default 0.5, SeeSR's) [alias: --null_prompt_ratio, "
                      "diffusers' --proportion_empty_prompts]")
    data.add_argument("--no_random_flip", dest="random_flip", action="store_false",
                      help="turn off random horizontal flips of the training crops")

    # torch.compile (--compile) is left out: the UNet runs outside accelerate's prepare() (the loss reads its
    # attributes) and the ControlNet's image-attention inputs change shape with the tag count; untested here.
    add_training_arguments(
        parser,
        defaults=dict(
            train_batch_size=16, gradient_accumulation_steps=1, learning_rate=5e-5, lr_warmup_steps=500,
            max_grad_norm=1.0, mixed_precision="auto", dataloader_num_workers=None, seed=None,
            output_dir="experience/seesr", resume_from_checkpoint=None, checkpointing_steps=500,
            checkpointing_minutes=0, checkpoints_total_limit=None, report_to=None, device="auto",
        ),
        help={
            "learning_rate": "ControlNet (and trained UNet modules') learning rate after warm-up (SeeSR's)",
            "lr_warmup_steps": "linear warm-up steps of the *_with_warmup, linear and cosine schedules",
            "dataloader_num_workers": "data-loader worker processes: degradation runs on the CPU, so use several on a "
                                      "GPU server (none given: up to 8 on CUDA, 0 on CPU)",
            "seed": "seed of initialisation, data order, crops, degradations and noise (default none, as SeeSR: a "
                    "random seed, logged and saved with the run); a resumed run continues exactly as if never stopped",
            "output_dir": "the run folder: checkpoints, logs, validation images",
            "resume_from_checkpoint": "'latest' (the newest checkpoint-<step> in --output_dir; a new run if there is "
                                      "none) or a checkpoint-<step> folder; settings not given come from the checkpoint",
            "checkpointing_steps": "write checkpoint-<step>/ every N optimiser steps and at the end, 0: only at the "
                                   "end (and every --checkpointing_minutes)",
            "checkpointing_minutes": "also write checkpoint-<step>/ every N minutes of training (Kaggle's session "
                                     "limit: e.g. 30), 0 turns it off",
            "checkpoints_total_limit": "keep only the newest N checkpoint folders, 0 or none keeps all",
        },
    )
    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--injector_learning_rate", type=non_negative_float, default=1e-3,
                       help="injector learning rate (default 1e-3: a few dozen scalars starting at 1.0, and each "
                       "w(t) table entry only learns from the samples drawn at its timestep)")
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                       help="learning-rate schedule (diffusers.optimization; default constant, as SeeSR)")
    optim.add_argument("--lr_num_cycles", type=positive_int, default=1, help="hard restarts of cosine_with_restarts (default 1)")
    optim.add_argument("--lr_power", type=non_negative_float, default=1.0, help="power of the polynomial schedule (default 1.0)")
    optim.add_argument("--adam_beta1", type=fraction_below_one, default=0.9, help="AdamW beta1 (default 0.9)")
    optim.add_argument("--adam_beta2", type=fraction_below_one, default=0.999, help="AdamW beta2 (default 0.999)")
    optim.add_argument("--adam_weight_decay", type=non_negative_float, default=1e-2,
                       help="AdamW weight decay of the ControlNet (default 1e-2); the injector gets none, since "
                       "decay would pull its weights towards 0 instead of their identity value 1")
    optim.add_argument("--adam_epsilon", type=positive_float, default=1e-8, help="AdamW epsilon (default 1e-8)")
    optim.add_argument("--max_train_steps", type=positive_int, default=None,
                       help="optimiser steps in total (default: --num_train_epochs epochs when given, else 100000)")
    optim.add_argument("--num_train_epochs", type=positive_int, default=None,
                       help="passes over the data when --max_train_steps is not given (diffusers' meaning)")
    optim.add_argument("--scale_lr", action="store_true",
                       help="multiply --learning_rate by batch x accumulation x processes (diffusers' meaning)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--allow_tf32", dest="allow_tf32", action="store_true", default=False,
                          help="TF32 matmuls on Ampere+ GPUs: faster, less precise (default off: SeeSR parses the "
                          "flag but never applies it, so its matmuls run in full fp32)")
    hardware.add_argument("--no_tf32", dest="allow_tf32", action="store_false",
                          help="full-fp32 matmuls (the default, as SeeSR; the other trainers' spelling)")
    hardware.add_argument("--enable_xformers_memory_efficient_attention", action="store_true",
                          help="xformers attention in UNet and ControlNet when xformers is installed; without it "
                          "PyTorch's scaled-dot-product attention (already memory-efficient) is used and logged")
    hardware.add_argument("--set_grads_to_none", action="store_true",
                          help="accepted for diffusers/SeeSR command lines: gradients are always set to None")
    hardware.add_argument("--prompt_cache_size", type=non_negative_int, default=256,
                          help="text embeddings of this many distinct prompts kept on the device so the frozen text "
                          "encoder runs once per prompt (default 256; 0 turns the cache off)")

    out = parser.add_argument_group("checkpoints and logging")
    out.add_argument("--logging_steps", type=positive_int, default=50,
                     help="log the mean loss (over all processes) every N steps; one point of loss_curve.png and of "
                     "the tracker's curves (default 50)")
    out.add_argument("--logging_dir", default="logs",
                     help="the tracker's folder, relative to --output_dir (default logs, SeeSR's)")
    out.add_argument("--tracker_project_name", default=None,
                     help="accelerate's init_trackers project name: TensorBoard writes to LOGGING_DIR/<name>/ "
                     "(default: the run folder's name; SeeSR's was SeeSR)")

    val = parser.add_argument_group("validation")
    val.add_argument("--validation_steps", type=non_negative_int, default=500,
                     help="super-resolve the validation images every N steps and at the end, 0 turns it off (default 500)")
    val.add_argument("--validation_image", nargs="+", default=None,
                     help="LR images to super-resolve at validation (default: --num_validation_images degraded "
                     "crops of the training data, shown with their HR crop)")
    val.add_argument("--num_validation_images", type=non_negative_int, default=2,
                     help="degraded training crops used when no --validation_image is given (default 2)")
    val.add_argument("--validation_num_inference_steps", type=positive_int, default=50, help="sampling steps (default 50)")
    val.add_argument("--validation_guidance_scale", type=guidance_scale, default=5.5, help="guidance scale (default 5.5)")
    val.add_argument("--validation_process_size", type=int_at_least(8), default=None,
                     help="SeeSR's process size of the validation images (default --resolution)")
    refused = parser.add_argument_group("SeeSR flags refused here (each says why when given)")
    for flag, (takes_value, _) in REFUSED_SEESR_FLAGS.items():
        if takes_value:
            refused.add_argument(f"--{flag}", default=None, help=argparse.SUPPRESS)
        else:
            refused.add_argument(f"--{flag}", action="store_true", help=argparse.SUPPRESS)
    args = parse_training_args(parser, argv)

    for flag, (_, reason) in REFUSED_SEESR_FLAGS.items():
        if getattr(args, flag) not in (None, False):
            parser.error(f"--{flag} is not supported: {reason}")
    for flag in ("max_train_steps", "num_train_epochs", "logging_steps", "validation_num_inference_steps", "scale"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.validation_steps < 0 or args.num_validation_images < 0 or args.prompt_cache_size < 0:
        parser.error("--validation_steps, --num_validation_images and --prompt_cache_size cannot be negative")
    if not 0.0 <= args.null_text_ratio <= 1.0:
        parser.error("--null_text_ratio must be in [0, 1]")
    # A resumed run takes the paths and the model settings from its checkpoint: main() checks them once merged.
    message = settings_error(args)
    if message and not args.resume_from_checkpoint:
        parser.error(message)
    return args


def settings_error(config: argparse.Namespace) -> str | None:
    """The first combination of settings that cannot run, as one sentence (None when they can)."""
    if not config.pretrained_model_path:
        return "--pretrained_model_path is required (a local diffusers Stable Diffusion 2 base folder)"
    if config.lr_dir and not config.hr_dir:
        return "--lr_dir needs --hr_dir (prepared pairs are matched by file stem)"
    if sum(bool(x) for x in (config.root_folders, config.train_data_dir, config.hr_dir)) > 1:
        return ("give one data source: --root_folders, --train_data_dir (HR images degraded on the fly) or "
                "--hr_dir [--lr_dir]")
    if not (config.root_folders or config.train_data_dir or config.hr_dir):
        return ("no training data: give --root_folders (SeeSR's prepared folders), --train_data_dir (HR images) "
                "or --lr_dir and --hr_dir (prepared pairs)")
    if config.seesr_model_path and (config.controlnet_model_path or config.unet_model_path):
        return ("--seesr_model_path names both the ControlNet and the UNet; leave out --controlnet_model_path "
                "and --unet_model_path")
    if config.no_image_cross_attention and config.unet_model_path:
        return "--unet_model_path starts from a UNet with image attention; it contradicts --no_image_cross_attention"
    if config.train_injector_only:
        if config.injector == "baseline":
            return "--train_injector_only trains the injector, which --injector baseline does not have"
        if not (config.controlnet_model_path or config.seesr_model_path):
            return ("--train_injector_only needs --controlnet_model_path or --seesr_model_path (a trained "
                    "ControlNet to freeze)")
    if config.resolution % 8 or config.resolution % config.scale:
        return f"--resolution must be divisible by 8 and by --scale {config.scale}"
    return None


# ------------------------------------------------------------------------------------------------ resume


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """``--resume_from_checkpoint latest|PATH`` -> a checkpoint folder (None: latest in a new run folder)."""
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint_folder(output_dir, CHECKPOINT_PREFIX)
    path = Path(resume)
    if not path.is_dir() and (output_dir / path.name).is_dir():
        path = output_dir / path.name  # diffusers also accepts a bare "checkpoint-500" inside --output_dir
    if not path.is_dir():
        raise CheckpointError(
            f"--resume_from_checkpoint {resume}: no such folder; give a checkpoint-<step> folder or 'latest'."
        )
    if not (path / TRAINING_STATE_NAME).is_file():
        raise CheckpointError(
            f"{path} has no {TRAINING_STATE_NAME}, so it is not a resumable train_seesr_timestep.py checkpoint; "
            "to start from its ControlNet, pass it as --controlnet_model_path instead."
        )
    return path


def read_training_state(checkpoint: Path) -> dict:
    path = checkpoint / TRAINING_STATE_NAME
    try:
        state = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise CheckpointError(f"Cannot read {path}: {error}.") from None
    if state.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{path} is a '{state.get('kind')}' state, not a '{CHECKPOINT_KIND}' one.")
    return state


def resolve_run_config(args: argparse.Namespace) -> tuple[argparse.Namespace, Path | None, dict | None]:
    """``(config, checkpoint folder or None, its training state)``: the flags, and on a resumed run the checkpoint's
    saved settings for every flag not given (utils/resume.py); a changed model setting is a CheckpointError.

    ``--resume_from_checkpoint PATH`` without ``--output_dir`` continues in the checkpoint's own run folder. Giving one
    data source (or one starting-weight flag) replaces the saved ones of that group rather than adding to them.
    """
    given = given_flags(args)
    resume_dir = find_resume_checkpoint(args.resume_from_checkpoint, Path(args.output_dir))
    state, saved = None, None
    if resume_dir is not None:
        state = read_training_state(resume_dir)
        saved = dict(state.get("config") or {})
        if "output_dir" not in given:
            saved["output_dir"] = str(resume_dir.parent)
        for group in (DATA_SOURCE_FLAGS, START_WEIGHT_FLAGS):
            if given & group:
                given |= group
    config = resolve_resumed_config(args, given, saved, fixed=RESUME_FIXED_FLAGS, session=NOT_INHERITED,
                                    source=str(resume_dir))
    message = settings_error(config)
    if message:
        raise UserError(message[0].upper() + message[1:] + ".")
    return config, resume_dir, state


# ------------------------------------------------------------------------------------------------ the run


@dataclass
class SeeSRRun:
    """One training session's state: the built parts, the prepared (DDP-wrapped) trainables, the counters."""

    config: argparse.Namespace
    accelerator: object
    logger: logging.Logger
    parts: TrainingParts
    controlnet: torch.nn.Module
    injector: torch.nn.Module | None
    output_dir: Path
    max_train_steps: int = 0
    step: int = 0
    micro_step: int = 0
    history: list = field(default_factory=list)
    previews: list = field(default_factory=list)

    def bare(self, model):
        return None if model is None else unwrap(self.accelerator, model)


def apply_tf32(allow: bool) -> None:
    """TF32 matmuls only with ``--allow_tf32``: SeeSR parses the flag but never applies it, so its matmuls run in full
    fp32 (PyTorch's default); convolutions keep PyTorch's default (TF32 allowed) in both."""
    torch.backends.cuda.matmul.allow_tf32 = bool(allow)


def injector_scalars(injector) -> dict[str, float]:
    """The injector's level weights s and w(t) at a few timesteps, as tracker scalars."""
    values = {}
    names = [f"{'level' if injector.config.grouping == 'level' else 'residual'}{i}" for i in range(injector.num_groups - 1)]
    names.append("mid")
    with torch.no_grad():
        if getattr(injector, "scale_weights", None) is not None:
            for name, weight in zip(names, injector.scale_weights.weights.float().cpu().tolist(), strict=True):
                values[f"injector/s/{name}"] = weight
        if getattr(injector, "timestep_weights", None) is not None:
            for t in W_T_LOGGED_AT:
                weights = injector.get_weight_at_step(t).float().cpu().tolist()
                if injector.config.timestep_weights_shared:
                    values[f"injector/w/t{t}"] = weights[0]
                else:
                    values.update({f"injector/w/t{t}/{name}": w for name, w in zip(names, weights, strict=True)})
    return values


def load_model_weights(accelerator, models: list, input_dir: str) -> None:
    """accelerate's load hook: the ControlNet and the injector come back from their own folders in the checkpoint
    (the save hook hands accelerate nothing: they are written as controlnet/ and multi_scale_injector/)."""
    from diffusers import ControlNetModel

    from models.seesr import load_controlnet
    from models.timestep_adaptive import INJECTOR_FOLDER, read_injector_state

    while models:
        model = unwrap(accelerator, models.pop())
        if isinstance(model, ControlNetModel):
            state, source = load_controlnet(input_dir).state_dict(), f"{input_dir}/controlnet"
        else:
            state, path = read_injector_state(Path(input_dir) / INJECTOR_FOLDER)
            state, source = {k.removeprefix("module."): v for k, v in state.items()}, path
        try:
            model.load_state_dict(state)
        except RuntimeError as error:
            raise CheckpointError(f"The weights in {source} do not fit this run: {str(error).splitlines()[0]}") from None


def restore(run: SeeSRRun, optimizer, lr_scheduler, resume_dir: Path, state: dict, batches_per_epoch: int) -> tuple[int, int]:
    """Load ``resume_dir`` into the run (optimiser, schedule, RNG, weights, counters); returns (epoch, batches to
    skip in it)."""
    from models.seesr_unet import SeeSRUNet2DConditionModel, load_strict

    try:
        with keeping_optimizer_implementation(optimizer), keeping_configured_learning_rates(optimizer, lr_scheduler):
            run.accelerator.load_state(str(resume_dir))
    except FileNotFoundError as error:
        raise CheckpointError(f"{resume_dir} is incomplete ({error.filename} is missing); resume from another "
                              "checkpoint.") from None
    if run.parts.extras["unet_parameters"]:  # trained outside DDP (see sync_unet_gradients): not accelerate's
        unet = run.parts.models["unet"]
        unet.load_state_dict(load_strict(SeeSRUNet2DConditionModel, resume_dir / UNET_FOLDER).state_dict())
    run.step, run.micro_step = state["step"], state["micro_step"]
    run.history = [list(point) for point in state.get("loss_history", [])]
    epoch, skip = state["epoch"], state["batches_in_epoch"]
    if skip >= batches_per_epoch:
        epoch, skip = epoch + 1, 0
    if state.get("num_processes") != run.accelerator.num_processes:
        run.logger.warning("%s was written by %s process(es), this run has %d: the position in the epoch's data is "
                           "approximate", resume_dir, state.get("num_processes"), run.accelerator.num_processes)
    run.logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, run.step, epoch, skip)
    return epoch, skip


def save_checkpoint(run: SeeSRRun, epoch: int, batches_in_epoch: int) -> None:
    """``checkpoint-<step>/``: accelerate's state, the weights in their own folders, ``training_state.json``; written
    into a staging folder, published by a rename, then the oldest beyond ``--checkpoints_total_limit`` removed."""
    from models.seesr import save_seesr_weights
    from models.timestep_adaptive import save_injector

    accelerator, config = run.accelerator, run.config
    final = run.output_dir / f"{CHECKPOINT_PREFIX}{run.step}"
    staging = staging_folder(final)
    if accelerator.is_main_process:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(staging))  # optimiser, LR schedule, loss scaler, RNG of every process
    accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
    if accelerator.is_main_process:
        frozen = run.parts.extras["frozen_folders"]
        if config.train_injector_only:  # the frozen models exactly as loaded, not half-precision copies
            shutil.copytree(frozen["controlnet"], staging / "controlnet")
            if frozen["unet"] is not None:
                shutil.copytree(frozen["unet"], staging / UNET_FOLDER)
            if run.injector is not None:
                save_injector(run.bare(run.injector), staging)
        else:
            save_seesr_weights(staging, run.bare(run.controlnet), run.bare(run.injector))
            if "tagger" in run.parts.models:  # not plain SD2 any more: inference needs this UNet (trained modules)
                run.parts.models["unet"].save_pretrained(staging / UNET_FOLDER, safe_serialization=True)
        state = {
            "kind": CHECKPOINT_KIND, "step": run.step, "micro_step": run.micro_step, "epoch": epoch,
            "batches_in_epoch": batches_in_epoch, "num_processes": accelerator.num_processes,
            "loss_history": run.history, "config": config_to_dict(config),
        }
        atomic_write_text(json.dumps(state, indent=1), staging / TRAINING_STATE_NAME)
        publish_checkpoint_folder(staging, final)
        for removed in rotate_checkpoint_folders(run.output_dir, config.checkpoints_total_limit, CHECKPOINT_PREFIX):
            run.logger.info("removed %s (--checkpoints_total_limit %d)", removed, config.checkpoints_total_limit)
        run.logger.info("step %d: saved %s", run.step, final)
    accelerator.wait_for_everyone()


def preview_settings(config: argparse.Namespace, output_dir: Path) -> argparse.Namespace:
    """``infer.py seesr``'s settings for the previews: its defaults (test_seesr.py's, or test_seesr_turbo.py's on a
    turbo base), with ``--validation_num_inference_steps``, ``--validation_guidance_scale``,
    ``--validation_process_size`` (default ``--resolution``) and ``--scale`` in place of its steps, guidance, process
    size and upscale."""
    from models.seesr import is_turbo_base
    from pipelines import seesr as seesr_inference

    parser = argparse.ArgumentParser()
    seesr_inference.add_parser(parser.add_subparsers(dest="command"))
    settings = parser.parse_args(["seesr", "--pretrained_model_path", str(config.pretrained_model_path),
                                  "--seesr_model_path", str(output_dir), "--image_path", str(output_dir),
                                  "--output_dir", str(output_dir / "validation")])
    settings.turbo = is_turbo_base(Path(config.pretrained_model_path))
    for key, value in (seesr_inference.TURBO_DEFAULTS if settings.turbo else seesr_inference.SEESR_DEFAULTS).items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    settings.num_inference_steps = config.validation_num_inference_steps
    settings.guidance_scale = config.validation_guidance_scale
    settings.process_size = config.validation_process_size or config.resolution
    settings.upscale, settings.sample_times = config.scale, 1
    return settings


def write_previews(run: SeeSRRun, validation_set: list[dict]) -> None:
    """Validation images super-resolved as ``infer.py seesr`` does (``pipelines.seesr.super_resolve``, its per-image
    function: RAM's tags of the LR, test_seesr.py's prompt, the LR latent noised to t=999, the run's seed for every
    image), written as a grid LR | SR [| HR] and one PNG per image; and the w(t) plot."""
    from data.degradations import bicubic_upsample
    from data.sr_pairs import read_tag_prompt
    from models.seesr import SeeSRPipeline
    from pipelines.seesr import SeeSRInference, super_resolve
    from utils.images import pil_to_tensor, save_grid

    if not run.accelerator.is_main_process:
        return
    step, models = run.step, run.parts.models
    controlnet, injector = run.bare(run.controlnet), run.bare(run.injector)
    modes = [(m, m.training) for m in (controlnet, injector, models["unet"]) if m is not None]
    for model, _ in modes:
        model.eval()
    pipeline = SeeSRPipeline(models["unet"], models["vae"], models["text_encoder"], run.parts.extras["tokenizer"],
                             run.parts.extras["noise_scheduler"], controlnet, injector)
    tagger = models.get("tagger")
    inference = SeeSRInference(pipeline, tagger, tagger is not None, preview_settings(run.config, run.output_dir),
                               run.output_dir, run.accelerator.device)
    tiles, captions, folder = [], [], run.output_dir / "validation" / f"step_{step:06d}"
    try:
        with run.accelerator.autocast():
            for item in validation_set:
                # Tags without a tagger: infer.py's <name>.txt beside a --validation_image, none for a training crop.
                tags = read_tag_prompt(item["path"]) if item["hr"] is None else None
                picture = super_resolve(inference, item["lr"], run.config.seed, tags=tags).images[0]
                folder.mkdir(parents=True, exist_ok=True)
                picture.save(folder / f"{item['name']}.png")
                result = pil_to_tensor(picture, (0.0, 1.0))
                tiles += [bicubic_upsample(item["lr"], result.shape[-2:]), result]
                captions += [f"{item['name']} LR", f"SR step {step}"]
                if item["hr"] is not None:
                    tiles.append(item["hr"].float())
                    captions.append("HR")
    finally:
        for model, training in modes:
            model.train(training)
    if tiles:
        per_row = 3 if all(item["hr"] is not None for item in validation_set) else 2
        path = save_grid(tiles, run.output_dir / "validation" / f"step_{step:06d}.png", nrow=per_row,
                         value_range=(0.0, 1.0), captions=captions)
        run.previews.append(path)
        log_image(run.accelerator, "validation/LR_SR_HR", path, step)
        run.logger.info("step %d: validation images %s", step, path)
    if injector is not None and hasattr(injector, "timestep_weight_curves"):
        from models.timestep_adaptive import describe_injector
        from utils.plots import plot_timestep_weights

        path = plot_timestep_weights(injector, run.output_dir / "validation" / f"timestep_weights_step_{step:06d}.png",
                                     title=f"{run.output_dir.name}, step {step}")
        log_image(run.accelerator, "injector/timestep_weights", path, step)
        run.logger.info("step %d: %s | %s", step, describe_injector(injector), path)


def sync_unet_gradients(accelerator, parameters: list) -> None:
    """Average the UNet's trained gradients over the processes (the UNet is kept out of DDP: the loss function reads
    its attributes, which a DDP wrapper hides)."""
    if accelerator.num_processes > 1:
        for parameter in parameters:
            if parameter.grad is not None:
                parameter.grad = accelerator.reduce(parameter.grad, "mean")


def training_loss(run: SeeSRRun, batch: dict) -> torch.Tensor:
    """One micro-batch's loss: degradation on the device where chosen, RAM's inputs, cached prompt embeddings."""
    from data.degradations_batched import degrade_training_batch

    accelerator, parts = run.accelerator, run.parts
    dataset = parts.datasets["train"]
    if getattr(dataset, "degrade_on_device", False):
        batch = degrade_training_batch(batch, dataset.degradation, accelerator.device)
    if "tagger" in parts.models:
        add_ram_inputs(batch, parts.models["tagger"], parts.extras["gt_tagger"])
    batch["prompt_embeds"] = parts.extras["prompt_cache"](batch["prompt"])
    generator = loss_generator(run.config.seed, run.micro_step, accelerator.device, accelerator.num_processes,
                               accelerator.process_index)
    with accelerator.autocast():  # the UNet is not prepared by accelerate: autocast it here
        return parts.objective(batch, controlnet=run.controlnet, injector=run.injector, generator=generator)


def log_step(run: SeeSRRun, meter: LossMeter, guard: NonFiniteGuard, lr_scheduler, seconds: float) -> None:
    """The mean loss over the processes since the last log line, to the log, the history and the tracker."""
    mean_loss = float(run.accelerator.reduce(meter.total / meter.count, "mean"))
    meter.reset()
    guard.check(run.accelerator)
    run.history.append([run.step, mean_loss])
    rates = lr_scheduler.get_last_lr()
    run.logger.info("step %d/%d | loss %.4f | lr %.2e | %.2f s/step", run.step, run.max_train_steps, mean_loss,
                    rates[0], seconds)
    if run.accelerator.trackers:
        scalars = {"train/loss": mean_loss, "train/lr": rates[0], "train/seconds_per_step": seconds}
        if run.injector is not None:
            scalars["train/lr_injector"] = rates[-1]
            scalars.update(injector_scalars(run.bare(run.injector)))
        log_scalars(run.accelerator, scalars, run.step)


def plot_loss_curve(run: SeeSRRun) -> None:
    from utils.plots import plot_curves

    every = run.config.logging_steps
    steps = [point[0] for point in run.history]
    plot_curves({"train loss (epsilon MSE)": [point[1] for point in run.history]}, run.output_dir / "loss_curve.png",
                title=f"{run.output_dir.name}: steps {steps[0]}..{steps[-1]}, a point every {every}",
                xlabel=f"logging interval ({every} optimiser steps)", log_y=True)


def total_steps(config, dataset_size: int, num_processes: int) -> int:
    """``--max_train_steps``, else ``--num_train_epochs`` worth of optimiser steps, else 100000."""
    if config.max_train_steps is not None:
        return config.max_train_steps
    per_epoch = math.ceil(dataset_size // (config.train_batch_size * num_processes) / config.gradient_accumulation_steps)
    return config.num_train_epochs * per_epoch if config.num_train_epochs else 100000


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> dict:
    from diffusers.optimization import get_scheduler

    from data.degradations_batched import use_device_degradation
    from models.seesr import check_sd2_folder

    reset_accelerate_state()
    # Everything a user can get wrong is checked before the models load.
    config, resume_dir, resume_state = resolve_run_config(args)
    seed_drawn = config.seed is None  # SeeSR's default: a random seed, saved with the run so resuming is exact
    if seed_drawn:
        config.seed = random.SystemRandom().randrange(2**31)
    output_dir = Path(config.output_dir)
    check_sd2_folder(config.pretrained_model_path)
    datasets = build_seesr_datasets(config)
    dataset = datasets["train"]

    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision, gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.device == "cpu", seed=config.seed, project_dir=str(output_dir), report_to=config.report_to,
        logging_dir=str(output_dir / config.logging_dir),
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    apply_tf32(config.allow_tf32)
    logger = setup_logger(output_dir, accelerator.is_main_process)
    if config.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
    if seed_drawn:
        logger.info("seed: %d (random, as SeeSR without --seed; saved with the run, so resuming continues exactly)",
                    config.seed)
    device = accelerator.device
    dataset.degrade_on_device = use_device_degradation(config.degradation_device, device) and hasattr(dataset, "degradation")
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    parts = build_seesr_training(config, device, weight_dtype=weight_dtype, num_processes=accelerator.num_processes,
                                 datasets=datasets, logger=logger)
    if len(dataset) < config.train_batch_size * accelerator.num_processes:
        raise UserError(
            f"The training data has {len(dataset)} images, fewer than one batch of {config.train_batch_size} per "
            f"device on {accelerator.num_processes} process(es); add images or lower --train_batch_size."
        )
    optimizer = torch.optim.AdamW(parts.param_groups, betas=(config.adam_beta1, config.adam_beta2),
                                  eps=config.adam_epsilon, fused=fused_optimizer(device))
    # Not persistent: each epoch's workers get the dataset with that epoch's seed (see data/sr_pairs.py).
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, drop_last=True,
        num_workers=default_workers(config.dataloader_num_workers, device), pin_memory=device.type == "cuda",
    )
    max_train_steps = total_steps(config, len(dataset), accelerator.num_processes)
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )
    # The ControlNet and the injector are written in their own formats (controlnet/, multi_scale_injector/), not as
    # accelerate's model_<i>.safetensors: the save hook hands accelerate nothing, the load hook reads those folders.
    accelerator.register_save_state_pre_hook(lambda models, weights, folder: weights.clear())
    accelerator.register_load_state_pre_hook(partial(load_model_weights, accelerator))
    names = [name for name in ("controlnet", "injector") if name in parts.models
             and not (name == "controlnet" and config.train_injector_only)]
    *trainables, optimizer, loader, lr_scheduler = accelerator.prepare(
        *[parts.models[name] for name in names], optimizer, loader, lr_scheduler)
    prepared = dict(zip(names, trainables, strict=True))  # DDP-wrapped: accumulate() skips their all-reduce
    run = SeeSRRun(config, accelerator, logger, parts, prepared.get("controlnet", parts.models["controlnet"]),
                   prepared.get("injector"), output_dir, max_train_steps)
    first_epoch, skip_batches = 0, 0
    if resume_dir is not None:
        first_epoch, skip_batches = restore(run, optimizer, lr_scheduler, resume_dir, resume_state, len(loader))
    if accelerator.is_main_process:
        save_config(config, output_dir / "args.yaml")
    start_tracking(accelerator, config.tracker_project_name or output_dir.name, config_to_dict(config))
    log_run_start(run, len(loader))

    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    unet_parameters = parts.extras["unet_parameters"]
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]
    progress = TrainingProgress(max_train_steps, "SeeSR training", enabled=accelerator.is_main_process,
                                initial=run.step)
    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    meter, micro_losses = LossMeter(), []
    # Every step's loss is watched on the device (no host sync); it is read at logging and before each checkpoint, so
    # a NaN never reaches a saved checkpoint. An fp16 gradient overflow keeps the loss finite: the scaler skips it.
    guard = NonFiniteGuard(device, ", or train with bf16 or fp32 instead of fp16")
    last_saved = last_validated = run.step if resume_dir is not None else -1
    started, started_step = time.perf_counter(), run.step
    done = run.step >= max_train_steps
    epoch = first_epoch
    for epoch in range(first_epoch, math.ceil(max_train_steps / steps_per_epoch)):
        if done:
            break
        dataset.set_epoch(epoch)
        loader.set_epoch(epoch)
        epoch_loader = accelerator.skip_first_batches(loader, skip_batches) if skip_batches else loader
        batches_in_epoch, skip_batches = skip_batches, 0
        for batch in epoch_loader:
            batches_in_epoch += 1
            try:
                with accelerator.accumulate(*trainables):
                    loss = training_loss(run, batch)
                    backward_and_step(accelerator, loss, optimizer, trained_parameters, config.max_grad_norm,
                                      before_clip=partial(sync_unet_gradients, accelerator, unet_parameters))
            except torch.OutOfMemoryError as error:
                raise UserError(out_of_memory_message(
                    config.train_batch_size,
                    "; or add --gradient_checkpointing, use --mixed_precision fp16/bf16 or a smaller --resolution",
                )) from error
            run.micro_step += 1
            guard.update(loss, run.step + 1)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            run.step += 1
            step_loss = torch.stack(micro_losses).mean()
            micro_losses = []
            meter.update(step_loss)
            progress.update(step_loss, lr_scheduler.get_last_lr()[0])
            done = run.step >= max_train_steps
            if run.step % config.logging_steps == 0 or done:
                log_step(run, meter, guard, lr_scheduler, (time.perf_counter() - started) / max(1, run.step - started_step))
            if config.validation_steps and run.step % config.validation_steps == 0:
                write_previews(run, datasets["val"])
                last_validated = run.step
            if done or cadence.due(run.step, accelerator):
                guard.check(accelerator)
                save_checkpoint(run, epoch, batches_in_epoch)
                cadence.saved()
                last_saved = run.step
            if done:
                break
    progress.close()
    if last_saved != run.step:  # resumed at or past --max_train_steps
        save_checkpoint(run, epoch, 0)
    if config.validation_steps and last_validated != run.step:
        write_previews(run, datasets["val"])
    if accelerator.is_main_process and run.history:
        plot_loss_curve(run)
    logger.info("done: %d steps, checkpoints in %s", run.step, output_dir)
    accelerator.end_training()
    return {"step": run.step, "history": run.history, "output_dir": output_dir, "validation": run.previews,
            "checkpoints": checkpoint_folders(output_dir, CHECKPOINT_PREFIX), "resumed_from": resume_dir, "seed": config.seed}


def log_run_start(run: SeeSRRun, batches_per_epoch: int) -> None:
    config, models = run.config, run.parts.models
    injector = run.bare(run.injector)
    injector_params = sum(p.numel() for p in injector.parameters()) if injector is not None else 0
    run.logger.info(
        "injector %s%s | ControlNet %.1fM parameters (%s) | injector %d parameters | %d images, %d steps per epoch",
        config.injector,
        "" if injector is None else f" ({injector.variant}, {config.timestep_weights}, {config.injector_grouping})",
        sum(p.numel() for p in models["controlnet"].parameters()) / 1e6,
        "frozen" if config.train_injector_only else "trained", injector_params, len(run.parts.datasets["train"]),
        math.ceil(batches_per_epoch / config.gradient_accumulation_steps),
    )
    log_run_header(run.logger, run.accelerator, config.train_batch_size, f"{run.max_train_steps} steps, lr "
                   f"{run.parts.extras['learning_rate']:g} / injector {config.injector_learning_rate:g}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
