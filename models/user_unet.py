"""Latent UNet conditioned on the user ID by cross-attention: the users' second note, on VA-VAE latents.

Reference: the users' note ("UNet2DConditionModel + UserConditionEncoder, DDPM training, DDIM sampling"),
built from diffusers' ``UNet2DConditionModel`` (Rombach et al., "High-Resolution Image Synthesis with Latent
Diffusion Models", 2022). The user ID becomes one cross-attention token: :class:`UserConditionEncoder` is a
table of ``num_users + 1`` rows of width ``cross_attention_dim`` (the last row is the null user for
classifier-free guidance) returning ``encoder_hidden_states`` of shape (B, 1, D). The users' own encoder has
``num_users`` rows and no null row (they trained without label dropout): ``null_row=False`` holds it, and such
a model samples without guidance.

:func:`load_condition_encoder` reads the users' ``condition_encoder.pt`` as it is: a state dict, or (only with
``trust_pickle``, as ``scripts/convert_ram.py``) a whole pickled module whose class need not be importable here.
Whether the table has a null row is decided from its row count against ``--num_users`` (``num_users`` rows: none,
``num_users + 1``: the last is the null row) or from the ``condition_encoder_config.json`` that
``train_dit_user.py`` writes beside it; any other count is an error that names both readings.

:class:`UserConditionedUNet` joins the two with the same call as the DiT, ``model(x, t, labels)``, so the
objective and the sampler in ``models/user_generation.py`` treat both backbones alike. The training
objective (DDPM noise prediction) and DDIM sampling live there, not here.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from utils.errors import CheckpointError, UserError, one_line


class UserConditionEncoder(ModelMixin, ConfigMixin):
    """User label (0-based row; ``num_users`` = null user) -> one cross-attention token (B, 1, D).

    ``null_row=False``: ``num_users`` rows, no null user (the users' encoder), so no label dropout and no guidance.
    """

    @register_to_config
    def __init__(self, num_users: int, cross_attention_dim: int, dropout_prob: float = 0.1, null_row: bool = True):
        super().__init__()
        if not null_row and dropout_prob > 0:
            raise UserError("A condition encoder without a null row cannot drop labels; use dropout_prob 0 (--cfg_dropout 0).")
        self.embedding = nn.Embedding(num_users + int(null_row), cross_attention_dim)
        nn.init.normal_(self.embedding.weight, std=0.02)

    @property
    def null_label(self) -> int | None:
        return self.config.num_users if self.config.null_row else None

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        # Label dropout for classifier-free guidance happens here in training mode, like the DiT's LabelEmbedder.
        if self.training and self.config.dropout_prob > 0 and self.config.null_row:
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
    def null_label(self) -> int | None:
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
    """A freshly initialised user-conditioned latent UNet of a named size (``default`` or ``tiny``).

    ``dropout_prob`` 0 builds the users' layout: ``num_users`` rows, no null row (nothing would train it).
    """
    if num_users < 1:
        raise UserError(f"num_users must be at least 1, got {num_users}.")
    config = user_unet_config(size, in_channels=in_channels, sample_size=sample_size, **overrides)
    unet = UNet2DConditionModel(**config)
    encoder = UserConditionEncoder(num_users=num_users, cross_attention_dim=config["cross_attention_dim"], dropout_prob=dropout_prob,
                                   null_row=dropout_prob > 0)
    return UserConditionedUNet(unet, encoder)


# --------------------------------------------------------------------------------------------------
# The users' condition_encoder.pt
# --------------------------------------------------------------------------------------------------

ENCODER_CONFIG_SUFFIX = "_config.json"  # condition_encoder.pt -> condition_encoder_config.json (written by train_dit_user.py)


class _UnknownModule(nn.Module):
    """Stands in for a pickled module class that is not importable here (the users' script's own class).

    ``nn.Module.__setstate__`` restores its parameters and submodules, which is all the loader reads.
    """

    def forward(self, *args, **kwargs):  # pragma: no cover - never called
        raise RuntimeError("A stand-in for an unpicklable class cannot run; only its weights are read.")


class _TolerantUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (AttributeError, ImportError):
            return type(name, (_UnknownModule,), {"__module__": __name__})


class _TolerantPickle:
    """A ``pickle_module`` for ``torch.load`` whose unpickler replaces unknown classes by :class:`_UnknownModule`."""

    Unpickler = _TolerantUnpickler
    load = staticmethod(pickle.load)
    __name__ = "pickle"


def read_condition_encoder_state(path: str | Path, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of ``condition_encoder.pt``: a state dict, or a whole pickled module when ``trust_pickle``."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from models.vavae import read_state_dict

        return read_state_dict(path, "condition encoder")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as err:
        if "weights_only" not in str(err) and "Unsupported global" not in str(err):
            raise CheckpointError(f"Cannot read the condition encoder {path} ({type(err).__name__}: {one_line(str(err))}).") from err
        if not trust_pickle:
            raise CheckpointError(
                f"The condition encoder {path} is a pickled module (torch.save(encoder)), which runs code when read; "
                "if the file is yours, pass --trust_pickle to read its weights."
            ) from err
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=_TolerantPickle)
        except Exception as err2:
            raise CheckpointError(f"Cannot unpickle the condition encoder {path} ({type(err2).__name__}: {err2}).") from err2
    if isinstance(state, nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise CheckpointError(f"The condition encoder {path} holds a {type(state).__name__}; expected a state dict or a module.")
    return {key.removeprefix("module."): value for key, value in state.items() if isinstance(value, torch.Tensor)}


def _embedding_table(state: dict[str, torch.Tensor], path: Path) -> torch.Tensor:
    """The user table of an encoder state dict: ``embedding.weight``, or its only (embedding) tensor."""
    if "embedding.weight" in state:
        others = sorted(key for key in state if key != "embedding.weight")
        table = state["embedding.weight"]
    else:
        tables = [key for key, value in state.items() if value.ndim == 2 and "embed" in key.lower()]
        if len(tables) != 1:
            raise CheckpointError(
                f"Condition encoder {path} has no 'embedding.weight' (found {sorted(state)[:8]}); "
                "expected a UserConditionEncoder: one nn.Embedding of width cross_attention_dim."
            )
        others = sorted(key for key in state if key != tables[0])
        table = state[tables[0]]
    if others:
        raise CheckpointError(
            f"Condition encoder {path} holds more than a user table ({', '.join(others[:6])}); "
            "only an nn.Embedding encoder (the users' note) is supported."
        )
    return table.float()


def load_condition_encoder(
    path: str | Path, num_users: int, cross_attention_dim: int, *, trust_pickle: bool = False
) -> UserConditionEncoder:
    """A condition encoder from a diffusers folder or a ``condition_encoder.pt``/``.safetensors``.

    With ``num_users`` rows the table has no null row (the users' encoder: no guidance); with ``num_users + 1``
    the last row is the null user. ``condition_encoder_config.json`` beside the file, when present, says which.
    Any other row count or width is a CheckpointError (never a silently re-initialised encoder, which would
    generate unconditioned samples, and never a table read one user short).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"Condition encoder {path} does not exist; expected condition_encoder.pt beside the UNet.")
    recorded = None
    if path.is_dir():
        encoder = UserConditionEncoder.from_pretrained(str(path), local_files_only=True)
        recorded = dict(encoder.config)
    else:
        table = _embedding_table(read_condition_encoder_state(path, trust_pickle), path)
        config_file = path.with_name(path.stem + ENCODER_CONFIG_SUFFIX)
        if config_file.is_file():
            recorded = json.loads(config_file.read_text())
            null_row = bool(recorded.get("null_row", True))
            if table.shape[0] != int(recorded["num_users"]) + int(null_row):
                raise CheckpointError(f"{config_file} records {recorded['num_users']} users but {path} has {table.shape[0]} rows; "
                                      "they were not saved together.")
        else:
            null_row = table.shape[0] == num_users + 1
        encoder = UserConditionEncoder(num_users=table.shape[0] - int(null_row), cross_attention_dim=table.shape[1],
                                       dropout_prob=0.0, null_row=null_row)
        encoder.embedding.weight.data.copy_(table)
    rows, width = encoder.embedding.weight.shape
    if width != cross_attention_dim:
        raise CheckpointError(f"Condition encoder {path} gives {width}-wide tokens but the UNet cross-attends to {cross_attention_dim}; "
                              "use the encoder saved with this UNet.")
    if encoder.config.num_users != num_users:
        if recorded is not None:
            raise UserError(f"--num_users {num_users} disagrees with the {encoder.config.num_users} users recorded with {path}; "
                            f"pass --num_users {encoder.config.num_users}.")
        raise UserError(
            f"Condition encoder {path} has {rows} rows, but --num_users {num_users} needs {num_users} (one per user, the note's "
            f"encoder) or {num_users + 1} (users + a null row); give --num_users the number of users it was trained on "
            f"({rows} when every row is a user)."
        )
    return encoder
