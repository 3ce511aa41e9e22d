"""Phaseformer losses against hand computations and reference implementations, and the loss weighting."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ms_ssim, ssim
from torchvision.models.vgg import cfgs, make_layers

from losses import (
    CharbonnierLoss,
    LaplacianGradientLoss,
    MSSSIMLoss,
    PhaseformerLoss,
    VGGPerceptualLoss,
    WeightedLoss,
    ms_ssim_adaptive,
    optimizer_param_groups,
)
from losses.msssim import MS_SSIM_SCALE_WEIGHTS, msssim_levels
from utils.errors import UserError


def test_charbonnier_by_hand():
    prediction = torch.tensor([0.0, 0.004, -0.5, 0.2]).view(1, 1, 2, 2)
    target = torch.zeros(1, 1, 2, 2)
    eps = 1e-3
    expected = sum(math.sqrt(d * d + eps * eps) for d in (0.0, 0.004, -0.5, 0.2)) / 4
    assert CharbonnierLoss(eps)(prediction, target).item() == pytest.approx(expected, rel=1e-6)


def test_laplacian_gradient_loss_by_hand():
    impulse = torch.zeros(1, 3, 5, 5)
    impulse[..., 2, 2] = 1.0
    # Valid 3x3 response: -4 at the centre, 1 at the four neighbours, 0 at the corners: |.| sums to 8 over 9.
    assert LaplacianGradientLoss()(impulse, torch.zeros_like(impulse)).item() == pytest.approx(8 / 9)
    ramp = torch.linspace(0, 1, 6).view(1, 1, 1, 6).expand(1, 3, 6, 6)
    assert LaplacianGradientLoss()(ramp, torch.zeros_like(ramp)).item() == pytest.approx(0.0, abs=1e-6)  # linear


# Ours and pytorch_msssim are two float32 implementations of the same sums: measured differences up to 3e-7 at 1 and
# 2 threads; 5e-6 keeps a 10x margin and is still far below what a wrong window, weight or level changes (>1e-4).
MSSSIM_ABS = 5e-6


def test_msssim_scale_weights_are_wang_et_al_2003():
    """The five scale weights written out from Wang, Simoncelli and Bovik (2003), table 1 (pytorch_msssim's defaults):
    three and four scales (crops of 41..160 px) use the first ones renormalised; five scales agree with the library."""
    torch.manual_seed(0)
    x = torch.rand(1, 3, 176, 176)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    paper = (0.0448, 0.2856, 0.3001, 0.2363, 0.1333)
    for levels in (3, 4):
        weights = torch.tensor(paper[:levels])
        expected = ms_ssim(x, y, data_range=1.0, weights=(weights / weights.sum()).tolist())
        assert ms_ssim_adaptive(x, y, levels=levels).item() == pytest.approx(expected.item(), abs=MSSSIM_ABS)
    assert ms_ssim_adaptive(x, y).item() == pytest.approx(ms_ssim(x, y, data_range=1.0, weights=list(paper)).item(), abs=MSSSIM_ABS)


def test_msssim_levels_follow_the_image_size():
    assert [msssim_levels(side) for side in (10, 11, 20, 21, 40, 41, 160, 161, 512)] == [0, 1, 1, 2, 2, 3, 4, 5, 5]


def test_msssim_loss_matches_pytorch_msssim():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 176, 176)
    y = (x + 0.1 * torch.randn_like(x)).clamp(0, 1)
    # Five scales: exactly the library.
    assert MSSSIMLoss()(x, y).item() == pytest.approx(1 - ms_ssim(x, y, data_range=1.0).item(), abs=MSSSIM_ABS)
    # Two scales through our loop equal the library given the first two weights, renormalised.
    weights = torch.tensor(MS_SSIM_SCALE_WEIGHTS[:2])
    expected = ms_ssim(x, y, data_range=1.0, weights=(weights / weights.sum()).tolist())
    assert ms_ssim_adaptive(x, y, levels=2).item() == pytest.approx(expected.item(), abs=MSSSIM_ABS)
    # One scale (a 15 px crop) is plain SSIM.
    small_x, small_y = x[..., :15, :15], y[..., :15, :15]
    assert MSSSIMLoss()(small_x, small_y).item() == pytest.approx(1 - ssim(small_x, small_y, data_range=1.0).item(), abs=MSSSIM_ABS)
    assert MSSSIMLoss()(x, x).item() == pytest.approx(0.0, abs=MSSSIM_ABS)
    assert MSSSIMLoss(as_similarity=True)(x, y).item() == pytest.approx(ms_ssim(x, y, data_range=1.0).item(), abs=MSSSIM_ABS)
    with pytest.raises(UserError, match="too small"):
        MSSSIMLoss()(x[..., :8, :8], y[..., :8, :8])


@pytest.fixture(scope="module")
def vgg_file(tmp_path_factory):
    """Random weights in torchvision's VGG16 file layout (features.N.*), up to relu4_3."""
    torch.manual_seed(0)
    features = make_layers(cfgs["D"])[:23]
    path = tmp_path_factory.mktemp("vgg") / "vgg16-397923af.pth"
    torch.save({f"features.{key}": value for key, value in features.state_dict().items()}, path)
    return path, features.eval()


def test_perceptual_loss_matches_torchvision_vgg16_by_hand(vgg_file):
    path, reference = vgg_file
    loss = VGGPerceptualLoss(path)
    torch.manual_seed(1)
    prediction, target = torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 16)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    expected = 0.0
    x, y = (prediction - mean) / std, (target - mean) / std
    with torch.no_grad():
        for index, layer in enumerate(reference):
            x, y = layer(x), layer(y)
            if index in (3, 8, 15, 22):  # relu1_2, relu2_2, relu3_3, relu4_3
                expected += (x - y).abs().mean().item()
    assert loss(prediction, target).item() == pytest.approx(expected, rel=1e-5)
    assert all(not p.requires_grad for p in loss.parameters())
    loss.train()
    assert not any(module.training for module in loss.blocks.modules())
    prediction.requires_grad_(True)
    loss(prediction, target).backward()
    assert prediction.grad.abs().sum() > 0


def test_missing_vgg_weights_say_how_to_provide_them(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(UserError, match=r"--vgg_weights PATH.*--no_perceptual") as error:
        VGGPerceptualLoss()
    assert str(tmp_path / "hub" / "checkpoints" / "vgg16-397923af.pth") in str(error.value)
    with pytest.raises(UserError, match="does not exist"):
        VGGPerceptualLoss(tmp_path / "nowhere.pth")
    with pytest.raises(UserError, match="--no_perceptual"):
        PhaseformerLoss(vgg_weights=tmp_path / "nowhere.pth")


def test_weighted_loss_modes_by_hand():
    a, b = torch.tensor(2.0), torch.tensor(6.0)
    softmax = WeightedLoss(2, "softmax", init=[0.0, math.log(3.0)])
    assert softmax(a, b).item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    torch.testing.assert_close(softmax.weights(), torch.tensor([0.25, 0.75]))
    uncertainty = WeightedLoss(2, "uncertainty", init=[0.0, math.log(2.0)])
    assert uncertainty(a, b).item() == pytest.approx(0.5 * 2 + 0.5 * 0.5 * 6 + 0.5 * math.log(2.0))
    torch.testing.assert_close(uncertainty.weights(), torch.tensor([2 / 3, 1 / 3]))
    fixed = WeightedLoss(2, "fixed", init=[1.0, 3.0])
    assert fixed(a, b).item() == pytest.approx(0.25 * 2 + 0.75 * 6)
    assert WeightedLoss(4, "fixed")(*[torch.tensor(4.0)] * 4).item() == pytest.approx(4.0)
    # The reference's init: torch.rand(1, n), here from a seed.
    seeded = WeightedLoss(4, "softmax_frozen", seed=7)
    torch.testing.assert_close(seeded.raw_weights.data, torch.rand(1, 4, generator=torch.Generator().manual_seed(7)))
    assert seeded.weights().sum().item() == pytest.approx(1.0)


def test_collapse_warning_only_for_learned_weights():
    collapsed = WeightedLoss(3, "softmax", init=[8.0, 0.0, 0.0], names=["pixel", "gradient", "msssim"])
    warning = collapsed.collapse_warning()
    assert "collapsed onto 'pixel'" in warning and "--loss_weighting" in warning
    assert WeightedLoss(3, "softmax", init=[0.1, 0.0, 0.2]).collapse_warning() is None
    assert WeightedLoss(3, "softmax_frozen", init=[8.0, 0.0, 0.0]).collapse_warning() is None
    assert WeightedLoss(2, "fixed", init=[1.0, 0.0]).collapse_warning() is None


def images(seed: int = 0, size: int = 24):
    generator = torch.Generator().manual_seed(seed)
    target = torch.rand(2, 3, size, size, generator=generator)
    fake_b_L = (target + 0.1 * torch.randn(target.shape, generator=generator)).clamp(0, 1)
    fake_b_H = torch.rand(2, 3, 2 * size, 2 * size, generator=generator)
    return fake_b_L, fake_b_H, target


@pytest.mark.parametrize("mode", ["softmax", "uncertainty", "softmax_frozen", "fixed"])
def test_gradients_reach_loss_weights_only_in_learned_modes(mode):
    loss = PhaseformerLoss(mode, use_perceptual=False, seed=0)
    fake_b_L, fake_b_H, target = images()
    fake_b_L.requires_grad_(True)
    total, logs = loss(fake_b_L, fake_b_H, target)
    total.backward()
    groups = optimizer_param_groups(torch.nn.Linear(2, 2), loss, weight_decay=0.05)
    learned = loss.weight_parameters()
    if mode in ("softmax", "uncertainty"):
        assert len(learned) == 2 and all(p.grad is not None and p.grad.abs().sum() > 0 for p in learned)
        assert len(groups) == 2 and groups[1]["weight_decay"] == 0.0 and groups[1]["params"] == learned
    else:
        assert learned == [] and len(groups) == 1
        assert all(p.grad is None for p in loss.parameters())
    if mode == "softmax_frozen":
        assert not loss.term_weights.raw_weights.requires_grad
    assert fake_b_L.grad.abs().sum() > 0
    assert set(logs) == {f"{t}_{b}" for t in ("pixel", "gradient", "msssim") for b in "LH"} | {"loss_L", "loss_H", "loss"}
    assert all(not value.requires_grad for value in logs.values())
    weights = loss.weights_dict()
    assert set(weights) == {"w_pixel", "w_gradient", "w_msssim", "w_L", "w_H"}
    assert sum(weights[k] for k in ("w_pixel", "w_gradient", "w_msssim")) == pytest.approx(1.0)


def test_phaseformer_loss_composition_by_hand():
    loss = PhaseformerLoss("fixed", use_perceptual=False)
    fake_b_L, fake_b_H, target = images(1)
    total, logs = loss(fake_b_L, fake_b_H, target)
    target_2x = F.interpolate(target, scale_factor=2, mode="bilinear", align_corners=False)
    expected_branches = []
    for prediction, branch_target in ((fake_b_L, target), (fake_b_H, target_2x)):
        terms = [
            CharbonnierLoss()(prediction, branch_target),
            LaplacianGradientLoss()(prediction, branch_target),
            MSSSIMLoss()(prediction, branch_target),
        ]
        expected_branches.append(sum(terms) / 3)
    assert logs["loss_L"].item() == pytest.approx(expected_branches[0].item(), rel=1e-6)
    assert logs["loss_H"].item() == pytest.approx(expected_branches[1].item(), rel=1e-6)
    assert total.item() == pytest.approx(sum(expected_branches).item() / 2, rel=1e-6)
    # A given 2x target (h_target resize_gt) replaces the upsample.
    other_2x = torch.rand_like(target_2x)
    assert loss(fake_b_L, fake_b_H, target, other_2x)[1]["pixel_H"].item() == pytest.approx(CharbonnierLoss()(fake_b_H, other_2x).item())
    # The 1x output alone.
    alone, alone_logs = loss(fake_b_L, None, target)
    assert alone.item() == pytest.approx(expected_branches[0].item(), rel=1e-6) and "loss_H" not in alone_logs


def test_reference_flags_change_what_they_say():
    fake_b_L, fake_b_H, target = images(2)
    reference = PhaseformerLoss("fixed", use_perceptual=False, pixel_loss="smoothl1", msssim_as_similarity=True)
    terms = reference.branch_terms(fake_b_L, target)
    assert terms["pixel"].item() == pytest.approx(F.smooth_l1_loss(fake_b_L, target).item())
    assert terms["msssim"].item() == pytest.approx(ms_ssim_adaptive(fake_b_L, target).item())
    default = PhaseformerLoss("fixed", use_perceptual=False)
    signed = PhaseformerLoss("fixed", use_perceptual=False, value_range="signed")
    signed_reference = PhaseformerLoss("fixed", use_perceptual=False, value_range="signed_reference")
    as_signed = [x * 2 - 1 for x in (fake_b_L, fake_b_H, target)]
    # "signed" maps [-1, 1] back to [0, 1] before every term: same loss as [0, 1] inputs.
    assert signed(*as_signed)[0].item() == pytest.approx(default(fake_b_L, fake_b_H, target)[0].item(), rel=1e-5)
    # "signed_reference" feeds [-1, 1] unchanged, as the reference does: the pixel term doubles.
    ref_terms = signed_reference.branch_terms(as_signed[0], as_signed[2])
    assert ref_terms["pixel"].item() == pytest.approx(CharbonnierLoss()(as_signed[0], as_signed[2]).item())
    assert ref_terms["gradient"].item() == pytest.approx(2 * default.branch_terms(fake_b_L, target)["gradient"].item(), rel=1e-5)


def test_loss_weights_state_round_trip_excludes_vgg(vgg_file):
    path, _ = vgg_file
    loss = PhaseformerLoss("softmax", vgg_weights=path, seed=3)
    state = loss.weighting_state_dict()
    assert set(state) == {"term_weights.raw_weights", "branch_weights.raw_weights"}
    assert loss.term_names == ["pixel", "perceptual", "gradient", "msssim"]
    other = PhaseformerLoss("softmax", vgg_weights=path, seed=4)
    other.load_weighting_state_dict(state)
    torch.testing.assert_close(other.term_weights.weights(), loss.term_weights.weights())
    with pytest.raises(ValueError, match="do not match"):
        PhaseformerLoss("uncertainty", use_perceptual=False).load_weighting_state_dict(state)


def test_uncertainty_weighting_of_both_outputs_is_bounded_below():
    """Kendall's weighting per (output, term) with log-variance s_term + t_output: minimising over the weights alone
    reaches sum(0.5 + 0.5 log L) when the terms factorise, instead of falling without limit as nesting
    W2(W4(L), W4(H)) does once a term is below 1."""
    loss = PhaseformerLoss("uncertainty", use_perceptual=False)
    term_scale, branch_scale = torch.tensor([0.05, 0.02, 0.3]), torch.tensor([1.0, 0.5])
    fixed_terms = {branch: dict(zip(loss.term_names, term_scale * b)) for branch, b in zip(("L", "H"), branch_scale)}
    optimizer = torch.optim.Adam(loss.weight_parameters(), lr=0.05)
    for _ in range(1500):
        optimizer.zero_grad()
        total = loss._uncertainty_total(fixed_terms)
        total.backward()
        optimizer.step()
    products = torch.outer(branch_scale, term_scale)
    assert total.item() == pytest.approx((0.5 + 0.5 * products.log()).sum().item(), abs=1e-3)
    # By hand: s = (0.2, 0, -0.1), t = (0.3, -0.4); only pixel_L = 0.5 is non-zero, so the data part is
    # 0.5 * exp(-(0.2 + 0.3)) * 0.5 and the regulariser 0.5 * sum(s_i + t_b) = 0.5 * (1.0 - 1.1).
    fresh = PhaseformerLoss("uncertainty", use_perceptual=False, term_init={"msssim": -0.1, "pixel": 0.2, "gradient": 0.0},
                            branch_init=[0.3, -0.4])  # initial values by name, in any order
    zero = torch.zeros(())
    value = fresh._uncertainty_total({"L": {"pixel": torch.tensor(0.5), "gradient": zero, "msssim": zero},
                                      "H": {"pixel": zero, "gradient": zero, "msssim": zero}})
    assert value.item() == pytest.approx(0.25 * math.exp(-0.5) + 0.5 * (1.0 - 1.1), abs=1e-6)


def test_ssim_and_contrast_match_pytorch_msssim_at_every_scale_count():
    """Our per-scale SSIM (small crops) equals the library's where both apply: 1-5 scales at 176 px."""
    from losses.msssim import ssim_and_contrast

    torch.manual_seed(3)
    x = torch.rand(2, 3, 176, 176)
    y = (x + 0.2 * torch.randn_like(x)).clamp(0, 1)
    ssim_per_channel, _ = ssim_and_contrast(x, y)
    # Same arithmetic in another order: float32 rounding (measured < 1e-7).
    assert ssim_per_channel.mean().item() == pytest.approx(ssim(x, y, data_range=1.0).item(), abs=1e-5)
    for levels in range(1, 5):  # five scales are the library's own call, with its weights as published
        weights = torch.tensor(MS_SSIM_SCALE_WEIGHTS[:levels])
        expected = ms_ssim(x, y, data_range=1.0, weights=(weights / weights.sum()).tolist())
        # Measured: at most 1.8e-7 apart (float32 rounding); a window of sigma 1.4 instead of 1.5 moves it by 1e-3.
        assert ms_ssim_adaptive(x, y, levels=levels).item() == pytest.approx(expected.item(), abs=2e-6)
