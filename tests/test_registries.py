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
