"""Test helpers for the user-generation pipeline: a tiny VA-VAE file in the public LDM layout, user folders."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from tests.test_vavae import TINY, ldm_vae_state


def write_tiny_vavae(path: Path, seed: int = 0) -> Path:
    """A random VA-VAE (the ``tiny`` config: 32 px <-> 8x2x2) saved like vavae-imagenet256-f16d32-dinov2.pt."""
    state = ldm_vae_state(**TINY, seed=seed)
    state["loss.logvar"] = torch.zeros(())  # a training-only entry the loader must drop
    torch.save({"state_dict": state}, path)
    return path


def user_colour(user: int) -> tuple[int, int, int]:
    return (20 * user % 256, 255 - 15 * user % 256, 40 + 9 * user % 200)


def write_user_folders(root: Path, users, per_user, prefix: str = "ID_", size=(40, 48), pattern: str = "solid") -> Path:
    """``root/<prefix><n>/img<i>.png`` for each user; ``per_user`` is an int or {user: count}.

    ``solid``: every image of user n has the same colour (so its centre crop, and its latent, depend only on n);
    ``ramp``: a horizontal colour ramp (flipping changes it).
    """
    root.mkdir(parents=True, exist_ok=True)
    for user in users:
        folder = root / f"{prefix}{user}"
        folder.mkdir(parents=True, exist_ok=True)
        count = per_user[user] if isinstance(per_user, dict) else per_user
        for index in range(count):
            height, width = size[0] + index, size[1]  # different sizes and aspect ratios
            if pattern == "solid":
                array = np.empty((height, width, 3), dtype=np.uint8)
                array[:] = user_colour(user)
            else:
                ramp = np.linspace(0, 255, width, dtype=np.float32)[None, :, None]
                array = np.broadcast_to((ramp * (0.3 + 0.05 * user)) % 256, (height, width, 3)).astype(np.uint8).copy()
                array[..., 1] = 10 * user
            Image.fromarray(array).save(folder / f"img{index}.png")
    return root
