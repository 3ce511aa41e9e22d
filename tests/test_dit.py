"""LightningDiT: reference key layout, adaLN-Zero init, RoPE, gradients, save/load and --init_from."""

import pytest
import torch

from models.dit import (
    DIT_SIZES,
    LightningDiT,
    build_dit,
    dit_config,
    load_lightningdit_init,
    read_lightningdit_release,
    release_uses_qknorm,
)
from utils.errors import CheckpointError, UserError


def tiny(**overrides):
    torch.manual_seed(0)
    config = dict(input_size=8, patch_size=1, in_channels=4, hidden_size=64, depth=1, num_heads=4, num_classes=5, class_dropout_prob=0.1)
    config.update(overrides)
    return LightningDiT(**config)


def perturb(model, scale=0.05):
    """Give the zero-initialised adaLN and output layers non-zero weights so every path carries signal."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


# Names and shapes read off hustvl/LightningDiT models/lightningdit.py for depth 1, hidden 64, 4 heads, all options on.
REFERENCE_KEYS_ALL_OPTIONS = {
    "pos_embed": (1, 64, 64),
    "feat_rope.freqs_cos": (64, 16),
    "feat_rope.freqs_sin": (64, 16),
    "x_embedder.proj.weight": (64, 4, 1, 1),
    "x_embedder.proj.bias": (64,),
    "t_embedder.mlp.0.weight": (64, 256),
    "t_embedder.mlp.0.bias": (64,),
    "t_embedder.mlp.2.weight": (64, 64),
    "t_embedder.mlp.2.bias": (64,),
    "y_embedder.embedding_table.weight": (6, 64),
    "blocks.0.norm1.weight": (64,),
    "blocks.0.norm2.weight": (64,),
    "blocks.0.attn.qkv.weight": (192, 64),
    "blocks.0.attn.qkv.bias": (192,),
    "blocks.0.attn.q_norm.weight": (16,),
    "blocks.0.attn.k_norm.weight": (16,),
    "blocks.0.attn.proj.weight": (64, 64),
    "blocks.0.attn.proj.bias": (64,),
    "blocks.0.mlp.w12.weight": (340, 64),
    "blocks.0.mlp.w12.bias": (340,),
    "blocks.0.mlp.w3.weight": (64, 170),
    "blocks.0.mlp.w3.bias": (64,),
    "blocks.0.adaLN_modulation.1.weight": (384, 64),
    "blocks.0.adaLN_modulation.1.bias": (384,),
    "final_layer.norm_final.weight": (64,),
    "final_layer.linear.weight": (4, 64),
    "final_layer.linear.bias": (4,),
    "final_layer.adaLN_modulation.1.weight": (128, 64),
    "final_layer.adaLN_modulation.1.bias": (128,),
}


def test_state_dict_uses_lightningdit_names_and_shapes():
    model = tiny(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == REFERENCE_KEYS_ALL_OPTIONS
    plain = tiny(wo_shift=True, use_qknorm=True).state_dict()  # DiT's GELU MLP, LayerNorm QK-norm, no shift terms
    assert {"blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc2.bias", "blocks.0.attn.q_norm.bias"} <= set(plain)
    assert "blocks.0.norm1.weight" not in plain and "feat_rope.freqs_cos" not in plain
    assert plain["blocks.0.adaLN_modulation.1.weight"].shape == (256, 64)


@pytest.mark.parametrize(
    "options",
    [
        dict(),
        dict(use_swiglu=True, use_rope=True, use_rmsnorm=True),
        dict(use_qknorm=True, wo_shift=True),
        dict(patch_size=2, learn_sigma=True),
    ],
)
def test_forward_shapes_and_adaln_zero_init(options):
    model = tiny(**options).eval()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.rand(3), torch.tensor([0, 4, 5]))
    assert out.shape == x.shape
    # adaLN-Zero: zero gates and a zero output layer, so a fresh model predicts exactly zero velocity.
    assert torch.equal(out, torch.zeros_like(out))


def test_fixed_position_tables():
    model = tiny(use_rope=True, hidden_size=64, num_heads=4)
    # sin-cos positions: token 0 sits at (0, 0): sin terms 0, cos terms 1 in both halves.
    quarter = 16
    first = model.pos_embed[0, 0]
    assert torch.equal(first[:quarter], torch.zeros(quarter)) and torch.equal(first[quarter:2 * quarter], torch.ones(quarter))
    # RoPE: a query-key score depends only on the offset between the two tokens' grid positions.
    rope = model.feat_rope
    q, k = torch.randn(16), torch.randn(16)
    token = lambda row, col: row * 8 + col  # noqa: E731
    score = lambda a, b: (rope(q.expand(64, 16))[a] * rope(k.expand(64, 16))[b]).sum()  # noqa: E731
    torch.testing.assert_close(score(token(1, 2), token(3, 5)), score(token(4, 1), token(6, 4)), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(score(token(1, 2), token(3, 5)), score(token(1, 2), token(5, 3)))


def test_every_parameter_gets_a_gradient_and_checkpointing_agrees():
    model = perturb(tiny(use_qknorm=True, use_swiglu=True, use_rope=True, use_rmsnorm=True)).train()
    x, t, y = torch.randn(4, 4, 8, 8), torch.rand(4), torch.tensor([0, 1, 4, 5])  # 5 = null row
    torch.manual_seed(3)
    model(x, t, y).pow(2).mean().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
    model.zero_grad()
    model.enable_gradient_checkpointing()
    torch.manual_seed(3)  # the same label dropout draw
    model(x, t, y).pow(2).mean().backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[name], atol=1e-6, rtol=1e-5)


def test_label_dropout_only_in_training():
    model = perturb(tiny(class_dropout_prob=1.0)).train()
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    dropped = model(x, t, torch.tensor([0, 1]))
    model.eval()
    torch.testing.assert_close(dropped, model(x, t, torch.tensor([5, 5])))
    assert not torch.allclose(model(x, t, torch.tensor([0, 1])), dropped)


def test_save_pretrained_round_trip(tmp_path):
    model = perturb(build_dit("tiny", num_users=3, input_size=8, in_channels=4)).eval()
    model.save_pretrained(tmp_path)
    again = LightningDiT.from_pretrained(tmp_path).eval()
    assert again.config.num_classes == 3 and again.null_label == 3
    x, t, y = torch.randn(2, 4, 8, 8), torch.rand(2), torch.tensor([0, 3])
    torch.testing.assert_close(again(x, t, y), model(x, t, y), atol=0, rtol=0)


def test_sizes_and_config():
    assert set(DIT_SIZES) == {"tiny", "S", "B", "L", "XL"}
    config = dit_config("xl", num_users=31)
    assert (config["depth"], config["hidden_size"], config["num_heads"], config["patch_size"]) == (28, 1152, 16, 1)
    assert config["num_classes"] == 31 and config["use_swiglu"] and config["use_rope"] and config["use_rmsnorm"]
    with pytest.raises(UserError, match="tiny, S, B, L, XL"):
        dit_config("huge", num_users=31)


def _release_checkpoint(path, **overrides):
    """A tiny 'released LightningDiT' with 1000 ImageNet classes, saved like LightningDiT's train.py."""
    release = perturb(build_dit("tiny", num_users=1000, input_size=8, in_channels=4, **overrides))
    ema = {k: v + 1.0 for k, v in release.state_dict().items()}  # distinguishable from 'model'
    torch.save({"model": release.state_dict(), "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": {"lr": 1e-4}}, path)
    return ema


def test_init_from_loads_everything_and_the_release_null_row(tmp_path):
    path = tmp_path / "lightningdit-tiny.pt"
    ema = _release_checkpoint(path)
    model = build_dit("tiny", num_users=31, input_size=8, in_channels=4)
    fresh_table = model.y_embedder.embedding_table.weight.detach().clone()
    report = load_lightningdit_init(model, path, num_users=31)
    state = model.state_dict()
    assert len(report.loaded) == len(state) - 1 and report.new == [] and report.skipped == []
    assert report.resized == ["y_embedder.embedding_table.weight (1001, 64) -> (32, 64): the release's null row 1000 copied to "
                              "row 31, 31 user rows new"]
    for key in report.loaded:
        assert torch.equal(state[key], ema[key]), key  # EMA weights preferred over 'model'
    table = model.y_embedder.embedding_table.weight
    assert torch.equal(table[31], ema["y_embedder.embedding_table.weight"][1000])  # the trained null class
    assert torch.equal(table[:31], fresh_table[:31])  # user rows keep their initialisation
    assert "1 resized" in report.summary() and "0 new (none)" in report.summary()
    # A model without a null row (--cfg_dropout 0) takes nothing from the table and says so.
    plain = build_dit("tiny", num_users=31, input_size=8, in_channels=4, class_dropout_prob=0.0)
    report = load_lightningdit_init(plain, path)
    assert report.skipped == ["y_embedder.embedding_table.weight (1001, 64) (the model has no null row)"]
    assert report.new == ["y_embedder.embedding_table.weight (31 rows)"]


def test_init_from_reports_new_qknorm_and_accepts_ddp_prefixes(tmp_path):
    path = tmp_path / "ddp.pt"
    release = perturb(build_dit("tiny", num_users=1000, input_size=8, in_channels=4))
    torch.save({"state_dict": {f"module.{k}": v for k, v in release.state_dict().items()}}, path)
    assert release_uses_qknorm(read_lightningdit_release(path)) is False
    assert release_uses_qknorm(build_dit("tiny", num_users=3, input_size=8, in_channels=4, use_qknorm=True).state_dict())
    model = build_dit("tiny", num_users=4, input_size=8, in_channels=4, use_qknorm=True)
    report = load_lightningdit_init(model, path)
    assert len(report.new) == 4 and all("q_norm" in k or "k_norm" in k for k in report.new)  # 2 blocks x (q, k)
    assert "copied to row 4" in report.resized[0]


def test_init_from_mismatch_lists_the_tensors(tmp_path):
    path = tmp_path / "release.pt"
    _release_checkpoint(path)
    wider = build_dit("tiny", num_users=31, input_size=8, in_channels=4, hidden_size=32, num_heads=2)
    match = r"36 tensors with other shapes \[blocks.0.adaLN_modulation.1.bias \(384,\) vs model \(192,\)"
    with pytest.raises(CheckpointError, match=match) as info:
        load_lightningdit_init(wider, path)
    assert "x_embedder.proj.weight (64, 4, 1, 1) vs model (32, 4, 1, 1)" in info.value.mismatched_keys
    gelu = build_dit("tiny", num_users=31, input_size=8, in_channels=4, use_swiglu=False)
    with pytest.raises(CheckpointError, match=r"tensors the model has no place for \[blocks.0.mlp.w12.bias"):
        load_lightningdit_init(gelu, path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_lightningdit_init(gelu, tmp_path / "missing.pt")
