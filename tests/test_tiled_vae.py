"""Tiled VAE with one GroupNorm estimate shared by all tiles (models/tiled_vae.py) against the untiled VAE.

The VAE is a tiny random diffusers AutoencoderKL in SD2's block layout (4 DownEncoderBlock2D/UpDecoderBlock2D
levels, 2 resnets per level, GroupNorm, mid-block attention), as tests/sd2_tiny.py builds it, with SD2's
layers_per_block=2. Tiles are small (64 image px / 8 latent px) so that every size here takes several of them
and none is a multiple of the tile.
"""

import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL

from models.tiled_vae import seam_score, shared_norm_vae_tiling, split_tiles, tiled_decode, tiled_encode
from utils.errors import UserError

# Measured max |tiled - untiled| (fp32, CPU): encode 1e-6, decode 2e-5 on outputs of magnitude ~0.3 (summation
# order only). 5e-4 keeps a >10x margin; a missing shared estimate or too little padding gives 1e-3 to 10.
TOLERANCE = 5e-4


@pytest.fixture(scope="module")
def vae():
    torch.manual_seed(0)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=0.18215,
    ).eval()


def diffusers_tiled_decode(vae: AutoencoderKL, latents: torch.Tensor, tile_latent: int) -> torch.Tensor:
    """diffusers' own AutoencoderKL tiling (each tile normalised on its own statistics, 1/4-tile blend)."""
    saved = (vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size)
    vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, tile_latent * 8, tile_latent
    try:
        return vae.decode(latents).sample
    finally:
        vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = saved


def smooth_latents(batch: int, height: int, width: int) -> torch.Tensor:
    """Latents that vary slowly, so that a seam stands out against the image's own pixel-to-pixel changes."""
    coarse = torch.randn(batch, 4, max(2, height // 8), max(2, width // 8))
    return F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)


@torch.no_grad()
def test_tiled_decode_equals_untiled(vae):
    latents = torch.randn(2, 4, 21, 19)  # two images: statistics are per image; sizes not multiples of 8
    expected = vae.decode(latents).sample
    actual = tiled_decode(vae, latents, tile_size=8)
    assert actual.shape == expected.shape == (2, 3, 168, 152)
    torch.testing.assert_close(actual, expected, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_tiled_encode_equals_untiled(vae):
    images = torch.rand(1, 3, 203, 141) * 2 - 1  # odd sizes: diffusers' downsampling floors them
    expected = vae.encode(images).latent_dist
    actual = tiled_encode(vae, images, tile_size=64)
    assert actual.mean.shape == expected.mean.shape == (1, 4, 25, 17)
    torch.testing.assert_close(actual.mean, expected.mean, atol=TOLERANCE, rtol=0)
    torch.testing.assert_close(actual.logvar, expected.logvar, atol=TOLERANCE, rtol=0)


@torch.no_grad()
def test_tiles_really_split_the_image():
    tiles = split_tiles(203, 141, tile_size=64, padding=48, align=8)
    assert len(tiles) == 4 * 3
    assert all(tile.core_y[0] % 8 == 0 and tile.core_x[0] % 8 == 0 for tile in tiles)
    covered = torch.zeros(203, 141, dtype=torch.int)
    for tile in tiles:
        covered[slice(*tile.core_y), slice(*tile.core_x)] += 1
        assert tile.read_y[0] == max(0, tile.core_y[0] - 48) and tile.read_y[1] == min(203, tile.core_y[1] + 48)
    assert bool((covered == 1).all())


@torch.no_grad()
def test_context_manager_is_a_drop_in_for_seesr_vae_tiling(vae):
    images = torch.rand(1, 3, 136, 104) * 2 - 1
    latents = torch.randn(1, 4, 21, 19)
    with shared_norm_vae_tiling(vae, 64):
        posterior = vae.encode(images).latent_dist
        decoded = vae.decode(latents).sample
        (tuple_posterior,) = vae.encode(images, return_dict=False)
    torch.testing.assert_close(posterior.mean, tiled_encode(vae, images, 64).mean)
    torch.testing.assert_close(tuple_posterior.mean, posterior.mean)
    torch.testing.assert_close(decoded, tiled_decode(vae, latents, 8))
    assert "encode" not in vars(vae) and "decode" not in vars(vae)  # the class methods are back
    torch.testing.assert_close(vae.decode(latents).sample, decoded, atol=TOLERANCE, rtol=0)
    with shared_norm_vae_tiling(vae, None):
        assert "decode" not in vars(vae)


@torch.no_grad()
def test_diffusers_per_tile_norms_leave_seams_shared_norms_do_not(vae):
    latents = smooth_latents(1, 32, 32)
    untiled = vae.decode(latents).sample
    ours = tiled_decode(vae, latents, tile_size=8)
    theirs = diffusers_tiled_decode(vae, latents, 8)  # 64 px tiles at a 48 px stride, 16 px linear blend
    boundaries = list(range(48, 256, 48))
    # measured at diffusers' boundaries: untiled 0.015, diffusers 0.040 (random weights; a real VAE is milder);
    # mean |theirs - untiled| 0.43 against 3e-7 for ours
    assert seam_score(theirs, boundaries, boundaries) > seam_score(untiled, boundaries, boundaries) + 0.005
    # our own tile boundaries (every 64 px) are invisible: the untiled image's score (-0.013) to 1e-8
    ours_boundaries = list(range(64, 256, 64))
    ours_score = seam_score(ours, ours_boundaries, ours_boundaries)
    assert abs(ours_score - seam_score(untiled, ours_boundaries, ours_boundaries)) < 1e-4
    assert (theirs - untiled).abs().mean() > 100 * (ours - untiled).abs().mean()


@torch.no_grad()
def test_half_precision_matches_fp32(vae):
    half = AutoencoderKL.from_config(vae.config).eval()
    half.load_state_dict(vae.state_dict())
    half = half.to(torch.float16)  # fp16 convolutions run on CPU too; the statistics are fp32 either way
    latents = torch.randn(1, 4, 13, 11) * 50  # large activations: squared deviations overflow fp16's 65504
    expected = vae.decode(latents).sample
    actual = tiled_decode(half, latents, tile_size=8)
    assert actual.dtype == torch.float16 and torch.isfinite(actual).all()
    # measured mean relative error 1.3e-3 (the same as the untiled fp16 VAE's): fp16 rounding, 10x margin
    assert (actual.float() - expected).abs().mean() < 1.5e-2 * expected.abs().mean()


def test_too_small_encoder_tile_is_refused(vae):
    with pytest.raises(UserError, match="at least 8"):
        tiled_encode(vae, torch.zeros(1, 3, 64, 64), tile_size=4)


@torch.no_grad()
def test_seesr_pipeline_with_shared_norm_tiling_matches_untiled(tmp_path):
    """SeeSRPipeline's VAE tiles (shared GroupNorm statistics) give the untiled pipeline's output."""
    import models.seesr as seesr
    from tests.sd2_tiny import build_tiny_sd2

    parts = seesr.load_sd2_components(build_tiny_sd2(tmp_path / "sd2", light_attention=True))
    controlnet = seesr.build_controlnet(parts.unet).eval()
    pipeline = seesr.SeeSRPipeline(
        parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.noise_scheduler, controlnet
    )
    image = torch.rand(1, 3, 136, 120)

    def run(encoder_tile, decoder_tile):
        return pipeline(
            image, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
            vae_encoder_tiled_size=encoder_tile, vae_decoder_tiled_size=decoder_tile,
        )

    untiled = run(None, None)
    tiled = run(64, 8)  # 3 x 2 encoder tiles, 3 x 2 decoder tiles
    # measured max difference 3e-6 (float32 summation order through 2 steps; diffusers' tiling: 0.74); outputs in [0, 1]
    torch.testing.assert_close(tiled, untiled, atol=TOLERANCE, rtol=0)
