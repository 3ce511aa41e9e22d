"""Train SeeSR (ControlNet + the UNet's image cross-attention) with the timestep-adaptive multi-scale injector.

SeeSR (Wu et al., CVPR 2024, https://github.com/cswry/SeeSR ``train_seesr.py``) trains a ControlNet that reads the
bicubic-upsampled low-resolution image, plus the UNet modules named by ``--trainable_modules`` (default
``image_attentions``: the image cross-attention fed by RAM's embeddings of the LR input), with the rest of SD2's
UNet, the VAE and the text encoder frozen, the epsilon-MSE objective at uniform timesteps, and the GT's RAM tags as
prompts (dropped with ``--null_text_ratio``). RAM (``--ram_path``, + DAPE with ``--ram_ft_path``) runs without
gradients in the frozen models' dtype: a Swin-L forward per image for the embeddings, and one more on the GT for
images without a tag file. ``--no_image_cross_attention`` trains the plain SD2 ControlNet of this repository's
earlier versions (no RAM needed). This script follows diffusers' ControlNet-training conventions
(``examples/controlnet/train_controlnet.py``: flag names, ``accelerate`` state in ``checkpoint-<step>/`` folders,
``--checkpoints_total_limit``, ``--resume_from_checkpoint latest``) and adds the users' injector
(``models/timestep_adaptive.py``) between ControlNet and UNet. The three variants the users compare:

    --injector baseline              plain SeeSR ControlNet (no injector)
    --injector timestep_only         residual * w(t)
    --injector timestep_multiscale   residual * s[level] * w(t)     (default)

    python train_seesr_timestep.py --pretrained_model_path preset/models/stable-diffusion-2-base \\
        --train_data_dir datasets/HR --output_dir experience/timestep_multiscale --injector timestep_multiscale
    accelerate launch --multi_gpu train_seesr_timestep.py --config configs/seesr_sd2_base.yaml --train_data_dir HR
    python train_seesr_timestep.py --resume_from_checkpoint latest --output_dir experience/timestep_multiscale
    python train_seesr_timestep.py ... --train_injector_only --controlnet_model_path experience/baseline/checkpoint-100000
    accelerate launch train_seesr_timestep.py --pretrained_model_name_or_path preset/models/stable-diffusion-2-base \
        --output_dir experience/seesr --root_folders preset/datasets/training_datasets \
        --ram_ft_path preset/models/DAPE.pth --mixed_precision fp16 --resolution 512 --learning_rate 5e-5 \
        --train_batch_size 16 --gradient_accumulation_steps 2 --null_text_ratio 0.5 --checkpointing_steps 10000
    python train_seesr_timestep.py ... --seesr_model_path preset/models/seesr --injector timestep_multiscale

Starting points: a new ControlNet copied from SD2's UNet (as SeeSR); ``--seesr_model_path``: SeeSR's release folder
(unet/ + controlnet/) or one of our checkpoints (its ControlNet, UNet and injector); SeeSR's
``--controlnet_model_name_or_path`` / ``--unet_model_name_or_path`` (folders holding controlnet/ or unet/).

Data: ``--root_folders a,b``: SeeSR's prepared folders (gt/, sr_bicubic/, tag/ from make_paired_data.py and
make_tags.py); ``--train_data_dir`` (or ``--hr_dir`` alone): HR images cropped to ``--resolution`` and degraded on the
fly (``--degradation seesr``: make_paired_data.py's ranges on the USM-sharpened GT; ``realesrgan``: the same ranges
on the plain GT; ``dape``: SeeSR's milder params_realesrgan.yml); or ``--lr_dir`` + ``--hr_dir``: prepared pairs
matched by file stem. Tags: a ``<stem>.txt`` beside an image (``tag/<stem>.txt`` in root folders), else RAM's tags of
the GT when RAM is loaded; dropped with ``--null_text_ratio``.

SeeSR's flags that this script refuses, each with its reason: ``--revision``, ``--tokenizer_name``, ``--cache_dir``,
``--push_to_hub``, ``--hub_token``, ``--hub_model_id`` (nothing is downloaded or uploaded), ``--use_8bit_adam``
(bitsandbytes is not a dependency), ``--dataset_name``, ``--dataset_config_name``, ``--image_column``,
``--conditioning_image_column``, ``--caption_column``, ``--max_train_samples`` (Hugging Face datasets: use
``--root_folders``), ``--validation_prompt`` (validation prompts are RAM tags).

The settings every trainer shares have the house names (utils/cli.py: diffusers' own, which SeeSR's script uses too)
and the other trainers' spellings as aliases (``--batch_size``, ``--lr``, ``--resume``...). Resuming
(``--resume_from_checkpoint latest --output_dir RUN``, or a checkpoint folder) takes every setting not given on the
command line from the checkpoint's saved configuration (utils/resume.py), data and model paths included; a changed
model setting (``--injector`` and its flags, ``--no_image_cross_attention``, ``--trainable_modules``,
``--train_injector_only``) is refused in one line. ``--checkpointing_minutes M`` writes a checkpoint every M minutes
as well (Kaggle's session limit). ``--report_to tensorboard`` (the default when tensorboard is installed) logs the loss,
the learning rates, the injector's s and w(t) at a few timesteps, the validation images and the w(t) figure through
accelerate's tracker into ``<output_dir>/<logging_dir>``.

Writes into ``--output_dir`` (the run folder, ``experience/<name>``)::

    args.yaml, train.log, loss_curve.png          the resolved settings of the (latest) session, log, loss curve
    logs/<run name>/events.out.tfevents.*         TensorBoard (--report_to tensorboard, --logging_dir logs)
    checkpoint-<step>/controlnet/                 diffusers ControlNetModel (config.json + safetensors)
    checkpoint-<step>/unet/                       the whole UNet (diffusers folder) when it has image attention:
                                                  inference needs it, and its trained modules are in it
    checkpoint-<step>/multi_scale_injector/       config.json, model.safetensors, pytorch_model.bin (not baseline)
    checkpoint-<step>/optimizer.bin, scheduler.bin, random_states_<rank>.pkl, [scaler.pt]   accelerate state
    checkpoint-<step>/training_state.json         step, epoch, position in the epoch, variant, loss history
    validation/step_<step>.png                    LR | SR | HR through the inference pipeline itself
    validation/timestep_weights_step_<step>.png   the injector's w(t) (and s * w(t)) curves

Differences from SeeSR's script, on purpose: data shuffled and LR/HR paired by stem; the checkpoint limit applied
(after the new checkpoint is safely written, not before); checkpoint folders published by an atomic rename; the
frozen SD2 modules never saved (the UNet only when it is not plain SD2); the final save is a checkpoint like the
others (SeeSR's overwrote the ControlNet folder with the UNet); the GT's tags come from tag files by stem or from
RAM online, not from a listing zipped unsorted with the images.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import time
from pathlib import Path

import torch

from models.timestep_adaptive import INJECTORS
from utils.accelerator import create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import atomic_write_text
from utils.cli import add_ram_arguments, add_training_arguments, check_training_arguments
from utils.config import ArgumentParser, add_config_argument, config_to_dict, explicitly_given, parse_with_config, save_config
from utils.errors import CheckpointError, UserError, run_cli
from utils.log import LossMeter, TrainingProgress, log_image, log_scalars, setup_logger, start_tracking
from utils.resume import given_flags, resolve_resumed_config
from utils.training import (
    CheckpointCadence,
    NonFiniteGuard,
    backward_and_step,
    fused_optimizer,
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
UNET_FOLDER = "unet"
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
            train_batch_size=4, gradient_accumulation_steps=1, learning_rate=5e-5, lr_warmup_steps=500,
            max_grad_norm=1.0, mixed_precision="auto", dataloader_num_workers=None, seed=42,
            output_dir="experience/seesr", resume_from_checkpoint=None, checkpointing_steps=500,
            checkpointing_minutes=0, checkpoints_total_limit=None, report_to=None, device="auto",
        ),
        help={
            "learning_rate": "ControlNet (and trained UNet modules') learning rate after warm-up (SeeSR's)",
            "lr_warmup_steps": "linear warm-up steps of the *_with_warmup, linear and cosine schedules",
            "dataloader_num_workers": "data-loader worker processes: degradation runs on the CPU, so use several on a "
                                      "GPU server (none given: up to 8 on CUDA, 0 on CPU)",
            "seed": "seed of initialisation, data order, crops, degradations and noise; a resumed run continues "
                    "exactly as if never stopped",
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
    hardware.add_argument("--allow_tf32", dest="allow_tf32", action="store_true", default=True,
                          help="TF32 matmuls on Ampere+ GPUs (on by default here; kept for diffusers command lines)")
    hardware.add_argument("--no_tf32", dest="allow_tf32", action="store_false", help="turn TF32 off")
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
    args = parse_with_config(parser, argv)
    args.given_flags = sorted(explicitly_given(parser, argv, args.config))
    check_training_arguments(parser, args)

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


# ------------------------------------------------------------------------------------------------ set-up helpers


def build_training_dataset(args, seed: int | None):
    """SeeSR's prepared folders, an HR folder degraded on the fly, or prepared LR/HR pairs."""
    from data.degradations import DegradationConfig
    from data.sr_pairs import HRFolderDegradedDataset, PairedSRFolderDataset, SeeSRPreparedDataset

    if args.root_folders:
        return SeeSRPreparedDataset(args.root_folders, args.resolution, args.scale, args.null_text_ratio, seed,
                                    args.random_flip)
    if args.lr_dir:
        return PairedSRFolderDataset(
            args.lr_dir, args.hr_dir, args.resolution, args.scale, args.null_text_ratio, seed, args.random_flip
        )
    config = {"seesr": DegradationConfig.seesr, "realesrgan": DegradationConfig,
              "dape": DegradationConfig.dape}[args.degradation]()
    values = config.to_dict()
    if args.degradation_options:
        from utils.config import load_config

        if not Path(args.degradation_options).is_file():
            raise UserError(f"--degradation_options {args.degradation_options} does not exist; pass a YAML file.")
        values.update(load_config(args.degradation_options))
    values["scale"] = args.scale
    return HRFolderDegradedDataset(
        args.train_data_dir or args.hr_dir, args.resolution, DegradationConfig.from_dict(values),
        args.null_text_ratio, seed, args.random_flip,
    )


def _model_folder(path: str | Path, sub: str, flag: str) -> Path:
    """``path/sub`` when it holds a config.json (SeeSR's and our layouts), else ``path`` itself; checked to exist."""
    path = Path(path)
    if path.is_file():
        raise CheckpointError(f"{flag} {path} is a file; pass a folder ({sub}/ of SeeSR's release or a checkpoint, or "
                              "a diffusers model folder).")
    for folder in (path / sub, path):
        if (folder / "config.json").is_file():
            return folder
    raise CheckpointError(f"{flag} {path} holds no {sub}/config.json nor config.json; pass SeeSR's release folder, a "
                          "checkpoint-<step>/ folder or a diffusers model folder.")


def resolve_model_sources(args) -> dict:
    """Where each starting weight comes from (checked before anything loads): seesr / controlnet / unet folders."""
    sources = {"seesr": None, "controlnet": None, "unet": None, "injector": None}
    if args.seesr_model_path:
        path = Path(args.seesr_model_path)
        if path.is_file() or not path.is_dir():
            raise CheckpointError(
                f"--seesr_model_path {path} is not a folder; pass SeeSR's release folder (unet/ + controlnet/) or a "
                "checkpoint-<step>/ folder of this script."
            )
        sources["seesr"] = path
        sources["injector"] = path
    if args.controlnet_model_path:
        sources["controlnet"] = _model_folder(args.controlnet_model_path, "controlnet", "--controlnet_model_path")
    if args.unet_model_path:
        sources["unet"] = _model_folder(args.unet_model_path, UNET_FOLDER, "--unet_model_path")
    return sources


def check_ram_files(args) -> None:
    """RAM's weights (and DAPE) exist where the flags say, before any model loads."""
    if not Path(args.ram_path).is_file():
        raise UserError(
            f"--ram_path {args.ram_path} does not exist; SeeSR training needs RAM's ram_swin_large_14m.pth for the "
            "image embeddings (pass its path), or add --no_image_cross_attention to train the plain ControlNet."
        )
    if args.ram_ft_path and not Path(args.ram_ft_path).is_file():
        raise UserError(f"--ram_ft_path {args.ram_ft_path} does not exist; pass SeeSR's DAPE.pth or leave the flag out.")


def build_models(args, sources: dict, sd2_unet, logger, image_width: int | None = None):
    """``(unet, controlnet, injector or None)`` to start from: SeeSR's (or our) model, or new ones from SD2's UNet.

    With image attention (the default) the UNet is SD2's with SeeSR's image attentions added (PyTorch's default
    initialisation, as SeeSR), unless a UNet is given; a new ControlNet copies that UNet's encoder. ``image_width``:
    the tagger's embedding width (RAM: 512).
    """
    from models.seesr import build_controlnet, load_controlnet, load_seesr_weights
    from models.seesr_unet import SeeSRUNet2DConditionModel, load_strict, unet_with_image_attention

    use_images = not args.no_image_cross_attention
    unet, controlnet, injector = sd2_unet, None, None
    if sources["seesr"] is not None:
        controlnet, injector, loaded_unet, messages = load_seesr_weights(sources["seesr"], sd2_unet)
        for message in messages:
            logger.info("%s", message)
        unet = loaded_unet if loaded_unet is not None else sd2_unet
    if sources["controlnet"] is not None:
        controlnet = load_controlnet(sources["controlnet"])
        logger.info("ControlNet from %s", sources["controlnet"])
    if sources["unet"] is not None:
        unet = load_strict(SeeSRUNet2DConditionModel, sources["unet"])
        logger.info("UNet from %s", sources["unet"])
    unet_images = bool(getattr(unet.config, "use_image_cross_attention", False))
    if controlnet is not None:
        controlnet_images = bool(getattr(controlnet.config, "use_image_cross_attention", False))
        if controlnet_images != use_images:
            where = sources["controlnet"] or sources["seesr"]
            raise CheckpointError(
                f"The ControlNet in {where} {'has' if controlnet_images else 'has no'} image cross-attention; "
                + ("drop --no_image_cross_attention to train it as SeeSR." if controlnet_images else
                   "add --no_image_cross_attention to continue it as a plain ControlNet, or start a SeeSR model anew.")
            )
    if unet_images and not use_images:
        raise CheckpointError("The UNet has image cross-attention; drop --no_image_cross_attention to train it as SeeSR.")
    if use_images and not unet_images:
        torch.manual_seed(args.seed if args.seed is not None else 0)  # the new image attentions, reproducibly
        unet = unet_with_image_attention(unet, image_width or 512)
        logger.info("UNet: SD2's with new image attentions (PyTorch's default initialisation, as SeeSR)")
    if controlnet is None:
        controlnet = build_controlnet(unet, args.conditioning_embedding_channels, use_image_cross_attention=use_images)
        logger.info("ControlNet initialised from the UNet's encoder (zero convolutions: starts as the UNet alone)")
    return unet, controlnet, injector


def enable_xformers(logger, *models) -> None:
    """xformers attention where installed (SeeSR's flag); PyTorch's SDPA otherwise, which needs no switch."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        logger.info("--enable_xformers_memory_efficient_attention: xformers is not installed; PyTorch's "
                    "scaled-dot-product attention (memory-efficient as well) is used")
        return
    for model in models:
        model.enable_xformers_memory_efficient_attention()


def load_validation_set(args) -> list[dict]:
    """``[{"name", "lr" [3,h,w] in [0,1], "hr" or None, "prompt"}]``: the given LR images or degraded crops."""
    from data.sr_pairs import load_image_tensor, read_tag_prompt

    if args.validation_steps == 0:
        return []
    if args.validation_image:
        items = []
        for path in args.validation_image:
            if not Path(path).is_file():
                raise UserError(f"--validation_image {path} does not exist; pass LR image files.")
            has_tags = Path(path).with_suffix(".txt").is_file()
            items.append({"name": Path(path).stem, "lr": load_image_tensor(path), "hr": None,
                          "prompt": read_tag_prompt(path), "tag_source": "file" if has_tags else "none"})
        return items
    # Fixed crops and degradations (own seed, no null prompts): the same images at every validation.
    args_copy = argparse.Namespace(**{**vars(args), "null_text_ratio": 0.0, "random_flip": False})
    dataset = build_training_dataset(args_copy, seed=args.seed if args.seed is not None else 0)
    items = []
    for index in range(min(args.num_validation_images, len(dataset))):
        sample = dataset[index]
        items.append({"name": Path(sample["path"]).stem, "lr": sample["lr"], "hr": (sample["hr"] + 1) / 2,
                      "prompt": sample["prompt"], "tag_source": sample["tag_source"]})
    return items


def checkpoint_number(path: Path) -> int:
    try:
        return int(path.name[len(CHECKPOINT_PREFIX):])
    except ValueError:
        return -1


def list_checkpoints(output_dir: Path) -> list[Path]:
    """``checkpoint-<step>/`` folders of a run, oldest step first (unfinished temporary folders are hidden)."""
    if not output_dir.is_dir():
        return []
    folders = [p for p in output_dir.glob(f"{CHECKPOINT_PREFIX}*") if p.is_dir() and checkpoint_number(p) >= 0]
    return sorted(folders, key=checkpoint_number)


def find_resume_checkpoint(resume: str | None, output_dir: Path) -> Path | None:
    """``--resume_from_checkpoint latest|PATH`` -> a checkpoint folder (None: latest in a new run folder)."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
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


def injector_scalars(injector) -> dict[str, float]:
    """The injector's level weights s and w(t) at a few timesteps, as tracker scalars."""
    values = {}
    groups = injector.num_groups
    names = [f"{'level' if injector.config.grouping == 'level' else 'residual'}{i}" for i in range(groups - 1)] + ["mid"]
    with torch.no_grad():
        if injector.scale_weights is not None:
            for name, weight in zip(names, injector.scale_weights.weights.float().cpu().tolist(), strict=True):
                values[f"injector/s/{name}"] = weight
        if injector.timestep_weights is not None:
            for t in W_T_LOGGED_AT:
                weights = injector.get_weight_at_step(t).float().cpu().tolist()
                if injector.config.timestep_weights_shared:
                    values[f"injector/w/t{t}"] = weights[0]
                else:
                    values.update({f"injector/w/t{t}/{name}": w for name, w in zip(names, weights, strict=True)})
    return values


def publish_checkpoint(staging: Path, final: Path) -> None:
    """Move a finished checkpoint folder into place with renames: readers see the old folder or the new one."""
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)


def rotate_checkpoint_folders(output_dir: Path, keep: int | None) -> list[Path]:
    """Delete the oldest checkpoint folders beyond ``keep`` (None keeps all)."""
    if not keep:
        return []
    checkpoints = list_checkpoints(output_dir)
    removed = checkpoints[:-keep] if len(checkpoints) > keep else []
    for folder in removed:
        shutil.rmtree(folder, ignore_errors=True)
    return removed


class PromptEmbeddingCache:
    """Text embeddings of prompts already seen (the text encoder is frozen, so they never change)."""

    def __init__(self, tokenizer, text_encoder, device, capacity: int):
        self.tokenizer, self.text_encoder, self.device, self.capacity = tokenizer, text_encoder, device, capacity
        self.embeddings: dict[str, torch.Tensor] = {}

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        from models.seesr import encode_prompts

        if self.capacity == 0:
            return encode_prompts(self.tokenizer, self.text_encoder, list(prompts), self.device)
        missing = list(dict.fromkeys(p for p in prompts if p not in self.embeddings))
        if missing:
            if len(self.embeddings) + len(missing) > self.capacity:
                self.embeddings.clear()  # rare (many distinct tag prompts): start over rather than track recency
            encoded = encode_prompts(self.tokenizer, self.text_encoder, missing, self.device)
            self.embeddings.update(zip(missing, encoded))
        return torch.stack([self.embeddings[p] for p in prompts])


@torch.no_grad()
def add_ram_inputs(batch: dict, tagger) -> None:
    """RAM's embeddings of the LR input (``image_embeds``) and RAM's tags of the GT where no tag file gave a prompt.

    SeeSR's ``train_seesr.py`` feeds RAM (+ DAPE) the ``sr_bicubic`` image (the ControlNet input) resized bicubically
    to 384 px. The tags come from its ``make_tags.py``: RAM on the GT, written as ``"{tags},"``; here read from tag
    files, or computed online the same way, with the one tagger loaded (with DAPE when ``--ram_ft_path`` is given,
    where make_tags.py uses plain RAM: on a clean GT the two agree closely, and a second Swin-L is not loaded).
    """
    batch["image_embeds"] = tagger.image_embeddings(batch["lr_upsampled"], resize="bicubic")
    untagged = [i for i, source in enumerate(batch["tag_source"]) if source == "none"]
    if untagged:
        gt = ((batch["hr"][untagged] + 1) / 2).clamp(0, 1)
        prompts = list(batch["prompt"])
        for index, tags in zip(untagged, tagger.tags(gt), strict=True):
            prompts[index] = f"{tags},"  # make_tags.py's tag file text
        batch["prompt"] = prompts


def loss_generator(seed: int | None, micro_step: int, accelerator) -> torch.Generator | None:
    """A generator for one forward pass, a function of (seed, micro-batch, rank) only: resumes draw the same noise."""
    if seed is None:
        return None
    generator = torch.Generator(device=accelerator.device)
    return generator.manual_seed(
        (seed * 1_000_003 + micro_step * accelerator.num_processes + accelerator.process_index) % (2**63)
    )


# ------------------------------------------------------------------------------------------------ main


def main(args: argparse.Namespace) -> dict:
    from diffusers import ControlNetModel
    from diffusers.optimization import get_scheduler

    from models.seesr import (
        SeeSRPipeline,
        check_sd2_folder,
        load_controlnet,
        load_sd2_components,
        save_seesr_weights,
        seesr_training_loss,
        set_gradient_checkpointing,
    )
    from models.seesr_unet import unet_trainable_parameters
    from models.timestep_adaptive import (
        INJECTOR_FOLDER,
        MultiScaleInjector,
        build_injector,
        read_injector_state,
        residual_levels_of,
        save_injector,
    )

    reset_accelerate_state()
    # Everything a user can get wrong is checked before the models load.
    config, resume_dir, resume_state = resolve_run_config(args)
    output_dir = Path(config.output_dir)
    check_sd2_folder(config.pretrained_model_path)
    sources = resolve_model_sources(config)
    dataset = build_training_dataset(config, config.seed)
    dataset.check_images()
    validation_set = load_validation_set(config)
    use_ram = not config.no_image_cross_attention
    if use_ram:
        check_ram_files(config)

    accelerator = create_accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        cpu=config.device == "cpu",
        seed=config.seed,
        project_dir=str(output_dir),
        report_to=config.report_to,
        logging_dir=str(output_dir / config.logging_dir),
    )
    if config.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    if not config.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    is_main = accelerator.is_main_process
    logger = setup_logger(output_dir, is_main)
    if config.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device
    from data.degradations_batched import degrade_training_batch, use_device_degradation

    degrade_on_device = use_device_degradation(config.degradation_device, device) and hasattr(dataset, "degradation")
    dataset.degrade_on_device = degrade_on_device  # items then carry the HR crop and drawn kernels only

    # Frozen SD2 parts in the compute dtype; trainable weights in fp32 (autocast computes in half precision). The
    # ControlNet copies the UNet's encoder before the UNet is cast, so it starts from the full-precision weights.
    sd2 = load_sd2_components(config.pretrained_model_path, device)
    tagger = None
    if use_ram:
        from models.ram import load_ram_tagger

        tagger = load_ram_tagger(config.ram_path, config.ram_ft_path, config.ram_tag_list, config.ram_tag_thresholds,
                                 device=device, dtype=weight_dtype)
        logger.info("RAM %s%s: image embeddings of the LR input; tags of the GT where no tag file is given",
                    config.ram_path, f" + DAPE {config.ram_ft_path}" if config.ram_ft_path else "")
    image_width = tagger.config.embed_width if tagger is not None else None
    unet, controlnet, loaded_injector = build_models(config, sources, sd2.unet, logger, image_width)
    unet.to(device)
    sd2.unet = unet
    train_unet = use_ram and not config.train_injector_only and bool(config.trainable_modules)
    unet_parameters = []
    if train_unet:
        unet_parameters = list(unet_trainable_parameters(unet, config.trainable_modules).values())
        if not unet_parameters:
            raise UserError(f"--trainable_modules {' '.join(config.trainable_modules)} names no module of the UNet; "
                            "SeeSR's default is image_attentions.")
        for parameter in unet_parameters:
            parameter.requires_grad_(True)
        logger.info("UNet: %.2fM parameters trained (modules ending in %s), the rest frozen",
                    sum(p.numel() for p in unet_parameters) / 1e6, ", ".join(config.trainable_modules))
    frozen_models = [sd2.vae, sd2.text_encoder] + ([] if train_unet else [unet])  # a trained UNet stays fp32
    if weight_dtype != torch.float32:
        for frozen in frozen_models:
            frozen.to(dtype=weight_dtype)
    if config.enable_xformers_memory_efficient_attention:
        enable_xformers(logger, unet, controlnet)
    injector = build_injector(
        config.injector,
        residual_levels_of(controlnet),
        timestep_weights=config.timestep_weights,
        grouping=config.injector_grouping,
        timestep_weights_shared=not config.timestep_weights_per_group,
        table_bins=config.timestep_table_bins,
    )
    if loaded_injector is not None and injector is not None:
        try:
            injector.load_state_dict(loaded_injector.state_dict())
        except RuntimeError as error:
            raise CheckpointError(
                f"The injector in {sources['injector']} does not fit --injector {config.injector} with these injector "
                f"flags: {str(error).splitlines()[0]}"
            ) from None
        logger.info("injector weights from %s", sources["injector"])
    if config.train_injector_only:
        controlnet.requires_grad_(False)
        controlnet.to(device).eval()
        if weight_dtype != torch.float32:
            controlnet.to(dtype=weight_dtype)
    else:
        controlnet.to(device).train()
    if injector is not None:
        injector.to(device).train()
    if config.gradient_checkpointing:
        set_gradient_checkpointing(True, *([sd2.unet] if config.train_injector_only else [controlnet, sd2.unet]))
    if train_unet:
        unet.train()

    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * accelerator.num_processes
    trainables = ([] if config.train_injector_only else [controlnet]) + ([injector] if injector is not None else [])
    parameter_groups = []
    if not config.train_injector_only:
        parameter_groups.append({"params": list(controlnet.parameters()) + unet_parameters, "lr": learning_rate,
                                 "weight_decay": config.adam_weight_decay})
    if injector is not None:
        parameter_groups.append({"params": list(injector.parameters()), "lr": config.injector_learning_rate,
                                 "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        parameter_groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
        fused=fused_optimizer(device),
    )
    workers = config.dataloader_num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if len(dataset) < config.train_batch_size * accelerator.num_processes:
        raise UserError(
            f"The training data has {len(dataset)} images, fewer than one batch of {config.train_batch_size} per "
            f"device on {accelerator.num_processes} process(es); add images or lower --train_batch_size."
        )
    # Not persistent: each epoch's workers get the dataset with that epoch's seed (see data/sr_pairs.py).
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=config.train_batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True,
    )
    max_train_steps = config.max_train_steps
    if max_train_steps is None:
        per_epoch = math.ceil(len(dataset) // (config.train_batch_size * accelerator.num_processes)
                              / config.gradient_accumulation_steps)
        max_train_steps = config.num_train_epochs * per_epoch if config.num_train_epochs else 100000
    lr_scheduler = get_scheduler(
        config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
        num_training_steps=max_train_steps, num_cycles=config.lr_num_cycles, power=config.lr_power,
    )

    # accelerate.save_state would write every prepared model as model_<i>.safetensors; the ControlNet and the
    # injector are written in their own formats instead (controlnet/, multi_scale_injector/), so the hooks hand
    # accelerate nothing to save or load and restore them from those folders.
    def save_model_hook(models, weights, _output_dir):
        weights.clear()

    def load_model_hook(models, input_dir):
        while models:
            model = unwrap(accelerator, models.pop())
            if isinstance(model, ControlNetModel):
                try:
                    model.load_state_dict(load_controlnet(input_dir).state_dict())
                except RuntimeError as error:
                    raise CheckpointError(
                        f"The ControlNet in {input_dir} does not fit this run: {str(error).splitlines()[0]}"
                    ) from None
            elif isinstance(model, MultiScaleInjector):
                state, source = read_injector_state(Path(input_dir) / INJECTOR_FOLDER)
                try:
                    model.load_state_dict({k.removeprefix("module."): v for k, v in state.items()})
                except RuntimeError as error:
                    raise CheckpointError(
                        f"The injector in {source} does not fit this run: {str(error).splitlines()[0]}"
                    ) from None

    frozen_sources = {"controlnet": None, "unet": None}
    if config.train_injector_only:
        from models.seesr import controlnet_folder

        start = sources["seesr"]
        frozen_sources["controlnet"] = sources["controlnet"] or controlnet_folder(start)
        unet_source = sources["unet"] or (start / UNET_FOLDER if start is not None else None)
        if use_ram:
            if unet_source is None or not (unet_source / "config.json").is_file():
                raise CheckpointError("--train_injector_only with image attention needs a trained UNet to freeze: "
                                      "pass --seesr_model_path or --unet_model_path.")
            frozen_sources["unet"] = unet_source
    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    prepared = accelerator.prepare(*trainables, optimizer, loader, lr_scheduler)
    prepared_models = list(prepared[: len(trainables)])
    optimizer, loader, lr_scheduler = prepared[len(trainables):]
    if not config.train_injector_only:
        controlnet = prepared_models.pop(0)
    if injector is not None:
        injector = prepared_models.pop(0)
    trainables = list(prepared[: len(trainables)])  # the DDP-wrapped ones: accumulate() skips their all-reduce
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]

    steps_per_epoch = math.ceil(len(loader) / config.gradient_accumulation_steps)
    num_epochs = math.ceil(max_train_steps / steps_per_epoch)
    global_step, micro_step, first_epoch, skip_batches, history = 0, 0, 0, 0, []
    if resume_dir is not None:
        try:
            with keeping_optimizer_implementation(optimizer):
                accelerator.load_state(str(resume_dir))
        except FileNotFoundError as error:
            raise CheckpointError(f"{resume_dir} is incomplete ({error.filename} is missing); resume from another "
                                  "checkpoint.") from None
        if train_unet:  # the UNet is not accelerate's to restore (it is trained outside DDP: see sync_unet_gradients)
            from models.seesr_unet import SeeSRUNet2DConditionModel, load_strict

            unet.load_state_dict(load_strict(SeeSRUNet2DConditionModel, resume_dir / UNET_FOLDER).state_dict())
        global_step, micro_step = resume_state["step"], resume_state["micro_step"]
        first_epoch, skip_batches = resume_state["epoch"], resume_state["batches_in_epoch"]
        if skip_batches >= len(loader):
            first_epoch, skip_batches = first_epoch + 1, 0
        history = [list(point) for point in resume_state.get("loss_history", [])]
        if resume_state.get("num_processes") != accelerator.num_processes:
            logger.warning("%s was written by %s process(es), this run has %d: the position in the epoch's data is "
                           "approximate", resume_dir, resume_state.get("num_processes"), accelerator.num_processes)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", resume_dir, global_step, first_epoch,
                    skip_batches)
    if is_main:
        save_config(config, output_dir / "args.yaml")
    start_tracking(accelerator, config.tracker_project_name or output_dir.name, config_to_dict(config))

    controlnet_params = sum(p.numel() for p in unwrap(accelerator, controlnet).parameters())
    injector_params = sum(p.numel() for p in unwrap(accelerator, injector).parameters()) if injector is not None else 0
    logger.info(
        "injector %s%s | ControlNet %.1fM parameters (%s) | injector %d parameters | %d images, %d steps per epoch",
        config.injector,
        "" if injector is None else f" ({unwrap(accelerator, injector).variant}, {config.timestep_weights}, "
        f"{config.injector_grouping})",
        controlnet_params / 1e6, "frozen" if config.train_injector_only else "trained", injector_params,
        len(dataset), steps_per_epoch,
    )
    log_run_header(logger, accelerator, config.train_batch_size,
                   f"{max_train_steps} steps, lr {learning_rate:g} / injector {config.injector_learning_rate:g}")
    embed_prompts = PromptEmbeddingCache(sd2.tokenizer, sd2.text_encoder, device, config.prompt_cache_size)
    validation_dir = output_dir / "validation"
    written: dict[str, list] = {"checkpoints": [], "validation": []}

    def validate(step: int) -> None:
        """Super-resolve the validation images with the inference function itself; plot w(t)."""
        if not is_main:
            return
        from data.degradations import bicubic_upsample
        from models.seesr import super_resolve_image
        from utils.images import save_grid

        bare_controlnet = unwrap(accelerator, controlnet)
        bare_injector = unwrap(accelerator, injector) if injector is not None else None
        modes = [(m, m.training) for m in (bare_controlnet, bare_injector, unet) if m is not None]
        for model, _ in modes:
            model.eval()
        pipeline = SeeSRPipeline(sd2.unet, sd2.vae, sd2.text_encoder, sd2.tokenizer, sd2.noise_scheduler,
                                 bare_controlnet, bare_injector)
        tiles, captions = [], []
        try:
            with accelerator.autocast():
                for index, item in enumerate(validation_set):
                    prompt, image_embeds = item["prompt"], None
                    if tagger is not None:  # as at inference: RAM on the LR image
                        tags, image_embeds = tagger(item["lr"][None].to(device=device, dtype=tagger.dtype))
                        prompt = prompt if item["tag_source"] == "file" else tags[0]
                    result = super_resolve_image(
                        pipeline, item["lr"], upscale=config.scale,
                        process_size=config.validation_process_size or config.resolution, image_embeds=image_embeds,
                        prompt=prompt, num_inference_steps=config.validation_num_inference_steps,
                        guidance_scale=config.validation_guidance_scale,
                        generator=torch.Generator().manual_seed((config.seed or 0) + index),
                    )
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
            path = save_grid(tiles, validation_dir / f"step_{step:06d}.png", nrow=per_row, value_range=(0.0, 1.0),
                             captions=captions)
            written["validation"].append(path)
            log_image(accelerator, "validation/LR_SR_HR", path, step)
            logger.info("step %d: validation images %s", step, path)
        if bare_injector is not None:
            from models.timestep_adaptive import describe_injector
            from utils.plots import plot_timestep_weights

            path = plot_timestep_weights(bare_injector, validation_dir / f"timestep_weights_step_{step:06d}.png",
                                         title=f"{output_dir.name}, step {step}")
            log_image(accelerator, "injector/timestep_weights", path, step)
            logger.info("step %d: %s | %s", step, describe_injector(bare_injector), path)

    def save_checkpoint(step: int, epoch: int, batches_in_epoch: int) -> None:
        final = output_dir / f"{CHECKPOINT_PREFIX}{step}"
        staging = output_dir / f".{final.name}.tmp"
        if is_main:
            shutil.rmtree(staging, ignore_errors=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(staging))  # optimiser, LR schedule, loss scaler, RNG of every process
        accelerator.wait_for_everyone()  # every rank's files are in before the folder is renamed
        if is_main:
            if config.train_injector_only:  # the frozen models exactly as loaded, not half-precision copies
                shutil.copytree(frozen_sources["controlnet"], staging / "controlnet")
                if frozen_sources["unet"] is not None:
                    shutil.copytree(frozen_sources["unet"], staging / UNET_FOLDER)
                if injector is not None:
                    save_injector(unwrap(accelerator, injector), staging)
            else:
                save_seesr_weights(staging, unwrap(accelerator, controlnet),
                                   unwrap(accelerator, injector) if injector is not None else None)
                if use_ram:  # not plain SD2 any more: inference needs this UNet (trained modules included)
                    unet.save_pretrained(staging / UNET_FOLDER, safe_serialization=True)
            state = {
                "kind": CHECKPOINT_KIND, "step": step, "micro_step": micro_step, "epoch": epoch,
                "batches_in_epoch": batches_in_epoch, "num_processes": accelerator.num_processes,
                "loss_history": history, "config": config_to_dict(config),
            }
            atomic_write_text(json.dumps(state, indent=1), staging / TRAINING_STATE_NAME)
            publish_checkpoint(staging, final)
            for removed in rotate_checkpoint_folders(output_dir, config.checkpoints_total_limit):
                logger.info("removed %s (--checkpoints_total_limit %d)", removed, config.checkpoints_total_limit)
            written["checkpoints"].append(final)
            logger.info("step %d: saved %s", step, final)
        accelerator.wait_for_everyone()

    def sync_unet_gradients() -> None:
        """Average the UNet's trained gradients over the processes (the UNet is kept out of DDP: the loss function
        reads its attributes, which a DDP wrapper hides)."""
        if accelerator.num_processes > 1:
            for parameter in unet_parameters:
                if parameter.grad is not None:
                    parameter.grad = accelerator.reduce(parameter.grad, "mean")

    progress = TrainingProgress(max_train_steps, "SeeSR training", enabled=is_main, initial=global_step)
    cadence = CheckpointCadence(config.checkpointing_steps, config.checkpointing_minutes)
    meter = LossMeter()
    micro_losses: list[torch.Tensor] = []
    # Every step's loss is watched on the device (no host sync); it is read at logging and before each checkpoint, so
    # a NaN never reaches a saved checkpoint. An fp16 gradient overflow keeps the loss finite: the scaler skips it.
    guard = NonFiniteGuard(accelerator.device, ", or train with bf16 or fp32 instead of fp16")
    last_saved = last_validated = global_step if resume_dir is not None else -1
    started, started_step = time.perf_counter(), global_step
    done = global_step >= max_train_steps
    epoch = first_epoch
    for epoch in range(first_epoch, num_epochs):
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
                    if degrade_on_device:
                        batch = degrade_training_batch(batch, dataset.degradation, device)
                    if tagger is not None:
                        add_ram_inputs(batch, tagger)
                    batch["prompt_embeds"] = embed_prompts(batch["prompt"])
                    with accelerator.autocast():  # the UNet is not prepared by accelerate: autocast it here
                        loss = seesr_training_loss(
                            batch, unet=sd2.unet, vae=sd2.vae, text_encoder=sd2.text_encoder, tokenizer=sd2.tokenizer,
                            controlnet=controlnet, injector=injector, noise_scheduler=sd2.noise_scheduler,
                            generator=loss_generator(config.seed, micro_step, accelerator),
                        )
                    backward_and_step(accelerator, loss, optimizer, trained_parameters, config.max_grad_norm,
                                      before_clip=sync_unet_gradients)
            except torch.OutOfMemoryError as error:
                raise UserError(out_of_memory_message(
                    config.train_batch_size,
                    "; or add --gradient_checkpointing, use --mixed_precision fp16/bf16 or a smaller --resolution",
                )) from error
            micro_step += 1
            guard.update(loss, global_step + 1)
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            global_step += 1
            step_loss = torch.stack(micro_losses).mean()
            micro_losses = []
            meter.update(step_loss)
            progress.update(step_loss, lr_scheduler.get_last_lr()[0])
            done = global_step >= max_train_steps
            if global_step % config.logging_steps == 0 or done:
                mean_loss = float(accelerator.reduce(meter.total / meter.count, "mean"))
                meter.reset()
                guard.check(accelerator)
                history.append([global_step, mean_loss])
                seconds = (time.perf_counter() - started) / max(1, global_step - started_step)
                logger.info("step %d/%d | loss %.4f | lr %.2e | %.2f s/step", global_step, max_train_steps,
                            mean_loss, lr_scheduler.get_last_lr()[0], seconds)
                if accelerator.trackers:
                    rates = lr_scheduler.get_last_lr()
                    scalars = {"train/loss": mean_loss, "train/lr": rates[0], "train/seconds_per_step": seconds}
                    if injector is not None:
                        scalars["train/lr_injector"] = rates[-1]
                        scalars.update(injector_scalars(unwrap(accelerator, injector)))
                    log_scalars(accelerator, scalars, global_step)
            if config.validation_steps and global_step % config.validation_steps == 0:
                validate(global_step)
                last_validated = global_step
            if done or cadence.due(global_step, accelerator):
                guard.check(accelerator)
                save_checkpoint(global_step, epoch, batches_in_epoch)
                cadence.saved()
                last_saved = global_step
            if done:
                break
    progress.close()
    if last_saved != global_step:  # resumed at or past --max_train_steps
        save_checkpoint(global_step, epoch, 0)
    if config.validation_steps and last_validated != global_step:
        validate(global_step)
    if is_main and history:
        from utils.plots import plot_curves

        steps = [point[0] for point in history]
        plot_curves({"train loss (epsilon MSE)": [point[1] for point in history]}, output_dir / "loss_curve.png",
                    title=f"{output_dir.name}: steps {steps[0]}..{steps[-1]}, a point every {config.logging_steps}",
                    xlabel=f"logging interval ({config.logging_steps} optimiser steps)", log_y=True)
    logger.info("done: %d steps, checkpoints in %s", global_step, output_dir)
    accelerator.end_training()
    return {
        "step": global_step,
        "history": history,
        "output_dir": output_dir,
        "checkpoints": list_checkpoints(output_dir),
        "validation": written["validation"],
        "resumed_from": resume_dir,
    }


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
