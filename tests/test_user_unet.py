"""Latent UNet + UserConditionEncoder: shapes, null user, gradients, save/load, strict encoder loading."""

import json
import sys
import types

import pytest
import torch
from torch import nn

from models.user_unet import UNET_SIZES, UserConditionedUNet, UserConditionEncoder, build_user_unet, load_condition_encoder
from utils.errors import CheckpointError, UserError


def tiny_unet(num_users=4):
    torch.manual_seed(0)
    return build_user_unet("tiny", num_users=num_users, in_channels=4, sample_size=8)


def test_condition_encoder_tokens_and_null_user():
    encoder = UserConditionEncoder(num_users=31, cross_attention_dim=16, dropout_prob=1.0)
    assert encoder.embedding.weight.shape == (32, 16) and encoder.null_label == 31
    labels = torch.tensor([0, 30, 31])
    encoder.eval()
    tokens = encoder(labels)
    assert tokens.shape == (3, 1, 16)
    torch.testing.assert_close(tokens[:, 0], encoder.embedding.weight[[0, 30, 31]])
    encoder.train()  # label dropout to the null row happens only in training mode
    torch.testing.assert_close(encoder(labels)[:, 0], encoder.embedding.weight[[31, 31, 31]])


def test_forward_backward_every_parameter_gets_a_gradient():
    model = tiny_unet().train()
    x = torch.randn(3, 4, 8, 8)
    out = model(x, torch.tensor([1, 500, 999]), torch.tensor([0, 3, 4]))
    assert out.shape == x.shape
    out.pow(2).mean().backward()
    for name, parameter in model.named_parameters():
        assert parameter.grad is not None, name
        # With a single condition token the cross-attention softmax is identically 1, so its query and key
        # projections cannot influence the output: their gradient is zero by construction.
        if ".attn2.to_q." in name or ".attn2.to_k." in name:
            assert parameter.grad.abs().max() < 1e-10, name  # zero up to rounding
        else:
            assert parameter.grad.abs().sum() > 0, name


def test_user_changes_the_output():
    model = tiny_unet().eval()
    x, t = torch.randn(1, 4, 8, 8).expand(2, -1, -1, -1), torch.tensor([300, 300])
    out = model(x, t, torch.tensor([0, 1]))
    assert not torch.allclose(out[0], out[1])


def test_save_pretrained_round_trip(tmp_path):
    model = tiny_unet().eval()
    model.save_pretrained(tmp_path)
    assert (tmp_path / "unet" / "config.json").is_file() and (tmp_path / "condition_encoder" / "config.json").is_file()
    again = UserConditionedUNet.from_pretrained(tmp_path).eval()
    assert again.num_users == 4 and again.null_label == 4
    x, t, y = torch.randn(2, 4, 8, 8), torch.tensor([5, 900]), torch.tensor([0, 4])
    torch.testing.assert_close(again(x, t, y), model(x, t, y), atol=0, rtol=0)


def test_condition_encoder_loading_is_strict(tmp_path):
    encoder = tiny_unet(num_users=31).condition_encoder
    path = tmp_path / "condition_encoder.pt"
    torch.save(encoder.state_dict(), path)
    loaded = load_condition_encoder(path, num_users=31, cross_attention_dim=32)
    assert torch.equal(loaded.embedding.weight, encoder.embedding.weight) and loaded.null_label == 31
    # 32 rows read as 30 users would put a real user into the null row (or drop one): one line, both readings named.
    with pytest.raises(UserError, match=r"has 32 rows, but --num_users 30 needs 30 \(one per user.*or 31 \(users \+ a null row\)"):
        load_condition_encoder(path, num_users=30, cross_attention_dim=32)
    torch.save({"weight": encoder.embedding.weight, "bias": torch.zeros(3)}, path)
    with pytest.raises(CheckpointError, match="no 'embedding.weight'"):
        load_condition_encoder(path, num_users=31, cross_attention_dim=32)
    torch.save({"embedding.weight": encoder.embedding.weight, "proj.weight": torch.zeros(32, 32)}, path)
    with pytest.raises(CheckpointError, match=r"more than a user table \(proj.weight\)"):
        load_condition_encoder(path, num_users=31, cross_attention_dim=32)
    with pytest.raises(CheckpointError, match="gives 32-wide tokens but the UNet cross-attends to 16"):
        torch.save(encoder.state_dict(), path)
        load_condition_encoder(path, num_users=31, cross_attention_dim=16)
    wrong_width = UserConditionEncoder(num_users=4, cross_attention_dim=8)
    with pytest.raises(CheckpointError, match="8-wide tokens but the UNet cross-attends to 32"):
        UserConditionedUNet(tiny_unet().unet, wrong_width)


def test_the_users_encoder_without_a_null_row(tmp_path):
    """The note's encoder: nn.Embedding(num_users, D), no null row; a 12-row table is 12 users, never 11 + null."""
    table = torch.randn(12, 32, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "condition_encoder.pt"
    torch.save({"embedding.weight": table}, path)
    loaded = load_condition_encoder(path, num_users=12, cross_attention_dim=32)
    assert loaded.null_label is None and loaded.config.num_users == 12 and loaded.config.null_row is False
    torch.testing.assert_close(loaded(torch.tensor([0, 11]))[:, 0], table[[0, 11]], atol=0, rtol=0)
    with pytest.raises(UserError, match=r"has 12 rows, but --num_users 31 needs 31 .* \(12 when every row is a user\)"):
        load_condition_encoder(path, num_users=31, cross_attention_dim=32)
    # condition_encoder_config.json (written by train_dit_user.py) settles the count: 12 rows = 11 users + null row.
    (tmp_path / "condition_encoder_config.json").write_text(json.dumps({"num_users": 11, "null_row": True}))
    assert load_condition_encoder(path, num_users=11, cross_attention_dim=32).null_label == 11
    with pytest.raises(UserError, match="--num_users 12 disagrees with the 11 users recorded"):
        load_condition_encoder(path, num_users=12, cross_attention_dim=32)
    with pytest.raises(UserError, match="cannot drop labels"):
        UserConditionEncoder(num_users=3, cross_attention_dim=8, dropout_prob=0.1, null_row=False)
    model = build_user_unet("tiny", num_users=3, in_channels=4, sample_size=8, dropout_prob=0.0)
    assert model.null_label is None and model.condition_encoder.embedding.weight.shape == (3, 32)


def test_a_pickled_encoder_module_needs_trust_pickle(tmp_path):
    """torch.save(encoder) of the users' own class (not importable here) is read only with --trust_pickle."""
    module = types.ModuleType("users_training_script")

    class UserConditionEncoderOfTheNote(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(5, 32)

    UserConditionEncoderOfTheNote.__module__ = module.__name__
    UserConditionEncoderOfTheNote.__qualname__ = "UserConditionEncoderOfTheNote"
    module.UserConditionEncoderOfTheNote = UserConditionEncoderOfTheNote
    sys.modules[module.__name__] = module
    try:
        torch.manual_seed(0)
        original = UserConditionEncoderOfTheNote()
        torch.save(original, tmp_path / "condition_encoder.pt")
    finally:
        del sys.modules[module.__name__]  # as in a fresh process: the class cannot be imported
    with pytest.raises(CheckpointError, match="is a pickled module .* pass --trust_pickle"):
        load_condition_encoder(tmp_path / "condition_encoder.pt", num_users=5, cross_attention_dim=32)
    loaded = load_condition_encoder(tmp_path / "condition_encoder.pt", num_users=5, cross_attention_dim=32, trust_pickle=True)
    assert loaded.null_label is None
    torch.testing.assert_close(loaded.embedding.weight, original.embedding.weight, atol=0, rtol=0)


def test_sizes():
    assert set(UNET_SIZES) == {"default", "tiny"}
    with pytest.raises(UserError, match="default, tiny"):
        build_user_unet("huge", num_users=3)
