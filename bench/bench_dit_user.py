"""User-conditioned LightningDiT benchmarks: training latents/s and peak memory per size, sampling s per image.

    python bench/bench_dit_user.py                                    # all sizes on the GPU (tiny, S, B, L, XL)
    python bench/bench_dit_user.py --sizes B XL --batch 32 --gradient_checkpointing
    python bench/bench_dit_user.py --device cpu --sizes tiny S --train_steps 3 --sample_sizes tiny --sample_batch 4

Training: the step of ``train_dit_user.py`` on 32x16x16 VA-VAE-shaped latents for 31 users (flow-matching loss with
the cosine term and logit-normal times, label dropout, autocast as the trainer picks it with fp16 loss scaling,
gradient clipping, AdamW, EMA update) at a fixed batch after warm-up steps; QK-norm on as the trainer's default.
Sampling: ``generate_latents`` (the one sampler) with classifier-free guidance 4.0 on all channels and shift 0.3, for
Euler-250 (the reference's 250-point grid, 249 updates here), Euler-50 and Heun-25, each with guidance over the whole
trajectory and with LightningDiT's interval (from t = 0.11 on, where the unconditional pass is skipped); "model
passes" counts conditional + unconditional batch evaluations. Seconds per image = wall time / batch. Random
weights: the cost does not depend on them. Prints Markdown tables; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import bench_device, scaled_optimizer_step, synchronize, time_steps  # noqa: E402
from models.dit import DIT_SIZES, build_dit  # noqa: E402
from models.user_generation import flow_matching_loss, flow_time_grid, generate_latents  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402
from utils.ema import EMA  # noqa: E402

NUM_USERS = 31
LATENT = (32, 16, 16)
SAMPLING_CONFIGS = {"euler250": ("euler", 249), "euler50": ("euler", 50), "heun25": ("heun", 25)}
GUIDANCE_INTERVALS = {"whole": (0.0, 1.0), "from 0.11": (0.11, 1.0)}


def bench_training(size: str, batch: int, steps: int, warmup: int, device, dtype, checkpointing: bool) -> dict:
    torch.manual_seed(0)
    model = build_dit(size, num_users=NUM_USERS, use_qknorm=True, use_checkpoint=checkpointing).to(device).train()
    ema = EMA(model, decay=0.9999)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    latents = torch.randn(batch, *LATENT, device=device)
    labels = torch.randint(0, NUM_USERS, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.empty_cache()

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = flow_matching_loss(model, latents, labels)["loss"]
        scaled_optimizer_step(loss, optimizer, scaler, model.parameters())
        ema.update(model)

    seconds, peak_gib = time_steps(step, warmup, steps, device)
    peak = f"{peak_gib:.2f}" if device.type == "cuda" else "n/a"
    params = sum(p.numel() for p in model.parameters()) / 1e6
    return {"size": size, "params": params, "batch": batch, "latents_s": batch * steps / seconds, "peak_gib": peak}


def model_passes(sampler: str, num_steps: int, interval: tuple[float, float], shift: float) -> int:
    """Batch evaluations of the model: 1 per evaluation time, 2 where guidance runs the null user too."""
    grid = flow_time_grid(num_steps, shift).tolist()
    times = [grid[i] for i in range(num_steps)]
    if sampler == "heun":
        times += [grid[i + 1] for i in range(num_steps)]
    return sum(2 if interval[0] <= t <= interval[1] else 1 for t in times)


def bench_sampling(size: str, batch: int, device, dtype, shift: float, guidance: float, configs: dict | None = None) -> list[dict]:
    torch.manual_seed(0)
    model = build_dit(size, num_users=NUM_USERS, use_qknorm=True).to(device).eval()
    generate_latents(model, "dit", [1], batch, seed=0, num_steps=2, guidance_scale=guidance, device=device, autocast_dtype=dtype)
    rows = []
    for name, (sampler, steps) in (configs or SAMPLING_CONFIGS).items():
        for interval_name, interval in GUIDANCE_INTERVALS.items():
            synchronize(device)
            started = time.perf_counter()
            generate_latents(model, "dit", [1], batch, seed=0, num_steps=steps, sampler=sampler, guidance_scale=guidance,
                             guidance_interval=interval, shift=shift, batch_size=batch, device=device, autocast_dtype=dtype)
            synchronize(device)
            rows.append({"config": f"{sampler.capitalize()}-{steps}", "name": name, "interval": interval_name,
                         "passes": model_passes(sampler, steps, interval, shift),
                         "s_per_image": (time.perf_counter() - started) / batch})
            print(f"| {size} | {rows[-1]['config']} | {interval_name} | {rows[-1]['passes']} | {rows[-1]['s_per_image']:.4f} |", flush=True)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(DIT_SIZES), help=f"DiT sizes to train ({', '.join(DIT_SIZES)}; default all)")
    parser.add_argument("--batch", type=int, default=32, help="training batch per step (default 32, the users' batch per GPU)")
    parser.add_argument("--train_steps", type=int, default=20, help="timed training steps (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up steps (default 3)")
    parser.add_argument("--gradient_checkpointing", action="store_true", help="recompute activations (less memory, slower)")
    parser.add_argument("--sample_sizes", nargs="*", default=None, help="DiT sizes to time sampling for (default: --sizes; none: skip)")
    parser.add_argument("--sample_batch", type=int, default=16, help="images generated at once (default 16)")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="guidance of the sampling runs (default 4.0)")
    parser.add_argument("--shift", type=float, default=0.3, help="timestep shift (default 0.3, LightningDiT's)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="autocast on the GPU (default auto: bf16 where supported, else fp16); fp32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (DiT tiny, batch 2, one "
                        "training step, 2-step samplers; overrides sizes, batches, steps and device)")
    args = parser.parse_args(argv)
    configs = None
    if args.smoke:
        args.sizes, args.sample_sizes, args.batch, args.sample_batch = ["tiny"], ["tiny"], 2, 1
        args.train_steps, args.warmup, args.device, args.precision = 1, 0, "cpu", "fp32"
        configs = {name: (sampler, 2) for name, (sampler, _) in SAMPLING_CONFIGS.items()}

    device, dtype, precision = bench_device(args.device, args.precision)
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | latents {LATENT}, {NUM_USERS} users"
          f"{' | gradient checkpointing' if args.gradient_checkpointing else ''}\n")
    print("| DiT size | parameters | batch | train latents/s | peak GiB |")
    print("|---|---:|---:|---:|---:|")
    for size in args.sizes:
        r = bench_training(size, args.batch, args.train_steps, args.warmup, device, dtype, args.gradient_checkpointing)
        print(f"| {size} | {r['params']:.1f}M | {r['batch']} | {r['latents_s']:.1f} | {r['peak_gib']} |", flush=True)
    sample_sizes = args.sizes if args.sample_sizes is None else args.sample_sizes
    if not sample_sizes:
        return
    print(f"\n| DiT size | sampler (guidance {args.guidance_scale:g}, shift {args.shift:g}, batch {args.sample_batch}) | "
          "guidance interval | model passes | s per image |")
    print("|---|---|---|---:|---:|")
    for size in sample_sizes:
        bench_sampling(size, args.sample_batch, device, dtype, args.shift, args.guidance_scale, configs)


if __name__ == "__main__":
    main()
