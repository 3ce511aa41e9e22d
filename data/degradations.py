"""Real-ESRGAN-style two-stage synthetic degradation, seeded, on CPU tensors one sample at a time.

Follows the "high-order degradation model" of Real-ESRGAN (Wang et al., ICCVW 2021; xinntao/Real-ESRGAN
``realesrgan/models/realesrgan_model.py`` + ``realesrgan/data/realesrgan_dataset.py``, kernels and noise from
XPixelGroup/BasicSR ``basicsr/data/degradations.py``), which SeeSR trains on (cswry/SeeSR
``dataloaders/realesrgan.py``, ``params_realesrgan.yml``):

1. blur (isotropic / anisotropic Gaussian, generalized Gaussian, plateau, or a 2-D sinc), random resize
   (up / down / keep; area, bilinear or bicubic), Gaussian or Poisson noise (colour or grey), JPEG;
2. the same again with its own ranges (blur only with ``second_blur_prob``), the resize targeting
   ``HR / scale * factor``;
3. resize to the LR size + final sinc filter and JPEG, in random order; clamp and round to 8 bit.

Differences from the references, on purpose: everything draws from one ``numpy.random.Generator`` (plus a
``torch.Generator`` seeded from it), so a seed gives the same LR image in any process or worker; it runs per
sample on the CPU inside a Dataset (Real-ESRGAN degrades whole batches on the GPU); JPEG goes through PIL
(libjpeg, 4:2:0 chroma subsampling like the reference's DiffJPEG and OpenCV) with the quality rounded to an
integer; reflect padding falls back to replicate on images smaller than the kernel (tiny test crops).

Which settings are which (``train_seesr_timestep.py --degradation``):

* ``DegradationConfig.seesr()`` (``seesr``, the default): how SeeSR makes its ControlNet training pairs
  (``utils_data/make_paired_data.py``): Real-ESRGAN x4plus's ranges (stage 1 resize 0.15-1.5, Gaussian noise
  sigma 1-30, Poisson 0.05-3, JPEG 30-95; stage 2 blur probability 0.8, resize 0.3-1.2, noise 1-25, Poisson
  0.05-2.5, JPEG 30-95; final sinc 0.8) applied to the USM-sharpened GT, which is also the training target
  (``usm_sharpen=True``: BasicSR's ``USMSharp``, weight 0.5, radius 50, threshold 10). make_paired_data.py also
  sets ``blur_kernel_size2 = 11``, which BasicSR's dataset never reads (both kernels are 7..21 px), so it is not
  a setting here.
* ``DegradationConfig()`` (``realesrgan``): the same Real-ESRGAN x4plus ranges
  (``options/train_realesrgan_x4plus.yml``) on the plain GT.
* ``DegradationConfig.dape()`` (``dape``): the milder ranges of SeeSR's ``dataloaders/params_realesrgan.yml``
  (resize 0.3-1.5, noise 1-15, JPEG 60-95; stage 2 blur 0.5, resize 0.6-1.2, noise 1-12, JPEG 60-100), which
  SeeSR uses only to train its degradation-aware tagger (DAPE), not the ControlNet.
"""

from __future__ import annotations

import dataclasses
import io
import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from utils.errors import UserError

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")
RESIZE_MODES = ("area", "bilinear", "bicubic")


@dataclass
class DegradationConfig:
    """Every knob of the two-stage degradation; defaults from Real-ESRGAN's x4plus training options."""

    scale: int = 4
    resize_modes: tuple[str, ...] = RESIZE_MODES
    # Blur kernels: odd sizes 7..max_kernel_size, padded to max_kernel_size.
    max_kernel_size: int = 21
    # First stage.
    kernel_list: tuple[str, ...] = KERNEL_TYPES
    kernel_prob: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob: float = 0.1
    blur_sigma: tuple[float, float] = (0.2, 3.0)
    betag_range: tuple[float, float] = (0.5, 4.0)
    betap_range: tuple[float, float] = (1.0, 2.0)
    resize_prob: tuple[float, float, float] = (0.2, 0.7, 0.1)  # up, down, keep
    resize_range: tuple[float, float] = (0.15, 1.5)
    gaussian_noise_prob: float = 0.5
    noise_range: tuple[float, float] = (1.0, 30.0)  # sigma on the 0..255 scale
    poisson_scale_range: tuple[float, float] = (0.05, 3.0)
    gray_noise_prob: float = 0.4
    jpeg_range: tuple[float, float] = (30.0, 95.0)
    # Second stage.
    second_blur_prob: float = 0.8
    kernel_list2: tuple[str, ...] = KERNEL_TYPES
    kernel_prob2: tuple[float, ...] = (0.45, 0.25, 0.12, 0.03, 0.12, 0.03)
    sinc_prob2: float = 0.1
    blur_sigma2: tuple[float, float] = (0.2, 1.5)
    betag_range2: tuple[float, float] = (0.5, 4.0)
    betap_range2: tuple[float, float] = (1.0, 2.0)
    resize_prob2: tuple[float, float, float] = (0.3, 0.4, 0.3)
    resize_range2: tuple[float, float] = (0.3, 1.2)
    gaussian_noise_prob2: float = 0.5
    noise_range2: tuple[float, float] = (1.0, 25.0)
    poisson_scale_range2: tuple[float, float] = (0.05, 2.5)
    gray_noise_prob2: float = 0.4
    jpeg_range2: tuple[float, float] = (30.0, 95.0)
    # Final sinc filter (else a pulse, i.e. no filtering).
    final_sinc_prob: float = 0.8
    # Unsharp masking of the HR crop before it is degraded; the sharpened crop is also the training target.
    usm_sharpen: bool = False

    def __post_init__(self):
        for name in ("kernel_list", "kernel_list2"):
            unknown = set(getattr(self, name)) - set(KERNEL_TYPES)
            if unknown:
                raise UserError(f"Unknown blur kernel types in {name}: {sorted(unknown)}; choose from {KERNEL_TYPES}.")
        for kinds, probs in (("kernel_list", "kernel_prob"), ("kernel_list2", "kernel_prob2")):
            if len(getattr(self, kinds)) != len(getattr(self, probs)):
                raise UserError(f"{probs} needs one probability per entry of {kinds}.")
        unknown_modes = set(self.resize_modes) - set(RESIZE_MODES)
        if unknown_modes:
            raise UserError(f"Unknown resize modes {sorted(unknown_modes)}; choose from {RESIZE_MODES}.")
        if self.scale < 1 or self.max_kernel_size % 2 == 0 or self.max_kernel_size < 7:
            raise UserError("Expected scale >= 1 and an odd max_kernel_size >= 7 in the degradation config.")

    @classmethod
    def seesr(cls) -> DegradationConfig:
        """SeeSR's ControlNet training pairs (``utils_data/make_paired_data.py``): x4plus ranges on the USM-sharpened GT."""
        return cls(usm_sharpen=True)

    @classmethod
    def dape(cls) -> DegradationConfig:
        """SeeSR's milder settings for training its tagger (``dataloaders/params_realesrgan.yml``)."""
        return cls(
            resize_range=(0.3, 1.5),
            noise_range=(1.0, 15.0),
            poisson_scale_range=(0.05, 2.0),
            jpeg_range=(60.0, 95.0),
            second_blur_prob=0.5,
            resize_range2=(0.6, 1.2),
            noise_range2=(1.0, 12.0),
            poisson_scale_range2=(0.05, 1.0),
            jpeg_range2=(60.0, 100.0),
        )

    @classmethod
    def from_dict(cls, values: dict) -> DegradationConfig:
        """Build from a (YAML) dict; unknown keys are an error naming them."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UserError(f"Unknown degradation options {unknown}; known options: {sorted(known)}.")
        return cls(**{key: tuple(value) if isinstance(value, list) else value for key, value in values.items()})

    def to_dict(self) -> dict:
        """Plain JSON/YAML-able dict (tuples as lists)."""
        values = dataclasses.asdict(self)
        return {key: list(value) if isinstance(value, tuple) else value for key, value in values.items()}


# ------------------------------------------------------------------------------------------------ kernels


def _kernel_grid(size: int) -> np.ndarray:
    """``[size, size, 2]`` (x, y) coordinates centred on the middle pixel."""
    axis = np.arange(size, dtype=np.float64) - (size - 1) / 2
    xx, yy = np.meshgrid(axis, axis)
    return np.stack([xx, yy], axis=-1)


def _covariance(sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    rotation = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    return rotation @ np.diag([sigma_x**2, sigma_y**2]) @ rotation.T


def _mahalanobis_squared(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    grid = _kernel_grid(size)
    inverse = np.linalg.inv(_covariance(sigma_x, sigma_y, theta))
    return np.einsum("...i,ij,...j->...", grid, inverse, grid)


def gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float) -> np.ndarray:
    """Normalised bivariate Gaussian ``exp(-d^2 / 2)`` (isotropic when ``sigma_x == sigma_y``)."""
    kernel = np.exp(-0.5 * _mahalanobis_squared(size, sigma_x, sigma_y, theta))
    return kernel / kernel.sum()


def generalized_gaussian_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised generalized Gaussian ``exp(-(d^2)^beta / 2)``; ``beta=1`` is the Gaussian."""
    kernel = np.exp(-0.5 * np.power(_mahalanobis_squared(size, sigma_x, sigma_y, theta), beta))
    return kernel / kernel.sum()


def plateau_kernel(size: int, sigma_x: float, sigma_y: float, theta: float, beta: float) -> np.ndarray:
    """Normalised plateau-shaped kernel ``1 / (1 + (d^2)^beta)``."""
    kernel = 1.0 / (np.power(_mahalanobis_squared(size, sigma_x, sigma_y, theta), beta) + 1.0)
    return kernel / kernel.sum()


def sinc_kernel(cutoff: float, size: int, pad_to: int = 0) -> np.ndarray:
    """Normalised circular low-pass (2-D sinc, ``cutoff * J1(cutoff r) / (2 pi r)``), zero-padded to ``pad_to``."""
    radius = np.sqrt((_kernel_grid(size) ** 2).sum(-1))
    with np.errstate(divide="ignore", invalid="ignore"):
        bessel = torch.special.bessel_j1(torch.from_numpy(cutoff * radius)).numpy()
        kernel = cutoff * bessel / (2 * np.pi * radius)
    kernel[size // 2, size // 2] = cutoff**2 / (4 * np.pi)  # the limit at r = 0
    kernel = kernel / kernel.sum()
    if pad_to > size:
        pad = (pad_to - size) // 2
        kernel = np.pad(kernel, ((pad, pad), (pad, pad)))
    return kernel


def _beta(rng: np.random.Generator, beta_range: tuple[float, float]) -> float:
    # As BasicSR: half the draws below 1, half above, whatever the range's width on each side.
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_mixed_kernel(
    rng: np.random.Generator,
    kernel_list,
    kernel_prob,
    size: int,
    sigma_range: tuple[float, float],
    betag_range: tuple[float, float],
    betap_range: tuple[float, float],
) -> np.ndarray:
    """One random blur kernel of the listed types (BasicSR ``random_mixed_kernels`` without kernel noise)."""
    probabilities = np.asarray(kernel_prob, dtype=np.float64)
    kind = kernel_list[int(rng.choice(len(kernel_list), p=probabilities / probabilities.sum()))]
    sigma_x = float(rng.uniform(*sigma_range))
    if kind.endswith("iso") and not kind.endswith("aniso"):
        sigma_y, theta = sigma_x, 0.0
    else:
        sigma_y = float(rng.uniform(*sigma_range))
        theta = float(rng.uniform(-math.pi, math.pi))
    if kind in ("iso", "aniso"):
        return gaussian_kernel(size, sigma_x, sigma_y, theta)
    if kind.startswith("generalized"):
        return generalized_gaussian_kernel(size, sigma_x, sigma_y, theta, _beta(rng, betag_range))
    return plateau_kernel(size, sigma_x, sigma_y, theta, _beta(rng, betap_range))


def random_blur_kernel(rng, config: DegradationConfig, second: bool) -> torch.Tensor:
    """A stage's kernel: sinc with ``sinc_prob``, else a mixed kernel; odd size 7..max, padded to max."""
    kernel_list = config.kernel_list2 if second else config.kernel_list
    kernel_prob = config.kernel_prob2 if second else config.kernel_prob
    sigma = config.blur_sigma2 if second else config.blur_sigma
    betag = config.betag_range2 if second else config.betag_range
    betap = config.betap_range2 if second else config.betap_range
    sinc_prob = config.sinc_prob2 if second else config.sinc_prob
    size = int(rng.choice(np.arange(7, config.max_kernel_size + 1, 2)))
    if rng.uniform() < sinc_prob:
        # Real-ESRGAN's cut-off range for kernel sizes 7..21: lower cut-offs only on the larger kernels.
        cutoff = rng.uniform(np.pi / 3, np.pi) if size < 13 else rng.uniform(np.pi / 5, np.pi)
        kernel = sinc_kernel(float(cutoff), size)
    else:
        kernel = random_mixed_kernel(rng, kernel_list, kernel_prob, size, sigma, betag, betap)
    pad = (config.max_kernel_size - size) // 2
    return torch.from_numpy(np.pad(kernel, ((pad, pad), (pad, pad)))).float()


# ------------------------------------------------------------------------------------------------ operations


def filter2d(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Convolve ``[C, H, W]`` with one ``[k, k]`` kernel (reflect padding, replicate when the image is smaller)."""
    # Zero rings from padding a small kernel to max_kernel_size contribute nothing; skipping them is exact and
    # makes the convolution up to 9x cheaper.
    def zero_border(k):
        return not (k[0].any() or k[-1].any() or k[:, 0].any() or k[:, -1].any())

    while kernel.shape[-1] > 1 and zero_border(kernel):
        kernel = kernel[1:-1, 1:-1]
    pad = kernel.shape[-1] // 2
    mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
    padded = F.pad(image[:, None], (pad, pad, pad, pad), mode=mode)
    return F.conv2d(padded, kernel[None, None].to(image.dtype))[:, 0]


def resize(image: torch.Tensor, size: tuple[int, int], mode: str) -> torch.Tensor:
    """Resize ``[C, H, W]`` to ``size`` (at least 1 px) with ``area``, ``bilinear`` or ``bicubic``."""
    size = (max(1, int(size[0])), max(1, int(size[1])))
    kwargs = {} if mode == "area" else {"align_corners": False}
    return F.interpolate(image[None], size=size, mode=mode, **kwargs)[0]


def bicubic_upsample(image: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bicubic resize of ``[C, H, W]`` or ``[B, C, H, W]`` in [0, 1] to ``size``, clamped (the ControlNet input)."""
    batch = image if image.ndim == 4 else image[None]
    out = F.interpolate(batch.float(), size=tuple(size), mode="bicubic", align_corners=False).clamp(0.0, 1.0)
    return out if image.ndim == 4 else out[0]


def _gaussian_kernel_1d(size: int, sigma: float = 0.0) -> torch.Tensor:
    """OpenCV's ``getGaussianKernel``: sigma <= 0 means ``0.3 * ((size - 1) / 2 - 1) + 0.8``."""
    if sigma <= 0:
        sigma = 0.3 * ((size - 1) * 0.5 - 1) + 0.8
    axis = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    kernel = torch.exp(-(axis**2) / (2 * sigma**2))
    return (kernel / kernel.sum()).float()


def _separable_blur(image: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``[C, H, W]`` convolved with ``outer(kernel, kernel)`` as two 1-D passes (reflect, or replicate on small images)."""
    pad = kernel.numel() // 2
    mode = "reflect" if min(image.shape[-2:]) > pad else "replicate"
    out = F.pad(image[:, None], (pad, pad, pad, pad), mode=mode)
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).to(image.dtype))
    return F.conv2d(out, kernel.view(1, 1, -1, 1).to(image.dtype))[:, 0]


def usm_sharpen(image: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking of ``[3, H, W]`` in [0, 1], as BasicSR's ``USMSharp`` (Real-ESRGAN's and SeeSR's GT).

    ``sharp = I + weight * (I - blur(I))`` where ``|I - blur(I)| * 255 > threshold``, blended through the blurred
    mask; the Gaussian is ``radius + 1`` px wide (odd) with OpenCV's default sigma (8 for radius 50).
    """
    size = radius + 1 if radius % 2 == 0 else radius
    kernel = _gaussian_kernel_1d(size)
    image = image.float()
    residual = image - _separable_blur(image, kernel)
    mask = ((residual.abs() * 255) > threshold).float()
    soft_mask = _separable_blur(mask, kernel)
    sharp = (image + weight * residual).clamp(0, 1)
    return soft_mask * sharp + (1 - soft_mask) * image


def _grey(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma, ``[1, H, W]`` (as torchvision's rgb_to_grayscale)."""
    weights = torch.tensor([0.299, 0.587, 0.114], dtype=image.dtype).view(3, 1, 1)
    return (image * weights).sum(0, keepdim=True)


def add_gaussian_noise(image, sigma: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, (sigma/255)^2) noise, the same on all channels when ``grey``; clamp to [0, 1]."""
    shape = (1, *image.shape[1:]) if grey else image.shape
    noise = torch.randn(shape, generator=generator, dtype=image.dtype) * (sigma / 255.0)
    return (image + noise).clamp(0.0, 1.0)


def _poisson_noise(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # As BasicSR: count the distinct 8-bit levels, use the next power of two as photon count scale.
    image = (image * 255.0).round().clamp(0, 255) / 255.0
    levels = 2.0 ** math.ceil(math.log2(max(len(torch.unique(image)), 2)))
    return torch.poisson(image * levels, generator=generator) / levels - image


def add_poisson_noise(image, scale: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Add shot noise (computed on the luma when ``grey``) times ``scale``; clamp to [0, 1]."""
    noise = _poisson_noise(_grey(image) if grey else image, generator)
    return (image + noise * scale).clamp(0.0, 1.0)


def jpeg_compress(image: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG round trip of ``[3, H, W]`` in [0, 1] through PIL at integer ``quality``."""
    array = (image.clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).permute(2, 0, 1).contiguous()


def _random_noise(image, rng, generator, gaussian_prob, noise_range, poisson_range, grey_prob) -> torch.Tensor:
    grey = bool(rng.uniform() < grey_prob)
    if rng.uniform() < gaussian_prob:
        return add_gaussian_noise(image, float(rng.uniform(*noise_range)), grey, generator)
    return add_poisson_noise(image, float(rng.uniform(*poisson_range)), grey, generator)


def _random_resize_factor(rng, probabilities, factor_range) -> float:
    direction = rng.choice(3, p=np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities))
    if direction == 0:
        return float(rng.uniform(1.0, factor_range[1]))
    if direction == 1:
        return float(rng.uniform(factor_range[0], 1.0))
    return 1.0


# ------------------------------------------------------------------------------------------------ pipeline


@torch.no_grad()
def degrade(hr: torch.Tensor, config: DegradationConfig, rng: np.random.Generator) -> torch.Tensor:
    """Degrade one HR image ``[3, H, W]`` in [0, 1] into its LR image ``[3, H/scale, W/scale]`` in [0, 1].

    All randomness comes from ``rng``: the same seed gives the same LR image.
    """
    if hr.ndim != 3 or hr.shape[0] != 3:
        raise UserError(f"Expected an RGB image tensor [3, H, W], found shape {tuple(hr.shape)}.")
    height, width = hr.shape[-2:]
    if height % config.scale or width % config.scale:
        raise UserError(f"Expected HR sides divisible by scale {config.scale}, found {height}x{width}.")
    generator = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
    modes = list(config.resize_modes)
    lr_size = (height // config.scale, width // config.scale)
    kernel1 = random_blur_kernel(rng, config, second=False)
    kernel2 = random_blur_kernel(rng, config, second=True)
    if rng.uniform() < config.final_sinc_prob:
        size = int(rng.choice(np.arange(7, config.max_kernel_size + 1, 2)))
        final_kernel = torch.from_numpy(
            sinc_kernel(float(rng.uniform(np.pi / 3, np.pi)), size, pad_to=config.max_kernel_size)
        ).float()
    else:
        final_kernel = None  # a pulse: no filtering

    out = hr.float()
    # First stage: blur, resize, noise, JPEG.
    out = filter2d(out, kernel1)
    factor = _random_resize_factor(rng, config.resize_prob, config.resize_range)
    mode = modes[int(rng.integers(len(modes)))]
    out = resize(out, (int(height * factor), int(width * factor)), mode)
    out = _random_noise(
        out, rng, generator, config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range,
        config.gray_noise_prob,
    )
    out = jpeg_compress(out, float(rng.uniform(*config.jpeg_range)))

    # Second stage: optional blur, resize relative to the LR size, noise.
    if rng.uniform() < config.second_blur_prob:
        out = filter2d(out, kernel2)
    factor = _random_resize_factor(rng, config.resize_prob2, config.resize_range2)
    mode = modes[int(rng.integers(len(modes)))]
    out = resize(out, (int(height / config.scale * factor), int(width / config.scale * factor)), mode)
    out = _random_noise(
        out, rng, generator, config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2,
        config.gray_noise_prob2,
    )

    # Resize to the LR size + final sinc, and JPEG, in either order (other orders give twisted lines, per
    # Real-ESRGAN).
    mode = modes[int(rng.integers(len(modes)))]
    quality = float(rng.uniform(*config.jpeg_range2))
    if rng.uniform() < 0.5:
        out = resize(out, lr_size, mode)
        if final_kernel is not None:
            out = filter2d(out, final_kernel)
        out = jpeg_compress(out, quality)
    else:
        out = jpeg_compress(out, quality)
        out = resize(out, lr_size, mode)
        if final_kernel is not None:
            out = filter2d(out, final_kernel)
    return (out * 255.0).round().clamp(0, 255) / 255.0
