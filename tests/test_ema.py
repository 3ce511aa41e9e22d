import pytest
import torch

from utils.ema import EMA


def test_warmup_decay_follows_the_power_law():
    model = torch.nn.Linear(2, 2)
    ema = EMA(model, decay=0.9999, warmup=True, power=0.75)
    for _step in range(1, 1001):
        ema.update(model)
    # diffusers: step counts from the second update; decay = 1 - (1 + step) ** -power
    assert ema.current_decay == pytest.approx(1 - (1 + 999) ** -0.75)
    assert ema.current_decay < 0.9999


def test_average_tracks_the_weights_and_swaps_in_for_sampling():
    model = torch.nn.Linear(3, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # first update copies (decay 0 at step 1)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # decay min(0.5, (1+1)/(10+1)) = 0.18...; average = 3 - 0.1818 * 2
    expected = 3.0 - (2 / 11) * 2.0
    torch.testing.assert_close(ema.weights()["weight"], torch.full((1, 3), expected))
    with ema.averaged_weights(model):
        torch.testing.assert_close(model.weight.detach(), torch.full((1, 3), expected))
    torch.testing.assert_close(model.weight.detach(), torch.full((1, 3), 3.0))  # live weights restored
    assert torch.equal(ema.averaged_state_dict(model)["weight"], ema.weights()["weight"])


def test_state_round_trip_by_parameter_name():
    model = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.ReLU(), torch.nn.Linear(4, 1))
    ema = EMA(model, decay=0.9)
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ema.update(model)
    state = ema.state_dict()
    assert set(state["weights"]) == {"0.weight", "0.bias", "2.weight", "2.bias"}
    fresh = EMA(model, decay=0.9)
    fresh.load_state_dict(state)
    assert fresh.step_count == 5
    for name, tensor in ema.weights().items():
        assert torch.equal(fresh.weights()[name], tensor)
    with pytest.raises(KeyError, match="lacks 1 parameters"):
        del state["weights"]["2.bias"]
        fresh.load_state_dict(state)


def test_foreach_lerp_update_matches_diffusers_emamodel_step():
    """Our one-kernel lerp update against diffusers' own ``EMAModel.step`` (both foreach and per-tensor), with the
    warm-up decay, a frozen parameter and weights that move every step. Same arithmetic (bit-identical on the CPU,
    measured); the 1e-6 tolerance leaves room for a fused multiply-add in a GPU's lerp kernel."""
    from diffusers.training_utils import EMAModel

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
    model[1].bias.requires_grad_(False)
    ours = EMA(model, decay=0.999, warmup=True, power=0.75)
    theirs = {
        foreach: EMAModel(list(model.parameters()), decay=0.999, use_ema_warmup=True, power=0.75, foreach=foreach)
        for foreach in (True, False)
    }
    for _ in range(20):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        ours.update(model)
        for averager in theirs.values():
            averager.step(list(model.parameters()))
    assert ours.step_count == 20 and ours.current_decay == theirs[True].get_decay(20)
    for averager in theirs.values():
        for name, shadow in zip(ours.names, averager.shadow_params):
            # Two float32 implementations (lerp_ vs diffusers' sub_/mul_) over 20 steps: measured 1e-7; 1e-5 is 100x.
            torch.testing.assert_close(ours.weights()[name], shadow, rtol=1e-5, atol=1e-5)
    # the frozen bias is copied, not averaged; the others differ from the live weights (they are averages)
    assert torch.equal(ours.weights()["1.bias"], model[1].bias)
    assert not torch.allclose(ours.weights()["0.weight"], model[0].weight, atol=1e-2)
