"""SeeSR model stack on a tiny SD2-layout folder: loading, injector identity, training step, sampling, tiling."""

import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from models.seesr import (
    SeeSRPipeline,
    build_controlnet,
    check_sd2_folder,
    compose_prompt,
    control_scale_schedule,
    encode_prompts,
    gaussian_tile_weights,
    load_sd2_components,
    load_seesr_weights,
    predict_noise,
    prepare_lr_image,
    save_seesr_weights,
    seesr_training_loss,
    set_gradient_checkpointing,
    super_resolve_image,
    tile_starts,
    tiled_prediction,
)
from models.timestep_adaptive import (
    MESSAGE_INJECTOR_LOADED,
    MESSAGE_TIMESTEP_WEIGHTS_LOADED,
    SD2_RESIDUAL_LEVELS,
    build_injector,
    residual_levels_of,
)
from tests.sd2_tiny import build_tiny_sd2
from utils.errors import CheckpointError, UserError


@pytest.fixture(scope="module")
def sd2_path(tmp_path_factory):
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2") / "stable-diffusion-2-base")


@pytest.fixture(scope="module")
def stack(sd2_path):
    components = load_sd2_components(sd2_path)
    torch.manual_seed(0)
    controlnet = build_controlnet(components.unet)
    # A fresh ControlNet's zero convolutions output exact zeros; give them weights so that the residuals (and
    # hence the injector) matter, as in a trained ControlNet.
    with torch.no_grad():
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.2)
    return components, controlnet


def make_pipeline(stack, injector=None):
    components, controlnet = stack
    return SeeSRPipeline(
        components.unet, components.vae, components.text_encoder, components.tokenizer,
        components.noise_scheduler, controlnet, injector,
    )


def model_inputs(components, batch=2, size=8, seed=0):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(batch, 4, size, size, generator=generator)
    image = torch.rand(batch, 3, size * 8, size * 8, generator=generator)
    embeds = encode_prompts(components.tokenizer, components.text_encoder, ["a cat", ""][:batch])
    return latents, image, embeds


def test_sd2_components_are_frozen_with_sd2_base_scheduler(stack):
    components, _ = stack
    for model in (components.unet, components.vae, components.text_encoder):
        assert not any(parameter.requires_grad for parameter in model.parameters())
        assert not model.training
    scheduler = components.noise_scheduler
    assert scheduler.config.timestep_spacing == "leading" and scheduler.config.steps_offset == 1
    assert scheduler.config.prediction_type == "epsilon" and not scheduler.config.clip_sample
    scheduler.set_timesteps(50)
    steps = scheduler.timesteps.tolist()
    assert len(steps) == 50 and steps[:3] == [981, 961, 941] and steps[-1] == 1
    processors = set(type(p) for p in components.unet.attn_processors.values())
    assert processors == {AttnProcessor2_0}  # scaled-dot-product attention


def test_missing_sd2_folder_names_what_is_expected(tmp_path, sd2_path):
    with pytest.raises(UserError, match="does not exist; expected a diffusers Stable Diffusion 2"):
        load_sd2_components(tmp_path / "nowhere")
    partial = tmp_path / "partial"
    (partial / "unet").mkdir(parents=True)
    (partial / "unet" / "config.json").write_text("{}")
    with pytest.raises(UserError, match="lacks vae/config.json, text_encoder/config.json, tokenizer/vocab.json"):
        check_sd2_folder(partial)
    assert check_sd2_folder(sd2_path) == sd2_path


def test_controlnet_from_unet_gives_sd2_residual_layout(stack):
    components, controlnet = stack
    assert controlnet.config.conditioning_channels == 3
    assert residual_levels_of(controlnet) == list(SD2_RESIDUAL_LEVELS)
    latents, image, embeds = model_inputs(components)
    down, mid = controlnet(latents, 500, encoder_hidden_states=embeds, controlnet_cond=image, return_dict=False)
    assert len(down) == 12
    for residual, level in zip(down, SD2_RESIDUAL_LEVELS):
        assert residual.shape[-1] == 8 // 2**level  # 3 residuals per resolution level
    assert mid.shape[-1] == 1


@pytest.mark.parametrize("kind", ["table", "mlp"])
def test_fresh_injector_reproduces_plain_controlnet_bit_for_bit(stack, kind):
    components, controlnet = stack
    latents, image, embeds = model_inputs(components)
    timesteps = torch.tensor([981, 17])
    plain = predict_noise(components.unet, controlnet, None, latents, timesteps, embeds, image)
    injector = build_injector("timestep_multiscale", timestep_weights=kind, timestep_weights_shared=False)
    with_injector = predict_noise(components.unet, controlnet, injector, latents, timesteps, embeds, image)
    assert torch.equal(plain, with_injector)
    # The residuals do matter: without any ControlNet input the prediction differs.
    bare = components.unet(latents, timesteps, encoder_hidden_states=embeds).sample
    assert not torch.allclose(plain, bare)


def test_injector_reaches_down_and_mid_residuals(stack):
    components, controlnet = stack
    latents, image, embeds = model_inputs(components)
    injector = build_injector("timestep_multiscale", grouping="level")
    with torch.no_grad():
        injector.scale_weights.weights.zero_()
    silenced = predict_noise(components.unet, controlnet, injector, latents, 500, embeds, image)
    bare = components.unet(latents, 500, encoder_hidden_states=embeds).sample
    assert torch.equal(silenced, bare)  # every residual, mid included, was scaled to zero
    with torch.no_grad():
        injector.scale_weights.weights.copy_(torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0]))
    no_mid = predict_noise(components.unet, controlnet, injector, latents, 500, embeds, image)
    assert not torch.equal(no_mid, bare) and not torch.equal(
        no_mid, predict_noise(components.unet, controlnet, None, latents, 500, embeds, image)
    )


def training_batch(size=64):
    generator = torch.Generator().manual_seed(1)
    return {
        "hr": torch.rand(2, 3, size, size, generator=generator) * 2 - 1,
        "lr_upsampled": torch.rand(2, 3, size, size, generator=generator),
        "prompt": ["a photo of a cat", ""],
    }


def run_training_step(stack, injector):
    components, controlnet = stack
    loss = seesr_training_loss(
        training_batch(),
        unet=components.unet, vae=components.vae, text_encoder=components.text_encoder,
        tokenizer=components.tokenizer, controlnet=controlnet, injector=injector,
        noise_scheduler=components.noise_scheduler, generator=torch.Generator().manual_seed(0),
    )
    loss.backward()
    return loss


def frozen_parameters(components):
    for model in (components.unet, components.vae, components.text_encoder):
        yield from model.parameters()


def test_training_step_reaches_controlnet_and_injector_only(stack):
    components, controlnet = stack
    controlnet.requires_grad_(True)
    controlnet.zero_grad(set_to_none=True)
    injector = build_injector("timestep_multiscale", timestep_weights="table", grouping="level")
    loss = run_training_step(stack, injector)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert all(parameter.grad is None for parameter in frozen_parameters(components))
    assert controlnet.controlnet_mid_block.weight.grad.abs().sum() > 0
    assert controlnet.controlnet_down_blocks[0].weight.grad.abs().sum() > 0
    assert controlnet.down_blocks[0].resnets[0].conv1.weight.grad.abs().sum() > 0
    assert all(parameter.grad is not None for parameter in controlnet.parameters())  # reached every layer
    assert (injector.scale_weights.weights.grad != 0).all()  # every level's weight learns
    table_grad = injector.timestep_weights.table.grad
    assert (table_grad.abs().sum(1) > 0).sum() == 2  # exactly the two sampled timesteps' rows
    controlnet.zero_grad(set_to_none=True)

    # Same generator, same loss: the objective is seeded.
    again = run_training_step(stack, build_injector("timestep_multiscale", timestep_weights="table"))
    assert torch.equal(loss, again)
    controlnet.zero_grad(set_to_none=True)


def test_training_injector_alone_on_frozen_controlnet(stack):
    components, controlnet = stack
    controlnet.requires_grad_(False)
    controlnet.zero_grad(set_to_none=True)
    try:
        injector = build_injector("timestep_only", timestep_weights="mlp")
        run_training_step(stack, injector)
        assert all(parameter.grad is None for parameter in controlnet.parameters())
        assert all(parameter.grad is None for parameter in frozen_parameters(components))
        assert injector.timestep_weights.mlp[-1].weight.grad.abs().sum() > 0
    finally:
        controlnet.requires_grad_(True)


def test_gradient_checkpointing_switch_keeps_the_loss(stack):
    components, controlnet = stack
    injector = build_injector("timestep_multiscale")
    reference = run_training_step(stack, injector)
    reference_grad = controlnet.down_blocks[1].resnets[0].conv1.weight.grad.clone()
    controlnet.zero_grad(set_to_none=True)
    set_gradient_checkpointing(True, controlnet, components.unet)
    try:
        assert controlnet.is_gradient_checkpointing and components.unet.is_gradient_checkpointing
        controlnet.train()
        checkpointed = run_training_step(stack, injector)
        torch.testing.assert_close(checkpointed, reference)
        # Gradients still flow back through the checkpointed (frozen) UNet into the ControlNet.
        grad = controlnet.down_blocks[1].resnets[0].conv1.weight.grad
        torch.testing.assert_close(grad, reference_grad, rtol=1e-4, atol=1e-7)
    finally:
        set_gradient_checkpointing(False, controlnet, components.unet)
        controlnet.eval()
        controlnet.zero_grad(set_to_none=True)


class TimestepSpy(torch.nn.Module):
    """Records the timesteps the pipeline hands the injector; scales nothing."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def forward(self, down, mid, timesteps):
        self.seen.append((torch.as_tensor(timesteps).clone(), down[0].shape[0]))
        return down, mid


@pytest.mark.parametrize("start_point", ["lr", "noise"])
def test_pipeline_runs_both_start_points(stack, start_point):
    spy = TimestepSpy()
    pipeline = make_pipeline(stack, spy)
    visited = []
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=5, guidance_scale=5.5, start_point=start_point)
    result = pipeline(
        image, generator=torch.Generator().manual_seed(0), callback=lambda i, t, latents: visited.append(t), **kwargs
    )
    assert result.shape == (1, 3, 64, 64) and result.dtype == torch.float32
    assert 0.0 <= result.min() and result.max() <= 1.0
    assert visited == [801, 601, 401, 201, 1]  # SD2-base "leading" spacing, steps_offset 1
    # One scalar training timestep per step for both halves of the guidance batch.
    assert [int(t) for t, _ in spy.seen] == visited
    assert all(t.ndim == 0 and batch == 2 for t, batch in spy.seen)
    again = pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(result, again)


def test_start_points_differ_and_lr_start_timestep(stack):
    pipeline = make_pipeline(stack)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, align_method="nofix")
    from_lr = pipeline(image, start_point="lr", generator=torch.Generator().manual_seed(0), **kwargs)
    from_noise = pipeline(image, start_point="noise", generator=torch.Generator().manual_seed(0), **kwargs)
    seesr_start = pipeline(
        image, start_point="lr", lr_start_timestep=999, generator=torch.Generator().manual_seed(0), **kwargs
    )
    assert not torch.equal(from_lr, from_noise) and not torch.equal(from_lr, seesr_start)
    with pytest.raises(UserError, match="start_point"):
        pipeline(image, start_point="hr", **kwargs)
    with pytest.raises(UserError, match="divisible by 8"):
        pipeline(torch.rand(1, 3, 60, 64), **kwargs)


def test_pipeline_with_fresh_injector_equals_plain_pipeline(stack):
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    kwargs = dict(num_inference_steps=3, guidance_scale=4.0)
    plain = make_pipeline(stack)(image, generator=torch.Generator().manual_seed(0), **kwargs)
    injector = build_injector("timestep_multiscale", timestep_weights="mlp", grouping="tensor")
    injected = make_pipeline(stack, injector)(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(plain, injected)


def test_prompt_embeddings_replace_text(stack):
    components, _ = stack
    pipeline = make_pipeline(stack)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(3))
    text = compose_prompt("cat, grass", "", "clean, high-resolution, 8k")
    assert text == "cat, grass, clean, high-resolution, 8k"
    embeds = encode_prompts(components.tokenizer, components.text_encoder, [text])
    negative = encode_prompts(components.tokenizer, components.text_encoder, ["dotted, noise, blur, lowres, smooth"])
    kwargs = dict(num_inference_steps=2, guidance_scale=5.5)
    from_text = pipeline(image, prompt="cat, grass", generator=torch.Generator().manual_seed(0), **kwargs)
    from_embeds = pipeline(
        image, prompt_embeds=embeds, negative_prompt_embeds=negative,
        generator=torch.Generator().manual_seed(0), **kwargs,
    )
    assert torch.equal(from_text, from_embeds)


def test_tile_layout_and_window():
    assert tile_starts(16, 8, 4) == [0, 4, 8]
    assert tile_starts(20, 8, 2) == [0, 6, 12]
    assert tile_starts(8, 8, 4) == [0] and tile_starts(5, 8, 4) == [0]
    with pytest.raises(UserError, match="overlap"):
        tile_starts(20, 4, 4)
    window = gaussian_tile_weights(6, 9)
    assert window.shape == (6, 9) and torch.allclose(window, window.flip(0)) and torch.allclose(window, window.flip(1))
    assert window[2:4, 4].min() == window.max()


def test_tiled_prediction_is_exact_for_a_pointwise_model():
    # With a model whose output at a latent cell depends only on that cell (and its 8x8 image patch), any
    # tiling must reproduce the untiled output: this checks tile placement, image alignment and blending.
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 13, 21, generator=generator)
    image = torch.rand(2, 3, 13 * 8, 21 * 8, generator=generator)
    weights = torch.randn(4, 4, generator=generator)

    def pointwise(latent_tiles, image_tiles, count):
        patch_mean = torch.nn.functional.avg_pool2d(image_tiles, 8).mean(1, keepdim=True)
        return torch.einsum("oc,bchw->bohw", weights, latent_tiles) + patch_mean

    whole = pointwise(latents, image, 1)
    for tile, overlap, per_call in ((8, 3, 1), (6, 2, 4), (13, 4, 2)):
        tiled = tiled_prediction(pointwise, latents, image, tile, overlap, per_call)
        torch.testing.assert_close(tiled, whole, rtol=1e-5, atol=1e-5)


def test_tiled_inference_close_to_untiled(stack):
    pipeline = make_pipeline(stack, build_injector("timestep_multiscale"))
    image = torch.rand(1, 3, 128, 128, generator=torch.Generator().manual_seed(4))
    kwargs = dict(num_inference_steps=3, align_method="nofix", vae_encoder_tiled_size=None, vae_decoder_tiled_size=None)
    untiled = pipeline(image, generator=torch.Generator().manual_seed(0), latent_tiled_size=96, **kwargs)
    other_seed = pipeline(image, generator=torch.Generator().manual_seed(1), latent_tiled_size=96, **kwargs)
    tiled = pipeline(
        image, generator=torch.Generator().manual_seed(0), latent_tiled_size=12, latent_tiled_overlap=4, **kwargs
    )
    tiling_error = (tiled - untiled).abs().mean()
    seed_spread = (other_seed - untiled).abs().mean()
    # Tiles see their own GroupNorm statistics, so they are not bit-exact; but the tiled result must be far
    # closer to the untiled one than another seed is.
    assert tiling_error < 0.25 * seed_spread
    # Tiled VAE encode/decode (tiles share GroupNorm statistics: models/tiled_vae.py) also stays close.
    vae_tiled = pipeline(
        image, generator=torch.Generator().manual_seed(0), latent_tiled_size=96, num_inference_steps=3,
        align_method="nofix", vae_encoder_tiled_size=64, vae_decoder_tiled_size=8,
    )
    assert (vae_tiled - untiled).abs().mean() < 0.5 * seed_spread


def test_checkpoint_round_trip_and_old_checkpoint(stack, sd2_path, tmp_path):
    components, controlnet = stack
    injector = build_injector("timestep_multiscale", timestep_weights="table", grouping="level")
    with torch.no_grad():
        injector.scale_weights.weights.copy_(torch.tensor([0.9, 1.1, 1.2, 0.8, 1.0]))
    new = tmp_path / "experience" / "timestep_multiscale" / "checkpoint-100"
    save_seesr_weights(new, controlnet, injector)
    assert (new / "controlnet" / "config.json").is_file()
    assert (new / "multi_scale_injector" / "pytorch_model.bin").is_file()
    loaded_controlnet, loaded_injector, loaded_unet, messages = load_seesr_weights(new)
    assert loaded_unet is None  # no unet/ in the checkpoint: SD2's UNet is used
    assert MESSAGE_INJECTOR_LOADED in messages and MESSAGE_TIMESTEP_WEIGHTS_LOADED in messages
    for key, value in controlnet.state_dict().items():
        assert torch.equal(loaded_controlnet.state_dict()[key], value)
    assert torch.equal(loaded_injector.scale_weights.weights, injector.scale_weights.weights)

    old = tmp_path / "experience" / "baseline" / "checkpoint-100"
    save_seesr_weights(old, controlnet, None)
    pipeline, old_messages = SeeSRPipeline.from_pretrained(sd2_path, old)
    assert pipeline.injector is None
    assert old_messages[0] == f"Loading checkpoint from {old}"
    assert any("identity" in message for message in old_messages)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(5))
    kwargs = dict(num_inference_steps=2, guidance_scale=5.5)
    old_result = pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs)
    reference = make_pipeline(stack)(image, generator=torch.Generator().manual_seed(0), **kwargs)
    # Not bit-equal: reloaded (memory-mapped, differently aligned) weights take other SIMD paths (~1e-7).
    torch.testing.assert_close(old_result, reference, rtol=0, atol=1e-4)

    new_pipeline, _ = SeeSRPipeline.from_pretrained(sd2_path, new)
    assert new_pipeline.injector is not None
    new_result = new_pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert not torch.equal(new_result, old_result)  # the loaded weights are applied

    with pytest.raises(CheckpointError, match="Expected a ControlNet at"):
        load_seesr_weights(tmp_path)
    # A bare diffusers ControlNet folder (save_pretrained output) loads too, without an injector.
    bare, bare_injector, bare_unet, bare_messages = load_seesr_weights(new / "controlnet")
    assert bare_injector is None and bare_unet is None and bare_messages[-1] == f"✓ ControlNet loaded from {new / 'controlnet'}"
    assert torch.equal(bare.controlnet_mid_block.weight, controlnet.controlnet_mid_block.weight)


def test_control_scale_schedules(stack):
    components, _ = stack
    scheduler = components.noise_scheduler
    scheduler.set_timesteps(10)
    timesteps = scheduler.timesteps  # 901, 801, ..., 1
    assert control_scale_schedule(scheduler, timesteps, 0.8) == [0.8] * 10
    # diffusers' control_guidance_start/end: a 0/1 window over the steps.
    window = control_scale_schedule(scheduler, timesteps, 1.0, "window", 0.2, 0.7)
    assert window == [0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    # SUPIR: scale_start at sigma_max, the full scale at sigma 0, linear in sigma_t = sqrt((1 - abar) / abar).
    linear = control_scale_schedule(scheduler, timesteps, 1.0, "linear", scale_start=0.0)
    abar = scheduler.alphas_cumprod.double()
    sigma = lambda t: float(((1 - abar[t]) / abar[t]).sqrt())  # noqa: E731
    assert linear[0] == pytest.approx(1.0 - sigma(901) / sigma(999))
    assert linear[-1] == pytest.approx(1.0 - sigma(1) / sigma(999)) and linear[-1] > 0.99
    assert all(a < b for a, b in zip(linear, linear[1:]))
    with pytest.raises(UserError, match="control_guidance_start"):
        control_scale_schedule(scheduler, timesteps, 1.0, "window", 0.5, 0.5)
    with pytest.raises(UserError, match="control_schedule"):
        control_scale_schedule(scheduler, timesteps, 1.0, "cosine")


def test_window_schedule_off_is_the_plain_unet(stack):
    components, _ = stack
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(6))
    kwargs = dict(num_inference_steps=2, guidance_scale=1.0, align_method="nofix", start_point="noise")
    # A window that shuts the ControlNet off at every step gives the same result as a zero conditioning scale.
    off = make_pipeline(stack)(image, control_schedule="window", control_guidance_start=0.0,
                               control_guidance_end=0.1, generator=torch.Generator().manual_seed(0), **kwargs)
    zero = make_pipeline(stack)(image, conditioning_scale=0.0, generator=torch.Generator().manual_seed(0), **kwargs)
    on = make_pipeline(stack)(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(off, zero) and not torch.equal(off, on)


def test_prepare_and_super_resolve_image(stack):
    lr = torch.rand(3, 20, 30)
    upsampled, output_size = prepare_lr_image(lr, upscale=4, process_size=512)
    # Short side 20 < 512 / 4: enlarged 6.4x first (SeeSR's rule), then 4x, multiples of 8.
    assert upsampled.shape == (1, 3, 512, 768) and output_size == (80, 120)
    pipeline = make_pipeline(stack)
    odd = torch.rand(3, 11, 13, generator=torch.Generator().manual_seed(0))
    result = super_resolve_image(
        pipeline, odd, upscale=4, process_size=32, num_inference_steps=2, generator=torch.Generator().manual_seed(0)
    )
    assert result.shape == (3, 44, 52) and 0.0 <= result.min() and result.max() <= 1.0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_pipeline_on_cuda(sd2_path):
    components = load_sd2_components(sd2_path)  # its own copy: the shared stack stays fp32 on the CPU
    controlnet = build_controlnet(components.unet)
    with torch.no_grad():
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.2)
    own_stack = (components, controlnet)
    injector = build_injector("timestep_multiscale", timestep_weights="mlp")
    pipeline = make_pipeline(own_stack, injector).to("cuda", torch.float16)
    image = torch.rand(1, 3, 128, 128)
    kwargs = dict(num_inference_steps=3, guidance_scale=5.5, latent_tiled_size=12, latent_tiled_overlap=4)
    result = pipeline(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert result.device.type == "cuda" and torch.isfinite(result).all()
    assert all(parameter.dtype == torch.float32 for parameter in injector.parameters())
    assert pipeline.unet.dtype == torch.float16 and pipeline.controlnet.dtype == torch.float16
    plain = make_pipeline(own_stack)(image, generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(result, plain)  # the fresh injector is still bit-exact identity in fp16
