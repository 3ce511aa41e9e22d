"""SeeSR's image cross-attention (models/seesr_unet.py) and its path through models/seesr.py, on tiny models.

The tests write SeeSR's release layout themselves (``seesr/unet`` and ``seesr/controlnet``: a config.json with the
keys SeeSR's diffusers-0.21 classes save, and ``diffusion_pytorch_model.bin`` as a plain state dict) and check the
computation against a reference forward written here from the diffusers blocks in SeeSR's order (resnet -> text
attention -> image attention; mid: text -> image -> resnet), independent of the hooks the model uses.
"""

import json

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.utils.torch_utils import randn_tensor
from safetensors.torch import save_file

from models.seesr import (
    SeeSRPipeline,
    build_controlnet,
    encode_prompts,
    load_sd2_components,
    load_seesr_weights,
    predict_noise,
    save_seesr_weights,
    seesr_training_loss,
    set_gradient_checkpointing,
)
from models.seesr_unet import (
    IMAGE_ATTENTIONS,
    SeeSRControlNetModel,
    SeeSRUNet2DConditionModel,
    image_attention_blocks,
    unet_trainable_parameters,
    unet_with_image_attention,
)
from tests.sd2_tiny import build_tiny_sd2
from utils.errors import CheckpointError, UserError

RAM_TOKENS, RAM_WIDTH = 145, 512

# The config keys SeeSR's own classes (diffusers 0.21 copies) write with save_pretrained, i.e. what its release
# config.json files hold; values are taken from the tiny models.
SEESR_UNET_KEYS = (
    "act_fn", "addition_embed_type", "addition_embed_type_num_heads", "addition_time_embed_dim",
    "attention_head_dim", "attention_type", "block_out_channels", "center_input_sample", "class_embed_type",
    "class_embeddings_concat", "conv_in_kernel", "conv_out_kernel", "cross_attention_dim", "cross_attention_norm",
    "down_block_types", "downsample_padding", "dual_cross_attention", "encoder_hid_dim", "encoder_hid_dim_type",
    "flip_sin_to_cos", "freq_shift", "in_channels", "layers_per_block", "mid_block_only_cross_attention",
    "mid_block_scale_factor", "mid_block_type", "norm_eps", "norm_num_groups", "num_attention_heads",
    "num_class_embeds", "only_cross_attention", "out_channels", "projection_class_embeddings_input_dim",
    "resnet_out_scale_factor", "resnet_skip_time_act", "resnet_time_scale_shift", "sample_size",
    "time_cond_proj_dim", "time_embedding_act_fn", "time_embedding_dim", "time_embedding_type", "timestep_post_act",
    "transformer_layers_per_block", "up_block_types", "upcast_attention", "use_linear_projection",
)
SEESR_CONTROLNET_KEYS = (
    "act_fn", "addition_embed_type", "addition_embed_type_num_heads", "addition_time_embed_dim",
    "attention_head_dim", "block_out_channels", "class_embed_type", "conditioning_channels",
    "conditioning_embedding_out_channels", "controlnet_conditioning_channel_order", "cross_attention_dim",
    "down_block_types", "downsample_padding", "encoder_hid_dim", "encoder_hid_dim_type", "flip_sin_to_cos",
    "freq_shift", "global_pool_conditions", "in_channels", "layers_per_block", "mid_block_scale_factor", "norm_eps",
    "norm_num_groups", "num_attention_heads", "num_class_embeds", "only_cross_attention",
    "projection_class_embeddings_input_dim", "resnet_time_scale_shift", "transformer_layers_per_block",
    "upcast_attention", "use_linear_projection",
)


def write_seesr_folder(folder, model, class_name, keys, image_attention=True, safetensors=False):
    """Write ``model`` in SeeSR's release layout: its config.json keys and a plain-state-dict weight file."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"_class_name": class_name, "_diffusers_version": "0.21.4"}
    defaults = {"addition_embed_type_num_heads": 64, "attention_type": "default", "class_embeddings_concat": False,
                "cross_attention_norm": None, "dual_cross_attention": False, "mid_block_only_cross_attention": None,
                "global_pool_conditions": False}
    for key in keys:
        value = model.config.get(key, defaults.get(key))
        config[key] = list(value) if isinstance(value, tuple) else value
    if image_attention:
        config["use_image_cross_attention"] = True
    (folder / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    state = {key: value.clone().contiguous() for key, value in model.state_dict().items()}
    if safetensors:
        save_file(state, folder / "diffusion_pytorch_model.safetensors")
    else:
        torch.save(state, folder / "diffusion_pytorch_model.bin")
    return folder


def perturb(model, std, seed, only=None):
    """Add seeded noise to every weight (or those whose name contains ``only``): a trained-looking model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if only is None or only in name:
                parameter.add_(std * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def sd2_path(tmp_path_factory):
    return build_tiny_sd2(tmp_path_factory.mktemp("sd2") / "stable-diffusion-2-base")


@pytest.fixture(scope="module")
def components(sd2_path):
    return load_sd2_components(sd2_path)


@pytest.fixture(scope="module")
def seesr_models(components):
    """A SeeSR UNet and ControlNet with image attention, weights perturbed so that every part matters."""
    torch.manual_seed(0)
    unet = unet_with_image_attention(components.unet)
    controlnet = build_controlnet(unet)
    perturb(unet, 0.02, 1)
    perturb(controlnet, 0.05, 2)  # the zero convolutions too
    # Image attention made strong by construction, so that its effect cannot hide in rounding: large output
    # projections (not large query/key weights, whose near-one-hot softmax would turn 1e-7 kernel differences
    # between batch sizes into visible ones).
    perturb(unet, 0.05, 3, only=IMAGE_ATTENTIONS)
    perturb(controlnet, 0.05, 4, only=IMAGE_ATTENTIONS)
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for model in (unet, controlnet):
            for block in image_attention_blocks(model):
                for attention in block.image_attentions:
                    attention.proj_out.weight.normal_(0, 0.3, generator=generator)
    return unet.eval().requires_grad_(False), controlnet.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def release_folder(seesr_models, tmp_path_factory):
    unet, controlnet = seesr_models
    folder = tmp_path_factory.mktemp("preset") / "models" / "seesr"
    write_seesr_folder(folder / "unet", unet, "UNet2DConditionModel", SEESR_UNET_KEYS)
    write_seesr_folder(folder / "controlnet", controlnet, "ControlNetModel", SEESR_CONTROLNET_KEYS)
    return folder


def inputs(batch=2, size=8, seed=0, text_dim=32):
    generator = torch.Generator().manual_seed(seed)
    return dict(
        latents=torch.randn(batch, 4, size, size, generator=generator),
        timesteps=torch.tensor([981, 17][:batch]),
        text=torch.randn(batch, 77, text_dim, generator=generator),
        images=torch.randn(batch, RAM_TOKENS, RAM_WIDTH, generator=generator),
        condition=torch.rand(batch, 3, size * 8, size * 8, generator=generator),
    )


# ------------------------------------------------------------------------------------------------ reference


def _attend(block, index, hidden, text, images):
    hidden = block.attentions[index](hidden, encoder_hidden_states=text, return_dict=False)[0]
    if images is not None:
        hidden = block.image_attentions[index](hidden, encoder_hidden_states=images, return_dict=False)[0]
    return hidden


def _reference_encoder(model, hidden, emb, text, images):
    """conv_in output -> (skip features, mid output), SeeSR's down and mid block order."""
    skips = [hidden]
    for block in model.down_blocks:
        for index, resnet in enumerate(block.resnets):
            hidden = resnet(hidden, emb)
            if hasattr(block, "attentions"):
                hidden = _attend(block, index, hidden, text, images)
            skips.append(hidden)
        for downsampler in block.downsamplers or []:
            hidden = downsampler(hidden)
            skips.append(hidden)
    mid = model.mid_block
    hidden = mid.resnets[0](hidden, emb)
    for index, resnet in enumerate(mid.resnets[1:]):
        hidden = resnet(_attend(mid, index, hidden, text, images), emb)
    return skips, hidden


def _embedding(model, timesteps, dtype):
    return model.time_embedding(model.time_proj(timesteps).to(dtype))


def reference_controlnet(controlnet, latents, timesteps, text, condition, images, scale=1.0):
    emb = _embedding(controlnet, timesteps, latents.dtype)
    hidden = controlnet.conv_in(latents) + controlnet.controlnet_cond_embedding(condition)
    skips, hidden = _reference_encoder(controlnet, hidden, emb, text, images)
    down = [block(skip) * scale for skip, block in zip(skips, controlnet.controlnet_down_blocks)]
    return down, controlnet.controlnet_mid_block(hidden) * scale


def reference_unet(unet, latents, timesteps, text, images, down_residuals, mid_residual):
    emb = _embedding(unet, timesteps, latents.dtype)
    skips, hidden = _reference_encoder(unet, unet.conv_in(latents), emb, text, images)
    skips = [skip + residual for skip, residual in zip(skips, down_residuals)]
    hidden = hidden + mid_residual
    for block in unet.up_blocks:
        for index, resnet in enumerate(block.resnets):
            hidden = resnet(torch.cat([hidden, skips.pop()], dim=1), emb)
            if hasattr(block, "attentions"):
                hidden = _attend(block, index, hidden, text, images)
        for upsampler in block.upsamplers or []:
            hidden = upsampler(hidden)
    return unet.conv_out(unet.conv_act(unet.conv_norm_out(hidden)))


# ------------------------------------------------------------------------------------------------ loading


def test_seesr_release_folder_loads_strictly_with_its_unet(release_folder, seesr_models, components):
    unet, controlnet = seesr_models
    loaded_controlnet, injector, loaded_unet, messages = load_seesr_weights(release_folder, components.unet)
    assert isinstance(loaded_controlnet, SeeSRControlNetModel) and isinstance(loaded_unet, SeeSRUNet2DConditionModel)
    assert injector is None
    assert loaded_controlnet.config.use_image_cross_attention and loaded_unet.config.use_image_cross_attention
    assert messages[-2:] == [
        f"✓ ControlNet loaded from {release_folder / 'controlnet'} (with SeeSR image cross-attention)",
        f"✓ UNet loaded from {release_folder / 'unet'} (with SeeSR image cross-attention)",
    ]
    for original, loaded in ((unet, loaded_unet), (controlnet, loaded_controlnet)):
        state = loaded.state_dict()
        assert state.keys() == original.state_dict().keys()
        assert all(torch.equal(state[key], value) for key, value in original.state_dict().items())
    # SeeSR's parameter names, in every cross-attention block of both models (3 down + mid + 3 up; 3 down + mid).
    assert len(image_attention_blocks(loaded_unet)) == 7 and len(image_attention_blocks(loaded_controlnet)) == 4
    assert "down_blocks.1.image_attentions.0.transformer_blocks.0.attn2.to_k.weight" in state
    assert state["mid_block.image_attentions.0.transformer_blocks.0.attn2.to_k.weight"].shape[1] == RAM_WIDTH


def test_release_weights_that_do_not_fit_are_one_line(release_folder, seesr_models, tmp_path):
    unet, _ = seesr_models
    state = unet.state_dict()
    broken = tmp_path / "seesr"
    extra = dict(state, **{"up_blocks.1.image_attentions.9.proj_in.weight": torch.zeros(1)})
    missing = {key: value for key, value in state.items() if key != "mid_block.image_attentions.0.proj_out.bias"}
    for weights, words in ((extra, "1 unexpected keys"), (missing, "1 missing keys")):
        write_seesr_folder(broken / "controlnet", seesr_models[1], "ControlNetModel", SEESR_CONTROLNET_KEYS)
        write_seesr_folder(broken / "unet", unet, "UNet2DConditionModel", SEESR_UNET_KEYS)
        torch.save(weights, broken / "unet" / "diffusion_pytorch_model.bin")
        with pytest.raises(CheckpointError, match=words) as error:
            load_seesr_weights(broken)
        assert "\n" not in str(error.value) and str(broken / "unet") in str(error.value)


def test_safetensors_release_and_save_pretrained_round_trip(seesr_models, tmp_path):
    unet, controlnet = seesr_models
    folder = tmp_path / "seesr"
    write_seesr_folder(folder / "unet", unet, "UNet2DConditionModel", SEESR_UNET_KEYS, safetensors=True)
    write_seesr_folder(folder / "controlnet", controlnet, "ControlNetModel", SEESR_CONTROLNET_KEYS, safetensors=True)
    _, _, loaded_unet, _ = load_seesr_weights(folder)
    assert torch.equal(loaded_unet.mid_block.image_attentions[0].proj_out.weight, unet.mid_block.image_attentions[0].proj_out.weight)
    # Our own checkpoint with the trained UNet: checkpoint-<step>/controlnet + unet.
    checkpoint = tmp_path / "checkpoint-10"
    save_seesr_weights(checkpoint, controlnet, None, unet=unet)
    reloaded_controlnet, _, reloaded_unet, messages = load_seesr_weights(checkpoint)
    assert reloaded_unet.config.use_image_cross_attention and reloaded_controlnet.config.use_image_cross_attention
    assert reloaded_unet.config.image_cross_attention_dim == RAM_WIDTH
    assert messages[-1].startswith(f"✓ UNet loaded from {checkpoint / 'unet'}")


def test_old_checkpoints_and_plain_seesr_folders_still_load(components, tmp_path):
    torch.manual_seed(0)
    plain = build_controlnet(components.unet)
    assert not plain.config.use_image_cross_attention
    assert not any(IMAGE_ATTENTIONS in name for name, _ in plain.named_parameters())
    # A checkpoint written before image attention existed: a diffusers ControlNetModel's save_pretrained.
    old = tmp_path / "checkpoint-100"
    ControlNetModel.from_unet(components.unet).save_pretrained(old / "controlnet")
    controlnet, injector, unet, messages = load_seesr_weights(old, components.unet)
    assert unet is None and injector is None and not controlnet.config.use_image_cross_attention
    assert messages[-1] == f"✓ ControlNet loaded from {old / 'controlnet'}"
    # A SeeSR-layout folder without image attention (config.json without the key).
    folder = tmp_path / "seesr"
    write_seesr_folder(folder / "unet", components.unet, "UNet2DConditionModel", SEESR_UNET_KEYS, image_attention=False)
    write_seesr_folder(folder / "controlnet", plain, "ControlNetModel", SEESR_CONTROLNET_KEYS, image_attention=False)
    controlnet, _, unet, _ = load_seesr_weights(folder, components.unet)
    assert not unet.config.use_image_cross_attention and not controlnet.config.use_image_cross_attention
    batch = inputs()
    expected = components.unet(batch["latents"], batch["timesteps"], batch["text"]).sample
    # Reloaded (differently aligned) weights take other SIMD paths: measured 7e-7.
    torch.testing.assert_close(unet(batch["latents"], batch["timesteps"], batch["text"]).sample, expected, rtol=0, atol=1e-5)


def test_wrong_checkpoint_kinds_are_one_line(components, seesr_models, tmp_path):
    ddpm = tmp_path / "ddpm_ema.pt"
    torch.save({"model": {}}, ddpm)
    with pytest.raises(CheckpointError, match=r"is a file \(a DDPM or other model's weight file\?\); expected a folder"):
        load_seesr_weights(ddpm)
    unet_only = tmp_path / "unet"
    components.unet.save_pretrained(unet_only)
    with pytest.raises(CheckpointError, match="describes a UNet2DConditionModel, not a ControlNet"):
        load_seesr_weights(unet_only)
    # A ControlNet of another base model: 48-wide text embeddings against the tiny SD2's 32.
    other = UNet2DConditionModel.from_config({**components.unet.config, "cross_attention_dim": 48})
    build_controlnet(other).save_pretrained(tmp_path / "other" / "controlnet")
    with pytest.raises(CheckpointError, match="reads 48-wide text embeddings but .* reads 32-wide") as error:
        load_seesr_weights(tmp_path / "other", components.unet)
    assert str(tmp_path / "other" / "controlnet") in str(error.value) and "\n" not in str(error.value)


# ------------------------------------------------------------------------------------------------ computation


def test_models_compute_seesr_order_and_images_matter(seesr_models):
    unet, controlnet = seesr_models
    batch = inputs()
    with torch.no_grad():
        down, mid = controlnet(
            batch["latents"], batch["timesteps"], batch["text"], batch["condition"], conditioning_scale=0.7,
            image_encoder_hidden_states=batch["images"], return_dict=False,
        )
        ref_down, ref_mid = reference_controlnet(
            controlnet, batch["latents"], batch["timesteps"], batch["text"], batch["condition"], batch["images"], 0.7
        )
        output = unet(
            batch["latents"], batch["timesteps"], batch["text"], down_block_additional_residuals=down,
            mid_block_additional_residual=mid, image_encoder_hidden_states=batch["images"],
        ).sample
        expected = reference_unet(unet, batch["latents"], batch["timesteps"], batch["text"], batch["images"], ref_down, ref_mid)
        without_images = unet(
            batch["latents"], batch["timesteps"], batch["text"], down_block_additional_residuals=down,
            mid_block_additional_residual=mid,
        ).sample
    # Same diffusers modules in the same order: measured max difference 0; 1e-5 leaves room for other kernels.
    for residual, reference in zip(down + [mid], ref_down + [ref_mid]):
        torch.testing.assert_close(residual, reference, rtol=0, atol=1e-5)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)
    # The image embeddings change the prediction by far more than the tolerance (measured ~0.5).
    assert (output - without_images).abs().max() > 0.05
    assert (mid - controlnet(batch["latents"], batch["timesteps"], batch["text"], batch["condition"],
                             conditioning_scale=0.7, return_dict=False)[1]).abs().max() > 0.05


def test_no_images_or_zeroed_image_attention_is_the_plain_model(seesr_models, components):
    unet, controlnet = seesr_models
    batch = inputs()
    plain = UNet2DConditionModel.from_config(components.unet.config).eval()
    plain.load_state_dict({k: v for k, v in unet.state_dict().items() if IMAGE_ATTENTIONS not in k})
    plain_controlnet = ControlNetModel.from_config({k: v for k, v in controlnet.config.items() if "image" not in k})
    plain_controlnet.load_state_dict({k: v for k, v in controlnet.state_dict().items() if IMAGE_ATTENTIONS not in k})
    with torch.no_grad():
        args = (batch["latents"], batch["timesteps"], batch["text"], batch["condition"])
        down, mid = controlnet(*args, return_dict=False)
        plain_down, plain_mid = plain_controlnet.eval()(*args, return_dict=False)
        kwargs = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
        # Copied weights sit elsewhere in memory and can take other SIMD paths (~1e-7): not bit-equal.
        torch.testing.assert_close(unet(*args[:3], **kwargs).sample, plain(*args[:3], **kwargs).sample, rtol=0, atol=1e-5)
        for residual, plain_residual in zip(down + [mid], plain_down + [plain_mid]):
            torch.testing.assert_close(residual, plain_residual, rtol=0, atol=1e-5)
        # Image attentions whose output projection is zero leave the text path untouched (residual connection).
        zeroed = unet_with_image_attention(plain)
        for block in image_attention_blocks(zeroed):
            for attention in block.image_attentions:
                torch.nn.init.zeros_(attention.proj_out.weight)
                torch.nn.init.zeros_(attention.proj_out.bias)
        with_images = zeroed.eval()(*args[:3], image_encoder_hidden_states=batch["images"], **kwargs).sample
    torch.testing.assert_close(with_images, plain(*args[:3], **kwargs).sample, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="without image cross-attention"):
        plain_controlnet_seesr = build_controlnet(plain)
        plain_controlnet_seesr(*args, image_encoder_hidden_states=batch["images"])


def test_build_from_sd2_as_seesr_trains(components):
    torch.manual_seed(0)
    unet = unet_with_image_attention(components.unet)
    sd2_state, state = components.unet.state_dict(), unet.state_dict()
    assert all(torch.equal(state[key], value) for key, value in sd2_state.items())
    trainable = unet_trainable_parameters(unet)
    assert trainable and all(IMAGE_ATTENTIONS in name for name in trainable)
    assert len(trainable) == len(state) - len(sd2_state)  # every new weight, nothing else
    assert set(unet_trainable_parameters(unet, ("attn2", "nothing"))) == {n for n, _ in unet.named_parameters() if "attn2" in n}
    # SeeSR leaves new image attentions at the constructor's initialisation (not zero: they act from step 0).
    assert unet.mid_block.image_attentions[0].proj_out.weight.abs().sum() > 0
    controlnet = build_controlnet(unet)  # follows the UNet: image attention copied from it, as SeeSR's from_unet
    assert controlnet.config.use_image_cross_attention
    assert torch.equal(controlnet.down_blocks[1].image_attentions[1].proj_in.weight, unet.down_blocks[1].image_attentions[1].proj_in.weight)
    fresh = build_controlnet(components.unet, use_image_cross_attention=True)
    assert fresh.config.use_image_cross_attention and len(image_attention_blocks(fresh)) == 4


def test_trainable_modules_are_modules_ending_with_the_names(components):
    """SeeSR's train_seesr.py: ``for name, module in unet.named_modules(): if name.endswith(tuple(trainable_modules))``,
    then every parameter of the module; a name merely containing the string does not count."""
    unet = unet_with_image_attention(components.unet)
    for modules in (("image_attentions",), ("norm",), ("proj", "attn2"), ("weight",)):
        expected = set()
        for name, module in unet.named_modules():
            if name.endswith(tuple(modules)):
                expected |= {f"{name}.{parameter}" for parameter, _ in module.named_parameters()}
        assert set(unet_trainable_parameters(unet, modules)) == expected, modules
    chosen = unet_trainable_parameters(unet, ("norm",))  # Transformer2DModel.norm, not norm1/norm2/norm3 or conv_norm_out
    assert chosen and not any(".norm1." in name or "norm_out" in name for name in chosen)
    assert unet_trainable_parameters(unet, ("weight",)) == {}  # parameter names are not module names


def test_training_loss_uses_image_embeds_and_reaches_image_attention(seesr_models, components):
    unet, controlnet = seesr_models
    generator = torch.Generator().manual_seed(1)
    batch = {
        "hr": torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1,
        "lr_upsampled": torch.rand(2, 3, 64, 64, generator=generator),
        "prompt": ["a cat", ""],
        "image_embeds": torch.randn(2, RAM_TOKENS, RAM_WIDTH, generator=generator),
    }
    trainable = unet_trainable_parameters(unet)
    try:
        for parameter in trainable.values():
            parameter.requires_grad_(True)
        controlnet.requires_grad_(True)
        kwargs = dict(unet=unet, vae=components.vae, text_encoder=components.text_encoder,
                      tokenizer=components.tokenizer, controlnet=controlnet, injector=None,
                      noise_scheduler=components.noise_scheduler)
        loss = seesr_training_loss(batch, generator=torch.Generator().manual_seed(0), **kwargs)
        loss.backward()
        # Every image-attention weight learns, except the mid block's self-attention query/key: over its single
        # latent pixel (8 px latents) the softmax is constant.
        reached = [name for name, p in trainable.items() if p.grad is not None and p.grad.abs().sum() > 0]
        assert set(trainable) - set(reached) == {f"mid_block.image_attentions.0.transformer_blocks.0.attn1.to_{x}.weight" for x in "qk"}
        assert controlnet.mid_block.image_attentions[0].proj_out.weight.grad.abs().sum() > 0
        assert all(p.grad is None for n, p in unet.named_parameters() if n not in trainable)
        without = seesr_training_loss({k: v for k, v in batch.items() if k != "image_embeds"},
                                      generator=torch.Generator().manual_seed(0), **kwargs)
        assert abs(loss.item() - without.item()) > 1e-4
        # Wrapped models (as accelerate prepares the trained UNet and ControlNet) and gradient checkpointing
        # compute the same loss; measured difference 0.
        set_gradient_checkpointing(True, unet, controlnet)
        unet.train(), controlnet.train()
        wrapped = dict(kwargs, unet=torch.nn.DataParallel(unet), controlnet=torch.nn.DataParallel(controlnet))
        again = seesr_training_loss(batch, generator=torch.Generator().manual_seed(0), **wrapped)
        torch.testing.assert_close(again, loss, rtol=0, atol=1e-6)
    finally:
        set_gradient_checkpointing(False, unet, controlnet)
        unet.eval(), controlnet.eval()
        unet.requires_grad_(False).zero_grad(set_to_none=True)
        controlnet.requires_grad_(False).zero_grad(set_to_none=True)


# ------------------------------------------------------------------------------------------------ pipeline


class Recorder:
    """Wraps a model's forward to record the image embeddings (and timesteps) each call receives."""

    def __init__(self, model):
        self.model, self.calls = model, []
        self.forward = model.forward

    def __enter__(self):
        def recording(*args, **kwargs):
            self.calls.append((kwargs.get("image_encoder_hidden_states"), int(torch.as_tensor(args[1]).flatten()[0])))
            return self.forward(*args, **kwargs)

        self.model.forward = recording
        return self

    def __exit__(self, *exc):
        del self.model.forward


def seesr_pipeline(components, seesr_models):
    unet, controlnet = seesr_models
    return SeeSRPipeline(unet, components.vae, components.text_encoder, components.tokenizer,
                         components.noise_scheduler, controlnet)


def test_pipeline_embeddings_through_guidance_halves_and_tiles(components, seesr_models):
    pipeline = seesr_pipeline(components, seesr_models)
    generator = torch.Generator().manual_seed(3)
    image = torch.rand(2, 3, 96, 96, generator=generator)  # 12 x 12 latents
    positive = torch.randn(2, RAM_TOKENS, RAM_WIDTH, generator=generator)
    negative = torch.randn(2, RAM_TOKENS, RAM_WIDTH, generator=generator)
    kwargs = dict(num_inference_steps=1, guidance_scale=5.5, align_method="nofix", latent_tiled_size=8,
                  latent_tiled_overlap=4, image_embeds=positive, negative_image_embeds=negative)
    with Recorder(pipeline.controlnet) as controlnet_calls, Recorder(pipeline.unet) as unet_calls:
        tiled = pipeline(image, generator=torch.Generator().manual_seed(0), tile_batch_size=4, **kwargs)
    expected = torch.cat([negative, positive])  # unconditional half first, per image
    for calls in (controlnet_calls.calls, unet_calls.calls):
        assert len(calls) == 1  # 1 step x one chunk of 4 tiles (2 x 2 tiles of 8 over 12 latent px)
        for states, _ in calls:
            assert states.shape == (4 * 4, RAM_TOKENS, RAM_WIDTH)
            for tile in range(4):
                assert torch.equal(states[tile * 4 : (tile + 1) * 4], expected)
    # One tile per call gives the same result: the embeddings follow each tile's batch. Other batch sizes take
    # other kernels: measured 3e-6, against 0.7 that the embeddings change the image by.
    one_by_one = pipeline(image, generator=torch.Generator().manual_seed(0), tile_batch_size=1, **kwargs)
    torch.testing.assert_close(one_by_one, tiled, rtol=0, atol=1e-4)
    # Without a negative, SeeSR's choice: the same embeddings in both halves; and they change the result.
    same = dict(kwargs, negative_image_embeds=None, latent_tiled_size=96)
    with Recorder(pipeline.unet) as unet_calls:
        result = pipeline(image, generator=torch.Generator().manual_seed(0), **same)
    assert torch.equal(unet_calls.calls[0][0], torch.cat([positive, positive]))
    no_images = pipeline(image, generator=torch.Generator().manual_seed(0), **dict(same, image_embeds=None))
    assert (result - no_images).abs().max() > 1e-2
    # One embedding for the whole batch broadcasts; tiled == untiled when one tile covers the latent.
    untiled = pipeline(image, generator=torch.Generator().manual_seed(0), **dict(same, image_embeds=positive[:1]))
    covering = pipeline(image, generator=torch.Generator().manual_seed(0),
                        **dict(same, image_embeds=positive[:1], latent_tiled_size=12))
    torch.testing.assert_close(covering, untiled, rtol=0, atol=1e-6)
    with pytest.raises(UserError, match="Expected image_embeds of shape"):
        pipeline(image, **dict(same, image_embeds=positive[0]))
    with pytest.raises(UserError, match="without image_embeds"):
        pipeline(image, **dict(same, image_embeds=None, negative_image_embeds=negative))


def test_pipeline_from_release_folder_uses_its_unet(sd2_path, release_folder, components):
    pipeline, messages = SeeSRPipeline.from_pretrained(sd2_path, release_folder)
    assert messages[0] == f"Loading checkpoint from {release_folder}"
    assert isinstance(pipeline.unet, SeeSRUNet2DConditionModel) and pipeline.unet.config.use_image_cross_attention
    assert not any(parameter.requires_grad for parameter in pipeline.unet.parameters())
    batch = inputs(text_dim=32)
    with torch.no_grad():
        output = predict_noise(pipeline.unet, pipeline.controlnet, None, batch["latents"], batch["timesteps"],
                               batch["text"], batch["condition"], image_embeds=batch["images"])
        down, mid = reference_controlnet(pipeline.controlnet, batch["latents"], batch["timesteps"], batch["text"],
                                         batch["condition"], batch["images"])
        expected = reference_unet(pipeline.unet, batch["latents"], batch["timesteps"], batch["text"], batch["images"], down, mid)
    torch.testing.assert_close(output, expected, rtol=0, atol=1e-5)


def test_start_steps_skips_the_steps_above_it(components, seesr_models):
    pipeline = seesr_pipeline(components, seesr_models)
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    kwargs = dict(num_inference_steps=5, guidance_scale=1.0, align_method="nofix")
    visited = []
    with Recorder(pipeline.unet) as unet_calls:
        pipeline(image, generator=torch.Generator().manual_seed(0), start_steps=500,
                 callback=lambda i, t, latents: visited.append((i, t)), **kwargs)
    assert visited == [(2, 401), (3, 201), (4, 1)]  # of 801, 601, 401, 201, 1
    assert [t for _, t in unet_calls.calls] == [401, 201, 1]
    # The first step reads the LR latent noised to t=500 (SeeSR's add_noise at start_steps).
    generator = torch.Generator().manual_seed(0)
    noise = randn_tensor((1, 4, 8, 8), generator=generator)
    with torch.no_grad():
        lr_latent = pipeline.vae.encode(image * 2 - 1).latent_dist.sample(generator) * pipeline.vae.config.scaling_factor
    start = pipeline.scheduler.add_noise(lr_latent, noise, torch.tensor([500]))
    first_input = []
    original = pipeline.unet.forward
    pipeline.unet.forward = lambda sample, *a, **k: first_input.append(sample) or original(sample, *a, **k)
    try:
        pipeline(image, generator=torch.Generator().manual_seed(0), lr_start_timestep=500, **kwargs)
    finally:
        del pipeline.unet.forward
    # The pipeline's noising and this test's of the same VAE sample (two code paths in float32): measured 1.2e-7.
    torch.testing.assert_close(first_input[0], start, rtol=0, atol=1e-5)
    # 999 (SeeSR's default) skips nothing; pure noise always runs every step.
    for start_kwargs in (dict(start_steps=999), dict(start_point="noise", start_steps=500)):
        visited.clear()
        pipeline(image, callback=lambda i, t, latents: visited.append(t), **kwargs, **start_kwargs)
        assert visited == [801, 601, 401, 201, 1]
    for bad, words in (
        (dict(start_steps=1000), r"--start_steps \(--lr_start_timestep\) in 0..999"),
        (dict(start_steps=-1), "in 0..999"),
        (dict(start_steps=500, lr_start_timestep=400), "are the same setting"),
        (dict(num_inference_steps=0), "--num_inference_steps of at least 1"),
        (dict(guidance_scale=-1.0), "--guidance_scale >= 0"),
    ):
        with pytest.raises(UserError, match=words):
            pipeline(image, **{**kwargs, **bad})


def test_text_only_checkpoint_ignores_image_embeds(components):
    """A ControlNet and UNet without image attention run the embeddings-free path when embeddings are given."""
    torch.manual_seed(0)
    controlnet = build_controlnet(components.unet)
    batch = inputs()
    text = encode_prompts(components.tokenizer, components.text_encoder, ["a cat", ""])
    args = (components.unet, controlnet, None, batch["latents"], batch["timesteps"], text, batch["condition"])
    assert torch.equal(predict_noise(*args, image_embeds=batch["images"]), predict_noise(*args))
