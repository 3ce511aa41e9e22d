"""The pixel DDPM's builder: the UNet preset, DDPM's schedule and objective, AdamW's group and the image data set.

The UNet comes from ``models.ddpm_unet.UNET_PRESETS`` (the key is ``--model``, recorded in every checkpoint as
``model_preset`` beside the UNet's constructor arguments); the objective is ``models.ddpm_sampling.ddpm_loss`` on
Ho et al.'s linear schedule. ``train_ddpm_highres.py``, ``bench/`` and the tests build through
:func:`build_ddpm_training`.
"""

from __future__ import annotations

from functools import partial

import torch
from diffusers import UNet2DModel

from data.image_datasets import build_image_dataset
from models.ddpm_sampling import ddpm_loss, default_steps, make_noise_scheduler
from models.ddpm_unet import build_ddpm_unet, default_learning_rate, preset_for_size
from recipes import TrainingParts


def complete_config(config):
    """Fill the settings whose defaults depend on others: size 32, the UNet preset of the size, the preset's learning
    rate, the sampler's step count. Returns ``config``."""
    config.size = config.size or 32
    config.model = config.model or preset_for_size(config.size)
    config.learning_rate = config.learning_rate or default_learning_rate(config.model)
    config.sample_steps = config.sample_steps or default_steps(config.sampler)
    return config


def build_ddpm_training(config, device: torch.device | str, *, checkpoint: dict | None = None, with_data: bool = True) -> TrainingParts:
    """The UNet of ``config.model`` at ``config.size`` px (``config.dropout`` overriding the preset's; from
    ``checkpoint``'s recorded configuration when resuming, weights restored by the caller), its objective
    ``objective(images, model=...) -> dict``, AdamW's parameter group (``extras["optimizer_class"]``) and the training
    images (``with_data=False`` skips reading them).

    ``extras``: ``noise_scheduler``, ``channels_last`` (NHWC on CUDA: the convolutions are faster under AMP) and
    ``optimizer_class``.
    """
    if checkpoint is not None and "model_config" in checkpoint:
        unet = UNet2DModel.from_config(checkpoint["model_config"])
    else:
        unet = build_ddpm_unet(config.model, config.size, config.dropout)
    unet = unet.to(device)
    channels_last = torch.device(device).type == "cuda"
    if channels_last:
        unet = unet.to(memory_format=torch.channels_last)
    scheduler = make_noise_scheduler()
    datasets = {}
    if with_data:
        # Flips happen on the batch from a seeded generator (data.image_datasets.random_hflip), not in the data set:
        # exact resumes within an epoch.
        datasets["train"] = build_image_dataset(config.dataset, config.data_dir, config.size, hflip=False, download=config.download)
    group = {"params": list(unet.parameters()), "lr": config.learning_rate, "betas": (0.9, 0.999), "weight_decay": 0.0}
    return TrainingParts(
        models={"model": unet},
        param_groups=[group],
        objective=partial(_objective, scheduler),
        datasets=datasets,
        extras={"noise_scheduler": scheduler, "channels_last": channels_last, "optimizer_class": torch.optim.AdamW},
    )


def _objective(scheduler, images: torch.Tensor, *, model, **draws) -> dict:
    return ddpm_loss(model, scheduler, images, **draws)
