"""VA-VAE: LDM checkpoint layout, strict loading with the training-only keys dropped, and numerical parity.

The LDM key layout and a functional LDM forward pass are written out here independently of
``models/vavae.py`` (from the LDM ``Encoder``/``Decoder`` of hustvl/LightningDiT ``tokenizer/autoencoder.py``),
so a wrong key mapping (e.g. swapped q/k, reversed decoder levels) fails these tests.
"""

import argparse
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from models.vavae import (
    VAVAE_CONFIGS,
    build_vavae_autoencoder,
    diffusers_to_ldm_key,
    file_fingerprint,
    ldm_to_diffusers_key,
    load_vavae,
)
from utils.errors import CheckpointError

TINY = dict(ch=32, ch_mult=(1, 1, 1, 1, 2), num_res_blocks=1, z_channels=8)  # == VAVAE_CONFIGS["tiny"]
RELEASED = dict(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, z_channels=32)



def ldm_vae_state(ch, ch_mult, num_res_blocks, z_channels, seed=0, device="cpu"):
    """An LDM AutoencoderKL state dict (attention in the last level and the mid blocks), random values."""
    generator = torch.Generator().manual_seed(seed) if device == "cpu" else None
    state = {}

    def randn(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    def conv(name, cin, cout, k):
        state[f"{name}.weight"] = randn(cout, cin, k, k) / math.sqrt(cin * k * k)
        state[f"{name}.bias"] = 0.1 * randn(cout)

    def norm(name, c):
        state[f"{name}.weight"] = 1 + 0.1 * randn(c)
        state[f"{name}.bias"] = 0.1 * randn(c)

    def resnet(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, c):
        norm(f"{name}.norm", c)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", c, c, 1)

    levels = len(ch_mult)
    in_mult = (1,) + tuple(ch_mult)
    conv("encoder.conv_in", 3, ch, 3)
    for i in range(levels):
        block_in, block_out = ch * in_mult[i], ch * ch_mult[i]
        for j in range(num_res_blocks):
            resnet(f"encoder.down.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"encoder.down.{i}.attn.{j}", block_out)
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_out, block_out, 3)
    top = ch * ch_mult[-1]
    for side in ("encoder", "decoder"):
        resnet(f"{side}.mid.block_1", top, top)
        attn(f"{side}.mid.attn_1", top)
        resnet(f"{side}.mid.block_2", top, top)
    norm("encoder.norm_out", top)
    conv("encoder.conv_out", top, 2 * z_channels, 3)
    conv("quant_conv", 2 * z_channels, 2 * z_channels, 1)
    conv("post_quant_conv", z_channels, z_channels, 1)
    conv("decoder.conv_in", z_channels, top, 3)
    block_in = top
    for i in reversed(range(levels)):
        block_out = ch * ch_mult[i]
        for j in range(num_res_blocks + 1):
            resnet(f"decoder.up.{i}.block.{j}", block_in, block_out)
            block_in = block_out
            if i == levels - 1:
                attn(f"decoder.up.{i}.attn.{j}", block_out)
        if i != 0:
            conv(f"decoder.up.{i}.upsample.conv", block_out, block_out, 3)
    norm("decoder.norm_out", block_in)
    conv("decoder.conv_out", block_in, 3, 3)
    return state


# ---- a functional LDM forward pass over that state dict ---------------------------------------------


def _gn(x, s, name):
    return F.group_norm(x, 32, s[f"{name}.weight"], s[f"{name}.bias"], eps=1e-6)


def _conv(x, s, name, stride=1, padding=None):
    w = s[f"{name}.weight"]
    return F.conv2d(x, w, s[f"{name}.bias"], stride=stride, padding=w.shape[-1] // 2 if padding is None else padding)


def _resnet(x, s, name):
    h = _conv(F.silu(_gn(x, s, f"{name}.norm1")), s, f"{name}.conv1")
    h = _conv(F.silu(_gn(h, s, f"{name}.norm2")), s, f"{name}.conv2")
    skip = _conv(x, s, f"{name}.nin_shortcut") if f"{name}.nin_shortcut.weight" in s else x
    return skip + h


def _attn(x, s, name):
    h = _gn(x, s, f"{name}.norm")
    q, k, v = (_conv(h, s, f"{name}.{p}") for p in ("q", "k", "v"))
    b, c, hh, ww = q.shape
    weights = torch.softmax(torch.bmm(q.reshape(b, c, -1).permute(0, 2, 1), k.reshape(b, c, -1)) * c**-0.5, dim=2)
    out = torch.bmm(v.reshape(b, c, -1), weights.permute(0, 2, 1)).reshape(b, c, hh, ww)
    return x + _conv(out, s, f"{name}.proj_out")


def ldm_encode_mean(s, x, levels, num_res_blocks):
    h = _conv(x, s, "encoder.conv_in")
    for i in range(levels):
        for j in range(num_res_blocks):
            h = _resnet(h, s, f"encoder.down.{i}.block.{j}")
            if f"encoder.down.{i}.attn.{j}.q.weight" in s:
                h = _attn(h, s, f"encoder.down.{i}.attn.{j}")
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), s, f"encoder.down.{i}.downsample.conv", stride=2, padding=0)
    h = _resnet(h, s, "encoder.mid.block_1")
    h = _attn(h, s, "encoder.mid.attn_1")
    h = _resnet(h, s, "encoder.mid.block_2")
    h = _conv(F.silu(_gn(h, s, "encoder.norm_out")), s, "encoder.conv_out")
    return _conv(h, s, "quant_conv").chunk(2, dim=1)[0]


def ldm_decode(s, z, levels, num_res_blocks):
    h = _conv(_conv(z, s, "post_quant_conv"), s, "decoder.conv_in")
    h = _resnet(h, s, "decoder.mid.block_1")
    h = _attn(h, s, "decoder.mid.attn_1")
    h = _resnet(h, s, "decoder.mid.block_2")
    for i in reversed(range(levels)):
        for j in range(num_res_blocks + 1):
            h = _resnet(h, s, f"decoder.up.{i}.block.{j}")
            if f"decoder.up.{i}.attn.{j}.q.weight" in s:
                h = _attn(h, s, f"decoder.up.{i}.attn.{j}")
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode="nearest"), s, f"decoder.up.{i}.upsample.conv")
    return _conv(F.silu(_gn(h, s, "decoder.norm_out")), s, "decoder.conv_out")


def with_training_entries(state):
    """The extra entries of the public checkpoint that load_vavae must drop."""
    extra = dict(state)
    extra["loss.logvar"] = torch.zeros(())
    extra["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(4, 3, 3, 3)
    extra["loss.discriminator.main.0.weight"] = torch.randn(4, 3, 4, 4)
    extra["foundation_model.model.cls_token"] = torch.randn(1, 1, 8)
    extra["linear_proj.weight"] = torch.randn(16, 8, 1, 1)
    return extra


# ---- tests ------------------------------------------------------------------------------------------


def test_ldm_checkpoint_with_state_dict_wrapper_loads_strictly_and_matches_ldm_forward(tmp_path):
    state = ldm_vae_state(**TINY)
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": with_training_entries(state), "epoch": 3, "global_step": 100}, path)
    vae = load_vavae(path, config="tiny")
    images = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    latents = vae.encode(images)
    assert latents.shape == (2, 8, 2, 2) and vae.decode(latents).shape == (2, 3, 32, 32)
    assert not any(p.requires_grad for p in vae.parameters())
    # The two code paths (diffusers' modules with the converted keys, the LDM reference written out) compared in
    # float64 (measured max differences 1e-15 encoding, 1e-14 decoding): a wrong key, transpose or norm shows at 1e-1,
    # far above the 1e-9 tolerance.
    vae.autoencoder.double()
    state64 = {key: value.double() for key, value in state.items()}
    latents = vae.encode(images.double())
    torch.testing.assert_close(latents, ldm_encode_mean(state64, images.double(), 5, 1), atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(vae.decode(latents), ldm_decode(state64, latents, 5, 1), atol=1e-9, rtol=1e-9)


def test_safetensors_without_wrapper_loads(tmp_path):
    state = with_training_entries(ldm_vae_state(**TINY, seed=3))
    path = tmp_path / "vavae.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    vae = load_vavae(path, config="tiny")
    loaded = vae.autoencoder.state_dict()
    # The q projection of the last encoder level lands in diffusers' to_q as a linear weight.
    torch.testing.assert_close(
        loaded["encoder.down_blocks.4.attentions.0.to_q.weight"], state["encoder.down.4.attn.0.q.weight"][:, :, 0, 0]
    )
    # LDM's decoder level 4 (16 px) is diffusers' first up block.
    torch.testing.assert_close(loaded["decoder.up_blocks.0.resnets.1.conv1.weight"], state["decoder.up.4.block.1.conv1.weight"])
    torch.testing.assert_close(loaded["decoder.up_blocks.4.resnets.1.conv1.weight"], state["decoder.up.0.block.1.conv1.weight"])


def test_missing_key_is_an_error_naming_it(tmp_path):
    state = ldm_vae_state(**TINY)
    del state["encoder.down.4.attn.0.q.weight"]
    del state["decoder.up.0.block.1.norm2.bias"]
    path = tmp_path / "vavae.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(CheckpointError) as info:
        load_vavae(path, config="tiny")
    message = str(info.value)
    assert "2 missing keys" in message
    assert "encoder.down.4.attn.0.q.weight" in message and "decoder.up.0.block.1.norm2.bias" in message
    assert info.value.missing_keys == ["decoder.up.0.block.1.norm2.bias", "encoder.down.4.attn.0.q.weight"]
    assert "\n" not in message


def test_unexpected_and_misshapen_keys_are_errors_naming_them(tmp_path):
    state = ldm_vae_state(**TINY)
    state["decoder.up.0.attn.0.q.weight"] = torch.zeros(32, 32, 1, 1)  # attention where the model has none
    state["model_ema.decay"] = torch.tensor(0.999)
    path = tmp_path / "vavae.pt"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"2 unexpected keys \[decoder.up.0.attn.0.q.weight, model_ema.decay\]"):
        load_vavae(path, config="tiny")
    state = ldm_vae_state(**TINY)
    state["quant_conv.weight"] = torch.zeros(4, 16, 1, 1)
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"quant_conv.weight \(4, 16, 1, 1\) \(expected \(16, 16, 1, 1\)\)"):
        load_vavae(path, config="tiny")


def test_released_layout_maps_one_to_one_onto_the_diffusers_model():
    """Every key and shape of the f16d32 LDM layout has exactly one place in the diffusers model."""
    ldm = ldm_vae_state(**RELEASED, device="meta")
    model = build_vavae_autoencoder("f16d32").state_dict()
    assert len(ldm) == len(model) == 342
    assert {ldm_to_diffusers_key(k) for k in ldm} == set(model)
    assert {diffusers_to_ldm_key(k) for k in model} == set(ldm)
    for key, value in ldm.items():
        target = model[ldm_to_diffusers_key(key)]
        expected = value.shape[:2] if (target.ndim == 2 and value.ndim == 4) else value.shape
        assert target.shape == expected, key
    assert sum(v.numel() for v in model.values()) == sum(v.numel() for v in ldm.values())
    assert VAVAE_CONFIGS["f16d32"]["latent_channels"] == 32


def test_encode_samples_only_when_asked(tmp_path):
    path = tmp_path / "vavae.pt"
    torch.save(ldm_vae_state(**TINY), path)
    vae = load_vavae(path, config="tiny")
    images = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    mean = vae.encode(images)
    # The posterior's mean is the first half of quant_conv's moments, its log-variance the second half.
    moments = vae.autoencoder.quant_conv(vae.autoencoder.encoder(images))
    torch.testing.assert_close(mean, moments[:, :8], atol=0, rtol=0)
    first = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    again = vae.encode(images, sample=True, generator=torch.Generator().manual_seed(5))
    assert torch.equal(first, again)
    # A sample is mean + std * eps with eps drawn from the given generator (diffusers' DiagonalGaussianDistribution).
    std = torch.exp(0.5 * moments[:, 8:].clamp(-30.0, 20.0))
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(first, mean + std * eps, atol=1e-6, rtol=1e-6)  # measured 0; one float32 multiply-add
    assert (first - mean).abs().max() > 1e-3  # a sample, not the mean


def test_diffusers_folder_round_trip(tmp_path):
    path = tmp_path / "vavae.pt"
    torch.save(ldm_vae_state(**TINY), path)
    vae = load_vavae(path, config="tiny")
    vae.autoencoder.save_pretrained(tmp_path / "folder")
    again = load_vavae(tmp_path / "folder")
    images = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(again.encode(images), vae.encode(images))


def test_missing_file_and_pickled_objects_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="vavae-imagenet256-f16d32-dinov2.pt"):
        load_vavae(tmp_path / "nowhere.pt")
    path = tmp_path / "pickled.pt"
    torch.save({"state_dict": ldm_vae_state(**TINY), "hparams": argparse.Namespace(lr=1)}, path)
    with pytest.raises(CheckpointError, match="pickled Python objects"):
        load_vavae(path, config="tiny")


def test_file_fingerprint_sees_size_head_and_tail(tmp_path):
    path = tmp_path / "weights.bin"
    payload = bytearray(3 * (1 << 20) + 17)
    path.write_bytes(bytes(payload))
    first = file_fingerprint(path)
    assert first == file_fingerprint(path) and first.startswith(f"{len(payload)}-")
    payload[-1] = 1  # the tail changes
    path.write_bytes(bytes(payload))
    assert file_fingerprint(path) != first
    path.write_bytes(bytes(payload[:-1]))  # the size changes
    assert file_fingerprint(path) != first


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_half_precision_vae_follows_fp32(tmp_path):
    path = tmp_path / "vavae.pt"
    torch.save(ldm_vae_state(**TINY), path)
    reference = load_vavae(path, config="tiny")
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    expected = reference.encode(images)
    for dtype in (torch.float32, torch.bfloat16):
        vae = load_vavae(path, device="cuda", dtype=dtype, config="tiny")
        latents = vae.encode(images.cuda())
        assert latents.dtype == dtype
        torch.testing.assert_close(latents.float().cpu(), expected, atol=0.05 if dtype == torch.bfloat16 else 1e-3, rtol=0.05)
        assert vae.decode(latents).shape == (2, 3, 32, 32)
