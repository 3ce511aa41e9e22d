"""Timestep-adaptive multi-scale condition injector for SeeSR-style ControlNet super-resolution.

The users' idea ("Timestep-adaptive condition control", summarised in ``docs/seesr.md``): between a ControlNet
branch and the frozen Stable Diffusion UNet, scale every ControlNet residual by

    residual' = residual * s[level] * w(t)

* ``s`` -- the *multi-scale* part: one learnable weight per ControlNet residual (``grouping="tensor"``, 13 for
  SD2: 12 down residuals + mid) or per resolution level (``grouping="level"``, 5 for SD2: the 4 latent
  resolutions 64/32/16/8 px at 512 px input + the mid residual), stored as ``scale_weights.weights``;
* ``w(t)`` -- the *timestep-adaptive* part, indexed by the training timestep ``t`` in ``0..999`` (not by the
  sampler's step number): a learnable lookup table or a small MLP on a sinusoidal timestep embedding, shared
  by all residuals or one curve per level/residual, stored under ``timestep_weights.*``.

Both parts are the identity at initialisation (a table of ones; an MLP producing ``1 + zero-initialised
term``), so a fresh injector reproduces the plain ControlNet bit for bit. The weights stay in fp32 and are cast
to the residuals' dtype when applied.

Variants are the entries of :data:`INJECTORS` (``--injector``): ``baseline`` (no injector), ``timestep_only`` and
``timestep_multiscale``. A new variant is one ``INJECTORS.register`` call naming its module class and the
constructor arguments that make it that variant (``docs/extending.md``).

Related work: TASR (Lin et al., "TASR: Timestep-Aware Diffusion Model for Image Super-Resolution",
arXiv:2412.03355, https://github.com/SleepyLin/TASR) gates every ControlNet residual with a timestep-aware
adapter (``2 * sigmoid(adapter(features, t_emb))``, spatial and channel-wise). The injector here is the scalar,
much cheaper relative of that idea. Hand-set schedules are the other baselines: diffusers'
``control_guidance_start/end`` (a 0/1 window over steps) and SUPIR's control scale linear in the noise level.

Checkpoint layout (its own folder, never inside the UNet or ControlNet state dicts)::

    checkpoint-<step>/multi_scale_injector/
        config.json          # the module's ConfigMixin config: its registry key ("variant") and constructor arguments
        model.safetensors    # the state dict
        pytorch_model.bin    # the same state dict written with torch.save (the users' file name)

:func:`load_injector` builds the module from config.json (``from_config`` of the variant's class) and loads the
state dict strictly. Folders written before the variant was recorded are rebuilt from the state dict's keys and
shapes (:func:`_injector_config_from_state`, the one fallback); without the folder it returns ``None`` (identity
weights, standard SeeSR inference).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from utils.checkpoint import atomic_write
from utils.errors import CheckpointError, UserError
from utils.registry import Registry

INJECTOR_FOLDER = "multi_scale_injector"
INJECTOR_BIN_NAME = "pytorch_model.bin"
INJECTOR_SAFETENSORS_NAME = "model.safetensors"
INJECTOR_CONFIG_NAME = "config.json"

TIMESTEP_WEIGHT_KINDS = ("table", "mlp")
GROUPINGS = ("tensor", "level")

# The log lines the users' note promises; load_injector returns them as messages.
MESSAGE_INJECTOR_LOADED = "✓ Multi-scale injector loaded"
# Word for word as the note's log shows them (users compare logs), "(if applicable)" included; printed only when the
# checkpoint has timestep weights.
MESSAGE_TIMESTEP_WEIGHTS_LOADED = "✓ Timestep adaptive weights loaded (if applicable)"


def controlnet_residual_levels(num_down_blocks: int = 4, layers_per_block: int = 2) -> list[int]:
    """Resolution level of every down residual a diffusers ControlNet returns.

    The ControlNet returns the conv_in output, then per down block ``layers_per_block`` resnet outputs and (all
    but the last block) the downsampler output, which already lives one level lower. SD2 (4 blocks, 2 layers)
    gives ``[0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]``: 12 residuals, 3 per latent resolution.
    """
    levels = [0]
    for block in range(num_down_blocks):
        levels += [block] * layers_per_block
        if block < num_down_blocks - 1:
            levels.append(block + 1)
    return levels


SD2_RESIDUAL_LEVELS = tuple(controlnet_residual_levels(4, 2))


def residual_levels_of(model) -> list[int]:
    """:func:`controlnet_residual_levels` for a diffusers ControlNetModel or UNet2DConditionModel (its config)."""
    config = model.config
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise UserError(f"Expected an integer layers_per_block in the ControlNet config, found {layers!r}.")
    return controlnet_residual_levels(len(config.down_block_types), layers)


def _timesteps_as_tensor(timesteps, device: torch.device) -> torch.Tensor:
    """A 0-d or 1-d tensor of timesteps on ``device`` (accepts Python numbers)."""
    if not torch.is_tensor(timesteps):
        timesteps = torch.tensor(timesteps)
    if timesteps.ndim > 1:
        raise UserError(
            f"Expected a scalar timestep or a [B] vector of timesteps, found shape {tuple(timesteps.shape)}."
        )
    return timesteps.to(device)


class TimestepWeightTable(nn.Module):
    """w(t) as a learnable lookup table over the training timesteps, initialised to ones.

    ``num_bins`` bins cover ``0..num_train_timesteps-1`` evenly; the default (one bin per training timestep) is
    the plain table of the users' note. Fewer bins share each entry between neighbouring timesteps, so every
    entry sees more training samples.
    """

    def __init__(self, num_weights: int = 1, num_train_timesteps: int = 1000, num_bins: int | None = None):
        super().__init__()
        num_bins = num_train_timesteps if num_bins is None else num_bins
        if not 1 <= num_bins <= num_train_timesteps:
            raise UserError(
                f"Expected 1 <= num_bins <= {num_train_timesteps} for the timestep table, found {num_bins}."
            )
        self.num_weights = num_weights
        self.num_train_timesteps = num_train_timesteps
        self.num_bins = num_bins
        self.table = nn.Parameter(torch.ones(num_bins, num_weights))

    def get_weight_at_step(self, timesteps) -> torch.Tensor:
        """Weights at training timestep(s) ``t``: ``[num_weights]`` for a scalar, ``[B, num_weights]`` for ``[B]``."""
        t = _timesteps_as_tensor(timesteps, self.table.device)
        scalar = t.ndim == 0
        t = t.reshape(-1).round().long().clamp(0, self.num_train_timesteps - 1)
        bins = torch.div(t * self.num_bins, self.num_train_timesteps, rounding_mode="floor")
        # index_select with a 1-d index: indexing with a 0-d CUDA tensor would call .item() and stall the host
        # between the ControlNet and the UNet.
        weights = self.table.float().index_select(0, bins)
        return weights[0] if scalar else weights


class TimestepWeightMLP(nn.Module):
    """w(t) = 1 + MLP(sinusoidal embedding of t), the last layer zero-initialised (identity at start)."""

    def __init__(
        self,
        num_weights: int = 1,
        num_train_timesteps: int = 1000,
        embedding_dim: int = 128,
        hidden_dim: int = 64,
    ):
        super().__init__()
        self.num_weights = num_weights
        self.num_train_timesteps = num_train_timesteps
        self.embedding_dim = embedding_dim
        self.mlp = nn.Sequential(nn.Linear(embedding_dim, hidden_dim), nn.SiLU(), nn.Linear(hidden_dim, num_weights))
        # Zero weight and bias make the correction exactly 0.0, so 1 + 0 is bit-exact identity at initialisation
        # (the adaLN-zero trick); the first layer starts learning once the last one moves off zero.
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def get_weight_at_step(self, timesteps) -> torch.Tensor:
        """Weights at training timestep(s) ``t``: ``[num_weights]`` for a scalar, ``[B, num_weights]`` for ``[B]``."""
        device = self.mlp[0].weight.device
        t = _timesteps_as_tensor(timesteps, device)
        scalar = t.ndim == 0
        # Same embedding as SD's UNet time_proj (flip_sin_to_cos=True, freq_shift=0), computed in fp32 even
        # under autocast so the weights never pick up half-precision round-off.
        with torch.autocast(device_type=device.type, enabled=False):
            embedding = get_timestep_embedding(
                t.reshape(-1).float(), self.embedding_dim, flip_sin_to_cos=True, downscale_freq_shift=0
            )
            first, last = self.mlp[0], self.mlp[2]
            hidden = F.silu(F.linear(embedding, first.weight.float(), first.bias.float()))
            weights = 1.0 + F.linear(hidden, last.weight.float(), last.bias.float())
        return weights[0] if scalar else weights


def create_timestep_adaptive_weights(
    kind: str = "table",
    num_weights: int = 1,
    num_train_timesteps: int = 1000,
    num_bins: int | None = None,
    embedding_dim: int = 128,
    hidden_dim: int = 64,
) -> nn.Module:
    """Build w(t): ``kind="table"`` (lookup table, ``num_bins``) or ``"mlp"`` (``embedding_dim``, ``hidden_dim``).

    ``num_weights`` is the number of curves (1 = shared by all residuals). The returned module has
    ``get_weight_at_step(t)`` indexed by the training timestep ``0..num_train_timesteps-1``.
    """
    if kind == "table":
        return TimestepWeightTable(num_weights, num_train_timesteps, num_bins)
    if kind == "mlp":
        return TimestepWeightMLP(num_weights, num_train_timesteps, embedding_dim, hidden_dim)
    raise UserError(f"Expected timestep weights kind 'table' or 'mlp', found {kind!r}.")


class ScaleWeights(nn.Module):
    """One learnable weight per residual group (per residual or per level), initialised to ones."""

    def __init__(self, num_weights: int):
        super().__init__()
        self.weights = nn.Parameter(torch.ones(num_weights))


class MultiScaleInjector(ModelMixin, ConfigMixin):
    """Scales the ControlNet residuals by per-level weights and timestep-adaptive weights w(t).

    Args:
        residual_levels: resolution level of each down residual (:func:`controlnet_residual_levels`); the mid
            residual is appended as its own group.
        grouping: ``"tensor"`` (one group per residual, 13 for SD2) or ``"level"`` (one per level + mid, 5 for SD2).
        use_scale_weights: learn ``scale_weights.weights`` (the multi-scale part).
        timestep_weights_kind: ``"table"``, ``"mlp"`` or ``None`` (no timestep-adaptive part, ``timestep_weights.*``).
        timestep_weights_shared: one w(t) curve for all residuals, else one per group.
        num_train_timesteps, table_bins, mlp_embedding_dim, mlp_hidden_dim: see
            :func:`create_timestep_adaptive_weights`.
        variant: the :data:`INJECTORS` key it was built as, recorded in config.json so loading rebuilds the same
            variant (``None``: a folder from before the key was recorded that matches no registered variant).
    """

    config_name = INJECTOR_CONFIG_NAME

    @register_to_config
    def __init__(
        self,
        residual_levels: list[int] | tuple[int, ...] = SD2_RESIDUAL_LEVELS,
        grouping: str = "level",
        use_scale_weights: bool = True,
        timestep_weights_kind: str | None = "table",
        timestep_weights_shared: bool = True,
        num_train_timesteps: int = 1000,
        table_bins: int | None = None,
        mlp_embedding_dim: int = 128,
        mlp_hidden_dim: int = 64,
        variant: str | None = None,
    ):
        super().__init__()
        if grouping not in GROUPINGS:
            raise UserError(f"Expected injector grouping 'tensor' or 'level', found {grouping!r}.")
        if timestep_weights_kind is not None and timestep_weights_kind not in TIMESTEP_WEIGHT_KINDS:
            raise UserError(f"Expected timestep weights 'table', 'mlp' or None, found {timestep_weights_kind!r}.")
        if not use_scale_weights and timestep_weights_kind is None:
            raise UserError(
                "An injector needs scale weights, timestep weights or both; use no injector for the baseline."
            )
        residual_levels = [int(level) for level in residual_levels]
        self.num_residuals = len(residual_levels) + 1  # + mid
        if grouping == "tensor":
            groups = list(range(self.num_residuals))
        else:
            mid_group = max(residual_levels) + 1
            groups = residual_levels + [mid_group]
        self.num_groups = max(groups) + 1
        # Which group's weight each residual (12 down + mid) uses.
        self.register_buffer("residual_group", torch.tensor(groups, dtype=torch.long), persistent=False)

        self.scale_weights = ScaleWeights(self.num_groups) if use_scale_weights else None
        if timestep_weights_kind is None:
            self.timestep_weights = None
        else:
            self.timestep_weights = create_timestep_adaptive_weights(
                timestep_weights_kind,
                num_weights=1 if timestep_weights_shared else self.num_groups,
                num_train_timesteps=num_train_timesteps,
                num_bins=table_bins,
                embedding_dim=mlp_embedding_dim,
                hidden_dim=mlp_hidden_dim,
            )

    @property
    def variant(self) -> str | None:
        """The :data:`INJECTORS` key this injector was built as (recorded in its config)."""
        return self.config.variant

    def group_labels(self) -> list[str]:
        """A readable name per weight group, for plots and logs."""
        if self.config.grouping == "tensor":
            levels = list(self.config.residual_levels)
            return [f"down {i} (level {level})" for i, level in enumerate(levels)] + ["mid"]
        return [f"level {level}" for level in range(self.num_groups - 1)] + ["mid"]

    def get_weight_at_step(self, timesteps) -> torch.Tensor:
        """w(t) alone per group: ``[num_groups]`` for a scalar t, ``[B, num_groups]`` for ``[B]`` (ones if absent)."""
        device = self.residual_group.device
        t = _timesteps_as_tensor(timesteps, device)
        if self.timestep_weights is None:
            shape = (self.num_groups,) if t.ndim == 0 else (t.shape[0], self.num_groups)
            return torch.ones(shape, device=device)
        weights = self.timestep_weights.get_weight_at_step(t)
        return weights.expand(*weights.shape[:-1], self.num_groups) if weights.shape[-1] == 1 else weights

    def residual_weights(self, timesteps) -> torch.Tensor:
        """Combined fp32 weight of every residual: ``[13]`` for a scalar t, ``[B, 13]`` for ``[B]`` (SD2)."""
        group = self.residual_group
        weights = None
        if self.scale_weights is not None:
            weights = self.scale_weights.weights.float()[group]
        if self.timestep_weights is not None:
            timestep_weights = self.timestep_weights.get_weight_at_step(timesteps)
            if timestep_weights.shape[-1] == 1:
                timestep_weights = timestep_weights.expand(*timestep_weights.shape[:-1], self.num_residuals)
            else:
                timestep_weights = timestep_weights[..., group]
            weights = timestep_weights if weights is None else weights * timestep_weights
        return weights

    def forward(self, down_residuals, mid_residual: torch.Tensor, timesteps):
        """Scale ``(down_residuals, mid_residual)`` for ``timesteps`` (a scalar at inference, ``[B]`` in training)."""
        down_residuals = list(down_residuals)
        if len(down_residuals) + 1 != self.num_residuals:
            raise UserError(
                f"The injector was built for {self.num_residuals - 1} down residuals + mid, the ControlNet returned "
                f"{len(down_residuals)}; build it with residual_levels_of(controlnet)."
            )
        weights = self.residual_weights(timesteps)
        residuals = down_residuals + [mid_residual]
        batch = residuals[0].shape[0]
        if weights.ndim == 2 and weights.shape[0] not in (1, batch):
            raise UserError(
                f"Expected one timestep or one per sample ({batch}) for the injector, found {weights.shape[0]}."
            )
        # One cast for all residuals (they share a dtype): a weight of exactly 1.0 survives the cast to fp16/bf16
        # and multiplies bit-exactly; the per-residual slices below are views, not kernels.
        weights_by_dtype = {}
        scaled = []
        for index, residual in enumerate(residuals):
            if residual.dtype not in weights_by_dtype:
                weights_by_dtype[residual.dtype] = weights.to(residual.dtype)
            weight = weights_by_dtype[residual.dtype][..., index]
            if weight.ndim == 1:
                weight = weight.view(-1, *([1] * (residual.ndim - 1)))
            scaled.append(residual * weight)
        return scaled[:-1], scaled[-1]

    @torch.no_grad()
    def timestep_weight_curves(self, timesteps: torch.Tensor | None = None):
        """``(t, w [T, num_groups], labels)`` for plotting w(t) over ``t = 0..num_train_timesteps-1``."""
        if timesteps is None:
            timesteps = torch.arange(self.config.num_train_timesteps)
        timesteps = timesteps.to(self.residual_group.device)
        return timesteps.cpu(), self.get_weight_at_step(timesteps).float().cpu(), self.group_labels()


# ------------------------------------------------------------------------------------------------ variants


@dataclass(frozen=True)
class InjectorVariant:
    """One ``--injector`` choice: the module class it builds (``None``: no injector, the plain ControlNet) and the
    constructor arguments that make it this variant; the injector flags (:func:`build_injector`) fill in the rest,
    each only where the class's constructor takes it."""

    model_class: type | None
    fixed: dict = field(default_factory=dict)

    def build(self, name: str, residual_levels, **options) -> nn.Module | None:
        if self.model_class is None:
            return None
        accepted = inspect.signature(self.model_class.__init__).parameters
        options = {key: value for key, value in options.items() if key in accepted}
        return self.model_class(residual_levels=list(residual_levels), **options, **self.fixed, variant=name)


INJECTORS: Registry[InjectorVariant] = Registry("injector", flag="--injector")
INJECTORS.register("baseline", InjectorVariant(None), help="plain ControlNet, no injector (SeeSR)")
INJECTORS.register("timestep_only", InjectorVariant(MultiScaleInjector, {"use_scale_weights": False}),
                   help="residuals * w(t)")
INJECTORS.register("timestep_multiscale", InjectorVariant(MultiScaleInjector, {"use_scale_weights": True}),
                   help="residuals * s[level] * w(t) (default)")


def build_injector(
    variant: str,
    residual_levels=SD2_RESIDUAL_LEVELS,
    timestep_weights: str = "table",
    grouping: str = "level",
    timestep_weights_shared: bool = True,
    **kwargs,
) -> nn.Module | None:
    """The injector registered as ``variant`` in :data:`INJECTORS` (``baseline`` gives ``None``), built for the
    ControlNet's ``residual_levels`` with the injector flags' values."""
    return INJECTORS.get(variant).build(
        variant, residual_levels, timestep_weights_kind=timestep_weights, grouping=grouping,
        timestep_weights_shared=timestep_weights_shared, **kwargs,
    )


def describe_injector(injector) -> str:
    """One line: the scale weights and w(t) at a few timesteps (for training logs)."""
    parts = []
    if getattr(injector, "scale_weights", None) is not None:
        weights = injector.scale_weights.weights.detach().float().cpu().tolist()
        parts.append("s = [" + ", ".join(f"{w:.3f}" for w in weights) + "]")
    if getattr(injector, "timestep_weights", None) is not None:
        for t in (999, 500, 1):
            weights = injector.get_weight_at_step(t).detach().float().cpu()
            shown = f"{weights[0]:.3f}" if injector.config.timestep_weights_shared else (
                "[" + ", ".join(f"{w:.3f}" for w in weights.tolist()) + "]")
            parts.append(f"w({t}) = {shown}")
    return "injector " + (", ".join(parts) or f"{injector.variant} ({type(injector).__name__})")


# ------------------------------------------------------------------------------------------------ save / load


def _unwrap(module: nn.Module) -> nn.Module:
    """Strip DDP (``.module``) and torch.compile (``._orig_mod``) wrappers."""
    while True:
        if hasattr(module, "_orig_mod"):
            module = module._orig_mod
        elif hasattr(module, "module") and isinstance(module.module, nn.Module):
            module = module.module
        else:
            return module


def save_injector(injector: nn.Module, checkpoint_dir: str | Path) -> Path:
    """Write ``checkpoint_dir/multi_scale_injector/`` (config.json, model.safetensors, pytorch_model.bin)."""
    from safetensors.torch import save_file

    injector = _unwrap(injector)
    folder = Path(checkpoint_dir) / INJECTOR_FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in injector.state_dict().items()}
    # Each file through a temporary name and a rename: a crash while saving never leaves half a file.
    atomic_write(folder / INJECTOR_SAFETENSORS_NAME, lambda path: save_file(state, str(path)))
    atomic_write(folder / INJECTOR_BIN_NAME, lambda path: torch.save(state, path))
    atomic_write(folder / INJECTOR_CONFIG_NAME, lambda path: path.write_text(injector.to_json_string()))
    return folder


def read_injector_state(folder: str | Path) -> tuple[dict[str, torch.Tensor], Path]:
    """The injector state dict in ``folder``: ``model.safetensors`` first, then ``pytorch_model.bin`` (safe load)."""
    folder = Path(folder)
    safetensors_path = folder / INJECTOR_SAFETENSORS_NAME
    bin_path = folder / INJECTOR_BIN_NAME
    diffusers_path = folder / "diffusion_pytorch_model.safetensors"  # written by save_pretrained
    if safetensors_path.is_file() or diffusers_path.is_file():
        from safetensors.torch import load_file

        path = safetensors_path if safetensors_path.is_file() else diffusers_path
        try:
            return load_file(str(path), device="cpu"), path
        except Exception as error:  # a truncated or foreign file
            raise CheckpointError(f"Cannot read injector weights {path}: {error}. Re-save the checkpoint.") from None
    if bin_path.is_file():
        try:
            state = torch.load(bin_path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise CheckpointError(
                f"Cannot read injector weights {bin_path} as a plain state dict ({error}); "
                "expected tensors saved with torch.save(state_dict)."
            ) from None
        for key in ("state_dict", "model"):  # state dicts wrapped by some trainers
            if isinstance(state, dict) and isinstance(state.get(key), dict):
                state = state[key]
        if not isinstance(state, dict) or not all(torch.is_tensor(value) for value in state.values()):
            raise CheckpointError(f"Expected a dict of tensors in {bin_path}, found {type(state).__name__}.")
        return state, bin_path
    raise CheckpointError(
        f"Expected {INJECTOR_SAFETENSORS_NAME} or {INJECTOR_BIN_NAME} in {folder}, found neither; "
        "the injector folder is incomplete (re-save the checkpoint or delete the folder to run without it)."
    )


def _injector_config_from_state(
    state: dict[str, torch.Tensor], saved_config: dict, residual_levels, messages: list[str]
) -> dict:
    """MultiScaleInjector's arguments rebuilt from the state dict's keys and shapes (+ an older config.json if any).

    The fallback for folders written before config.json recorded the variant: the users' older
    ``pytorch_model.bin``-only format included. The variant is named where the structure is one of
    :data:`INJECTORS`' (scale and timestep weights: ``timestep_multiscale``; timestep weights alone:
    ``timestep_only``); scale weights alone match no registered variant and load with ``variant=None``.
    """
    unknown = [key for key in state if not key.startswith(("scale_weights.", "timestep_weights."))]
    if unknown:
        raise CheckpointError(
            f"Unexpected keys in the injector checkpoint: {', '.join(sorted(unknown)[:5])}; expected only "
            "scale_weights.weights and timestep_weights.*."
        )
    levels = list(saved_config.get("residual_levels") or residual_levels or SD2_RESIDUAL_LEVELS)
    num_residuals = len(levels) + 1
    num_levels = max(levels) + 2

    def grouping_for(count: int, what: str) -> str:
        if count == num_residuals:
            return "tensor"
        if count == num_levels:
            return "level"
        raise CheckpointError(
            f"The injector checkpoint has {count} {what}, expected {num_residuals} (one per residual) or "
            f"{num_levels} (one per level + mid) for a ControlNet with {num_residuals - 1} down residuals."
        )

    config = {"residual_levels": levels}
    for key in ("num_train_timesteps",):
        if key in saved_config:
            config[key] = saved_config[key]

    has_scale = "scale_weights.weights" in state
    config["use_scale_weights"] = has_scale
    if has_scale:
        config["grouping"] = grouping_for(state["scale_weights.weights"].numel(), "scale weights")

    timestep_keys = [key for key in state if key.startswith("timestep_weights.")]
    if "timestep_weights.table" in state:
        table = state["timestep_weights.table"]
        if table.ndim != 2:
            raise CheckpointError(
                f"Expected timestep_weights.table of shape [bins, curves], found {tuple(table.shape)}."
            )
        config.update(timestep_weights_kind="table", table_bins=table.shape[0])
        curves = table.shape[1]
        config.setdefault("num_train_timesteps", max(1000, table.shape[0]))
    elif "timestep_weights.mlp.0.weight" in state and "timestep_weights.mlp.2.weight" in state:
        first, last = state["timestep_weights.mlp.0.weight"], state["timestep_weights.mlp.2.weight"]
        config.update(timestep_weights_kind="mlp", mlp_embedding_dim=first.shape[1], mlp_hidden_dim=first.shape[0])
        curves = last.shape[0]
    elif timestep_keys:
        raise CheckpointError(
            f"Unrecognised timestep weights in the injector checkpoint ({', '.join(sorted(timestep_keys)[:4])}); "
            "expected timestep_weights.table or timestep_weights.mlp.{0,2}.*."
        )
    else:
        config["timestep_weights_kind"] = None
        curves = 0
        if saved_config.get("timestep_weights_kind"):
            messages.append(
                f"config.json names timestep weights ({saved_config['timestep_weights_kind']}) but the weights "
                "file has none: loading the scale weights only."
            )

    if curves:
        config["timestep_weights_shared"] = curves == 1
        if curves > 1:
            curve_grouping = grouping_for(curves, "timestep weight curves")
            if has_scale and curve_grouping != config["grouping"]:
                raise CheckpointError("The injector's scale weights and timestep curves use different groupings.")
            config["grouping"] = curve_grouping
    if not has_scale and not curves:
        raise CheckpointError("The injector checkpoint holds neither scale_weights.weights nor timestep_weights.*.")
    config.setdefault("grouping", saved_config.get("grouping", "level"))
    if curves:
        config["variant"] = "timestep_multiscale" if has_scale else "timestep_only"
    return config


def _injector_from_record(saved_config: dict, config_path: Path) -> nn.Module:
    """The injector config.json describes: its recorded variant's class, built with ``from_config``."""
    variant = saved_config["variant"]
    if variant not in INJECTORS or INJECTORS.get(variant).model_class is None:
        raise CheckpointError(
            f"{config_path} records injector variant {variant!r}, which is not one of {', '.join(INJECTORS.names())}; "
            "load it with the code that registered that variant."
        )
    model_class = INJECTORS.get(variant).model_class
    if saved_config.get("_class_name", model_class.__name__) != model_class.__name__:
        raise CheckpointError(
            f"{config_path} describes a {saved_config['_class_name']}, but variant {variant!r} builds a "
            f"{model_class.__name__}; load it with the code that wrote it."
        )
    try:
        return model_class.from_config(saved_config)
    except (TypeError, ValueError, UserError) as error:
        raise CheckpointError(f"Cannot build the injector described by {config_path}: {error}") from None


def load_injector(
    checkpoint_dir: str | Path, residual_levels=None
) -> tuple[MultiScaleInjector | None, list[str]]:
    """Load ``checkpoint_dir/multi_scale_injector/``; returns ``(injector or None, log messages)``.

    A checkpoint without the folder (old, or the baseline) gives ``None``: run the plain ControlNet (identity
    weights). The module is built from config.json's record (variant and constructor arguments) and loaded
    strictly. A folder written before the record existed (no ``variant`` in config.json, or only a
    ``pytorch_model.bin``) is rebuilt from the weights' keys and shapes (:func:`_injector_config_from_state`);
    ``residual_levels`` (from :func:`residual_levels_of`) is needed then only for non-SD2 ControlNets.
    """
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise CheckpointError(f"Checkpoint folder {checkpoint_dir} does not exist; pass a checkpoint-<step>/ folder.")
    folder = checkpoint_dir if checkpoint_dir.name == INJECTOR_FOLDER else checkpoint_dir / INJECTOR_FOLDER
    if not folder.is_dir():
        return None, [
            f"No {INJECTOR_FOLDER}/ in {checkpoint_dir}: using identity injector weights (standard SeeSR inference)."
        ]
    state, source = read_injector_state(folder)
    state = {key[len("module."):] if key.startswith("module.") else key: value for key, value in state.items()}
    saved_config = {}
    config_path = folder / INJECTOR_CONFIG_NAME
    if config_path.is_file():
        try:
            saved_config = json.loads(config_path.read_text())
        except (OSError, json.JSONDecodeError) as error:
            raise CheckpointError(f"Cannot read {config_path}: {error}.") from None
    messages: list[str] = []
    if saved_config.get("variant") is not None:
        injector = _injector_from_record(saved_config, config_path)
    else:
        injector = MultiScaleInjector(**_injector_config_from_state(state, saved_config, residual_levels, messages))
        messages.append(f"{folder} records no injector variant (written by an older version): its structure was "
                        "read from the weights.")
    try:
        injector.load_state_dict({key: value.float() for key, value in state.items()}, strict=True)
    except RuntimeError as error:
        raise CheckpointError(f"The injector weights in {source} do not fit: {str(error).splitlines()[0]}") from None
    injector.eval()
    details = [f"variant {injector.variant or 'unnamed (scale weights only)'}"]
    if getattr(injector, "scale_weights", None) is not None:
        details.append(f"{injector.num_groups} scale weights ({injector.config.grouping})")
    if getattr(injector, "timestep_weights", None) is not None:
        curves = "shared" if injector.config.timestep_weights_shared else f"one per {injector.config.grouping}"
        details.append(f"timestep weights: {injector.config.timestep_weights_kind}, {curves}")
    messages = [MESSAGE_INJECTOR_LOADED] + messages
    if getattr(injector, "timestep_weights", None) is not None:
        messages.append(MESSAGE_TIMESTEP_WEIGHTS_LOADED)
    else:
        messages.append("No timestep_weights.* in the injector checkpoint: weights are constant over timesteps.")
    messages.append(f"  injector: {'; '.join(details)} (from {source.name})")
    return injector, messages
