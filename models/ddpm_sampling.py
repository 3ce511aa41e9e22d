"""The DDPM noise schedule, the DDPM objective of both DDPM families and the pixel DDPM's one sampling function.

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
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UNet2DModel, UniPCMultistepScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from utils.checkpoint import load_checkpoint
from utils.errors import CheckpointError, UserError
from utils.registry import Registry

TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")


@dataclass(frozen=True)
class SamplerSpec:
    """A sampler of the DDPM family: how to build its diffusers scheduler and what its ``step`` takes.

    ``make(schedule_config, timestep_spacing)`` returns the scheduler (``set_timesteps`` not yet called);
    ``default_steps`` is its step count when none is given; ``takes_eta`` (DDIM's noise mix) and ``takes_generator``
    (per-step noise drawn from the caller's CPU generators) say which options :func:`sampler_step_options` passes.
    """

    make: Callable[[dict, str], SchedulerMixin]
    default_steps: int
    takes_eta: bool = False
    takes_generator: bool = False


def _multistep_solver(cls, **extra) -> Callable[[dict, str], SchedulerMixin]:
    # Order 3, as the solvers' authors advise for unconditional models; ``thresholding`` with ``sample_max_value`` 1
    # is exactly DDPM's x0 clip, so a clipped schedule stays clipped.
    def make(config: dict, spacing: str) -> SchedulerMixin:
        clip = bool(config.get("clip_sample", False))
        return cls.from_config(config, timestep_spacing=spacing, solver_order=3, thresholding=clip,
                               sample_max_value=float(config.get("clip_sample_range", 1.0)), **extra)

    return make


# The keys are ``--sampler``'s choices in train_ddpm_highres.py, ``infer.py ddpm`` and (for the latent UNet) the user
# generation trainer and ``infer.py user``.
SAMPLERS: Registry[SamplerSpec] = Registry("sampler", flag="--sampler")
SAMPLERS.register("ddpm", SamplerSpec(lambda config, spacing: DDPMScheduler.from_config(config, timestep_spacing=spacing), 1000,
                                      takes_generator=True), help="ancestral, the paper's (1000 steps)")
SAMPLERS.register("ddim", SamplerSpec(lambda config, spacing: DDIMScheduler.from_config(config, timestep_spacing=spacing), 100,
                                      takes_eta=True, takes_generator=True), help="DDIM, deterministic at eta 0 (100 steps)")
SAMPLERS.register("dpmsolver++", SamplerSpec(_multistep_solver(DPMSolverMultistepScheduler, algorithm_type="dpmsolver++"), 25),
                  help="multistep DPM-Solver++, order 3 (25 steps)")
SAMPLERS.register("unipc", SamplerSpec(_multistep_solver(UniPCMultistepScheduler), 25),
                  help="UniPC predictor-corrector, order 3 (25 steps)")


def default_steps(sampler: str) -> int:
    """The step count of ``sampler`` when none is given."""
    return SAMPLERS.get(sampler).default_steps


def sampler_step_options(sampler: str, eta: float, generator) -> dict:
    """The keyword arguments ``scheduler.step`` of ``sampler`` takes: DDIM's ``eta``, the stochastic samplers' generators."""
    spec = SAMPLERS.get(sampler)
    options = {"eta": eta} if spec.takes_eta else {}
    if spec.takes_generator:
        options["generator"] = generator
    return options


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


def ddpm_loss(
    model,
    scheduler: DDPMScheduler,
    clean: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    timesteps: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """The DDPM objective of both DDPM families: MSE to the noise (or to v / x0, following the scheduler's
    ``prediction_type``) at uniformly drawn timesteps, in fp32.

    ``model(noisy, timesteps)`` for the pixel UNet (a diffusers output's ``.sample`` is taken), ``model(noisy,
    timesteps, labels)`` for a conditioned one (the latent UNet). ``timesteps`` and ``noise`` fix the draws (validation);
    ``generator`` draws them on its own device. Returns ``loss`` (to back-propagate) and detached ``mse``,
    ``mse_per_sample`` and the ``timesteps``.
    """
    num_train = scheduler.config.num_train_timesteps
    if noise is None:
        if generator is None:
            noise = torch.randn_like(clean)
        else:
            noise = torch.randn(clean.shape, generator=generator, device=generator.device, dtype=clean.dtype).to(clean.device)
    if timesteps is None:
        if generator is None:
            timesteps = torch.randint(0, num_train, (clean.shape[0],), device=clean.device)
        else:
            timesteps = torch.randint(0, num_train, (clean.shape[0],), generator=generator, device=generator.device).to(clean.device)
    noisy = scheduler.add_noise(clean, noise, timesteps)
    output = model(noisy, timesteps) if labels is None else model(noisy, timesteps, labels)
    prediction = getattr(output, "sample", output).float()
    prediction_type = scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = scheduler.get_velocity(clean, noise, timesteps)
    elif prediction_type == "sample":
        target = clean
    else:
        raise UserError(f"Unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample.")
    mse = (prediction - target.float()).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
    return {"loss": mse.mean(), "mse": mse.mean().detach(), "mse_per_sample": mse.detach(), "timesteps": timesteps}


def make_sampler(scheduler_config: dict, sampler: str, steps: int, *, timestep_spacing: str = "trailing"):
    """A diffusers scheduler for ``sampler`` on the model's schedule, set to ``steps`` inference steps."""
    spec = SAMPLERS.get(sampler)
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
    config = dict(scheduler_config)
    total = int(config.get("num_train_timesteps", 1000))
    if not 1 <= steps <= total:
        raise UserError(f"The number of sampling steps must be between 1 and the model's {total} training timesteps, got {steps}.")
    scheduler = spec.make(config, timestep_spacing)
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
    return scheduler.step(eps, t, sample, **sampler_step_options(sampler, eta, generator)).prev_sample


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
