"""The Phaseformer family's builder: the network, its weighted loss, Adam's parameter groups and the paired data.

The loss is ``losses.phaseformer_loss.PhaseformerLoss`` over the ``LOSS_TERMS`` it is given by name (a resumed run
takes the names its checkpoint recorded); the network is a ``models.phaseformer`` preset (``--model``), or the
constructor arguments a checkpoint recorded. ``train_phaseformer.py``, ``bench/`` and ``scripts/`` build through
:func:`build_phaseformer_training`.
"""

from __future__ import annotations

from contextlib import nullcontext
from functools import partial
from pathlib import Path

import torch

from data.paired import PairedImageFolder
from losses import PhaseformerLoss, optimizer_param_groups
from models.phaseformer import Phaseformer, build_phaseformer, load_phaseformer_state_dict
from models.phaseformer_enhance import load_phaseformer_for_inference, to_model_range
from recipes import TrainingParts


def build_loss(config, checkpoint: dict | None = None) -> PhaseformerLoss:
    """The run's loss; resuming, over the terms its checkpoint recorded (checkpoints written before the terms were
    recorded by name have the default terms, perceptual unless ``--no_perceptual``)."""
    terms = (checkpoint or {}).get("loss_weighting", {}).get("terms")
    return PhaseformerLoss(
        config.loss_weighting, use_perceptual=not config.no_perceptual, vgg_weights=config.vgg_weights, pixel_loss=config.pixel_loss,
        msssim_as_similarity=config.msssim_as_similarity, value_range=config.value_range, vgg_resize_224=config.vgg_resize_224,
        seed=config.seed, terms=terms,
    )


def build_datasets(config, split_dir: Path):
    """(train set, test set, protocol lines): one PairedImageFolder per --dataset_path, their union when several."""
    from torch.utils.data import ConcatDataset

    train_sets, test_sets, sources = [], [], []
    eval_size = None if config.eval_size == "full" else int(config.eval_size)
    for index, root in enumerate(config.dataset_path):
        split_file = split_dir / f"split_{index}_{Path(root).resolve().name}.txt"
        common = dict(test_split=config.test_split, split_seed=config.split_seed, split_file=split_file)
        train = PairedImageFolder(root, "train", crop_size=config.crop_size, resize_mode=config.resize_mode, flips=config.flips,
                                  h_target=config.h_target, **common)
        test = PairedImageFolder(root, "test", eval_size=eval_size, **common)
        train_sets.append(train)
        test_sets.append(test)
        where = f"split file {test.split_file}" if test.split_file else f"{Path(root) / 'test'}"
        sources.append(f"{where} ({len(test)} pairs; {len(train)} training pairs)")
    union = lambda sets: sets[0] if len(sets) == 1 else ConcatDataset(sets)  # noqa: E731
    return union(train_sets), union(test_sets), sources


def build_phaseformer_training(config, device: torch.device | str, *, split_dir: Path | None = None, checkpoint: dict | None = None,
                               with_data: bool = True) -> TrainingParts:
    """The loss first (missing VGG weights stop the run before any data is read), the data (split files written in
    ``split_dir``; ``with_data=False`` skips it), then the network: ``config.model`` with ``--init_weights`` loaded, or
    the configuration ``checkpoint`` recorded (weights restored by the caller).

    ``objective(batch, model=..., autocast=None) -> (total, logs)`` takes a batch of the paired data set (images in [0, 1]) and maps it
    to the model's value range; ``models["loss"]`` holds the learnable loss weights; ``param_groups`` are Adam's (the
    model's, then the loss weights' without weight decay; ``extras["optimizer_class"]``). ``extras``: ``sources`` (the
    test split's description), ``notes`` (lines for the log: what ``--init_weights`` loaded, a warning about it).
    """
    loss_fn = build_loss(config, checkpoint).to(device)
    datasets, sources = {}, []
    if with_data:
        datasets["train"], datasets["test"], sources = build_datasets(config, split_dir)
    notes = []
    if checkpoint is not None and "model_config" in checkpoint:
        model = Phaseformer(**checkpoint["model_config"])
    else:
        model = build_phaseformer(config.model, eca=config.eca)
    if config.init_weights and checkpoint is None:
        initial, info = load_phaseformer_for_inference(config.init_weights, needed_by="train_phaseformer.py --init_weights")
        load_phaseformer_state_dict(model, initial.state_dict(), config.init_weights)
        notes.append(f"initial weights: {info['description']}")
        if info["value_range"] != config.value_range:
            notes.append(f"warning: the initial weights expect --value_range {info['value_range']}, this run trains with "
                         f"{config.value_range}")
    model.to(device)
    groups = optimizer_param_groups(model, loss_fn, loss_weights_lr=config.loss_weights_lr)
    for group in groups:
        group.setdefault("lr", config.learning_rate)
        group["betas"] = (config.beta1, 0.999)
    return TrainingParts(
        models={"model": model, "loss": loss_fn},
        param_groups=groups,
        objective=partial(_objective, loss_fn, config.value_range),
        datasets=datasets,
        extras={"sources": sources, "notes": notes, "optimizer_class": torch.optim.Adam},
    )


def _objective(loss_fn: PhaseformerLoss, value_range: str, batch: dict, *, model, autocast=None) -> tuple[torch.Tensor, dict]:
    # The loss runs in ``autocast`` (the trainer's accelerator.autocast()); the model's forward is autocast by
    # accelerate's prepare already.
    inputs, target, target_2x = (to_model_range(batch[key], value_range) for key in ("input", "target", "target_2x"))
    fake_b_L, fake_b_H = model(inputs)
    with autocast if autocast is not None else nullcontext():
        return loss_fn(fake_b_L.float(), fake_b_H.float(), target, target_2x)
