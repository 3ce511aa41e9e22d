"""Latent UNet conditioned on the user ID by cross-attention: the users' second note, on VA-VAE latents.

Reference: the users' note ("UNet2DConditionModel + UserConditionEncoder, DDPM training, DDIM sampling"),
built from diffusers' ``UNet2DConditionModel`` (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022). The user ID becomes one cross-attention token: :class:`UserConditionEncoder` is a
table of ``num_users + 1`` rows of width ``cross_attention_dim`` (the last row is the null user for
classifier-free guidance) returning ``encoder_hidden_states`` of shape (B, 1, D).

:class:`UserConditionedUNet` joins the two with the same call as the DiT, ``model(x, t, labels)``, so the
objective and the sampler in ``models/user_generation.py`` treat both backbones alike. The training
objective (DDPM noise prediction) and DDIM sampling live there, not here.
"""

from __future__ import annotations

from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from utils.errors import CheckpointError, UserError


class UserConditionEncoder(ModelMixin, ConfigMixin):
    """User label (0-based row; ``num_users`` = null user) -> one cross-attention token (B, 1, D)."""

    @register_to_config
    def __init__(self, num_users: int, cross_attention_dim: int, dropout_prob: float = 0.1):
        super().__init__()
        self.embedding = nn.Embedding(num_users + 1, cross_attention_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def null_label(self) -> int:
        return self.config.num_users

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Label dropout for classifier-free guidance happens here in training mode, like the DiT's LabelEmbedder.
        if self.training and self.config.dropout_prob > 0:
            drop = torch.rand(labels.shape[0], device=labels.device) < self.config.dropout_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_label), labels)
        return self.embedding(labels).unsqueeze(1)


UNET_SIZES = {
    # For 32x16x16 VA-VAE latents: 16 -> 8 -> 4 px, attention at 16 and 8 px and in the mid block (~115M parameters).
    "default": dict(
        block_out_channels=(192, 384, 576),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=2,
        cross_attention_dim=512,
        attention_head_dim=8,
        norm_num_groups=32,
    ),
    "tiny": dict(
        block_out_channels=(32, 64),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=4,
        norm_num_groups=8,
    ),
}


def user_unet_config(size: str = "default", *, in_channels: int = 32, sample_size: int = 16, **overrides) -> dict:
    """JSON-able ``UNet2DConditionModel`` arguments for a named size on ``in_channels`` x ``sample_size``^2 latents."""
    if size not in UNET_SIZES:
        raise UserError(f"Unknown UNet size {size!r}; choose one of {', '.join(UNET_SIZES)}.")
    config = dict(UNET_SIZES[size], in_channels=in_channels, out_channels=in_channels, sample_size=sample_size)
    config.update(overrides)
    return config


class UserConditionedUNet(nn.Module):
    """``UNet2DConditionModel`` + :class:`UserConditionEncoder` called as ``model(x, timesteps, labels)``."""

    def __init__(self, unet: UNet2DConditionModel, condition_encoder: UserConditionEncoder):
        super().__init__()
        if unet.config.cross_attention_dim != condition_encoder.config.cross_attention_dim:
            raise CheckpointError(
                f"The condition encoder gives {condition_encoder.config.cross_attention_dim}-wide tokens but the UNet "
                f"cross-attends to {unet.config.cross_attention_dim}; use the encoder saved with this UNet."
            )
        self.unet = unet
        self.condition_encoder = condition_encoder

    @property
    def num_users(self) -> int:
        return self.condition_encoder.config.num_users

    @property
    def null_label(self) -> int:
        return self.condition_encoder.null_label

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.unet(x, timesteps, encoder_hidden_states=self.condition_encoder(labels)).sample

    def save_pretrained(self, directory: str | Path) -> None:
        """``directory/unet`` and ``directory/condition_encoder`` as diffusers folders (safetensors + config)."""
        directory = Path(directory)
        self.unet.save_pretrained(directory / "unet")
        self.condition_encoder.save_pretrained(directory / "condition_encoder")

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> UserConditionedUNet:
        directory = Path(directory)
        for part in ("unet", "condition_encoder"):
            if not (directory / part / "config.json").is_file():
                raise CheckpointError(f"{directory / part} is not a diffusers model folder; expected {part}/ inside {directory}.")
        unet = UNet2DConditionModel.from_pretrained(str(directory / "unet"), local_files_only=True)
        encoder = UserConditionEncoder.from_pretrained(str(directory / "condition_encoder"), local_files_only=True)
        return cls(unet, encoder)


def build_user_unet(
    size: str = "default", *, num_users: int, in_channels: int = 32, sample_size: int = 16, dropout_prob: float = 0.1, **overrides
) -> UserConditionedUNet:
    """A freshly initialised user-conditioned latent UNet of a named size (``default`` or ``tiny``)."""
    if num_users < 1:
        raise UserError(f"num_users must be at least 1, got {num_users}.")
    config = user_unet_config(size, in_channels=in_channels, sample_size=sample_size, **overrides)
    unet = UNet2DConditionModel(**config)
    encoder = UserConditionEncoder(num_users=num_users, cross_attention_dim=config["cross_attention_dim"], dropout_prob=dropout_prob)
    return UserConditionedUNet(unet, encoder)


def load_condition_encoder(path: str | Path, num_users: int, cross_attention_dim: int) -> UserConditionEncoder:
    """A condition encoder from a diffusers folder or a ``condition_encoder.pt``/``.safetensors`` state dict.

    The table must have exactly ``num_users + 1`` rows of width ``cross_attention_dim``; anything else is a
    CheckpointError (never a silently re-initialised encoder, which would generate unconditioned samples).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Condition encoder {path} does not exist; expected condition_encoder.pt beside the UNet.")
    if path.is_dir():
        encoder = UserConditionEncoder.from_pretrained(str(path), local_files_only=True)
    else:
        from models.vavae import read_state_dict

        state = read_state_dict(path, "condition encoder")
        state = state.get("state_dict", state) if isinstance(state, dict) else state
        if not isinstance(state, dict) or "embedding.weight" not in state:
            found = sorted(state)[:8] if isinstance(state, dict) else type(state).__name__
            raise CheckpointError(
                f"Condition encoder {path} has no 'embedding.weight' (found {found}); "
                "expected a UserConditionEncoder state dict."
            )
        encoder = UserConditionEncoder(
            num_users=state["embedding.weight"].shape[0] - 1, cross_attention_dim=state["embedding.weight"].shape[1]
        )
        encoder.load_state_dict(state, strict=True)
    rows, width = encoder.embedding.weight.shape
    if rows != num_users + 1 or width != cross_attention_dim:
        raise CheckpointError(
            f"Condition encoder {path} has {rows} rows of width {width}, but {num_users} users (+1 null row) of width "
            f"{cross_attention_dim} are expected; pass the --num_users it was trained with and the encoder saved with this UNet."
        )
    return encoder
