"""Train SeeSR's ControlNet with the timestep-adaptive multi-scale injector on a frozen Stable Diffusion 2 base.

SeeSR (Wu et al., CVPR 2024, https://github.com/cswry/SeeSR ``train_seesr.py``) trains a ControlNet that reads the
bicubic-upsampled low-resolution image, with SD2's UNet, VAE and text encoder frozen and the epsilon-MSE objective
at uniform timesteps. This script follows diffusers' ControlNet-training conventions
(``examples/controlnet/train_controlnet.py``: flag names, ``accelerate`` state in ``checkpoint-<step>/`` folders,
``--checkpoints_total_limit``, ``--resume_from_checkpoint latest``) and adds the users' injector
(``models/timestep_adaptive.py``) between ControlNet and UNet. The three variants the users compare:

    --injector baseline              plain SeeSR ControlNet (no injector)
    --injector timestep_only         residual * w(t)
    --injector timestep_multiscale   residual * s[level] * w(t)     (default)

    python train_seesr_timestep.py --pretrained_model_path preset/models/stable-diffusion-2-base \\
        --train_data_dir datasets/HR --output_dir experience/timestep_multiscale --injector timestep_multiscale
    accelerate launch --multi_gpu train_seesr_timestep.py --config configs/seesr_sd2_base.yaml --train_data_dir HR
    python train_seesr_timestep.py ... --resume_from_checkpoint latest
    python train_seesr_timestep.py ... --train_injector_only --controlnet_model_path experience/baseline/checkpoint-100000

Data: ``--train_data_dir`` (or ``--hr_dir`` alone): HR images cropped to ``--resolution`` and degraded on the fly
(Real-ESRGAN two-stage pipeline, ``--degradation seesr|realesrgan``); or ``--lr_dir`` + ``--hr_dir``: prepared
pairs matched by file stem. A ``<stem>.txt`` beside an image is its prompt (tags), dropped with
``--null_prompt_ratio``.

Writes into ``--output_dir`` (the run folder, ``experience/<name>``)::

    args.yaml, train.log, loss_curve.png
    checkpoint-<step>/controlnet/                 diffusers ControlNetModel (config.json + safetensors)
    checkpoint-<step>/multi_scale_injector/       config.json, model.safetensors, pytorch_model.bin (not baseline)
    checkpoint-<step>/optimizer.bin, scheduler.bin, random_states_<rank>.pkl, [scaler.pt]   accelerate state
    checkpoint-<step>/training_state.json         step, epoch, position in the epoch, variant, loss history
    validation/step_<step>.png                    LR | SR | HR through the inference pipeline itself
    validation/timestep_weights_step_<step>.png   the injector's w(t) (and s * w(t)) curves

Differences from SeeSR's script, on purpose: data shuffled and LR/HR paired by stem; the checkpoint limit applied
(after the new checkpoint is safely written, not before); checkpoint folders published by an atomic rename; the
frozen SD2 modules never saved; the final save is a checkpoint like the others (SeeSR's overwrote the ControlNet
folder with the UNet); RAM/DAPE prompts and image cross-attention are not part of this repository yet.
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

from utils.accelerator import PRECISION_CHOICES, create_accelerator, log_run_header, reset_accelerate_state
from utils.checkpoint import atomic_write_text
from utils.config import add_config_argument, config_to_dict, parse_with_config, save_config
from utils.errors import CheckpointError, UserError, run_cli
from utils.log import LossMeter, TrainingProgress, setup_logger
from utils.training import backward_and_step, check_finite, out_of_memory_message, unwrap

CHECKPOINT_PREFIX = "checkpoint-"
TRAINING_STATE_NAME = "training_state.json"
CHECKPOINT_KIND = "seesr_timestep"
LR_SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")
# Flags a resumed run must share with the run that wrote the checkpoint (they fix what is being trained).
RESUME_FIXED_FLAGS = ("injector", "timestep_weights", "injector_grouping", "timestep_weights_per_group",
                      "timestep_table_bins", "train_injector_only", "conditioning_embedding_channels")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False
    )
    add_config_argument(parser)

    model = parser.add_argument_group("models")
    model.add_argument("--pretrained_model_path", default=None,
                       help="local diffusers Stable Diffusion 2 base folder (unet/ vae/ text_encoder/ tokenizer/ "
                       "scheduler/); required, nothing is downloaded")
    model.add_argument("--controlnet_model_path", default=None,
                       help="start from a trained ControlNet: a checkpoint-<step>/ folder or a diffusers ControlNet "
                       "folder (default: a new ControlNet copied from the UNet's encoder, as SeeSR)")
    model.add_argument("--conditioning_embedding_channels", type=int, nargs=4, default=None, metavar="C",
                       help="channels of a new ControlNet's LR-image encoder, 4 stages down to the latent size "
                       "(default diffusers' 16 32 96 256, as SeeSR; tiny presets use fewer)")
    model.add_argument("--injector", choices=("baseline", "timestep_only", "timestep_multiscale"),
                       default="timestep_multiscale",
                       help="baseline: plain ControlNet; timestep_only: residuals * w(t); timestep_multiscale: "
                       "residuals * s[level] * w(t) (default)")
    model.add_argument("--timestep_weights", choices=("table", "mlp"), default="table",
                       help="w(t) as a lookup table over the 1000 training timesteps or an MLP on the timestep "
                       "embedding (default table)")
    model.add_argument("--injector_grouping", choices=("tensor", "level"), default="level",
                       help="one scale weight per ControlNet residual (tensor: 13 for SD2) or per resolution level "
                       "+ mid (level: 5 for SD2, default)")
    model.add_argument("--timestep_weights_per_group", action="store_true",
                       help="one w(t) curve per group (level or residual) instead of one shared curve")
    model.add_argument("--timestep_table_bins", type=int, default=None,
                       help="bins of the w(t) table (default 1000, one per training timestep; fewer bins share "
                       "entries between neighbouring timesteps and see more samples each)")
    model.add_argument("--train_injector_only", action="store_true",
                       help="freeze the ControlNet (from --controlnet_model_path) and train the injector alone")
    model.add_argument("--gradient_checkpointing", action="store_true",
                       help="recompute ControlNet and UNet activations in the backward pass: much less memory, "
                       "about 20-30%% slower")

    data = parser.add_argument_group("data")
    data.add_argument("--train_data_dir", default=None,
                      help="folder of HR images (recursive), cropped and degraded on the fly into LR inputs")
    data.add_argument("--hr_dir", default=None,
                      help="HR folder: with --lr_dir, prepared pairs matched by file stem; alone, the same as "
                      "--train_data_dir")
    data.add_argument("--lr_dir", default=None, help="prepared LR folder (needs --hr_dir; HR = scale x LR size)")
    data.add_argument("--degradation", choices=("seesr", "realesrgan"), default="seesr",
                      help="on-the-fly degradation ranges: SeeSR's milder settings (default) or Real-ESRGAN x4plus")
    data.add_argument("--degradation_options", default=None,
                      help="YAML file overriding individual degradation settings (keys of "
                      "data.degradations.DegradationConfig)")
    data.add_argument("--scale", type=int, default=4, help="super-resolution factor of the training pairs (default 4)")
    data.add_argument("--resolution", type=int, default=512,
                      help="HR training crop in pixels, divisible by 8 and --scale (default 512, SD2 base's size)")
    data.add_argument("--null_prompt_ratio", type=float, default=0.5,
                      help="probability of replacing an image's tag prompt by '' so that the unconditional branch of "
                      "classifier-free guidance is trained too (default 0.5, SeeSR's null_text_ratio)")
    data.add_argument("--no_random_flip", dest="random_flip", action="store_false",
                      help="turn off random horizontal flips of the training crops")
    data.add_argument("--dataloader_num_workers", type=int, default=None,
                      help="data-loader worker processes: degradation runs on the CPU, so use several on a GPU "
                      "server (default: up to 8 on CUDA, 0 on CPU)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--train_batch_size", type=int, default=4, help="images per device and forward pass (default 4)")
    optim.add_argument("--gradient_accumulation_steps", type=int, default=1,
                       help="forward passes per optimiser step (default 1)")
    optim.add_argument("--learning_rate", type=float, default=5e-5,
                       help="ControlNet learning rate after warm-up (default 5e-5, SeeSR's)")
    optim.add_argument("--injector_learning_rate", type=float, default=1e-3,
                       help="injector learning rate (default 1e-3: a few dozen scalars starting at 1.0, and each "
                       "w(t) table entry only learns from the samples drawn at its timestep)")
    optim.add_argument("--lr_scheduler", choices=LR_SCHEDULERS, default="constant",
                       help="learning-rate schedule (diffusers.optimization; default constant, as SeeSR)")
    optim.add_argument("--lr_warmup_steps", type=int, default=500,
                       help="linear warm-up steps of the *_with_warmup, linear and cosine schedules (default 500)")
    optim.add_argument("--lr_num_cycles", type=int, default=1, help="hard restarts of cosine_with_restarts (default 1)")
    optim.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule (default 1.0)")
    optim.add_argument("--adam_beta1", type=float, default=0.9, help="AdamW beta1 (default 0.9)")
    optim.add_argument("--adam_beta2", type=float, default=0.999, help="AdamW beta2 (default 0.999)")
    optim.add_argument("--adam_weight_decay", type=float, default=1e-2,
                       help="AdamW weight decay of the ControlNet (default 1e-2); the injector gets none, since "
                       "decay would pull its weights towards 0 instead of their identity value 1")
    optim.add_argument("--adam_epsilon", type=float, default=1e-8, help="AdamW epsilon (default 1e-8)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping norm, 0 turns it off (default 1.0)")
    optim.add_argument("--max_train_steps", type=int, default=100000, help="optimiser steps in total (default 100000)")
    optim.add_argument("--seed", type=int, default=42,
                       help="seed of initialisation, data order, crops, degradations and noise; a run resumed with "
                       "the same seed continues exactly as if never stopped (default 42)")

    hardware = parser.add_argument_group("hardware")
    hardware.add_argument("--mixed_precision", choices=PRECISION_CHOICES, default="auto",
                          help="auto: bf16 where supported, else fp16 (loss-scaled) on CUDA, fp32 on CPU (default auto)")
    hardware.add_argument("--allow_tf32", dest="allow_tf32", action="store_true", default=True,
                          help="TF32 matmuls on Ampere+ GPUs (on by default here; kept for diffusers command lines)")
    hardware.add_argument("--no_tf32", dest="allow_tf32", action="store_false", help="turn TF32 off")
    hardware.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                          help="auto uses the GPU when there is one (default auto)")
    hardware.add_argument("--prompt_cache_size", type=int, default=256,
                          help="text embeddings of this many distinct prompts kept on the device so the frozen text "
                          "encoder runs once per prompt (default 256; 0 turns the cache off)")

    out = parser.add_argument_group("checkpoints and logging")
    out.add_argument("--output_dir", default="experience/seesr",
                     help="the run folder: checkpoints, logs, validation images (default experience/seesr)")
    out.add_argument("--checkpointing_steps", type=int, default=500,
                     help="write checkpoint-<step>/ every N optimiser steps, and at the end (default 500)")
    out.add_argument("--checkpoints_total_limit", type=int, default=None,
                     help="keep only the newest N checkpoints (default: keep all)")
    out.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest' (the newest checkpoint-<step> in --output_dir; a new run if there is none) or a "
                     "checkpoint-<step> folder")
    out.add_argument("--logging_steps", type=int, default=50,
                     help="log the mean loss (over all processes) every N steps; one point of loss_curve.png (default 50)")

    val = parser.add_argument_group("validation")
    val.add_argument("--validation_steps", type=int, default=500,
                     help="super-resolve the validation images every N steps and at the end, 0 turns it off (default 500)")
    val.add_argument("--validation_image", nargs="+", default=None,
                     help="LR images to super-resolve at validation (default: --num_validation_images degraded "
                     "crops of the training data, shown with their HR crop)")
    val.add_argument("--num_validation_images", type=int, default=2,
                     help="degraded training crops used when no --validation_image is given (default 2)")
    val.add_argument("--validation_num_inference_steps", type=int, default=50, help="sampling steps (default 50)")
    val.add_argument("--validation_guidance_scale", type=float, default=5.5, help="guidance scale (default 5.5)")
    val.add_argument("--validation_process_size", type=int, default=None,
                     help="SeeSR's process size of the validation images (default --resolution)")
    args = parse_with_config(parser, argv)

    if not args.pretrained_model_path:
        parser.error("--pretrained_model_path is required (a local diffusers Stable Diffusion 2 base folder)")
    sources = [bool(args.train_data_dir), bool(args.lr_dir)]
    if args.lr_dir and not args.hr_dir:
        parser.error("--lr_dir needs --hr_dir (prepared pairs are matched by file stem)")
    if args.train_data_dir and args.hr_dir:
        parser.error("give --train_data_dir (HR images degraded on the fly) or --hr_dir [--lr_dir], not both")
    if not any(sources) and not args.hr_dir:
        parser.error("no training data: give --train_data_dir (HR images) or --lr_dir and --hr_dir (prepared pairs)")
    if args.train_injector_only:
        if args.injector == "baseline":
            parser.error("--train_injector_only trains the injector, which --injector baseline does not have")
        if not args.controlnet_model_path:
            parser.error("--train_injector_only needs --controlnet_model_path (a trained ControlNet to freeze)")
    for flag in ("train_batch_size", "gradient_accumulation_steps", "max_train_steps", "checkpointing_steps",
                 "logging_steps", "validation_num_inference_steps", "scale"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error("--checkpoints_total_limit must be at least 1 (leave it out to keep every checkpoint)")
    if args.validation_steps < 0 or args.num_validation_images < 0 or args.prompt_cache_size < 0:
        parser.error("--validation_steps, --num_validation_images and --prompt_cache_size cannot be negative")
    if not 0.0 <= args.null_prompt_ratio <= 1.0:
        parser.error("--null_prompt_ratio must be in [0, 1]")
    if args.resolution % 8 or args.resolution % args.scale:
        parser.error(f"--resolution must be divisible by 8 and by --scale {args.scale}")
    return args


# ------------------------------------------------------------------------------------------------ set-up helpers


def build_training_dataset(args, seed: int | None):
    """HR folder degraded on the fly, or prepared LR/HR pairs."""
    from data.degradations import DegradationConfig
    from data.sr_pairs import HRFolderDegradedDataset, PairedSRFolderDataset

    if args.lr_dir:
        return PairedSRFolderDataset(
            args.lr_dir, args.hr_dir, args.resolution, args.scale, args.null_prompt_ratio, seed, args.random_flip
        )
    config = DegradationConfig.seesr() if args.degradation == "seesr" else DegradationConfig()
    values = config.to_dict()
    if args.degradation_options:
        from utils.config import load_config

        if not Path(args.degradation_options).is_file():
            raise UserError(f"--degradation_options {args.degradation_options} does not exist; pass a YAML file.")
        values.update(load_config(args.degradation_options))
    values["scale"] = args.scale
    return HRFolderDegradedDataset(
        args.train_data_dir or args.hr_dir, args.resolution, DegradationConfig.from_dict(values),
        args.null_prompt_ratio, seed, args.random_flip,
    )


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
            items.append({"name": Path(path).stem, "lr": load_image_tensor(path), "hr": None,
                          "prompt": read_tag_prompt(path)})
        return items
    # Fixed crops and degradations (own seed, no null prompts): the same images at every validation.
    args_copy = argparse.Namespace(**{**vars(args), "null_prompt_ratio": 0.0, "random_flip": False})
    dataset = build_training_dataset(args_copy, seed=args.seed if args.seed is not None else 0)
    items = []
    for index in range(min(args.num_validation_images, len(dataset))):
        sample = dataset[index]
        items.append({"name": Path(sample["path"]).stem, "lr": sample["lr"], "hr": (sample["hr"] + 1) / 2,
                      "prompt": sample["prompt"]})
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


def check_resume_compatible(state: dict, args, checkpoint: Path) -> None:
    trained = state.get("config", {})
    for flag in RESUME_FIXED_FLAGS:
        if flag in trained and trained[flag] != getattr(args, flag):
            raise CheckpointError(
                f"{checkpoint} was trained with --{flag} {trained[flag]}, not {getattr(args, flag)}; resume with the "
                "flags the run started with (see args.yaml in its run folder)."
            )


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
        build_controlnet,
        check_sd2_folder,
        controlnet_folder,
        load_controlnet,
        load_sd2_components,
        save_seesr_weights,
        seesr_training_loss,
        set_gradient_checkpointing,
    )
    from models.timestep_adaptive import (
        INJECTOR_FOLDER,
        MultiScaleInjector,
        build_injector,
        read_injector_state,
        residual_levels_of,
        save_injector,
    )

    reset_accelerate_state()
    output_dir = Path(args.output_dir)
    # Everything a user can get wrong is checked before the models load.
    check_sd2_folder(args.pretrained_model_path)
    controlnet_source = controlnet_folder(args.controlnet_model_path) if args.controlnet_model_path else None
    dataset = build_training_dataset(args, args.seed)
    validation_set = load_validation_set(args)
    resume_dir = find_resume_checkpoint(args.resume_from_checkpoint, output_dir)
    resume_state = None
    if resume_dir is not None:
        resume_state = read_training_state(resume_dir)
        check_resume_compatible(resume_state, args, resume_dir)

    accelerator = create_accelerator(
        mixed_precision=args.mixed_precision,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        cpu=args.device == "cpu",
        seed=args.seed,
    )
    if args.device == "cuda" and accelerator.device.type != "cuda":
        raise UserError("--device cuda: no CUDA GPU is visible to PyTorch; use --device cpu or auto.")
    if not args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    is_main = accelerator.is_main_process
    logger = setup_logger(output_dir, is_main)
    if args.resume_from_checkpoint == "latest" and resume_dir is None:
        logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    device = accelerator.device

    # Frozen SD2 parts in the compute dtype; trainable weights in fp32 (autocast computes in half precision). The
    # ControlNet copies the UNet's encoder before the UNet is cast, so it starts from the full-precision weights.
    sd2 = load_sd2_components(args.pretrained_model_path, device)
    if controlnet_source is not None:
        controlnet = load_controlnet(controlnet_source)
        logger.info("ControlNet from %s", controlnet_source)
    else:
        controlnet = build_controlnet(sd2.unet, args.conditioning_embedding_channels)
        logger.info("ControlNet initialised from the UNet's encoder (zero convolutions: starts as plain SD2)")
    if weight_dtype != torch.float32:
        for frozen in (sd2.unet, sd2.vae, sd2.text_encoder):
            frozen.to(dtype=weight_dtype)
    injector = build_injector(
        args.injector,
        residual_levels_of(controlnet),
        timestep_weights=args.timestep_weights,
        grouping=args.injector_grouping,
        timestep_weights_shared=not args.timestep_weights_per_group,
        table_bins=args.timestep_table_bins,
    )
    if args.train_injector_only:
        controlnet.requires_grad_(False)
        controlnet.to(device).eval()
        if weight_dtype != torch.float32:
            controlnet.to(dtype=weight_dtype)
    else:
        controlnet.to(device).train()
    if injector is not None:
        injector.to(device).train()
    if args.gradient_checkpointing:
        set_gradient_checkpointing(True, *([sd2.unet] if args.train_injector_only else [controlnet, sd2.unet]))

    trainables = ([] if args.train_injector_only else [controlnet]) + ([injector] if injector is not None else [])
    parameter_groups = []
    if not args.train_injector_only:
        parameter_groups.append({"params": list(controlnet.parameters()), "lr": args.learning_rate,
                                 "weight_decay": args.adam_weight_decay})
    if injector is not None:
        parameter_groups.append({"params": list(injector.parameters()), "lr": args.injector_learning_rate,
                                 "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(
        parameter_groups, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
        fused=device.type == "cuda",
    )
    workers = args.dataloader_num_workers
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
    if len(dataset) < args.train_batch_size * accelerator.num_processes:
        raise UserError(
            f"The training data has {len(dataset)} images, fewer than one batch of {args.train_batch_size} per "
            f"device on {accelerator.num_processes} process(es); add images or lower --train_batch_size."
        )
    # Not persistent: each epoch's workers get the dataset with that epoch's seed (see data/sr_pairs.py).
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=args.train_batch_size, shuffle=True, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True,
    )
    lr_scheduler = get_scheduler(
        args.lr_scheduler, optimizer, num_warmup_steps=args.lr_warmup_steps,
        num_training_steps=args.max_train_steps, num_cycles=args.lr_num_cycles, power=args.lr_power,
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

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)
    prepared = accelerator.prepare(*trainables, optimizer, loader, lr_scheduler)
    prepared_models = list(prepared[: len(trainables)])
    optimizer, loader, lr_scheduler = prepared[len(trainables):]
    if not args.train_injector_only:
        controlnet = prepared_models.pop(0)
    if injector is not None:
        injector = prepared_models.pop(0)
    trainables = list(prepared[: len(trainables)])  # the DDP-wrapped ones: accumulate() skips their all-reduce
    trained_parameters = [p for group in optimizer.param_groups for p in group["params"]]

    steps_per_epoch = math.ceil(len(loader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / steps_per_epoch)
    global_step, micro_step, first_epoch, skip_batches, history = 0, 0, 0, 0, []
    if resume_dir is not None:
        try:
            accelerator.load_state(str(resume_dir))
        except FileNotFoundError as error:
            raise CheckpointError(f"{resume_dir} is incomplete ({error.filename} is missing); resume from another "
                                  "checkpoint.") from None
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
        save_config(args, output_dir / "args.yaml")

    controlnet_params = sum(p.numel() for p in unwrap(accelerator, controlnet).parameters())
    injector_params = sum(p.numel() for p in unwrap(accelerator, injector).parameters()) if injector is not None else 0
    logger.info(
        "injector %s%s | ControlNet %.1fM parameters (%s) | injector %d parameters | %d images, %d steps per epoch",
        args.injector,
        "" if injector is None else f" ({unwrap(accelerator, injector).variant}, {args.timestep_weights}, "
        f"{args.injector_grouping})",
        controlnet_params / 1e6, "frozen" if args.train_injector_only else "trained", injector_params,
        len(dataset), steps_per_epoch,
    )
    log_run_header(logger, accelerator, args.train_batch_size,
                   f"{args.max_train_steps} steps, lr {args.learning_rate:g} / injector {args.injector_learning_rate:g}")
    embed_prompts = PromptEmbeddingCache(sd2.tokenizer, sd2.text_encoder, device, args.prompt_cache_size)
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
        modes = [(m, m.training) for m in (bare_controlnet, bare_injector) if m is not None]
        for model, _ in modes:
            model.eval()
        pipeline = SeeSRPipeline(sd2.unet, sd2.vae, sd2.text_encoder, sd2.tokenizer, sd2.noise_scheduler,
                                 bare_controlnet, bare_injector)
        tiles, captions = [], []
        try:
            with accelerator.autocast():
                for index, item in enumerate(validation_set):
                    result = super_resolve_image(
                        pipeline, item["lr"], upscale=args.scale,
                        process_size=args.validation_process_size or args.resolution,
                        prompt=item["prompt"], num_inference_steps=args.validation_num_inference_steps,
                        guidance_scale=args.validation_guidance_scale,
                        generator=torch.Generator().manual_seed((args.seed or 0) + index),
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
            logger.info("step %d: validation images %s", step, path)
        if bare_injector is not None:
            from scripts.plot_timestep_weights import describe_injector, plot_timestep_weights

            path = plot_timestep_weights(bare_injector, validation_dir / f"timestep_weights_step_{step:06d}.png",
                                         title=f"{output_dir.name}, step {step}")
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
            if args.train_injector_only:  # the frozen ControlNet exactly as loaded, not a half-precision copy
                shutil.copytree(controlnet_source, staging / "controlnet")
                if injector is not None:
                    save_injector(unwrap(accelerator, injector), staging)
            else:
                save_seesr_weights(staging, unwrap(accelerator, controlnet),
                                   unwrap(accelerator, injector) if injector is not None else None)
            state = {
                "kind": CHECKPOINT_KIND, "step": step, "micro_step": micro_step, "epoch": epoch,
                "batches_in_epoch": batches_in_epoch, "num_processes": accelerator.num_processes,
                "loss_history": history, "config": config_to_dict(args),
            }
            atomic_write_text(json.dumps(state, indent=1), staging / TRAINING_STATE_NAME)
            publish_checkpoint(staging, final)
            for removed in rotate_checkpoint_folders(output_dir, args.checkpoints_total_limit):
                logger.info("removed %s (--checkpoints_total_limit %d)", removed, args.checkpoints_total_limit)
            written["checkpoints"].append(final)
            logger.info("step %d: saved %s", step, final)
        accelerator.wait_for_everyone()

    progress = TrainingProgress(args.max_train_steps, "SeeSR training", enabled=is_main, initial=global_step)
    meter = LossMeter()
    micro_losses: list[torch.Tensor] = []
    last_saved = last_validated = global_step if resume_dir is not None else -1
    started, started_step = time.perf_counter(), global_step
    done = global_step >= args.max_train_steps
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
                    batch["prompt_embeds"] = embed_prompts(batch["prompt"])
                    loss = seesr_training_loss(
                        batch, unet=sd2.unet, vae=sd2.vae, text_encoder=sd2.text_encoder, tokenizer=sd2.tokenizer,
                        controlnet=controlnet, injector=injector, noise_scheduler=sd2.noise_scheduler,
                        generator=loss_generator(args.seed, micro_step, accelerator),
                    )
                    backward_and_step(accelerator, loss, optimizer, trained_parameters, args.max_grad_norm)
            except torch.OutOfMemoryError as error:
                raise UserError(out_of_memory_message(
                    args.train_batch_size,
                    "; or add --gradient_checkpointing, use --mixed_precision fp16/bf16 or a smaller --resolution",
                )) from error
            micro_step += 1
            micro_losses.append(loss.detach())
            if not accelerator.sync_gradients:
                continue
            lr_scheduler.step()
            global_step += 1
            step_loss = torch.stack(micro_losses).mean()
            micro_losses = []
            meter.update(step_loss)
            progress.update(step_loss, lr_scheduler.get_last_lr()[0])
            done = global_step >= args.max_train_steps
            if global_step % args.logging_steps == 0 or done:
                mean_loss = float(accelerator.reduce(meter.total / meter.count, "mean"))
                meter.reset()
                check_finite(mean_loss, global_step, ", or train with bf16 or fp32 instead of fp16")
                history.append([global_step, mean_loss])
                seconds = (time.perf_counter() - started) / max(1, global_step - started_step)
                logger.info("step %d/%d | loss %.4f | lr %.2e | %.2f s/step", global_step, args.max_train_steps,
                            mean_loss, lr_scheduler.get_last_lr()[0], seconds)
            if args.validation_steps and global_step % args.validation_steps == 0:
                validate(global_step)
                last_validated = global_step
            if global_step % args.checkpointing_steps == 0 or done:
                save_checkpoint(global_step, epoch, batches_in_epoch)
                last_saved = global_step
            if done:
                break
    progress.close()
    if last_saved != global_step:  # resumed at or past --max_train_steps
        save_checkpoint(global_step, epoch, 0)
    if args.validation_steps and last_validated != global_step:
        validate(global_step)
    if is_main and history:
        from utils.plots import plot_curves

        steps = [point[0] for point in history]
        plot_curves({"train loss (epsilon MSE)": [point[1] for point in history]}, output_dir / "loss_curve.png",
                    title=f"{output_dir.name}: steps {steps[0]}..{steps[-1]}, a point every {args.logging_steps}",
                    xlabel=f"logging interval ({args.logging_steps} optimiser steps)", log_y=True)
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
