"""``infer.py ddpm``: sample, interpolate or compare pixel-space DDPM checkpoints (ours or diffusers folders).

Sampling is ``models.ddpm_sampling.sample_ddpm``, the function the training sample grids call (DDIM, DDPM, DPM-Solver++,
UniPC through diffusers' schedulers); this module parses the flags, loads and checks every checkpoint before the first
is sampled, and writes the PNGs. ``--save_images`` also writes every sample as its own PNG in ``OUTPUT_DIR/samples/``
(the input of scripts/eval_generation.py's FID), in chunks of ``--batch_size`` with one seed per chunk, resumable: files
already there are kept and only the missing chunks are sampled, so an interrupted 50k run continues.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from utils.accelerator import autocast_dtype
from utils.cli import add_device_flag, add_flag, add_precision_flags
from utils.errors import UserError
from utils.validators import check_output_dir, fraction, int_at_least, positive_int, seed


def add_parser(subparsers) -> None:
    from models.ddpm_sampling import SAMPLERS, TIMESTEP_SPACINGS

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
    parser.add_argument("--sampler", choices=SAMPLERS.names(), default="dpmsolver++",
                        help="dpmsolver++ (default) or unipc: diffusers' multistep solvers, as accurate as DDIM-50 in 15-20 "
                        "steps (docs/benchmarks.md); ddim (deterministic at --eta 0), ddpm (ancestral, the paper's sampler)")
    defaults = ", ".join(f"{spec.default_steps} for {name}" for name, spec in SAMPLERS.items())
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
    parser.add_argument("--save_images", action="store_true",
                        help="also write each of the --num_samples images as OUTPUT_DIR/samples/<index>.png (for FID), "
                        "--batch_size at a time; run again to resume: existing files are kept (the grid shows the first 64)")
    parser.add_argument("--interpolate", action="store_true",
                        help="one strip: spherical interpolation between two seeded noises, denoised with the same "
                        "per-step noise for every frame, so the strip varies only through its starting noise")
    parser.add_argument("--frames", type=int_at_least(2), default=None, help="images in the --interpolate strip (default 8)")
    add_device_flag(parser)
    add_precision_flags(parser, "auto", "autocast while sampling: auto is bf16 on GPUs that support it, else fp16; fp32 "
                        "(no) on the CPU", no_amp=True)


def _output_path(args: argparse.Namespace) -> Path:
    from utils.images import IMAGE_EXTENSIONS

    default = "ddpm_comparison.png" if args.compare else "ddpm_interpolation.png" if args.interpolate else "ddpm_samples.png"
    output_dir = check_output_dir(args.output_dir)
    path = output_dir / (args.output or default)  # an absolute --output stays as given
    if path.is_dir():
        raise UserError(f"--output {path} is a folder; pass a file name such as {default}.")
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        raise UserError(f"--output {path} is not an image file name; end it in one of {', '.join(IMAGE_EXTENSIONS)}.")
    return path


def run(args: argparse.Namespace) -> Path:
    from models.ddpm_sampling import default_steps
    from utils.accelerator import resolve_device
    from utils.images import save_grid

    check_modes(args)
    output = _output_path(args)
    steps = args.num_inference_steps or default_steps(args.sampler)
    device = resolve_device(args.device)
    autocast = autocast_dtype(args.mixed_precision, device)  # a precision the device lacks is refused before loading
    models = load_models(args.compare or [args.model], steps)
    if args.save_images:
        path, unet, scheduler_config = models[0]
        count = args.num_samples or 16
        settings = {"model": str(Path(path).resolve()), "sampler": args.sampler, "num_inference_steps": steps, "eta": args.eta or 0.0,
                    "timestep_spacing": args.timestep_spacing, "seed": args.seed, "batch_size": args.batch_size}

        def generate_chunk(count, chunk_seed):
            from models.ddpm_sampling import sample_ddpm

            return sample_ddpm(unet.to(device), scheduler_config, count, steps, args.sampler, chunk_seed, batch_size=args.batch_size,
                               autocast_dtype=autocast, eta=args.eta or 0.0, timestep_spacing=args.timestep_spacing)

        files = save_samples(generate_chunk, output.parent / "samples", count, args.batch_size, args.seed, settings)
        from utils.images import load_rgb, pil_to_tensor

        first = [pil_to_tensor(load_rgb(file)) for file in files[:GRID_LIMIT]]
        output = save_grid(torch.stack(first), output, nrow=math.ceil(math.sqrt(len(first))))
        print(f"{count} single images in {output.parent / 'samples'}")
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        sample_picture(args, models, device).save(output)
    print(f"wrote {output}")
    return output


def check_modes(args: argparse.Namespace) -> None:
    """Flags that contradict each other, refused before any checkpoint loads."""
    if bool(args.model) == bool(args.compare):
        raise UserError("infer.py ddpm needs --model CKPT or --compare CKPT [CKPT ...], one of the two.")
    if args.interpolate and args.compare:
        raise UserError("--interpolate and --compare are separate modes; give one of them.")
    if args.frames is not None and not args.interpolate:
        raise UserError("--frames sets the length of an --interpolate strip; add --interpolate or drop --frames.")
    if args.interpolate and args.num_samples is not None:
        raise UserError("--num_samples does not apply to --interpolate (the strip has --frames images); drop it.")
    if args.save_images and (args.compare or args.interpolate):
        raise UserError("--save_images writes the samples of one --model; drop --compare/--interpolate or --save_images.")
    if args.eta is not None and args.sampler != "ddim":
        raise UserError(f"--eta applies to --sampler ddim only ({args.sampler} has its own noise); drop it or use --sampler ddim.")


def load_models(paths, steps: int) -> list[tuple[str, torch.nn.Module, dict]]:
    """``(path, unet, scheduler_config)`` of every checkpoint, each loaded and checked against ``steps`` before any is sampled."""
    from models.ddpm_sampling import load_ddpm_for_sampling

    models = []
    for path in paths:
        unet, scheduler_config, description = load_ddpm_for_sampling(path)
        check_steps(steps, scheduler_config, path)
        print(f"loaded {description}")
        models.append((path, unet, scheduler_config))
    return models


def check_steps(steps: int, scheduler_config: dict, path) -> None:
    """``steps`` denoising steps must fit in the timesteps the checkpoint at ``path`` was trained with."""
    total = int(scheduler_config.get("num_train_timesteps", 1000))
    if steps > total:
        raise UserError(f"--num_inference_steps {steps} is more than the {total} timesteps {path} was trained with; use 1..{total}.")


def sample_picture(args: argparse.Namespace, models, device: torch.device, progress=None):
    """The grid, interpolation strip or comparison that ``args`` asks for, as a PIL image (what run() writes).

    ``progress`` wraps each sampling loop's timesteps (default: a tqdm bar in a terminal, none in notebooks and logs).
    """
    from tqdm.auto import tqdm

    from models.ddpm_sampling import default_steps, interpolation_noise, sample_ddpm
    from utils.images import make_grid_image
    from utils.log import progress_kwargs

    steps = args.num_inference_steps or default_steps(args.sampler)
    autocast = autocast_dtype(args.mixed_precision, device)
    if progress is None:
        # a bar only in a terminal: in a notebook's or a log file's output it would pile up carriage-return lines
        progress = lambda timesteps: tqdm(timesteps, desc=f"{args.sampler} {steps} steps", leave=False, **progress_kwargs())  # noqa: E731

    def generate(unet, scheduler_config, count, noise=None, shared_step_noise=False):
        return sample_ddpm(unet.to(device), scheduler_config, count, steps, args.sampler, args.seed, noise=noise,
                           batch_size=args.batch_size, autocast_dtype=autocast, progress=progress, eta=args.eta or 0.0,
                           timestep_spacing=args.timestep_spacing, shared_step_noise=shared_step_noise)

    if args.compare:
        per_row = args.num_samples or 8
        rows, labels = [], []
        for path, unet, scheduler_config in models:
            rows.extend(generate(unet, scheduler_config, per_row))
            labels.append(_checkpoint_label(path, unet.config.sample_size))
            unet.cpu()
        return make_grid_image(rows, nrow=per_row, row_labels=labels)
    _, unet, scheduler_config = models[0]
    if args.interpolate:
        frames = args.frames or 8
        noise = interpolation_noise(unet.config.in_channels, unet.config.sample_size, frames, args.seed)
        images = generate(unet, scheduler_config, frames, noise=noise, shared_step_noise=True)
        captions = [f"{a:.2f}" for a in torch.linspace(0, 1, frames).tolist()]
        return make_grid_image(images, nrow=frames, captions=captions)
    count = args.num_samples or 16
    return make_grid_image(generate(unet, scheduler_config, count), nrow=math.ceil(math.sqrt(count)))


GRID_LIMIT = 64  # images shown in the grid beside a --save_images folder
CHUNK_SEED_STRIDE = 1_000_003  # chunk c samples with seed + c * stride (and its step noise with that + 1): no two collide


def save_samples(generate_chunk, folder: Path, count: int, chunk_size: int, seed: int, settings: dict) -> list[Path]:
    """Write ``count`` samples as ``folder/<index:06d>.png``, ``chunk_size`` at a time; returns the paths.

    Chunk ``c`` (images ``c * chunk_size`` onwards) is ``generate_chunk(n, seed + c * CHUNK_SEED_STRIDE)``, so every
    image depends only on the settings and its index: a rerun samples only the chunks with a missing file, writes only
    the missing files, and an interrupted run continues where it stopped. ``settings`` are stored in
    ``folder/sampling.json``; a rerun with other settings is refused (the folder would mix two sample sets).
    """
    from utils.checkpoint import atomic_write_text
    from utils.config import setting_changes
    from utils.images import save_png_complete, tensor_to_pil

    folder.mkdir(parents=True, exist_ok=True)
    manifest = folder / "sampling.json"
    if manifest.exists():
        recorded = json.loads(manifest.read_text())
        changed = setting_changes(recorded, settings)
        if changed:
            raise UserError(f"{folder} holds samples made with other settings ({'; '.join(changed)}); pass another --output_dir "
                            "or the same settings to resume.")
    else:
        atomic_write_text(json.dumps(settings, indent=2) + "\n", manifest)
    paths = [folder / f"{index:06d}.png" for index in range(count)]
    chunks = [range(start, min(start + chunk_size, count)) for start in range(0, count, chunk_size)]
    kept = sum(path.exists() for path in paths)
    if kept:
        print(f"{kept} of {count} samples already in {folder}: kept")
    for number, chunk in enumerate(chunks):
        missing = [index for index in chunk if not paths[index].exists()]
        if not missing:
            continue
        # The whole chunk is sampled again (its images share one seed), only its missing files are written.
        images = generate_chunk(len(chunk), seed + number * CHUNK_SEED_STRIDE)
        for index in missing:  # a file exists only once complete: FID tools never read a partial one
            save_png_complete(tensor_to_pil(images[index - chunk.start]), paths[index])
    return paths


def _checkpoint_label(path: str, size: int) -> str:
    path = Path(path)
    name = f"{path.parent.name}/{path.stem}" if path.is_file() else path.name
    return f"{name} ({size} px)"
