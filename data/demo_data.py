"""Offline demo data built from the photographs that ship inside scikit-image.

No network is ever needed: ``skimage.data`` bundles a dozen real photographs (astronaut, coffee, cat,
rocket, Hubble deep field, ...). The demo, the tests and the evidence recipes of every model family
build their small data sets from them:

* :func:`load_sample_photographs` returns the photographs as RGB uint8 arrays;
* :func:`random_crops` cuts seeded square crops at several scales;
* :func:`build_demo_image_folder` writes an image folder for the pixel DDPM.

Build the folder by hand with ``python scripts/make_demo_data.py images OUT_DIR --size 32 --count 256``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

# Colour photographs bundled with scikit-image (no pooch download needed). Grey ones are left out:
# generative demos look better on colour, and the underwater degradation needs three channels.
SAMPLE_PHOTOGRAPHS = (
    "astronaut",
    "coffee",
    "chelsea",
    "rocket",
    "hubble_deep_field",
    "immunohistochemistry",
    "retina",
    "colorwheel",
    "stereo_motorcycle",
)


def load_sample_photographs(names: tuple[str, ...] = SAMPLE_PHOTOGRAPHS) -> dict[str, np.ndarray]:
    """Return ``{name: HxWx3 uint8 array}`` for the bundled photographs that load offline."""
    import skimage.data

    photos = {}
    for name in names:
        try:
            image = getattr(skimage.data, name)()
        except Exception:  # a future scikit-image may move a file behind a download; skip it
            continue
        if isinstance(image, tuple):  # stereo_motorcycle returns (left, right, disparity)
            image = image[0]
        image = np.asarray(image)
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        photos[name] = np.ascontiguousarray(image[..., :3]).astype(np.uint8)
    if not photos:
        raise RuntimeError("scikit-image ships none of the expected sample photographs; reinstall scikit-image.")
    return photos


def random_crops(
    image: np.ndarray,
    count: int,
    size: int,
    rng: np.random.Generator,
    min_scale: float = 0.25,
    max_scale: float = 1.0,
) -> list[np.ndarray]:
    """Seeded square crops whose side is a random fraction of the short side, resized to ``size``."""
    height, width = image.shape[:2]
    short = min(height, width)
    crops = []
    for _ in range(count):
        side = int(short * rng.uniform(min_scale, max_scale))
        side = max(side, min(size, short))
        top = int(rng.integers(0, height - side + 1))
        left = int(rng.integers(0, width - side + 1))
        crop = Image.fromarray(image[top : top + side, left : left + side])
        crop = crop.resize((size, size), Image.BICUBIC)
        if rng.random() < 0.5:
            crop = crop.transpose(Image.FLIP_LEFT_RIGHT)
        crops.append(np.asarray(crop))
    return crops


def build_demo_image_folder(out_dir: str | Path, size: int = 32, count: int = 256, seed: int = 0) -> Path:
    """Write ``count`` PNG crops of the sample photographs into ``out_dir`` (one sub-folder per photo)."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    photos = load_sample_photographs()
    per_photo = int(np.ceil(count / len(photos)))
    written = 0
    for name, image in photos.items():
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        for index, crop in enumerate(random_crops(image, per_photo, size, rng)):
            if written >= count:
                break
            Image.fromarray(crop).save(folder / f"{index:04d}.png")
            written += 1
    return out_dir
