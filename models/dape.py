"""DAPE, SeeSR's degradation-aware prompt extractor, for training: RAM with LoRA, its objective and its file.

SeeSR (Wu et al., CVPR 2024) trains DAPE before the ControlNet (its stage 1): RAM's weights frozen, a LoRA learnt so
that a degraded image gives the image embeddings and tag probabilities that plain RAM gives for the clean image.
Reference code cswry/SeeSR: ``ram/models/ram_lora.py`` with ``swin_transformer_lora.py`` and ``bert_lora.py``
(loralib layers), ``basicsr/models/dape_model.py`` (the objective and ``save_network_lora``) and
``basicsr/options/dape.yaml``.

* LoRA (loralib, ``lora_alpha`` 1 so scale 1 / rank, ``lora_A`` Kaiming-uniform with a = sqrt(5), ``lora_B`` zero,
  no LoRA dropout): rank 8 on every Swin block's ``attn.qkv`` as a ``MergedLinear`` on the query and value thirds
  (``enable_lora=[True, False, True]``; ``attn.proj`` and the MLPs have none), and on the ``query`` and ``key`` of
  the tagging head's cross-attention (``bert_lora.py``). Only the ``lora_*`` tensors train
  (``loralib.mark_only_lora_as_trainable``).
* Training-time noise of the student as SeeSR builds it: stochastic depth 0.1 in the Swin (RAM's
  ``drop_path_rate``, rising linearly over the blocks) and BERT's dropout 0.1 in the tagging head
  (``q2l_config.json``); the teacher runs in eval mode.
* Loss (``DAPEModel.optimize_parameters``): MSE (mean) between the student's image embeddings of the degraded image
  and the teacher's of the clean one (``image_proj`` outputs, 145 x 512 for Swin-L), plus the binary cross-entropy
  (mean) of the student's tag probabilities against the teacher's, weight 1 each. SeeSR writes the cross-entropy
  as ``-(p log q + (1 - p) log(1 - q))`` on sigmoids; here it is computed from the logits (the same value wherever
  SeeSR's is finite; SeeSR's is infinite once a sigmoid rounds to 0 or 1).
* ``DAPE.pth``: the ``lora_*`` tensors under RAM's module names, as ``save_network_lora`` writes them, so SeeSR's
  ``load_state_dict(strict=False)`` and :func:`models.ram.load_ram_tagger` read it. SeeSR's file also carries the
  LoRA of RAM's captioning branch (tag encoder, text decoder), which never gets a gradient (``B = 0``): it is not
  written here, and a strict=False load leaves those layers as initialised, which is the same function.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from models.ram import IMAGENET_MEAN, IMAGENET_STD, LORA_ALPHA, SWIN_QKV_LORA_PARTS, RAMTagger
from utils.checkpoint import atomic_torch_save
from utils.errors import CheckpointError

DAPE_RANK = 8  # ram_lora: lora.MergedLinear(..., r=8) and lora.Linear(..., r=8)
REFERENCE_DROP_PATH = 0.1  # ram_lora.py builds the Swin with drop_path_rate=0.1
REFERENCE_HEAD_DROPOUT = 0.1  # q2l_config.json: hidden and attention-probability dropout
LORA_MARK = ".lora_"


class LoRALinear(nn.Linear):
    """``nn.Linear`` + loralib's ``scale * B @ A`` update on all output parts (``lora.Linear``) or some
    (``lora.MergedLinear``: ``parts`` marks which equal slices of the output get their own rank-``rank`` update)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, rank: int = DAPE_RANK,
                 alpha: float = LORA_ALPHA, parts: tuple[bool, ...] = (True,), device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        if out_features % len(parts) or not any(parts):
            raise ValueError(f"parts {parts} do not split {out_features} outputs into equal slices with LoRA on some")
        self.rank, self.scaling, self.parts = rank, alpha / rank, tuple(parts)
        self.part_size = out_features // len(parts)
        enabled = sum(self.parts)
        self.lora_A = nn.Parameter(torch.empty(rank * enabled, in_features, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.part_size * enabled, rank, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # loralib's init; B = 0 makes the start plain RAM

    @classmethod
    def from_linear(cls, linear: nn.Linear, rank: int, alpha: float = LORA_ALPHA, parts: tuple[bool, ...] = (True,)) -> LoRALinear:
        """A LoRA layer that shares ``linear``'s weight and bias (frozen) and adds fresh LoRA tensors."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None, rank, alpha, parts,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.weight, module.bias = linear.weight, linear.bias
        return module

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA branch for input ``x`` (before scaling), zero on the parts without LoRA."""
        low = F.linear(x, self.lora_A)
        if len(self.parts) == 1:
            return F.linear(low, self.lora_B)
        pairs = iter(zip(low.split(self.rank, dim=-1), self.lora_B.split(self.part_size, dim=0)))
        pieces = []
        for enabled in self.parts:
            if enabled:
                a_out, b = next(pairs)
                pieces.append(F.linear(a_out, b))
            else:
                pieces.append(low.new_zeros(*low.shape[:-1], self.part_size))
        return torch.cat(pieces, dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x) * self.scaling


def lora_targets(tagger: RAMTagger) -> Iterator[tuple[str, tuple[bool, ...]]]:
    """(module name, LoRA parts) of each layer SeeSR's ``ram_lora`` gives a LoRA."""
    for name, module in tagger.named_modules():
        if name.startswith("visual_encoder.") and name.endswith(".attn.qkv") and isinstance(module, nn.Linear):
            yield name, SWIN_QKV_LORA_PARTS
        elif name.startswith("tagging_head.") and name.endswith(("crossattention.self.query", "crossattention.self.key")):
            yield name, (True,)


def add_dape_lora(tagger: RAMTagger, rank: int = DAPE_RANK, alpha: float = LORA_ALPHA) -> list[str]:
    """Turn ``tagger`` into DAPE's student in place: LoRA layers where SeeSR has them, only their tensors trainable.

    Returns the names of the LoRA layers.
    """
    names = []
    for name, parts in list(lora_targets(tagger)):
        parent_name, _, child = name.rpartition(".")
        parent = tagger.get_submodule(parent_name)
        setattr(parent, child, LoRALinear.from_linear(getattr(parent, child), rank, alpha, parts))
        names.append(name)
    for key, parameter in tagger.named_parameters():
        parameter.requires_grad_(LORA_MARK in key)
    return names


def set_training_noise(tagger: RAMTagger, drop_path_rate: float = REFERENCE_DROP_PATH,
                       head_dropout: float = REFERENCE_HEAD_DROPOUT) -> None:
    """Stochastic depth in the Swin (linear over the blocks, as timm and RAM's Swin) and dropout in the tagging head;
    both act only in train mode."""
    from timm.layers import DropPath

    blocks = [block for stage in tagger.visual_encoder.layers for block in stage.blocks]
    rates = torch.linspace(0, drop_path_rate, len(blocks)).tolist()
    for block, rate in zip(blocks, rates):
        block.drop_path1 = DropPath(rate) if rate > 0 else nn.Identity()
        block.drop_path2 = DropPath(rate) if rate > 0 else nn.Identity()
    for module in tagger.tagging_head.modules():
        if hasattr(module, "attention_dropout"):
            module.attention_dropout = head_dropout
        if isinstance(getattr(module, "dropout", None), nn.Dropout):
            module.dropout.p = head_dropout


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for key, p in module.named_parameters() if LORA_MARK in key]


def dape_state_dict(tagger: RAMTagger) -> dict[str, torch.Tensor]:
    """The ``lora_*`` tensors under RAM's (and SeeSR's DAPE.pth) names, on the CPU in fp32."""
    return {key: value.detach().float().cpu().clone() for key, value in tagger.state_dict().items() if LORA_MARK in key}


def load_dape_lora(tagger: RAMTagger, state: dict[str, torch.Tensor], source: str) -> int:
    """Copy a DAPE file's LoRA tensors into a student built by :func:`add_dape_lora`; returns how many.

    LoRA of RAM's captioning branch (tag encoder, text decoder: SeeSR's file has it, untrained) is skipped; a LoRA
    of another rank, a layer the student lacks, or a student layer the file lacks is a CheckpointError.
    """
    own = {key: value for key, value in tagger.state_dict().items() if LORA_MARK in key}
    wanted = {key: value for key, value in state.items() if LORA_MARK in key and not key.startswith(("tag_encoder.", "text_decoder."))}
    unknown, missing = sorted(set(wanted) - set(own)), sorted(set(own) - set(wanted))
    if unknown or missing:
        example = (unknown or missing)[0]
        raise CheckpointError(f"{source} does not fit this DAPE student ({len(unknown)} unknown, {len(missing)} missing LoRA tensors, "
                              f"e.g. {example}); expected a DAPE.pth of the same RAM.")
    for key, value in wanted.items():
        if value.shape != own[key].shape:
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, the student's is {tuple(own[key].shape)}; "
                                  "give --lora_rank the rank the file was trained with.")
    with torch.no_grad():
        for key, value in wanted.items():
            own[key].copy_(value)
    return len(wanted)


def save_dape(tagger: RAMTagger, path: str | Path) -> Path:
    """Write ``DAPE.pth`` (a flat dict of LoRA tensors, ``torch.load(weights_only=True)``-safe) atomically."""
    return atomic_torch_save(dape_state_dict(tagger), path)


def load_dape(tagger: RAMTagger, path: str | Path) -> int:
    """Load a ``DAPE.pth`` (ours or SeeSR's release) into a student built by :func:`add_dape_lora`."""
    from models.ram import DAPE_WEIGHTS_NAME, read_weights

    return load_dape_lora(tagger, read_weights(path, "DAPE", DAPE_WEIGHTS_NAME), str(path))


class DAPEStudent(nn.Module):
    """RAM + LoRA as SeeSR trains it: RAM-preprocessed pixels -> (image embeddings, tag logits), with gradients."""

    def __init__(self, tagger: RAMTagger):
        super().__init__()
        self.tagger = tagger

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        embeds = self.tagger.encode(pixels)
        return embeds, self.tagger.logits(embeds)


class LoRAState(nn.Module):
    """The student's LoRA tensors as a module's state dict (what a training checkpoint stores: RAM comes from its file)."""

    def __init__(self, tagger: RAMTagger):
        super().__init__()
        object.__setattr__(self, "_tagger", tagger)  # not a submodule: its frozen RAM weights stay out of the state

    def state_dict(self, *args, **kwargs) -> dict[str, torch.Tensor]:
        return dape_state_dict(self._tagger)

    def load_state_dict(self, state: dict, strict: bool = True, assign: bool = False):
        try:
            load_dape_lora(self._tagger, state, "the checkpoint")
        except CheckpointError as err:
            raise RuntimeError(f"LoRA state mismatch\n{err}") from None


def ram_pixels(images01: torch.Tensor, image_size: int) -> torch.Tensor:
    """[B, 3, H, W] in [0, 1] -> RAM's input in fp32: torchvision's bilinear resize without antialiasing (what
    ``transforms.Resize`` does to tensors in the torchvision SeeSR pins) and ImageNet normalisation (dape_dataset.py)."""
    x = TF.resize(images01.float(), [image_size, image_size], interpolation=InterpolationMode.BILINEAR, antialias=False)
    return TF.normalize(x, IMAGENET_MEAN, IMAGENET_STD)


def dape_loss(features_lq: torch.Tensor, logits_lq: torch.Tensor, features_gt: torch.Tensor,
              logits_gt: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SeeSR's DAPE loss: ``l_fea`` (MSE of the embeddings) + ``l_logits`` (BCE of the tag probabilities), in fp32."""
    l_fea = F.mse_loss(features_lq.float(), features_gt.float())
    l_logits = F.binary_cross_entropy_with_logits(logits_lq.float(), torch.sigmoid(logits_gt.float()))
    return l_fea + l_logits, {"l_fea": l_fea.detach(), "l_logits": l_logits.detach()}


def tag_f1(predicted: torch.Tensor, reference: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-image agreement of two boolean tag sets [B, C]: precision, recall and F1 of ``predicted`` against
    ``reference`` (two empty sets agree: 1), and the counts for micro-averaging."""
    predicted, reference = predicted.bool(), reference.bool()
    hits = (predicted & reference).sum(-1).float()
    n_pred, n_ref = predicted.sum(-1).float(), reference.sum(-1).float()
    both_empty = (n_pred + n_ref) == 0
    f1 = torch.where(both_empty, torch.ones_like(hits), 2 * hits / (n_pred + n_ref).clamp(min=1))
    precision = torch.where(n_pred == 0, (n_ref == 0).float(), hits / n_pred.clamp(min=1))
    recall = torch.where(n_ref == 0, (n_pred == 0).float(), hits / n_ref.clamp(min=1))
    return {"f1": f1, "precision": precision, "recall": recall, "hits": hits, "predicted": n_pred, "reference": n_ref}
