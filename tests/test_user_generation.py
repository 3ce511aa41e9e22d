"""The one generation function: user IDs, classifier-free guidance rules, determinism, both backbones."""

import pytest
import torch
from torch import nn

from models.dit import build_dit
from models.user_generation import (
    ObjectiveSetup,
    build_noise_scheduler,
    ddpm_loss,
    generate_latents,
    guided_prediction,
    sample_ddim,
    sample_flow,
    training_loss,
    user_labels,
    validate_user_ids,
)
from models.user_unet import build_user_unet
from utils.errors import UserError


def perturb(model, scale=0.05, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(scale * torch.randn(parameter.shape, generator=generator))
    return model


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return perturb(build_dit("tiny", num_users=3, input_size=4, in_channels=4, depth=1)).eval()


@pytest.fixture(scope="module")
def unet():
    torch.manual_seed(0)
    return build_user_unet("tiny", num_users=3, in_channels=4, sample_size=8).eval()


class LabelProbe(nn.Module):
    """Output channel c of sample i is (label_i + 1) * (c + 1); records every call's batch and labels."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def forward(self, x, t, y):
        self.calls.append((x.shape[0], float(t[0]), y.tolist()))
        channel = torch.arange(1, x.shape[1] + 1, dtype=x.dtype).view(1, -1, 1, 1)
        return (y.to(x.dtype) + 1).view(-1, 1, 1, 1) * channel * torch.ones_like(x)


class Recorder(nn.Module):
    """A DDP-like wrapper (``.module``) that records the labels of every call."""

    def __init__(self, inner):
        super().__init__()
        self.module = inner
        self.labels = []

    def forward(self, x, t, y):
        self.labels.append(y.tolist())
        return self.module(x, t, y)


def test_user_ids_are_one_based_and_checked():
    assert validate_user_ids([1, 5, 31], 31) == [1, 5, 31]
    assert user_labels([1, 2, 31], 31).tolist() == [0, 1, 30]  # user k -> row k - 1; user 0 is not user 1
    for bad in ([0], [32], [-1], [2, "3"], [True], [1.5]):
        with pytest.raises(UserError, match=r"outside the valid range 1\.\.31"):
            validate_user_ids(bad, 31)
    with pytest.raises(UserError, match="No user IDs"):
        validate_user_ids([], 31)


def test_guidance_uses_the_null_user_on_all_channels():
    probe = LabelProbe()
    noise = torch.zeros(2, 5, 2, 2)
    labels = torch.tensor([0, 2])
    out = sample_flow(probe, noise, labels, null_label=3, num_steps=1, guidance_scale=4.0)
    assert probe.calls == [(2, 0.0, [0, 2]), (2, 0.0, [3, 3])]  # on the CPU: conditional, then the null user (num_users)
    channel = torch.arange(1, 6.0).view(1, -1, 1, 1)
    cond, uncond = torch.tensor([1.0, 3.0]).view(-1, 1, 1, 1) * channel, 4.0 * channel
    expected = uncond + 4.0 * (cond - uncond)  # one Euler step of length 1 from zero noise
    torch.testing.assert_close(out, expected.expand_as(out))
    # The GPU's layout, one doubled batch (conditional rows, then the null rows): the same prediction.
    probe.calls.clear()
    velocity = guided_prediction(probe, noise, torch.zeros(2), labels, null_label=3, guidance_scale=4.0, batched=True)
    assert probe.calls == [(4, 0.0, [0, 2, 3, 3])]
    torch.testing.assert_close(velocity, expected.expand_as(out))


def test_three_channel_guidance_only_when_asked():
    probe = LabelProbe()
    out = sample_flow(probe, torch.zeros(1, 5, 2, 2), torch.tensor([1]), null_label=3, num_steps=1, guidance_scale=4.0, guidance_channels=3)
    channel = torch.arange(1, 6.0)
    cond, uncond = 2.0 * channel, 4.0 * channel
    expected = torch.cat([uncond[:3] + 4.0 * (cond[:3] - uncond[:3]), cond[3:]])  # the reference's behaviour
    torch.testing.assert_close(out[0, :, 0, 0], expected)


def test_guidance_interval_skips_the_unconditional_pass():
    probe = LabelProbe()
    sample_flow(
        probe, torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), null_label=3, num_steps=4, guidance_scale=2.0, guidance_interval=(0.5, 1.0)
    )
    assert [(batch, t) for batch, t, _ in probe.calls] == [(2, 0.0), (2, 0.25), (2, 0.5), (2, 0.5), (2, 0.75), (2, 0.75)]
    probe.calls.clear()
    sample_flow(probe, torch.zeros(2, 3, 2, 2), torch.tensor([0, 1]), null_label=3, num_steps=3, sampler="heun", guidance_scale=1.0)
    assert all(batch == 2 for batch, _, _ in probe.calls) and len(probe.calls) == 6  # scale 1: never a null pass


def test_generate_reads_num_users_from_the_model_and_maps_ids(dit):
    recorder = Recorder(dit)
    generate_latents(recorder, "dit", [1, 3], 1, seed=0, num_steps=2, guidance_scale=3.0)
    assert recorder.labels == [[0, 2], [3, 3], [0, 2], [3, 3]]  # on the CPU the null pass follows the conditional one
    with pytest.raises(UserError, match=r"\[0, 4\] are outside the valid range 1\.\.3"):
        generate_latents(dit, "dit", [0, 1, 4], 1, seed=0, num_steps=2)
    no_null = build_dit("tiny", num_users=3, input_size=4, in_channels=4, depth=1, class_dropout_prob=0.0)
    with pytest.raises(UserError, match="without a null user"):
        generate_latents(no_null, "dit", [1], 1, seed=0, num_steps=1, guidance_scale=2.0)


def test_generate_is_deterministic_per_seed_user_and_index(dit):
    settings = dict(seed=7, num_steps=3, sampler="heun", guidance_scale=2.5, guidance_interval=(0.1, 1.0), shift=0.3)
    together = generate_latents(dit, "dit", [1, 2], 2, batch_size=4, **settings)
    assert together.shape == (4, 4, 4, 4) and together.dtype == torch.float32
    assert torch.equal(together, generate_latents(dit, "dit", [1, 2], 2, batch_size=4, **settings))
    alone = generate_latents(dit, "dit", [2], 2, batch_size=1, **settings)
    torch.testing.assert_close(alone, together[2:], atol=1e-6, rtol=1e-6)  # same samples in another batch layout
    later = generate_latents(dit, "dit", [2], 1, first_index=1, **settings)
    torch.testing.assert_close(later[0], together[3], atol=1e-6, rtol=1e-6)
    assert not torch.allclose(together[0], together[2])  # different users differ
    other_seed = generate_latents(dit, "dit", [1, 2], 2, batch_size=4, **dict(settings, seed=8))
    assert not torch.allclose(other_seed, together)


def test_generate_restores_training_mode_and_supports_autocast(dit):
    dit.train()
    try:
        reference = generate_latents(dit, "dit", [1], 1, seed=0, num_steps=2)
        assert dit.training
        low = generate_latents(dit, "dit", [1], 1, seed=0, num_steps=2, autocast_dtype=torch.bfloat16)
        assert torch.isfinite(low).all() and (low - reference).abs().max() < 0.1
    finally:
        dit.eval()


def test_unet_ddim_generation_follows_the_same_rules(unet):
    scheduler = build_noise_scheduler()
    assert scheduler.config.clip_sample is False
    recorder = Recorder(unet)
    settings = dict(seed=3, num_steps=4, guidance_scale=2.0, noise_scheduler=scheduler, guidance_interval=(0.0, 0.6))
    together = generate_latents(recorder, "unet", [1, 3], 2, batch_size=4, **settings)
    assert together.shape == (4, 4, 8, 8)
    # Trailing DDIM timesteps 999, 749, 499, 249 are flow times 0.001, 0.251, 0.501, 0.751: the null user only inside (0, 0.6).
    assert [len(labels) for labels in recorder.labels] == [4, 4, 4, 4, 4, 4, 4]  # guided steps: two passes of 4 each
    assert recorder.labels[:2] == [[0, 0, 2, 2], [3, 3, 3, 3]]
    alone = generate_latents(unet, "unet", [3], 2, batch_size=1, **settings)
    torch.testing.assert_close(alone, together[2:], atol=1e-4, rtol=1e-4)  # batched GEMMs round differently
    noisy = dict(settings, eta=0.7)
    assert torch.equal(generate_latents(unet, "unet", [1], 2, **noisy), generate_latents(unet, "unet", [1], 2, **noisy))
    with pytest.raises(UserError, match="samples with ddpm, ddim"):
        generate_latents(unet, "unet", [1], 1, seed=0, num_steps=2, sampler="euler", noise_scheduler=scheduler)
    # DDPM's ancestral sampler (every SAMPLERS entry samples the latent UNet): per-step noise from each sample's own
    # generator, so a sample is the same alone and in a batch.
    ancestral = dict(settings, sampler="ddpm")
    pair = generate_latents(unet, "unet", [1, 3], 1, batch_size=2, **ancestral)
    torch.testing.assert_close(generate_latents(unet, "unet", [3], 1, batch_size=1, **ancestral), pair[1:], atol=1e-4, rtol=1e-4)
    assert not torch.allclose(pair, generate_latents(unet, "unet", [1, 3], 1, batch_size=2, **settings))  # not DDIM's


class TimestepProbe(nn.Module):
    def __init__(self):
        super().__init__()
        self.timesteps = []

    def forward(self, x, t, y):
        self.timesteps.append(int(t[0]))
        return torch.zeros_like(x)


def test_ddim_spacing_trailing_by_default_and_leading_as_the_note():
    """50 DDIM steps of a 1000-step DDPM: trailing starts at t=999 (pure noise), leading (from_config's default) at 980."""
    scheduler = build_noise_scheduler()
    noise = torch.randn(1, 2, 2, 2)
    for spacing, first, last in (("trailing", 999, 19), ("leading", 980, 0)):
        probe = TimestepProbe()
        kwargs = {} if spacing == "trailing" else {"timestep_spacing": spacing}
        sample_ddim(probe, scheduler, noise, torch.zeros(1, dtype=torch.long), null_label=None, num_steps=50, **kwargs)
        assert (len(probe.timesteps), probe.timesteps[0], probe.timesteps[-1]) == (50, first, last)
    with pytest.raises(UserError, match="Unknown DDIM timestep spacing 'even'"):
        sample_ddim(probe, scheduler, noise, torch.zeros(1, dtype=torch.long), null_label=None, num_steps=5, timestep_spacing="even")


def test_ddim_with_the_true_noise_recovers_the_data():
    scheduler = build_noise_scheduler()
    data = torch.randn(2, 3, 4, 4)
    noise = torch.randn(2, 3, 4, 4)
    start = scheduler.add_noise(data, noise, torch.tensor([999, 999]))
    alphas = scheduler.alphas_cumprod

    def oracle(x, timesteps, labels):  # the exact epsilon of x_t for this one data point
        a = alphas[timesteps].view(-1, 1, 1, 1)
        return (x - a.sqrt() * data) / (1 - a).sqrt()

    out = sample_ddim(oracle, scheduler, start, torch.zeros(2, dtype=torch.long), null_label=None, num_steps=10)
    torch.testing.assert_close(out, data, atol=1e-4, rtol=1e-4)


def test_ddpm_loss_targets(unet):
    scheduler = build_noise_scheduler()
    data, noise = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8)
    labels = torch.tensor([0, 2])
    oracle = ddpm_loss(lambda x, t, y: noise, scheduler, data, labels, noise=noise)
    assert oracle["loss"].item() == 0.0
    v_scheduler = build_noise_scheduler(prediction_type="v_prediction")
    timesteps = torch.tensor([10, 700])
    velocity = v_scheduler.get_velocity(data, noise, timesteps)
    assert ddpm_loss(lambda x, t, y: velocity, v_scheduler, data, labels, noise=noise, timesteps=timesteps)["loss"].item() < 1e-10
    unet.train()
    try:
        terms = training_loss("unet", unet, data, labels, ObjectiveSetup(noise_scheduler=scheduler),
                              generator=torch.Generator().manual_seed(0))
        terms["loss"].backward()
        assert terms["loss"].ndim == 0 and unet.condition_encoder.embedding.weight.grad is not None
    finally:
        unet.zero_grad()
        unet.eval()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_generation_matches_cpu_and_fp16_autocast_is_finite(dit):
    settings = dict(seed=11, num_steps=4, sampler="heun", guidance_scale=3.0, shift=0.3)
    on_cpu = generate_latents(dit, "dit", [1, 3], 2, **settings)
    cuda_model = dit.to("cuda")
    try:
        on_cuda = generate_latents(cuda_model, "dit", [1, 3], 2, **settings)  # the same per-sample noise, drawn on the CPU
        torch.testing.assert_close(on_cuda, on_cpu, atol=5e-3, rtol=5e-3)
        half = generate_latents(cuda_model, "dit", [1, 3], 2, autocast_dtype=torch.float16, **settings)
        assert torch.isfinite(half).all() and (half - on_cpu).abs().max() < 0.1
    finally:
        dit.to("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_fp16_training_step_with_qk_norm_and_checkpointing():
    from models.user_generation import flow_matching_loss

    torch.manual_seed(0)
    model = build_dit("S", num_users=31, use_qknorm=True).cuda().train()
    model.enable_gradient_checkpointing()
    latents, labels = torch.randn(8, 32, 16, 16, device="cuda"), torch.randint(0, 31, (8,), device="cuda")
    with torch.autocast("cuda", dtype=torch.float16):
        terms = flow_matching_loss(model, latents, labels)
    terms["loss"].backward()  # unscaled: fp32 weights, fp16 activations
    assert terms["loss"].dtype == torch.float32 and torch.isfinite(terms["loss"])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
