"""Objectives, backbones and the one sampler for user-conditioned generation on VA-VAE latents (DiT and latent UNet).

A backbone is a :data:`BACKBONES` entry (:class:`BackboneSpec`: how to build and rebuild the network, which
:class:`Objective` trains it, its sampler family and defaults; the interface a network must meet is in the spec's
docstring); the objectives are :data:`RECTIFIED_FLOW` (:func:`flow_matching_loss`, the :data:`FLOW_SAMPLERS`) and
:data:`DDPM` (``models.ddpm_sampling.ddpm_loss`` and its ``SAMPLERS``).

References: Liu et al., "Flow Straight and Fast" (rectified flow, 2022); Ma et al., "SiT" (2024) and
hustvl/LightningDiT ``transport/`` (linear path, velocity target, logit-normal times, cosine loss term,
timestep shift, Euler on a fixed grid); Esser et al., "Scaling Rectified Flow Transformers" (SD3, logit-normal
times and shift); Ho & Salimans, "Classifier-Free Diffusion Guidance"; Kynkaanniemi et al., "Applying
Guidance in a Limited Interval" (2024); Ho et al. (DDPM) and Song et al. (DDIM) through diffusers' schedulers.

Conventions (LightningDiT/SiT's): time ``t`` in [0, 1] with **t = 0 pure noise and t = 1 data**; the path is
``x_t = t * x1 + (1 - t) * x0`` (x1 data, x0 ~ N(0, I)); the model predicts the velocity ``x1 - x0``;
sampling integrates dx/dt = v from t = 0 to 1. diffusers' ``FlowMatchEulerDiscreteScheduler`` uses
``sigma = 1 - t`` and the opposite velocity (``noise - data``). The timestep shift is the reference's
``t' = s t / (1 + (s - 1) t)`` (``timestep_shift: 0.3`` in LightningDiT's config); it equals diffusers' /
SD3's ``shift = 1 / s`` on sigma. A "250-step" LightningDiT run is a 250-point grid, i.e. 249 Euler steps
here (``num_steps`` counts updates, not grid points).

Classifier-free guidance acts on **all** latent channels by default; the reference's first-3-channels
variant (a leftover from 4-channel SD latents) is available only through ``guidance_channels=3``. Inside
the guidance interval the conditional and the null-user pass run as one batch; outside it (and whenever
``guidance_scale == 1``) the null-user pass is skipped. The null user is row ``num_users`` of the label
table, read from the model's own configuration.

User IDs are 1..num_users (as on the command line and in ``ID_<n>`` folder names); user ``k`` is table row
``k - 1``. :func:`generate_latents` is the only entry point for sampling: the training previews and
``infer.py user`` both call it. Each sample's initial noise comes from its own generator seeded by
(seed, user, index), so a sample does not depend on which other users or how many share its batch.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import nn
from tqdm.auto import tqdm

from models.ddpm_sampling import SAMPLERS, ddpm_loss, make_sampler, sampler_step_options
from models.dit import DIT_SIZES, LightningDiT, build_dit, load_lightningdit_init, read_lightningdit_release, release_uses_qknorm
from models.user_unet import UNET_SIZES, UserConditionedUNet, UserConditionEncoder, build_user_unet
from utils.config import config_to_dict
from utils.errors import CheckpointError, UserError
from utils.registry import Registry

# DDIM step placement (diffusers' timestep_spacing). trailing (default) starts at t = T - 1, the pure noise the UNet
# learned to start from; leading (what DDIMScheduler.from_config of a DDPM config gives, the users' note) starts at
# T - T/steps, e.g. 980 of 1000 with 50 steps (Lin et al., "Common Diffusion Noise Schedules and Sample Steps are Flawed").
TIMESTEP_SPACINGS = ("trailing", "leading", "linspace")
TIME_SAMPLINGS = ("logit_normal", "uniform")


# --------------------------------------------------------------------------------------------------
# User IDs
# --------------------------------------------------------------------------------------------------


def validate_user_ids(user_ids: Sequence[int], num_users: int, flag: str = "--user_ids") -> list[int]:
    """Return ``user_ids`` as ints if every one lies in 1..num_users; otherwise a UserError naming the range and ``flag``."""
    if num_users < 1:
        raise UserError(f"The model knows {num_users} users; expected at least 1 (check the checkpoint's num_users).")
    ids = []
    bad = []
    for value in user_ids:
        try:
            if isinstance(value, bool):
                raise TypeError
            user = operator.index(value.item() if isinstance(value, torch.Tensor) else value)
        except (TypeError, ValueError):
            bad.append(value)
            continue
        (ids if 1 <= user <= num_users else bad).append(user)
    if bad:
        raise UserError(
            f"User ID(s) {bad} are outside the valid range 1..{num_users} (IDs count from 1, as in the ID_<n> "
            f"folders; 0 is not a user); pass {flag} between 1 and {num_users}."
        )
    if not ids:
        raise UserError(f"No user IDs given; pass {flag} with values between 1 and {num_users}.")
    return ids


def user_labels(user_ids: Sequence[int], num_users: int, device: torch.device | str | None = None) -> torch.Tensor:
    """Label-table rows for 1-based user IDs: user k -> row k - 1 (row num_users is the null user)."""
    return torch.tensor([user - 1 for user in validate_user_ids(user_ids, num_users)], dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------------------
# Rectified flow: objective
# --------------------------------------------------------------------------------------------------


def _randn(shape, generator: torch.Generator | None, device, dtype=torch.float32) -> torch.Tensor:
    if generator is None:
        return torch.randn(shape, device=device, dtype=dtype)
    return torch.randn(shape, generator=generator, device=generator.device, dtype=dtype).to(device)


def sample_flow_times(batch_size: int, time_sampling: str = "logit_normal", *, generator=None, device=None) -> torch.Tensor:
    """Training times in (0, 1): ``sigmoid(N(0, 1))`` (logit-normal, LightningDiT's ``use_lognorm``) or uniform."""
    if time_sampling == "logit_normal":
        return torch.sigmoid(_randn((batch_size,), generator, device))
    if time_sampling == "uniform":
        if generator is None:
            return torch.rand(batch_size, device=device)
        return torch.rand(batch_size, generator=generator, device=generator.device).to(device)
    raise UserError(f"Unknown time sampling {time_sampling!r}; choose one of {', '.join(TIME_SAMPLINGS)}.")


def flow_interpolate(x1: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The linear path and its velocity: ``x_t = t x1 + (1 - t) x0``, ``u = x1 - x0`` (t = 0 noise, 1 data)."""
    t = t.to(x1.dtype).view(-1, *([1] * (x1.ndim - 1)))
    return t * x1 + (1 - t) * x0, x1 - x0


def flow_matching_loss(
    model,
    latents: torch.Tensor,
    labels: torch.Tensor,
    *,
    time_sampling: str = "logit_normal",
    use_cosine_loss: bool = True,
    t: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> dict:
    """Velocity-matching loss of LightningDiT's transport for normalised latents ``latents`` (B,C,H,W).

    ``loss = mean |v - (x1 - x0)|^2`` plus, with ``use_cosine_loss``, the mean of ``1 - cos(v, x1 - x0)``
    over channels (per pixel), as LightningDiT trains. Pass ``t`` and ``noise`` for validation at fixed
    times. The model drops labels to the null user itself in training mode. Returns ``loss`` (to back-
    propagate) and detached ``mse``, ``cos`` (or None), ``mse_per_sample`` and the times ``t``.
    """
    if t is None:
        t = sample_flow_times(latents.shape[0], time_sampling, generator=generator, device=latents.device)
    if noise is None:
        noise = _randn(latents.shape, generator, latents.device, latents.dtype)
    xt, target = flow_interpolate(latents, noise, t)
    prediction = model(xt, t.to(latents.dtype), labels).float()
    target = target.float()
    mse = (prediction - target).pow(2).mean(dim=tuple(range(1, prediction.ndim)))
    loss = mse.mean()
    cos = None
    if use_cosine_loss:
        cos = (1 - F.cosine_similarity(prediction, target, dim=1)).flatten(1).mean(dim=1)
        loss = loss + cos.mean()
    return {
        "loss": loss,
        "mse": mse.mean().detach(),
        "cos": None if cos is None else cos.mean().detach(),
        "mse_per_sample": mse.detach(),
        "cos_per_sample": None if cos is None else cos.detach(),
        "t": t.detach(),
    }


# --------------------------------------------------------------------------------------------------
# DDPM (latent UNet): objective
# --------------------------------------------------------------------------------------------------


def build_noise_scheduler(
    num_train_timesteps: int = 1000, beta_schedule: str = "linear", prediction_type: str = "epsilon"
) -> DDPMScheduler:
    """The DDPM noise scheduler for the latent UNet; DDIM sampling is derived from its config.

    ``clip_sample`` is off: normalised latents are not bounded to [-1, 1] like pixels.
    """
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        clip_sample=False,
    )


@dataclass
class ObjectiveSetup:
    """What an objective needs beside the model and batch: the DDPM ``noise_scheduler`` (DDPM objective), the flow
    objective's ``time_sampling`` and ``use_cosine_loss``."""

    noise_scheduler: DDPMScheduler | None = None
    time_sampling: str = "logit_normal"
    use_cosine_loss: bool = True


def training_loss(backbone: str, model, latents, labels, setup: ObjectiveSetup | None = None, **draws) -> dict:
    """The training objective of ``backbone`` (its registry entry's): ``draws`` fixes ``times``, ``noise`` or ``generator``."""
    return BACKBONES.get(backbone).objective.loss(model, latents, labels, setup or ObjectiveSetup(), **draws)


# --------------------------------------------------------------------------------------------------
# Guidance
# --------------------------------------------------------------------------------------------------


def _model_output(model, x, timestep, labels, autocast_dtype) -> torch.Tensor:
    with torch.autocast(device_type=x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        return model(x, timestep, labels).float()


def guided_prediction(
    model,
    x: torch.Tensor,
    timestep: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_label: int | None,
    guidance_scale: float,
    guide: bool = True,
    guidance_channels: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    batched: bool | None = None,
) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)`` on the first ``guidance_channels`` channels (None = all).

    Unguided channels keep the conditional prediction (as in the reference). When ``guide`` is False or
    the scale is 1 only the conditional pass runs. ``batched``: the two passes as one doubled batch (None: on a GPU,
    where it halves the kernel launches; on the CPU the doubled batch measured slower per sample (docs/benchmarks.md),
    so there the passes run one after the other).
    """
    if not guide or guidance_scale == 1.0:
        return _model_output(model, x, timestep, labels, autocast_dtype)
    if null_label is None:
        raise UserError("This model was trained without a null user (label dropout 0), so guidance is impossible; use --guidance_scale 1.")
    null_labels = torch.full_like(labels, null_label)
    if batched if batched is not None else x.device.type != "cpu":
        both = _model_output(model, torch.cat([x, x]), torch.cat([timestep, timestep]), torch.cat([labels, null_labels]),
                             autocast_dtype)
        cond, uncond = both.chunk(2)
    else:
        cond = _model_output(model, x, timestep, labels, autocast_dtype)
        uncond = _model_output(model, x, timestep, null_labels, autocast_dtype)
    channels = cond.shape[1] if guidance_channels is None else guidance_channels
    guided = cond.clone()
    guided[:, :channels] = uncond[:, :channels] + guidance_scale * (cond[:, :channels] - uncond[:, :channels])
    return guided


def _in_interval(t: float, interval: tuple[float, float]) -> bool:
    return interval[0] <= t <= interval[1]


# --------------------------------------------------------------------------------------------------
# Samplers
# --------------------------------------------------------------------------------------------------


def shift_time(t, shift: float):
    """LightningDiT's timestep shift ``s t / (1 + (s - 1) t)``; s < 1 spends more steps near the noise."""
    return shift * t / (1 + (shift - 1) * t)


def flow_time_grid(num_steps: int, shift: float = 1.0) -> torch.Tensor:
    """``num_steps + 1`` times from 0 (noise) to 1 (data): a uniform grid remapped by :func:`shift_time`."""
    if num_steps < 1:
        raise UserError(f"The number of sampling steps must be at least 1, got {num_steps}.")
    if not shift > 0:
        raise UserError(f"The timestep shift must be positive (1 = no shift, LightningDiT uses 0.3), got {shift}.")
    grid = shift_time(torch.linspace(0.0, 1.0, num_steps + 1, dtype=torch.float64), shift)
    grid[0], grid[-1] = 0.0, 1.0  # exact ends: s / (1 + (s - 1)) rounds off 1 in floating point
    return grid


# The flow ODE's integrators: ``step(velocity, x, t, t_next) -> x at t_next``. The keys are ``--sampler``'s choices for
# the backbones trained with the flow objective.
FLOW_SAMPLERS: Registry[Callable] = Registry("flow sampler", flag="--sampler")


@FLOW_SAMPLERS.register("euler", help="Euler, one model call per step (LightningDiT's)")
def euler_step(velocity, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    return x + (t_next - t) * velocity(x, t)


@FLOW_SAMPLERS.register("heun", help="Heun's trapezoidal rule, two model calls per step (torchdiffeq's heun2)")
def heun_step(velocity, x: torch.Tensor, t: float, t_next: float) -> torch.Tensor:
    dt = t_next - t
    v = velocity(x, t)
    return x + 0.5 * dt * (v + velocity(x + dt * v, t_next))


@torch.no_grad()
def sample_flow(
    model,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_label: int | None,
    num_steps: int,
    sampler: str = "euler",
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    guidance_channels: int | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Integrate the velocity ODE from ``noise`` (t = 0) to data (t = 1) with Euler or Heun steps.

    ``num_steps`` updates on :func:`flow_time_grid`; Heun is the two-stage trapezoidal rule at every step
    (torchdiffeq's ``heun2``), two model calls per step. Guidance applies where the evaluation time lies in
    ``guidance_interval`` (LightningDiT's ``cfg_interval_start: 0.11`` is ``(0.11, 1.0)``).
    """
    integrate = FLOW_SAMPLERS.get(sampler)
    grid = flow_time_grid(num_steps, shift).tolist()  # Python floats: no device sync inside the loop
    x = noise.float()
    batch = x.shape[0]

    def velocity(state: torch.Tensor, t: float) -> torch.Tensor:
        timestep = torch.full((batch,), t, device=state.device, dtype=torch.float32)
        return guided_prediction(
            model, state, timestep, labels,
            null_label=null_label, guidance_scale=guidance_scale, guide=_in_interval(t, guidance_interval),
            guidance_channels=guidance_channels, autocast_dtype=autocast_dtype,
        )

    for step in tqdm(range(num_steps), desc="sampling", disable=not progress, leave=False):
        x = integrate(velocity, x, grid[step], grid[step + 1])
    return x


@torch.no_grad()
def sample_ddim(
    model,
    noise_scheduler: DDPMScheduler,
    noise: torch.Tensor,
    labels: torch.Tensor,
    *,
    null_label: int | None,
    num_steps: int,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    guidance_channels: int | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    generators: list[torch.Generator] | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
    sampler: str = "ddim",
) -> torch.Tensor:
    """DDIM sampling with ``DDIMScheduler.from_config(noise_scheduler.config)`` and the same guidance rules.

    ``sampler`` is any of ``models.ddpm_sampling.SAMPLERS`` (built by its ``make_sampler``, as the pixel DDPM's): the
    multistep solvers are deterministic, so ``eta`` must stay 0 for them; ``ddpm`` draws its noise from ``generators``.

    ``timestep_spacing`` overrides the config's (see :data:`TIMESTEP_SPACINGS`; ``leading`` is the users'
    note exactly). The guidance interval is read on the flow time scale ``t = 1 - timestep / num_train_timesteps``
    (0 = noise, 1 = data). ``eta > 0`` draws its per-step noise from ``generators`` (one per sample).
    """
    if num_steps < 1:
        raise UserError(f"The number of sampling steps must be at least 1, got {num_steps}.")
    if timestep_spacing not in TIMESTEP_SPACINGS:
        raise UserError(f"Unknown DDIM timestep spacing {timestep_spacing!r}; choose one of {', '.join(TIMESTEP_SPACINGS)}.")
    if eta and not SAMPLERS.get(sampler).takes_eta:
        raise UserError(f"--eta applies to DDIM; {sampler} is deterministic, drop --eta or use --sampler ddim.")
    scheduler = make_sampler(dict(noise_scheduler.config), sampler, num_steps, timestep_spacing=timestep_spacing)
    step_options = sampler_step_options(sampler, eta, generators)
    timesteps = scheduler.timesteps.tolist()  # on the CPU: no device sync inside the loop
    num_train = scheduler.config.num_train_timesteps
    x = noise.float() * scheduler.init_noise_sigma
    batch = x.shape[0]
    for timestep in tqdm(timesteps, desc="sampling", disable=not progress, leave=False):
        t_flow = 1.0 - timestep / num_train
        step_timesteps = torch.full((batch,), timestep, device=x.device, dtype=torch.long)
        prediction = guided_prediction(
            model, x, step_timesteps, labels,
            null_label=null_label, guidance_scale=guidance_scale, guide=_in_interval(t_flow, guidance_interval),
            guidance_channels=guidance_channels, autocast_dtype=autocast_dtype,
        )
        x = scheduler.step(prediction, timestep, x, **step_options).prev_sample
    return x


# --------------------------------------------------------------------------------------------------
# The one generation function
# --------------------------------------------------------------------------------------------------


def sample_seed(seed: int, user_id: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample ``index`` of ``user_id`` under run seed ``seed``."""
    if seed < 0 or index < 0:
        raise UserError(f"Seeds and sample indices must be non-negative, got seed {seed} and index {index}.")
    return int(np.random.SeedSequence([seed, user_id, index]).generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def initial_noise(
    seed: int, user_ids: Sequence[int], indices: Sequence[int], shape: tuple[int, ...]
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Per-sample N(0, I) noise drawn on the CPU (identical on every device) and the generators that drew it."""
    generators = [torch.Generator().manual_seed(sample_seed(seed, user, index)) for user, index in zip(user_ids, indices)]
    noise = torch.stack([torch.randn(shape, generator=g) for g in generators])
    return noise, generators


def _unwrap(model):
    """Strip DistributedDataParallel (``module``) and torch.compile (``_orig_mod``) wrappers."""
    while True:
        inner = getattr(model, "module", None)
        if inner is None:
            inner = getattr(model, "_orig_mod", None)
        if inner is None:
            return model
        model = inner


def backbone_num_users(model, backbone: str) -> int:
    """The number of users the model was built for (its own configuration, never a command-line guess)."""
    return BACKBONES.get(backbone).num_users(_unwrap(model))


def backbone_latent_shape(model, backbone: str) -> tuple[int, int, int]:
    return BACKBONES.get(backbone).latent_shape(_unwrap(model))


def generate_latents(
    model,
    backbone: str,
    user_ids: Sequence[int],
    num_per_user: int,
    *,
    seed: int,
    num_steps: int,
    sampler: str | None = None,
    guidance_scale: float = 1.0,
    guidance_interval: tuple[float, float] = (0.0, 1.0),
    shift: float = 1.0,
    guidance_channels: int | None = None,
    noise_scheduler: DDPMScheduler | None = None,
    eta: float = 0.0,
    timestep_spacing: str = "trailing",
    batch_size: int = 64,
    first_index: int = 0,
    items: Sequence[tuple[int, int]] | None = None,
    device: torch.device | str | None = None,
    autocast_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Generate normalised latents for 1-based ``user_ids``: the only sampling entry point.

    Returns a float32 CPU tensor (len(user_ids) * num_per_user, C, H, W), user-major: all samples of the
    first user (indices ``first_index ...``), then the next. Sample (seed, user, index) starts from the
    same noise whatever the batch, so a preview and ``infer.py`` agree; with the same batch layout they
    agree bit for bit, across layouts up to float rounding of batched matrix products. Denormalise with
    the latent statistics (``data/latents.py``) and decode with the VA-VAE to get images.

    ``items`` lists the (user, index) samples to draw instead, in order (``user_ids``, ``num_per_user`` and
    ``first_index`` are then ignored): ``infer.py user`` draws a large set in pieces this way, with the batches of
    one full run, so a resumed set equals an uninterrupted one.

    ``backbone`` is a :data:`BACKBONES` key; its objective decides the sampler family: the flow ODE (``sampler`` one of
    :data:`FLOW_SAMPLERS`, ``shift``) or DDPM (``sampler`` one of ``models.ddpm_sampling.SAMPLERS``, ``noise_scheduler``
    required, ``eta``, ``timestep_spacing``). The model runs in eval mode (its mode is restored afterwards); pass the
    EMA model.
    """
    spec = BACKBONES.get(backbone)
    sampler = sampler or spec.sampling_defaults["sampler"]
    allowed = spec.objective.samplers
    if sampler not in allowed:
        raise UserError(f"The {backbone} backbone samples with {', '.join(allowed)}, not {sampler!r}.")
    if spec.objective.uses_noise_scheduler and noise_scheduler is None:
        raise ValueError(f"The {backbone} backbone needs the noise_scheduler it was trained with.")
    setup = ObjectiveSetup(noise_scheduler=noise_scheduler)
    if items is not None:
        user_ids, num_per_user = [user for user, _ in items], 1
    if num_per_user < 1 or batch_size < 1 or not user_ids:
        raise UserError(f"num_per_user and batch_size must be at least 1 and a user given, got {num_per_user}, {batch_size} and "
                        f"{list(user_ids)}.")
    if guidance_scale < 0:
        raise UserError(f"The guidance scale must be >= 0 (1 = no guidance), got {guidance_scale}.")
    if guidance_channels is not None and guidance_channels < 1:
        raise UserError(f"guidance_channels must be a positive channel count or None (all), got {guidance_channels}.")
    inner = _unwrap(model)
    num_users = spec.num_users(inner)
    users = validate_user_ids(user_ids, num_users) if items is None else validate_user_ids(sorted(set(user_ids)), num_users)
    null_label = inner.null_label
    shape = spec.latent_shape(inner)
    device = torch.device(device) if device is not None else next(inner.parameters()).device
    if items is None:
        items = [(user, first_index + i) for user in users for i in range(num_per_user)]

    was_training = model.training
    model.eval()
    # Sample with gradients off on every parameter: PyTorch's CPU kernels can round differently when a weight
    # requires grad (even under no_grad), and a training preview must match infer.py bit for bit.
    grad_flags = [(parameter, parameter.requires_grad) for parameter in model.parameters()]
    for parameter, _ in grad_flags:
        parameter.requires_grad_(False)
    outputs = []
    try:
        for start in range(0, len(items), batch_size):
            chunk = items[start:start + batch_size]
            chunk_users = [user for user, _ in chunk]
            noise, generators = initial_noise(seed, chunk_users, [index for _, index in chunk], shape)
            noise = noise.to(device)
            labels = torch.tensor([user - 1 for user in chunk_users], dtype=torch.long, device=device)
            common = dict(
                null_label=null_label, num_steps=num_steps, guidance_scale=guidance_scale,
                guidance_interval=guidance_interval, guidance_channels=guidance_channels,
                autocast_dtype=autocast_dtype, progress=progress,
            )
            latents = spec.objective.sample(model, noise, labels, setup, sampler=sampler, generators=generators, shift=shift,
                                            eta=eta, timestep_spacing=timestep_spacing, **common)
            outputs.append(latents.float().cpu())
    finally:
        model.train(was_training)
        for parameter, flag in grad_flags:
            parameter.requires_grad_(flag)
    return torch.cat(outputs)


# --------------------------------------------------------------------------------------------------
# Objectives and backbones: the registry
# --------------------------------------------------------------------------------------------------


def _flow_loss(model, latents, labels, setup: ObjectiveSetup, *, times=None, noise=None, generator=None) -> dict:
    return flow_matching_loss(model, latents, labels, time_sampling=setup.time_sampling, use_cosine_loss=setup.use_cosine_loss,
                              t=times, noise=noise, generator=generator)


def _flow_sample(model, noise, labels, setup: ObjectiveSetup, *, sampler, generators, shift, eta, timestep_spacing, **common):
    return sample_flow(model, noise, labels, sampler=sampler, shift=shift, **common)


def _ddpm_objective_loss(model, latents, labels, setup: ObjectiveSetup, *, times=None, noise=None, generator=None) -> dict:
    if setup.noise_scheduler is None:
        raise ValueError("The DDPM objective needs its noise_scheduler.")
    return ddpm_loss(model, setup.noise_scheduler, latents, labels, timesteps=times, noise=noise, generator=generator)


def _ddpm_sample(model, noise, labels, setup: ObjectiveSetup, *, sampler, generators, shift, eta, timestep_spacing, **common):
    return sample_ddim(model, setup.noise_scheduler, noise, labels, eta=eta, timestep_spacing=timestep_spacing,
                       generators=generators, sampler=sampler, **common)


def _ddpm_timestep(t: float, setup: ObjectiveSetup) -> int:
    # Flow time (0 noise, 1 data) -> the DDPM timestep of the same place on the path.
    num_train = setup.noise_scheduler.config.num_train_timesteps
    return min(num_train - 1, int(round((1.0 - t) * num_train)))


@dataclass(frozen=True)
class Objective:
    """A training objective and the sampler family that inverts it.

    ``loss(model, latents, labels, setup, *, times, noise, generator) -> dict`` (``loss`` to back-propagate, detached
    ``mse_per_sample`` and, where the objective has one, ``cos_per_sample``); ``draw_time(generator, setup)`` draws one
    training time as ``loss`` does (seeded validation); ``time_at(t, setup)`` is the objective's time at flow time ``t``
    (0 noise, 1 data); ``sample(model, noise, labels, setup, *, sampler, generators, shift, eta, timestep_spacing,
    **guidance)`` integrates from noise to latents with a sampler of ``samplers``; ``sampling_flags``: the sampling
    options it honours (the others are refused on the command line).
    """

    loss: Callable[..., dict]
    draw_time: Callable[[torch.Generator, ObjectiveSetup], torch.Tensor]
    time_at: Callable[[float, ObjectiveSetup], float | int]
    sample: Callable[..., torch.Tensor]
    samplers: Registry
    sampling_flags: frozenset[str]
    uses_noise_scheduler: bool = False


RECTIFIED_FLOW = Objective(
    loss=_flow_loss,
    draw_time=lambda generator, setup: sample_flow_times(1, setup.time_sampling, generator=generator)[0],
    time_at=lambda t, setup: float(t),
    sample=_flow_sample,
    samplers=FLOW_SAMPLERS,
    sampling_flags=frozenset({"shift"}),
)
DDPM = Objective(
    loss=_ddpm_objective_loss,
    draw_time=lambda generator, setup: torch.randint(0, setup.noise_scheduler.config.num_train_timesteps, (), generator=generator),
    time_at=_ddpm_timestep,
    sample=_ddpm_sample,
    samplers=SAMPLERS,
    sampling_flags=frozenset({"eta", "timestep_spacing"}),
    uses_noise_scheduler=True,
)


def plain_config(config) -> dict:
    """A diffusers config as plain data (no private ``_`` keys, lists for tuples): checkpoint- and YAML-safe."""
    return config_to_dict({k: v for k, v in dict(config).items() if not str(k).startswith("_")})


@dataclass
class NewBackbone:
    """What :attr:`BackboneSpec.build` returns: the model, the QK-norm setting it has (DiT) and a line for the log."""

    model: nn.Module
    qk_norm: bool | None = None
    note: str = ""


@dataclass(frozen=True)
class BackboneSpec:
    """One user-conditioned backbone behind one registry key: network, objective, sampler family and defaults.

    The key is ``--backbone``'s choice and the ``backbone`` recorded in every checkpoint. The network that ``build``
    returns and ``from_config`` rebuilds must meet this interface (the objectives, :func:`generate_latents`, the EMA,
    guidance and the trainer rely on nothing else):

    * ``model(x, t, labels) -> prediction`` of ``x``'s shape, ``labels`` 0-based user rows, ``t`` the objective's time
      (flow time in [0, 1] or an integer DDPM timestep);
    * ``model.null_label``: the label row of the null user (row ``num_users``), or None when it was built without
      label dropout; in training mode the model drops labels to it itself (classifier-free guidance);
    * the spec's ``num_users(model)`` and ``latent_shape(model)`` read what it was built for from its own
      configuration (LightningDiT's ``config.num_classes`` and ``config.input_size``, the UNet's ``num_users`` and
      ``unet.config.sample_size``); ``config_of(model)`` gives JSON-able constructor arguments and ``from_config``
      takes them back; ``enable_gradient_checkpointing(model)`` turns on activation checkpointing.

    ``build(size, *, num_users, in_channels, input_size, patch_size, cfg_dropout, qk_norm, gradient_checkpointing,
    init_from) -> NewBackbone`` (a backbone ignores the settings that do not apply to it); ``sizes`` are
    ``--model_size``'s choices, ``default_size`` the one without it; ``sampling_defaults`` the settings previews and
    ``infer.py user`` sample with; ``supports_init_from``: whether ``--init_from`` (LightningDiT release weights)
    applies; ``exports_unet_folder``: ``best.ckpt`` also gets the users' latent-UNet folder layout.
    """

    title: str
    build: Callable[..., NewBackbone]
    config_of: Callable[[nn.Module], dict]
    from_config: Callable[[dict], nn.Module]
    num_users: Callable[[nn.Module], int]
    latent_shape: Callable[[nn.Module], tuple[int, int, int]]
    enable_gradient_checkpointing: Callable[[nn.Module], None]
    objective: Objective
    sizes: tuple[str, ...]
    default_size: str
    sampling_defaults: dict = field(default_factory=dict)
    supports_init_from: bool = False
    exports_unet_folder: bool = False


def _build_dit(size, *, num_users, in_channels, input_size, patch_size, cfg_dropout, qk_norm, gradient_checkpointing,
               init_from) -> NewBackbone:
    """A new LightningDiT; with ``init_from``, a release's weights (its QK-norm setting unless ``qk_norm`` is given)."""
    release = None
    chosen = qk_norm if qk_norm is not None else True
    if init_from:
        release = read_lightningdit_release(init_from)
        if qk_norm is None:
            chosen = release_uses_qknorm(release)
    model = build_dit(size, num_users=num_users, input_size=input_size, in_channels=in_channels, patch_size=patch_size,
                      class_dropout_prob=cfg_dropout, use_qknorm=chosen, use_checkpoint=gradient_checkpointing)
    note = ""
    if release is not None:
        report = load_lightningdit_init(model, release, num_users=num_users, source=init_from)
        note = (f"--init_from {init_from} (QK-norm {'on' if chosen else 'off'}"
                f"{', as the release' if qk_norm is None else ', from --qk_norm'}): {report.summary()}")
    return NewBackbone(model, chosen, note)


def _build_unet(size, *, num_users, in_channels, input_size, patch_size, cfg_dropout, qk_norm, gradient_checkpointing,
                init_from) -> NewBackbone:
    # The UNet has no patches and no QK-norm: patch_size and qk_norm do not apply.
    if init_from:
        raise UserError("--init_from loads LightningDiT weights and works with --backbone dit only.")
    model = build_user_unet(size, num_users=num_users, in_channels=in_channels, sample_size=input_size, dropout_prob=cfg_dropout)
    if gradient_checkpointing:
        model.unet.enable_gradient_checkpointing()
    return NewBackbone(model, qk_norm)


def _dit_from_config(config: dict) -> nn.Module:
    return LightningDiT(**config)


def _unet_from_config(config: dict) -> nn.Module:
    return UserConditionedUNet(UNet2DConditionModel(**config["unet"]), UserConditionEncoder(**config["condition_encoder"]))


def _unet_latent_shape(model) -> tuple[int, int, int]:
    size = model.unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    return (model.unet.config.in_channels, height, width)


def _enable_dit_checkpointing(model) -> None:
    model.gradient_checkpointing = True


BACKBONES: Registry[BackboneSpec] = Registry("backbone", flag="--backbone")
# DiT: LightningDiT's release sampling (Euler on a 250-point grid shifted by 0.3, guidance from t = 0.11 on) with the
# users' guidance 4.0; num_steps counts updates, so 250 here is one more update than the reference's "250 steps".
BACKBONES.register("dit", BackboneSpec(
    title="DiT",
    build=_build_dit,
    config_of=lambda model: plain_config(model.config),
    from_config=_dit_from_config,
    num_users=lambda model: model.config.num_classes,
    latent_shape=lambda model: (model.config.in_channels, model.config.input_size, model.config.input_size),
    enable_gradient_checkpointing=_enable_dit_checkpointing,
    objective=RECTIFIED_FLOW,
    sizes=tuple(DIT_SIZES),
    default_size="B",
    sampling_defaults={"sampler": "euler", "num_steps": 250, "guidance_scale": 4.0, "guidance_interval": [0.11, 1.0], "shift": 0.3,
                       "guidance_channels": None, "eta": 0.0},
    supports_init_from=True,
), help="LightningDiT, rectified flow (velocity, logit-normal times, cosine term), Euler/Heun ODE sampling")
# UNet: DDIM as in the users' note (20 steps there, 50 here).
BACKBONES.register("unet", BackboneSpec(
    title="UNet",
    build=_build_unet,
    config_of=lambda model: {"unet": plain_config(model.unet.config), "condition_encoder": plain_config(model.condition_encoder.config)},
    from_config=_unet_from_config,
    num_users=lambda model: model.num_users,
    latent_shape=_unet_latent_shape,
    enable_gradient_checkpointing=lambda model: model.unet.enable_gradient_checkpointing(),
    objective=DDPM,
    sizes=tuple(UNET_SIZES),
    default_size="default",
    sampling_defaults={"sampler": "ddim", "num_steps": 50, "guidance_scale": 4.0, "guidance_interval": [0.0, 1.0], "shift": 1.0,
                       "guidance_channels": None, "eta": 0.0, "timestep_spacing": "trailing"},
    exports_unet_folder=True,
), help="the users' latent UNet2DConditionModel + user encoder, DDPM noise prediction, DDIM/DPM-Solver++/UniPC sampling")


def sampler_names() -> tuple[str, ...]:
    """Every backbone's samplers, once each: ``--sampler``'s choices before the backbone is known."""
    return tuple(dict.fromkeys(name for _, spec in BACKBONES.items() for name in spec.objective.samplers))


def build_backbone(backbone: str, model_config: dict) -> nn.Module:
    """A freshly initialised model of ``backbone`` from its recorded constructor arguments (``spec.config_of``)."""
    spec = BACKBONES.get(backbone)
    try:
        return spec.from_config(model_config)
    except (TypeError, KeyError, ValueError) as err:
        raise CheckpointError(
            f"The checkpoint's {backbone} configuration does not build a model ({err}); it was written by another version."
        ) from err
