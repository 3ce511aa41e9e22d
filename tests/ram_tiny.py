"""Tiny RAM / DAPE files in the public layouts, for tests of ``models.ram`` and of the SeeSR pipeline.

``write_tiny_ram(folder)`` writes, with random weights of tiny shapes but RAM's own key names:

* ``ram_swin_large_14m.pth`` -- ``{'model': state_dict}`` as RAM's release: the Swin under ``visual_encoder.*``
  in the original Swin layout (``layers.<i>.downsample`` at the end of stage i, ``relative_position_index`` and
  ``attn_mask`` buffers saved), ``image_proj``, ``label_embed``, ``wordvec_proj``, ``tagging_head.*`` (no
  self-attention), ``fc``, and unused parts: ``tag_encoder.*`` (its first layers copies of the tagging head, as
  RAM ties them) and ``text_decoder.*``;
* ``DAPE.pth`` -- only ``lora_A`` / ``lora_B`` tensors, as SeeSR's ``save_network_lora``: the Swin ``attn.qkv``
  MergedLinear (query and value parts), the tagging head's ``query`` / ``key``, and the untrained (``B = 0``)
  LoRA of the tag encoder and text decoder;
* ``ram_tag_list.txt`` and ``ram_tag_list_threshold.txt``.

The tiny Swin keeps the real one's structure: a shifted-window stage, a stage whose resolution equals the window
(no shift), and patch merging between stages.
"""

from __future__ import annotations

from pathlib import Path

import torch

from models.ram import DAPE_WEIGHTS_NAME, RAM_WEIGHTS_NAME, TAG_LIST_NAME, THRESHOLD_LIST_NAME, RAMConfig, RAMTagger

TINY_TAGS = ["cat", "dog", "tree", "sky", "building", "water"]
TINY_RAM_CONFIG = RAMConfig(
    image_size=64,
    patch_size=4,
    embed_dim=8,
    depths=(2, 2, 2),
    num_heads=(1, 2, 4),
    window_size=4,
    embed_width=8,
    num_tags=len(TINY_TAGS),
    hidden_size=16,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=32,
)
TINY_LORA_RANK = 4


def _random_like(key: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(tensor.shape, generator=generator)
    if "norm" in key.lower() and key.endswith("weight"):
        return 1.0 + 0.1 * noise  # LayerNorm gains near 1
    return 0.2 * noise


def ram_layout_state_dict(config: RAMConfig = TINY_RAM_CONFIG, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tagger weights under RAM's checkpoint names, with the buffers and unused parts RAM's file carries."""
    generator = torch.Generator().manual_seed(seed)
    model = RAMTagger(config, [f"tag{i}" for i in range(config.num_tags)])
    state: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        # timm keeps patch merging at the start of stage i + 1; RAM's Swin at the end of stage i
        parts = key.split(".")
        if parts[:2] == ["visual_encoder", "layers"] and parts[3] == "downsample":
            parts[2] = str(int(parts[2]) - 1)
        state[".".join(parts)] = _random_like(key, value, generator)
    for name, module in model.visual_encoder.named_modules():  # RAM's Swin saves these buffers
        if hasattr(module, "relative_position_index"):
            state[f"visual_encoder.{name}.relative_position_index"] = module.relative_position_index.clone()
        if getattr(module, "attn_mask", None) is not None:
            state[f"visual_encoder.{name}.attn_mask"] = module.attn_mask.clone()
    hidden = config.hidden_size
    for key in [k for k in state if k.startswith("tagging_head.encoder.layer.")]:
        state[key.replace("tagging_head.", "tag_encoder.")] = state[key].clone()  # RAM's tie: same tensors saved twice
    state["tag_encoder.encoder.layer.0.attention.self.query.weight"] = torch.randn(hidden, hidden, generator=generator)
    state["tag_encoder.embeddings.word_embeddings.weight"] = torch.randn(10, hidden, generator=generator)
    state["text_decoder.bert.encoder.layer.0.attention.self.query.weight"] = torch.randn(hidden, hidden, generator=generator)
    state["text_decoder.cls.predictions.bias"] = torch.randn(10, generator=generator)
    return state


def dape_layout_state_dict(
    config: RAMConfig = TINY_RAM_CONFIG, seed: int = 1, rank: int = TINY_LORA_RANK, tied_lora_scale: float = 0.0
) -> dict[str, torch.Tensor]:
    """Random LoRA tensors under SeeSR's DAPE.pth names (``tied_lora_scale`` > 0 makes the tied tag-encoder LoRA non-zero)."""
    generator = torch.Generator().manual_seed(seed)

    def pair(prefix: str, out_features: int, in_features: int, groups: int = 1, b_scale: float = 0.1) -> dict[str, torch.Tensor]:
        return {
            f"{prefix}.lora_A": 0.3 * torch.randn(rank * groups, in_features, generator=generator),
            f"{prefix}.lora_B": b_scale * torch.randn(out_features * groups, rank, generator=generator),
        }

    dape: dict[str, torch.Tensor] = {}
    for stage, depth in enumerate(config.depths):
        dim = config.embed_dim * 2**stage
        for block in range(depth):
            dape.update(pair(f"visual_encoder.layers.{stage}.blocks.{block}.attn.qkv", dim, dim, groups=2))
    hidden, width = config.hidden_size, config.embed_width
    for layer in range(config.num_hidden_layers):
        head = f"tagging_head.encoder.layer.{layer}.crossattention.self"
        dape.update(pair(f"{head}.query", hidden, hidden))
        dape.update(pair(f"{head}.key", hidden, width))
        tied = f"tag_encoder.encoder.layer.{layer}.crossattention.self"
        dape.update(pair(f"{tied}.query", hidden, hidden, b_scale=tied_lora_scale))
        dape.update(pair(f"{tied}.key", hidden, width, b_scale=tied_lora_scale))
        dape.update(pair(f"tag_encoder.encoder.layer.{layer}.attention.self.query", hidden, hidden, b_scale=0.0))
    dape.update(pair("text_decoder.bert.encoder.layer.0.attention.self.key", hidden, hidden, b_scale=0.0))
    return dape


def write_tiny_ram(
    folder: str | Path,
    seed: int = 0,
    thresholds: list[float] | None = None,
    ram_state: dict[str, torch.Tensor] | None = None,
    dape_state: dict[str, torch.Tensor] | None = None,
) -> dict[str, Path]:
    """Write the tiny RAM release files into ``folder``; returns their paths (keys ram, dape, tag_list, thresholds)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {
        "ram": folder / RAM_WEIGHTS_NAME,
        "dape": folder / DAPE_WEIGHTS_NAME,
        "tag_list": folder / TAG_LIST_NAME,
        "thresholds": folder / THRESHOLD_LIST_NAME,
    }
    state = ram_state if ram_state is not None else ram_layout_state_dict(seed=seed)
    torch.save({"model": state, "epoch": 5}, paths["ram"])
    torch.save(dape_state if dape_state is not None else dape_layout_state_dict(seed=seed + 1), paths["dape"])
    paths["tag_list"].write_text("\n".join(TINY_TAGS), encoding="utf-8")  # RAM's file has no final newline
    values = thresholds if thresholds is not None else [0.65, 0.8, 0.65, 0.9, 0.65, 0.7]
    paths["thresholds"].write_text("\n".join(f"{v}" for v in values) + "\n", encoding="utf-8")
    return paths
