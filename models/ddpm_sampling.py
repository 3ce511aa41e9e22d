"""The pixel DDPM's noise schedule, training objective and its one sampling function.

Ho et al. 2020: a linear beta schedule from 1e-4 to 0.02 over 1000 steps, an epsilon-predicting UNet trained
with the simple MSE objective at uniformly drawn timesteps. ``sample_ddpm`` is what the training loop's sample
grids and ``infer.py ddpm`` both call; its samplers are diffusers' schedulers built from the model's own
schedule:

* ``ddpm``: ``DDPMScheduler``, ancestral sampling with the paper's fixed small variance and x0 clipping;
* ``ddim``: ``DDIMScheduler`` (Song et al. 2021), deterministic at ``eta`` 0, DDPM-like noise at ``eta`` 1;
* ``dpmsolver++``: ``DPMSolverMultistepScheduler`` (Lu et al. 2022, multistep DPM-Solver++, order 3 as its
  authors advise for unconditional models), good images in 10-25 steps;
* ``unipc``: ``UniPCMultistepScheduler`` (Zhao et al. 2023, predictor-corrector, order 3), likewise.

The two solvers clip the predicted clean image to [-1, 1] like the DDPM and DDIM samplers (diffusers'
``thresholding`` with ``sample_max_value`` 1 is exactly that clip).

Timesteps are spaced ``trailing`` by default (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample
Steps are Flawed", table 2): the first step is t = 999, the pure noise the model was trained to start from.
diffusers' ``leading`` spacing (DDIM's and DDPM's default there) starts at t = 990 with 100 steps (t = 980 with
50), so the sampler hands the model pure noise labelled as slightly noisy; ``linspace`` is the third choice.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler

from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, UserError

SAMPLERS = ("ddpm", "ddim", "dpmsolver++", "unipc")
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
DEFAULT_STEPS = {"ddpm": 1000, "ddim": 100, "dpmsolver++": 25, "unipc": 25}


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


def make_sampler(scheduler_config: dict, sampler: str, steps: int, *, timestep_spacing: str = "trailing"):
    """A diffusers scheduler for ``sampler`` on the model's schedule, set to ``steps`` inference steps."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    config = dict(scheduler_config)
    total = int(config.get("num_train_timesteps", 1000))
    if not 1 <= steps <= total:
        raise UserError(f"The number of sampling steps must be between 1 and the model's {total} training timesteps, got {steps}.")
    if sampler in ("ddpm", "ddim"):
        cls = DDPMScheduler if sampler == "ddpm" else DDIMScheduler
        scheduler = cls.from_config(config, timestep_spacing=timestep_spacing)
    else:
        cls = DPMSolverMultistepScheduler if sampler == "dpmsolver++" else UniPCMultistepScheduler
        extra = {"algorithm_type": "dpmsolver++"} if sampler == "dpmsolver++" else {}
        clip = bool(config.get("clip_sample", False))
        scheduler = cls.from_config(
            config, timestep_spacing=timestep_spacing, solver_order=3, thresholding=clip,
            sample_max_value=float(config.get("clip_sample_range", 1.0)), **extra,
        )
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
    *,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    shared_step_noise: bool = False,
) -> torch.Tensor:
    """Generate images in [-1, 1], shape (N, C, H, W), on the CPU.

    ``noise`` (N, C, H, W) replaces the seeded starting noise (interpolation uses this). ``sampler`` is one of
    :data:`SAMPLERS`; ``eta`` (DDIM only, 0..1) mixes in fresh noise at each step; ``timestep_spacing`` places
    the ``steps`` timesteps (see the module docstring). The per-step noise of the stochastic samplers (``ddpm``,
    ``ddim`` with ``eta`` > 0) comes from CPU generators seeded with ``seed``, so a seed reproduces a grid
    exactly on the same device. ``shared_step_noise`` gives every sample the same per-step noise (an
    interpolation strip then varies only through its starting noise), whatever the batch size. ``progress``
    wraps the timestep iterator (e.g. ``tqdm``).
    """
    if sampler != "ddim" and eta != 0:
        raise ValueError(f"eta applies to the ddim sampler only, not {sampler!r}")
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be between 0 and 1, got {eta}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    config = unet.config if hasattr(unet, "config") else None
    device = next(unet.parameters()).device
    if noise is None:
        noise = initial_noise(num_samples, config.in_channels, config.sample_size, seed)
    make_sampler(scheduler_config, sampler, steps, timestep_spacing=timestep_spacing)  # bad settings fail before any work
    was_training = unet.training
    unet.eval()
    generator = torch.Generator("cpu").manual_seed(seed + 1)
    outputs = []
    for start in range(0, noise.shape[0], batch_size):
        scheduler = make_sampler(scheduler_config, sampler, steps, timestep_spacing=timestep_spacing)
        sample = noise[start : start + batch_size].to(device) * scheduler.init_noise_sigma
        if shared_step_noise:  # one generator per sample, all in the same state: the same draw for each
            generator = [torch.Generator("cpu").manual_seed(seed + 1) for _ in range(sample.shape[0])]
        timesteps = scheduler.timesteps
        for t in progress(timesteps) if progress else timesteps:
            model_input = scheduler.scale_model_input(sample, t)
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                eps = unet(model_input, t.to(device)).sample
            sample = _step(scheduler, eps.float(), t, sample, sampler, eta, generator)
        outputs.append(sample.clamp(-1, 1).cpu())
    unet.train(was_training)
    return torch.cat(outputs)


def _step(scheduler, eps, t, sample, sampler, eta, generator):
    # Per-step noise comes from the CPU generator(s) (diffusers moves it), for device-independent seeds.
    if sampler == "ddim":
        return scheduler.step(eps, t, sample, eta=eta, generator=generator).prev_sample
    if sampler == "ddpm":
        return scheduler.step(eps, t, sample, generator=generator).prev_sample
    return scheduler.step(eps, t, sample).prev_sample


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
    missing = [key for key in ("model_config", "model", "scheduler_config") if key not in checkpoint]
    if missing:
        raise CheckpointError(f"{path} lacks {', '.join(missing)}; it was not written by train_ddpm_highres.py.")
    unet = UNet2DModel.from_config(checkpoint["model_config"])
    weights = dict(checkpoint["model"])
    if "ema" in checkpoint:
        weights.update(checkpoint["ema"]["weights"])
    try:
        unet.load_state_dict(weights)
    except RuntimeError as err:
        detail = str(err).strip().splitlines()[-1].strip()[:200]
        raise CheckpointError(f"The weights in {path} do not fit the UNet its own configuration describes ({detail}).") from None
    config = checkpoint.get("config", {})
    description = f"{path.name}: {config.get('dataset')} {unet.config.sample_size} px, epoch {checkpoint.get('epoch')}, "
    description += "EMA weights" if "ema" in checkpoint else "raw weights (no EMA in the checkpoint)"
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
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{unet_dir} does not hold a loadable UNet2DModel ({str(err).splitlines()[0]}).") from err
    scheduler_config = DDPMScheduler.load_config(scheduler_file)
    return unet.eval(), dict(scheduler_config), f"{folder.name}: diffusers UNet2DModel at {unet.config.sample_size} px"
