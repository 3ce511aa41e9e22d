"""RAM / DAPE tagger (models/ram.py) on tiny files in RAM's and SeeSR's public layouts (tests/ram_tiny.py).

Equality with SeeSR's own ``RAMLora`` (its ram/ code run once outside the suite, tiny widths with the real
Swin-L 384 geometry: 4 stages, window 12, 145 tokens; random weights saved by that code, its own DAPE-style LoRA
file): image embeddings max |diff| 4.0e-6 (values up to 5.8), tag logits 4.1e-6 (up to 1.6), tags identical, with
and without DAPE and for a file without ``tagging_head.*`` (RAM's tie). Here: the key mapping, the LoRA merge
against the unmerged LoRA computation, the thresholds, the shapes and the error messages.
"""

from __future__ import annotations

import argparse
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models.ram import (
    DEFAULT_THRESHOLD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    RAMTagger,
    load_ram_tagger,
)
from tests.ram_tiny import TINY_RAM_CONFIG, TINY_TAGS, dape_layout_state_dict, ram_layout_state_dict, write_tiny_ram
from utils.errors import CheckpointError, DataError, one_line


def _load(paths, dape=False, **kwargs) -> RAMTagger:
    return load_ram_tagger(paths["ram"], paths["dape"] if dape else None, config=TINY_RAM_CONFIG, **kwargs)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return write_tiny_ram(tmp_path_factory.mktemp("ram"))


@pytest.fixture(scope="module")
def images():
    return torch.rand(2, 3, 40, 56, generator=torch.Generator().manual_seed(3))


def test_public_layout_loads_every_tensor_to_its_place(tiny):
    model = _load(tiny)
    state = torch.load(tiny["ram"], weights_only=True)["model"]
    loaded = model.state_dict()
    # RAM's Swin merges patches at the end of stage 0; timm's at the start of stage 1
    torch.testing.assert_close(
        loaded["visual_encoder.layers.1.downsample.reduction.weight"], state["visual_encoder.layers.0.downsample.reduction.weight"]
    )
    torch.testing.assert_close(
        loaded["visual_encoder.layers.2.blocks.1.attn.qkv.weight"], state["visual_encoder.layers.2.blocks.1.attn.qkv.weight"]
    )
    for key in ("label_embed", "image_proj.weight", "fc.bias", "tagging_head.encoder.layer.1.crossattention.self.key.weight"):
        torch.testing.assert_close(loaded[key], state[key])
    assert model.tag_list == TINY_TAGS
    assert not any(p.requires_grad for p in model.parameters()) and not model.training


def test_tagging_head_falls_back_to_tied_tag_encoder_layers(tmp_path, tiny):
    state = ram_layout_state_dict()
    head_only = {k: v for k, v in state.items() if not k.startswith("tagging_head.")}
    paths = write_tiny_ram(tmp_path, ram_state=head_only)
    model, reference = _load(paths), _load(tiny)
    key = "tagging_head.encoder.layer.0.output.dense.weight"
    torch.testing.assert_close(model.state_dict()[key], reference.state_dict()[key])


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.update({"visual_encoder.layers.0.blocks.0.extra.weight": torch.zeros(2)}), "unknown"),
        (lambda s: s.pop("image_proj.weight"), "missing"),
        (lambda s: s.update({"fc.weight": torch.zeros(1, 5)}), "shape"),
    ],
)
def test_ram_file_that_does_not_fit_is_one_line_error(tmp_path, change, message):
    state = ram_layout_state_dict()
    change(state)
    paths = write_tiny_ram(tmp_path, ram_state=state)
    with pytest.raises(CheckpointError, match=message) as err:
        _load(paths)
    assert str(paths["ram"]) in str(err.value) and "\n" not in str(err.value)


class UnmergedLoRA(nn.Module):
    """loralib's forward before merging: ``base(x) + scale * x A^T B^T``; ``parts`` = MergedLinear's enable_lora."""

    def __init__(self, base: nn.Linear, lora_a: torch.Tensor, lora_b: torch.Tensor, parts=None):
        super().__init__()
        self.base, self.lora_a, self.lora_b, self.parts = base, lora_a, lora_b, parts
        self.scale = 1.0 / lora_b.shape[1]  # lora_alpha 1 / rank

    def forward(self, x):
        if self.parts is None:
            return self.base(x) + self.scale * (x @ self.lora_a.T @ self.lora_b.T)
        groups = sum(self.parts)
        outs = iter(zip(self.lora_a.chunk(groups), self.lora_b.chunk(groups)))
        width = self.base.out_features // len(self.parts)
        pieces = []
        for on in self.parts:
            if on:
                a, b = next(outs)
                pieces.append(x @ a.T @ b.T)
            else:
                pieces.append(x.new_zeros(*x.shape[:-1], width))
        return self.base(x) + self.scale * torch.cat(pieces, dim=-1)


def test_merged_dape_equals_unmerged_lora(tiny, images):
    merged = _load(tiny, dape=True)
    unmerged = _load(tiny)
    plain_embeds = unmerged.image_embeddings(images)
    dape = torch.load(tiny["dape"], weights_only=True)
    for stage, layer in enumerate(unmerged.visual_encoder.layers):
        for index, block in enumerate(layer.blocks):
            name = f"visual_encoder.layers.{stage}.blocks.{index}.attn.qkv"
            block.attn.qkv = UnmergedLoRA(block.attn.qkv, dape[f"{name}.lora_A"], dape[f"{name}.lora_B"], parts=(True, False, True))
    for index, layer in enumerate(unmerged.tagging_head.encoder.layer):
        projections = layer.crossattention.self
        for part in ("query", "key"):
            name = f"tagging_head.encoder.layer.{index}.crossattention.self.{part}"
            setattr(projections, part, UnmergedLoRA(getattr(projections, part), dape[f"{name}.lora_A"], dape[f"{name}.lora_B"]))
    embeds, expected_embeds = merged.image_embeddings(images), unmerged.image_embeddings(images)
    logits, expected_logits = merged.logits(embeds), unmerged.logits(expected_embeds)
    # float32 rounding of W + dW against W x + dW x: measured < 2e-6 on values of order 1; 1e-4 leaves 50x margin
    torch.testing.assert_close(embeds, expected_embeds, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    assert (embeds - plain_embeds).abs().max() > 1e-2  # the LoRA does change the embeddings


def test_tied_tag_encoder_lora_merges_into_tagging_head(tmp_path, tiny):
    dape = dape_layout_state_dict(tied_lora_scale=0.1)
    paths = write_tiny_ram(tmp_path, dape_state=dape)
    model = _load(paths, dape=True)
    base = torch.load(tiny["ram"], weights_only=True)["model"]
    name = "crossattention.self.query"
    head, tied = f"tagging_head.encoder.layer.1.{name}", f"tag_encoder.encoder.layer.1.{name}"
    scale = 1.0 / dape[f"{head}.lora_B"].shape[1]
    expected = base[f"{head}.weight"] + scale * (
        dape[f"{head}.lora_B"] @ dape[f"{head}.lora_A"] + dape[f"{tied}.lora_B"] @ dape[f"{tied}.lora_A"]
    )
    torch.testing.assert_close(model.state_dict()[f"{head}.weight"], expected)


def test_dape_key_that_matches_nothing_is_one_line_error(tmp_path):
    dape = dape_layout_state_dict()
    dape["visual_encoder.layers.0.blocks.0.mlp.fc9.lora_A"] = torch.zeros(4, 8)
    dape["visual_encoder.layers.0.blocks.0.mlp.fc9.lora_B"] = torch.zeros(8, 4)
    paths = write_tiny_ram(tmp_path, dape_state=dape)
    with pytest.raises(CheckpointError, match="fc9") as err:
        _load(paths, dape=True)
    assert str(paths["dape"]) in str(err.value) and "\n" not in str(err.value)


def _firing_state(probability: float) -> dict:
    """RAM weights whose tag logits are all logit(probability): ``fc`` reads nothing but its bias."""
    state = ram_layout_state_dict()
    state["fc.weight"] = torch.zeros_like(state["fc.weight"])
    state["fc.bias"] = torch.full_like(state["fc.bias"], math.log(probability / (1 - probability)))
    return state


def test_tags_fire_above_their_class_threshold_in_tag_list_order(tmp_path, images):
    paths = write_tiny_ram(tmp_path, ram_state=_firing_state(0.75), thresholds=[0.65, 0.8, 0.65, 0.9, 0.65, 0.7])
    tags, embeds = _load(paths)(images)
    assert tags == ["cat, tree, building, water"] * 2


def test_short_or_absent_threshold_file_uses_rams_default(tmp_path, images):
    paths = write_tiny_ram(tmp_path, ram_state=_firing_state(0.67), thresholds=[0.6, 0.7])
    assert _load(paths).tags(images)[0] == "cat"  # 0.67 > 0.6; < 0.7; < the default 0.68 for the rest
    paths["thresholds"].unlink()
    with pytest.warns(UserWarning, match="0.68"):
        model = _load(paths)
    assert torch.equal(model.class_threshold, torch.full((len(TINY_TAGS),), DEFAULT_THRESHOLD))


def test_tags_from_logits_is_strict_and_per_class(tiny):
    model = _load(tiny)
    model.class_threshold = torch.tensor([0.5, 0.5, 0.9, 0.1, 0.5, 0.5])
    logits = torch.tensor([[0.0, 1.0, 1.0, -1.0, 5.0, -5.0], [-9.0, -9.0, -9.0, -1.0, -9.0, -9.0]])  # sigmoid(0) = 0.5 does not fire
    assert model.tags_from_logits(logits) == ["dog, sky, building", "sky"]


def test_embeddings_and_tags_of_one_pass(tiny, images):
    model = _load(tiny, dape=True)
    pixels = model.preprocess(images)
    assert pixels.shape == (2, 3, 64, 64)
    grey = model.preprocess(torch.full((1, 3, 10, 10), 0.5))
    expected = torch.tensor([(0.5 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD)])
    torch.testing.assert_close(grey[0, :, 3, 3], expected)
    ramp = torch.linspace(0, 1, 8).expand(1, 3, 8, 8).contiguous()
    mean, std = torch.tensor(IMAGENET_MEAN).view(3, 1, 1), torch.tensor(IMAGENET_STD).view(3, 1, 1)
    bicubic = model.preprocess(ramp, resize="bicubic") * std + mean  # SeeSR's training resize: bicubic, clamped
    torch.testing.assert_close(bicubic, F.interpolate(ramp, size=64, mode="bicubic").clamp(0, 1), atol=1e-6, rtol=0)
    assert (bicubic - (model.preprocess(ramp) * std + mean)).abs().max() > 1e-3
    tags, embeds = model(images)
    assert embeds.shape == (2, TINY_RAM_CONFIG.num_tokens, TINY_RAM_CONFIG.embed_width) and torch.isfinite(embeds).all()
    assert TINY_RAM_CONFIG.num_tokens == 17  # pooled token + 4 x 4 final tokens
    torch.testing.assert_close(embeds, model.image_embeddings(images))
    assert tags == model.tags(images) and len(tags) == 2
    torch.testing.assert_close(embeds[:, 0], model.image_proj(model.visual_encoder.forward_features(pixels).flatten(1, 2).mean(1)))


def test_half_precision_keeps_float32_thresholds(tiny, images):
    model = _load(tiny, dtype=torch.bfloat16)
    assert model.image_embeddings(images).dtype == torch.bfloat16
    assert model.class_threshold.dtype == torch.float32


@pytest.mark.parametrize(
    "missing, error, names",
    [
        ("ram", CheckpointError, "ram_swin_large_14m.pth"),
        ("dape", CheckpointError, "DAPE.pth"),
        ("tag_list", DataError, "ram_tag_list.txt"),
    ],
)
def test_missing_file_is_one_line_naming_it(tmp_path, missing, error, names):
    paths = write_tiny_ram(tmp_path)
    paths[missing].unlink()
    with pytest.raises(error) as err:
        _load(paths, dape=True)
    message = str(err.value)
    assert "\n" not in message and one_line(message) == message
    assert names in message and str(paths[missing]) in message


def test_tag_list_of_another_length_is_refused(tmp_path):
    paths = write_tiny_ram(tmp_path)
    paths["tag_list"].write_text("\n".join(TINY_TAGS[:4]), encoding="utf-8")
    with pytest.raises(DataError, match="4 tags"):
        _load(paths)


def test_pickled_release_needs_the_converter(tmp_path, tiny, images):
    import scripts.convert_ram as convert_ram

    state = torch.load(tiny["ram"], weights_only=True)["model"]
    pickled = tmp_path / "ram_swin_large_14m.pth"
    torch.save({"model": state, "args": argparse.Namespace(lr=1e-4)}, pickled)
    for kind in ("tag_list", "thresholds"):  # beside the weights, as load_ram_tagger looks for them
        (tmp_path / tiny[kind].name).write_bytes(tiny[kind].read_bytes())
    with pytest.raises(CheckpointError, match="convert_ram.py"):
        load_ram_tagger(pickled, config=TINY_RAM_CONFIG)
    out = tmp_path / "ram.safetensors"
    with pytest.raises(CheckpointError):
        convert_ram.main(convert_ram.parse_args([str(pickled), str(out)]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        convert_ram.convert(pickled, out, trust_pickle=True, config=TINY_RAM_CONFIG)
    converted = load_ram_tagger(out, config=TINY_RAM_CONFIG)
    torch.testing.assert_close(converted.image_embeddings(images), _load(tiny).image_embeddings(images))


def test_tag_lists_found_in_seesrs_code_tree(tmp_path, monkeypatch):
    """Weights in preset/models/, lists only in ram/data/ under the current folder: SeeSR's own layout."""
    paths = write_tiny_ram(tmp_path / "preset/models")
    (tmp_path / "ram/data").mkdir(parents=True)
    for key in ("tag_list", "thresholds"):
        paths[key].rename(tmp_path / "ram/data" / paths[key].name)
    monkeypatch.chdir(tmp_path)
    tagger = load_ram_tagger(paths["ram"], config=TINY_RAM_CONFIG)
    assert tagger.tag_list == list(TINY_TAGS)
    assert tagger.class_threshold[1].item() == pytest.approx(0.8)  # from the threshold file, not the 0.68 default
