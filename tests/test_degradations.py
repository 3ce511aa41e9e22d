"""Real-ESRGAN-style degradation (kernels, noise, JPEG, determinism) and the SR datasets."""

import numpy as np
import pytest
import torch
from PIL import Image

from data.degradations import (
    DegradationConfig,
    add_gaussian_noise,
    add_poisson_noise,
    degrade,
    filter2d,
    gaussian_kernel,
    generalized_gaussian_kernel,
    jpeg_compress,
    plateau_kernel,
    random_blur_kernel,
    sinc_kernel,
    usm_sharpen,
)
from data.sr_pairs import (
    HRFolderDegradedDataset,
    PairedSRFolderDataset,
    SeeSRPreparedDataset,
    check_training_images,
    pair_by_stem,
)
from utils.errors import DataError, UserError


def smooth_image(size=64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, size // 8, size // 8, generator=generator)
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear")[0]


def test_degrade_is_deterministic_per_seed_and_sized_by_scale():
    hr = smooth_image(64)
    config = DegradationConfig()
    first = degrade(hr, config, np.random.default_rng(7))
    assert first.shape == (3, 16, 16)
    assert torch.equal(first, degrade(hr, config, np.random.default_rng(7)))
    assert not torch.equal(first, degrade(hr, config, np.random.default_rng(8)))
    assert 0.0 <= first.min() and first.max() <= 1.0
    torch.testing.assert_close(first * 255, (first * 255).round())  # 8-bit levels, as Real-ESRGAN's output
    outputs = [degrade(hr, DegradationConfig.seesr(), np.random.default_rng(seed)) for seed in range(6)]
    assert all(out.shape == (3, 16, 16) for out in outputs)
    assert degrade(torch.rand(3, 48, 32), DegradationConfig(scale=2), np.random.default_rng(0)).shape == (3, 24, 16)
    with pytest.raises(UserError, match="divisible by scale 4"):
        degrade(torch.rand(3, 30, 32), config, np.random.default_rng(0))


def test_kernels_are_normalised_and_shaped():
    iso = gaussian_kernel(21, 2.0, 2.0, 0.0)
    assert iso.shape == (21, 21) and abs(iso.sum() - 1) < 1e-9
    assert np.allclose(iso, iso.T) and np.allclose(iso, iso[::-1])
    aniso = gaussian_kernel(21, 4.0, 1.0, 0.0)
    assert aniso[10, 10 + 4] > aniso[10 + 4, 10]  # wide along x (columns), narrow along y
    rotated = gaussian_kernel(21, 4.0, 1.0, np.pi / 2)
    assert np.allclose(rotated, aniso.T)
    assert np.allclose(generalized_gaussian_kernel(21, 2.0, 3.0, 0.4, 1.0), gaussian_kernel(21, 2.0, 3.0, 0.4))
    plateau = plateau_kernel(21, 2.0, 2.0, 0.0, 2.0)
    assert abs(plateau.sum() - 1) < 1e-9 and plateau.argmax() == 220
    for seed in range(10):
        kernel = random_blur_kernel(np.random.default_rng(seed), DegradationConfig(), second=bool(seed % 2))
        assert kernel.shape == (21, 21) and abs(float(kernel.sum()) - 1) < 1e-5


def test_sinc_kernel_matches_the_bessel_formula():
    """Against scipy's J1 in float64. torch's ``special.bessel_j1`` is accurate to ~5e-7 absolute (measured against
    scipy on [0, 40]), which puts the normalised kernels within 8.6e-8 of scipy's (measured, these four cases, at 1
    and 2 threads); 1e-6 absolute is 11x that, while a wrong factor or centre value moves entries by more than 1e-4."""
    special = pytest.importorskip("scipy.special")
    for cutoff, size in ((1.7, 13), (0.7, 21), (3.0, 7), (1.0, 21)):
        kernel = sinc_kernel(cutoff, size)
        assert kernel.dtype == np.float64
        centre = (size - 1) / 2
        r = np.hypot(*np.meshgrid(np.arange(size) - centre, np.arange(size) - centre))
        with np.errstate(divide="ignore", invalid="ignore"):
            expected = cutoff * special.j1(cutoff * r) / (2 * np.pi * r)
        expected[size // 2, size // 2] = cutoff**2 / (4 * np.pi)
        np.testing.assert_allclose(kernel, expected / expected.sum(), rtol=0, atol=1e-6)
    padded = sinc_kernel(1.7, 13, pad_to=21)
    assert padded.shape == (21, 21) and np.allclose(padded[4:17, 4:17], sinc_kernel(1.7, 13))


def test_filter2d_pulse_is_identity_and_small_images_work():
    image = torch.rand(3, 10, 12)
    pulse = torch.zeros(21, 21)
    pulse[10, 10] = 1
    torch.testing.assert_close(filter2d(image, pulse), image)
    box = torch.zeros(21, 21)
    box[9:12, 9:12] = 1 / 9
    blurred = filter2d(image, box)
    torch.testing.assert_close(blurred[:, 5, 5], image[:, 4:7, 4:7].mean((1, 2)))
    tiny = torch.rand(3, 4, 4)  # smaller than the kernel: replicate padding instead of reflect
    assert filter2d(tiny, torch.from_numpy(gaussian_kernel(21, 3.0, 3.0, 0.0)).float()).shape == (3, 4, 4)


def test_noise_and_jpeg():
    image = torch.full((3, 32, 32), 0.5)
    generator = torch.Generator().manual_seed(0)
    grey = add_gaussian_noise(image, 10.0, True, generator) - image
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    colour = add_gaussian_noise(image, 10.0, False, generator) - image
    assert not torch.equal(colour[0], colour[1])
    # 3072 draws: the sample std is within 0.0005 of sigma (one standard error); measured 0.00073 for this seed, and
    # 0.008 is 11x that while a wrong scale (sigma instead of sigma/255, or 2 sigma) is off by 0.039 or more.
    assert abs(colour.std().item() - 10 / 255) < 0.008
    shot = add_poisson_noise(torch.rand(3, 32, 32, generator=generator), 1.0, True, generator)
    assert shot.shape == (3, 32, 32)
    grey_shot = add_poisson_noise(image, 1.0, True, generator) - image
    torch.testing.assert_close(grey_shot[0], grey_shot[2])

    photo = smooth_image(64, seed=3)
    high, low = jpeg_compress(photo, 100), jpeg_compress(photo, 5)
    # Quality 100 leaves only 4:2:0 chroma and 8-bit rounding (measured 0.0065), quality 5 ten times more (0.069).
    assert (high - photo).abs().mean() * 5 < (low - photo).abs().mean()


def test_config_round_trip_and_errors():
    config = DegradationConfig.params_realesrgan()  # SeeSR's dataloaders/params_realesrgan.yml
    assert config.jpeg_range == (60.0, 95.0) and config.second_blur_prob == 0.5 and not config.usm_sharpen
    assert DegradationConfig.from_dict(config.to_dict()) == config
    # make_paired_data.py: Real-ESRGAN x4plus ranges on the USM-sharpened GT.
    seesr = DegradationConfig.seesr()
    assert seesr.usm_sharpen and seesr.resize_range == (0.15, 1.5) and seesr.noise_range == (1.0, 30.0)
    assert seesr.jpeg_range == seesr.jpeg_range2 == (30.0, 95.0) and seesr.second_blur_prob == 0.8
    assert (seesr.resize_range2, seesr.noise_range2, seesr.poisson_scale_range2) == ((0.3, 1.2), (1.0, 25.0), (0.05, 2.5))
    assert DegradationConfig.from_dict(seesr.to_dict()) == seesr
    with pytest.raises(UserError, match="Unknown degradation options \\['blur_sigmaa'\\]"):
        DegradationConfig.from_dict({"blur_sigmaa": [0.2, 3]})
    with pytest.raises(UserError, match="Unknown blur kernel types"):
        DegradationConfig(kernel_list=("iso", "box"), kernel_prob=(0.5, 0.5))


def test_usm_sharpen_matches_the_two_dimensional_formula():
    """BasicSR's USMSharp with a full 51x51 kernel (OpenCV's sigma 8) against our separable passes."""
    image = smooth_image(64, seed=4)
    axis = torch.arange(51, dtype=torch.float64) - 25
    sigma = 0.3 * ((51 - 1) * 0.5 - 1) + 0.8
    assert sigma == pytest.approx(8.0)
    g = torch.exp(-(axis**2) / (2 * sigma**2))
    kernel = (torch.outer(g, g) / g.sum() ** 2).float()

    def blur(x):
        return torch.nn.functional.conv2d(torch.nn.functional.pad(x[:, None], (25,) * 4, mode="reflect"), kernel[None, None])[:, 0]

    residual = image - blur(image)
    soft = blur((residual.abs() * 255 > 10).float())
    expected = soft * (image + 0.5 * residual).clamp(0, 1) + (1 - soft) * image
    sharpened = usm_sharpen(image)
    # float32 summation order only (kornia's separable passes against one 51x51 conv): measured 9.8e-7 at 1 and 2
    # threads; 2e-5 is 20x that, and the sharpening itself moves pixels by more than 0.01 (below).
    torch.testing.assert_close(sharpened, expected, rtol=0, atol=2e-5)
    assert (sharpened - image).abs().max() > 0.01  # it does sharpen


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_hr_folder_dataset(tmp_path):
    rng = np.random.default_rng(0)
    for index in range(3):
        write_image(tmp_path / "hr" / f"img{index}.png", rng.integers(0, 256, (80, 72, 3), dtype=np.uint8))
    (tmp_path / "hr" / "img1.txt").write_text("cat,  grass\n")
    dataset = HRFolderDegradedDataset(tmp_path / "hr", resolution=32, seed=5)
    assert len(dataset) == 3
    sample = dataset[1]
    assert sample["lr_upsampled"].shape == (3, 32, 32) and sample["hr"].shape == (3, 32, 32)
    assert sample["lr"].shape == (3, 8, 8)
    assert 0 <= sample["lr_upsampled"].min() and sample["lr_upsampled"].max() <= 1
    assert -1 <= sample["hr"].min() and sample["hr"].max() <= 1 and sample["hr"].min() < 0
    assert sample["prompt"] == "cat, grass" and dataset[0]["prompt"] == ""
    again = dataset[1]
    assert all(torch.equal(sample[key], again[key]) for key in ("lr_upsampled", "hr", "lr"))

    # set_epoch: new crops and degradations every epoch, each a function of (seed, epoch, index) only.
    dataset.set_epoch(3)
    epoch_three = dataset[1]
    assert not torch.equal(epoch_three["lr"], sample["lr"])
    dataset.set_epoch(4)
    dataset[0]
    dataset.set_epoch(3)
    assert torch.equal(dataset[1]["lr"], epoch_three["lr"])
    dataset.epoch = None

    silent = HRFolderDegradedDataset(tmp_path / "hr", resolution=32, seed=5, null_prompt_ratio=1.0)
    assert silent[1]["prompt"] == ""
    batch = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2, shuffle=True)))
    assert batch["lr_upsampled"].shape == (2, 3, 32, 32) and len(batch["prompt"]) == 2

    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="bad.png"):
        HRFolderDegradedDataset(tmp_path / "broken", resolution=32)[0]
    padded = HRFolderDegradedDataset(tmp_path / "hr", resolution=96, seed=5)[0]  # 80x72: mirrored up to the crop
    assert padded["hr"].shape == (3, 96, 96) and padded["lr"].shape == (3, 24, 24)
    with pytest.raises(DataError, match="does not exist"):
        HRFolderDegradedDataset(tmp_path / "missing", resolution=32)
    with pytest.raises(UserError, match="divisible by 8"):
        HRFolderDegradedDataset(tmp_path / "hr", resolution=36)


def test_paired_folders_are_matched_by_stem_and_cropped_aligned(tmp_path):
    rng = np.random.default_rng(1)
    # Deliberately created out of order, with mixed extensions: pairing must follow the stems.
    for stem in ("b", "c", "a"):
        hr = rng.integers(0, 256, (64, 48, 3), dtype=np.uint8)
        lr = hr.reshape(16, 4, 12, 4, 3).mean((1, 3)).round().astype(np.uint8)  # exact 4x box downsample
        write_image(tmp_path / "HR" / f"{stem}.png", hr)
        write_image(tmp_path / "LR" / f"{stem}.png", lr)
    (tmp_path / "LR" / "b.txt").write_text("building")
    dataset = PairedSRFolderDataset(tmp_path / "LR", tmp_path / "HR", resolution=32, scale=4, seed=0)
    assert [lr.stem for lr, _ in dataset.pairs] == ["a", "b", "c"]
    assert all(lr.stem == hr.stem for lr, hr in dataset.pairs)
    for index in range(3):
        sample = dataset[index]
        hr01 = (sample["hr"] + 1) / 2
        box = torch.nn.functional.avg_pool2d(hr01[None], 4)[0]
        torch.testing.assert_close(box, sample["lr"], rtol=0, atol=0.6 / 255)  # the crops are aligned
        assert sample["lr_upsampled"].shape == (3, 32, 32)
    assert dataset[1]["prompt"] == "building"

    write_image(tmp_path / "LR" / "d.png", np.zeros((16, 12, 3), np.uint8))
    write_image(tmp_path / "HR" / "e.jpg", np.zeros((64, 48, 3), np.uint8))
    with pytest.raises(DataError, match="LR without HR: d; HR without LR: e"):
        PairedSRFolderDataset(tmp_path / "LR", tmp_path / "HR", resolution=32)


def test_paired_size_mismatch_and_duplicates(tmp_path):
    write_image(tmp_path / "LR" / "x.png", np.zeros((16, 16, 3), np.uint8))
    write_image(tmp_path / "HR" / "x.png", np.zeros((60, 64, 3), np.uint8))
    dataset = PairedSRFolderDataset(tmp_path / "LR", tmp_path / "HR", resolution=32)
    with pytest.raises(DataError, match="expected 4x its LR image"):
        dataset[0]
    files = [tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"]
    with pytest.raises(DataError, match="share the stem 'x'"):
        pair_by_stem(files, files[:1])


def test_seesr_prepared_folders_and_image_checks(tmp_path):
    """--root_folders: gt/ + sr_bicubic/ (+ tag/) per root, matched by stem, sr_bicubic is the ControlNet input."""
    rng = np.random.default_rng(2)
    for root, stems in (("a", ("2", "1")), ("b", ("3",))):
        for stem in stems:
            write_image(tmp_path / root / "gt" / f"{stem}.png", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
            write_image(tmp_path / root / "sr_bicubic" / f"{stem}.png", rng.integers(0, 256, (32, 40, 3), dtype=np.uint8))
    (tmp_path / "a" / "tag").mkdir()
    (tmp_path / "a" / "tag" / "1.txt").write_text("dog, grass")
    dataset = SeeSRPreparedDataset(f"{tmp_path / 'a'},{tmp_path / 'b'}", resolution=32, null_prompt_ratio=0.0, seed=0)
    assert [gt.name for _, gt, _, _ in dataset.items] == ["1.png", "2.png", "3.png"]
    dataset.check_images()
    sample = dataset[0]
    assert (sample["prompt"], sample["tag_source"]) == ("dog, grass", "file")
    assert dataset[2]["tag_source"] == "none" and sample["lr"].shape == (3, 8, 8)
    gt = torch.from_numpy(np.array(Image.open(tmp_path / "a/gt/1.png"))).permute(2, 0, 1).float() / 255
    sr = torch.from_numpy(np.array(Image.open(tmp_path / "a/sr_bicubic/1.png"))).permute(2, 0, 1).float() / 255
    left = next(x for x in range(0, 9, 4) if torch.allclose((sample["hr"] + 1) / 2, gt[:, :, x : x + 32], atol=1e-6))
    torch.testing.assert_close(sample["lr_upsampled"], sr[:, :, left : left + 32])  # the same crop of both
    assert SeeSRPreparedDataset(str(tmp_path / "a"), resolution=32, null_prompt_ratio=1.0, seed=0)[0]["tag_source"] == "null"
    with pytest.raises(DataError, match="lacks gt/ or sr_bicubic/"):
        SeeSRPreparedDataset(str(tmp_path / "missing"), resolution=32)

    # Found by the up-front check, before any model loads: the corrupt file and the too-small one, named.
    (tmp_path / "b" / "gt" / "4.png").write_bytes(b"not a png")
    write_image(tmp_path / "b" / "sr_bicubic" / "4.png", np.zeros((32, 40, 3), np.uint8))
    with pytest.raises(DataError, match="Bad GT training image: cannot read .*4.png"):
        SeeSRPreparedDataset(str(tmp_path / "b"), resolution=32).check_images()
    with pytest.raises(DataError, match="3.png is 40x32 px, smaller than 48x48 px, the training crop"):
        check_training_images([tmp_path / "b/gt/3.png"], (48, 48), "GT training image", " px, the training crop")


def test_kornia_laplacian_loss_equals_the_official_grouped_conv():
    """losses/gradient.py filters with kornia: the same values as Phaseformer's ``Gradient_Loss`` (grouped conv2d)."""
    from losses.gradient import LAPLACIAN_3X3, LaplacianGradientLoss

    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.rand(2, 3, 20, 24, generator=generator), torch.rand(2, 3, 20, 24, generator=generator)
    weight = torch.tensor(LAPLACIAN_3X3).expand(3, 1, 3, 3)
    official = torch.nn.functional.l1_loss(torch.nn.functional.conv2d(prediction, weight, groups=3),
                                           torch.nn.functional.conv2d(target, weight, groups=3))
    loss = LaplacianGradientLoss()
    # One depth-wise conv2d either way: measured identical; 1e-6 relative allows another summation order.
    torch.testing.assert_close(loss(prediction, target), official, rtol=1e-6, atol=0)
    assert loss.laplacian(prediction).shape == (2, 3, 18, 22)  # valid region, as the official (no padding)
    ramp = torch.arange(24.0).expand(1, 3, 20, 24) / 24  # linear: zero Laplacian
    assert loss.laplacian(ramp).abs().max() < 1e-6 and "kernel" not in loss.state_dict()
