"""The Phaseformer training objective: four weighted terms per output, then the two outputs weighted.

From the users' "Phaseformer training guide" and the official Phaseformer ``train.py``::

    loss_L = W4(Charbonnier(fake_L, tar),   Perceptual(fake_L, tar),   Gradient(fake_L, tar),   1 - MS_SSIM(fake_L, tar))
    loss_H = W4(Charbonnier(fake_H, tar_H), Perceptual(fake_H, tar_H), Gradient(fake_H, tar_H), 1 - MS_SSIM(fake_H, tar_H))
    loss   = W2(loss_L, loss_H)

One ``W4`` is shared by both outputs, as in the reference. ``tar_H`` is the 2x target from the data
(``h_target``) or, when not given, a bilinear x2 upsample of ``tar``.

Every behaviour of the reference code that changes results is a flag (defaults are what the paper means):

==========================  ===============================  ==========================================
flag                        default                          reference ``train.py``
==========================  ===============================  ==========================================
``pixel_loss``              ``"charbonnier"`` (eps 1e-3)     ``"smoothl1"`` (``nn.SmoothL1Loss``)
``msssim_as_similarity``    ``False`` (``1 - MS-SSIM``)      ``True`` (adds MS-SSIM)
``value_range``             ``"unit"`` (images in [0, 1])    ``"signed_reference"`` ([-1, 1] fed as is)
``vgg_resize_224``          ``False``                        ``True``
``weighting``               ``"softmax"`` (the note)         ``"softmax_frozen"`` (never optimised)
==========================  ===============================  ==========================================

``value_range="signed"`` accepts [-1, 1] images and maps them to [0, 1] before every term (correct use of
the reference's normalisation).

The terms are :data:`LOSS_TERMS` entries, taken by name everywhere (the weights' initial values, the logs, the
checkpoint's loss-weight state): a new term is one registered builder (``docs/extending.md``), and ``terms=``
picks which ones a loss uses.

``weighting="uncertainty"`` (Kendall et al. 2018) is not nested the same way: ``W2(W4(L), W4(H))`` with
uncertainty weights is unbounded below (see :meth:`PhaseformerLoss._uncertainty_total`), so each (output, term)
pair gets Kendall's form with the log-variance ``s_term + t_output``; ``loss_L``/``loss_H`` in the logs are
still ``W4`` of each output.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from losses.charbonnier import CharbonnierLoss
from losses.gradient import LaplacianGradientLoss
from losses.msssim import MSSSIMLoss
from losses.perceptual import VGGPerceptualLoss
from losses.weighted import WeightedLoss, loss_weight_parameters
from utils.registry import Registry

PIXEL_LOSSES = ("charbonnier", "smoothl1")
VALUE_RANGES = ("unit", "signed", "signed_reference")
BRANCHES = ("L", "H")


@dataclass(frozen=True)
class TermOptions:
    """The settings a loss term's builder may read (each term takes what it needs)."""

    pixel_loss: str = "charbonnier"
    charbonnier_eps: float = 1e-3
    vgg_weights: str | Path | None = None
    vgg_resize_224: bool = False
    perceptual_random_weights: bool = False
    msssim_as_similarity: bool = False


# A term is ``builder(options) -> module`` with ``module(prediction, target) -> scalar``, images in [0, 1]. The keys
# are the names in the logs (``pixel_L``, ``w_pixel``), the checkpoint's loss weights and ``terms=``; registration
# order is the order of the weights (the seeded initial weights follow it).
LOSS_TERMS: Registry[Callable[[TermOptions], nn.Module]] = Registry("loss term", flag="terms")


class _InFloat32(nn.Module):
    """Runs ``inner`` on fp32 copies of its inputs: the pixel term's small differences vanish in half precision."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.inner(prediction.float(), target.float())


@LOSS_TERMS.register("pixel", help="Charbonnier (the paper) or SmoothL1 (the reference's train.py)")
def pixel_term(options: TermOptions) -> nn.Module:
    if options.pixel_loss not in PIXEL_LOSSES:
        raise ValueError(f"pixel_loss must be one of {PIXEL_LOSSES}, got {options.pixel_loss!r}")
    return _InFloat32(CharbonnierLoss(options.charbonnier_eps) if options.pixel_loss == "charbonnier" else nn.SmoothL1Loss())


@LOSS_TERMS.register("perceptual", help="VGG16 features to relu4_3 (frozen ImageNet weights)")
def perceptual_term(options: TermOptions) -> nn.Module:
    return VGGPerceptualLoss(options.vgg_weights, resize_to_224=options.vgg_resize_224,
                             random_weights=options.perceptual_random_weights)


@LOSS_TERMS.register("gradient", help="L1 between Laplacian edge maps")
def gradient_term(options: TermOptions) -> nn.Module:
    return LaplacianGradientLoss()


@LOSS_TERMS.register("msssim", help="1 - MS-SSIM (or + MS-SSIM as the reference)")
def msssim_term(options: TermOptions) -> nn.Module:
    return MSSSIMLoss(data_range=1.0, as_similarity=options.msssim_as_similarity)


class PhaseformerLoss(nn.Module):
    """Total loss and detached per-term values for logging; see the module docstring for the flags."""

    def __init__(
        self,
        weighting: str = "softmax",
        *,
        use_perceptual: bool = True,
        vgg_weights: str | Path | None = None,
        pixel_loss: str = "charbonnier",
        charbonnier_eps: float = 1e-3,
        msssim_as_similarity: bool = False,
        value_range: str = "unit",
        vgg_resize_224: bool = False,
        term_init: Sequence[float] | Mapping[str, float] | None = None,
        branch_init: Sequence[float] | Mapping[str, float] | None = None,
        seed: int | None = None,
        perceptual_random_weights: bool = False,
        terms: Sequence[str] | None = None,
    ):
        super().__init__()
        if value_range not in VALUE_RANGES:
            raise ValueError(f"value_range must be one of {VALUE_RANGES}, got {value_range!r}")
        self.value_range = value_range
        if terms is None:
            terms = [name for name in LOSS_TERMS if use_perceptual or name != "perceptual"]
        options = TermOptions(pixel_loss, charbonnier_eps, vgg_weights, vgg_resize_224, perceptual_random_weights, msssim_as_similarity)
        self.terms = nn.ModuleDict({name: LOSS_TERMS.get(name)(options) for name in terms})
        branch_seed = None if seed is None else seed + 1
        self.term_weights = WeightedLoss(len(self.terms), weighting, term_init, seed, list(self.terms))
        self.branch_weights = WeightedLoss(2, weighting, branch_init, branch_seed, list(BRANCHES))

    @property
    def term_names(self) -> list[str]:
        return list(self.terms)

    def _to_loss_range(self, image: torch.Tensor) -> torch.Tensor:
        return (image + 1.0) * 0.5 if self.value_range == "signed" else image

    def branch_terms(self, prediction: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms for one output, by name."""
        prediction, target = self._to_loss_range(prediction), self._to_loss_range(target)
        return {name: term(prediction, target) for name, term in self.terms.items()}

    def forward(
        self,
        fake_b_L: torch.Tensor,
        fake_b_H: torch.Tensor | None,
        target: torch.Tensor,
        target_2x: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, logs)``; ``logs`` holds detached tensors (no host sync): ``pixel_L`` ... ``loss_L``, ``loss_H``, ``loss``.

        ``fake_b_H=None`` trains the 1x output alone (the branch weights are then unused).
        """
        logs: dict[str, torch.Tensor] = {}
        branch_losses = {}
        pairs = [("L", fake_b_L, target)]
        if fake_b_H is not None:
            if target_2x is None:
                target_2x = F.interpolate(target, scale_factor=2, mode="bilinear", align_corners=False)
            pairs.append(("H", fake_b_H, target_2x))
        branch_terms = {}
        for branch, prediction, branch_target in pairs:
            terms = self.branch_terms(prediction, branch_target)
            branch_loss = self.term_weights.combine(terms)
            logs.update({f"{name}_{branch}": value.detach() for name, value in terms.items()})
            logs[f"loss_{branch}"] = branch_loss.detach()
            branch_losses[branch] = branch_loss
            branch_terms[branch] = terms
        if len(branch_losses) == 1:
            total = branch_losses["L"]
        elif self.term_weights.mode == "uncertainty":
            total = self._uncertainty_total(branch_terms)
        else:
            total = self.branch_weights.combine(branch_losses)
        logs["loss"] = total.detach()
        return total, logs

    def _uncertainty_total(self, branch_terms: dict[str, dict[str, torch.Tensor]]) -> torch.Tensor:
        """Kendall et al. over every (output b, term i) with log-variance ``s_i + t_b``.

        Nesting the uncertainty weighting (``W2(W4(L), W4(H))``) is unbounded below: a branch loss contains the
        regulariser ``0.5 * s_i``, which is negative once a term is below 1, and the outer weight ``exp(-t_b)``
        then multiplies a negative number, so the loss falls without limit as ``t_b`` decreases. Here every term
        keeps Kendall's ``0.5 * exp(-u) * L + 0.5 * u``, bounded below, with ``u = s_i + t_b``: the term weights
        ``s`` are shared by both outputs and ``t`` weighs the outputs, as in the nested form.
        """
        term_log_variances = self.term_weights.log_variances[0]
        total = term_log_variances.new_zeros(())
        for branch_log_variance, branch in zip(self.branch_weights.log_variances[0], self.branch_weights.names):
            log_variances = term_log_variances + branch_log_variance
            stacked = torch.stack([branch_terms[branch][name].float().reshape(()) for name in self.term_weights.names])
            total = total + (0.5 * torch.exp(-log_variances) * stacked + 0.5 * log_variances).sum()
        return total

    def weight_parameters(self) -> list[nn.Parameter]:
        """The trainable loss weights (an optimiser group of their own, no weight decay); empty when frozen/fixed."""
        return loss_weight_parameters(self)

    def weights_dict(self) -> dict[str, float]:
        """Current normalised weights for logging: ``w_pixel``... for the terms, ``w_L``, ``w_H`` for the outputs."""
        return {**self.term_weights.weights_dict(), **self.branch_weights.weights_dict()}

    def collapse_warnings(self, threshold: float = 0.9) -> list[str]:
        """Sentences for each learned weighting that has collapsed onto one term (see WeightedLoss)."""
        warnings = [self.term_weights.collapse_warning(threshold), self.branch_weights.collapse_warning(threshold)]
        return [warning for warning in warnings if warning]

    def weighting_state_dict(self) -> dict[str, torch.Tensor]:
        """The loss weights only (what a checkpoint needs; the frozen VGG is not saved)."""
        return {k: v for k, v in self.state_dict().items() if k.startswith(("term_weights.", "branch_weights."))}

    def load_weighting_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        """Restore :meth:`weighting_state_dict` strictly (same weighting mode and terms)."""
        own = self.weighting_state_dict()
        if set(state) != set(own):
            raise ValueError(f"loss weights in the checkpoint ({sorted(state)}) do not match this loss ({sorted(own)})")
        self.load_state_dict({**self.state_dict(), **state}, strict=True)
