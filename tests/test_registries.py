"""Each variation point's registry takes a new entry: a toy variant registered in a test trains one step through the
family's builder and is removed again (the walk of docs/extending.md)."""

import pytest
import torch

# ------------------------------------------------------------------------------------------------ SeeSR injectors


@pytest.fixture(scope="module")
def seesr_folders(tmp_path_factory):
    from data.demo_data import build_demo_image_folder
    from tests.sd2_tiny import build_tiny_sd2

    root = tmp_path_factory.mktemp("seesr_registry")
    return {"sd2": build_tiny_sd2(root / "sd2", light_attention=True),
            "hr": build_demo_image_folder(root / "HR", size=64, count=2, seed=0)}


def test_a_fourth_injector_variant_trains_through_the_builder(seesr_folders, tmp_path, monkeypatch):
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin
    from torch.utils.data import default_collate

    import train_seesr_timestep as train
    from models.timestep_adaptive import INJECTORS, InjectorVariant, load_injector, save_injector
    from recipes.seesr import build_seesr_training, loss_generator

    class ResidualGate(ModelMixin, ConfigMixin):
        """Toy variant: one learnable gate per residual, constant over timesteps."""

        config_name = "config.json"

        @register_to_config
        def __init__(self, residual_levels=(0,), variant: str | None = None):
            super().__init__()
            self.gates = torch.nn.Parameter(torch.ones(len(residual_levels) + 1))

        def forward(self, down, mid, timesteps):
            scaled = [residual * gate.to(residual.dtype) for residual, gate in zip([*down, mid], self.gates)]
            return scaled[:-1], scaled[-1]

    # The registration: one entry (monkeypatch removes it after the test).
    monkeypatch.setitem(INJECTORS._entries, "residual_gate", InjectorVariant(ResidualGate))
    monkeypatch.setitem(INJECTORS._help, "residual_gate", "toy: one gate per residual")

    config = train.parse_args([
        "--no_image_cross_attention", "--pretrained_model_path", str(seesr_folders["sd2"]), "--train_data_dir",
        str(seesr_folders["hr"]), "--output_dir", str(tmp_path), "--resolution", "64", "--train_batch_size", "2",
        "--conditioning_embedding_channels", "4", "8", "8", "8", "--injector", "residual_gate", "--seed", "0",
    ])
    parts = build_seesr_training(config, "cpu")
    injector = parts.models["injector"]
    assert isinstance(injector, ResidualGate) and injector.variant == "residual_gate" and injector.gates.shape == (13,)
    optimizer = torch.optim.AdamW(parts.param_groups)
    with torch.no_grad():  # a new ControlNet's zero convolutions give zero residuals: nothing to gate yet
        for name, parameter in parts.models["controlnet"].named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) and name.endswith(".weight"):
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(1))
    assert parts.param_groups[-1]["params"] == [injector.gates]
    dataset = parts.datasets["train"]
    dataset.set_epoch(0)
    batch = default_collate([dataset[0], dataset[1]])
    batch["prompt_embeds"] = parts.extras["prompt_cache"](batch["prompt"])
    loss = parts.objective(batch, controlnet=parts.models["controlnet"], injector=injector,
                           generator=loss_generator(config.seed, 0, "cpu"))
    loss.backward()
    assert injector.gates.grad is not None and injector.gates.grad.abs().sum() > 0
    optimizer.step()
    assert not torch.equal(injector.gates.detach(), torch.ones(13))

    save_injector(injector, tmp_path / "checkpoint-1")  # loads back through the registry's record
    loaded, _ = load_injector(tmp_path / "checkpoint-1")
    assert type(loaded) is ResidualGate and torch.equal(loaded.gates, injector.gates.detach())


# ------------------------------------------------------------------------- DDPM, Phaseformer, user generation


def register_for_the_test(monkeypatch, registry, name, entry, help=""):
    """One registry entry for the length of a test (monkeypatch removes it again)."""
    monkeypatch.setitem(registry._entries, name, entry)
    monkeypatch.setitem(registry._help, name, help)


@pytest.fixture(scope="module")
def small_images(tmp_path_factory):
    from data.demo_data import build_demo_image_folder

    return build_demo_image_folder(tmp_path_factory.mktemp("ddpm_registry") / "images", size=8, count=4, seed=0)


def test_a_new_unet_preset_and_sampler_train_and_sample_through_the_builder(small_images, tmp_path, monkeypatch):
    from diffusers import EulerDiscreteScheduler
    from torch.utils.data import default_collate

    import train_ddpm_highres as train
    from models.ddpm_sampling import SAMPLERS, SamplerSpec, load_ddpm_for_sampling, sample_ddpm
    from models.ddpm_unet import UNET_PRESETS
    from recipes.ddpm import build_ddpm_training, complete_config
    from utils.checkpoint import atomic_torch_save

    register_for_the_test(monkeypatch, UNET_PRESETS, "toy", dict(channels=(8, 16), attention=(False, True), layers=1,
                                                                  dropout=0.0, groups=4, lr=1e-3), "toy: two levels")
    register_for_the_test(monkeypatch, SAMPLERS, "euler", SamplerSpec(
        lambda config, spacing: EulerDiscreteScheduler.from_config(config, timestep_spacing=spacing), 10), "toy: Euler")
    config = complete_config(train.parse_args(["--dataset", "folder", "--data_dir", str(small_images), "--size", "8",
                                               "--model", "toy", "--sampler", "euler", "--output_dir", str(tmp_path)]))
    assert (config.model, config.sample_steps) == ("toy", 10)  # the preset by its key, the sampler's default steps
    torch.manual_seed(0)
    parts = build_ddpm_training(config, "cpu")
    assert parts.model.config.block_out_channels == (8, 16)
    optimizer = parts.extras["optimizer_class"](parts.param_groups)
    images = default_collate([parts.datasets["train"][i] for i in range(2)])
    loss = parts.objective(images, model=parts.model)["loss"]
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)

    samples = sample_ddpm(parts.model, dict(parts.extras["noise_scheduler"].config), 2, config.sample_steps, "euler", seed=0)
    assert samples.shape == (2, 3, 8, 8) and torch.isfinite(samples).all()
    # The checkpoint records the preset's key and the UNet's arguments; loading builds from that record.
    atomic_torch_save({"kind": "ddpm", "model_preset": "toy", "model_config": dict(parts.model.config), "model": parts.model.state_dict(),
                     "scheduler_config": dict(parts.extras["noise_scheduler"].config), "config": {"dataset": "folder"}},
                    tmp_path / "ddpm_last.pt")
    unet, _, _ = load_ddpm_for_sampling(tmp_path / "ddpm_last.pt")
    torch.testing.assert_close(unet.state_dict(), parts.model.state_dict())


def test_a_new_loss_term_joins_the_phaseformer_loss_by_name(tmp_path, monkeypatch):
    import torch.nn.functional as F
    from torch import nn

    import train_phaseformer as train
    from losses.phaseformer_loss import LOSS_TERMS
    from recipes.phaseformer import build_phaseformer_training

    class MeanColourLoss(nn.Module):
        """Toy term: L1 between the images' mean colours."""

        def forward(self, prediction, target):
            return F.l1_loss(prediction.mean(dim=(2, 3)), target.mean(dim=(2, 3)))

    register_for_the_test(monkeypatch, LOSS_TERMS, "mean_colour", lambda options: MeanColourLoss(), "toy: mean colour L1")
    config = train.parse_args(["--config", "configs/phaseformer_tiny.yaml", "--dataset_path", str(tmp_path), "--no_perceptual",
                               "--loss_weighting", "softmax", "--output_dir", str(tmp_path / "out")])
    torch.manual_seed(0)
    parts = build_phaseformer_training(config, "cpu", with_data=False)
    loss_fn = parts.models["loss"]
    assert loss_fn.term_names == ["pixel", "gradient", "msssim", "mean_colour"]
    generator = torch.Generator().manual_seed(0)
    batch = {"input": torch.rand(2, 3, 16, 16, generator=generator), "target": torch.rand(2, 3, 16, 16, generator=generator),
             "target_2x": torch.rand(2, 3, 32, 32, generator=generator)}
    optimizer = parts.extras["optimizer_class"](parts.param_groups)
    total, logs = parts.objective(batch, model=parts.model)
    total.backward()
    optimizer.step()
    assert {"mean_colour_L", "mean_colour_H"} <= set(logs) and "w_mean_colour" in loss_fn.weights_dict()
    assert loss_fn.term_weights.raw_weights.grad[0, 3] != 0  # the new term's weight learns


def test_a_new_backbone_trains_samples_and_reloads_through_its_spec(tmp_path, monkeypatch):
    from diffusers.configuration_utils import ConfigMixin, register_to_config
    from diffusers.models.modeling_utils import ModelMixin
    from torch import nn

    import train_dit_user as train
    from data.latents import STATS_FILENAME, compute_latent_stats, save_latent_file
    from models.user_generation import BACKBONES, RECTIFIED_FLOW, BackboneSpec, NewBackbone, build_backbone, generate_latents
    from recipes.user import build_user_training, complete_config

    class ToyBackbone(ModelMixin, ConfigMixin):
        """Toy backbone: a 1x1 convolution shifted by a per-user embedding and the time; meets the interface."""

        @register_to_config
        def __init__(self, num_users: int = 3, channels: int = 4, size: int = 4, class_dropout_prob: float = 0.1):
            super().__init__()
            self.conv = nn.Conv2d(channels + 1, channels, 1)
            self.users = nn.Embedding(num_users + 1, channels)

        @property
        def null_label(self):
            return self.config.num_users if self.config.class_dropout_prob > 0 else None

        def forward(self, x, t, labels):
            if self.training and self.null_label is not None:
                labels = torch.where(torch.rand(labels.shape, device=labels.device) < self.config.class_dropout_prob,
                                     torch.full_like(labels, self.null_label), labels)
            time = t.float().view(-1, 1, 1, 1).expand(-1, 1, *x.shape[2:])
            return self.conv(torch.cat([x, time.to(x.dtype)], dim=1)) + self.users(labels)[:, :, None, None]

    def build(size, *, num_users, in_channels, input_size, cfg_dropout, **unused):
        return NewBackbone(ToyBackbone(num_users, in_channels, input_size, cfg_dropout))

    spec = BackboneSpec(
        title="Toy", build=build, config_of=lambda model: dict(model.config), from_config=lambda config: ToyBackbone(**{
            k: v for k, v in config.items() if not k.startswith("_")}),
        num_users=lambda model: model.config.num_users,
        latent_shape=lambda model: (model.config.channels, model.config.size, model.config.size),
        enable_gradient_checkpointing=lambda model: None, objective=RECTIFIED_FLOW, sizes=("one",), default_size="one",
        sampling_defaults={"sampler": "heun", "num_steps": 4, "guidance_scale": 2.0, "guidance_interval": [0.0, 1.0],
                           "shift": 1.0, "guidance_channels": None, "eta": 0.0},
    )
    register_for_the_test(monkeypatch, BACKBONES, "toy", spec, "toy: 1x1 convolution")
    latents = torch.randn(6, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    save_latent_file(tmp_path / "train.safetensors", latents, torch.arange(6) % 3 + 1, num_users=3, vae_fingerprint="toy",
                     posterior="mode", image_size=64)
    compute_latent_stats(latents, "toy").save(tmp_path / STATS_FILENAME)
    config = complete_config(train.parse_args(["--latent_dir", str(tmp_path), "--output_dir", str(tmp_path / "out"),
                                               "--backbone", "toy"]))
    assert config.model_size == "one"
    torch.manual_seed(0)
    parts = build_user_training(config, "cpu")
    model = parts.model.train()
    optimizer = parts.extras["optimizer_class"](parts.param_groups)
    terms = parts.objective(latents[:4], torch.tensor([0, 1, 2, 0]), model=model)
    terms["loss"].backward()
    optimizer.step()
    assert torch.isfinite(terms["loss"]) and terms["cos"] is not None  # the flow objective, cosine term included

    samples = generate_latents(model, "toy", [1, 3], 2, seed=0, num_steps=3, sampler="heun", guidance_scale=2.0)
    assert samples.shape == (4, 4, 4, 4) and torch.isfinite(samples).all()
    rebuilt = build_backbone("toy", parts.extras["model_config"])  # what a checkpoint's loader does
    rebuilt.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(generate_latents(rebuilt, "toy", [2], 1, seed=3, num_steps=2),
                               generate_latents(model, "toy", [2], 1, seed=3, num_steps=2))


def test_checkpoints_written_before_the_registries_still_load(tmp_path):
    """The one fallback per family: a DDPM checkpoint without ``model_preset`` loads from its ``model_config``; a
    Phaseformer checkpoint whose loss weights carry no term names gets the default terms, and its weights load."""
    import train_phaseformer as train
    from models.ddpm_sampling import load_ddpm_for_sampling, make_noise_scheduler
    from models.ddpm_unet import build_ddpm_unet
    from recipes.phaseformer import build_loss
    from utils.checkpoint import atomic_torch_save

    torch.manual_seed(0)
    unet = build_ddpm_unet("tiny", 8)
    atomic_torch_save({"kind": "ddpm", "model_config": dict(unet.config), "model": unet.state_dict(),  # the old format
                       "scheduler_config": dict(make_noise_scheduler().config), "config": {"dataset": "folder", "model_preset": "tiny"},
                       "epoch": 1}, tmp_path / "ddpm_old.pt")
    loaded, _, _ = load_ddpm_for_sampling(tmp_path / "ddpm_old.pt")
    torch.testing.assert_close(loaded.state_dict(), unet.state_dict())

    config = train.parse_args(["--config", "configs/phaseformer_tiny.yaml", "--dataset_path", str(tmp_path), "--no_perceptual",
                               "--loss_weighting", "uncertainty"])
    trained = build_loss(config)
    with torch.no_grad():
        trained.term_weights.log_variances.copy_(torch.tensor([[0.1, -0.2, 0.3]]))
    old = {"loss_weighting": {"mode": "uncertainty", "state": trained.weighting_state_dict()}}  # no "terms": the old format
    resumed = build_loss(config, old)
    assert resumed.term_names == ["pixel", "gradient", "msssim"]
    resumed.load_weighting_state_dict(old["loss_weighting"]["state"])
    assert resumed.weights_dict() == trained.weights_dict()
    recorded = build_loss(config, {"loss_weighting": {"terms": ["msssim", "pixel"]}})  # the new format: the names it recorded
    assert recorded.term_names == ["msssim", "pixel"]
