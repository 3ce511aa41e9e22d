"""Real-ESRGAN-style two-stage synthetic degradation, seeded, per sample (data-loader workers) or batched.

Follows the "high-order degradation model" of Real-ESRGAN (Wang et al., ICCVW 2021; xinntao/Real-ESRGAN
``realesrgan/models/realesrgan_model.py`` + ``realesrgan/data/realesrgan_dataset.py``, kernels and noise from
XPixelGroup/BasicSR ``basicsr/data/degradations.py``), which SeeSR trains on (cswry/SeeSR
``dataloaders/realesrgan.py``, ``params_realesrgan.yml``):

1. blur (isotropic / anisotropic Gaussian, generalized Gaussian, plateau, or a 2-D sinc), random resize
   (up / down / keep; area, bilinear or bicubic), Gaussian or Poisson noise (colour or grey), JPEG;
2. the same again with its own ranges (blur only with ``second_blur_prob``), the resize targeting
   ``HR / scale * factor``;
3. resize to the LR size + final sinc filter and JPEG, in random order; clamp and round to 8 bit.

How it runs: :func:`sample_degradation` draws every random choice of a sample (:class:`DegradationParams`: kernels,
factors, modes, noise, qualities, order) before any pixel is touched; :func:`degrade_batch` applies them to a batch
whose samples may differ in size between the first resize and the last (each sample is a crop of one tensor; the
blur and JPEG run on groups of similar sizes, resizing and noise per crop). :func:`degrade` is a batch of one, in a
data-loader worker on the CPU with PIL's JPEG; :mod:`data.degradations_batched` runs the same pipeline on the
training device with a batched JPEG codec, as Real-ESRGAN degrades whole batches on the GPU. Filtering and colour
conversion are kornia's (``filters.filter2d``, ``filters.filter2d_separable``, ``color.rgb_to_grayscale``).

Differences from the references, on purpose: everything draws from one ``numpy.random.Generator`` (plus a
``torch.Generator`` seeded from it), so a seed gives the same LR image in any process or worker; every choice is
per sample (Real-ESRGAN's batched ``feed_data`` draws the resize, noise kind and order once per batch); JPEG goes
through PIL (libjpeg, 4:2:0 chroma subsampling like the reference's DiffJPEG and OpenCV) with the quality rounded
to an integer; reflect padding falls back to replicate on images smaller than the kernel (tiny test crops).

Which settings are which (``train_seesr_timestep.py --degradation``, ``scripts/make_paired_data*.py``):

* ``DegradationConfig.seesr()`` (``seesr``, the default): how SeeSR makes its ControlNet training pairs
  (``utils_data/make_paired_data.py``): Real-ESRGAN x4plus's ranges (stage 1 resize 0.15-1.5, Gaussian noise
  sigma 1-30, Poisson 0.05-3, JPEG 30-95; stage 2 blur probability 0.8, resize 0.3-1.2, noise 1-25, Poisson
  0.05-2.5, JPEG 30-95; final sinc 0.8) applied to the USM-sharpened GT, which is also the training target
  (``usm_sharpen=True``: BasicSR's ``USMSharp``, weight 0.5, radius 50, threshold 10). make_paired_data.py also
  sets ``blur_kernel_size2 = 11``, which BasicSR's dataset never reads (both kernels are 7..21 px), so it is not
  a setting here.
* ``DegradationConfig()`` (``realesrgan``): the same Real-ESRGAN x4plus ranges
  (``options/train_realesrgan_x4plus.yml``) on the plain GT.
* ``DegradationConfig.dape()`` (``dape``): the data SeeSR trains its degradation-aware tagger (DAPE) on, as
  ``utils_data/make_paired_data_DAPE.py`` makes it: the same x4plus ranges and USM GT as ``seesr``, but each GT is
  the whole image resized to the crop size with PIL's LANCZOS (aspect ratio not kept, no flip: SeeSR's
  ``dataloaders/simple_dataset.py``) instead of a random crop (``resize_whole=True``).
* ``DegradationConfig.params_realesrgan()``: the milder ranges of SeeSR's ``dataloaders/params_realesrgan.yml``
  (resize 0.3-1.5, noise 1-15, JPEG 60-95; stage 2 blur 0.5, resize 0.6-1.2, noise 1-12, JPEG 60-100). Only
  ``dataloaders/realesrgan.py`` reads that file, and neither SeeSR trainer uses it (``dape.yaml`` reads the
  folders make_paired_data_DAPE.py writes); kept for ``--degradation_options`` users who want those ranges.
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
    # The GT is the whole image resized to the crop size (PIL LANCZOS, no flip), not a random crop: SeeSR's DAPE data.
    resize_whole: bool = False

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
        """SeeSR's DAPE training data (``utils_data/make_paired_data_DAPE.py``): x4plus ranges on the USM-sharpened GT,
        each GT the whole image resized to the crop size with LANCZOS."""
        return cls(usm_sharpen=True, resize_whole=True)

    @classmethod
    def params_realesrgan(cls) -> DegradationConfig:
        """The milder ranges of SeeSR's ``dataloaders/params_realesrgan.yml`` (no SeeSR trainer reads them)."""
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


# ------------------------------------------------------------------------------------------------ parameters


@dataclass
class DegradationParams:
    """Every random choice of one sample's degradation, drawn before any pixel is touched.

    Drawing them apart from the image lets the data-loader workers draw them (cheap, per sample, seeded) while the
    pixel work runs batched on the training device (:mod:`data.degradations_batched`), as Real-ESRGAN's dataset
    draws the kernels and its model's ``feed_data`` degrades the batch on the GPU.
    """

    noise_seed: int
    kernel1: torch.Tensor  # [K, K], K = max_kernel_size
    kernel2: torch.Tensor
    final_kernel: torch.Tensor  # a pulse when there is no final sinc filter
    resize1: float
    mode1: int  # index into config.resize_modes
    grey1: bool
    gaussian1: bool  # else Poisson
    noise1: float  # sigma (0..255 scale) or Poisson scale
    quality1: int
    second_blur: bool
    resize2: float
    mode2: int
    grey2: bool
    gaussian2: bool
    noise2: float
    mode3: int
    quality2: int
    resize_first: bool  # final step: [resize + sinc] then JPEG, else JPEG then [resize + sinc]

    TENSOR_FIELDS = ("kernel1", "kernel2", "final_kernel")

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """Plain tensors that the DataLoader's default collate stacks into a batch (floats kept in float64)."""
        values = {}
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name in self.TENSOR_FIELDS:
                values[field.name] = value
            elif isinstance(value, float):
                values[field.name] = torch.tensor(value, dtype=torch.float64)
            else:
                values[field.name] = torch.tensor(int(value), dtype=torch.int64)
        return values

    @classmethod
    def from_batch(cls, batch: dict[str, torch.Tensor]) -> list[DegradationParams]:
        """Undo ``to_tensors`` + collate: one ``DegradationParams`` per sample of a batch."""
        size = len(batch["noise_seed"])
        kinds = {field.name: field.type for field in dataclasses.fields(cls)}
        columns = {}
        for name, kind in kinds.items():
            if name in cls.TENSOR_FIELDS:
                columns[name] = list(batch[name].float())
            else:
                cast = {"int": int, "float": float, "bool": bool}[kind]
                columns[name] = [cast(value) for value in batch[name].tolist()]
        return [cls(**{name: columns[name][index] for name in kinds}) for index in range(size)]


def _final_sinc_kernel(rng, config: DegradationConfig) -> torch.Tensor:
    size = int(rng.choice(np.arange(7, config.max_kernel_size + 1, 2)))
    return torch.from_numpy(
        sinc_kernel(float(rng.uniform(np.pi / 3, np.pi)), size, pad_to=config.max_kernel_size)
    ).float()


def _random_noise_choice(rng, gaussian_prob, noise_range, poisson_range, grey_prob) -> tuple[bool, bool, float]:
    grey = bool(rng.uniform() < grey_prob)
    if rng.uniform() < gaussian_prob:
        return grey, True, float(rng.uniform(*noise_range))
    return grey, False, float(rng.uniform(*poisson_range))


def sample_degradation(config: DegradationConfig, rng: np.random.Generator) -> DegradationParams:
    """Draw one sample's degradation from ``rng`` (in the order the pipeline has always drawn it)."""
    noise_seed = int(rng.integers(0, 2**62))
    kernel1 = random_blur_kernel(rng, config, second=False)
    kernel2 = random_blur_kernel(rng, config, second=True)
    if rng.uniform() < config.final_sinc_prob:
        final_kernel = _final_sinc_kernel(rng, config)
    else:
        final_kernel = torch.zeros(config.max_kernel_size, config.max_kernel_size)
        final_kernel[config.max_kernel_size // 2, config.max_kernel_size // 2] = 1.0
    modes = len(config.resize_modes)
    resize1 = _random_resize_factor(rng, config.resize_prob, config.resize_range)
    mode1 = int(rng.integers(modes))
    grey1, gaussian1, noise1 = _random_noise_choice(
        rng, config.gaussian_noise_prob, config.noise_range, config.poisson_scale_range, config.gray_noise_prob
    )
    quality1 = int(round(float(rng.uniform(*config.jpeg_range))))
    second_blur = bool(rng.uniform() < config.second_blur_prob)
    resize2 = _random_resize_factor(rng, config.resize_prob2, config.resize_range2)
    mode2 = int(rng.integers(modes))
    grey2, gaussian2, noise2 = _random_noise_choice(
        rng, config.gaussian_noise_prob2, config.noise_range2, config.poisson_scale_range2, config.gray_noise_prob2
    )
    mode3 = int(rng.integers(modes))
    quality2 = int(round(float(rng.uniform(*config.jpeg_range2))))
    resize_first = bool(rng.uniform() < 0.5)
    return DegradationParams(
        noise_seed, kernel1, kernel2, final_kernel, resize1, mode1, grey1, gaussian1, noise1, quality1, second_blur,
        resize2, mode2, grey2, gaussian2, noise2, mode3, quality2, resize_first,
    )


def _random_resize_factor(rng, probabilities, factor_range) -> float:
    direction = rng.choice(3, p=np.asarray(probabilities, dtype=np.float64) / np.sum(probabilities))
    if direction == 0:
        return float(rng.uniform(1.0, factor_range[1]))
    if direction == 1:
        return float(rng.uniform(factor_range[0], 1.0))
    return 1.0


# ------------------------------------------------------------------------------------------------ operations
#
# The pipeline runs on a batch ``[B, C, H, W]`` whose samples may have different sizes after a random resize: each
# sample's image is the top-left ``sizes[i]`` of the tensor. Per-sample work (resizing, noise) loops over those
# crops; the heavy work (blur, JPEG, USM) runs on the whole tensor at once. A batch of one is the per-sample path.

Sizes = list[tuple[int, int]]


def _crops(images: torch.Tensor, sizes: Sizes) -> list[torch.Tensor]:
    return [image[:, :height, :width] for image, (height, width) in zip(images, sizes, strict=True)]


def _stack(crops: list[torch.Tensor]) -> tuple[torch.Tensor, Sizes]:
    """Crops of any sizes as one tensor, each crop replicate-padded at the bottom and right to the largest size."""
    sizes = [tuple(crop.shape[-2:]) for crop in crops]
    height, width = max(h for h, _ in sizes), max(w for _, w in sizes)
    if all(size == (height, width) for size in sizes):
        return torch.stack(crops), sizes
    padded = [F.pad(crop[None], (0, width - w, 0, height - h), mode="replicate")[0] for crop, (h, w) in
              zip(crops, sizes, strict=True)]
    return torch.stack(padded), sizes


def _border_index(length: int, valid: int, pad: int, reflect: bool, device) -> torch.Tensor:
    """Source positions in ``[0, valid)`` for output positions ``-pad .. length + pad - 1`` (reflect or replicate)."""
    index = torch.arange(-pad, length + pad, device=device)
    if reflect:  # F.pad's "reflect": mirror about the edge pixel without repeating it
        index = index.abs()
        index = torch.where(index > valid - 1, 2 * (valid - 1) - index, index)
    return index.clamp(0, valid - 1)


def pad_per_sample(images: torch.Tensor, sizes: Sizes, pad: int, radii: list[int] | None = None) -> torch.Tensor:
    """Pad every sample by ``pad`` around its own crop: reflect, or replicate where a crop side is <= ``radii[i]``.

    ``radii[i]`` (default ``pad``) is how far sample ``i``'s own kernel reaches, which decides its mode as F.pad
    would for that kernel alone (reflect needs a side longer than the padding). Positions further out than the
    radius are only ever multiplied by a kernel's zero rings; they hold the reflection continued, then clamped.
    """
    batch, _, height, width = images.shape
    radii = [pad] * batch if radii is None else radii
    reflect = [min(h, w) > radius for (h, w), radius in zip(sizes, radii, strict=True)]
    if all(size == (height, width) for size in sizes) and (all(reflect) or not any(reflect)):
        mode = "reflect" if reflect[0] and min(height, width) > pad else "replicate"
        if mode == "reflect" or not any(reflect):
            return F.pad(images, (pad, pad, pad, pad), mode=mode)
    rows = torch.stack([_border_index(height, h, pad, mode, images.device)
                        for (h, _), mode in zip(sizes, reflect, strict=True)])
    cols = torch.stack([_border_index(width, w, pad, mode, images.device)
                        for (_, w), mode in zip(sizes, reflect, strict=True)])
    samples = torch.arange(batch, device=images.device)[:, None, None]
    return images[samples, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def _kernel_radius(kernel: torch.Tensor) -> int:
    """How far a ``[k, k]`` kernel reaches from its centre: ``k // 2`` less its all-zero outer rings."""
    rows, cols = kernel.abs().sum(1).nonzero(), kernel.abs().sum(0).nonzero()
    if len(rows) == 0:
        return 0
    centre = kernel.shape[-1] // 2
    return int(max(centre - rows.min(), rows.max() - centre, centre - cols.min(), cols.max() - centre))


def filter2d(image: torch.Tensor, kernel: torch.Tensor, sizes: Sizes | None = None) -> torch.Tensor:
    """Correlate ``[C, H, W]`` with one ``[k, k]`` kernel, or ``[B, C, H, W]`` with one kernel per sample ``[B, k, k]``.

    kornia's ``filter2d`` (channels as convolution groups, 3-6x faster on the CPU than channels as a batch), reflect
    padding around each sample's crop (``sizes``), replicate where a crop is no larger than its kernel's reach (tiny
    test crops). Each sample gets what its kernel alone would give: the kernels' common all-zero rings are cut (up to
    9x fewer multiplications for the smallest kernels), and a smaller kernel's other zero rings multiply finite
    padding. The kernels here are point-symmetric, so correlation is convolution.
    """
    import kornia

    single = image.ndim == 3
    images = image[None] if single else image
    kernels = kernel[None] if kernel.ndim == 2 else kernel
    radii = [_kernel_radius(k) for k in kernels]  # before the move: the drawn kernels are on the CPU (no GPU syncs)
    sizes = sizes or [tuple(images.shape[-2:])] * len(images)
    if images.device.type == "cpu" and len(set(radii)) > 1:
        # On the CPU the multiplications are the cost: filter each group of equal reach with kernels cut to it (half
        # the work of padding all to the largest, for sizes 7..21), as one sample at a time would.
        out = torch.empty_like(images)
        for radius in sorted(set(radii)):
            group = [i for i, r in enumerate(radii) if r == radius]
            out[group] = filter2d(images[group], kernels[group], [sizes[i] for i in group])
        return out[0] if single else out
    kernels = kernels.to(images.device, images.dtype)
    pad = max(radii)
    centre = kernels.shape[-1] // 2
    kernels = kernels[:, centre - pad : centre + pad + 1, centre - pad : centre + pad + 1]
    padded = pad_per_sample(images, sizes, pad, radii)
    out = kornia.filters.filter2d(padded, kernels, padding="valid")
    return out[0] if single else out


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


def _separable_blur(images: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """``[B, C, H, W]`` convolved with ``outer(kernel, kernel)`` as two 1-D passes (kornia; reflect, or replicate on
    images smaller than the kernel)."""
    import kornia

    border = "reflect" if min(images.shape[-2:]) > kernel.numel() // 2 else "replicate"
    kernel = kernel.to(images.device, images.dtype)[None]
    # One image of B*C channels: PyTorch's CPU depthwise convolution runs 2-3x faster per image so than over a batch
    # of B images of C channels (measured at 512 px, batch 8, one thread); the same numbers either way.
    flat = images.reshape(1, -1, *images.shape[-2:])
    return kornia.filters.filter2d_separable(flat, kernel, kernel, border_type=border).view_as(images)


def usm_sharpen(image: torch.Tensor, weight: float = 0.5, radius: int = 50, threshold: float = 10) -> torch.Tensor:
    """Unsharp masking of ``[3, H, W]`` or ``[B, 3, H, W]`` in [0, 1], as BasicSR's ``USMSharp`` (Real-ESRGAN's and
    SeeSR's GT).

    ``sharp = I + weight * (I - blur(I))`` where ``|I - blur(I)| * 255 > threshold``, blended through the blurred
    mask; the Gaussian is ``radius + 1`` px wide (odd) with OpenCV's default sigma (8 for radius 50).
    """
    size = radius + 1 if radius % 2 == 0 else radius
    kernel = _gaussian_kernel_1d(size)
    images = (image[None] if image.ndim == 3 else image).float()
    residual = images - _separable_blur(images, kernel)
    mask = ((residual.abs() * 255) > threshold).float()
    soft_mask = _separable_blur(mask, kernel)
    sharp = (images + weight * residual).clamp(0, 1)
    out = soft_mask * sharp + (1 - soft_mask) * images
    return out[0] if image.ndim == 3 else out


def _grey(image: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of ``[3, H, W]``, ``[1, H, W]`` (kornia's ``rgb_to_grayscale``, torchvision's weights)."""
    import kornia

    return kornia.color.rgb_to_grayscale(image)


def add_gaussian_noise(image, sigma: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Add N(0, (sigma/255)^2) noise, the same on all channels when ``grey``; clamp to [0, 1]."""
    shape = (1, *image.shape[1:]) if grey else image.shape
    noise = torch.randn(shape, generator=generator, dtype=image.dtype, device=image.device) * (sigma / 255.0)
    return (image + noise).clamp(0.0, 1.0)


def _poisson_noise(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    # As BasicSR: count the distinct 8-bit levels, use the next power of two as photon count scale. The levels are
    # counted with a histogram of the 256 codes: the same count as torch.unique, without sorting the image.
    codes = (image * 255.0).round().clamp(0, 255)
    image = codes / 255.0
    distinct = int((torch.bincount(codes.flatten().long(), minlength=256) > 0).sum())
    levels = 2.0 ** math.ceil(math.log2(max(distinct, 2)))
    return torch.poisson(image * levels, generator=generator) / levels - image


def add_poisson_noise(image, scale: float, grey: bool, generator: torch.Generator) -> torch.Tensor:
    """Add shot noise (computed on the luma when ``grey``) times ``scale``; clamp to [0, 1]."""
    noise = _poisson_noise(_grey(image) if grey else image, generator)
    return (image + noise * scale).clamp(0.0, 1.0)


def jpeg_compress(image: torch.Tensor, quality: float) -> torch.Tensor:
    """JPEG round trip of ``[3, H, W]`` in [0, 1] through PIL at integer ``quality``."""
    array = (image.clamp(0, 1) * 255.0).round().byte().permute(1, 2, 0).cpu().numpy()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=int(round(quality)))
    buffer.seek(0)
    decoded = np.asarray(Image.open(buffer).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(decoded).permute(2, 0, 1).contiguous().to(image.device)


def jpeg_pil(images: torch.Tensor, sizes: Sizes, qualities: list[int]) -> torch.Tensor:
    """The per-sample JPEG backend: libjpeg through PIL on each crop (4:2:0, integer quality, 8-bit in and out)."""
    crops = [jpeg_compress(crop, quality) for crop, quality in zip(_crops(images, sizes), qualities, strict=True)]
    return _stack(crops)[0]


# ------------------------------------------------------------------------------------------------ pipeline


def _noise_each(images, sizes, params, generators, second: bool) -> torch.Tensor:
    crops = []
    for crop, p, generator in zip(_crops(images, sizes), params, generators, strict=True):
        grey, gaussian, strength = (p.grey2, p.gaussian2, p.noise2) if second else (p.grey1, p.gaussian1, p.noise1)
        add = add_gaussian_noise if gaussian else add_poisson_noise
        crops.append(add(crop, strength, grey, generator))
    return _stack(crops)[0]


def _resize_each(images, sizes, targets, modes) -> tuple[torch.Tensor, Sizes]:
    return _stack([resize(crop, target, mode) for crop, target, mode in
                   zip(_crops(images, sizes), targets, modes, strict=True)])


def _select(images: torch.Tensor, sizes: Sizes, keep: list[int]) -> tuple[torch.Tensor, Sizes]:
    """Samples ``keep`` of a batch, cut to their own largest crop."""
    sub_sizes = [sizes[i] for i in keep]
    height, width = max(h for h, _ in sub_sizes), max(w for _, w in sub_sizes)
    return images[keep, :, :height, :width], sub_sizes


def _size_groups(sizes: Sizes, keep: list[int], waste: float = 1.5) -> list[list[int]]:
    """``keep`` split into groups of similar crop sizes: a group's padded area is at most ``waste`` times its pixels.

    Between the first resize and the last, crops range from 0.15x to 1.5x the HR side; padding them all to the
    largest would multiply the blur and JPEG work on the CPU by up to 8 at batch 8.
    """
    order = sorted(keep, key=lambda i: sizes[i][0] * sizes[i][1], reverse=True)
    groups: list[list[int]] = []
    for index in order:
        if groups:
            group = groups[-1] + [index]
            height, width = max(sizes[i][0] for i in group), max(sizes[i][1] for i in group)
            if height * width * len(group) <= waste * sum(sizes[i][0] * sizes[i][1] for i in group):
                groups[-1] = group
                continue
        groups.append([index])
    return groups


def _apply_in_groups(images: torch.Tensor, sizes: Sizes, keep: list[int], function) -> torch.Tensor:
    """``function(sub_images, sub_sizes, indices)`` (size-preserving) on samples ``keep``, by size groups."""
    out = images.clone()
    for group in _size_groups(sizes, keep):
        sub, sub_sizes = _select(images, sizes, group)
        out[group, :, : sub.shape[-2], : sub.shape[-1]] = function(sub, sub_sizes, group)
    return out


def degrade_batch(
    hr: torch.Tensor, params: list[DegradationParams], config: DegradationConfig, jpeg=jpeg_pil, quantize: bool = True
) -> torch.Tensor:
    """Degrade HR images ``[B, 3, H, W]`` in [0, 1] into LR ``[B, 3, H/scale, W/scale]`` in [0, 1] (8-bit levels).

    ``params[i]`` holds every random choice of sample ``i`` (:func:`sample_degradation`); its Gaussian and Poisson
    noise comes from a generator on ``hr``'s device seeded with ``noise_seed``, so a sample's LR image does not
    depend on the other samples of its batch. ``jpeg(images, sizes, qualities)`` is the JPEG backend: PIL per crop
    here, the batched torch codec in :mod:`data.degradations_batched`. ``quantize=False`` returns the LR image only
    clamped, not rounded to 8-bit levels, as SeeSR's ``make_paired_data.py`` keeps it to compute ``sr_bicubic``.
    """
    if hr.ndim != 4 or hr.shape[1] != 3:
        raise UserError(f"Expected RGB image tensors [B, 3, H, W], found shape {tuple(hr.shape)}.")
    if len(params) != len(hr):
        raise UserError(f"Expected one set of degradation parameters per image, found {len(params)} for {len(hr)}.")
    height, width = hr.shape[-2:]
    if height % config.scale or width % config.scale:
        raise UserError(f"Expected HR sides divisible by scale {config.scale}, found {height}x{width}.")
    modes = config.resize_modes
    generators = [torch.Generator(device=hr.device).manual_seed(p.noise_seed) for p in params]
    lr_size = (height // config.scale, width // config.scale)

    out = hr.float()
    sizes: Sizes = [(height, width)] * len(params)
    # First stage: blur, resize, noise, JPEG.
    out = filter2d(out, torch.stack([p.kernel1 for p in params]))
    targets = [(max(1, int(height * p.resize1)), max(1, int(width * p.resize1))) for p in params]
    out, sizes = _resize_each(out, sizes, targets, [modes[p.mode1] for p in params])
    out = _noise_each(out, sizes, params, generators, second=False)
    out = _apply_in_groups(out, sizes, list(range(len(params))),
                           lambda sub, sub_sizes, chosen: jpeg(sub, sub_sizes, [params[i].quality1 for i in chosen]))

    # Second stage: optional blur, resize relative to the LR size, noise.
    blurred = [i for i, p in enumerate(params) if p.second_blur]
    out = _apply_in_groups(out, sizes, blurred, lambda sub, sub_sizes, chosen: filter2d(
        sub, torch.stack([params[i].kernel2 for i in chosen]), sub_sizes))
    targets = [(max(1, int(height / config.scale * p.resize2)), max(1, int(width / config.scale * p.resize2)))
               for p in params]
    out, sizes = _resize_each(out, sizes, targets, [modes[p.mode2] for p in params])
    out = _noise_each(out, sizes, params, generators, second=True)

    # Resize to the LR size + final sinc, and JPEG, in either order (other orders give twisted lines, per
    # Real-ESRGAN). A sample without a final sinc has a pulse kernel, which changes nothing.
    def resize_and_sinc(images, image_sizes, chosen):
        images, _ = _resize_each(images, image_sizes, [lr_size] * len(chosen), [modes[params[i].mode3] for i in chosen])
        return filter2d(images, torch.stack([params[i].final_kernel for i in chosen]))

    lr = torch.empty(len(params), 3, *lr_size, device=hr.device)
    first = [i for i, p in enumerate(params) if p.resize_first]
    if first:
        sub, sub_sizes = _select(out, sizes, first)
        sub = resize_and_sinc(sub, sub_sizes, first)
        lr[first] = jpeg(sub, [lr_size] * len(first), [params[i].quality2 for i in first])
    last = [i for i, p in enumerate(params) if not p.resize_first]
    if last:
        out = _apply_in_groups(out, sizes, last, lambda sub, sub_sizes, chosen: jpeg(
            sub, sub_sizes, [params[i].quality2 for i in chosen]))
        sub, sub_sizes = _select(out, sizes, last)
        lr[last] = resize_and_sinc(sub, sub_sizes, last)
    if not quantize:
        return lr.clamp(0.0, 1.0)
    return (lr * 255.0).round().clamp(0, 255) / 255.0


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
    return degrade_batch(hr[None], [sample_degradation(config, rng)], config)[0]
