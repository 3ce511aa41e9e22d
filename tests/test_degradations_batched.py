"""The Real-ESRGAN degradation batched on the device (data/degradations_batched.py) against the per-sample path."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from data.degradations import (
    DegradationConfig,
    DegradationParams,
    degrade,
    degrade_batch,
    filter2d,
    jpeg_compress,
    jpeg_pil,
    pad_per_sample,
    sample_degradation,
    usm_sharpen,
)
from data.degradations_batched import (
    degrade_on_device,
    degrade_training_batch,
    jpeg_tables,
    jpeg_torch,
    replicate_beyond_crops,
    use_device_degradation,
)
from data.sr_pairs import HRFolderDegradedDataset
from utils.errors import UserError


def photo_crops(count, size, seed):
    """Crops of scikit-image's colour photographs (bundled with the package: no download)."""
    from skimage import data as images

    photos = [torch.from_numpy(np.ascontiguousarray(getattr(images, name)()[..., :3])).permute(2, 0, 1).float() / 255
              for name in ("astronaut", "coffee", "chelsea")]
    rng = np.random.default_rng(seed)
    crops = []
    for index in range(count):
        photo = photos[index % 3]
        top, left = (int(rng.integers(0, side - size)) for side in photo.shape[-2:])
        crops.append(photo[:, top : top + size, left : left + size])
    return torch.stack(crops)


def draw(config, seeds):
    return [sample_degradation(config, np.random.default_rng(seed)) for seed in seeds]


def test_parameters_survive_the_data_loaders_collate():
    config = DegradationConfig.seesr()
    params = draw(config, range(5))
    batch = torch.utils.data.default_collate([p.to_tensors() for p in params])
    assert batch["kernel1"].shape == (5, 21, 21) and batch["resize1"].dtype == torch.float64
    back = DegradationParams.from_batch(batch)
    for original, restored in zip(params, back, strict=True):
        for name in ("noise_seed", "resize1", "mode1", "grey1", "gaussian1", "noise1", "quality1", "second_blur",
                     "resize2", "mode2", "noise2", "mode3", "quality2", "resize_first"):
            assert getattr(restored, name) == getattr(original, name)  # floats travel as float64: exact
            assert type(getattr(restored, name)) is type(getattr(original, name))
        assert torch.equal(restored.kernel1, original.kernel1) and torch.equal(restored.final_kernel, original.final_kernel)
    # The draws are the pipeline's: a seed gives what degrade() draws from it (same LR image, same code run twice).
    hr = photo_crops(1, 64, seed=0)[0]
    torch.testing.assert_close(degrade_batch(hr[None], draw(config, [3]), config)[0],
                               degrade(hr, config, np.random.default_rng(3)), rtol=0, atol=0)


def test_pad_per_sample_pads_each_crop_as_f_pad_would():
    images = torch.rand(3, 2, 12, 10)
    sizes = [(12, 10), (7, 9), (3, 4)]
    padded = pad_per_sample(images, sizes, pad=4, radii=[4, 4, 3])
    assert padded.shape == (3, 2, 20, 18)
    for index, ((h, w), mode, reach) in enumerate(zip(sizes, ("reflect", "reflect", "replicate"), (4, 4, 3))):
        crop = images[index, :, :h, :w]
        expected = F.pad(crop[None], (reach,) * 4, mode=mode)[0]
        offset = 4 - reach  # sample 2: only its own kernel's reach (3) is read, and 3 px is too small to reflect
        torch.testing.assert_close(padded[index, :, offset : offset + h + 2 * reach, offset : offset + w + 2 * reach],
                                   expected, rtol=0, atol=0)  # gathered copies of the same values
    # Beyond a crop, JPEG's padding: the last row and column repeated.
    repeated = replicate_beyond_crops(images, sizes)
    assert torch.equal(repeated[1, :, :7, :9], images[1, :, :7, :9])
    assert torch.equal(repeated[1, :, 11, 3], images[1, :, 6, 3]) and torch.equal(repeated[2, :, 0, 9], images[2, :, 0, 3])


def test_filter2d_with_one_kernel_per_sample_equals_one_call_per_sample():
    config = DegradationConfig()
    kernels = torch.stack([p.kernel1 for p in draw(config, range(4))])
    images = torch.rand(4, 3, 40, 36, generator=torch.Generator().manual_seed(0))
    sizes = [(40, 36), (25, 30), (9, 36), (14, 6)]
    batched = filter2d(images, kernels, sizes)
    for index, (h, w) in enumerate(sizes):
        alone = filter2d(images[index, :, :h, :w], kernels[index])
        # Measured identical at 1 and 2 threads; 1e-6 allows float32 sums in another order (kernels trimmed per call).
        torch.testing.assert_close(batched[index, :, :h, :w], alone, rtol=0, atol=1e-6)
        reference = F.conv2d(F.pad(images[index, :, :h, :w][:, None], (10,) * 4, mode="reflect" if min(h, w) > 10
                                   else "replicate"), kernels[index][None, None])[:, 0]
        if min(h, w) > 10:  # the plain conv2d reflect reference, with the kernel's zero rings
            torch.testing.assert_close(batched[index, :, :h, :w], reference, rtol=0, atol=1e-6)


def test_jpeg_tables_are_libjpegs():
    luma, chroma = jpeg_tables([50, 75, 100, 10])
    assert luma[0, 0, 0] == 16 and luma[0, 7, 7] == 99 and chroma[0, 0, 0] == 17 and chroma[0, 7, 7] == 99  # base
    assert luma[1, 0, 0] == 8 and luma[1, 0, 1] == 6 and chroma[1, 0, 0] == 9  # (16*50+50)//100, (11*50+50)//100
    assert torch.all(luma[2] == 1) and torch.all(chroma[2] == 1)
    assert luma[3, 0, 0] == 80 and luma[3, 7, 7] == 255  # scale 500, clipped to baseline's 255


def test_jpeg_torch_matches_libjpeg_error_and_is_independent_of_the_batch():
    photos = photo_crops(3, 128, seed=1)
    for quality in (30, 60, 95):
        ours = jpeg_torch(photos, [(128, 128)] * 3, [quality] * 3)
        theirs = torch.stack([jpeg_compress(photo, quality) for photo in photos])
        assert torch.equal(ours * 255, (ours * 255).round())  # 8-bit levels, as PIL's output
        error_ours, error_pil = (ours - photos).abs().mean().item(), (theirs - photos).abs().mean().item()
        # libjpeg codes with a fixed-point DCT: the mean error per image agrees to <= 1% (measured 0.07-0.4% on these
        # crops, 0.2-0.9% on whole photographs); 10% is what a quality off by ~10 or kornia's soft-rounding codec (8%
        # less error) would break.
        assert abs(error_ours / error_pil - 1) < 0.1, (quality, error_ours, error_pil)
        assert (ours - theirs).abs().mean() * 255 < 3.0  # pixel by pixel: measured 0.8-1.2 levels (DCT rounding)
    # Quality 100 on random colours: the error (46 levels) is all 4:2:0 chroma filtering, which matches libjpeg's
    # (2x2 means, triangle up-filter) to 0.59 level (measured); 6 is 10x that, and point-sampled chroma is 27 off.
    noise = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    ours = jpeg_torch(noise, [(64, 64)] * 3, [100] * 3)
    assert (ours - torch.stack([jpeg_compress(image, 100) for image in noise])).abs().mean() * 255 < 6.0
    # A crop inside a batch of larger crops gets what it gets alone (padding repeats its edge as libjpeg does).
    small = photos[0, :, :37, :50]
    batch = torch.zeros(2, 3, 128, 128)
    batch[0, :, :37, :50], batch[1] = small, photos[1]
    together = jpeg_torch(batch, [(37, 50), (128, 128)], [40, 70])
    torch.testing.assert_close(together[0, :, :37, :50], jpeg_torch(small[None], [(37, 50)], [40])[0],
                               rtol=0, atol=1e-6)  # the same per-block arithmetic; measured 0
    assert not torch.equal(jpeg_torch(small[None], [(37, 50)], [40]), jpeg_torch(small[None], [(37, 50)], [90]))


def test_batched_pipeline_is_the_per_sample_pipeline():
    """With PIL's JPEG, a batch of crops of different sizes gives what degrade() gives one image at a time."""
    config = DegradationConfig()
    hr = photo_crops(12, 64, seed=2)
    batched = degrade_batch(hr, draw(config, range(12)), config, jpeg=jpeg_pil)
    single = torch.stack([degrade(image, config, np.random.default_rng(seed)) for seed, image in enumerate(hr)])
    # Measured identical at 1 and 2 threads; the bound allows a few one-level rounding flips from float32 sums in
    # another order (grouped kernels), which a wrong crop, padding or parameter would exceed by far (>= 5 levels).
    assert (batched - single).abs().mean() * 255 < 0.05


def test_pipeline_steps_sizes_and_qualities_are_real_esrgans():
    """The JPEG backend sees every intermediate crop: stage 1 at ``int(H * resize1)``, the final JPEG at the LR size
    ([resize + sinc] first) or at ``int(H / scale * resize2)`` (JPEG first), each with its own quality."""
    config = DegradationConfig()
    params = draw(config, range(16))
    calls = []

    def recording_jpeg(images, sizes, qualities):
        calls.append((list(sizes), list(qualities)))
        return images

    degrade_batch(photo_crops(16, 64, seed=6), params, config, jpeg=recording_jpeg)
    stage1 = {quality: size for sizes, qualities in calls[:-2] for size, quality in zip(sizes, qualities, strict=True)}
    seen = {}
    for sizes, qualities in calls:
        for size, quality in zip(sizes, qualities, strict=True):
            seen.setdefault(quality, []).append(size)
    for p in params:
        assert (int(64 * p.resize1),) * 2 in seen[p.quality1]
        final = (16, 16) if p.resize_first else (int(16 * p.resize2),) * 2
        assert final in seen[p.quality2], (p.resize_first, p.resize2, seen[p.quality2])
    assert sum(len(sizes) for sizes, _ in calls) == 32 and stage1  # one stage-1 and one final JPEG per sample


def test_without_degradations_the_lr_image_is_the_area_downsampled_hr():
    """Known answer: near-pulse blur, no resize, zero noise, JPEG skipped, no final sinc, area resizing only: the LR
    image is the HR image area-downsampled by 4, at 8-bit levels."""
    gentle = {"kernel_list": ("iso",), "kernel_prob": (1.0,), "sinc_prob": 0.0, "blur_sigma": (0.2, 0.2),
              "kernel_list2": ("iso",), "kernel_prob2": (1.0,), "sinc_prob2": 0.0, "blur_sigma2": (0.2, 0.2)}
    config = DegradationConfig(resize_modes=("area",), resize_prob=(0, 0, 1), resize_prob2=(0, 0, 1),
                               gaussian_noise_prob=1.0, noise_range=(0.0, 0.0), gaussian_noise_prob2=1.0,
                               noise_range2=(0.0, 0.0), final_sinc_prob=0.0, **gentle)
    hr = photo_crops(4, 64, seed=7)
    lr = degrade_batch(hr, draw(config, range(4)), config, jpeg=lambda images, sizes, qualities: images)
    expected = F.avg_pool2d(hr, 4)
    # 8-bit rounding is half a level; beyond it the sigma-0.2 kernels' tails (weights ~4e-6) add 2.3e-5 level
    # (measured): 0.1 level more is 4000x that, and a wrong step (a blur, a bilinear resize) moves levels by more.
    assert (lr - expected).abs().max() * 255 < 0.6
    # With the final sinc filter always on: the area-downsampled HR filtered by each sample's own final kernel
    # (clamped, as the pipeline clamps its output; the sinc has negative lobes).
    config.final_sinc_prob = 1.0
    params = draw(config, range(4, 8))
    lr = degrade_batch(hr, params, config, jpeg=lambda images, sizes, qualities: images)
    expected = filter2d(F.avg_pool2d(hr, 4), torch.stack([p.final_kernel for p in params])).clamp(0, 1)
    assert (lr - expected).abs().max() * 255 < 0.6


def test_batched_degradation_is_deterministic_sized_and_8_bit():
    config = DegradationConfig.seesr()
    hr = photo_crops(4, 64, seed=3)
    params = draw(config, range(4))
    first = degrade_on_device(hr, params, config)
    assert first.shape == (4, 3, 16, 16)
    assert torch.equal(first, degrade_on_device(hr, params, config))  # same code, same process
    assert not torch.equal(first, degrade_on_device(hr, draw(config, range(4, 8)), config))
    assert 0 <= first.min() and first.max() <= 1 and torch.equal(first * 255, (first * 255).round())
    # A sample's LR image does not depend on its batch: alone it is the same (noise from its own seed); measured
    # identical, one level allowed for a float32 rounding flip.
    torch.testing.assert_close(degrade_on_device(hr[2:3], params[2:3], config)[0], first[2], rtol=0, atol=1.5 / 255)
    scale2 = DegradationConfig(scale=2)
    assert degrade_on_device(torch.rand(2, 3, 48, 32), draw(scale2, (0, 1)), scale2).shape == (2, 3, 24, 16)
    with pytest.raises(UserError, match="divisible by scale 4"):
        degrade_on_device(torch.rand(1, 3, 30, 32), draw(config, [0]), config)
    with pytest.raises(UserError, match="one set of degradation parameters per image"):
        degrade_on_device(hr, params[:2], config)


def image_statistics(lr, hr):
    """Per image: sharpness (mean |Laplacian| of the luma), noise (std of luma minus its 3x3 mean), JPEG blockiness
    (mean |step| across 8 px block boundaries over the mean elsewhere, minus 1) and distance to the area-downsampled HR."""
    luma = lr.mean(1, keepdim=True)
    laplacian = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3)
    sharpness = F.conv2d(luma, laplacian).abs().mean((1, 2, 3))
    noise = (luma - F.avg_pool2d(F.pad(luma, (1, 1, 1, 1), mode="replicate"), 3, 1)).std((1, 2, 3))
    steps = (luma[..., 1:] - luma[..., :-1]).abs().mean((1, 2))
    boundary = torch.arange(steps.shape[-1]) % 8 == 7
    blockiness = steps[:, boundary].mean(1) / steps[:, ~boundary].mean(1) - 1
    distance = (lr - F.interpolate(hr, size=lr.shape[-2:], mode="area")).abs().mean((1, 2, 3))
    return torch.stack([sharpness, noise, blockiness, distance], 1)


def test_batched_degradations_have_the_per_sample_distribution():
    """N=64 photo crops, make_paired_data.py's settings, each sample's parameters drawn once and run through both
    paths: the mean of each per-image statistic agrees. Tolerance: 10% of the per-sample mean (blockiness: 0.06
    absolute, its mean is ~0.16); measured at most 0.1% (blockiness: 0.0055), while two independent sets of 64 draws
    differ by 4-16%. Stronger JPEG, noise or blur move a statistic past the tolerance (checked below)."""
    config = DegradationConfig.seesr()
    hr = usm_sharpen(photo_crops(64, 128, seed=4))
    params = draw(config, range(64))
    per_sample = image_statistics(degrade_batch(hr, params, config, jpeg=jpeg_pil), hr).mean(0)
    batched = image_statistics(degrade_on_device(hr, params, config), hr).mean(0)
    tolerance = torch.tensor([0.1, 0.1, 0.0, 0.1]) * per_sample.abs() + torch.tensor([0.0, 0.0, 0.06, 0.0])
    assert torch.all((batched - per_sample).abs() < tolerance), (batched, per_sample)

    # The statistics tell degradations apart: each stronger setting moves its statistic past the tolerance (measured:
    # JPEG 10-30 raises blockiness by 0.31, noise x2 the noise statistic by 38%, blur sigma x2 lowers sharpness 18%).
    stronger = {
        2: DegradationConfig(usm_sharpen=True, jpeg_range=(10.0, 30.0), jpeg_range2=(10.0, 30.0)),
        1: DegradationConfig(usm_sharpen=True, noise_range=(2.0, 60.0), noise_range2=(2.0, 50.0),
                             poisson_scale_range=(0.1, 6.0), poisson_scale_range2=(0.1, 5.0)),
        0: DegradationConfig(usm_sharpen=True, blur_sigma=(0.4, 6.0), blur_sigma2=(0.4, 3.0)),
    }
    for statistic, other in stronger.items():
        moved = image_statistics(degrade_on_device(hr, draw(other, range(64)), other), hr).mean(0)
        assert (moved - per_sample).abs()[statistic] > tolerance[statistic], (statistic, moved, per_sample)


def write_image(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def test_dataset_on_device_mode_and_the_training_batch(tmp_path):
    from skimage import data as images

    photo = images.astronaut()
    for index in range(4):
        write_image(tmp_path / "hr" / f"img{index}.png", photo[index * 60 : index * 60 + 96, 100:196])
    config = DegradationConfig.seesr()
    workers = HRFolderDegradedDataset(tmp_path / "hr", resolution=64, degradation=config, seed=3)
    device = HRFolderDegradedDataset(tmp_path / "hr", resolution=64, degradation=config, seed=3, degrade_on_device=True)
    item = device[1]
    assert set(item) == {"hr", "degradation", "prompt", "tag_source", "path"} and item["hr"].shape == (3, 64, 64)
    batch = next(iter(torch.utils.data.DataLoader(device, batch_size=4, shuffle=False)))
    params = DegradationParams.from_batch(batch["degradation"])
    batch = degrade_training_batch(batch, config, torch.device("cpu"))
    assert batch["lr"].shape == (4, 3, 16, 16) and batch["lr_upsampled"].shape == (4, 3, 64, 64)
    assert "degradation" not in batch and batch["hr"].min() >= -1 and batch["hr"].max() <= 1
    references = [workers[index] for index in range(4)]
    # The USM target: the same function on a batch (kornia, channels as groups), measured <= 2e-7.
    torch.testing.assert_close(batch["hr"], torch.stack([r["hr"] for r in references]), rtol=0, atol=1e-5)
    # Each item drew the same crop and degradation in both modes: with PIL's JPEG the batch gives the workers' LR
    # (a few one-level rounding flips allowed, as above; measured identical).
    with_pil = degrade_batch((batch["hr"] + 1) / 2, params, config, jpeg=jpeg_pil)
    assert (with_pil - torch.stack([r["lr"] for r in references])).abs().mean() * 255 < 0.05
    assert (batch["lr"] - with_pil).abs().mean() * 255 < 15  # the torch codec instead: measured 3-6 levels


def test_degradation_device_choice():
    assert use_device_degradation("auto", torch.device("cuda")) and use_device_degradation("cuda", torch.device("cuda"))
    assert not use_device_degradation("auto", torch.device("cpu")) and not use_device_degradation("cpu", torch.device("cuda"))
    with pytest.raises(UserError, match="--degradation_device cuda needs training on a CUDA device"):
        use_device_degradation("cuda", torch.device("cpu"))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_batched_degradation_on_cuda_matches_the_cpu_distribution():
    config = DegradationConfig.seesr()
    hr = usm_sharpen(photo_crops(32, 128, seed=5))
    params = draw(config, range(32))
    on_cpu = image_statistics(degrade_on_device(hr, params, config), hr).mean(0)
    on_gpu = image_statistics(degrade_on_device(hr.cuda(), params, config).cpu(), hr).mean(0)
    # Only the noise streams differ (CUDA generators): the means agree as the per-sample and batched paths do.
    tolerance = torch.tensor([0.1, 0.1, 0.0, 0.1]) * on_cpu.abs() + torch.tensor([0.0, 0.0, 0.06, 0.0])
    assert torch.all((on_gpu - on_cpu).abs() < tolerance), (on_gpu, on_cpu)


def test_the_trainer_degrades_batches_on_the_device(tmp_path, monkeypatch):
    """--degradation_device cuda's loop, run on the CPU: the items carry kernels only and every batch is completed by
    degrade_training_batch before the loss (the choice itself is forced, as there is no GPU here)."""
    import data.degradations_batched as batched
    import train_seesr_timestep as train
    from data.demo_data import build_demo_image_folder
    from tests.sd2_tiny import build_tiny_sd2

    sd2 = build_tiny_sd2(tmp_path / "sd2", light_attention=True)
    hr = build_demo_image_folder(tmp_path / "HR", size=64, count=4, seed=0)
    seen = []

    def spy(batch, config, device):
        assert set(batch["degradation"]) >= {"kernel1", "noise_seed"} and "lr" not in batch
        out = degrade_training_batch(batch, config, device)
        seen.append(out["lr"].shape)
        return out

    monkeypatch.setattr(batched, "use_device_degradation", lambda choice, device: True)
    monkeypatch.setattr(batched, "degrade_training_batch", spy)
    result = train.main(train.parse_args([
        "--no_image_cross_attention", "--pretrained_model_path", str(sd2), "--train_data_dir", str(hr),
        "--output_dir", str(tmp_path / "run"), "--resolution", "64", "--train_batch_size", "2",
        "--conditioning_embedding_channels", "4", "8", "8", "8", "--lr_warmup_steps", "0", "--max_train_steps", "1",
        "--validation_steps", "0", "--checkpointing_steps", "100", "--device", "cpu", "--degradation_device", "cuda",
    ]))
    assert result["step"] == 1 and seen == [(2, 3, 16, 16)]
    assert len(result["history"]) == 1 and np.isfinite(result["history"][0][1])  # logged at the last step
