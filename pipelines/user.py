"""``infer.py user``: spectrograms for chosen users from a train_dit_user.py checkpoint (DiT or latent UNet).

Sampling is ``models.user_pipeline.generate_user_images``, what the training previews call, with the sampler settings
the checkpoint carries (flags override them); this module checks the flags against the loaded model before the VA-VAE
loads, and writes the images, the grid and ``manifest.json`` (``pipelines/user_io.py``).

It also runs the users' latent-UNet note (``generate_training_style.py``) flag for flag on their files::

    python infer.py user --vae_path /kaggle/input/final-model --unet_path /kaggle/input/diffusion-final-model \
        --condition_encoder_path /kaggle/input/diffusion-final-model/condition_encoder.pt --num_users 31 \
        --user_ids 1 5 10 15 --num_images_per_user 5 --num_inference_steps 20 --output_dir generated --device auto --seed 42

A diffusers UNet folder, ``condition_encoder.pt`` with ``num_users`` rows (no null row: no guidance) or
``num_users + 1`` (the last is the null user), a diffusers VAE folder whose ``scaling_factor`` scaled the latents
(or a VA-VAE file with ``--latent_stats``); see ``pipelines.user_io.folder_latent_stats``.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from utils.accelerator import autocast_dtype, precision_name
from utils.cli import add_device_flag, add_flag, add_precision_flags
from utils.errors import UserError
from utils.validators import check_output_dir, fraction, guidance_scale, non_negative_int, positive_float, positive_int, seed

GRID_COLUMNS = 16  # micro_doppler_grid.png shows at most the first 16 samples of each user


def add_parser(subparsers) -> None:
    # Choices written out (models.vavae.VAVAE_CONFIGS, pipelines.user_io.OUTPUT_LAYOUTS) so that building the parser
    # imports no model code; the samplers are the backbone registry's (diffusers is imported by infer.py ddpm's parser).
    from models.user_generation import sampler_names

    parser = subparsers.add_parser(
        "user",
        help="generate spectrograms for chosen users from a train_dit_user.py checkpoint (DiT or latent UNet)",
        description="Generate images for user IDs 1..num_users with the training-time sampler: the checkpoint carries its "
        "backbone, configuration, EMA weights, latent statistics and sampling defaults; flags override the defaults. "
        "Writes micro_doppler_userXX_NNN.png, user_XX/generated_NNN.png, micro_doppler_grid.png (a row per user, at most "
        "16 samples each) and manifest.json, --batch_size samples at a time: any number per user, and a rerun keeps the "
        "samples already written by the same model and settings (an interrupted run continues). The UNet note's flags "
        "work too: --unet_path (a checkpoint, or a diffusers UNet folder with --condition_encoder_path and --num_users), "
        "and the aliases --vae_path, --num_images_per_user; the DiT note's --num_steps and --precision are aliases of "
        "--num_inference_steps and --mixed_precision.",
    )
    add_flag(parser, "--dit_checkpoint", "--checkpoint", dest="checkpoint", default=None, metavar="CKPT",
             help="checkpoints/best.ckpt or last.ckpt of train_dit_user.py (either backbone)")
    parser.add_argument("--unet_path", default=None,
                        help="a train_dit_user.py checkpoint of the UNet backbone, or a diffusers UNet2DConditionModel folder "
                        "(the note's diffusion-final-model, or checkpoints/best_unet of train_dit_user.py; then also --num_users)")
    parser.add_argument("--condition_encoder_path", default=None,
                        help="with a UNet folder: condition_encoder.pt (default: inside the folder), a state dict of an "
                        "nn.Embedding with num_users rows (no null row: unguided) or num_users + 1 (the last is the null user)")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="read a condition_encoder.pt saved as a whole module (torch.save(encoder)), which unpickles "
                        "Python objects: only for files from a trusted source (default off)")
    parser.add_argument("--latent_stats", default=None,
                        help="with a UNet folder: the latents_stats.safetensors it was trained with (default: inside the folder, "
                        "else the diffusers VAE's scaling_factor)")
    parser.add_argument("--scaling_factor", type=positive_float, default=None,
                        help="with a UNet folder: the factor its training multiplied the VAE latents by (default: the "
                        "diffusers VAE folder's config.json scaling_factor)")
    parser.add_argument("--num_users", type=positive_int, default=None,
                        help="users the model knows; read from a checkpoint (a different value is an error), required with a UNet folder")
    add_flag(parser, "--vavae_path", "--vae_path", default=None, metavar="PATH",
             help="the VAE the latents were made with: a VA-VAE file (its fingerprint must match the checkpoint's "
             "statistics) or, with a UNet folder, a diffusers AutoencoderKL folder such as the note's final-model")
    parser.add_argument("--vavae_config", choices=("f16d32", "tiny"), default="f16d32",
                        help="architecture of a .pt VA-VAE (default f16d32)")
    parser.add_argument("--output_dir", default="generated_images", help="where images, grid and manifest go (default ./generated_images)")
    parser.add_argument("--user_ids", type=int, nargs="+", default=None,  # the range comes from the checkpoint
                        help="user IDs 1..num_users to generate, each once (default: all)")
    add_flag(parser, "--num_samples_per_user", "--num_images_per_user", type=positive_int, default=4, metavar="N",
             help="images per user (default 4)")
    parser.add_argument("--start_index", type=non_negative_int, default=0,
                        help="index of each user's first sample: continue a set without repeating it (default 0)")
    parser.add_argument("--guidance_scale", type=guidance_scale, default=None,
                        help="classifier-free guidance, 1 = none, at most 100 (default: the checkpoint's, 4.0)")
    parser.add_argument("--guidance_interval", type=fraction, nargs=2, default=None, metavar=("START", "END"),
                        help="flow times where guidance acts, 0 noise .. 1 data, START <= END (default: the checkpoint's; DiT 0.11 1.0)")
    parser.add_argument("--guidance_channels", type=positive_int, default=None,
                        help="guide only the first N latent channels (the reference's 3-channel behaviour; default all)")
    add_flag(parser, "--num_inference_steps", "--num_steps", "--steps", type=positive_int, default=None, metavar="N",
             help="sampler updates (default: the checkpoint's, 250 for the DiT, 50 for the UNet; at most the UNet's "
             "training timesteps)")
    parser.add_argument("--sampler", choices=sampler_names(), default=None,
                        help="DiT: euler or heun; UNet: ddim, dpmsolver++ / unipc (diffusers' multistep solvers, 20-25 "
                        "steps) or ddpm (ancestral) (default: the checkpoint's)")
    parser.add_argument("--shift", type=positive_float, default=None,
                        help="DiT timestep shift, LightningDiT's convention (default: the checkpoint's, 0.3)")
    parser.add_argument("--eta", type=fraction, default=None, help="UNet DDIM eta, 0 = deterministic .. 1 (default 0)")
    parser.add_argument("--timestep_spacing", choices=("trailing", "leading", "linspace"), default=None,
                        help="UNet DDIM step placement: trailing (default: the first of 50 steps is t=999, pure noise) or "
                        "leading (DDIMScheduler.from_config of a DDPM config, as the note: t=980) or linspace")
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
    parser.add_argument("--overwrite", action="store_true",
                        help="sample again and replace samples already in --output_dir (default: keep them, so an "
                        "interrupted run continues; a folder made with another model or settings is refused)")
    parser.add_argument("--save_latents", action="store_true",
                        help="also write generated_latents.safetensors (VA-VAE scale, LightningDiT tensor names)")


def run(args: argparse.Namespace) -> dict:
    import json

    from PIL import Image

    from models.vavae import file_fingerprint
    from pipelines.user_io import (
        save_user_grid,
        user_image_files,
        user_image_record,
        write_user_images,
    )
    from utils.checkpoint import atomic_save_safetensors, atomic_write_text
    from utils.images import pil_to_tensor
    from utils.log import interactive_output

    model = load_model(args)
    plan = sampling_plan(args, model)
    load_vae(args, model)
    source, bundle, stats_note = model.source, model.bundle, model.stats_note
    users, settings, seed = plan.users, plan.settings, plan.seed
    vae_fingerprint, device, precision = model.vae_fingerprint, model.device, model.precision
    if bundle.weights == "folder":
        null = bundle.checkpoint["null_row"]
        rows = bundle.num_users + int(null)
        print(f"condition encoder {bundle.checkpoint['encoder_path']}: {rows} rows = users 1..{bundle.num_users}"
              f"{f' + a null row (row {rows})' if null else ', no null row: unguided sampling'}; latents scaled by {stats_note}; "
              f"DDPM schedule from {bundle.checkpoint['scheduler_file'] or 'the default (no scheduler_config.json)'}")
    print(f"loaded {bundle.backbone} model from {source} ({bundle.weights} weights, {bundle.num_users} users); "
          f"users {users}, {args.num_samples_per_user} each, {settings['sampler']} {settings['num_steps']} steps, "
          f"guidance {settings['guidance_scale']}, seed {seed}, {device}")
    output_dir = Path(args.output_dir)
    items = [(user, args.start_index + i) for user in users for i in range(args.num_samples_per_user)]
    identity = {"model": file_fingerprint(source), "weights": bundle.weights, "vae": vae_fingerprint, "seed": seed,
                "precision": precision, **settings}  # what makes a sample: a rerun keeps files only when all of it agrees
    kept = kept_samples(output_dir, items, args.layout, identity, overwrite=args.overwrite)
    if kept and args.save_latents:
        raise UserError(f"--save_latents stores the latents of every sample, but {len(kept)} of them are already in "
                        f"{output_dir} (kept, not sampled again); pass another --output_dir or --overwrite.")
    if kept:
        print(f"{len(kept)} of {len(items)} samples already in {output_dir} with the same model and settings: kept")
    # Chunks of --batch_size samples, the batches of an uninterrupted run: a resumed set equals it, and memory stays
    # one chunk however many samples are asked for. A chunk is sampled when any of its files is missing.
    grid_columns = min(args.num_samples_per_user, GRID_COLUMNS)
    in_grid = {item: None for item in items if item[1] < args.start_index + grid_columns}
    records, latents = [], []
    generate = partial(sample_items, model, plan, batch_size=args.batch_size, progress=interactive_output())
    for start in range(0, len(items), args.batch_size):
        chunk = items[start:start + args.batch_size]
        if all(item in kept for item in chunk):
            records.extend(user_image_record(user, index, args.layout) for user, index in chunk)
            continue
        images, chunk_latents = generate(items=chunk)  # the whole chunk (its batch), only its missing files written
        missing = [position for position, item in enumerate(chunk) if item not in kept]
        write_user_images(images[missing], [chunk[position] for position in missing], output_dir, layout=args.layout)
        records.extend(user_image_record(user, index, args.layout) for user, index in chunk)
        latents.append(chunk_latents)
        for item, image in zip(chunk, images, strict=True):
            if item in in_grid:
                in_grid[item] = image
        if len(items) > args.batch_size:
            print(f"samples {start + len(chunk)}/{len(items)} written")
    for (user, index), image in in_grid.items():  # kept samples are shown as their files are
        if image is None:
            with Image.open(output_dir / user_image_files(user, index, args.layout)[0]) as picture:
                in_grid[user, index] = pil_to_tensor(picture.convert("RGB"))
    grid = save_user_grid(torch.stack(list(in_grid.values())), users, grid_columns, output_dir / "micro_doppler_grid.png")
    latents = torch.cat(latents) if latents else None
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
        "grid": grid.name, "identity": identity, "files": records,
    }
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", output_dir / "manifest.json")
    print(f"wrote {len(records) - len(kept)} images ({len(kept)} kept), {grid} and manifest.json to {output_dir}")
    return {"output_dir": output_dir, "grid": grid, "files": records, "manifest": manifest, "latents": latents}


@dataclass
class UserModel:
    """A loaded model (checkpoint or UNet folder) and, after :func:`load_vae`, its VAE, device and precision."""

    source: Path
    bundle: Any
    stats_note: str | None = None
    vae: Any = None
    vae_fingerprint: str | None = None
    device: torch.device | None = None
    dtype: torch.dtype | None = None
    precision: str | None = None


@dataclass
class SamplingPlan:
    """What to sample: the 1-based users, the sampler settings (the checkpoint's, overridden by flags) and the seed."""

    users: list
    settings: dict
    seed: int


def load_model(args: argparse.Namespace) -> UserModel:
    """Check the flags that need no model, then load ``--dit_checkpoint``/``--unet_path`` (not the VAE yet)."""
    from models.user_pipeline import load_user_checkpoint
    from pipelines.user_io import folder_latent_stats, load_user_unet_folder
    from utils.errors import CheckpointError

    if bool(args.checkpoint) == bool(args.unet_path):
        raise UserError("infer.py user needs one model: --dit_checkpoint CKPT (either backbone) or --unet_path (checkpoint or "
                        "UNet folder).")
    source = Path(args.checkpoint or args.unet_path)
    check_request(args)
    if not source.exists():
        flag = "--dit_checkpoint" if args.checkpoint else "--unet_path"
        raise CheckpointError(f"{flag} {source} does not exist; pass checkpoints/best.ckpt or last.ckpt of train_dit_user.py.")
    check_output_dir(args.output_dir)
    if not args.vavae_path:
        raise UserError("--vavae_path (--vae_path) is required: the model generates VAE latents; pass the VAE the latents were "
                        "made with.")
    if not Path(args.vavae_path).exists():
        raise CheckpointError(f"--vavae_path {args.vavae_path} does not exist; pass the VA-VAE file or diffusers VAE folder.")
    stats_note = None
    if source.is_dir():
        bundle = load_user_unet_folder(source, num_users=args.num_users, condition_encoder_path=args.condition_encoder_path,
                                       trust_pickle=args.trust_pickle)
        bundle.stats, stats_note = folder_latent_stats(source, args.vavae_path, int(bundle.model.unet.config.in_channels),
                                                       latent_stats_path=args.latent_stats, scaling_factor=args.scaling_factor)
    else:
        if args.condition_encoder_path or args.latent_stats or args.scaling_factor is not None or args.trust_pickle:
            raise UserError(f"{source} is a checkpoint that carries its own condition encoder and latent statistics; drop "
                            "--condition_encoder_path/--latent_stats/--scaling_factor/--trust_pickle (they go with a UNet folder).")
        bundle = load_user_checkpoint(source, use_ema=not args.no_ema)
        if args.num_users is not None and args.num_users != bundle.num_users:
            raise UserError(f"--num_users {args.num_users} disagrees with the {bundle.num_users} users {source} was trained for; "
                            "drop the flag.")
    return UserModel(source, bundle, stats_note)


def check_request(args: argparse.Namespace) -> None:
    """The sampling flags that contradict themselves, whatever the model."""
    if args.user_ids is not None and len(set(args.user_ids)) != len(args.user_ids):
        repeated = sorted({user for user in args.user_ids if args.user_ids.count(user) > 1})
        raise UserError(f"--user_ids lists {repeated[0]} more than once; give each user once and raise --num_samples_per_user instead.")
    if args.guidance_interval is not None and args.guidance_interval[0] > args.guidance_interval[1]:
        raise UserError(f"--guidance_interval {args.guidance_interval[0]:g} {args.guidance_interval[1]:g}: START must not be after END.")

def sampling_plan(args: argparse.Namespace, model: UserModel) -> SamplingPlan:
    """The users, settings and seed ``args`` asks of ``model``, checked against it before anything is sampled."""
    from models.user_generation import validate_user_ids

    bundle = model.bundle
    users = validate_user_ids(args.user_ids if args.user_ids is not None else range(1, bundle.num_users + 1), bundle.num_users)
    settings = dict(bundle.sampling)
    for key, flag in (("sampler", "sampler"), ("num_steps", "num_inference_steps"), ("guidance_scale", "guidance_scale"),
                      ("shift", "shift"), ("guidance_channels", "guidance_channels"), ("eta", "eta"),
                      ("timestep_spacing", "timestep_spacing")):
        if getattr(args, flag) is not None:
            settings[key] = getattr(args, flag)
    if args.guidance_interval is not None:
        settings["guidance_interval"] = list(args.guidance_interval)
    check_sampling(args, bundle, settings)
    seed = args.seed if args.seed is not None else int(bundle.checkpoint.get("preview", {}).get("seed", 0))
    return SamplingPlan(users, settings, seed)


def load_vae(args: argparse.Namespace, model: UserModel) -> UserModel:
    """Check ``--vavae_path`` against the model's latent statistics, then load it on the device ``args`` names."""
    from models.user_pipeline import check_vae_matches
    from models.vavae import load_vavae
    from pipelines.user_io import resolve_vae_folder
    from utils.accelerator import resolve_device
    from utils.checkpoint import check_weights_file

    bundle = model.bundle
    vae_dir = resolve_vae_folder(args.vavae_path)
    vae_path = vae_dir if vae_dir is not None else Path(args.vavae_path)
    if vae_dir is None:  # a file that is no weights file at all would otherwise read as "another VA-VAE"
        check_weights_file(vae_path, "--vavae_path", "the VA-VAE weights file the latents were extracted with")
    vae_fingerprint = check_vae_matches(bundle.stats, vae_path)  # before the (large) VAE is loaded
    device = resolve_device(args.device)
    precision = args.mixed_precision
    if precision == "auto" and device.type == "cuda":  # the previews' precision, recorded in the checkpoint
        preview = bundle.checkpoint.get("preview", {}).get("autocast")
        precision = preview if preview in ("bf16", "fp16") else "no"
    dtype = autocast_dtype(precision, device)
    precision = precision_name(dtype)  # as manifests record it
    vae = load_vavae(vae_path, device=device, config=args.vavae_config)
    channels = bundle.stats.mean.shape[1]
    if vae.latent_channels != channels:
        raise UserError(f"The VA-VAE {args.vavae_path} has {vae.latent_channels} latent channels, the model {channels}; "
                        "check --vavae_config.")
    model.vae, model.vae_fingerprint, model.device, model.dtype, model.precision = vae, vae_fingerprint, device, dtype, precision
    return model


def sample_items(model: UserModel, plan: SamplingPlan, items, *, batch_size: int = 64, progress: bool = False):
    """Images in [-1, 1] (and VAE-scale latents) of the ``(user, index)`` samples ``items``, as infer.py user writes them.

    A sample's noise depends only on (seed, user, index) and the settings; ``run`` samples ``--batch_size`` items at a
    time, so the same items in the same batch give the pixels of its files.
    """
    from models.user_pipeline import generate_user_images, sampling_kwargs

    bundle = model.bundle
    return generate_user_images(bundle.model.to(model.device), bundle.backbone, plan.users, 1, stats=bundle.stats, vae=model.vae,
                                seed=plan.seed, batch_size=batch_size, device=model.device, autocast_dtype=model.dtype,
                                noise_scheduler=bundle.noise_scheduler, progress=progress, items=items,
                                **sampling_kwargs(plan.settings))


def check_sampling(args: argparse.Namespace, bundle, settings: dict) -> None:
    """Flags that the loaded model cannot honour, refused before the VA-VAE loads or anything is sampled."""
    from models.ddpm_sampling import SAMPLERS
    from models.user_generation import BACKBONES

    spec = BACKBONES.get(bundle.backbone)
    allowed = spec.objective.samplers
    if settings.get("sampler") not in (None, *allowed):
        raise UserError(f"--sampler {settings['sampler']}: the {bundle.backbone} backbone samples with {', '.join(allowed)}.")
    for flag in ("eta", "timestep_spacing", "shift"):
        if getattr(args, flag) is not None and flag not in spec.objective.sampling_flags:
            owners = " or ".join(other.title for _, other in BACKBONES.items() if flag in other.objective.sampling_flags)
            raise UserError(f"--{flag} applies to the {owners} backbone's sampler; this {spec.title} checkpoint does not use it, "
                            f"drop --{flag}.")
    if bundle.model.null_label is None and float(settings["guidance_scale"]) != 1.0:
        raise UserError(f"--guidance_scale {float(settings['guidance_scale']):g}: this model has no null user (its condition "
                        "encoder was trained without label dropout), so there is nothing to guide against; drop --guidance_scale.")
    sampler = settings.get("sampler")
    if sampler in SAMPLERS and settings.get("eta") and not SAMPLERS.get(sampler).takes_eta:
        raise UserError(f"--eta applies to DDIM; {sampler} is deterministic, drop --eta or use --sampler ddim.")
    if spec.objective.uses_noise_scheduler:
        total = int(bundle.noise_scheduler.config.num_train_timesteps)
        if int(settings["num_steps"]) > total:
            raise UserError(f"--num_inference_steps {settings['num_steps']} is more than the {total} timesteps the UNet was "
                            f"trained with; use 1..{total}.")
    channels = bundle.stats.mean.shape[1]
    if settings.get("guidance_channels") is not None and int(settings["guidance_channels"]) > channels:
        raise UserError(f"--guidance_channels {settings['guidance_channels']} is more than the model's {channels} latent "
                        "channels; drop the flag to guide all of them.")


def kept_samples(output_dir: Path, items, layout: str, identity: dict, *, overwrite: bool = False) -> set:
    """The (user, index) samples whose files are all in ``output_dir`` already, made by the same model and settings.

    ``manifest.json`` of the earlier run says what made its files; existing files of another model, VAE, seed,
    sampler or precision are refused (the folder would mix two sets), as are files without a manifest.
    """
    import json

    from pipelines.user_io import user_image_files
    from utils.config import setting_changes

    present = {item for item in items if all((output_dir / name).exists() for name in user_image_files(*item, layout))}
    if overwrite or not present:
        return set()
    manifest = output_dir / "manifest.json"
    recorded = json.loads(manifest.read_text()).get("identity") if manifest.exists() else None
    if recorded is None:
        why = "no manifest.json says how they were made"
    elif changes := setting_changes(recorded, identity):
        why = f"they were made with other settings ({'; '.join(changes)})"
    else:
        return present
    raise UserError(f"{len(present)} of the requested samples are already in --output_dir {output_dir}, but {why}; "
                    "pass another --output_dir, or --overwrite to replace them.")
