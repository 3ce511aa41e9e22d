"""SeeSR's builder: the models, optimiser groups, objective and data of ``train_seesr_timestep.py``.

SeeSR (Wu et al., CVPR 2024, https://github.com/cswry/SeeSR ``train_seesr.py``) trains a ControlNet copied from SD2's
UNet, plus the UNet modules named by ``--trainable_modules`` (the image cross-attention fed by RAM's embeddings of the
LR input), with the rest of SD2 frozen, on ``models.seesr.seesr_training_loss``. Our injector
(``models.timestep_adaptive.INJECTORS``, the key is ``--injector``) sits between ControlNet and UNet.
:func:`build_seesr_training` builds all of it for the trainer, ``bench/`` and the tests; :func:`build_seesr_datasets`
reads and checks the data first, so a bad image is reported before any model loads.
"""

from __future__ import annotations

import argparse
import logging
import os
from functools import partial
from pathlib import Path

import torch

from recipes import TrainingParts
from utils.errors import CheckpointError, UserError

UNET_FOLDER = "unet"
_LOGGER = logging.getLogger("seesr")


# ------------------------------------------------------------------------------------------------ data


def build_training_dataset(config, seed: int | None):
    """SeeSR's prepared folders, an HR folder degraded on the fly, or prepared LR/HR pairs."""
    from data.degradations import DegradationConfig
    from data.sr_pairs import HRFolderDegradedDataset, PairedSRFolderDataset, SeeSRPreparedDataset

    if config.root_folders:
        return SeeSRPreparedDataset(config.root_folders, config.resolution, config.scale, config.null_text_ratio, seed,
                                    config.random_flip)
    if config.lr_dir:
        return PairedSRFolderDataset(config.lr_dir, config.hr_dir, config.resolution, config.scale,
                                     config.null_text_ratio, seed, config.random_flip)
    degradation = {"seesr": DegradationConfig.seesr, "realesrgan": DegradationConfig,
                   "dape": DegradationConfig.dape}[config.degradation]()
    values = degradation.to_dict()
    if config.degradation_options:
        from utils.config import load_config

        if not Path(config.degradation_options).is_file():
            raise UserError(f"--degradation_options {config.degradation_options} does not exist; pass a YAML file.")
        values.update(load_config(config.degradation_options))
    values["scale"] = config.scale
    return HRFolderDegradedDataset(config.train_data_dir or config.hr_dir, config.resolution,
                                   DegradationConfig.from_dict(values), config.null_text_ratio, seed, config.random_flip)


def load_validation_set(config) -> list[dict]:
    """``[{"name", "lr" [3,h,w] in [0,1], "hr" or None}]``: the ``--validation_image`` files or degraded crops."""
    from data.sr_pairs import load_image_tensor

    if config.validation_steps == 0:
        return []
    if config.validation_image:
        items = []
        for path in config.validation_image:
            if not Path(path).is_file():
                raise UserError(f"--validation_image {path} does not exist; pass LR image files.")
            items.append({"name": Path(path).stem, "lr": load_image_tensor(path), "hr": None, "path": str(path)})
        return items
    # Fixed crops and degradations (own seed, no null prompts): the same images at every validation.
    fixed = argparse.Namespace(**{**vars(config), "null_text_ratio": 0.0, "random_flip": False})
    dataset = build_training_dataset(fixed, seed=config.seed if config.seed is not None else 0)
    items = []
    for index in range(min(config.num_validation_images, len(dataset))):
        sample = dataset[index]
        items.append({"name": Path(sample["path"]).stem, "lr": sample["lr"], "hr": (sample["hr"] + 1) / 2,
                      "path": sample["path"]})
    return items


def build_seesr_datasets(config) -> dict:
    """``{"train", "val"}``, every training image checked, and the weight files the flags name checked to exist:
    all before anything loads."""
    dataset = build_training_dataset(config, config.seed)
    dataset.check_images()
    validation = load_validation_set(config)
    frozen_model_folders(config, resolve_model_sources(config))
    if not config.no_image_cross_attention:
        check_ram_files(config)
    return {"train": dataset, "val": validation}


# ------------------------------------------------------------------------------------------------ weights


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


def resolve_model_sources(config) -> dict:
    """Where each starting weight comes from (checked before anything loads): seesr / controlnet / unet folders."""
    sources = {"seesr": None, "controlnet": None, "unet": None, "injector": None}
    if config.seesr_model_path:
        path = Path(config.seesr_model_path)
        if path.is_file() or not path.is_dir():
            raise CheckpointError(
                f"--seesr_model_path {path} is not a folder; pass SeeSR's release folder (unet/ + controlnet/) or a "
                "checkpoint-<step>/ folder of this script."
            )
        sources["seesr"] = sources["injector"] = path
    if config.controlnet_model_path:
        sources["controlnet"] = _model_folder(config.controlnet_model_path, "controlnet", "--controlnet_model_path")
    if config.unet_model_path:
        sources["unet"] = _model_folder(config.unet_model_path, UNET_FOLDER, "--unet_model_path")
    return sources


def check_ram_files(config) -> None:
    """RAM's weights (and DAPE) exist where the flags say, before any model loads."""
    if not Path(config.ram_path).is_file():
        raise UserError(
            f"--ram_path {config.ram_path} does not exist; SeeSR training needs RAM's ram_swin_large_14m.pth for the "
            "image embeddings (pass its path), or add --no_image_cross_attention to train the plain ControlNet."
        )
    if config.ram_ft_path and not Path(config.ram_ft_path).is_file():
        raise UserError(f"--ram_ft_path {config.ram_ft_path} does not exist; pass SeeSR's DAPE.pth or leave the flag out.")


def start_models(config, sources: dict, sd2_unet, logger, image_width: int | None = None):
    """``(unet, controlnet, injector or None)`` to start from: SeeSR's (or our) model, or new ones from SD2's UNet.

    With image attention (the default) the UNet is SD2's with SeeSR's image attentions added (PyTorch's default
    initialisation, as SeeSR), unless a UNet is given; a new ControlNet copies that UNet's encoder. ``image_width``:
    the tagger's embedding width (RAM: 512).
    """
    from models.seesr import build_controlnet, load_controlnet, load_seesr_weights
    from models.seesr_unet import SeeSRUNet2DConditionModel, load_strict, unet_with_image_attention

    use_images = not config.no_image_cross_attention
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
        torch.manual_seed(config.seed if config.seed is not None else 0)  # the new image attentions, reproducibly
        unet = unet_with_image_attention(unet, image_width or 512)
        logger.info("UNet: SD2's with new image attentions (PyTorch's default initialisation, as SeeSR)")
    if controlnet is None:
        controlnet = build_controlnet(unet, config.conditioning_embedding_channels, use_image_cross_attention=use_images)
        logger.info("ControlNet initialised from the UNet's encoder (zero convolutions: starts as the UNet alone)")
    return unet, controlnet, injector


def frozen_model_folders(config, sources: dict) -> dict:
    """With ``--train_injector_only``: the folders of the frozen ControlNet (and UNet) that every checkpoint copies
    byte for byte; ``{"controlnet": None, "unet": None}`` otherwise."""
    from models.seesr import controlnet_folder

    folders = {"controlnet": None, "unet": None}
    if not config.train_injector_only:
        return folders
    start = sources["seesr"]
    folders["controlnet"] = sources["controlnet"] or controlnet_folder(start)
    unet_source = sources["unet"] or (start / UNET_FOLDER if start is not None else None)
    if not config.no_image_cross_attention:
        if unet_source is None or not (unet_source / "config.json").is_file():
            raise CheckpointError("--train_injector_only with image attention needs a trained UNet to freeze: pass "
                                  "--seesr_model_path or --unet_model_path.")
        folders["unet"] = unet_source
    return folders


# ------------------------------------------------------------------------------------------------ per step


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


class GroundTruthTagger:
    """RAM's tags of the GT for images without a tag file, as SeeSR's ``make_tags.py`` writes them: plain RAM (no
    DAPE LoRA: DAPE is trained to tag degraded images), loaded on first use, so runs whose images all have tag files
    never hold a second Swin-L. Without ``--ram_ft_path`` it is the tagger already loaded."""

    def __init__(self, config, device, dtype, loaded=None, logger: logging.Logger | None = None):
        self.config, self.device, self.dtype, self.logger = config, device, dtype, logger or _LOGGER
        self.tagger = loaded if not config.ram_ft_path else None

    def __call__(self, gt01: torch.Tensor) -> list[str]:
        if self.tagger is None:
            from models.ram import load_ram_tagger

            self.tagger = load_ram_tagger(self.config.ram_path, None, self.config.ram_tag_list,
                                          self.config.ram_tag_thresholds, device=self.device, dtype=self.dtype)
            self.logger.info("GT tags: plain RAM %s (no DAPE, as make_tags.py) loaded for images without a tag file",
                             self.config.ram_path)
        return self.tagger.tags(gt01)


@torch.no_grad()
def add_ram_inputs(batch: dict, tagger, gt_tagger) -> None:
    """RAM's embeddings of the LR input (``image_embeds``) and, where no tag file gave a prompt, the GT's tags.

    SeeSR's ``train_seesr.py`` feeds RAM (+ DAPE) the ``sr_bicubic`` image (the ControlNet input) resized bicubically
    to 384 px. Its tags come from ``make_tags.py``: plain RAM on the GT, written as ``"{tags},"``; here read from tag
    files, or computed online the same way by ``gt_tagger`` (:class:`GroundTruthTagger`).
    """
    batch["image_embeds"] = tagger.image_embeddings(batch["lr_upsampled"], resize="bicubic")
    untagged = [i for i, source in enumerate(batch["tag_source"]) if source == "none"]
    if untagged:
        gt = ((batch["hr"][untagged] + 1) / 2).clamp(0, 1)
        prompts = list(batch["prompt"])
        for index, tags in zip(untagged, gt_tagger(gt.to(device=tagger.device, dtype=tagger.dtype)), strict=True):
            prompts[index] = f"{tags},"  # make_tags.py's tag file text
        batch["prompt"] = prompts


def loss_generator(seed: int | None, micro_step: int, device, num_processes: int = 1,
                   process_index: int = 0) -> torch.Generator | None:
    """A generator for one forward pass, a function of (seed, micro-batch, rank) only: resumes draw the same noise."""
    if seed is None:
        return None
    generator = torch.Generator(device=device)
    return generator.manual_seed((seed * 1_000_003 + micro_step * num_processes + process_index) % (2**63))


def _objective(batch: dict, *, controlnet, injector, generator=None, frozen: dict):
    """``seesr_training_loss`` with the frozen parts bound; looked up at call time, so tests can wrap it."""
    import models.seesr

    return models.seesr.seesr_training_loss(batch, controlnet=controlnet, injector=injector, generator=generator,
                                            **frozen)


# ------------------------------------------------------------------------------------------------ builder


def build_seesr_training(
    config,
    device: torch.device | str,
    *,
    weight_dtype: torch.dtype = torch.float32,
    num_processes: int = 1,
    datasets: dict | None = None,
    logger: logging.Logger | None = None,
) -> TrainingParts:
    """Everything ``train_seesr_timestep.py`` trains with, from its resolved configuration.

    ``models``: ``controlnet``, ``injector`` (absent for ``baseline``), ``unet``, ``vae``, ``text_encoder`` and, with
    image attention, ``tagger`` (RAM + DAPE on the LR). Trainable weights are fp32 on ``device``; the frozen ones are
    cast to ``weight_dtype`` (the autocast dtype). ``param_groups``: the ControlNet with the UNet's trained modules at
    ``--learning_rate`` (times batch x accumulation x ``num_processes`` with ``--scale_lr``), the injector at
    ``--injector_learning_rate`` without weight decay. ``objective(batch, controlnet=, injector=, generator=)``.
    ``datasets``: ``{"train", "val"}`` (:func:`build_seesr_datasets` when not given). ``extras``: ``tokenizer``,
    ``noise_scheduler``, ``gt_tagger``, ``prompt_cache``, ``unet_parameters`` (the UNet's trained ones; the UNet
    stays outside DDP), ``frozen_folders`` (``--train_injector_only``), ``learning_rate``.
    """
    from models.seesr import load_sd2_components, set_gradient_checkpointing
    from models.seesr_unet import unet_trainable_parameters
    from models.timestep_adaptive import build_injector, residual_levels_of

    logger = logger or _LOGGER
    device = torch.device(device)
    datasets = datasets if datasets is not None else build_seesr_datasets(config)
    sources = resolve_model_sources(config)
    use_ram = not config.no_image_cross_attention
    # Frozen SD2 parts in the compute dtype; trainable weights in fp32 (autocast computes in half precision). The
    # ControlNet copies the UNet's encoder before the UNet is cast, so it starts from the full-precision weights.
    sd2 = load_sd2_components(config.pretrained_model_path, device)
    tagger = gt_tagger = None
    if use_ram:
        from models.ram import load_ram_tagger

        tagger = load_ram_tagger(config.ram_path, config.ram_ft_path, config.ram_tag_list, config.ram_tag_thresholds,
                                 device=device, dtype=weight_dtype)
        gt_tagger = GroundTruthTagger(config, device, weight_dtype, loaded=tagger, logger=logger)
        logger.info("RAM %s%s: image embeddings of the LR input; GT tags from tag files, else from %s", config.ram_path,
                    f" + DAPE {config.ram_ft_path}" if config.ram_ft_path else "",
                    "plain RAM without DAPE (as make_tags.py)" if config.ram_ft_path else "this RAM (as make_tags.py)")
    image_width = tagger.config.embed_width if tagger is not None else None
    unet, controlnet, loaded_injector = start_models(config, sources, sd2.unet, logger, image_width)
    unet.to(device)
    train_unet = use_ram and not config.train_injector_only and bool(config.trainable_modules)
    unet_parameters = []
    if train_unet:
        unet_parameters = list(unet_trainable_parameters(unet, config.trainable_modules).values())
        if not unet_parameters:
            raise UserError(f"--trainable_modules {' '.join(config.trainable_modules)} names no module of the UNet; "
                            "SeeSR's default is image_attentions.")
        for parameter in unet_parameters:
            parameter.requires_grad_(True)
        unet.train()
        logger.info("UNet: %.2fM parameters trained (modules ending in %s), the rest frozen",
                    sum(p.numel() for p in unet_parameters) / 1e6, ", ".join(config.trainable_modules))
    if weight_dtype != torch.float32:
        for frozen in [sd2.vae, sd2.text_encoder] + ([] if train_unet else [unet]):  # a trained UNet stays fp32
            frozen.to(dtype=weight_dtype)
    if config.enable_xformers_memory_efficient_attention:
        _enable_xformers(logger, unet, controlnet)
    injector = build_injector(
        config.injector, residual_levels_of(controlnet), timestep_weights=config.timestep_weights,
        grouping=config.injector_grouping, timestep_weights_shared=not config.timestep_weights_per_group,
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
        controlnet.to(device, dtype=weight_dtype).eval()
    else:
        controlnet.to(device).train()
    if injector is not None:
        injector.to(device).train()
    if config.gradient_checkpointing:
        set_gradient_checkpointing(True, *([unet] if config.train_injector_only else [controlnet, unet]))

    learning_rate = config.learning_rate
    if config.scale_lr:
        learning_rate *= config.train_batch_size * config.gradient_accumulation_steps * num_processes
    param_groups = []
    if not config.train_injector_only:
        param_groups.append({"params": list(controlnet.parameters()) + unet_parameters, "lr": learning_rate,
                             "weight_decay": config.adam_weight_decay})
    if injector is not None:
        param_groups.append({"params": list(injector.parameters()), "lr": config.injector_learning_rate,
                             "weight_decay": 0.0})
    models = {"controlnet": controlnet}
    if injector is not None:
        models["injector"] = injector
    models.update(unet=unet, vae=sd2.vae, text_encoder=sd2.text_encoder)
    if tagger is not None:
        models["tagger"] = tagger
    frozen = dict(unet=unet, vae=sd2.vae, text_encoder=sd2.text_encoder, tokenizer=sd2.tokenizer,
                  noise_scheduler=sd2.noise_scheduler)
    return TrainingParts(
        models=models,
        param_groups=param_groups,
        objective=partial(_objective, frozen=frozen),
        datasets=datasets,
        extras={
            "tokenizer": sd2.tokenizer, "noise_scheduler": sd2.noise_scheduler, "gt_tagger": gt_tagger,
            "prompt_cache": PromptEmbeddingCache(sd2.tokenizer, sd2.text_encoder, device, config.prompt_cache_size),
            "unet_parameters": unet_parameters, "frozen_folders": frozen_model_folders(config, sources),
            "learning_rate": learning_rate,
        },
    )


def _enable_xformers(logger, *models) -> None:
    """xformers attention where installed (SeeSR's flag); PyTorch's SDPA otherwise, which needs no switch."""
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        logger.info("--enable_xformers_memory_efficient_attention: xformers is not installed; PyTorch's "
                    "scaled-dot-product attention (memory-efficient as well) is used")
        return
    for model in models:
        model.enable_xformers_memory_efficient_attention()


def default_workers(requested: int | None, device: torch.device) -> int:
    """``--dataloader_num_workers``, or up to 8 on CUDA (degradations run on the CPU) and 0 on the CPU."""
    if requested is not None:
        return requested
    return min(8, os.cpu_count() or 1) if device.type == "cuda" else 0
