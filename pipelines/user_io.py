"""Folder I/O of user-conditioned generation: the users' latent-UNet layout (read and written) and the image files.

The users' second note (their latent-UNet training and ``generate_training_style.py`` generation scripts, summarised
in ``docs/user_generation.md``) keeps its model as files, not as one checkpoint::

    diffusion-final-model/            --unet_path: a diffusers UNet2DConditionModel folder
        config.json, diffusion_pytorch_model.safetensors
        condition_encoder.pt          --condition_encoder_path: nn.Embedding(num_users, D), no null row
        [scheduler_config.json]       the DDPM schedule (diffusers' DDPMScheduler default when absent)
    final-model/                      --vae_path: a diffusers AutoencoderKL folder; latents were VAE latents x scaling_factor

:func:`load_user_unet_folder` reads that layout (and ours, where ``unet/`` and ``condition_encoder/`` are
diffusers folders); :func:`folder_latent_stats` decides how its latents are scaled, in this order: ``--latent_stats``
or ``latents_stats.safetensors`` in the folder (VA-VAE latents normalised per channel, fingerprinted), then
``--scaling_factor``, then the diffusers VAE's own ``scaling_factor`` and ``shift_factor`` (diffusers' convention
``latents = (z - shift_factor) * scaling_factor``, the note's training). :func:`export_unet_folder` writes the same
layout from a ``train_dit_user.py`` UNet (EMA weights), so both directions are tested against each other.

:func:`write_user_images` and :func:`save_user_grid` are the one way generated images reach disk
(``micro_doppler_userXX_NNN.png`` / ``user_XX/generated_NNN.png`` and a grid with a labelled row per user); the
training previews use the same grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel

from data.latents import STATS_FILENAME, LatentStats
from models.user_generation import BACKBONES, build_noise_scheduler
from models.user_pipeline import UserModel
from models.user_unet import ENCODER_CONFIG_SUFFIX, UserConditionedUNet, load_condition_encoder
from utils.errors import CheckpointError, DataError, UserError
from utils.images import save_grid

OUTPUT_LAYOUTS = ("both", "flat", "folders")
ENCODER_FILENAME = "condition_encoder.pt"


# --------------------------------------------------------------------------------------------------
# The latent-UNet folder layout
# --------------------------------------------------------------------------------------------------


def _find_encoder(root: Path) -> Path:
    candidates = [root / "condition_encoder", root / ENCODER_FILENAME, root / "condition_encoder.safetensors",
                  root / "condition_encoder.pth"]
    found = next((c for c in candidates if c.exists()), None)
    if found is None:
        raise CheckpointError(f"No condition encoder beside {root}; pass --condition_encoder_path (e.g. {root / ENCODER_FILENAME}).")
    return found


def load_user_unet_folder(
    unet_path: str | Path,
    *,
    num_users: int | None,
    condition_encoder_path: str | Path | None = None,
    trust_pickle: bool = False,
) -> UserModel:
    """The latent-UNet layout: a diffusers UNet folder (or one holding ``unet/``) + its condition encoder.

    The encoder defaults to ``condition_encoder.pt`` or ``condition_encoder/`` inside the folder, the DDPM
    schedule to its ``scheduler_config.json`` (:func:`models.user_generation.build_noise_scheduler` otherwise).
    The returned model has no latent statistics yet (``stats`` is None): :func:`folder_latent_stats` decides
    them once the VAE is known. A table without a null row samples without guidance (scale 1 by default).
    """
    root = Path(unet_path)
    if num_users is None:
        raise UserError("--num_users is required with a UNet folder (--unet_path DIR): the folder does not record how many users it knows.")
    unet_dir = root / "unet" if (root / "unet" / "config.json").is_file() else root
    if not (unet_dir / "config.json").is_file():
        raise CheckpointError(f"--unet_path {root} is neither a train_dit_user.py checkpoint nor a diffusers UNet folder (no config.json).")
    found = _class_name(unet_dir / "config.json")
    if found != UNet2DConditionModel.__name__:  # from_pretrained would load a ControlNet's config with warnings, then fail
        raise CheckpointError(f"--unet_path {root} holds a diffusers {found or 'model without _class_name'}, not a "
                              f"{UNet2DConditionModel.__name__}; pass the UNet folder of the users' model.")
    try:
        unet = UNet2DConditionModel.from_pretrained(str(unet_dir), local_files_only=True)
    except Exception as err:
        raise CheckpointError(f"Cannot load the diffusers UNet2DConditionModel in {unet_dir} ({type(err).__name__}: {err}).") from err
    encoder_path = Path(condition_encoder_path) if condition_encoder_path else _find_encoder(root)
    encoder = load_condition_encoder(encoder_path, num_users, unet.config.cross_attention_dim, trust_pickle=trust_pickle)
    scheduler_file = next((p for p in (root / "scheduler" / "scheduler_config.json", root / "scheduler_config.json") if p.is_file()), None)
    scheduler = DDPMScheduler.from_pretrained(str(scheduler_file.parent)) if scheduler_file else build_noise_scheduler()
    model = UserConditionedUNet(unet, encoder).eval().requires_grad_(False)
    sampling = dict(BACKBONES.get("unet").sampling_defaults)
    if encoder.null_label is None:
        sampling["guidance_scale"] = 1.0  # nothing to guide against: the note's generation is unguided
    extra = {"encoder_path": str(encoder_path), "null_row": encoder.null_label is not None,
             "scheduler_file": str(scheduler_file) if scheduler_file else None}
    return UserModel(model, "unet", num_users, None, scheduler, sampling, str(root), "folder", extra)


def _class_name(config_file: Path) -> str | None:
    """The ``_class_name`` a diffusers ``config.json`` records (None when unreadable or absent)."""
    import json

    try:
        return json.loads(config_file.read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None


def resolve_vae_folder(path: str | Path) -> Path | None:
    """The diffusers AutoencoderKL folder at ``path`` (or its ``vae/``), None when ``path`` is a VA-VAE file."""
    path = Path(path)
    if not path.is_dir():
        return None
    for candidate in (path, path / "vae"):
        if (candidate / "config.json").is_file():
            return candidate
    raise CheckpointError(f"--vae_path {path} is a folder without config.json (or vae/config.json); expected a diffusers "
                          "AutoencoderKL folder or a VA-VAE .pt file.")


def folder_latent_stats(
    root: str | Path, vae_path: str | Path, channels: int, *, latent_stats_path: str | Path | None = None,
    scaling_factor: float | None = None,
) -> tuple[LatentStats, str]:
    """How a UNet folder's ``channels``-channel latents map to VAE latents, and where that came from (for the log)."""
    from models.vavae import file_fingerprint

    root = Path(root)
    stats_path = Path(latent_stats_path) if latent_stats_path else root / STATS_FILENAME
    if latent_stats_path and scaling_factor is not None:
        raise UserError("--latent_stats and --scaling_factor both say how the latents were scaled; pass one of them.")
    if latent_stats_path or (stats_path.is_file() and scaling_factor is None):
        if not stats_path.is_file():
            raise DataError(f"--latent_stats {stats_path} does not exist; pass the {STATS_FILENAME} the UNet was trained with.")
        return LatentStats.load(stats_path), f"per-channel statistics {stats_path}"
    vae_dir = resolve_vae_folder(vae_path)
    vae_fingerprint = file_fingerprint(vae_dir if vae_dir is not None else vae_path)
    shift = 0.0
    if scaling_factor is None:
        if vae_dir is None:
            raise UserError(
                f"--vae_path {vae_path} is a VA-VAE file, which records no scaling factor, and {root} holds no {STATS_FILENAME}; "
                "pass --latent_stats (the statistics it was trained with) or --scaling_factor (the factor its latents were multiplied by)."
            )
        config = json.loads((vae_dir / "config.json").read_text())
        scaling_factor = float(config.get("scaling_factor") or 1.0)
        shift = float(config.get("shift_factor") or 0.0)
        where = f"scaling_factor {scaling_factor:g}{f' and shift_factor {shift:g}' if shift else ''} of {vae_dir / 'config.json'}"
    else:
        where = f"--scaling_factor {scaling_factor:g}"
    if not scaling_factor > 0:
        raise UserError(f"The latent scaling factor must be positive, got {scaling_factor:g} ({where}).")
    stats = LatentStats(torch.full((1, channels, 1, 1), shift), torch.full((1, channels, 1, 1), 1.0 / scaling_factor), vae_fingerprint)
    return stats, where


def export_unet_folder(model: UserConditionedUNet, noise_scheduler: DDPMScheduler, stats: LatentStats, directory: str | Path) -> Path:
    """Write the users' layout from our UNet: UNet files at the top, ``condition_encoder.pt`` (a state dict, as the
    note saves it) with ``condition_encoder_config.json``, ``scheduler_config.json`` and ``latents_stats.safetensors``.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.unet.save_pretrained(str(directory))
    encoder = model.condition_encoder
    torch.save({k: v.detach().cpu().clone() for k, v in encoder.state_dict().items()}, directory / ENCODER_FILENAME)
    config = {"num_users": int(encoder.config.num_users), "null_row": bool(encoder.config.null_row),
              "cross_attention_dim": int(encoder.config.cross_attention_dim)}
    (directory / (Path(ENCODER_FILENAME).stem + ENCODER_CONFIG_SUFFIX)).write_text(json.dumps(config, indent=2) + "\n")
    noise_scheduler.save_pretrained(str(directory))
    stats.save(directory / STATS_FILENAME)
    return directory


# --------------------------------------------------------------------------------------------------
# Images
# --------------------------------------------------------------------------------------------------


def save_user_grid(images: torch.Tensor, user_ids, num_per_user: int, path: str | Path) -> Path:
    """A grid with one row per user, labelled ``user 01`` etc."""
    labels = [f"user {user:02d}" for user in user_ids]
    return save_grid(list(images), path, nrow=num_per_user, row_labels=labels)


def user_image_files(user: int, index: int, layout: str = "both") -> list[str]:
    """File names of sample ``index`` of ``user`` inside the output folder: ``micro_doppler_userXX_NNN.png`` (flat, NNN
    from 001) and/or ``user_XX/generated_NNN.png`` (folders, from 000)."""
    if layout not in OUTPUT_LAYOUTS:
        raise UserError(f"Unknown output layout {layout!r}; choose one of {', '.join(OUTPUT_LAYOUTS)}.")
    names = []
    if layout in ("both", "flat"):
        names.append(f"micro_doppler_user{user:02d}_{index + 1:03d}.png")
    if layout in ("both", "folders"):
        names.append(f"user_{user:02d}/generated_{index:03d}.png")
    return names


def user_image_record(user: int, index: int, layout: str = "both") -> dict:
    """The manifest record of one sample: user, index and its file(s)."""
    record = {"user_id": int(user), "index": int(index)}
    for name in user_image_files(user, index, layout):
        record["folder_file" if name.startswith("user_") else "file"] = name
    return record


def write_user_images(images: torch.Tensor, items, output_dir: str | Path, *, layout: str = "both") -> list[dict]:
    """Write image ``k`` as sample ``items[k] = (user, index)`` in the :func:`user_image_files` layout; records back.

    NNN comes from the sample index, so a later run with another ``--start_index`` continues the numbering instead of
    overwriting. Each file appears only once complete (written under another name, then renamed), so an interrupted
    run never leaves a partial PNG that a resumed run would keep.
    """
    from utils.images import save_png_complete, tensor_to_pil

    output_dir = Path(output_dir)
    records = []
    for image, (user, index) in zip(images, items, strict=True):
        picture = tensor_to_pil(image)
        for name in user_image_files(user, index, layout):
            save_png_complete(picture, output_dir / name)
        records.append(user_image_record(user, index, layout))
    return records
