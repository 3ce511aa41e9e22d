"""Weighted sums of loss terms with fixed, softmax-learned or uncertainty-learned weights.

The Phaseformer users' note and the official ``train.py`` (``WeightedLoss``) hold raw weights
``nn.Parameter(torch.rand(1, n))`` and combine terms with ``softmax(raw, dim=1)``, so the weights sum to 1.
Two facts shape this module:

* In the official code the raw weights are never given to the optimiser, so they keep their random
  initial values: that is ``mode="softmax_frozen"`` (``requires_grad=False``).
* When they *are* trained (``mode="softmax"``, the note's intent), minimising ``sum(w_i * L_i)`` over the
  simplex pushes all the weight onto the currently smallest term: a collapse, not a balance.
  :meth:`WeightedLoss.collapse_warning` says when that happened.

``mode="uncertainty"`` is homoscedastic-uncertainty weighting (Kendall, Gal and Cipolla, "Multi-task
learning using uncertainty to weigh losses", CVPR 2018): ``sum(0.5 * exp(-s_i) * L_i + 0.5 * s_i)`` with
learned ``s_i = log(sigma_i^2)``, whose optimum ``exp(s_i) = L_i`` keeps every term in play.
``mode="fixed"`` uses given weights (normalised to sum to 1; equal by default).

Learned weights belong in their own optimiser group without weight decay: :func:`optimizer_param_groups`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.nn as nn

WEIGHTING_MODES = ("softmax", "softmax_frozen", "uncertainty", "fixed")
LEARNED_MODES = ("softmax", "uncertainty")


class WeightedLoss(nn.Module):
    """Combine ``n`` scalar loss terms; :meth:`weights` gives the current normalised weights for logging.

    ``init``: raw logits for the softmax modes (default ``torch.rand(1, n)``, from ``seed`` when given, else
    from the global RNG as in the reference), initial ``log(sigma^2)`` for ``uncertainty`` (default 0), the
    weights for ``fixed`` (default equal); a mapping gives them by term name. :meth:`combine` takes the terms by
    name too, so a caller never has to keep two lists in the same order.
    """

    def __init__(
        self,
        num_terms: int,
        mode: str = "softmax",
        init: Sequence[float] | Mapping[str, float] | None = None,
        seed: int | None = None,
        names: Sequence[str] | None = None,
    ):
        super().__init__()
        if isinstance(init, Mapping):
            if names is None or set(init) != set(names):
                raise ValueError(f"init names {sorted(init)} do not match the loss terms {list(names or [])}")
            init = [init[name] for name in names]
        if mode not in WEIGHTING_MODES:
            raise ValueError(f"loss weighting mode must be one of {WEIGHTING_MODES}, got {mode!r}")
        if init is not None and len(init) != num_terms:
            raise ValueError(f"init has {len(init)} values for {num_terms} loss terms")
        if names is not None and len(names) != num_terms:
            raise ValueError(f"names has {len(names)} entries for {num_terms} loss terms")
        self.num_terms = num_terms
        self.mode = mode
        self.names = list(names) if names is not None else [str(i) for i in range(num_terms)]
        if mode in ("softmax", "softmax_frozen"):
            if init is None:
                generator = torch.Generator().manual_seed(seed) if seed is not None else None
                raw = torch.rand(1, num_terms, generator=generator)
            else:
                raw = torch.tensor([list(init)], dtype=torch.float32)
            self.raw_weights = nn.Parameter(raw, requires_grad=mode == "softmax")
        elif mode == "uncertainty":
            start = torch.zeros(1, num_terms) if init is None else torch.tensor([list(init)], dtype=torch.float32)
            self.log_variances = nn.Parameter(start)
        else:
            fixed = torch.ones(num_terms) if init is None else torch.tensor(list(init), dtype=torch.float32)
            if (fixed < 0).any() or fixed.sum() <= 0:
                raise ValueError(f"fixed loss weights must be non-negative with a positive sum, got {list(fixed)}")
            self.register_buffer("fixed_weights", fixed / fixed.sum())

    def forward(self, *terms: torch.Tensor) -> torch.Tensor:
        if len(terms) != self.num_terms:
            raise ValueError(f"expected {self.num_terms} loss terms, got {len(terms)}")
        stacked = torch.stack([term.float().reshape(()) for term in terms])
        if self.mode == "uncertainty":
            log_variances = self.log_variances[0]
            return (0.5 * torch.exp(-log_variances) * stacked + 0.5 * log_variances).sum()
        if self.mode == "fixed":
            return (self.fixed_weights * stacked).sum()
        return (torch.softmax(self.raw_weights, dim=1)[0] * stacked).sum()

    def combine(self, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The weighted sum of ``terms`` given by name (every one of :attr:`names`, no other)."""
        if set(terms) != set(self.names):
            raise ValueError(f"expected the loss terms {self.names}, got {list(terms)}")
        return self(*(terms[name] for name in self.names))

    @torch.no_grad()
    def weights(self) -> torch.Tensor:
        """The current relative weights (n,), summing to 1 (uncertainty: ``exp(-s_i)`` normalised)."""
        if self.mode == "uncertainty":
            return torch.softmax(-self.log_variances[0].float(), dim=0)
        if self.mode == "fixed":
            return self.fixed_weights.clone()
        return torch.softmax(self.raw_weights[0].float(), dim=0)

    def weights_dict(self, prefix: str = "w_") -> dict[str, float]:
        """``{prefix + name: weight}`` as Python floats (one host sync; call it when logging)."""
        return {prefix + name: float(value) for name, value in zip(self.names, self.weights().tolist())}

    def collapse_warning(self, threshold: float = 0.9) -> str | None:
        """A sentence when a learned weighting has put more than ``threshold`` of the weight on one term."""
        if self.mode not in LEARNED_MODES:
            return None
        weights = self.weights()
        top = int(weights.argmax())
        if float(weights[top]) <= threshold:
            return None
        advice = (
            "minimising a softmax-weighted sum moves all weight onto the smallest term"
            if self.mode == "softmax"
            else "that term's loss is far smaller than the others'"
        )
        return (
            f"Loss weights ({self.mode}) have collapsed onto '{self.names[top]}' ({float(weights[top]):.3f} of the total): "
            f"{advice}; consider --loss_weighting fixed or uncertainty."
        )


def loss_weight_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable loss-weight parameters of every WeightedLoss inside ``module`` (none when frozen/fixed)."""
    return [
        parameter
        for child in module.modules()
        if isinstance(child, WeightedLoss)
        for parameter in child.parameters()
        if parameter.requires_grad
    ]


def optimizer_param_groups(
    model: nn.Module, loss_module: nn.Module, weight_decay: float = 0.0, loss_weights_lr: float | None = None
) -> list[dict]:
    """Optimiser groups: the model's trainable parameters, then the loss weights without weight decay.

    ``loss_weights_lr`` gives the loss weights their own learning rate (default: the optimiser's).
    The loss-weight group is left out when there is nothing to train (``softmax_frozen``, ``fixed``).
    """
    groups = [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay, "name": "model"}]
    loss_parameters = loss_weight_parameters(loss_module)
    if loss_parameters:
        group = {"params": loss_parameters, "weight_decay": 0.0, "name": "loss_weights"}
        if loss_weights_lr is not None:
            group["lr"] = loss_weights_lr
        groups.append(group)
    return groups
