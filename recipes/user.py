"""The user-generation family's builder: latents, backbone, objective and optimiser groups of ``train_dit_user.py``.

The backbone comes from ``models.user_generation.BACKBONES`` (the key is ``--backbone``): its spec builds the network
(or rebuilds it from a checkpoint's recorded ``model_config``), names the objective (rectified flow for the DiT, DDPM
for the latent UNet) and its sampler family. The trainer, ``bench/`` and ``scripts/`` build through
:func:`build_user_training`, so none of them repeats the construction.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch

from data.latents import STATS_FILENAME, LatentDataset, LatentStats, load_latent_file
from models.user_generation import BACKBONES, ObjectiveSetup, build_backbone, build_noise_scheduler
from recipes import TrainingParts
from utils.errors import UserError


def load_latents(config) -> tuple[LatentStats, LatentDataset, LatentDataset | None, int]:
    """``(statistics, train set, validation set or None, number of users)`` from ``config.latent_dir``."""
    latent_dir = Path(config.latent_dir)
    if not latent_dir.is_dir():
        raise UserError(f"--latent_dir {latent_dir} does not exist; run scripts/extract_features.py first.")
    stats = LatentStats.load(latent_dir / STATS_FILENAME)
    train_file = load_latent_file(latent_dir / "train.safetensors")
    train_set = LatentDataset(train_file, stats, use_flip=config.use_flip)
    val_path = latent_dir / "val.safetensors"
    val_set = LatentDataset(val_path, stats) if val_path.is_file() else None
    recorded = train_file.num_users
    if recorded is None:  # a LightningDiT latent file without our metadata
        recorded = config.num_users or int(train_file.labels.max()) + 1
    if config.num_users is not None and config.num_users != recorded:
        raise UserError(f"--num_users {config.num_users} disagrees with the {recorded} users recorded in "
                        f"{latent_dir / 'train.safetensors'}; drop the flag or re-extract with --num_users {config.num_users}.")
    if val_set is not None and val_set.num_users not in (None, recorded):
        raise UserError(f"{val_path} records {val_set.num_users} users but train.safetensors {recorded}; re-extract both together.")
    return stats, train_set, val_set, recorded


def complete_config(config):
    """Fill the settings whose defaults depend on others: the backbone, its default size, QK-norm (on unless
    ``--init_from`` decides). Returns ``config``."""
    config.backbone = config.backbone or BACKBONES.names()[0]
    config.model_size = config.model_size or BACKBONES.get(config.backbone).default_size
    if config.qk_norm is None and config.init_from is None:
        config.qk_norm = True
    return config


def objective_setup(config, noise_scheduler) -> ObjectiveSetup:
    return ObjectiveSetup(noise_scheduler=noise_scheduler, time_sampling=config.time_sampling, use_cosine_loss=config.cosine_loss)


def build_user_training(config, device: torch.device | str, *, checkpoint: dict | None = None, data=None) -> TrainingParts:
    """The model of ``config.backbone`` (new, or from ``checkpoint``'s recorded configuration: weights are restored by
    the caller), its objective ``objective(latents, labels, model=..., **draws) -> dict``, AdamW's parameter group
    (``extras["optimizer_class"]``) and the latent data sets (``data``: :func:`load_latents`'s result when already read).

    ``extras``: ``spec`` (the backbone's registry entry), ``setup`` (the objective's settings), ``noise_scheduler``
    (None for the flow objective), ``stats``, ``num_users``, ``model_config`` (what checkpoints record), ``qk_norm``
    (the DiT's setting in effect), ``note`` (a line for the log, e.g. what ``--init_from`` loaded).
    """
    spec = BACKBONES.get(config.backbone)
    stats, train_set, val_set, num_users = data if data is not None else load_latents(config)
    channels, height, _ = train_set.latents.shape[1:]
    qk_norm, note = config.qk_norm, ""
    if checkpoint is not None:
        model = build_backbone(config.backbone, checkpoint["model_config"])
        if config.gradient_checkpointing:
            spec.enable_gradient_checkpointing(model)
    else:
        built = spec.build(config.model_size, num_users=num_users, in_channels=int(channels), input_size=int(height),
                           patch_size=config.patch_size, cfg_dropout=config.cfg_dropout, qk_norm=config.qk_norm,
                           gradient_checkpointing=config.gradient_checkpointing, init_from=config.init_from)
        model, qk_norm, note = built.model, built.qk_norm, built.note
    noise_scheduler = None
    if spec.objective.uses_noise_scheduler:
        if checkpoint is not None and checkpoint.get("noise_scheduler_config"):
            from diffusers import DDPMScheduler

            noise_scheduler = DDPMScheduler.from_config(checkpoint["noise_scheduler_config"])
        else:
            noise_scheduler = build_noise_scheduler(config.num_train_timesteps, config.beta_schedule, config.prediction_type)
    model_config = spec.config_of(model)
    model = model.to(device)
    setup = objective_setup(config, noise_scheduler)
    group = {"params": list(model.parameters()), "lr": config.learning_rate, "betas": (0.9, config.adam_beta2),
             "weight_decay": config.weight_decay}
    return TrainingParts(
        models={"model": model},
        param_groups=[group],
        objective=partial(_objective, spec.objective.loss, setup),
        datasets={"train": train_set, "val": val_set},
        extras={"spec": spec, "setup": setup, "noise_scheduler": noise_scheduler, "stats": stats, "num_users": num_users,
                "model_config": model_config, "qk_norm": qk_norm, "note": note, "optimizer_class": torch.optim.AdamW},
    )


def _objective(loss, setup: ObjectiveSetup, latents, labels, *, model, **draws) -> dict:
    return loss(model, latents, labels, setup, **draws)
