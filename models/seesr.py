"""SeeSR-style real-world super-resolution on Stable Diffusion 2 base, on current diffusers.

SeeSR (Wu et al., "SeeSR: Towards Semantics-Aware Real-World Image Super-Resolution", CVPR 2024,
https://github.com/cswry/SeeSR): a ControlNet initialised from the frozen SD2 UNet reads the bicubic-upsampled
low-resolution (LR) image in [0, 1] and adds its 12 down + 1 mid residuals to the UNet; only the ControlNet is
trained, with the epsilon-MSE objective at uniform timesteps (``train_seesr.py``). Sampling (``test_seesr.py``,
``pipelines/pipeline_seesr.py``) uses SD2-base's DDPM scheduler ("leading" spacing: 50 steps visit
t = 981, 961, ..., 1), classifier-free guidance with prompt + ``added_prompt`` against ``negative_prompt``,
optionally starts from the noised latent of the LR image ("LR embedding", ``start_point="lr"``), processes large
images in Gaussian-weighted overlapping latent tiles averaged at every step, tiles the VAE, and fixes colours
(AdaIN or wavelet, :mod:`utils.color_fix`).

What this file adds or changes:

* the :class:`~models.timestep_adaptive.MultiScaleInjector` between ControlNet and UNet, applied after every
  ControlNet call (:func:`controlnet_residuals`: training, untiled and tiled sampling); ``injector=None`` is
  the plain SeeSR path. Both residual lists always reach the UNet (diffusers treats "down without mid" as a
  T2I-Adapter);
* ``start_point="lr"`` noises the LR latent to ``start_steps`` (default: the schedule's first timestep; SeeSR's
  ``--start_steps`` default 999 noises to t=999 while its first step is t=981) and skips the scheduled steps above
  it, as SeeSR's pipeline does (its ``test_seesr.py`` parses ``--start_steps`` but never passes it on; here it
  means what it says); ``lr_start_timestep`` is the same setting under this repository's earlier name;
* latent tiles follow SeeSR's rule (tiling only when the latent's area exceeds a tile's, then square tiles of side
  ``min(tile, short side)``) with a symmetric Gaussian window (SeeSR's is off by half a pixel vertically);
* SeeSR-Turbo (``test_seesr_turbo.py``): when the base folder is a turbo model (its scheduler uses "trailing" timestep
  spacing, as sd-turbo's), the UNet is the base folder's with only the ``image_attentions`` of the checkpoint's UNet
  grafted on (:func:`graft_image_attentions`, SeeSR's ``UNet2DConditionModel.from_pretrained_orig``);
* images are resized as ``test_seesr.py`` resizes them: PIL's bicubic filter (antialiased when shrinking) on 8-bit
  RGB, for the LR upscale and for the final resize to ``upscale`` times the input size (:mod:`utils.images`);
* the VAE is tiled as SeeSR's ``utils/vaehook.py`` does, all tiles sharing one GroupNorm estimate (no colour
  seams), with exact merged statistics and receptive-field padding (:mod:`models.tiled_vae`), separate encoder
  (pixels) and decoder (latents) tile sizes;
* the LR latent for ``start_point="lr"`` is sampled with the caller's generator (SeeSR's is unseeded);
* SeeSR's image cross-attention (:mod:`models.seesr_unet`): the RAM image embeddings (``image_embeds``,
  ``[B, 145, 512]``) reach the ControlNet and the UNet in training and sampling, through both guidance halves
  and every latent tile, when the models have image attention (SeeSR's release, or a checkpoint trained with it;
  models without it ignore them). Checkpoints: ours (``checkpoint-<step>/``: ``controlnet/`` [+ ``unet/``]
  [+ ``multi_scale_injector/``]), SeeSR's release folder (``seesr/``: ``unet/`` + ``controlnet/``) or a bare
  ControlNet folder (:func:`load_seesr_weights`). Prompts can also be given as embeddings (``prompt_embeds``);
* hand-set ControlNet schedules to compare the learned w(t) with (:func:`control_scale_schedule`): diffusers'
  ``control_guidance_start/end`` window and SUPIR's control scale linear in the noise level.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, ControlNetModel, DDPMScheduler, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import nn

from models.seesr_unet import (
    IMAGE_ATTENTIONS,
    RAM_EMBEDDING_DIM,
    SeeSRControlNetModel,
    SeeSRUNet2DConditionModel,
    load_strict,
    unet_trainable_parameters,  # noqa: F401  (re-exported: the trainer's --trainable_modules)
    unet_with_image_attention,  # noqa: F401  (re-exported: SD2 UNet -> SeeSR UNet with image attention)
)
from models.tiled_vae import shared_norm_vae_tiling
from models.timestep_adaptive import (
    INJECTOR_FOLDER,
    MultiScaleInjector,
    load_injector,
    residual_levels_of,
    save_injector,
)
from utils.color_fix import apply_color_fix
from utils.errors import CheckpointError, UserError

DEFAULT_ADDED_PROMPT = "clean, high-resolution, 8k"
DEFAULT_NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"
CONTROLNET_FOLDER = "controlnet"
UNET_FOLDER = "unet"
CONTROLNET_CLASS_NAMES = ("ControlNetModel", "SeeSRControlNetModel")
WEIGHT_FILE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".safetensors")
# A base folder whose scheduler config uses this spacing is a turbo model (sd-turbo), run as test_seesr_turbo.py.
TURBO_TIMESTEP_SPACING = "trailing"
CHECKPOINT_KINDS = (
    "train_seesr_timestep.py's checkpoint-<step>/ (controlnet/ [+ unet/] [+ multi_scale_injector/]), SeeSR's "
    "release folder seesr/ (unet/ + controlnet/) or a diffusers ControlNet folder"
)

# What a diffusers Stable Diffusion 2 (base) folder must hold: subfolder -> files of which one must exist.
SD2_REQUIRED_FILES = {
    "unet": ("config.json",),
    "vae": ("config.json",),
    "text_encoder": ("config.json",),
    "tokenizer": ("vocab.json", "tokenizer.json"),
    "scheduler": ("scheduler_config.json",),
}


# ------------------------------------------------------------------------------------------------ loading


@dataclass
class SD2Components:
    """The frozen Stable Diffusion 2 parts SeeSR builds on."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: nn.Module
    tokenizer: object
    noise_scheduler: DDPMScheduler


def check_sd2_folder(pretrained_model_path: str | Path) -> Path:
    """Raise a UserError naming what is missing unless ``pretrained_model_path`` is a diffusers SD2 folder."""
    path = Path(pretrained_model_path)
    expected = (
        "a diffusers Stable Diffusion 2 base folder with unet/, vae/, text_encoder/, tokenizer/ and scheduler/ "
        "(e.g. a local copy of stabilityai/stable-diffusion-2-base)"
    )
    if not path.is_dir():
        found = "is a file, not a folder" if path.exists() else "does not exist"
        raise UserError(f"--pretrained_model_path {path} {found}; expected {expected}.")
    missing = [
        f"{sub}/{files[0]}"
        for sub, files in SD2_REQUIRED_FILES.items()
        if not any((path / sub / name).is_file() for name in files)
    ]
    if missing:
        raise UserError(f"--pretrained_model_path {path} lacks {', '.join(missing)}; expected {expected}.")
    return path


def load_sd2_components(
    pretrained_model_path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> SD2Components:
    """Load SD2's UNet, VAE, CLIP text encoder, tokenizer and DDPM scheduler, frozen and in eval mode."""
    from transformers import CLIPTextModel, CLIPTokenizer

    from utils.log import interactive_output

    if not interactive_output():  # a notebook or log file: no weight-loading bars drawn with carriage returns
        import diffusers.utils.logging
        import transformers.utils.logging

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    path = check_sd2_folder(pretrained_model_path)
    try:
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae")
        text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder")
        tokenizer = CLIPTokenizer.from_pretrained(path / "tokenizer")
        # SD2-base ships a PNDM config; SeeSR trains and samples with DDPM on the same betas ("leading" spacing).
        noise_scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot load Stable Diffusion 2 from {path}: {str(error).splitlines()[0]}") from None
    for model in (unet, vae, text_encoder):
        model.requires_grad_(False)
        model.eval()
        # Only what changes: diffusers warns on every .to(dtype=...) call, even a no-op one.
        if device is not None:
            model.to(device=device)
        if dtype is not None and dtype != model.dtype:
            model.to(dtype=dtype)
    return SD2Components(unet, vae, text_encoder, tokenizer, noise_scheduler)


def build_controlnet(
    unet: UNet2DConditionModel, conditioning_embedding_out_channels=None, use_image_cross_attention: bool | None = None
) -> SeeSRControlNetModel:
    """A ControlNet copying the UNet's encoder weights, reading a 3-channel image in [0, 1] (SeeSR, diffusers).

    ``use_image_cross_attention``: SeeSR's image attention in the ControlNet (None: as the UNet has it). SeeSR's
    training builds it from a UNet with image attention (:func:`unet_with_image_attention` of SD2's), whose image
    attentions the ControlNet then copies; from a plain UNet they start freshly initialised.
    """
    kwargs = {}
    if conditioning_embedding_out_channels is not None:
        kwargs["conditioning_embedding_out_channels"] = tuple(conditioning_embedding_out_channels)
    return SeeSRControlNetModel.from_unet(
        unet, conditioning_channels=3, use_image_cross_attention=use_image_cross_attention, **kwargs
    )


def has_image_attention(model: nn.Module | None) -> bool:
    """Whether ``model`` (UNet or ControlNet, wrapped by DDP or torch.compile or not) has SeeSR's image attention."""
    if model is None:
        return False
    from accelerate.utils import extract_model_from_parallel

    config = getattr(extract_model_from_parallel(model, keep_torch_compile=False), "config", None)
    return bool(getattr(config, "use_image_cross_attention", False))


def _read_config(folder: Path) -> dict:
    import json

    try:
        return json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read {folder / 'config.json'}: {error}.") from None


def _is_controlnet_config(config: dict) -> bool:
    return config.get("_class_name") in CONTROLNET_CLASS_NAMES or "conditioning_channels" in config


def controlnet_folder(checkpoint_dir: str | Path) -> Path:
    """The diffusers ControlNet folder of ``checkpoint-<step>/`` (its ``controlnet/``), or the folder itself."""
    checkpoint_dir = Path(checkpoint_dir)
    if checkpoint_dir.is_file():
        kind = " (a DDPM or other model's weight file?)" if checkpoint_dir.suffix in WEIGHT_FILE_SUFFIXES else ""
        raise CheckpointError(
            f"--seesr_model_path {checkpoint_dir} is a file{kind}; expected a folder: {CHECKPOINT_KINDS}."
        )
    folder = checkpoint_dir / CONTROLNET_FOLDER
    if (folder / "config.json").is_file():
        return folder
    if (checkpoint_dir / "config.json").is_file() and checkpoint_dir.name != INJECTOR_FOLDER:
        config = _read_config(checkpoint_dir)
        if not _is_controlnet_config(config):
            found = config.get("_class_name", "a model without _class_name")
            raise CheckpointError(
                f"{checkpoint_dir / 'config.json'} describes a {found}, not a ControlNet; pass {CHECKPOINT_KINDS}."
            )
        return checkpoint_dir  # a bare diffusers ControlNet folder (save_pretrained output)
    raise CheckpointError(
        f"Expected a ControlNet at {folder}/ (config.json + diffusion_pytorch_model.safetensors, as "
        "train_seesr_timestep.py writes into checkpoint-<step>/), found none; pass a checkpoint-<step> folder."
    )


def load_controlnet(checkpoint_dir: str | Path) -> SeeSRControlNetModel:
    """The ControlNet saved in ``checkpoint_dir/controlnet/`` (diffusers format) or in ``checkpoint_dir`` itself.

    Ours and SeeSR's release (image cross-attention, ``.bin`` or safetensors) alike; every weight must match the
    config (no missing or unexpected keys).
    """
    return load_strict(SeeSRControlNetModel, controlnet_folder(checkpoint_dir))


def checkpoint_unet_folder(checkpoint_dir: str | Path) -> Path | None:
    """``checkpoint_dir/unet/`` when the checkpoint (ours with image attention trained, or SeeSR's) has a UNet."""
    folder = Path(checkpoint_dir) / UNET_FOLDER
    return folder if (folder / "config.json").is_file() else None


def check_same_base_model(model: nn.Module, sd2_unet: nn.Module, folder: str | Path) -> None:
    """Raise a CheckpointError unless ``model`` reads text embeddings as wide as the SD2 UNet's (same base model)."""
    width, expected = model.config.cross_attention_dim, sd2_unet.config.cross_attention_dim
    if width != expected:
        raise CheckpointError(
            f"The model in {folder} reads {width}-wide text embeddings but the Stable Diffusion UNet of "
            f"--pretrained_model_path reads {expected}-wide ones: it was trained on another base model; pass the "
            "base model it was trained on, or a checkpoint trained on this one."
        )


def save_seesr_weights(
    checkpoint_dir: str | Path,
    controlnet: ControlNetModel,
    injector: nn.Module | None,
    unet: UNet2DConditionModel | None = None,
) -> None:
    """Write ``checkpoint_dir/controlnet/``, ``checkpoint_dir/unet/`` when given (the UNet with trained image
    attention: all its weights, as SeeSR saves it) and ``checkpoint_dir/multi_scale_injector/`` when there is an
    injector. Pass unwrapped models (``accelerator.unwrap_model``).
    """
    checkpoint_dir = Path(checkpoint_dir)
    controlnet.save_pretrained(checkpoint_dir / CONTROLNET_FOLDER, safe_serialization=True)
    if unet is not None:
        unet.save_pretrained(checkpoint_dir / UNET_FOLDER, safe_serialization=True)
    if injector is not None:
        save_injector(injector, checkpoint_dir)


def is_turbo_base(pretrained_model_path: str | Path) -> bool:
    """Whether the base folder is a turbo model (SeeSR-Turbo's ``--pretrained_model_path``): its scheduler config sets
    ``timestep_spacing`` to "trailing", as stabilityai/sd-turbo's does (SD2-base's has none: "leading")."""
    import json

    config_file = Path(pretrained_model_path) / "scheduler" / "scheduler_config.json"
    try:
        config = json.loads(config_file.read_text())
    except (OSError, ValueError) as error:
        raise CheckpointError(f"Cannot read {config_file}: {error}.") from None
    return config.get("timestep_spacing") == TURBO_TIMESTEP_SPACING


def read_unet_weights(folder: str | Path, keep: Callable[[str], bool] = lambda key: True) -> dict[str, torch.Tensor]:
    """The tensors of a diffusers UNet folder whose names pass ``keep`` (safetensors, else ``.bin`` read with
    ``weights_only``); only those are read from a safetensors file."""
    folder = Path(folder)
    safetensors_file, bin_file = folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin"
    try:
        if safetensors_file.is_file():
            from safetensors import safe_open

            with safe_open(str(safetensors_file), framework="pt", device="cpu") as handle:
                return {key: handle.get_tensor(key) for key in handle.keys() if keep(key)}
        if bin_file.is_file():
            state = torch.load(bin_file, map_location="cpu", weights_only=True)
            return {key: value for key, value in state.items() if keep(key)}
    except (OSError, RuntimeError, ValueError) as error:
        raise CheckpointError(f"Cannot read the weights in {folder}: {str(error).strip().splitlines()[0]}") from None
    raise CheckpointError(
        f"{folder} has no diffusion_pytorch_model.safetensors or .bin; pass a folder written by save_pretrained."
    )


def graft_image_attentions(
    base_unet: UNet2DConditionModel, seesr_unet_folder: str | Path, base_name: str = "--pretrained_model_path"
) -> SeeSRUNet2DConditionModel:
    """SeeSR-Turbo's UNet: ``base_unet`` (sd-turbo's) with the ``image_attentions`` of the UNet in
    ``seesr_unet_folder`` and every other weight its own (SeeSR's ``UNet2DConditionModel.from_pretrained_orig``).

    SeeSR loads the merged weights with ``strict=False``; here every image attention of the new UNet must come from the
    folder with its shape, and the folder may hold no other, so a base of another layout is one CheckpointError.
    """
    from accelerate import init_empty_weights

    folder = Path(seesr_unet_folder)
    config = _read_config(folder)
    if not config.get("use_image_cross_attention"):
        raise CheckpointError(
            f"{folder} holds a UNet without image attention (use_image_cross_attention is not true), so there is "
            "nothing to graft onto the turbo UNet; pass SeeSR's release folder or a checkpoint trained with it."
        )
    grafted = read_unet_weights(folder, lambda key: IMAGE_ATTENTIONS in key)
    base_config = {key: value for key, value in base_unet.config.items() if not key.startswith("_")}
    base_config.update(
        use_image_cross_attention=True,
        image_cross_attention_dim=config.get("image_cross_attention_dim", RAM_EMBEDDING_DIM),
    )
    with init_empty_weights():
        model = SeeSRUNet2DConditionModel.from_config(base_config)
    expected = {key: value.shape for key, value in model.state_dict().items() if IMAGE_ATTENTIONS in key}
    problems = []
    missing, unexpected = sorted(set(expected) - set(grafted)), sorted(set(grafted) - set(expected))
    shapes = sorted(key for key in set(expected) & set(grafted) if tuple(grafted[key].shape) != tuple(expected[key]))
    for keys, what in ((missing, "missing"), (unexpected, "unexpected"), (shapes, "of another shape")):
        if keys:
            problems.append(f"{len(keys)} image-attention weights {what} (e.g. {keys[0]})")
    if problems:
        raise CheckpointError(
            f"The image attentions in {folder} do not fit the UNet of {base_name}: {'; '.join(problems)}; pass the "
            "base model of the same layout as the one SeeSR was trained on (sd-turbo for SD2-base's SeeSR)."
        )
    dtype = next(base_unet.parameters()).dtype
    state = {key: value for key, value in base_unet.state_dict().items() if IMAGE_ATTENTIONS not in key}
    state.update({key: value.to(dtype) for key, value in grafted.items()})
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device=next(base_unet.parameters()).device).eval()


def load_seesr_weights(
    checkpoint_dir: str | Path, sd2_unet: UNet2DConditionModel | None = None, graft: bool = False
) -> tuple[SeeSRControlNetModel, MultiScaleInjector | None, SeeSRUNet2DConditionModel | None, list[str]]:
    """ControlNet, injector (or None) and UNet (or None: use SD2's) from a checkpoint, with the log lines to print.

    ``checkpoint_dir``: our ``checkpoint-<step>/`` (``controlnet/`` [+ ``unet/`` when image attention was trained]
    [+ ``multi_scale_injector/``]), SeeSR's release folder (``seesr/`` with ``unet/`` and ``controlnet/``) or a
    bare diffusers ControlNet folder. With ``sd2_unet`` the models are checked to be of the same base model.
    ``graft`` (SeeSR-Turbo, needs ``sd2_unet``): the UNet is ``sd2_unet`` with the image attentions of the checkpoint's
    ``unet/`` (:func:`graft_image_attentions`) instead of the checkpoint's whole UNet.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.exists():
        raise CheckpointError(
            f"Checkpoint folder {checkpoint_dir} does not exist; pass --seesr_model_path checkpoint-<step>."
        )
    if graft and sd2_unet is None:
        raise ValueError("graft=True needs the base model's UNet (sd2_unet).")
    folder = controlnet_folder(checkpoint_dir)
    controlnet = load_controlnet(checkpoint_dir)
    unet_folder = checkpoint_unet_folder(checkpoint_dir) if folder != checkpoint_dir else None
    if unet_folder is None:
        unet = None
    elif graft:
        unet = graft_image_attentions(sd2_unet, unet_folder)
    else:
        unet = load_strict(SeeSRUNet2DConditionModel, unet_folder)
    if sd2_unet is not None:
        check_same_base_model(controlnet, sd2_unet, folder)
        if unet is not None:
            check_same_base_model(unet, sd2_unet, unet_folder)
    injector, messages = load_injector(checkpoint_dir, residual_levels=residual_levels_of(controlnet))
    # The injector's lines first: the note's log shows them right under "Loading checkpoint from ...".
    images = " (with SeeSR image cross-attention)"
    messages.append(f"✓ ControlNet loaded from {folder}" + (images if has_image_attention(controlnet) else ""))
    if unet is not None and graft:
        messages.append(f"✓ UNet: the base model's, with the image attentions of {unet_folder} (SeeSR-Turbo)")
    elif unet is not None:
        messages.append(f"✓ UNet loaded from {unet_folder}" + (images if has_image_attention(unet) else ""))
    return controlnet, injector, unet, messages


def set_gradient_checkpointing(enabled: bool, *models: nn.Module) -> None:
    """Turn diffusers' gradient checkpointing on or off for each model (ControlNet and the frozen UNet it feeds)."""
    for model in models:
        if enabled:
            model.enable_gradient_checkpointing()
        else:
            model.disable_gradient_checkpointing()


# ------------------------------------------------------------------------------------------------ forward


def compose_prompt(*parts: str) -> str:
    """Join the non-empty parts with ", " (tags, user prompt, added prompt)."""
    return ", ".join(part.strip().strip(",").strip() for part in parts if part and part.strip().strip(","))


@torch.no_grad()
def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: list[str] | str, device=None) -> torch.Tensor:
    """CLIP text embeddings ``[B, 77, D]`` (SD2 reads the encoder's last hidden state, padded to max length)."""
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = device or text_encoder.device
    tokens = tokenizer(
        prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    return text_encoder(tokens.input_ids.to(device))[0]


def _model_dtype(model: nn.Module) -> torch.dtype:
    return next(model.parameters()).dtype


def _image_kwargs(model: nn.Module, image_embeds: torch.Tensor | None, dtype: torch.dtype) -> dict:
    """``image_encoder_hidden_states`` for a model with SeeSR's image attention; nothing for one without."""
    if image_embeds is None or not has_image_attention(model):
        return {}
    return {"image_encoder_hidden_states": image_embeds.to(dtype)}


def controlnet_residuals(
    controlnet: nn.Module,
    injector: nn.Module | None,
    noisy_latents: torch.Tensor,
    timesteps,
    prompt_embeds: torch.Tensor,
    lr_upsampled: torch.Tensor,
    conditioning_scale: float = 1.0,
    image_embeds: torch.Tensor | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """ControlNet residuals for the UNet, scaled by the injector (if any) for ``timesteps`` (scalar or ``[B]``).

    ``image_embeds`` (RAM's ``[B, 145, 512]``) feed the ControlNet's image attention when it has one.
    """
    dtype = _model_dtype(controlnet)
    down, mid = controlnet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        controlnet_cond=lr_upsampled.to(dtype),
        conditioning_scale=conditioning_scale,
        return_dict=False,
        **_image_kwargs(controlnet, image_embeds, dtype),
    )
    if injector is not None:
        down, mid = injector(down, mid, timesteps)
    return list(down), mid


def predict_noise(
    unet: UNet2DConditionModel,
    controlnet: nn.Module,
    injector: nn.Module | None,
    noisy_latents: torch.Tensor,
    timesteps,
    prompt_embeds: torch.Tensor,
    lr_upsampled: torch.Tensor,
    conditioning_scale: float = 1.0,
    image_embeds: torch.Tensor | None = None,
) -> torch.Tensor:
    """The UNet's output with ControlNet (+ injector) residuals; both down and mid residuals are always passed.

    ``image_embeds`` (RAM's ``[B, 145, 512]``, or None) go to the image attention of whichever of the two models
    has it (SeeSR: both); a model without image attention ignores them.
    """
    down, mid = controlnet_residuals(
        controlnet, injector, noisy_latents, timesteps, prompt_embeds, lr_upsampled, conditioning_scale, image_embeds
    )
    dtype = _model_dtype(unet)
    return unet(
        noisy_latents.to(dtype),
        timesteps,
        encoder_hidden_states=prompt_embeds.to(dtype),
        down_block_additional_residuals=[residual.to(dtype) for residual in down],
        mid_block_additional_residual=mid.to(dtype),
        return_dict=False,
        **_image_kwargs(unet, image_embeds, dtype),
    )[0]


def seesr_training_loss(
    batch: dict,
    *,
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: nn.Module,
    tokenizer,
    controlnet: nn.Module,
    injector: nn.Module | None,
    noise_scheduler: DDPMScheduler,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SeeSR's objective: MSE between the UNet's prediction and the noise (or velocity) at uniform timesteps.

    ``batch``: ``hr`` ``[B, 3, H, W]`` in [-1, 1], ``lr_upsampled`` ``[B, 3, H, W]`` in [0, 1], ``prompt``
    (list of str) or ``prompt_embeds`` ``[B, 77, D]``, and optionally ``image_embeds`` ``[B, 145, 512]`` (RAM's
    embeddings of the LR input, SeeSR's ``ram_encoder_hidden_states``) for models with image attention. VAE and
    text encoder run without gradients in the UNet's dtype; the loss is computed in fp32.
    """
    parameter = next(unet.parameters())  # works on DDP-wrapped models too (the UNet trains with image attention)
    device, dtype = parameter.device, parameter.dtype
    hr = batch["hr"].to(device, dtype)
    with torch.no_grad():
        latents = vae.encode(hr.to(vae.dtype)).latent_dist.sample(generator) * vae.config.scaling_factor
        prompt_embeds = batch.get("prompt_embeds")
        if prompt_embeds is None:
            prompt_embeds = encode_prompts(tokenizer, text_encoder, batch["prompt"], device)
    latents = latents.float()
    noise = randn_tensor(latents.shape, generator=generator, device=device, dtype=latents.dtype)
    timestep_device = generator.device if generator is not None else device
    timesteps = torch.randint(
        0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator, device=timestep_device
    ).to(device)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    image_embeds = batch.get("image_embeds")
    prediction = predict_noise(
        unet, controlnet, injector, noisy_latents, timesteps, prompt_embeds, batch["lr_upsampled"].to(device),
        image_embeds=None if image_embeds is None else image_embeds.to(device),
    )
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(latents, noise, timesteps)
    else:
        raise UserError(f"Expected an epsilon or v_prediction scheduler, found prediction_type {prediction_type!r}.")
    return F.mse_loss(prediction.float(), target.float())


# ------------------------------------------------------------------------------------------------ tiling


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of side ``tile`` covering ``length`` with at least ``overlap`` shared cells."""
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride <= 0:
        raise UserError(f"Expected --latent_tiled_overlap ({overlap}) smaller than --latent_tiled_size ({tile}).")
    starts = list(range(0, length - tile, stride))
    return starts + [length - tile]


def gaussian_tile_weights(height: int, width: int, variance: float = 0.01) -> torch.Tensor:
    """SeeSR's tile window: a separable Gaussian over the tile, peak in the middle (``[height, width]``)."""

    def profile(size: int) -> torch.Tensor:
        x = torch.arange(size, dtype=torch.float64)
        midpoint = (size - 1) / 2
        return torch.exp(-((x - midpoint) ** 2) / (size * size) / (2 * variance)) / math.sqrt(2 * math.pi * variance)

    return torch.outer(profile(height), profile(width)).float()


def tiled_prediction(
    predict: Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor],
    latents: torch.Tensor,
    condition_image: torch.Tensor,
    tile_size: int,
    tile_overlap: int,
    tile_batch_size: int = 1,
) -> torch.Tensor:
    """Run ``predict`` on overlapping latent tiles and blend them with Gaussian weights.

    ``predict(latent_tiles, image_tiles, num_tiles)`` gets ``num_tiles`` tiles stacked tile-major along the
    batch (``num_tiles * B``) with their image tiles (8x the latent size). SeeSR's rule: ``latents`` whose area is
    at most ``tile_size ** 2`` go through in one call (a 64 x 128 latent with tile 96, say); larger ones in square
    tiles of side ``min(tile_size, short side)``.
    """
    batch, _, height, width = latents.shape
    if height * width <= tile_size * tile_size:
        return predict(latents, condition_image, 1)
    scale = condition_image.shape[-1] // width
    tile_h = tile_w = min(tile_size, height, width)
    if tile_overlap >= tile_h:
        raise UserError(
            f"The latent tiles of this image are {tile_h} px (the latent's short side), not more than "
            f"--latent_tiled_overlap {tile_overlap}; lower --latent_tiled_overlap below {tile_h} (SeeSR would loop forever)."
        )
    rows, columns = tile_starts(height, tile_h, tile_overlap), tile_starts(width, tile_w, tile_overlap)
    positions = [(y, x) for y in rows for x in columns]
    window = gaussian_tile_weights(tile_h, tile_w).to(latents.device)
    output = None
    total_weight = torch.zeros(height, width, device=latents.device)
    for first in range(0, len(positions), tile_batch_size):
        chunk = positions[first : first + tile_batch_size]
        latent_tiles = torch.cat([latents[..., y : y + tile_h, x : x + tile_w] for y, x in chunk])
        image_tiles = torch.cat(
            [condition_image[..., y * scale : (y + tile_h) * scale, x * scale : (x + tile_w) * scale] for y, x in chunk]
        )
        prediction = predict(latent_tiles, image_tiles, len(chunk)).float()
        if output is None:
            output = torch.zeros(batch, prediction.shape[1], height, width, device=latents.device)
        for index, (y, x) in enumerate(chunk):
            output[..., y : y + tile_h, x : x + tile_w] += prediction[index * batch : (index + 1) * batch] * window
            total_weight[y : y + tile_h, x : x + tile_w] += window
    return output / total_weight


# ------------------------------------------------------------------------------------------------ inference

CONTROL_SCHEDULES = ("constant", "window", "linear")


def control_scale_schedule(
    scheduler: DDPMScheduler,
    timesteps: torch.Tensor,
    conditioning_scale: float = 1.0,
    schedule: str = "constant",
    guidance_start: float = 0.0,
    guidance_end: float = 1.0,
    scale_start: float = 0.0,
) -> list[float]:
    """The ControlNet scale at every sampling step: the hand-set schedules the injector is compared against.

    * ``constant``: ``conditioning_scale`` at every step (SeeSR);
    * ``window``: diffusers' ``control_guidance_start/end``: ``conditioning_scale`` for the steps ``i`` of ``N``
      with ``i / N >= guidance_start`` and ``(i + 1) / N <= guidance_end``, 0 elsewhere;
    * ``linear``: SUPIR's linear control scale, ``scale_start`` at the highest noise level and
      ``conditioning_scale`` at none, linear in the noise level ``sigma_t = sqrt((1 - abar_t) / abar_t)``
      relative to that of the last training timestep (SUPIR: ``sigma / sigma_max``).
    """
    if schedule not in CONTROL_SCHEDULES:
        raise UserError(f"Expected --control_schedule {', '.join(CONTROL_SCHEDULES)}, found {schedule!r}.")
    count = len(timesteps)
    if schedule == "constant":
        return [float(conditioning_scale)] * count
    if schedule == "window":
        if not 0.0 <= guidance_start < guidance_end <= 1.0:
            raise UserError(
                f"Expected 0 <= --control_guidance_start < --control_guidance_end <= 1, found {guidance_start} "
                f"and {guidance_end}."
            )
        return [
            0.0 if (i / count < guidance_start or (i + 1) / count > guidance_end) else float(conditioning_scale)
            for i in range(count)
        ]
    alphas_cumprod = scheduler.alphas_cumprod.double()
    sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
    sigma_max = float(sigmas[-1])
    return [
        float(conditioning_scale + (scale_start - conditioning_scale) * float(sigmas[t]) / sigma_max)
        for t in timesteps.tolist()  # one device-to-host copy, before sampling starts
    ]


class SeeSRPipeline:
    """SeeSR sampling with the optional injector: the one inference path (infer.py, training previews, tests)."""

    def __init__(
        self,
        unet: UNet2DConditionModel,
        vae: AutoencoderKL,
        text_encoder: nn.Module,
        tokenizer,
        scheduler: DDPMScheduler,
        controlnet: ControlNetModel,
        injector: MultiScaleInjector | None = None,
    ):
        self.unet = unet
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        # A private copy: set_timesteps mutates the scheduler, and training shares its noise scheduler.
        self.scheduler = DDPMScheduler.from_config(scheduler.config)
        self.controlnet = controlnet
        self.injector = injector

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_path: str | Path,
        seesr_model_path: str | Path,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        turbo: bool | None = None,
    ) -> tuple[SeeSRPipeline, list[str]]:
        """SD2 from ``pretrained_model_path`` + ControlNet/injector (and the UNet, when the checkpoint has one: SeeSR's
        release, or ours with image attention trained) from ``seesr_model_path`` (:func:`load_seesr_weights`);
        returns the pipeline and the log lines.

        ``turbo`` (None: :func:`is_turbo_base` of ``pretrained_model_path``): SeeSR-Turbo's UNet, the base folder's
        with the checkpoint UNet's image attentions grafted on, instead of the checkpoint's whole UNet.
        """
        components = load_sd2_components(pretrained_model_path)
        turbo = is_turbo_base(pretrained_model_path) if turbo is None else turbo
        controlnet, injector, unet, messages = load_seesr_weights(
            seesr_model_path, sd2_unet=components.unet, graft=turbo
        )
        messages = [f"Loading checkpoint from {seesr_model_path}"] + messages
        base_unet = Path(pretrained_model_path) / UNET_FOLDER
        if turbo:
            source = f"{base_unet}" + (" with the checkpoint's image attentions" if unet is not None else "")
            messages.append(f"UNet: {source} (SeeSR-Turbo, as test_seesr_turbo.py: the base folder is a turbo model, "
                            f"its scheduler uses {TURBO_TIMESTEP_SPACING} timestep spacing)")
        elif unet is not None:
            messages.append(f"UNet: {Path(seesr_model_path) / UNET_FOLDER} (the checkpoint's, as test_seesr.py: the base "
                            "folder is not a turbo model)")
        else:
            messages.append(f"UNet: {base_unet} (the checkpoint has no unet/)")
        if unet is not None:
            unet.requires_grad_(False)
        pipeline = cls(
            unet if unet is not None else components.unet, components.vae, components.text_encoder,
            components.tokenizer, components.noise_scheduler, controlnet, injector,
        )
        return pipeline.to(device, dtype), messages

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> SeeSRPipeline:
        """Move the networks; ``dtype`` (e.g. fp16 on CUDA) applies to all but the injector, which stays fp32."""
        for model in (self.unet, self.vae, self.text_encoder, self.controlnet):
            # Only what changes: diffusers warns on every .to(dtype=...) call, even a no-op one.
            if device is not None and torch.device(device) != model.device:
                model.to(device=device)
            if dtype is not None and dtype != model.dtype:
                model.to(dtype=dtype)
            model.eval()
        if self.injector is not None:
            self.injector.to(device=device)
            self.injector.eval()
        return self

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def _prompt_embeddings(self, prompts, embeds, batch: int) -> torch.Tensor:
        if embeds is not None:
            return embeds.to(self.device)
        prompts = [prompts] * batch if isinstance(prompts, str) else list(prompts)
        if len(prompts) != batch:
            raise UserError(f"Expected one prompt or {batch} (one per image), found {len(prompts)}.")
        return encode_prompts(self.tokenizer, self.text_encoder, prompts, self.device)

    def _image_embeddings(self, image_embeds, negative_image_embeds, batch: int, do_guidance: bool):
        """RAM embeddings for the model batch (``[2B, T, D]`` under guidance, negative half first), or None."""
        if image_embeds is None:
            if negative_image_embeds is not None:
                raise UserError("negative_image_embeds were given without image_embeds; give both or neither.")
            return None

        def per_image(states, name):
            if states.ndim != 3 or states.shape[0] not in (1, batch):
                raise UserError(
                    f"Expected {name} of shape [1 or {batch}, tokens, width], found {tuple(states.shape)}."
                )
            return states.expand(batch, -1, -1).to(self.device)

        states = per_image(image_embeds, "image_embeds")
        if do_guidance:
            negative = states if negative_image_embeds is None else per_image(negative_image_embeds, "negative_image_embeds")
            states = torch.cat([negative, states])  # unconditional half first; SeeSR gives both halves the same
        return states

    @torch.no_grad()
    def __call__(
        self,
        lr_upsampled: torch.Tensor,
        prompt: str | list[str] = "",
        added_prompt: str = DEFAULT_ADDED_PROMPT,
        negative_prompt: str = DEFAULT_NEGATIVE_PROMPT,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        image_embeds: torch.Tensor | None = None,
        negative_image_embeds: torch.Tensor | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 5.5,
        conditioning_scale: float = 1.0,
        start_point: str = "lr",
        start_steps: int | None = None,
        lr_start_timestep: int | None = None,
        latent_tiled_size: int = 96,
        latent_tiled_overlap: int = 4,
        tile_batch_size: int = 1,
        vae_encoder_tiled_size: int | None = 1024,
        vae_decoder_tiled_size: int | None = 224,
        align_method: str = "adain",
        generator: torch.Generator | None = None,
        callback: Callable[[int, int, torch.Tensor], None] | None = None,
        progress_bar: bool = False,
        control_schedule: str = "constant",
        control_guidance_start: float = 0.0,
        control_guidance_end: float = 1.0,
        control_scale_start: float = 0.0,
    ) -> torch.Tensor:
        """Super-resolve ``lr_upsampled`` (``[B, 3, H, W]`` in [0, 1], H and W multiples of 8, already at the
        output size) and return ``[B, 3, H, W]`` in [0, 1] (float32, on the pipeline's device).

        Prompts: ``prompt`` (one or one per image) joined with ``added_prompt``, guided against
        ``negative_prompt`` when ``guidance_scale > 1``; ``prompt_embeds``/``negative_prompt_embeds`` replace the
        text (a tagger's output, say). ``image_embeds`` (RAM's ``[B or 1, 145, 512]``) feed SeeSR's image
        attention in both guidance halves (``negative_image_embeds`` for the unconditional half; by default the same
        embeddings, as SeeSR) and in every latent tile; models without image attention ignore them.
        ``start_point``: ``"lr"`` or ``"noise"``. With ``"lr"`` the LR latent is noised to ``start_steps`` (a
        training timestep, 0..999 for SD2; default: the schedule's first timestep; ``lr_start_timestep`` is the same
        setting) and the scheduled steps above it are skipped (SeeSR's ``start_steps``: 999 noises to t=999 and skips
        nothing, 500 runs only the steps t <= 500); ``"noise"`` starts from pure noise and runs every step
        (``start_steps`` is not used). Latent tiles (``latent_tiled_size``/``overlap``, latent px)
        and VAE tiles (encoder: image px, decoder: latent px; ``None`` disables) bound the memory.
        ``callback(step_index, timestep, latents)`` runs after every step. ``control_schedule`` (with
        ``control_guidance_start/end`` or ``control_scale_start``) varies the ControlNet scale over the steps
        (:func:`control_scale_schedule`; the default keeps ``conditioning_scale`` throughout).
        """
        if start_point not in ("lr", "noise"):
            raise UserError(f"Expected --start_point lr or noise, found {start_point!r}.")
        if int(num_inference_steps) < 1:
            raise UserError(f"Expected --num_inference_steps of at least 1, found {num_inference_steps}.")
        if guidance_scale < 0:
            raise UserError(f"Expected --guidance_scale >= 0 (1 or less: no guidance), found {guidance_scale}.")
        if start_steps is not None and lr_start_timestep is not None and int(start_steps) != int(lr_start_timestep):
            raise UserError(
                f"--start_steps {start_steps} and --lr_start_timestep {lr_start_timestep} are the same setting; "
                "give one."
            )
        start_steps = start_steps if start_steps is not None else lr_start_timestep
        last_timestep = self.scheduler.config.num_train_timesteps - 1
        if start_steps is not None and not 0 <= int(start_steps) <= last_timestep:
            raise UserError(
                f"Expected --start_steps (--lr_start_timestep) in 0..{last_timestep} (the training timesteps), "
                f"found {start_steps}."
            )
        if lr_upsampled.ndim == 3:
            lr_upsampled = lr_upsampled[None]
        factor = self.vae_scale_factor
        batch, _, height, width = lr_upsampled.shape
        if height % factor or width % factor:
            raise UserError(
                f"Expected an image size divisible by {factor}, found {height}x{width}; see prepare_lr_image."
            )
        device = self.device
        model_dtype = self.unet.dtype
        image = lr_upsampled.to(device=device, dtype=torch.float32).clamp(0, 1)

        do_guidance = guidance_scale > 1.0
        if prompt_embeds is None:
            prompts = [prompt] * batch if isinstance(prompt, str) else list(prompt)
            prompts = [compose_prompt(text, added_prompt) for text in prompts]
        else:
            prompts = None
        embeds = self._prompt_embeddings(prompts, prompt_embeds, batch)
        if do_guidance:
            negative = self._prompt_embeddings(negative_prompt, negative_prompt_embeds, batch)
            embeds = torch.cat([negative, embeds])  # unconditional half first, as SeeSR
        embeds = embeds.to(model_dtype)
        guidance_image = torch.cat([image, image]) if do_guidance else image
        image_states = self._image_embeddings(image_embeds, negative_image_embeds, batch, do_guidance)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        control_scales = control_scale_schedule(
            self.scheduler, timesteps, conditioning_scale, control_schedule, control_guidance_start,
            control_guidance_end, control_scale_start,
        )
        latent_shape = (batch, self.unet.config.in_channels, height // factor, width // factor)
        noise = randn_tensor(latent_shape, generator=generator, device=device, dtype=torch.float32)
        if start_point == "lr":
            with shared_norm_vae_tiling(self.vae, vae_encoder_tiled_size):
                posterior = self.vae.encode((image * 2 - 1).to(self.vae.dtype)).latent_dist
            lr_latents = posterior.sample(generator).float() * self.vae.config.scaling_factor
            start = int(timesteps[0]) if start_steps is None else int(start_steps)
            start_timesteps = torch.full((batch,), start, device=device, dtype=torch.long)
            latents = self.scheduler.add_noise(lr_latents, noise, start_timesteps)
        else:
            start = None
            latents = noise * self.scheduler.init_noise_sigma

        def predict(latent_tiles, image_tiles, num_tiles, t, scale):
            tile_embeds = embeds.repeat(num_tiles, 1, 1) if num_tiles > 1 else embeds
            tile_images = image_states
            if image_states is not None and num_tiles > 1:
                tile_images = image_states.repeat(num_tiles, 1, 1)  # tiles are stacked tile-major, like the text
            return predict_noise(
                self.unet, self.controlnet, self.injector, latent_tiles, t, tile_embeds, image_tiles, scale,
                image_embeds=tile_images,
            )

        steps = timesteps
        if progress_bar:
            from tqdm.auto import tqdm

            steps = tqdm(timesteps, desc="SeeSR sampling", leave=False)
        for index, t in enumerate(steps):
            if start is not None and int(t) > start:
                continue  # SeeSR's start_steps: the LR latent is already at a lower noise level
            model_input = torch.cat([latents, latents]) if do_guidance else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise_prediction = tiled_prediction(
                lambda tiles, image_tiles, count, t=t, scale=control_scales[index]: predict(
                    tiles, image_tiles, count, t, scale
                ),
                model_input,
                guidance_image,
                latent_tiled_size,
                latent_tiled_overlap,
                tile_batch_size,
            ).float()
            if do_guidance:
                unconditional, conditional = noise_prediction.chunk(2)
                noise_prediction = unconditional + guidance_scale * (conditional - unconditional)
            latents = self.scheduler.step(noise_prediction, t, latents, generator=generator, return_dict=False)[0]
            if callback is not None:
                callback(index, int(t), latents)

        with shared_norm_vae_tiling(self.vae, vae_decoder_tiled_size * factor if vae_decoder_tiled_size else None):
            decoded = self.vae.decode((latents / self.vae.config.scaling_factor).to(self.vae.dtype)).sample
        result = (decoded.float() / 2 + 0.5).clamp(0, 1)
        return apply_color_fix(result, image, align_method)


def pil_bicubic_resize(picture: Image.Image, size: tuple[int, int]) -> Image.Image:
    """``picture`` resized to ``size`` = (height, width) by PIL's bicubic filter, as every resize of SeeSR's
    ``test_seesr.py`` (``Image.resize``'s default for RGB: antialiased when shrinking); the same size is a copy."""
    height, width = size
    return picture.resize((width, height), Image.Resampling.BICUBIC)


def prepare_lr_image(
    lr: torch.Tensor, upscale: int = 4, process_size: int = 512
) -> tuple[torch.Tensor, tuple[int, int]]:
    """SeeSR's input preparation: ``lr`` ``[3, h, w]`` in [0, 1] -> ``([1, 3, H, W], (h * upscale, w * upscale))``.

    As ``test_seesr.py``, on the 8-bit RGB image with PIL's bicubic filter: an image whose short side is below
    ``process_size // upscale`` is first enlarged to it (sides truncated to integers), then resized ``upscale`` times,
    then to the sides rounded down to multiples of 8. The second value is the output size the result is resized
    back to (:func:`super_resolve_image` does).
    """
    from utils.images import pil_to_tensor, tensor_to_pil

    if lr.ndim != 3 or lr.shape[0] != 3:
        raise UserError(f"Expected an RGB image tensor [3, h, w], found shape {tuple(lr.shape)}.")
    height, width = lr.shape[-2:]
    smallest = process_size // upscale
    size = (height, width)
    if width < smallest or height < smallest:
        scale = smallest / min(width, height)
        size = (int(scale * height), int(scale * width))
    upscaled = (size[0] * upscale, size[1] * upscale)
    target = (upscaled[0] // 8 * 8, upscaled[1] // 8 * 8)
    if min(target) < 8:
        raise UserError(f"The image is too small ({width}x{height} px) to super-resolve.")
    picture = tensor_to_pil(lr.float(), (0.0, 1.0))
    for step in (size, upscaled, target):
        picture = pil_bicubic_resize(picture, step)
    return pil_to_tensor(picture, (0.0, 1.0))[None], (height * upscale, width * upscale)


def super_resolve_image(
    pipeline: SeeSRPipeline, lr: torch.Tensor, upscale: int = 4, process_size: int = 512, **call_kwargs
) -> torch.Tensor:
    """One LR image ``[3, h, w]`` in [0, 1] -> its SR image ``[3, h * upscale, w * upscale]`` in [0, 1] (CPU).

    The result is 8-bit (values k / 255) as SeeSR's: the pipeline's output, resized to the output size by PIL's
    bicubic filter when it was processed at another size (:func:`prepare_lr_image`). ``call_kwargs`` go to
    :meth:`SeeSRPipeline.__call__` (prompt, steps, guidance, tiles, generator, ...).
    """
    from utils.images import pil_to_tensor, tensor_to_pil

    lr_upsampled, output_size = prepare_lr_image(lr, upscale, process_size)
    result = pipeline(lr_upsampled, **call_kwargs)[0].float().cpu()
    return pil_to_tensor(pil_bicubic_resize(tensor_to_pil(result, (0.0, 1.0)), output_size), (0.0, 1.0))
