"""The pixel DDPM's noise schedule, training objective and its one sampling function.

Ho et al. 2020: a linear beta schedule from 1e-4 to 0.02 over 1000 steps, an epsilon-predicting UNet trained
with the simple MSE objective at uniformly drawn timesteps. Schedules and samplers are diffusers'
(``DDPMScheduler``: ancestral sampling with the paper's fixed small variance and x0 clipping;
``DDIMScheduler``: Song et al. 2021, deterministic with eta 0). ``sample_ddpm`` is what the training loop's
sample grids and ``infer.py ddpm`` both call.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError

SAMPLERS = ("ddpm", "ddim")


def make_noise_scheduler(num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DDPMScheduler:
    """DDPM's linear schedule, epsilon prediction, fixed small variance, x0 clipped to [-1, 1]."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule="linear",
        beta_start=beta_start,
        beta_end=beta_end,
        variance_type="fixed_small",
        clip_sample=True,
        prediction_type="epsilon",
    )


def ddpm_loss(unet: torch.nn.Module, scheduler: DDPMScheduler, images: torch.Tensor) -> torch.Tensor:
    """The simple objective: MSE between the true and predicted noise at a uniform timestep (in fp32)."""
    noise = torch.randn_like(images)
    timesteps = torch.randint(0, scheduler.config.num_train_timesteps, (images.shape[0],), device=images.device)
    noisy = scheduler.add_noise(images, noise, timesteps)
    prediction = unet(noisy, timesteps).sample
    return F.mse_loss(prediction.float(), noise.float())


def make_sampler(scheduler_config: dict, sampler: str, steps: int):
    """A diffusers scheduler for ``sampler`` set to ``steps`` inference steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
    scheduler = cls.from_config(scheduler_config)
    total = scheduler.config.num_train_timesteps
    if not 1 <= steps <= total:
        raise ValueError(f"steps must be in 1..{total}, got {steps}")
    scheduler.set_timesteps(steps)
    return scheduler


def initial_noise(num_samples: int, channels: int, size: int, seed: int) -> torch.Tensor:
    """Seeded starting noise, drawn on the CPU so that a seed means the same images on any device."""
    generator = torch.Generator("cpu").manual_seed(seed)
    return torch.randn(num_samples, channels, size, size, generator=generator)


@torch.no_grad()
def sample_ddpm(
    unet: torch.nn.Module,
    scheduler_config: dict,
    num_samples: int = 16,
    steps: int = 100,
    sampler: str = "ddim",
    seed: int = 0,
    noise: torch.Tensor | None = None,
    batch_size: int = 64,
    autocast_dtype: torch.dtype | None = None,
    progress: Callable | None = None,
) -> torch.Tensor:
    """Generate images in [-1, 1], shape (N, C, H, W), on the CPU.

    ``noise`` (N, C, H, W) replaces the seeded starting noise (interpolation uses this). The ancestral noise of
    the DDPM sampler comes from a generator seeded with ``seed``, so a seed reproduces a grid exactly for the
    same batch size and device. ``progress`` wraps the timestep iterator (e.g. ``tqdm``).
    """
    config = unet.config if hasattr(unet, "config") else None
    device = next(unet.parameters()).device
    if noise is None:
        noise = initial_noise(num_samples, config.in_channels, config.sample_size, seed)
    was_training = unet.training
    unet.eval()
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        scheduler = make_sampler(scheduler_config, sampler, steps)
        sample = noise[start : start + batch_size].to(device)
        timesteps = scheduler.timesteps
        for t in progress(timesteps) if progress else timesteps:
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                eps = unet(sample, t.to(device)).sample
            sample = _step(scheduler, eps.float(), t, sample, sampler, generator)
        outputs.append(sample.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(outputs)


def _step(scheduler, eps, t, sample, sampler, generator):
    # DDPM's ancestral noise comes from the CPU generator (diffusers moves it), for device-independent seeds.
    if sampler == "ddim":
        return scheduler.step(eps, t, sample, eta=0.0).prev_sample
    return scheduler.step(eps, t, sample, generator=generator).prev_sample


def slerp(z0: torch.Tensor, z1: torch.Tensor, alpha: float) -> torch.Tensor:
    """Spherical interpolation: keeps the norm of Gaussian noise, which a straight line would shrink."""
    a, b = z0.flatten().double(), z1.flatten().double()
    cos = torch.clamp(torch.dot(a, b) / (a.norm() * b.norm()), -1.0, 1.0)
    theta = torch.arccos(cos)
    if theta.abs() < 1e-6:
        mixed = (1 - alpha) * a + alpha * b
    else:
        mixed = (torch.sin((1 - alpha) * theta) * a + torch.sin(alpha * theta) * b) / torch.sin(theta)
    return mixed.reshape(z0.shape).to(z0.dtype)


def interpolation_noise(channels: int, size: int, frames: int, seed: int) -> torch.Tensor:
    """``frames`` noises on the great circle between two seeded noises (endpoints included)."""
    ends = initial_noise(2, channels, size, seed)
    alphas = torch.linspace(0, 1, frames).tolist()
    return torch.stack([slerp(ends[0], ends[1], a) for a in alphas])


def load_ddpm_for_sampling(path: str | Path) -> tuple[UNet2DModel, dict, str]:
    """``(unet with EMA weights, scheduler config, description)`` from one of our ``.pt`` checkpoints or a
    diffusers folder (``UNet2DModel`` + ``scheduler_config.json``, flat like ``google/ddpm-cifar10-32`` or
    with ``unet/`` and ``scheduler/`` sub-folders like a saved ``DDPMPipeline``)."""
    path = Path(path)
    if path.is_dir():
        return _load_diffusers_folder(path)
    checkpoint = load_checkpoint(path, "ddpm", "infer.py ddpm --model")
    unet = UNet2DModel.from_config(checkpoint["model_config"])
    weights = dict(checkpoint["model"])
    if "ema" in checkpoint:
        weights.update(checkpoint["ema"]["weights"])
    unet.load_state_dict(weights)
    config = checkpoint["config"]
    description = f"{path.name}: {config.get('dataset')} {unet.config.sample_size} px, epoch {checkpoint['epoch']}, EMA weights"
    return unet.eval(), dict(checkpoint["scheduler_config"]), description


def _load_diffusers_folder(folder: Path) -> tuple[UNet2DModel, dict, str]:
    unet_dir = folder / "unet" if (folder / "unet" / "config.json").is_file() else folder
    scheduler_file = next(
        (f for f in (folder / "scheduler" / "scheduler_config.json", folder / "scheduler_config.json") if f.is_file()), None
    )
    if not (unet_dir / "config.json").is_file() or scheduler_file is None:
        raise CheckpointError(
            f"{folder} is not a diffusers DDPM folder: expected config.json with UNet2DModel weights and "
            "scheduler_config.json (flat, or in unet/ and scheduler/ sub-folders)."
        )
    try:
        unet = UNet2DModel.from_pretrained(unet_dir, local_files_only=True)
    except (OSError, ValueError, EnvironmentError) as err:
        raise CheckpointError(f"{unet_dir} does not hold a loadable UNet2DModel ({str(err).splitlines()[0]}).") from err
    scheduler_config = DDPMScheduler.load_config(scheduler_file)
    return unet.eval(), dict(scheduler_config), f"{folder.name}: diffusers UNet2DModel at {unet.config.sample_size} px"
