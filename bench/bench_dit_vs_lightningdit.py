"""User-conditioned DiT: our training step and sampler against LightningDiT's own code, at equal weights.

    python bench/bench_dit_vs_lightningdit.py --lightningdit_repo ~/src/LightningDiT                 # GPU: DiT-B, batch 32
    python bench/bench_dit_vs_lightningdit.py --lightningdit_repo DIR --device cpu --size S --batch 8 --sample_steps 25
    python bench/bench_dit_vs_lightningdit.py --smoke            # tiny CPU setting (seconds; the reference if given)

The reference model is LightningDiT's ``models/lightningdit.py`` with its release flags (SwiGLU, RoPE, RMSNorm, no
QK-norm), built at our size preset's depth and width for 31 users on 32 x 16 x 16 latents; ours (``models/dit.py``)
loads its state dict strictly, and the bench prints the largest output difference to show the two compute the same.
Training step, each as its code trains: the reference's ``transport.training_losses`` (linear path, velocity,
cosine term, log-normal times) with its ``train.py`` update (AdamW betas 0.9/0.95, its per-parameter ``train.update_ema``;
no clipping, as its configuration has no ``max_grad_norm``) against ours as train_dit_user.py runs it
(``flow_matching_loss``, clipping at 1, fused AdamW as the trainer, ``utils.ema.EMA``'s foreach lerp), autocast as the
trainers pick it. Sampling, guidance 4 from
t = 0.11 on, shift 0.3: the reference's ``Sampler.sample_ode`` (torchdiffeq Euler on a 250-point grid) with the
model's ``forward_with_cfg`` (always the doubled batch) against ours (``sample_flow``, the sampler
``generate_latents`` calls: Euler with 249 updates on the same grid, the unconditional half skipped outside the
interval). Rounds alternate ours and the reference after warm-up; medians are printed with ours / reference.

The reference is read from a local checkout (``--lightningdit_repo``), never from this repository; it needs
``einops`` and ``torchdiffeq`` (pip), and imports ``fairscale`` in ``rmsnorm.py`` without using it there, so an
empty stand-in module takes its place when fairscale is missing. Prints Markdown tables; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import sys
import time
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    bench_device,
    import_from_checkout,
    interleave,
    median,
    missing_checkout,
    precision_name,
    scaled_optimizer_step,
    synchronize,
)
from models.dit import DIT_SIZES, LightningDiT, build_dit, dit_config  # noqa: E402
from models.user_generation import flow_matching_loss, sample_flow  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402
from utils.ema import EMA  # noqa: E402
from utils.training import fused_optimizer  # noqa: E402

NUM_USERS = 31
LATENT = (32, 16, 16)
RELEASE_FLAGS = dict(use_qknorm=False, use_swiglu=True, use_rope=True, use_rmsnorm=True, wo_shift=False)


def install_fairscale_stand_in() -> None:
    try:
        import fairscale  # noqa: F401

        return
    except ImportError:
        pass
    names = ["fairscale", "fairscale.nn", "fairscale.nn.model_parallel", "fairscale.nn.model_parallel.initialize",
             "fairscale.nn.model_parallel.layers"]
    for name in names:
        sys.modules[name] = types.ModuleType(name)
    layers = sys.modules["fairscale.nn.model_parallel.layers"]
    layers.ColumnParallelLinear = layers.ParallelEmbedding = layers.RowParallelLinear = None
    sys.modules["fairscale.nn.model_parallel"].initialize = sys.modules["fairscale.nn.model_parallel.initialize"]


def load_reference(root: str):
    """The checkout's (``models.lightningdit``, ``transport``, ``train``) modules."""
    install_fairscale_stand_in()
    return import_from_checkout(root, "models.lightningdit", "transport", "train")


def build_pair(lightningdit, size: str, device) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(ours, reference) with equal weights."""
    config = dit_config(size, num_users=NUM_USERS, input_size=LATENT[1], in_channels=LATENT[0], **RELEASE_FLAGS)
    accepted = inspect.signature(lightningdit.LightningDiT.__init__).parameters
    torch.manual_seed(0)
    reference = lightningdit.LightningDiT(**{key: value for key, value in config.items() if key in accepted})
    with torch.no_grad():  # adaLN-Zero starts with a zero output: random weights make the equality check mean something
        for parameter in reference.parameters():
            if parameter.requires_grad:
                parameter.normal_(0.0, 0.05)
    ours = LightningDiT(**config)
    ours.load_state_dict(reference.state_dict(), strict=True)
    return ours.to(device), reference.to(device)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lightningdit_repo", default=None, help="a checkout of github.com/hustvl/LightningDiT; without it "
                        "only our rows run")
    parser.add_argument("--size", choices=list(DIT_SIZES), default="B", help="DiT size for both (default B)")
    parser.add_argument("--batch", type=int, default=32, help="training batch (default 32, the users' batch per GPU)")
    parser.add_argument("--train_steps", type=int, default=10, help="timed training steps per round (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before the rounds (default 3)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--sample_batch", type=int, default=16, help="images sampled at once (default 16)")
    parser.add_argument("--sample_steps", type=int, default=250, help="grid points of the reference (default 250, its "
                        "setting; ours takes one update fewer on the same grid)")
    parser.add_argument("--guidance_scale", type=float, default=4.0)
    parser.add_argument("--max_grad_norm", type=float, default=1.0, help="our clipping, as train_dit_user.py's flag "
                        "(default 1.0, its default; 0 = none, as LightningDiT's configuration: equal work)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast on the GPU (default auto: bf16 where supported, else fp16); fp32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--compile", action="store_true", help="add a row for ours under torch.compile (the reference "
                        "compiles its blocks with @torch.compile as written)")
    parser.add_argument("--reference_eager", action="store_true", help="run the reference with its @torch.compile "
                        "decorators off (torch.compiler.set_stance('force_eager')): eager against eager")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (DiT tiny, batch 4, "
                        "2 steps, one round, 5-point sampling grid)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.batch, args.train_steps, args.warmup, args.rounds = "tiny", 4, 2, 1, 1
        args.sample_batch, args.sample_steps, args.device = 2, 5, "cpu"
    return args


def main(args: argparse.Namespace) -> dict:
    device, dtype, precision = bench_device(args.device, args.precision)
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | DiT-{args.size}, "
          f"latents {LATENT}, {NUM_USERS} users | batch {args.batch} | {args.rounds} rounds\n")
    have_reference = not missing_checkout("--lightningdit_repo", args.lightningdit_repo, "models/lightningdit.py",
                                          "github.com/hustvl/LightningDiT")
    if have_reference:
        lightningdit, transport_pkg, reference_train = load_reference(args.lightningdit_repo)
        ours, reference = build_pair(lightningdit, args.size, device)
    else:
        torch.manual_seed(0)
        ours, reference = build_dit(args.size, num_users=NUM_USERS, **RELEASE_FLAGS).to(device), None
    latents = torch.randn(args.batch, *LATENT, device=device)
    labels = torch.randint(0, NUM_USERS, (args.batch,), device=device)
    amp = dict(device_type=device.type, dtype=dtype or torch.float32, enabled=dtype is not None)

    def reference_stance():
        if args.reference_eager:
            return torch.compiler.set_stance("force_eager")
        return contextlib.nullcontext()

    if reference is not None:
        ours.eval(), reference.eval()
        t = torch.rand(args.batch, device=device)
        with torch.no_grad(), reference_stance():
            expected = reference(latents, t, labels)
            difference = (ours(latents, t, labels) - expected).abs().max().item()
        print(f"equal weights: largest output difference ours - reference {difference:.2e} (outputs of mean size "
              f"{expected.abs().mean().item():.2f}; {precision_name(None)})\n")

    # ---- training steps
    ours.train()
    ema = EMA(ours, decay=0.9999)
    optimizer = torch.optim.AdamW(ours.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=0.0,
                                  fused=fused_optimizer(device))  # as train_dit_user.py
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def our_step():
        with torch.autocast(**amp):
            loss = flow_matching_loss(ours, latents, labels)["loss"]
        scaled_optimizer_step(loss, optimizer, scaler, ours.parameters(), args.max_grad_norm)
        ema.update(ours)

    steps = {"ours": our_step}
    compiled = torch.compile(ours) if args.compile else None
    if compiled is not None:

        def our_compiled_step():
            with torch.autocast(**amp):
                loss = flow_matching_loss(compiled, latents, labels)["loss"]
            scaled_optimizer_step(loss, optimizer, scaler, ours.parameters(), args.max_grad_norm)
            ema.update(ours)

        steps["ours, torch.compile"] = our_compiled_step

    if reference is not None:
        reference.train()
        reference_ema = copy.deepcopy(reference).eval().requires_grad_(False)
        update_ema = reference_train.update_ema
        transport = transport_pkg.create_transport("Linear", "velocity", None, None, None, use_cosine_loss=True,
                                                   use_lognorm=True)
        reference_optimizer = torch.optim.AdamW(reference.parameters(), lr=2e-4, weight_decay=0, betas=(0.9, 0.95))
        reference_scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

        def reference_step():
            with reference_stance(), torch.autocast(**amp):
                terms = transport.training_losses(reference, latents, dict(y=labels))
                loss = terms["cos_loss"].mean() + terms["loss"].mean()
            reference_optimizer.zero_grad()
            reference_scaler.scale(loss).backward()
            reference_scaler.step(reference_optimizer)
            reference_scaler.update()
            update_ema(reference_ema, reference)

        steps["reference"] = reference_step

    def timed(step):
        def run() -> float:
            synchronize(device)
            started = time.perf_counter()
            for _ in range(args.train_steps):
                step()
            synchronize(device)
            return (time.perf_counter() - started) / args.train_steps

        return run

    for step in steps.values():
        for _ in range(args.warmup):
            step()
    train = interleave({name: timed(step) for name, step in steps.items()}, args.rounds)

    # ---- sampling
    null = NUM_USERS
    noise = torch.randn(args.sample_batch, *LATENT, device=device)
    users = torch.randint(0, NUM_USERS, (args.sample_batch,), device=device)
    ours.eval()

    def our_sampling() -> torch.Tensor:
        return sample_flow(ours, noise, users, null_label=null, num_steps=args.sample_steps - 1,
                           guidance_scale=args.guidance_scale, guidance_interval=(0.11, 1.0), shift=0.3,
                           autocast_dtype=dtype)

    samplers = {"ours": our_sampling}
    if compiled is not None:
        samplers["ours, torch.compile"] = lambda: sample_flow(
            compiled, noise, users, null_label=null, num_steps=args.sample_steps - 1, guidance_scale=args.guidance_scale,
            guidance_interval=(0.11, 1.0), shift=0.3, autocast_dtype=dtype)
    if reference is not None:
        reference.eval()
        sample_ode = transport_pkg.Sampler(transport).sample_ode(sampling_method="euler", num_steps=args.sample_steps,
                                                                 timestep_shift=0.3)

        @torch.no_grad()
        def reference_sampling() -> torch.Tensor:
            with reference_stance(), torch.autocast(**amp):
                both = sample_ode(torch.cat([noise, noise]), reference.forward_with_cfg,
                                  y=torch.cat([users, torch.full_like(users, null)]), cfg_scale=args.guidance_scale,
                                  cfg_interval=True, cfg_interval_start=0.11)[-1]
            return both[: args.sample_batch].float()

        samplers["reference"] = reference_sampling

    def timed_sampler(fn):
        def run() -> float:
            synchronize(device)
            started = time.perf_counter()
            fn()
            synchronize(device)
            return (time.perf_counter() - started) / args.sample_batch

        return run

    for fn in samplers.values():
        fn()  # warm-up (also the sampling grids' first calls)
    sample = interleave({name: timed_sampler(fn) for name, fn in samplers.items()}, args.rounds)

    params = sum(p.numel() for p in ours.parameters()) / 1e6
    print(f"| DiT-{args.size} ({params:.1f}M) | training s per step (batch {args.batch}) | latents/s | "
          f"sampling s per image (Euler, {args.sample_steps}-point grid, batch {args.sample_batch}) |")
    print("|---|---:|---:|---:|")
    rows = {}
    for name in steps:
        rows[name] = (median(train[name]), median(sample[name]))
        label = {"reference": "LightningDiT" + (" (eager)" if args.reference_eager else " (its @torch.compile)")}.get(name, name)
        print(f"| {label} | {rows[name][0]:.4f} | {args.batch / rows[name][0]:.1f} | {rows[name][1]:.4f} |")
    if "reference" in rows:
        print(f"| ours / LightningDiT | {rows['ours'][0] / rows['reference'][0]:.3f} | | "
              f"{rows['ours'][1] / rows['reference'][1]:.3f} |")
    return rows


if __name__ == "__main__":
    main(parse_args())
