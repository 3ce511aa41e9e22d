"""One entry point for inference of every model family: ``python infer.py {ddpm,...} [flags]``.

Each subcommand loads a checkpoint that carries its own configuration (no training flags needed) and calls the
same sampling or enhancement function the training loop uses for its previews.

    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --samples 16
    python infer.py ddpm --model checkpoints/cifar10_64x64/ddpm_best.pt --interpolate
    python infer.py ddpm --compare checkpoints/cifar10_32x32/ddpm_best.pt checkpoints/cifar10_64x64/ddpm_best.pt
    python infer.py ddpm --model path/to/ddpm-cifar10-32        # a diffusers folder (UNet2DModel + scheduler)
    python infer.py phaseformer --checkpoint checkpoint/LSUI/netG_model_best.pth --input LSUI/test/input \
        --output_dir enhanced --gt_dir LSUI/test/gt
    python infer.py user --dit_checkpoint trained_models/checkpoints/best.ckpt --vavae_path vavae-imagenet256-f16d32-dinov2.pt \
        --output_dir generated_images --user_ids 1 2 3 4 5 --num_samples_per_user 4 --guidance_scale 4.0 --num_steps 250
    python infer.py seesr --pretrained_model_path preset/models/stable-diffusion-2-base --prompt '' \
        --seesr_model_path experience/timestep_multiscale/checkpoint-100000 --image_path LR --output_dir results/x

Run ``python infer.py <subcommand> --help`` for the flags of one family.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from utils.config import one_line_errors
from utils.errors import UserError, run_cli
from utils.validators import fraction, int_at_least, non_negative_float, non_negative_int, positive_float, positive_int, seed


# ------------------------------------------------------------------------------------------ shared vocabulary
# One name per setting in every subcommand, diffusers' where it has one: --num_inference_steps, --mixed_precision
# no|fp16|bf16|auto (autocast while sampling), --device auto|cuda|cpu, --seed, --output_dir, --batch_size. A
# subcommand's older spelling stays as an alias: an extra option string of the same flag (--steps, --num_steps), or a
# flag of its own that writes the house value (--no-amp is --mixed_precision no). Numbers are checked while parsing
# (utils/validators.py); what needs a loaded checkpoint or an image is checked before anything is sampled or written.
def add_flag(parser, name: str, *aliases: str, help: str, **kwargs) -> argparse.Action:  # noqa: A002 - argparse's word
    """``name`` with the older spellings ``aliases`` as extra option strings of the same flag, listed in --help."""
    if aliases:
        help = f"{help} [alias: {', '.join(aliases)}]"
    return parser.add_argument(name, *aliases, help=help.replace("%", "%%"), **kwargs)


def add_precision_flags(parser, default: str, help: str, *, no_amp: bool = False, amp: bool = False, precision: bool = False) -> None:  # noqa: A002
    """``--mixed_precision no|fp16|bf16|auto`` and this subcommand's older spellings of it."""
    from utils.accelerator import PRECISION_CHOICES
    from utils.cli import precision_value

    parser.add_argument("--mixed_precision", type=precision_value, choices=PRECISION_CHOICES, default=default,
                        metavar="{no,fp16,bf16,auto}", help=f"{help} (default {default})")
    if no_amp:
        parser.add_argument("--no-amp", dest="mixed_precision", action="store_const", const="no",
                            help="alias of --mixed_precision no: sample in fp32")
    if amp:
        parser.add_argument("--amp", dest="mixed_precision", action="store_const", const="auto",
                            help="alias of --mixed_precision auto: bf16 autocast where the GPU supports it, else fp16")
    if precision:
        parser.add_argument("--precision", dest="mixed_precision", type=precision_value, metavar="P",
                            help="alias of --mixed_precision: fp32 -> no, fp16, bf16, auto (Lightning's 32, 16-mixed, "
                            "bf16-mixed work too)")


def add_device_flag(parser) -> None:
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto (GPU if present)")


def autocast_dtype(mixed_precision: str, device: torch.device) -> torch.dtype | None:
    """``--mixed_precision`` -> the autocast dtype on ``device`` (None: fp32); a choice the device cannot run is an error."""
    if mixed_precision == "no":
        return None
    if device.type != "cuda":
        if mixed_precision == "fp16":
            raise UserError("--mixed_precision fp16 needs a CUDA GPU; use no, bf16 or auto on the CPU.")
        return torch.bfloat16 if mixed_precision == "bf16" else None
    if mixed_precision == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if mixed_precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise UserError(f"--mixed_precision bf16: {torch.cuda.get_device_name(device)} does not support bf16; use fp16 or auto.")
    return torch.bfloat16 if mixed_precision == "bf16" else torch.float16


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """``path`` as a folder to write into: an existing file there is an error (before any work is done)."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; pass a folder to write into.")
    return path


# ------------------------------------------------------------------------------------------------------- ddpm
def add_ddpm_parser(subparsers) -> None:
    from models.ddpm_sampling import DEFAULT_STEPS, SAMPLERS, TIMESTEP_SPACINGS

    parser = subparsers.add_parser(
        "ddpm",
        help="sample, interpolate or compare pixel-space DDPM checkpoints",
        description="Sample from a train_ddpm_highres.py checkpoint (EMA weights) or a diffusers DDPM folder with "
        "models.ddpm_sampling.sample_ddpm, the function the training sample grids call.",
    )
    parser.add_argument("--model", help="our ddpm_*.pt checkpoint, or a diffusers folder with a UNet2DModel and "
                        "scheduler_config.json (e.g. google/ddpm-cifar10-32 downloaded beforehand)")
    parser.add_argument("--compare", nargs="+", metavar="CKPT", default=None,
                        help="checkpoints to compare: one row each, same seed, shown at a common size (all are loaded and "
                        "checked before the first is sampled)")
    add_flag(parser, "--num_samples", "--samples", type=positive_int, default=None, metavar="N",
             help="images to generate (default 16; with --compare, images per checkpoint row, default 8)")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim",
                        help="ddim (deterministic at --eta 0, default), ddpm (ancestral, the paper's sampler), dpmsolver++ "
                        "or unipc (diffusers' multistep solvers: good images in 10-25 steps)")
    defaults = ", ".join(f"{steps} for {name}" for name, steps in DEFAULT_STEPS.items())
    add_flag(parser, "--num_inference_steps", "--steps", "--num_steps", type=positive_int, default=None, metavar="N",
             help=f"denoising steps, at most the model's training timesteps (default {defaults}); more steps, higher quality")
    parser.add_argument("--eta", type=fraction, default=None,
                        help="DDIM only: fresh noise mixed in at each step, 0 deterministic .. 1 as much as DDPM (default 0)")
    parser.add_argument("--timestep_spacing", choices=TIMESTEP_SPACINGS, default="trailing",
                        help="where the steps fall in the training timesteps. trailing (default) starts at t=999, the pure "
                        "noise the model learned to start from; leading (diffusers' DDIM default) starts at t=990 with 100 "
                        "steps, handing the model pure noise labelled as less noisy (Lin et al. 2024); linspace spreads them evenly")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the starting and per-step noise (default 0)")
    parser.add_argument("--output_dir", default=".", help="folder the PNG is written to (default: the current folder)")
    parser.add_argument("--output", default=None,
                        help="PNG file name inside --output_dir, or a path (default ddpm_samples.png, "
                        "ddpm_interpolation.png or ddpm_comparison.png)")
    parser.add_argument("--batch_size", type=positive_int, default=64, help="images denoised at once (default 64)")
    parser.add_argument("--interpolate", action="store_true",
                        help="one strip: spherical interpolation between two seeded noises, denoised with the same "
                        "per-step noise for every frame, so the strip varies only through its starting noise")
    parser.add_argument("--frames", type=int_at_least(2), default=None, help="images in the --interpolate strip (default 8)")
    add_device_flag(parser)
    add_precision_flags(parser, "auto", "autocast while sampling: auto is bf16 on GPUs that support it, else fp16; fp32 "
                        "(no) on the CPU", no_amp=True)


def _ddpm_output_path(args: argparse.Namespace) -> Path:
    from utils.images import IMAGE_EXTENSIONS

    default = "ddpm_comparison.png" if args.compare else "ddpm_interpolation.png" if args.interpolate else "ddpm_samples.png"
    output_dir = check_output_dir(args.output_dir)
    path = output_dir / (args.output or default)  # an absolute --output stays as given
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; pass a file name such as {default}.")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"--output {path} is not an image file name; end it in one of {', '.join(IMAGE_EXTENSIONS)}.")
    return path


def run_ddpm(args: argparse.Namespace) -> Path:
    from tqdm.auto import tqdm

    from models.ddpm_sampling import DEFAULT_STEPS, interpolation_noise, load_ddpm_for_sampling, sample_ddpm
    from utils.accelerator import resolve_device
    from utils.images import save_grid

    if bool(args.model) == bool(args.compare):
        raise UserError("infer.py ddpm needs --model CKPT or --compare CKPT [CKPT ...], one of the two.")
    if args.interpolate and args.compare:
        raise UserError("--interpolate and --compare are separate modes; give one of them.")
    if args.frames is not None and not args.interpolate:
        raise UserError("--frames sets the length of an --interpolate strip; add --interpolate or drop --frames.")
    if args.interpolate and args.num_samples is not None:
        raise UserError("--num_samples does not apply to --interpolate (the strip has --frames images); drop it.")
    if args.eta is not None and args.sampler != "ddim":
        raise UserError(f"--eta applies to --sampler ddim only ({args.sampler} has its own noise); drop it or use --sampler ddim.")
    output = _ddpm_output_path(args)
    steps = args.num_inference_steps or DEFAULT_STEPS[args.sampler]
    device = resolve_device(args.device)
    autocast = autocast_dtype(args.mixed_precision, device)

    models = []  # every checkpoint is loaded and checked against the flags before the first one is sampled
    for path in args.compare or [args.model]:
        unet, scheduler_config, description = load_ddpm_for_sampling(path)
        total = int(scheduler_config.get("num_train_timesteps", 1000))
        if steps > total:
            raise UserError(f"--num_inference_steps {steps} is more than the {total} timesteps {path} was trained with; use 1..{total}.")
        print(f"loaded {description}")
        models.append((path, unet, scheduler_config))

    def generate(unet, scheduler_config, count, noise=None, shared_step_noise=False):
        bar = lambda timesteps: tqdm(timesteps, desc=f"{args.sampler} {steps} steps", leave=False)  # noqa: E731
        return sample_ddpm(unet.to(device), scheduler_config, count, steps, args.sampler, args.seed, noise=noise,
                           batch_size=args.batch_size, autocast_dtype=autocast, progress=bar, eta=args.eta or 0.0,
                           timestep_spacing=args.timestep_spacing, shared_step_noise=shared_step_noise)

    if args.compare:
        per_row = args.num_samples or 8
        rows, labels = [], []
        for path, unet, scheduler_config in models:
            rows.extend(generate(unet, scheduler_config, per_row))
            labels.append(_checkpoint_label(path, unet.config.sample_size))
            unet.cpu()
        output = save_grid(rows, output, nrow=per_row, row_labels=labels)
    elif args.interpolate:
        _, unet, scheduler_config = models[0]
        frames = args.frames or 8
        noise = interpolation_noise(unet.config.in_channels, unet.config.sample_size, frames, args.seed)
        images = generate(unet, scheduler_config, frames, noise=noise, shared_step_noise=True)
        captions = [f"{a:.2f}" for a in torch.linspace(0, 1, frames).tolist()]
        output = save_grid(images, output, nrow=frames, captions=captions)
    else:
        _, unet, scheduler_config = models[0]
        count = args.num_samples or 16
        images = generate(unet, scheduler_config, count)
        output = save_grid(images, output, nrow=math.ceil(math.sqrt(count)))
    print(f"wrote {output}")
    return output


def _checkpoint_label(path: str, size: int) -> str:
    path = Path(path)
    name = f"{path.parent.name}/{path.stem}" if path.is_file() else path.name
    return f"{name} ({size} px)"


# ------------------------------------------------------------------------------------------------ phaseformer
MIN_TILE = 16  # the network pads to a multiple of 8; a tile must hold more than padding


def add_phaseformer_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "phaseformer",
        help="enhance underwater images with a Phaseformer checkpoint; PSNR/SSIM against ground truth",
        description="Enhance an image or a folder with a train_phaseformer.py checkpoint or official weights converted by "
        "scripts/convert_phaseformer.py; writes OUTPUT_DIR/L/<name>.png (input size) and OUTPUT_DIR/H/<name>.png (2x), "
        "and with --gt_dir a per-image metrics.csv and the mean PSNR/SSIM of L (BasicSR-equivalent).",
    )
    parser.add_argument("--checkpoint", required=True,
                        help="netG_model_*.pth from train_phaseformer.py, or a .safetensors from scripts/convert_phaseformer.py")
    parser.add_argument("--input", required=True, help="an image or a folder of images (any size)")
    parser.add_argument("--output_dir", required=True, help="where to write L/ and H/ (created)")
    parser.add_argument("--gt_dir", default=None, help="ground-truth folder, paired by file stem: score L and write metrics.csv")
    parser.add_argument("--outputs", choices=("L", "H", "both"), default="both",
                        help="L: input resolution, H: twice it, both (default both)")
    parser.add_argument("--tile", type=non_negative_int, default=0,
                        help=f"enhance images larger than N px in overlapping NxN tiles to save memory, N >= {MIN_TILE} "
                        "(default 0: whole image)")
    parser.add_argument("--tile_overlap", type=non_negative_int, default=None,
                        help="with --tile: pixels shared by neighbouring tiles, less than the tile (default 32, or tile/2 "
                        "for tiles of 64 px and less)")
    parser.add_argument("--resize", type=int_at_least(16), default=None,
                        help="resize inputs (and ground truth) to NxN first, e.g. 256 for the training evaluation protocol")
    parser.add_argument("--eca", choices=("feature", "phase"), default=None,
                        help="override the ECA gate recorded in the checkpoint (default: the checkpoint's)")
    parser.add_argument("--value_range", choices=("unit", "signed", "signed_reference"), default=None,
                        help="override the input range recorded in the checkpoint (default: the checkpoint's; [-1, 1] for "
                        "official weights)")
    parser.add_argument("--test_y_channel", action="store_true", help="with --gt_dir: score the BT.601 Y channel instead of RGB")
    parser.add_argument("--crop_border", type=non_negative_int, default=0,
                        help="with --gt_dir: pixels cropped from each border before scoring (default 0)")
    parser.add_argument("--split_file", default=None,
                        help="enhance only the 'test' images of this split list (split_*.txt in a training run folder)")
    add_device_flag(parser)
    add_precision_flags(parser, "no", "autocast of the convolutions on the GPU: no (fp32, the precision of the training "
                        "evaluation), auto (bf16 where supported, else fp16), fp16 or bf16", amp=True)


def run_phaseformer(args: argparse.Namespace) -> dict:
    from models.phaseformer_enhance import enhance_folder, load_phaseformer_for_inference
    from utils.accelerator import resolve_device
    from utils.metrics import SSIM_WINDOW_SIZE

    if args.tile and args.tile < MIN_TILE:
        raise UserError(f"--tile {args.tile} is too small; use 0 (whole images) or at least {MIN_TILE} px.")
    if args.tile_overlap is not None and not args.tile:
        raise UserError("--tile_overlap applies to tiled enhancement; add --tile N or drop --tile_overlap.")
    tile_overlap = args.tile_overlap if args.tile_overlap is not None else min(32, args.tile // 2)
    if args.tile and tile_overlap >= args.tile:
        raise UserError(f"--tile_overlap {tile_overlap} must be less than --tile {args.tile}.")
    if args.gt_dir is None and (args.crop_border or args.test_y_channel):
        raise UserError("--crop_border and --test_y_channel set how outputs are scored against ground truth; add --gt_dir or drop them.")
    if args.resize is not None and args.resize - 2 * args.crop_border < SSIM_WINDOW_SIZE:
        raise UserError(f"--crop_border {args.crop_border} leaves less than {SSIM_WINDOW_SIZE} px of a --resize {args.resize} "
                        f"image to score; use at most {(args.resize - SSIM_WINDOW_SIZE) // 2}.")
    check_output_dir(args.output_dir)
    device = resolve_device(args.device)
    autocast = autocast_dtype(args.mixed_precision, device)
    model, info = load_phaseformer_for_inference(args.checkpoint, eca=args.eca, value_range=args.value_range)
    print(f"loaded {info['description']}")
    report = enhance_folder(
        model.to(device), args.input, args.output_dir, value_range=info["value_range"], outputs=args.outputs,
        gt_dir=args.gt_dir, resize=args.resize, tile=args.tile, tile_overlap=tile_overlap, autocast_dtype=autocast,
        crop_border=args.crop_border, test_y_channel=args.test_y_channel, split_file=args.split_file,
    )
    print(f"wrote {len(report['written'])} images to {args.output_dir}")
    if report["metrics"]:
        channel = "Y" if args.test_y_channel else "RGB"
        print(f"mean over {len(report['metrics'])} images ({channel}, border {args.crop_border} px): "
              f"PSNR {report['mean_psnr']:.3f} dB, SSIM {report['mean_ssim']:.4f}; per image: {report['csv']}")
    return report


# ------------------------------------------------------------------------------------------------------ seesr


def add_seesr_parser(subparsers) -> None:
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
        "else those of a <name>.txt beside the image, else none; the log says which. Writes OUTPUT_DIR/<name>.png "
        "(with --sample_times N > 1, OUTPUT_DIR/sample00..NN/<name>.png as SeeSR) at --upscale times the input size.",
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
    add_flag(parser, "--num_inference_steps", "--steps", "--num_steps", type=positive_int, default=50, metavar="N",
             help="DDPM sampling steps, at most the training timesteps: 20, 50 or 100 (default 50, SeeSR's)")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=5.5,
                        help="classifier-free guidance, 3.0-8.0; <= 1 turns it off (default 5.5; 5.0-6.0 suggested "
                        "with the injector)")
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
                        help="samples per image, drawn one after another from the image's generator; N > 1 writes "
                        "OUTPUT_DIR/sample00..sample<N-1>/<name>.png as SeeSR (default 1: OUTPUT_DIR/<name>.png)")
    parser.add_argument("--align_method", choices=("adain", "wavelet", "nofix"), default="adain",
                        help="colour fix against the upscaled LR after decoding (default adain, SeeSR's)")
    parser.add_argument("--latent_tiled_size", type=positive_int, default=96,
                        help="latent tile side (latent px = image px / 8): larger latents are denoised in overlapping "
                        "Gaussian-weighted tiles (default 96; try 64 on 12 GB GPUs)")
    parser.add_argument("--latent_tiled_overlap", type=non_negative_int, default=4,
                        help="latent pixels shared by tiles, less than --latent_tiled_size (default 4)")
    parser.add_argument("--vae_encoder_tiled_size", type=non_negative_int, default=1024,
                        help="VAE encoder tile in image px, 0 turns tiling off (default 1024)")
    parser.add_argument("--vae_decoder_tiled_size", type=non_negative_int, default=224,
                        help="VAE decoder tile in latent px, 0 turns tiling off (default 224; try 128 on 12 GB GPUs)")
    add_device_flag(parser)
    add_precision_flags(parser, "auto", "network weights' precision: auto is fp16 on CUDA (SeeSR's default; bf16 and "
                        "fp32 (no) on request) and fp32 on CPU")


def _seesr_checks(args: argparse.Namespace) -> None:
    """Flags that cannot work, each refused in one sentence before anything loads."""
    import json

    from models.seesr import check_sd2_folder

    # Single numbers are checked while parsing (utils/validators.py); here what needs another flag or the model.
    check_output_dir(args.output_dir)
    if args.control_schedule == "window" and args.control_guidance_start >= args.control_guidance_end:
        raise UserError(f"--control_guidance_start {args.control_guidance_start:g} must be below --control_guidance_end "
                        f"{args.control_guidance_end:g}: the window would never let the ControlNet act.")
    if args.latent_tiled_overlap >= args.latent_tiled_size:
        raise UserError(f"--latent_tiled_overlap {args.latent_tiled_overlap} must be smaller than --latent_tiled_size "
                        f"{args.latent_tiled_size}.")
    sd2 = check_sd2_folder(args.pretrained_model_path)
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


def _seesr_model_folder(args: argparse.Namespace) -> Path:
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


def _seesr_images(image_path: Path) -> list[Path]:
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


def run_seesr(args: argparse.Namespace) -> dict:
    import random

    from tqdm.auto import tqdm

    from data.sr_pairs import load_image_tensor, read_tag_prompt
    from models.seesr import SeeSRPipeline, encode_prompts, super_resolve_image
    from utils.accelerator import resolve_device
    from utils.errors import DataError
    from utils.images import tensor_to_pil
    from utils.log import interactive_output

    images = _seesr_images(Path(args.image_path))
    _seesr_checks(args)
    checkpoint = _seesr_model_folder(args)
    _check_cross_attention_width(checkpoint, args.pretrained_model_path)
    device = resolve_device(args.device)
    if args.mixed_precision in ("fp16", "bf16") and device.type != "cuda":
        raise UserError(f"--mixed_precision {args.mixed_precision} needs a CUDA GPU; use auto or no on the CPU.")
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}.get(
        args.mixed_precision, torch.float16 if device.type == "cuda" else torch.float32)
    pipeline, messages = SeeSRPipeline.from_pretrained(args.pretrained_model_path, checkpoint, device, dtype)
    for message in messages:
        print(message)

    # Tags: RAM (+ DAPE) whenever the model has image attention (it needs RAM's embeddings), else when RAM's weights
    # are where --ram_path says; otherwise a <name>.txt beside each image.
    image_attention = any(getattr(model.config, "use_image_cross_attention", False)
                          for model in (pipeline.unet, pipeline.controlnet))
    tagger = None
    if image_attention or Path(args.ram_path).is_file():
        from models.ram import load_ram_tagger

        tagger = load_ram_tagger(args.ram_path, args.ram_ft_path, args.ram_tag_list, args.ram_tag_thresholds,
                                 device=device, dtype=dtype)
        source = f"RAM ({args.ram_path}" + (f" + DAPE {args.ram_ft_path})" if args.ram_ft_path else ", no DAPE)")
        print(f"tags: {source}" + (", image embeddings to the image cross-attention" if image_attention else ""))
    else:
        if args.ram_ft_path:
            raise UserError(f"--ram_ft_path {args.ram_ft_path} needs RAM's weights, but --ram_path {args.ram_path} "
                            "does not exist; pass --ram_path ram_swin_large_14m.pth.")
        print(f"tags: <name>.txt beside each image (the model has no image attention and there is no RAM at {args.ram_path})")

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    if args.seed is None:
        print(f"seed: {seed} (random; pass --seed {seed} to repeat this run)")
    output_dir = Path(args.output_dir)
    sample_dirs = [output_dir] if args.sample_times == 1 else [
        output_dir / f"sample{index:02d}" for index in range(args.sample_times)]
    for folder in sample_dirs:
        folder.mkdir(parents=True, exist_ok=True)
    if args.save_prompts:
        (output_dir / "txt").mkdir(parents=True, exist_ok=True)
    written, skipped, prompts = [], [], {}
    # Bars only in a terminal: in a notebook's or a log file's output they would pile up as carriage-return lines.
    bars = interactive_output()
    for path in tqdm(images, desc=f"SeeSR x{args.upscale}", disable=len(images) == 1 or not bars, dynamic_ncols=True):
        try:
            lr = load_image_tensor(path)
        except DataError as error:
            if len(images) == 1:
                raise
            print(f"warning: skipped {path}: not a readable image; the other images are processed ({error})")
            skipped.append(path)
            continue
        image_embeds = None
        if tagger is not None:
            tags, embeds = tagger(lr[None].to(device))
            tags = tags[0]
            image_embeds = embeds if image_attention else None
        else:
            tags = read_tag_prompt(path)
        prompt = f"{tags}, {args.prompt}," + args.added_prompt  # test_seesr.py's string, character for character
        prompts[path.stem] = prompt
        print(prompt)
        if args.save_prompts:
            (output_dir / "txt" / f"{path.stem}.txt").write_text(prompt)
        prompt_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [prompt], device)
        generator = torch.Generator().manual_seed(seed)
        for folder in sample_dirs:
            result = super_resolve_image(
                pipeline, lr, upscale=args.upscale, process_size=args.process_size,
                prompt_embeds=prompt_embeds, negative_prompt=args.negative_prompt,
                image_embeds=image_embeds, num_inference_steps=args.num_inference_steps,
                guidance_scale=args.guidance_scale, conditioning_scale=args.conditioning_scale,
                start_point=args.start_point,
                start_steps=args.start_steps if args.lr_start_timestep is None else args.lr_start_timestep,
                latent_tiled_size=args.latent_tiled_size, latent_tiled_overlap=args.latent_tiled_overlap,
                vae_encoder_tiled_size=args.vae_encoder_tiled_size or None,
                vae_decoder_tiled_size=args.vae_decoder_tiled_size or None, align_method=args.align_method,
                control_schedule=args.control_schedule, control_guidance_start=args.control_guidance_start,
                control_guidance_end=args.control_guidance_end, control_scale_start=args.control_scale_start,
                generator=generator, progress_bar=bars,
            )
            target = folder / f"{path.stem}.png"
            tensor_to_pil(result, (0.0, 1.0)).save(target)
            written.append(target)
    if len(skipped) == len(images):
        raise DataError(f"--image_path {args.image_path}: none of its {len(images)} images could be read.")
    print(f"wrote {len(written)} image(s) to {output_dir}" + (f"; skipped {len(skipped)} unreadable" if skipped else ""))
    return {"written": written, "messages": messages, "checkpoint": checkpoint, "skipped": skipped,
            "prompts": prompts, "seed": seed, "tagger": tagger is not None}


# ------------------------------------------------------------------------------------------------------- user
def add_user_parser(subparsers) -> None:
    # Choices written out (models.user_generation.FLOW_SAMPLERS/DDPM_SAMPLERS, models.vavae.VAVAE_CONFIGS,
    # models.user_pipeline.OUTPUT_LAYOUTS) so that building the parser imports no model code.
    parser = subparsers.add_parser(
        "user",
        help="generate spectrograms for chosen users from a train_dit_user.py checkpoint (DiT or latent UNet)",
        description="Generate images for user IDs 1..num_users with the training-time sampler: the checkpoint carries its "
        "backbone, configuration, EMA weights, latent statistics and sampling defaults; flags override the defaults. "
        "Writes micro_doppler_userXX_NNN.png, user_XX/generated_NNN.png, micro_doppler_grid.png (a row per user) and "
        "manifest.json. The UNet note's flags work too: --unet_path (a checkpoint, or a diffusers UNet folder with "
        "--condition_encoder_path and --num_users), and the aliases --vae_path, --num_images_per_user; the DiT note's "
        "--num_steps and --precision are aliases of --num_inference_steps and --mixed_precision.",
    )
    add_flag(parser, "--dit_checkpoint", "--checkpoint", dest="checkpoint", default=None, metavar="CKPT",
             help="checkpoints/best.ckpt or last.ckpt of train_dit_user.py (either backbone)")
    parser.add_argument("--unet_path", default=None,
                        help="a train_dit_user.py checkpoint of the UNet backbone, or a diffusers UNet2DConditionModel folder "
                        "(then also --num_users, and --condition_encoder_path / --latent_stats unless inside the folder)")
    parser.add_argument("--condition_encoder_path", default=None,
                        help="with a UNet folder: condition_encoder.pt (a UserConditionEncoder state dict with num_users + 1 rows)")
    parser.add_argument("--latent_stats", default=None, help="with a UNet folder: the latents_stats.safetensors it was trained with")
    parser.add_argument("--num_users", type=positive_int, default=None,
                        help="users the model knows; read from a checkpoint (a different value is an error), required with a UNet folder")
    add_flag(parser, "--vavae_path", "--vae_path", default=None, metavar="PATH",
             help="the VA-VAE the latents were extracted with (its fingerprint must match the checkpoint's statistics)")
    parser.add_argument("--vavae_config", choices=("f16d32", "tiny"), default="f16d32",
                        help="architecture of a .pt VA-VAE (default f16d32)")
    parser.add_argument("--output_dir", default="generated_images", help="where images, grid and manifest go (default ./generated_images)")
    parser.add_argument("--user_ids", type=int, nargs="+", default=None,  # the range comes from the checkpoint
                        help="user IDs 1..num_users to generate, each once (default: all)")
    add_flag(parser, "--num_samples_per_user", "--num_images_per_user", type=positive_int, default=4, metavar="N",
             help="images per user (default 4)")
    parser.add_argument("--start_index", type=non_negative_int, default=0,
                        help="index of each user's first sample: continue a set without repeating it (default 0)")
    parser.add_argument("--guidance_scale", type=non_negative_float, default=None,
                        help="classifier-free guidance, 1 = none (default: the checkpoint's, 4.0)")
    parser.add_argument("--guidance_interval", type=fraction, nargs=2, default=None, metavar=("START", "END"),
                        help="flow times where guidance acts, 0 noise .. 1 data, START <= END (default: the checkpoint's; DiT 0.11 1.0)")
    parser.add_argument("--guidance_channels", type=positive_int, default=None,
                        help="guide only the first N latent channels (the reference's 3-channel behaviour; default all)")
    add_flag(parser, "--num_inference_steps", "--num_steps", "--steps", type=positive_int, default=None, metavar="N",
             help="sampler updates (default: the checkpoint's, 250 for the DiT, 50 for the UNet; at most the UNet's "
             "training timesteps)")
    parser.add_argument("--sampler", choices=("euler", "heun", "ddim"), default=None,
                        help="DiT: euler or heun; UNet: ddim (default: the checkpoint's)")
    parser.add_argument("--shift", type=positive_float, default=None,
                        help="DiT timestep shift, LightningDiT's convention (default: the checkpoint's, 0.3)")
    parser.add_argument("--eta", type=fraction, default=None, help="UNet DDIM eta, 0 = deterministic .. 1 (default 0)")
    parser.add_argument("--seed", type=seed, default=None,
                        help="run seed; sample (seed, user, index) is the same whatever else is generated (default: the "
                        "training seed, so the training previews are reproduced)")
    parser.add_argument("--batch_size", type=positive_int, default=64,
                        help="samples generated and decoded at once (default 64, as the previews)")
    add_device_flag(parser)
    add_precision_flags(parser, "auto", "autocast while sampling: auto is the previews' precision on a GPU and fp32 on "
                        "the CPU", precision=True)
    parser.add_argument("--no_ema", action="store_true", help="sample with the raw weights instead of the EMA weights")
    parser.add_argument("--layout", choices=("both", "flat", "folders"), default="both",
                        help="both (default): micro_doppler_userXX_NNN.png and user_XX/generated_NNN.png; flat or folders: one of them")
    parser.add_argument("--save_latents", action="store_true",
                        help="also write generated_latents.safetensors (VA-VAE scale, LightningDiT tensor names)")


def run_user(args: argparse.Namespace) -> dict:
    import json

    from models.user_generation import validate_user_ids
    from models.user_pipeline import (
        check_vae_matches,
        generate_user_images,
        load_user_checkpoint,
        load_user_unet_folder,
        sampling_kwargs,
        save_user_grid,
        write_user_images,
    )
    from models.vavae import file_fingerprint, load_vavae
    from utils.accelerator import resolve_device
    from utils.checkpoint import atomic_save_safetensors, atomic_write_text
    from utils.errors import CheckpointError

    if bool(args.checkpoint) == bool(args.unet_path):
        raise UserError("infer.py user needs one model: --dit_checkpoint CKPT (either backbone) or --unet_path (checkpoint or "
                        "UNet folder).")
    source = Path(args.checkpoint or args.unet_path)
    if args.user_ids is not None and len(set(args.user_ids)) != len(args.user_ids):
        repeated = sorted({user for user in args.user_ids if args.user_ids.count(user) > 1})
        raise UserError(f"--user_ids lists {repeated[0]} more than once; give each user once and raise --num_samples_per_user instead.")
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance_interval {args.guidance_interval[0]:g} {args.guidance_interval[1]:g}: START must not be after END.")
    if not source.exists():
        flag = "--dit_checkpoint" if args.checkpoint else "--unet_path"
        raise CheckpointError(f"{flag} {source} does not exist; pass checkpoints/best.ckpt or last.ckpt of train_dit_user.py.")
    check_output_dir(args.output_dir)
    if source.is_dir():
        bundle = load_user_unet_folder(source, num_users=args.num_users, condition_encoder_path=args.condition_encoder_path,
                                       latent_stats_path=args.latent_stats)
    else:
        if args.condition_encoder_path or args.latent_stats:
            raise UserError(f"{source} is a checkpoint that carries its own condition encoder and latent statistics; drop "
                            "--condition_encoder_path/--latent_stats (they go with a diffusers UNet folder).")
        bundle = load_user_checkpoint(source, use_ema=not args.no_ema)
        if args.num_users is not None and args.num_users != bundle.num_users:
            raise UserError(f"--num_users {args.num_users} disagrees with the {bundle.num_users} users {source} was trained for; "
                            "drop the flag.")
    users = validate_user_ids(args.user_ids if args.user_ids is not None else range(1, bundle.num_users + 1), bundle.num_users)
    settings = dict(bundle.sampling)
    for key, flag in (("sampler", "sampler"), ("num_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                      ("shift", "shift"), ("guidance_channels", "guidance_channels"), ("eta", "eta")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.guidance_interval is not None:
        settings["guidance_interval"] = list(args.guidance_interval)
    _check_user_sampling(args, bundle, settings)
    seed = args.seed if args.seed is not None else int(bundle.checkpoint.get("preview", {}).get("seed", 0))
    if not args.vavae_path:
        raise UserError("--vavae_path is required: the model generates VA-VAE latents; pass the VA-VAE file the latents were "
                        "extracted with.")
    vae_fingerprint = check_vae_matches(bundle.stats, args.vavae_path)  # before the (large) VA-VAE is loaded
    device = resolve_device(args.device)
    precision = args.mixed_precision
    if precision == "auto" and device.type == "cuda":  # the previews' precision, recorded in the checkpoint
        preview = bundle.checkpoint.get("preview", {}).get("autocast")
        precision = preview if preview in ("bf16", "fp16") else "no"
    dtype = autocast_dtype(precision, device)
    precision = {torch.bfloat16: "bf16", torch.float16: "fp16", None: "fp32"}[dtype]  # as manifests record it
    vae = load_vavae(args.vavae_path, device=device, config=args.vavae_config)
    channels = bundle.stats.mean.shape[1]
    if vae.latent_channels != channels:
        raise UserError(f"The VA-VAE {args.vavae_path} has {vae.latent_channels} latent channels, the model {channels}; "
                        "check --vavae_config.")
    print(f"loaded {bundle.backbone} model from {source} ({bundle.weights} weights, {bundle.num_users} users); "
          f"users {users}, {args.num_samples_per_user} each, {settings['sampler']} {settings['num_steps']} steps, "
          f"guidance {settings['guidance_scale']}, seed {seed}, {device}")
    images, latents = generate_user_images(
        bundle.model.to(device), bundle.backbone, users, args.num_samples_per_user, stats=bundle.stats, vae=vae, seed=seed,
        batch_size=args.batch_size, first_index=args.start_index, device=device, autocast_dtype=dtype,
        noise_scheduler=bundle.noise_scheduler, progress=True, **sampling_kwargs(settings),
    )
    output_dir = Path(args.output_dir)
    records = write_user_images(images, users, args.num_samples_per_user, output_dir, first_index=args.start_index, layout=args.layout)
    grid = save_user_grid(images, users, args.num_samples_per_user, output_dir / "micro_doppler_grid.png")
    if args.save_latents:
        labels = torch.tensor([record["user_id"] - 1 for record in records])
        atomic_save_safetensors({"latents": latents, "labels": labels}, output_dir / "generated_latents.safetensors",
                                {"vae_fingerprint": vae_fingerprint, "labels": "user_id - 1", "seed": str(seed)})
    manifest = {
        "model": {"path": str(source), "fingerprint": file_fingerprint(source), "backbone": bundle.backbone, "weights": bundle.weights,
                  "num_users": bundle.num_users, "epoch": bundle.checkpoint.get("epoch"), "step": bundle.checkpoint.get("step")},
        "vae": {"path": str(args.vavae_path), "fingerprint": vae_fingerprint, "config": args.vavae_config},
        "seed": seed, "sampling": settings, "precision": precision, "device": str(device), "batch_size": args.batch_size,
        "user_ids": users, "num_samples_per_user": args.num_samples_per_user, "start_index": args.start_index,
        "grid": grid.name, "files": records,
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", output_dir / "manifest.json")
    print(f"wrote {len(records)} images, {grid} and manifest.json to {output_dir}")
    return {"output_dir": output_dir, "grid": grid, "files": records, "manifest": manifest, "latents": latents}


def _check_user_sampling(args: argparse.Namespace, bundle, settings: dict) -> None:
    """Flags that the loaded model cannot honour, refused before the VA-VAE loads or anything is sampled."""
    from models.user_generation import DDPM_SAMPLERS, FLOW_SAMPLERS

    allowed = FLOW_SAMPLERS if bundle.backbone == "dit" else DDPM_SAMPLERS
    if settings.get("sampler") not in (None, *allowed):
        raise UserError(f"--sampler {settings['sampler']}: the {bundle.backbone} backbone samples with {', '.join(allowed)}.")
    if bundle.backbone == "dit" and args.eta is not None:
        raise UserError("--eta applies to the UNet backbone's DDIM sampler; this DiT checkpoint samples an ODE, drop --eta.")
    if bundle.backbone == "unet" and args.shift is not None:
        raise UserError("--shift applies to the DiT backbone's flow sampler; this UNet checkpoint uses DDIM, drop --shift.")
    if bundle.backbone == "unet":
        total = int(bundle.noise_scheduler.config.num_train_timesteps)
        if int(settings["num_steps"]) > total:
            raise UserError(f"--num_inference_steps {settings['num_steps']} is more than the {total} timesteps the UNet was "
                            f"trained with; use 1..{total}.")
    channels = bundle.stats.mean.shape[1]
    if settings.get("guidance_channels") is not None and int(settings["guidance_channels"]) > channels:
        raise UserError(f"--guidance_channels {settings['guidance_channels']} is more than the model's {channels} latent "
                        "channels; drop the flag to guide all of them.")


# ------------------------------------------------------------------------------------------------ entry point
COMMANDS = {
    "ddpm": (add_ddpm_parser, run_ddpm),
    "phaseformer": (add_phaseformer_parser, run_phaseformer),
    "seesr": (add_seesr_parser, run_seesr),
    "user": (add_user_parser, run_user),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="{" + ",".join(COMMANDS) + "}")
    for add_parser, _ in COMMANDS.values():
        add_parser(subparsers)
    return one_line_errors(parser).parse_args(argv)


def main(args: argparse.Namespace):
    return COMMANDS[args.command][1](args)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
