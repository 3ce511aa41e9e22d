"""Synthetic underwater image pairs from scikit-image's bundled photographs, in the LSUI layout.

The degradation follows the revised underwater image formation model of Akkaynak and Treibitz
("A revised underwater image formation model", CVPR 2018), simplified:

    I_c(x) = J_c(x) * E_c * exp(-beta_D_c * z(x)) + B_c * (1 - exp(-beta_B_c * z(x)))

* ``J``: the clean photograph (the ground truth), linearised from sRGB so the optics act on radiance;
* ``E_c = exp(-K_c * d)``: downwelling light after ``d`` metres of water above the scene;
* ``z(x)``: the camera-to-scene range, a smooth random map (farther towards the top of the frame);
* ``beta_D``: wavelength-dependent attenuation per metre, red far stronger than green and blue (oceanic
  water) or red and blue stronger than green (coastal, green water);
* ``B``: the veiling light (backscatter at infinity), blue-green, and ``beta_B`` its own coefficient;
* then mild forward-scattering blur and sensor noise.

Every image draws its parameters from ``numpy.random.default_rng([seed, split, index])``, so the set is
reproducible. The test split uses different photographs from the training split (``TEST_PHOTOGRAPHS``), so
it measures generalisation to unseen scenes, not to unseen crops of seen ones.

Build it by hand with ``python scripts/make_demo_data.py underwater OUT_DIR --size 128 --train_count 96 --test_count 24``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.filters import gaussian
from skimage.transform import resize

from data.demo_data import load_sample_photographs, random_crops
from utils.errors import UserError

TEST_PHOTOGRAPHS = ("chelsea", "coffee")
# Attenuation per metre (R, G, B), ranges from Jerlov oceanic and coastal water types.
WATER_TYPES = {
    "oceanic": {"beta": ((0.30, 0.60), (0.04, 0.12), (0.02, 0.08)), "veil": ((0.02, 0.12), (0.30, 0.50), (0.45, 0.70))},
    "coastal": {"beta": ((0.40, 0.80), (0.06, 0.15), (0.12, 0.30)), "veil": ((0.03, 0.15), (0.40, 0.60), (0.25, 0.45))},
}


def srgb_to_linear(image: np.ndarray) -> np.ndarray:
    return np.where(image <= 0.04045, image / 12.92, ((image + 0.055) / 1.055) ** 2.4)


def linear_to_srgb(image: np.ndarray) -> np.ndarray:
    image = np.clip(image, 0.0, 1.0)
    return np.where(image <= 0.0031308, image * 12.92, 1.055 * image ** (1 / 2.4) - 0.055)


def smooth_range_map(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Camera-to-scene range in metres: a base distance, farther towards the top, plus smooth variation."""
    base = rng.uniform(1.0, 5.0)
    slope = rng.uniform(0.0, 4.0)
    rows = np.linspace(1.0, 0.0, height)[:, None] * np.ones((1, width))
    coarse = rng.normal(0.0, 1.0, size=(4, 4))
    variation = resize(coarse, (height, width), order=3, mode="reflect", anti_aliasing=False)
    return np.clip(base + slope * rows + 0.6 * variation, 0.3, None)


def degrade_underwater(clean: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, dict]:
    """Apply the underwater formation model to an HxWx3 uint8 photograph; returns (uint8 image, parameters)."""
    water = "coastal" if rng.random() < 0.35 else "oceanic"
    beta_d = np.array([rng.uniform(*bounds) for bounds in WATER_TYPES[water]["beta"]])
    veil = np.array([rng.uniform(*bounds) for bounds in WATER_TYPES[water]["veil"]])
    beta_b = beta_d * rng.uniform(0.8, 1.2, size=3)
    depth = rng.uniform(0.0, 6.0)
    diffuse = beta_d * rng.uniform(0.4, 0.9)
    blur_sigma = rng.uniform(0.3, 1.2)
    noise_sigma = rng.uniform(0.002, 0.012)

    radiance = srgb_to_linear(clean.astype(np.float64) / 255.0)
    height, width = radiance.shape[:2]
    distance = smooth_range_map(height, width, rng)[..., None]
    illumination = np.exp(-diffuse * depth)
    direct = radiance * illumination * np.exp(-beta_d * distance)
    backscatter = veil * (1.0 - np.exp(-beta_b * distance))
    degraded = gaussian(direct + backscatter, sigma=blur_sigma, channel_axis=-1, preserve_range=True)
    degraded = degraded + rng.normal(0.0, noise_sigma, size=degraded.shape)
    image = np.round(linear_to_srgb(degraded) * 255.0).astype(np.uint8)
    parameters = {
        "water": water,
        "beta_D": beta_d.round(4).tolist(),
        "beta_B": beta_b.round(4).tolist(),
        "veiling_light": veil.round(4).tolist(),
        "depth_m": round(depth, 3),
        "mean_range_m": round(float(distance.mean()), 3),
        "blur_sigma": round(blur_sigma, 3),
        "noise_sigma": round(noise_sigma, 4),
    }
    return image, parameters


def _write_split(out_dir: Path, split: str, photos: dict[str, np.ndarray], count: int, size: int, seed: int) -> list[dict]:
    (out_dir / split / "input").mkdir(parents=True, exist_ok=True)
    (out_dir / split / "gt").mkdir(parents=True, exist_ok=True)
    split_code = {"train": 0, "test": 1}[split]
    crop_rng = np.random.default_rng([seed, split_code])
    names = sorted(photos)
    per_photo = [count // len(names) + (i < count % len(names)) for i in range(len(names))]
    records = []
    for name, photo_count in zip(names, per_photo):
        for crop in random_crops(photos[name], photo_count, size, crop_rng):
            stem = f"{name}_{len(records):05d}"
            degraded, parameters = degrade_underwater(crop, np.random.default_rng([seed, split_code, len(records)]))
            Image.fromarray(crop).save(out_dir / split / "gt" / f"{stem}.png")
            Image.fromarray(degraded).save(out_dir / split / "input" / f"{stem}.png")
            records.append({"name": stem, "photograph": name, **parameters})
    return records


def build_synthetic_underwater(
    out_dir: str | Path, size: int = 128, train_count: int = 96, test_count: int = 24, seed: int = 0
) -> Path:
    """Write ``out_dir/{train,test}/{input,gt}/*.png``; the test photographs are not in the training split."""
    if size < 16 or train_count < 1 or test_count < 1:
        raise UserError(
            f"Need size >= 16 and at least one train and one test image (got size {size}, "
            f"{train_count} train, {test_count} test)."
        )
    out_dir = Path(out_dir)
    photos = load_sample_photographs()
    test_photos = {name: image for name, image in photos.items() if name in TEST_PHOTOGRAPHS}
    train_photos = {name: image for name, image in photos.items() if name not in TEST_PHOTOGRAPHS}
    if not test_photos or not train_photos:
        raise UserError("scikit-image lacks the sample photographs needed for disjoint train and test splits; reinstall scikit-image.")
    records = {
        "train": _write_split(out_dir, "train", train_photos, train_count, size, seed),
        "test": _write_split(out_dir, "test", test_photos, test_count, size, seed),
    }
    description = {"seed": seed, "size": size, "test_photographs": sorted(test_photos), "images": records}
    (out_dir / "degradation.json").write_text(json.dumps(description, indent=1))
    return out_dir
