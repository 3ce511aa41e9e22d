"""One builder per model family: ``build_<family>_training(config, device) -> TrainingParts``.

A trainer parses its flags, calls its family's builder and runs a loop; benches, scripts and tests call the
same builder, so no copy of a trainer's construction exists anywhere else. The variation points the builders
pick from (injector variants, backbones, samplers, loss terms, UNet presets) are :class:`utils.registry.Registry`
objects kept beside the code they name, in ``models/`` and ``losses/``; this package only wires them together
(models and data sets are separate ideas, so the wiring lives in neither).

=================  ===============================  ================================================
family             builder                           registries it reads
=================  ===============================  ================================================
Pixel DDPM         ``recipes.ddpm``                  ``models.ddpm_unet.UNET_PRESETS``, ``models.ddpm_sampling.SAMPLERS``
Phaseformer        ``recipes.phaseformer``           ``losses.phaseformer_loss.LOSS_TERMS``
SeeSR              ``recipes.seesr``                 ``models.timestep_adaptive.INJECTORS``
DAPE (SeeSR 1)     ``recipes.dape``                  --
User generation    ``recipes.user``                  ``models.user_generation.BACKBONES``
=================  ===============================  ================================================
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass
class TrainingParts:
    """What a trainer needs from its builder.

    ``models``: every network by role (``"model"``, ``"ema"``, ``"controlnet"``, ``"unet"``, ``"vae"``, ...), the
    trainable ones first; ``param_groups``: the optimiser's parameter groups (dicts as ``torch.optim`` takes them,
    learning rates included); ``objective``: ``objective(batch, **models) -> loss`` (or the family's documented
    signature); ``datasets``: ``"train"`` and, where the family has one, ``"val"``; ``extras``: anything else a
    family's loop reads (a scheduler, a tokenizer, a frozen teacher), by name.
    """

    models: dict[str, nn.Module]
    param_groups: list[dict[str, Any]]
    objective: Any
    datasets: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> nn.Module:
        """The first (main trainable) model."""
        return next(iter(self.models.values()))
