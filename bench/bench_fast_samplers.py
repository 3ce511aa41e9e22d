"""Pixel DDPM: fast samplers (DPM-Solver++, UniPC at 10-25 steps) against DDIM-50/100 and DDPM-1000, at equal noise.

    python bench/bench_fast_samplers.py --checkpoint checkpoints/demo_32x32/ddpm_last.pt --samples 64
    python bench/bench_fast_samplers.py --smoke           # untrained tiny UNet, 16 px, short references (seconds)

Every sampler starts from the same seeded noise (``sample_ddpm``'s ``initial_noise``) with the model's EMA weights.
Scores, all without downloaded weights (no Inception network offline; ``scripts/eval_generation.py`` computes FID/KID
where its weights are present):

* **ODE error**: RMS distance (on [-1, 1] pixels) to DDIM-1000 from the same noise. Without clipping
  (``--no_clip``) DDIM at eta 0, DPM-Solver++ and UniPC all integrate the same probability-flow ODE and DDIM-1000 is
  its solution to within a small step error, so a sampler closer to it solves the ODE better. With the DDPM's x0
  clipping (the default, as the samplers run in training grids and ``infer.py``) they do not: diffusers' DDIM steps
  with the clipped x0 and the unclipped noise prediction, DPM-Solver++ and UniPC with the clipped x0 alone, so the
  two families converge to different images and this column only compares DDIM step counts.
* **to DDPM-1000**: RMS distance to ancestral DDPM-1000 samples from the same starting noise (the issue's stop-gap
  measure). Ancestral sampling adds fresh noise at every step, so its samples differ from any ODE sample from the
  same start by far more than the solvers differ among themselves: this column cannot rank the solvers, and is
  printed to show that.
* **pixel MMD**: unbiased squared MMD (cubic polynomial kernel, as KID) between the samples and the training images,
  on 8 x 8 average-pooled pixels (192 values): a distribution distance that needs no network; the estimator is
  unbiased, so values below zero are noise, and the DDPM-1000 row gives its scale (0.014 and 0.085 in two draws of 16
  and 32 samples from one model). Only with ``--data_dir``. With clipping, the column that compares the families.

"model passes" counts UNet evaluations (each solver step is one). Seconds per image on this device, batch
``--batch``. Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import synchronize  # noqa: E402
from models.ddpm_sampling import initial_noise, load_ddpm_for_sampling, make_noise_scheduler, sample_ddpm  # noqa: E402
from models.ddpm_unet import build_ddpm_unet  # noqa: E402
from utils.accelerator import describe_device, resolve_device  # noqa: E402

CANDIDATES = [
    ("ddim", 100), ("ddim", 50), ("ddim", 25), ("ddim", 10),
    ("dpmsolver++", 25), ("dpmsolver++", 20), ("dpmsolver++", 15), ("dpmsolver++", 10),
    ("unipc", 25), ("unipc", 20), ("unipc", 15), ("unipc", 10),
]


def pooled_features(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) in [-1, 1] -> (N, 192): 8 x 8 average pooling, flattened."""
    return F.adaptive_avg_pool2d(images.float(), 8).flatten(1)


def polynomial_mmd(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased squared MMD with KID's kernel k(a, b) = (a.b / d + 1) ** 3 (Binkowski et al. 2018)."""
    d = x.shape[1]
    kxx, kyy, kxy = ((x @ x.T / d + 1) ** 3, (y @ y.T / d + 1) ** 3, (x @ y.T / d + 1) ** 3)
    m, n = x.shape[0], y.shape[0]
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return float(within_x + within_y - 2 * kxy.mean())


def rms(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).pow(2).mean().sqrt())


def load_images(folder: str, size: int, limit: int) -> torch.Tensor:
    from PIL import Image

    files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in {".png", ".jpg", ".jpeg"})[:limit]
    tensors = []
    for path in files:
        image = Image.open(path).convert("RGB").resize((size, size), Image.BICUBIC)
        tensors.append(torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).reshape(size, size, 3))
    return torch.stack(tensors).permute(0, 3, 1, 2).float() / 127.5 - 1


def timed_sample(unet, config, noise, sampler, steps, batch, device) -> tuple[torch.Tensor, float]:
    synchronize(device)
    started = time.perf_counter()
    images = sample_ddpm(unet, config, noise.shape[0], steps, sampler, noise=noise, batch_size=batch)
    synchronize(device)
    return images, (time.perf_counter() - started) / noise.shape[0]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=None, help="a train_ddpm_highres.py checkpoint or diffusers DDPM folder "
                        "(EMA weights are used); required unless --smoke")
    parser.add_argument("--data_dir", default=None, help="the training images, for the pixel MMD column (optional)")
    parser.add_argument("--samples", type=int, default=64, help="images per sampler, the same noises (default 64)")
    parser.add_argument("--batch", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--reference_steps", type=int, default=1000, help="steps of the DDPM and DDIM references "
                        "(default 1000, the training schedule's length)")
    parser.add_argument("--no_clip", action="store_true", help="sample without clipping the predicted clean image (the "
                        "samplers then integrate one and the same ODE, so the ODE error ranks them; see above)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite: an untrained tiny "
                        "UNet at 16 px, 4 samples, 50-step references, three candidates")
    args = parser.parse_args(argv)
    if args.smoke:
        args.samples, args.batch, args.reference_steps, args.device = 4, 4, 50, "cpu"
    elif args.checkpoint is None:
        parser.error("--checkpoint is required (or --smoke)")
    return args


def main(args: argparse.Namespace) -> list[dict]:
    device = resolve_device(args.device)
    if args.smoke:
        torch.manual_seed(0)
        unet, config, description = build_ddpm_unet("tiny", 16), dict(make_noise_scheduler().config), "untrained tiny UNet"
        candidates = [("ddim", 10), ("dpmsolver++", 10), ("unipc", 10)]
    else:
        unet, config, description = load_ddpm_for_sampling(args.checkpoint)
        candidates = CANDIDATES
    if args.no_clip:
        config = dict(config, clip_sample=False)
    unet = unet.to(device).eval()
    size = unet.config.sample_size
    noise = initial_noise(args.samples, unet.config.in_channels, size, args.seed)
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {description} | {args.samples} samples, "
          f"{size} px, batch {args.batch} | predicted clean image {'not ' if args.no_clip else ''}clipped\n")
    reference_ode, ode_seconds = timed_sample(unet, config, noise, "ddim", args.reference_steps, args.batch, device)
    reference_sde, sde_seconds = timed_sample(unet, config, noise, "ddpm", args.reference_steps, args.batch, device)
    real = pooled_features(load_images(args.data_dir, size, 1024)) if args.data_dir else None

    def mmd(images: torch.Tensor) -> str:
        return f"{polynomial_mmd(pooled_features(images), real):.5f}" if real is not None else "n/a"

    print("| sampler | model passes | ODE error (RMS to DDIM-ref) | RMS to DDPM-ref | pixel MMD | s per image |")
    print("|---|---:|---:|---:|---:|---:|")
    r = args.reference_steps
    print(f"| DDPM-{r} (ancestral) | {r} | {rms(reference_sde, reference_ode):.4f} | 0 | {mmd(reference_sde)} | {sde_seconds:.4f} |")
    print(f"| DDIM-{r} (the ODE reference) | {r} | 0 | {rms(reference_ode, reference_sde):.4f} | {mmd(reference_ode)} | "
          f"{ode_seconds:.4f} |")
    rows = []
    for sampler, steps in candidates:
        images, seconds = timed_sample(unet, config, noise, sampler, steps, args.batch, device)
        row = {"sampler": sampler, "steps": steps, "ode_error": rms(images, reference_ode), "to_ddpm": rms(images, reference_sde),
               "mmd": mmd(images), "seconds": seconds}
        rows.append(row)
        print(f"| {sampler.replace('dpmsolver++', 'DPM-Solver++').replace('unipc', 'UniPC').replace('ddim', 'DDIM')}-{steps} | "
              f"{steps} | {row['ode_error']:.4f} | {row['to_ddpm']:.4f} | {row['mmd']} | {seconds:.4f} |", flush=True)
    ddim50 = next((row for row in rows if row["sampler"] == "ddim" and row["steps"] == 50), None)
    if ddim50 is not None:
        fast = [row for row in rows if row["sampler"] != "ddim" and row["ode_error"] <= ddim50["ode_error"]]
        best = min(fast, key=lambda row: (row["steps"], row["ode_error"])) if fast else None
        verdict = (f"{best['sampler']}-{best['steps']} is the fewest-step solver as close to the ODE as DDIM-50 "
                   f"({best['ode_error']:.4f} vs {ddim50['ode_error']:.4f})") if best else "no fast solver reaches DDIM-50's ODE error"
        print(f"\n{verdict}")
    return rows


if __name__ == "__main__":
    main(parse_args())
