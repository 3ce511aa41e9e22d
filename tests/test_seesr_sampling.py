"""SeeSR's inference computation written out in the tests, against ``models.seesr`` and ``pipelines.seesr``.

From cswry/SeeSR: the sampling loop of ``pipelines/pipeline_seesr.py`` (guidance batch with the negative prompt
first, the RAM embeddings in both halves, steps above ``start_steps`` skipped, DDPM stepping with the generator), the
resizes of ``test_seesr.py`` (PIL's bicubic filter on 8-bit RGB, sides truncated, then rounded down to multiples of
8), its latent tile grid (tiling only when ``h * w > tile ** 2``, square tiles of side ``min(tile, short side)``),
RAM in fp32, and the differences table of ``docs/seesr.md``.
"""

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from PIL import Image

from models.seesr import (
    SeeSRPipeline,
    build_controlnet,
    encode_prompts,
    load_sd2_components,
    prepare_lr_image,
    super_resolve_image,
    tiled_prediction,
)
from models.seesr_reference import SEESR_DIFFERENCES, differences_markdown
from models.seesr_unet import unet_with_image_attention
from pipelines.seesr import seesr_dtypes
from tests.sd2_tiny import SD_TURBO_SCHEDULER_CONFIG, build_tiny_sd2
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
IMAGE_WIDTH = 16  # the RAM embedding width of the tiny models (SeeSR: 512)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """A tiny SeeSR pipeline with image attention; every weight perturbed so that every part matters."""
    sd2 = build_tiny_sd2(tmp_path_factory.mktemp("sd2") / "sd2", light_attention=True)
    components = load_sd2_components(sd2)
    torch.manual_seed(0)
    unet = unet_with_image_attention(UNet2DConditionModel.from_pretrained(sd2, subfolder="unet"), IMAGE_WIDTH).eval()
    controlnet = build_controlnet(unet).eval()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for model in (unet, controlnet):
            for parameter in model.parameters():
                parameter.add_(0.2 * torch.randn(parameter.shape, generator=generator))
    return SeeSRPipeline(unet, components.vae, components.text_encoder, components.tokenizer,
                         components.noise_scheduler, controlnet)


@torch.no_grad()
def seesr_sampling_loop(pipeline, image, text, negative, ram, steps, guidance, generator, start_point="lr",
                        start_steps=999, conditioning_scale=1.0):
    """``pipeline_seesr.py``'s ``__call__`` for one untiled image, steps 3 to 8 and the decode, as written there.

    One deliberate difference, ours: the LR latent is sampled from one copy of the image with the image's generator
    (SeeSR encodes both guidance copies and keeps the first, sampled from the unseeded global RNG)."""
    scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    do_classifier_free_guidance = guidance > 1.0
    prompt_embeds, ram_states, condition = text, ram, image
    if do_classifier_free_guidance:
        prompt_embeds = torch.cat([negative, text])
        ram_states = torch.cat([ram, ram])
        condition = torch.cat([image] * 2)
    scheduler.set_timesteps(steps)
    timesteps = scheduler.timesteps
    height, width = image.shape[-2:]
    latents = torch.randn((1, 4, height // 8, width // 8), generator=generator) * scheduler.init_noise_sigma
    if start_point == "lr":
        lr_latents = pipeline.vae.encode(image * 2 - 1).latent_dist.sample(generator) * pipeline.vae.config.scaling_factor
        latents = scheduler.add_noise(lr_latents, latents, torch.tensor([start_steps]).long())
    visited = []
    for t in timesteps:
        if t > start_steps:
            continue
        visited.append(int(t))
        latent_model_input = torch.cat([latents] * 2) if do_classifier_free_guidance else latents
        latent_model_input = scheduler.scale_model_input(latent_model_input, t)
        down_block_res_samples, mid_block_res_sample = pipeline.controlnet(
            latent_model_input, t, encoder_hidden_states=prompt_embeds, controlnet_cond=condition,
            conditioning_scale=conditioning_scale, return_dict=False, image_encoder_hidden_states=ram_states,
        )
        noise_pred = pipeline.unet(
            latent_model_input, t, encoder_hidden_states=prompt_embeds,
            down_block_additional_residuals=down_block_res_samples, mid_block_additional_residual=mid_block_res_sample,
            return_dict=False, image_encoder_hidden_states=ram_states,
        )[0]
        if do_classifier_free_guidance:
            noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
            noise_pred = noise_pred_uncond + guidance * (noise_pred_text - noise_pred_uncond)
        latents = scheduler.step(noise_pred, t, latents, generator=generator, return_dict=False)[0]
    decoded = pipeline.vae.decode(latents / pipeline.vae.config.scaling_factor, return_dict=False)[0]
    return (decoded / 2 + 0.5).clamp(0, 1), visited


@pytest.mark.parametrize("schedule, steps, guidance, start_point, start_steps, visits", [
    ("leading", 5, 5.5, "lr", 999, [801, 601, 401, 201, 1]),  # test_seesr.py's guidance, all steps
    ("leading", 5, 5.5, "lr", 500, [401, 201, 1]),  # the steps above --start_steps skipped
    ("leading", 4, 1.0, "noise", 999, [751, 501, 251, 1]),  # no guidance batch, pure noise
    ("trailing", 2, 1.0, "lr", 999, [999, 499]),  # SeeSR-Turbo: sd-turbo's scheduler, 2 steps, guidance 1.0
])
def test_sampling_loop_is_seesr_loop(pipeline, schedule, steps, guidance, start_point, start_steps, visits):
    scheduler = pipeline.scheduler
    if schedule == "trailing":
        pipeline.scheduler = DDPMScheduler.from_config(SD_TURBO_SCHEDULER_CONFIG)
    try:
        generator = torch.Generator().manual_seed(7)
        image = torch.rand(1, 3, 64, 48, generator=generator)
        ram = torch.randn(1, 145, IMAGE_WIDTH, generator=generator)
        text = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["cat, tree, , clean, high-resolution, 8k"])
        negative = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, ["dotted, noise, blur, lowres, smooth"])
        expected, visited = seesr_sampling_loop(pipeline, image, text, negative, ram, steps, guidance,
                                                torch.Generator().manual_seed(3), start_point, start_steps)
        ours = pipeline(image, prompt_embeds=text, negative_prompt_embeds=negative, image_embeds=ram,
                        num_inference_steps=steps, guidance_scale=guidance, start_point=start_point,
                        start_steps=start_steps, align_method="nofix", vae_encoder_tiled_size=None,
                        vae_decoder_tiled_size=None, generator=torch.Generator().manual_seed(3))
    finally:
        pipeline.scheduler = scheduler
    assert visited == visits
    # The same operations in the same order; measured difference 0.
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-6)
    assert (expected - 0.5).abs().mean() > 1e-3  # not a blank image


# ------------------------------------------------------------------------------------------------ resizes


def seesr_lr_resizes(pixels: np.ndarray, upscale: int, process_size: int) -> np.ndarray:
    """test_seesr.py's input resizes of an 8-bit RGB array, as written there (``Image.resize``'s default filter)."""
    validation_image = Image.fromarray(pixels)
    ori_width, ori_height = validation_image.size
    rscale = upscale
    if ori_width < process_size // rscale or ori_height < process_size // rscale:
        scale = (process_size // rscale) / min(ori_width, ori_height)
        validation_image = validation_image.resize((int(scale * ori_width), int(scale * ori_height)))
    validation_image = validation_image.resize((validation_image.size[0] * rscale, validation_image.size[1] * rscale))
    validation_image = validation_image.resize((validation_image.size[0] // 8 * 8, validation_image.size[1] // 8 * 8))
    return np.asarray(validation_image)


@pytest.mark.parametrize("height, width, upscale, process_size", [
    (12, 10, 4, 512),  # enlarged 12.8x first (short side 10 < 128), then 4x
    (9, 9, 4, 64),  # 16/9 enlargement truncated to 17 px, 68 -> 64
    (33, 41, 4, 64),  # no enlargement; 132 x 164 -> 128 x 160
    (20, 30, 2, 32),
])
def test_lr_upscale_is_test_seesr_pil_resizes(height, width, upscale, process_size):
    pixels = np.random.default_rng(height * width).integers(0, 256, (height, width, 3), dtype=np.uint8)
    lr = torch.from_numpy(pixels).permute(2, 0, 1).float() / 255
    upsampled, output_size = prepare_lr_image(lr, upscale=upscale, process_size=process_size)
    expected = seesr_lr_resizes(pixels, upscale, process_size)
    assert output_size == (height * upscale, width * upscale)
    assert torch.equal((upsampled[0] * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected.copy()))


class FixedOutput:
    """A pipeline stand-in returning a fixed image of the processed size: what the final resize gets."""

    def __init__(self, output):
        self.output = output

    def __call__(self, lr_upsampled, **kwargs):
        assert lr_upsampled.shape[-2:] == self.output.shape[-2:]
        return self.output[None]


def test_final_resize_is_pil_bicubic_with_antialiasing():
    """A 10 x 12 LR at process size 512 is processed at 512 x 608 and shrunk to 40 x 48 (test_seesr.py: PIL)."""
    lr = torch.rand(3, 12, 10, generator=torch.Generator().manual_seed(0))
    stripes = torch.zeros(3, 608, 512)
    stripes[..., 0::2] = 1.0  # one-pixel stripes: far above the output's Nyquist limit
    output = (stripes * 0.8 + 0.1 * torch.rand(3, 608, 512, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    result = super_resolve_image(FixedOutput(output), lr, upscale=4, process_size=512)
    pixels = (output * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    expected = np.asarray(Image.fromarray(pixels).resize((40, 48)))  # SeeSR: image.resize((ori_width*4, ori_height*4))
    assert result.shape == (3, 48, 40)
    assert torch.equal((result * 255).round().to(torch.uint8).permute(1, 2, 0), torch.from_numpy(expected.copy()))
    assert result.std(dim=-1).mean() < 0.05  # antialiased: the stripes average out instead of aliasing (moire)


# ------------------------------------------------------------------------------------------------ latent tiles


def seesr_tile_grid(h, w, tile_size, tile_overlap):
    """pipeline_seesr.py's tile offsets ``(y, x, side)``, as written there; None when it does not tile."""
    if h * w <= tile_size * tile_size:
        return None
    tile_size = min(tile_size, min(h, w))
    grid_rows, cur_x = 0, 0
    while cur_x < w:
        cur_x = max(grid_rows * tile_size - tile_overlap * grid_rows, 0) + tile_size
        grid_rows += 1
    grid_cols, cur_y = 0, 0
    while cur_y < h:
        cur_y = max(grid_cols * tile_size - tile_overlap * grid_cols, 0) + tile_size
        grid_cols += 1
    tiles = []
    for row in range(grid_rows):
        for col in range(grid_cols):
            if col < grid_cols - 1 or row < grid_rows - 1:
                ofs_x = max(row * tile_size - tile_overlap * row, 0)
                ofs_y = max(col * tile_size - tile_overlap * col, 0)
            if row == grid_rows - 1:
                ofs_x = w - tile_size
            if col == grid_cols - 1:
                ofs_y = h - tile_size
            tiles.append((ofs_y, ofs_x, tile_size))
    return tiles


@pytest.mark.parametrize("height, width, tile, overlap", [
    (64, 128, 96, 4),  # a 512 x 1024 output: one pass in SeeSR (area under 96^2)
    (20, 400, 96, 4),  # area 8000: one pass, though a side exceeds the tile
    (100, 130, 96, 4),
    (40, 300, 96, 32),  # square tiles of the short side, 40 (turbo's overlap 32)
    (12, 12, 8, 4),
])
def test_latent_tiles_follow_seesr_rule(height, width, tile, overlap):
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    latents = torch.stack([rows, columns]).float()[None]
    seen = []

    def predict(latent_tiles, image_tiles, count):
        seen.append((int(latent_tiles[0, 0, 0, 0]), int(latent_tiles[0, 1, 0, 0]), tuple(latent_tiles.shape[-2:])))
        return latent_tiles

    output = tiled_prediction(predict, latents, torch.zeros(1, 3, height * 8, width * 8), tile, overlap)
    expected = seesr_tile_grid(height, width, tile, overlap)
    if expected is None:
        assert seen == [(0, 0, (height, width))]
    else:
        assert sorted(seen) == sorted((y, x, (side, side)) for y, x, side in expected)
    torch.testing.assert_close(output, latents, rtol=1e-6, atol=1e-5)  # coordinates up to 300 in float32


def test_tile_overlap_not_below_the_short_side_is_refused():
    """SeeSR's grid loop never ends here (an overlap >= the tile side); ours says which flag to lower."""
    with pytest.raises(UserError, match="--latent_tiled_overlap 32; lower --latent_tiled_overlap below 20"):
        tiled_prediction(lambda tiles, images, count: tiles, torch.zeros(1, 4, 20, 600), torch.zeros(1, 3, 160, 4800),
                         96, 32)


# ------------------------------------------------------------------------------------------------ RAM, table


@pytest.mark.parametrize("precision, device, expected", [
    ("auto", "cuda", (torch.float16, torch.float32)),  # SeeSR: fp16 networks, RAM in fp32
    ("fp16", "cuda", (torch.float16, torch.float32)),
    ("bf16", "cuda", (torch.bfloat16, torch.float32)),
    ("auto", "cpu", (torch.float32, torch.float32)),
])
def test_ram_runs_in_fp32(precision, device, expected):
    assert seesr_dtypes(precision, torch.device(device)) == expected


def test_differences_table_in_the_docs_is_the_data():
    text = (ROOT / "docs/seesr.md").read_text()
    start, end = "<!-- seesr-differences:start -->", "<!-- seesr-differences:end -->"
    assert text.count(start) == 1 and text.count(end) == 1
    table = text.split(start)[1].split(end)[0].strip()
    assert table == differences_markdown()
    assert len(table.splitlines()) == len(SEESR_DIFFERENCES) + 2
