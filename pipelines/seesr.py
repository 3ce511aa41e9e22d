"""``infer.py seesr``: SeeSR's ``test_seesr.py`` (every flag, same meaning) plus the timestep-adaptive injector.

Loading is ``models.seesr.SeeSRPipeline.from_pretrained`` (SeeSR's release folders or our checkpoints) and each image
goes through ``models.seesr.super_resolve_image``, the function train_seesr_timestep.py's validation calls; tags and
image embeddings come from RAM (+ DAPE) in ``models.ram``. This module checks the flags against the base model, finds
the checkpoint, builds each image's prompt as SeeSR does and writes the results as SeeSR lays them out
(``OUTPUT_DIR/sample00/<name>.png``). A base folder that is a turbo model (sd-turbo) runs SeeSR's
``test_seesr_turbo.py`` instead: its defaults, and the base folder's UNet with the checkpoint's image attentions.

Other front ends (a web app) call what ``run`` calls: :func:`load_pipeline` once, then :func:`super_resolve` per image.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

import torch

from utils.cli import add_device_flag, add_flag, add_precision_flags
from utils.errors import UserError
from utils.validators import (
    check_output_dir,
    fraction,
    guidance_scale,
    int_at_least,
    non_negative_float,
    non_negative_int,
    positive_int,
    seed,
    zero_or_at_least,
)


def add_parser(subparsers) -> None:
    from utils.cli import add_ram_arguments

    parser = subparsers.add_parser(
        "seesr",
        help="super-resolve images with SeeSR (a release folder or a train_seesr_timestep.py checkpoint, + injector)",
        description="SeeSR's test_seesr.py on Stable Diffusion 2 base: every flag of test_seesr.py with the same "
        "meaning, plus ours. --seesr_model_path is SeeSR's release folder (unet/ + controlnet/, image cross-attention "
        "fed by RAM/DAPE), a train_seesr_timestep.py checkpoint-<step>/ (controlnet/ [+ unet/] [+ multi_scale_injector/]; "
        "a run folder picks its newest) or a bare ControlNet folder. The injector and its timestep weights load from "
        "the checkpoint when present. Prompt per image, as SeeSR: '{tags}, {--prompt},' + --added_prompt; the tags and "
        "the image embeddings come from RAM (+ DAPE with --ram_ft_path) on the LR image. A model without image "
        "attention (our older checkpoints) needs no RAM: then the tags are RAM's when its weights are at --ram_path, "
        "else those of a <name>.txt beside the image, else none; the log says which. SeeSR-Turbo (test_seesr_turbo.py): "
        "when --pretrained_model_path is a turbo model (its scheduler config uses trailing timestep spacing, as "
        "sd-turbo's), the UNet is that folder's with only the image attentions of the checkpoint's unet/, and the "
        "defaults are test_seesr_turbo.py's (2 steps, guidance 1.0, latent overlap 32); otherwise the checkpoint's "
        "whole UNet and test_seesr.py's defaults; the log names the UNet used. Writes OUTPUT_DIR/sample00/<name>.png "
        "(sample00..sample<N-1> with --sample_times N), as SeeSR, at --upscale times the input size.",
    )
    parser.add_argument("--pretrained_model_path", required=True,
                        help="local diffusers Stable Diffusion 2 base folder (unet/ vae/ text_encoder/ tokenizer/ scheduler/)")
    parser.add_argument("--seesr_model_path", required=True,
                        help="SeeSR release folder (preset/models/seesr: unet/ + controlnet/), a checkpoint-<step>/ folder "
                        "(controlnet/ [+ unet/] [+ multi_scale_injector/]; a run folder picks its newest) or a ControlNet folder")
    parser.add_argument("--image_path", required=True, help="an LR image or a folder of LR images")
    parser.add_argument("--output_dir", default="results/seesr", help="folder the SR images go to (default results/seesr)")
    add_ram_arguments(parser)
    parser.add_argument("--prompt", default="",
                        help="text put after each image's tags: '{tags}, {prompt},' + added_prompt (default ''; "
                        "SeeSR's test_seesr.sh passes the word None, which then appears in the prompt, as there)")
    parser.add_argument("--added_prompt", default="clean, high-resolution, 8k",
                        help="appended to every prompt (default SeeSR's 'clean, high-resolution, 8k')")
    parser.add_argument("--negative_prompt", default="dotted, noise, blur, lowres, smooth",
                        help="classifier-free guidance's negative prompt (default SeeSR's)")
    parser.add_argument("--save_prompts", action="store_true",
                        help="write each image's prompt to OUTPUT_DIR/txt/<name>.txt, as test_seesr.py")
    parser.add_argument("--start_point", choices=("lr", "noise"), default="lr",
                        help="lr: start from the VAE latent of the upscaled LR noised to --start_steps (SeeSR's "
                        "'LR embedding', default); noise: from pure noise")
    parser.add_argument("--start_steps", type=non_negative_int, default=999,
                        help="with --start_point lr: the timestep the LR latent is noised to; scheduled steps above it "
                        "are skipped (default 999: SeeSR's computation, all 50 steps 981..1 run; SeeSR parses this "
                        "flag but never uses it, here it means what it says)")
    parser.add_argument("--lr_start_timestep", type=non_negative_int, default=None,
                        help="this repository's earlier name of --start_steps; when given it replaces --start_steps")
    add_flag(parser, "--num_inference_steps", "--steps", "--num_steps", type=positive_int, default=None, metavar="N",
             help="DDPM sampling steps, at most the training timesteps: 20, 50 or 100 (default 50, test_seesr.py's); "
             "with a turbo base 1-4 (default 2, test_seesr_turbo.py's); 4 or fewer on a base that is not a turbo "
             "model are refused")
    parser.add_argument("--guidance_scale", type=guidance_scale, default=None,
                        help="classifier-free guidance, 3.0-8.0, at most 100; <= 1 turns it off (default 5.5; 5.0-6.0 suggested "
                        "with the injector; 1.0 with a turbo base, as test_seesr_turbo.py)")
    parser.add_argument("--conditioning_scale", type=non_negative_float, default=1.0,
                        help="ControlNet residual scale (default 1.0)")
    parser.add_argument("--blending_alpha", type=float, default=1.0,
                        help="accepted for test_seesr.py command lines and has no effect: SeeSR parses it and never "
                        "uses it")
    parser.add_argument("--control_schedule", choices=("constant", "window", "linear"), default="constant",
                        help="hand-set ControlNet scale over the steps, to compare with the learned w(t): constant "
                        "(default), window (diffusers' control_guidance_start/end), linear (SUPIR: linear in the noise level)")
    parser.add_argument("--control_guidance_start", type=fraction, default=0.0,
                        help="window: fraction of the steps after which the ControlNet starts acting (default 0.0)")
    parser.add_argument("--control_guidance_end", type=fraction, default=1.0,
                        help="window: fraction of the steps after which it stops (default 1.0)")
    parser.add_argument("--control_scale_start", type=non_negative_float, default=0.0,
                        help="linear: ControlNet scale at the highest noise level, reaching --conditioning_scale at "
                        "none (default 0.0, SUPIR's)")
    parser.add_argument("--process_size", type=int_at_least(8), default=512,
                        help="images whose short side times --upscale is below this are enlarged to it first (SeeSR's "
                        "rule, default 512); 256 halves the memory")
    parser.add_argument("--upscale", type=positive_int, default=4, help="super-resolution factor (default 4)")
    parser.add_argument("--seed", type=seed, default=None,
                        help="seed of each image's noise; every image restarts from it, so an image's result does not "
                        "depend on the others (default none: a random seed, printed so the run can be repeated)")
    parser.add_argument("--sample_times", type=positive_int, default=1,
                        help="samples per image, drawn one after another from the image's generator, written to "
                        "OUTPUT_DIR/sample00/<name>.png .. sample<N-1>/<name>.png as SeeSR (default 1: sample00/ only)")
    parser.add_argument("--align_method", choices=("adain", "wavelet", "nofix"), default="adain",
                        help="colour fix against the upscaled LR after decoding (default adain, SeeSR's)")
    parser.add_argument("--latent_tiled_size", type=positive_int, default=96,
                        help="latent tile side (latent px = image px / 8): a latent of larger area is denoised in "
                        "overlapping Gaussian-weighted square tiles of side min(this, its short side), as SeeSR (default "
                        "96; try 64 on 12 GB GPUs)")
    parser.add_argument("--latent_tiled_overlap", type=non_negative_int, default=None,
                        help="latent pixels shared by tiles, less than --latent_tiled_size (default 4, test_seesr.py's; "
                        "32 with a turbo base, test_seesr_turbo.py's)")
    parser.add_argument("--vae_encoder_tiled_size", type=zero_or_at_least(64), default=1024,
                        help="VAE encoder tile in image px, at least 64 (8 latent px), 0 turns tiling off (default 1024)")
    parser.add_argument("--vae_decoder_tiled_size", type=zero_or_at_least(8), default=224,
                        help="VAE decoder tile in latent px, at least 8, 0 turns tiling off (default 224; try 128 on 12 GB GPUs)")
    add_device_flag(parser)
    add_precision_flags(parser, "auto", "network weights' precision: auto is fp16 on CUDA (SeeSR's default; bf16 and "
                        "fp32 (no) on request) and fp32 on CPU")


# test_seesr.py's and test_seesr_turbo.py's defaults of the flags they set differently; the base folder decides.
SEESR_DEFAULTS = {"num_inference_steps": 50, "guidance_scale": 5.5, "latent_tiled_overlap": 4}
TURBO_DEFAULTS = {"num_inference_steps": 2, "guidance_scale": 1.0, "latent_tiled_overlap": 32}
# SeeSR-Turbo's regime (its README shows 2 and 4 steps); a DDPM run this short on SD2-base's UNet ends unfinished.
TURBO_MAX_STEPS = 4


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """A copy of ``args`` with the defaults that depend on the base folder filled in (test_seesr.py's, or
    test_seesr_turbo.py's when it is a turbo model: ``settings.turbo``), every flag checked before anything loads."""
    from models.seesr import check_sd2_folder, is_turbo_base

    settings = argparse.Namespace(**vars(args))
    settings.turbo = is_turbo_base(check_sd2_folder(args.pretrained_model_path))
    for key, value in (TURBO_DEFAULTS if settings.turbo else SEESR_DEFAULTS).items():
        if getattr(settings, key, None) is None:
            setattr(settings, key, value)
    _check_flags(settings)
    return settings


def _check_flags(args: argparse.Namespace) -> None:
    """Flags that cannot work, each refused in one sentence before anything loads."""
    import json

    from models.seesr import check_sd2_folder

    # Single numbers are checked while parsing (utils/validators.py); here what needs another flag or the model.
    if getattr(args, "output_dir", None):  # a front end that writes no files may leave it unset
        check_output_dir(args.output_dir)
    if args.control_schedule == "window" and args.control_guidance_start >= args.control_guidance_end:
        raise UserError(f"--control_guidance_start {args.control_guidance_start:g} must be below --control_guidance_end "
                        f"{args.control_guidance_end:g}: the window would never let the ControlNet act.")
    if args.latent_tiled_overlap >= args.latent_tiled_size:
        raise UserError(f"--latent_tiled_overlap {args.latent_tiled_overlap} must be smaller than --latent_tiled_size "
                        f"{args.latent_tiled_size}.")
    sd2 = check_sd2_folder(args.pretrained_model_path)
    if not args.turbo and args.num_inference_steps <= TURBO_MAX_STEPS:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} is SeeSR-Turbo's regime, but --pretrained_model_path "
                        f"{sd2} is not a turbo model (its scheduler does not use trailing timestep spacing), so its UNet "
                        f"needs more than {TURBO_MAX_STEPS} steps; pass sd-turbo's folder, or 20-50 steps (SeeSR: 50).")
    schedule = json.loads((sd2 / "scheduler/scheduler_config.json").read_text())
    last = int(schedule.get("num_train_timesteps", 1000)) - 1
    if args.num_inference_steps > last + 1:
        raise UserError(f"--num_inference_steps {args.num_inference_steps} is more than the {last + 1} training timesteps "
                        "of --pretrained_model_path; use at most that many (SeeSR: 50).")
    for flag in ("start_steps", "lr_start_timestep"):
        value = getattr(args, flag)
        if value is not None and not 0 <= value <= last:
            raise UserError(f"--{flag} {value} is beyond the noise schedule of --pretrained_model_path, whose timesteps "
                            f"run 0..{last}; give a value in that range (SeeSR: 999).")


def _model_folder(args: argparse.Namespace) -> Path:
    """``--seesr_model_path`` as a folder to load: a run folder becomes its newest checkpoint; files are refused."""
    from utils.errors import CheckpointError

    checkpoint = Path(args.seesr_model_path)
    if checkpoint.is_file():
        raise CheckpointError(
            f"--seesr_model_path {checkpoint} is a file (a .pt/.pth checkpoint of another model, such as a DDPM); "
            "SeeSR needs a folder: SeeSR's release (unet/ + controlnet/) or a train_seesr_timestep.py checkpoint-<step>/."
        )
    if not checkpoint.is_dir():
        raise CheckpointError(f"--seesr_model_path {checkpoint} does not exist; pass SeeSR's release folder "
                              "(unet/ + controlnet/) or a checkpoint-<step> folder.")
    if not (checkpoint / "controlnet").is_dir() and not (checkpoint / "config.json").is_file():
        numbered = [p for p in checkpoint.glob("checkpoint-*") if p.is_dir() and p.name[11:].isdigit()]
        if numbered:  # a run folder: take its newest checkpoint
            checkpoint = max(numbered, key=lambda p: int(p.name[11:]))
            print(f"{args.seesr_model_path} is a run folder: using its newest checkpoint {checkpoint.name}")
    return checkpoint


def _check_cross_attention_width(checkpoint: Path, pretrained_model_path: str) -> None:
    """A ControlNet (or UNet) built on another base model is refused by name before loading (SD 1.x: 768, SD2: 1024)."""
    import json

    from utils.errors import CheckpointError

    base = json.loads((Path(pretrained_model_path) / "unet/config.json").read_text()).get("cross_attention_dim")
    for config in (checkpoint / "controlnet/config.json", checkpoint / "config.json", checkpoint / "unet/config.json"):
        if not config.is_file():
            continue
        width = json.loads(config.read_text()).get("cross_attention_dim")
        if width is not None and base is not None and width != base:
            raise CheckpointError(
                f"{config.parent} was built for text embeddings of width {width}, but --pretrained_model_path's UNet "
                f"reads width {base} (SD 1.x: 768, SD2: 1024); pass the base model it was trained on, or a SeeSR "
                "checkpoint made for this one."
            )


def _input_images(image_path: Path) -> list[Path]:
    from utils.errors import DataError
    from utils.images import list_images

    if image_path.is_dir():
        images = list_images(image_path, recursive=False)
        if not images:
            raise DataError(f"--image_path {image_path} holds no images.")
        return images
    if image_path.is_file():
        return [image_path]
    raise DataError(f"--image_path {image_path} does not exist; pass an LR image or a folder of them.")


def seesr_dtypes(mixed_precision: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(network weights' dtype, RAM's dtype). The weights are cast, not autocast, as SeeSR runs; ``auto`` is SeeSR's
    fp16 on CUDA and fp32 on the CPU. RAM always runs in fp32, as in SeeSR: its tags are hard thresholds per class,
    and fp16 flips those near a threshold, which changes the prompt."""
    from utils.accelerator import PRECISION_DTYPES

    if mixed_precision in ("fp16", "bf16") and device.type != "cuda":
        raise UserError(f"--mixed_precision {mixed_precision} needs a CUDA GPU; use auto or no on the CPU.")
    if mixed_precision == "auto":
        return (torch.float16 if device.type == "cuda" else torch.float32), torch.float32
    return PRECISION_DTYPES.get(mixed_precision, torch.float32), torch.float32


@dataclass
class SeeSRInference:
    """What ``infer.py seesr`` loads once and uses for every image (:func:`load_pipeline`)."""

    pipeline: object  # models.seesr.SeeSRPipeline
    tagger: object | None  # models.ram.RAMTagger, or None: tags from <name>.txt files
    image_attention: bool  # the models read RAM's image embeddings
    settings: argparse.Namespace  # the flags with the base folder's defaults filled in (resolve_settings)
    checkpoint: Path
    device: torch.device
    messages: list[str] = field(default_factory=list)


@dataclass
class SuperResolution:
    """One input image's results: ``--sample_times`` PIL images at ``--upscale`` times its size, and its prompt."""

    images: list
    prompt: str


def load_pipeline(args: argparse.Namespace) -> SeeSRInference:
    """Check the flags, then load the pipeline and the tagger as ``infer.py seesr`` does (``args``: its parsed flags;
    ``--image_path`` is not read here, ``--output_dir`` only checked when set). The log lines are in ``.messages``."""
    from models.seesr import SeeSRPipeline
    from utils.accelerator import resolve_device

    settings = resolve_settings(args)
    checkpoint = _model_folder(settings)
    _check_cross_attention_width(checkpoint, settings.pretrained_model_path)
    device = resolve_device(settings.device)
    dtype, ram_dtype = seesr_dtypes(settings.mixed_precision, device)
    pipeline, messages = SeeSRPipeline.from_pretrained(
        settings.pretrained_model_path, checkpoint, device, dtype, turbo=settings.turbo
    )
    # Tags: RAM (+ DAPE) whenever the model has image attention (it needs RAM's embeddings), else when RAM's weights
    # are where --ram_path says; otherwise a <name>.txt beside each image.
    image_attention = any(getattr(model.config, "use_image_cross_attention", False)
                          for model in (pipeline.unet, pipeline.controlnet))
    tagger = None
    if image_attention or Path(settings.ram_path).is_file():
        from models.ram import load_ram_tagger

        tagger = load_ram_tagger(settings.ram_path, settings.ram_ft_path, settings.ram_tag_list,
                                 settings.ram_tag_thresholds, device=device, dtype=ram_dtype)
        source = f"RAM ({settings.ram_path}" + (f" + DAPE {settings.ram_ft_path})" if settings.ram_ft_path else ", no DAPE)")
        messages.append(f"tags: {source}" + (", image embeddings to the image cross-attention" if image_attention else ""))
    else:
        if settings.ram_ft_path:
            raise UserError(f"--ram_ft_path {settings.ram_ft_path} needs RAM's weights, but --ram_path {settings.ram_path} "
                            "does not exist; pass --ram_path ram_swin_large_14m.pth.")
        messages.append(f"tags: <name>.txt beside each image (the model has no image attention and there is no RAM at "
                        f"{settings.ram_path})")
    return SeeSRInference(pipeline, tagger, image_attention, settings, checkpoint, device, messages)


def super_resolve(
    inference: SeeSRInference, image, seed: int, tags: str | None = None, progress_bar: bool = False
) -> SuperResolution:
    """Super-resolve one LR image (a PIL image or a ``[3, h, w]`` tensor in [0, 1]) as ``infer.py seesr`` does: its
    ``--sample_times`` results (PIL, what infer.py writes) drawn from one generator seeded with ``seed``, and the
    prompt. ``tags``: used when there is no tagger (None: no tags); with a tagger, RAM's tags of ``image``."""
    from models.seesr import encode_prompts, super_resolve_image
    from utils.images import pil_to_tensor, tensor_to_pil

    settings, pipeline, device = inference.settings, inference.pipeline, inference.device
    lr = image if isinstance(image, torch.Tensor) else pil_to_tensor(image.convert("RGB"), (0.0, 1.0))
    image_embeds = None
    if inference.tagger is not None:
        found, embeds = inference.tagger(lr[None].to(device))
        tags = found[0]
        image_embeds = embeds if inference.image_attention else None
    prompt = f"{tags or ''}, {settings.prompt}," + settings.added_prompt  # test_seesr.py's string, character for character
    prompt_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt], device)
    generator = torch.Generator().manual_seed(seed)
    results = []
    for _ in range(settings.sample_times):
        result = super_resolve_image(
            pipeline, lr, upscale=settings.upscale, process_size=settings.process_size,
            prompt_embeds=prompt_embeds, negative_prompt=settings.negative_prompt,
            image_embeds=image_embeds, num_inference_steps=settings.num_inference_steps,
            guidance_scale=settings.guidance_scale, conditioning_scale=settings.conditioning_scale,
            start_point=settings.start_point,
            start_steps=settings.start_steps if settings.lr_start_timestep is None else settings.lr_start_timestep,
            latent_tiled_size=settings.latent_tiled_size, latent_tiled_overlap=settings.latent_tiled_overlap,
            vae_encoder_tiled_size=settings.vae_encoder_tiled_size or None,
            vae_decoder_tiled_size=settings.vae_decoder_tiled_size or None, align_method=settings.align_method,
            control_schedule=settings.control_schedule, control_guidance_start=settings.control_guidance_start,
            control_guidance_end=settings.control_guidance_end, control_scale_start=settings.control_scale_start,
            generator=generator, progress_bar=progress_bar,
        )
        results.append(tensor_to_pil(result, (0.0, 1.0)))
    return SuperResolution(results, prompt)


def sample_folders(output_dir: str | Path, sample_times: int) -> list[Path]:
    """SeeSR's output folders: ``OUTPUT_DIR/sample00`` .. ``sample<N-1>``, one per draw, even for one."""
    return [Path(output_dir) / f"sample{index:02d}" for index in range(sample_times)]


def run(args: argparse.Namespace) -> dict:
    import random

    from tqdm.auto import tqdm

    from data.sr_pairs import load_image_tensor, read_tag_prompt
    from utils.errors import DataError
    from utils.log import interactive_output

    images = _input_images(Path(args.image_path))
    inference = load_pipeline(args)
    settings = inference.settings
    for message in inference.messages:
        print(message)
    seed = settings.seed if settings.seed is not None else random.SystemRandom().randrange(2**31)
    if settings.seed is None:
        print(f"seed: {seed} (random; pass --seed {seed} to repeat this run)")
    output_dir = Path(settings.output_dir)
    sample_dirs = sample_folders(output_dir, settings.sample_times)
    for folder in sample_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    if settings.save_prompts:
        (output_dir / "txt").mkdir(parents=True, exist_ok=True)
    written, skipped, prompts = [], [], {}
    # Bars only in a terminal: in a notebook's or a log file's output they would pile up as carriage-return lines.
    bars = interactive_output()
    for path in tqdm(images, desc=f"SeeSR x{settings.upscale}", disable=len(images) == 1 or not bars, dynamic_ncols=True):
        try:
            lr = load_image_tensor(path)
        except DataError as error:
            if len(images) == 1:
                raise
            print(f"warning: skipped {path}: not a readable image; the other images are processed ({error})")
            skipped.append(path)
            continue
        tags = read_tag_prompt(path) if inference.tagger is None else None
        result = super_resolve(inference, lr, seed, tags=tags, progress_bar=bars)
        prompts[path.stem] = result.prompt
        print(result.prompt)
        if settings.save_prompts:
            (output_dir / "txt" / f"{path.stem}.txt").write_text(result.prompt)
        for folder, picture in zip(sample_dirs, result.images):
            target = folder / f"{path.stem}.png"
            picture.save(target)
            written.append(target)
    if len(skipped) == len(images):
        raise DataError(f"--image_path {args.image_path}: none of its {len(images)} images could be read.")
    print(f"wrote {len(written)} image(s) to {output_dir}" + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return {"written": written, "messages": inference.messages, "checkpoint": inference.checkpoint, "skipped": skipped,
            "prompts": prompts, "seed": seed, "tagger": inference.tagger is not None, "turbo": settings.turbo}
