"""Phaseformer model: heads and padding, the official key layout, foreign checkpoints, fp32 phase attention,
the two ECA gates, save/load round trips and the release-file converter."""

from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import models.phaseformer as phaseformer_module
from models.phaseformer import (
    ECA,
    MDTA,
    Phaseformer,
    build_phaseformer,
    infer_phaseformer_config,
    load_phaseformer_state_dict,
    phase_only,
    phaseformer_from_weights_file,
    read_weights_file,
)
from utils.errors import CheckpointError, UserError, run_cli

REPO = Path(__file__).resolve().parents[1]



def tiny(**overrides) -> Phaseformer:
    torch.manual_seed(0)
    return build_phaseformer("phaseformer_tiny", **overrides).eval()


def load_converter():
    spec = importlib.util.spec_from_file_location("convert_phaseformer", REPO / "scripts" / "convert_phaseformer.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def official_extras(model: Phaseformer) -> dict[str, torch.Tensor]:
    """The two entries of the official state dict that its forward never uses."""
    width = model.config.channels[0]
    return {
        "ups2.body.0.weight": torch.randn(2 * width, width, 3, 3),
        "attention.3.conv.weight": torch.randn(1, 1, 3),
    }


def test_both_heads_on_odd_sizes_are_padded_and_cropped_back():
    model = tiny()
    for height, width in [(13, 21), (3, 5), (16, 24)]:
        x = torch.rand(2, 3, height, width)
        with torch.no_grad():
            fake_b_L, fake_b_H = model(x)
            only_low = model(x, return_high=False)
        assert fake_b_L.shape == (2, 3, height, width)
        assert fake_b_H.shape == (2, 3, 2 * height, 2 * width)
        assert only_low.fake_b_H is None
        torch.testing.assert_close(only_low.fake_b_L, fake_b_L)
        assert torch.isfinite(fake_b_L).all() and torch.isfinite(fake_b_H).all()


def test_every_parameter_gets_a_gradient_from_the_two_heads():
    model = tiny().train()
    fake_b_L, fake_b_H = model(torch.rand(1, 3, 16, 16))
    (fake_b_L.square().mean() + fake_b_H.square().mean()).backward()
    without_grad = [name for name, p in model.named_parameters() if p.grad is None]
    assert without_grad == []  # no unused parameters: DDP would refuse them


def test_official_preset_matches_the_official_parameter_layout():
    model = build_phaseformer("phaseformer")
    state = model.state_dict()
    # The official model_with_eca.Restormer has 1,783,800 parameters and 282 state-dict entries; its unused
    # ups2 (4,608) and attention.3 (3) are left out here.
    assert sum(p.numel() for p in model.parameters()) == 1_783_800 - 4_608 - 3
    assert len(state) == 282 - 2
    official_shapes = {  # names and shapes from the official file
        "attention.0.conv.weight": (1, 1, 3),
        "attention.2.conv.weight": (1, 1, 3),
        "embed_conv_rgb.weight": (16, 3, 3, 3),
        "ups1.body.0.weight": (64, 32, 3, 3),
        "encoders.0.0.norm1.bias": (16,),
        "encoders.0.0.attn.temperature": (1, 1, 1, 1),
        "encoders.0.0.attn.qkv.weight": (48, 16, 1, 1),
        "encoders.0.0.attn.qkv_conv.weight": (48, 1, 3, 3),
        "encoders.0.0.ffn.project_in.weight": (84, 16, 1, 1),
        "encoders.0.0.ffn.project_out.weight": (16, 42, 1, 1),
        "encoders.3.3.attn.temperature": (1, 8, 1, 1),
        "downs.2.body.0.weight": (32, 64, 3, 3),
        "ups.0.body.0.weight": (256, 128, 3, 3),
        "reduces.0.weight": (64, 128, 1, 1),
        "reduces.1.weight": (32, 64, 1, 1),
        "decoders.2.1.ffn.project_out.weight": (32, 85, 1, 1),
        "refinement.3.norm2.weight": (32,),
        "output.weight": (3, 8, 3, 3),
        "output1.weight": (8, 16, 3, 3),
        "outputl.weight": (8, 32, 3, 3),
    }
    for name, shape in official_shapes.items():
        assert tuple(state[name].shape) == shape, name


def test_official_layout_state_dict_loads_strictly_and_reproduces_outputs():
    source = tiny(eca="phase")
    official = {**source.state_dict(), **official_extras(source)}
    wrapped = {"state_dict": {f"module.{key}": value for key, value in official.items()}}  # DataParallel + container
    target = build_phaseformer("phaseformer_tiny", eca="phase").eval()
    load_phaseformer_state_dict(target, wrapped)
    x = torch.rand(1, 3, 24, 32)
    with torch.no_grad():
        for ours, theirs in zip(target(x), source(x)):
            # Measured 0 at 1 and 2 threads; a reloaded copy may round differently elsewhere (~1e-7, see
            # tests/test_seesr_model.py); a mis-mapped weight gives differences of order 0.1.
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)
    assert infer_phaseformer_config(official)["channels"] == [8, 16, 32, 64]


def test_foreign_and_incomplete_state_dicts_are_refused_with_a_sentence():
    model = tiny()
    agssf_like = {  # the older model: SFCA attention with an AGSSF gate, frequency-domain upsampling
        "attention.0.identity1.weight": torch.zeros(64, 64, 1, 1),
        "attention.0.agssf.conv.weight": torch.zeros(1, 1, 3),
        "embed_conv_rgb.weight": torch.zeros(16, 3, 3, 3),
        "encoders.0.0.attn.q1X1_1.weight": torch.zeros(16, 16, 1, 1),
        "ups_1.Fups.amp_fuse.0.weight": torch.zeros(128, 128, 1, 1),
        "down1.body.0.weight": torch.zeros(8, 16, 3, 3),
    }
    with pytest.raises(CheckpointError, match="AGSSF/Spectroformer checkpoint"):
        load_phaseformer_state_dict(model, {"netG": agssf_like}, "old.pth")
    restormer_like = {"patch_embed.proj.weight": torch.zeros(48, 3, 3, 3), "encoder_level1.0.norm1.body.weight": torch.zeros(48)}
    with pytest.raises(CheckpointError, match="Restormer checkpoint"):
        load_phaseformer_state_dict(model, restormer_like)
    with pytest.raises(CheckpointError, match="not a Phaseformer checkpoint"):
        load_phaseformer_state_dict(model, {"fc.weight": torch.zeros(2, 2)})
    incomplete = dict(model.state_dict())
    incomplete.pop("outputl.weight")
    incomplete["extra.weight"] = torch.zeros(1)
    with pytest.raises(CheckpointError, match=r"1 missing keys \(outputl.weight\) and 1 unexpected keys \(extra.weight\)"):
        load_phaseformer_state_dict(model, incomplete)
    with pytest.raises(CheckpointError, match="Phaseformer of another size .*build the model with the preset 'phaseformer'"):
        load_phaseformer_state_dict(model, build_phaseformer("phaseformer").state_dict())
    with pytest.raises(UserError, match="Unknown Phaseformer preset"):
        build_phaseformer("phaseformer_huge")


def test_phase_only_equals_the_official_full_fft_formula():
    for shape in [(2, 4, 8, 8), (1, 3, 7, 9), (1, 2, 15, 6)]:
        x = torch.randn(*shape, dtype=torch.float64)
        official = torch.fft.ifft2(torch.exp(1j * torch.fft.fft2(x).angle())).real
        torch.testing.assert_close(phase_only(x), official)
        # The spatial mean of a phase-only map is its DC bin over H*W: +-1/(H*W).
        means = phase_only(x).mean(dim=(-2, -1)).abs()
        torch.testing.assert_close(means, torch.full_like(means, 1.0 / (shape[-1] * shape[-2])))


def test_phase_attention_runs_in_fp32_under_autocast(monkeypatch):
    torch.manual_seed(0)
    block = MDTA(channels=8, num_heads=2)
    x = torch.randn(2, 8, 12, 12)
    seen = []

    def recording_phase_only(tensor):
        result = phase_only(tensor)
        seen.append((tensor.dtype, result.dtype))
        return result

    monkeypatch.setattr(phaseformer_module, "phase_only", recording_phase_only)
    reference = block(x)
    seen.clear()
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        mixed = block(x)
    assert seen == [(torch.bfloat16, torch.float32)] * 2  # q and k arrive in bf16, leave the FFT in fp32
    assert mixed.dtype == torch.bfloat16  # the projections still run in bf16
    torch.testing.assert_close(mixed.float(), reference, atol=5e-2, rtol=5e-2)


def test_phase_gate_is_constant_one_half_and_feature_gate_is_not():
    torch.manual_seed(0)
    features = torch.randn(4, 64, 16, 16) * torch.linspace(0.1, 3.0, 64).view(1, 64, 1, 1) + torch.randn(4, 64, 1, 1)
    phase_gate, feature_gate = ECA(64, gate="phase"), ECA(64, gate="feature")
    feature_gate.load_state_dict(phase_gate.state_dict())
    with torch.no_grad():
        phase_values = phase_gate.gate_values(features)
        feature_values = feature_gate.gate_values(features)
    assert (phase_values - 0.5).abs().max() < 1e-2  # pooled input is +-1/256, so sigmoid(~0)
    assert feature_values.std() > 0.05 and (feature_values - 0.5).abs().max() > 0.1
    model = tiny()
    assert {eca.gate for eca in model.attention} == {"feature"}  # the default for new training


def test_save_pretrained_round_trip(tmp_path):
    model = tiny(eca="phase")
    model.save_pretrained(tmp_path / "phaseformer")
    loaded = Phaseformer.from_pretrained(tmp_path / "phaseformer").eval()
    assert loaded.config.eca == "phase"
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).fake_b_H, model(x).fake_b_H)


def _save_fake_official_release(model: Phaseformer, path: Path, monkeypatch) -> None:
    """torch.save of a whole module of class model_with_eca.Restormer, as the official release does."""
    fake_module = types.ModuleType("model_with_eca")

    class Restormer(nn.Module):
        def __init__(self):
            super().__init__()
            for name, child in model.named_children():
                setattr(self, name, child)
            self.attention = nn.ModuleList(list(model.attention) + [ECA(64)])
            self.ups2 = nn.Sequential()

    Restormer.__module__, Restormer.__qualname__ = "model_with_eca", "Restormer"
    fake_module.Restormer = Restormer
    monkeypatch.setitem(sys.modules, "model_with_eca", fake_module)
    torch.save(Restormer(), path)
    monkeypatch.delitem(sys.modules, "model_with_eca")  # the official code is absent when converting


def test_converter_needs_trust_pickle_for_whole_modules_and_then_reproduces_outputs(tmp_path, monkeypatch, capsys):
    converter = load_converter()
    source = tiny(eca="phase")
    release = tmp_path / "best.pth"
    _save_fake_official_release(source, release, monkeypatch)
    out = tmp_path / "phaseformer.safetensors"

    with pytest.raises(CheckpointError, match="rerun with --trust_pickle"):
        converter.main(converter.parse_args([str(release), str(out)]))
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: converter.main(converter.parse_args([str(release), str(out)])))
    assert exit_info.value.code == 2 and "--trust_pickle" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="convert it once"):
        read_weights_file(release)

    converter.main(converter.parse_args([str(release), str(out), "--trust_pickle"]))
    converted = phaseformer_from_weights_file(out).eval()
    assert converted.config.eca == "phase" and list(converted.config.channels) == [8, 16, 32, 64]
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        for ours, theirs in zip(converted(x), source(x)):
            torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # as above: measured 0, a wrong weight is ~0.1


def test_converter_reads_nested_state_dicts_and_refuses_foreign_ones(tmp_path):
    converter = load_converter()
    source = tiny(eca="phase")
    nested = tmp_path / "nested.pth"
    torch.save({"epoch": 3, "model": {**source.state_dict(), **official_extras(source)}}, nested)
    out = tmp_path / "nested.safetensors"
    converter.main(converter.parse_args([str(nested), str(out), "--eca", "feature"]))
    state, metadata = read_weights_file(out)
    assert '"eca": "feature"' in metadata["phaseformer_config"]
    assert set(state) == set(source.state_dict())
    agssf = tmp_path / "agssf.pth"
    torch.save({"attention.0.agssf.conv.weight": torch.zeros(1, 1, 3), "embed_conv_rgb.weight": torch.zeros(16, 3, 3, 3)}, agssf)
    with pytest.raises(CheckpointError, match="AGSSF/Spectroformer"):
        converter.main(converter.parse_args([str(agssf), str(tmp_path / "agssf.safetensors")]))
