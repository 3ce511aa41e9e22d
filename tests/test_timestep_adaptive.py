"""The timestep-adaptive multi-scale injector: w(t) modules, identity at init, scaling, save/load."""

import json

import pytest
import torch

from models.timestep_adaptive import (
    INJECTOR_BIN_NAME,
    INJECTOR_CONFIG_NAME,
    INJECTOR_FOLDER,
    INJECTOR_SAFETENSORS_NAME,
    INJECTORS,
    MESSAGE_INJECTOR_LOADED,
    MESSAGE_TIMESTEP_WEIGHTS_LOADED,
    SD2_RESIDUAL_LEVELS,
    MultiScaleInjector,
    TimestepWeightMLP,
    TimestepWeightTable,
    build_injector,
    controlnet_residual_levels,
    create_timestep_adaptive_weights,
    load_injector,
    save_injector,
)
from utils.errors import CheckpointError, UserError


def sd2_like_residuals(batch=2, dtype=torch.float32, seed=0):
    """12 down residuals at 4 resolutions (3 each) + mid, like SD2's ControlNet at 64 px latents / 8."""
    generator = torch.Generator().manual_seed(seed)
    sizes = [8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1]
    down = [torch.randn(batch, 4, size, size, generator=generator).to(dtype) for size in sizes]
    mid = torch.randn(batch, 4, 1, 1, generator=generator).to(dtype)
    return down, mid


ALL_CONFIGS = [
    dict(variant=variant, timestep_weights=kind, grouping=grouping, timestep_weights_shared=shared)
    for variant in INJECTORS.names() if INJECTORS.get(variant).model_class is MultiScaleInjector
    for kind in ("table", "mlp")
    for grouping in ("tensor", "level")
    for shared in (True, False)
]


def test_sd2_residual_levels():
    assert controlnet_residual_levels(4, 2) == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]
    assert list(SD2_RESIDUAL_LEVELS) == controlnet_residual_levels()
    injector = build_injector("timestep_multiscale", grouping="level")
    assert injector.num_residuals == 13 and injector.num_groups == 5
    assert injector.residual_group.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4]
    assert build_injector("timestep_multiscale", grouping="tensor").num_groups == 13


def test_table_weights_index_by_training_timestep_and_get_gradients():
    table = create_timestep_adaptive_weights("table", num_weights=3, num_train_timesteps=1000)
    assert isinstance(table, TimestepWeightTable) and table.table.shape == (1000, 3)
    assert torch.equal(table.get_weight_at_step(0), torch.ones(3))
    with torch.no_grad():
        table.table.copy_(torch.arange(3000, dtype=torch.float32).view(1000, 3))
    assert torch.equal(table.get_weight_at_step(981), torch.tensor([2943.0, 2944.0, 2945.0]))
    assert torch.equal(table.get_weight_at_step(torch.tensor(5)), torch.tensor([15.0, 16.0, 17.0]))
    vector = table.get_weight_at_step(torch.tensor([0, 999, 1]))
    assert vector.shape == (3, 3)
    assert torch.equal(vector[:, 0], torch.tensor([0.0, 2997.0, 3.0]))

    table.get_weight_at_step(torch.tensor([10, 20, 20])).sum().backward()
    grad = table.table.grad
    assert torch.equal(grad[10], torch.ones(3)) and torch.equal(grad[20], torch.full((3,), 2.0))
    assert grad.abs().sum() == 9.0  # nothing else moved

    binned = create_timestep_adaptive_weights("table", num_weights=1, num_bins=10)
    with torch.no_grad():
        binned.table.copy_(torch.arange(10, dtype=torch.float32)[:, None])
    assert binned.get_weight_at_step(torch.tensor([0, 99, 100, 999])).flatten().tolist() == [0.0, 0.0, 1.0, 9.0]


def test_mlp_weights_start_at_one_and_learn():
    mlp = create_timestep_adaptive_weights("mlp", num_weights=2, embedding_dim=16, hidden_dim=8)
    assert isinstance(mlp, TimestepWeightMLP)
    steps = torch.tensor([0, 500, 999])
    assert torch.equal(mlp.get_weight_at_step(steps), torch.ones(3, 2))  # exactly 1.0: bit-exact identity
    assert mlp.get_weight_at_step(981).shape == (2,)

    target = torch.tensor([[2.0, 0.5]])
    ((mlp.get_weight_at_step(steps) - target) ** 2).sum().backward()
    last = mlp.mlp[-1]
    assert last.weight.grad.abs().sum() > 0 and last.bias.grad.abs().sum() > 0
    with torch.no_grad():
        torch.nn.init.normal_(last.weight)
    early, late = mlp.get_weight_at_step(999), mlp.get_weight_at_step(1)
    assert not torch.allclose(early, late)  # the curve depends on t


def test_unknown_kind_and_variant_are_user_errors():
    with pytest.raises(UserError, match="table' or 'mlp"):
        create_timestep_adaptive_weights("spline")
    with pytest.raises(UserError, match="--injector"):
        build_injector("both")
    assert build_injector("baseline") is None


@pytest.mark.parametrize("config", ALL_CONFIGS, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_fresh_injector_is_bit_exact_identity(config):
    injector = build_injector(config.pop("variant"), **config)
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        down, mid = sd2_like_residuals(dtype=dtype)
        for timesteps in (torch.tensor(981), torch.tensor([3, 999]), 500):
            new_down, new_mid = injector(down, mid, timesteps)
            assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(down, new_down))
            assert torch.equal(mid, new_mid) and new_mid.dtype == dtype


def test_injector_scales_each_residual_by_level_weight_times_w_t():
    injector = build_injector("timestep_multiscale", grouping="level", timestep_weights_shared=False)
    with torch.no_grad():
        injector.scale_weights.weights.copy_(torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0]))
        injector.timestep_weights.table.zero_()
        injector.timestep_weights.table[100] = torch.tensor([0.5, 0.5, 0.5, 0.5, 0.5])
        injector.timestep_weights.table[900] = torch.tensor([1.0, 1.0, 1.0, 1.0, 10.0])
    down, mid = sd2_like_residuals(batch=2)
    new_down, new_mid = injector(down, mid, torch.tensor([100, 900]))
    levels = list(SD2_RESIDUAL_LEVELS)
    for residual, scaled, level in zip(down, new_down, levels):
        scale = float(level + 1)
        torch.testing.assert_close(scaled[0], residual[0] * scale * 0.5)
        torch.testing.assert_close(scaled[1], residual[1] * scale * 1.0)
    torch.testing.assert_close(new_mid[0], mid[0] * 5.0 * 0.5)
    torch.testing.assert_close(new_mid[1], mid[1] * 5.0 * 10.0)

    # A scalar timestep (inference: one t for both halves of the guidance batch) scales the whole batch.
    scalar_down, scalar_mid = injector(down, mid, 100)
    torch.testing.assert_close(scalar_mid, mid * 2.5)


def test_injector_weights_stay_fp32_and_cast_to_residual_dtype():
    injector = build_injector("timestep_multiscale", timestep_weights="mlp")
    with torch.no_grad():
        injector.scale_weights.weights.fill_(1.0 + 2**-20)  # not representable in fp16 -> rounds to 1.0
    down, mid = sd2_like_residuals(dtype=torch.float16)
    new_down, new_mid = injector(down, mid, torch.tensor([1, 2]))
    assert all(parameter.dtype == torch.float32 for parameter in injector.parameters())
    assert new_mid.dtype == torch.float16 and torch.equal(new_mid, mid)


def test_injector_rejects_mismatched_inputs():
    injector = build_injector("timestep_only")
    down, mid = sd2_like_residuals(batch=2)
    with pytest.raises(UserError, match="12 down residuals"):
        injector(down[:-1], mid, 5)
    with pytest.raises(UserError, match="one per sample"):
        injector(down, mid, torch.tensor([1, 2, 3]))
    with pytest.raises(UserError, match="baseline"):
        MultiScaleInjector(use_scale_weights=False, timestep_weights_kind=None)


def test_weight_curves_for_plotting():
    injector = build_injector("timestep_multiscale", timestep_weights="table", timestep_weights_shared=False)
    t, weights, labels = injector.timestep_weight_curves()
    assert t.tolist() == list(range(1000))
    assert weights.shape == (1000, 5) and len(labels) == 5 and labels[-1] == "mid"


@pytest.mark.parametrize(
    "config",
    [
        dict(variant="timestep_multiscale", timestep_weights="table", grouping="level", timestep_weights_shared=False),
        dict(variant="timestep_multiscale", timestep_weights="mlp", grouping="tensor", timestep_weights_shared=True),
        dict(variant="timestep_only", timestep_weights="mlp", grouping="level", timestep_weights_shared=False),
        dict(variant="timestep_only", timestep_weights="table", grouping="tensor", timestep_weights_shared=True),
    ],
    ids=lambda c: "-".join(str(v) for v in c.values()),
)
def test_save_load_round_trip(tmp_path, config):
    torch.manual_seed(0)
    injector = build_injector(config.pop("variant"), **config)
    with torch.no_grad():
        for parameter in injector.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    folder = save_injector(injector, tmp_path / "checkpoint-10")
    assert folder == tmp_path / "checkpoint-10" / INJECTOR_FOLDER
    for name in (INJECTOR_BIN_NAME, INJECTOR_SAFETENSORS_NAME, INJECTOR_CONFIG_NAME):
        assert (folder / name).is_file()
    assert not list(folder.glob("*.tmp"))

    # The users' pytorch_model.bin is a plain state dict readable with weights_only=True.
    plain = torch.load(folder / INJECTOR_BIN_NAME, map_location="cpu", weights_only=True)
    assert set(plain) == set(injector.state_dict())
    assert all(key.startswith(("scale_weights.weights", "timestep_weights.")) for key in plain)

    loaded, messages = load_injector(tmp_path / "checkpoint-10")
    assert messages[0] == MESSAGE_INJECTOR_LOADED and MESSAGE_TIMESTEP_WEIGHTS_LOADED in messages
    assert loaded.config.grouping == injector.config.grouping
    assert loaded.variant == injector.variant
    for key, value in injector.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    down, mid = sd2_like_residuals()
    expected = injector(down, mid, torch.tensor([17, 830]))
    actual = loaded(down, mid, torch.tensor([17, 830]))
    assert all(torch.equal(a, b) for a, b in zip(expected[0] + [expected[1]], actual[0] + [actual[1]]))


def test_safetensors_preferred_then_bin_fallback(tmp_path):
    injector = build_injector("timestep_multiscale")
    folder = save_injector(injector, tmp_path)
    from safetensors.torch import save_file

    state = {key: value.clone() for key, value in injector.state_dict().items()}
    state["scale_weights.weights"].fill_(3.0)
    save_file(state, str(folder / INJECTOR_SAFETENSORS_NAME))
    loaded, _ = load_injector(tmp_path)
    assert torch.equal(loaded.scale_weights.weights, torch.full((5,), 3.0))
    (folder / INJECTOR_SAFETENSORS_NAME).unlink()
    loaded, messages = load_injector(tmp_path)
    assert torch.equal(loaded.scale_weights.weights, torch.ones(5))
    assert INJECTOR_BIN_NAME in messages[-1]


def test_old_checkpoint_without_injector_folder(tmp_path):
    (tmp_path / "controlnet").mkdir()
    injector, messages = load_injector(tmp_path)
    assert injector is None
    assert len(messages) == 1 and "identity" in messages[0] and INJECTOR_FOLDER in messages[0]


def test_old_checkpoint_with_scale_weights_only(tmp_path):
    folder = tmp_path / INJECTOR_FOLDER
    folder.mkdir()
    # The users' older format: only pytorch_model.bin, 13 per-residual weights, no config, no timestep part.
    torch.save({"scale_weights.weights": torch.linspace(0.5, 1.7, 13)}, folder / INJECTOR_BIN_NAME)
    injector, messages = load_injector(tmp_path)
    assert injector.timestep_weights is None and injector.variant is None  # no registered variant has s alone
    assert injector.config.grouping == "tensor"
    assert messages[0] == MESSAGE_INJECTOR_LOADED and MESSAGE_TIMESTEP_WEIGHTS_LOADED not in messages
    assert any("constant over timesteps" in message for message in messages)
    down, mid = sd2_like_residuals()
    _, new_mid = injector(down, mid, 400)
    torch.testing.assert_close(new_mid, mid * 1.7)

    # A config.json that promises timestep weights the file lacks: still loads, and says so.
    (folder / INJECTOR_CONFIG_NAME).write_text(json.dumps({"timestep_weights_kind": "table", "grouping": "tensor"}))
    injector, messages = load_injector(tmp_path)
    assert injector.timestep_weights is None
    assert any("scale weights only" in message for message in messages)


def test_load_errors_are_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_injector(tmp_path / "missing")
    folder = tmp_path / INJECTOR_FOLDER
    folder.mkdir()
    with pytest.raises(CheckpointError, match="found neither"):
        load_injector(tmp_path)
    torch.save({"scale_weights.weights": torch.ones(7)}, folder / INJECTOR_BIN_NAME)
    with pytest.raises(CheckpointError, match="expected 13 .* or 5"):
        load_injector(tmp_path)
    torch.save({"scale_weights.weights": torch.ones(5), "unet.conv.weight": torch.ones(1)}, folder / INJECTOR_BIN_NAME)
    with pytest.raises(CheckpointError, match="Unexpected keys"):
        load_injector(tmp_path)
    torch.save({"weights": torch.nn.Linear(2, 2)}, folder / INJECTOR_BIN_NAME)  # a pickled module
    with pytest.raises(CheckpointError, match="plain state dict"):
        load_injector(tmp_path)


def test_registry_is_the_variant_list_and_builds_each():
    assert INJECTORS.names() == ("baseline", "timestep_only", "timestep_multiscale")
    assert build_injector("timestep_only").variant == "timestep_only"
    injector = build_injector("timestep_multiscale", timestep_weights="mlp", grouping="tensor")
    assert (injector.variant, injector.scale_weights.weights.shape, injector.config.timestep_weights_kind) == (
        "timestep_multiscale", (13,), "mlp")
    assert build_injector("timestep_only").scale_weights is None


def test_saved_config_records_the_variant_and_loading_builds_from_it(tmp_path):
    """config.json names the variant and the constructor arguments; loading follows it, not the weights' shapes."""
    injector = build_injector("timestep_only", timestep_weights="mlp", mlp_hidden_dim=8, timestep_weights_shared=False)
    folder = save_injector(injector, tmp_path / "checkpoint-1")
    saved = json.loads((folder / INJECTOR_CONFIG_NAME).read_text())
    assert (saved["variant"], saved["_class_name"], saved["mlp_hidden_dim"], saved["grouping"]) == (
        "timestep_only", "MultiScaleInjector", 8, "level")
    loaded, messages = load_injector(tmp_path / "checkpoint-1")
    public = {key: value for key, value in injector.config.items() if not key.startswith("_")}
    assert {key: loaded.config[key] for key in public} == public and not any("older version" in m for m in messages)

    # A record that disagrees with the weights is an error (key/shape sniffing would have loaded them silently).
    (folder / INJECTOR_CONFIG_NAME).write_text(json.dumps({**saved, "mlp_hidden_dim": 16}))
    with pytest.raises(CheckpointError, match="do not fit"):
        load_injector(tmp_path / "checkpoint-1")
    (folder / INJECTOR_CONFIG_NAME).write_text(json.dumps({**saved, "variant": "timestep_spline"}))
    with pytest.raises(CheckpointError, match="'timestep_spline', which is not one of baseline, timestep_only"):
        load_injector(tmp_path / "checkpoint-1")


OLD_FORMAT_CONFIG = {  # config.json as save_injector wrote it before the variant was recorded
    "_class_name": "MultiScaleInjector", "_diffusers_version": "0.31.0", "grouping": "level",
    "mlp_embedding_dim": 128, "mlp_hidden_dim": 64, "num_train_timesteps": 1000,
    "residual_levels": [0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3], "table_bins": None, "timestep_weights_kind": "table",
    "timestep_weights_shared": False, "use_scale_weights": True,
}


def test_an_old_format_folder_loads_through_the_shape_fallback(tmp_path):
    from safetensors.torch import save_file

    folder = tmp_path / "checkpoint-7" / INJECTOR_FOLDER
    folder.mkdir(parents=True)
    state = {"scale_weights.weights": torch.linspace(0.5, 1.5, 5),
             "timestep_weights.table": torch.linspace(0.8, 1.2, 5000).view(1000, 5)}
    save_file(state, str(folder / INJECTOR_SAFETENSORS_NAME))
    torch.save(state, folder / INJECTOR_BIN_NAME)
    (folder / INJECTOR_CONFIG_NAME).write_text(json.dumps(OLD_FORMAT_CONFIG))
    injector, messages = load_injector(tmp_path / "checkpoint-7")
    assert injector.variant == "timestep_multiscale" and injector.config.grouping == "level"
    assert not injector.config.timestep_weights_shared and injector.timestep_weights.table.shape == (1000, 5)
    assert any("records no injector variant" in message for message in messages)
    down, mid = sd2_like_residuals()
    _, new_mid = injector(down, mid, torch.tensor([999, 0]))
    torch.testing.assert_close(new_mid[0], mid[0] * 1.5 * state["timestep_weights.table"][999, 4])
    torch.testing.assert_close(new_mid[1], mid[1] * 1.5 * state["timestep_weights.table"][0, 4])
    # Saved again, it carries the record and loads without the fallback.
    save_injector(injector, tmp_path / "checkpoint-8")
    again, messages = load_injector(tmp_path / "checkpoint-8")
    assert again.variant == "timestep_multiscale" and not any("records no" in m for m in messages)
