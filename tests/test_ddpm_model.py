import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from models.ddpm_sampling import SAMPLERS, ddpm_loss, interpolation_noise, make_noise_scheduler, sample_ddpm, slerp
from models.ddpm_unet import build_ddpm_unet, ddpm_unet_config, preset_for_size
from utils.errors import UserError


def test_32px_preset_is_the_ddpm_paper_cifar10_network():
    unet = build_ddpm_unet("32", 32)
    assert sum(p.numel() for p in unet.parameters()) == 35_746_307  # "35.7M" in Ho et al. 2020
    assert unet.config.block_out_channels == (128, 256, 256, 256)
    assert unet.config.down_block_types[1] == "AttnDownBlock2D"  # attention at 16 px only
    assert [b for b in unet.config.down_block_types].count("AttnDownBlock2D") == 1
    assert unet.config.dropout == 0.1 and unet.config.layers_per_block == 2
    processors = {type(m.processor) for m in unet.modules() if hasattr(m, "processor")}
    assert processors == {AttnProcessor2_0}  # scaled_dot_product_attention


def test_presets_halve_down_to_a_few_pixels():
    for size in (32, 64, 128, 256):
        config = ddpm_unet_config(preset_for_size(size), size)
        assert size // 2 ** (len(config["block_out_channels"]) - 1) in (4, 8)
    assert len(ddpm_unet_config("256", 256)["block_out_channels"]) == 6  # the paper's 256 px models
    assert preset_for_size(96) == "64"  # STL-10's native size: the 64 px network, 96 -> 12 px
    assert ddpm_unet_config(preset_for_size(96), 96)["block_out_channels"] == (128, 256, 384, 512)
    with pytest.raises(UserError, match="--size 48 has no UNet preset; choose one of 32, 64, 96, 128, 256"):
        preset_for_size(48)
    with pytest.raises(UserError, match="multiple of 8"):
        ddpm_unet_config("32", 36)


def test_linear_schedule_of_the_paper():
    scheduler = make_noise_scheduler()
    assert scheduler.config.num_train_timesteps == 1000
    assert scheduler.betas[0].item() == pytest.approx(1e-4)
    assert scheduler.betas[-1].item() == pytest.approx(0.02)


def test_loss_is_epsilon_mse_and_reaches_every_parameter():
    unet = build_ddpm_unet("tiny", 16)
    loss = ddpm_loss(unet, make_noise_scheduler(), torch.randn(2, 3, 16, 16))["loss"]
    assert loss.ndim == 0 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad is not None for p in unet.parameters())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_is_deterministic_per_seed(sampler):
    unet = build_ddpm_unet("tiny", 16)
    config = dict(make_noise_scheduler().config)
    first = sample_ddpm(unet, config, num_samples=3, steps=4, sampler=sampler, seed=5)
    again = sample_ddpm(unet, config, num_samples=3, steps=4, sampler=sampler, seed=5)
    other = sample_ddpm(unet, config, num_samples=3, steps=4, sampler=sampler, seed=6)
    assert first.shape == (3, 3, 16, 16) and first.abs().max() <= 1
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_ddim_eta_adds_seeded_noise():
    unet = build_ddpm_unet("tiny", 16)
    config = dict(make_noise_scheduler().config)
    plain = sample_ddpm(unet, config, num_samples=2, steps=4, sampler="ddim", seed=5)
    noisy = sample_ddpm(unet, config, num_samples=2, steps=4, sampler="ddim", seed=5, eta=1.0)
    assert torch.equal(noisy, sample_ddpm(unet, config, num_samples=2, steps=4, sampler="ddim", seed=5, eta=1.0))
    assert (noisy - plain).abs().max() > 0.01


def test_slerp_keeps_gaussian_norm_and_hits_endpoints():
    noise = interpolation_noise(3, 16, frames=5, seed=0)
    torch.testing.assert_close(noise[0], slerp(noise[0], noise[-1], 0.0))
    norms = noise.flatten(1).norm(dim=1)
    # A straight line would dip to about 1/sqrt(2) of the norm half-way; the great circle does not.
    assert (norms / norms[0]).min() > 0.95
