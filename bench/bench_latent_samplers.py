"""Latent UNet (user generation): DPM-Solver++ and UniPC at 10-25 steps against DDIM at 10-100, at equal noise.

    python bench/bench_latent_samplers.py                 # train a tiny latent UNet briefly on CPU, then compare
    python bench/bench_latent_samplers.py --smoke         # seconds: a few training steps, short references

The model is the users' latent-UNet backbone (``models.user_unet.build_user_unet``, ``tiny``) trained here for
``--train_steps`` on procedural "latents": one smooth random pattern per user plus noise, normalised as the trainer's
latents are. Sampling is ``models.user_generation.sample_ddim``, what the previews and ``infer.py user`` call, from the
same seeded noise for every sampler, conditional on the user, unguided and guided (``--guidance_scale``).

Score: **ODE error**, the RMS distance to DDIM-1000 from the same noise. The latent schedule does not clip
(``clip_sample`` off), so DDIM at eta 0, DPM-Solver++ and UniPC integrate one probability-flow ODE and DDIM-1000 is
its solution to within a small step error: closer is better, and the row whose error matches DDIM-50's tells how
few steps a solver needs for DDIM-50's accuracy. No FID here (no Inception weights offline; ``scripts/
eval_user_generation.py`` scores generated spectrograms per user). Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from models.ddpm_sampling import ddpm_loss  # noqa: E402
from models.user_generation import build_noise_scheduler, sample_ddim  # noqa: E402
from models.user_unet import build_user_unet  # noqa: E402

ROWS = [("ddim", 10), ("ddim", 25), ("ddim", 50), ("ddim", 100), ("dpmsolver++", 10), ("dpmsolver++", 15),
        ("dpmsolver++", 20), ("dpmsolver++", 25), ("unipc", 10), ("unipc", 15), ("unipc", 20), ("unipc", 25)]


def procedural_latents(num_users: int, per_user: int, channels: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """One smooth random pattern per user (upsampled 2x2 noise) plus per-sample noise, normalised to unit std."""
    generator = torch.Generator().manual_seed(seed)
    patterns = F.interpolate(torch.randn(num_users, channels, 2, 2, generator=generator), size=size, mode="bilinear",
                             align_corners=False)
    labels = torch.arange(num_users).repeat_interleave(per_user)
    latents = patterns[labels] + 0.3 * torch.randn(len(labels), channels, size, size, generator=generator)
    return (latents - latents.mean()) / latents.std(), labels


def train(unet, latents, labels, steps: int, batch: int, seed: int) -> float:
    scheduler = build_noise_scheduler()
    optimizer = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    generator = torch.Generator().manual_seed(seed)
    unet.train()
    loss = torch.tensor(float("nan"))
    for _ in range(steps):
        index = torch.randint(len(labels), (batch,), generator=generator)
        loss = ddpm_loss(unet, scheduler, latents[index], labels[index], generator=generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    unet.eval()
    return loss.item()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_users", type=int, default=4)
    parser.add_argument("--size", type=int, default=8, help="latent side (default 8)")
    parser.add_argument("--channels", type=int, default=4, help="latent channels (default 4)")
    parser.add_argument("--train_steps", type=int, default=600, help="training steps of the tiny UNet (default 600)")
    parser.add_argument("--samples", type=int, default=32, help="samples per sampler, the same noises (default 32)")
    parser.add_argument("--reference_steps", type=int, default=1000, help="steps of the DDIM reference (default 1000)")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="the guided rows' scale (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny setting for the test suite (seconds)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.train_steps, args.samples, args.reference_steps = 2, 2, 10
    return args


@torch.no_grad()
def main(args: argparse.Namespace) -> list[dict]:
    torch.manual_seed(args.seed)
    latents, labels = procedural_latents(args.num_users, 64, args.channels, args.size, args.seed)
    unet = build_user_unet("tiny", num_users=args.num_users, in_channels=args.channels, sample_size=args.size)
    start = time.perf_counter()
    with torch.enable_grad():
        final_loss = train(unet, latents, labels, args.train_steps, 32, args.seed)
    print(f"tiny latent UNet trained {args.train_steps} steps in {time.perf_counter() - start:.0f} s (last loss {final_loss:.4f})")
    scheduler = build_noise_scheduler()
    noise = torch.randn(args.samples, args.channels, args.size, args.size, generator=torch.Generator().manual_seed(args.seed + 1))
    users = torch.arange(args.samples) % args.num_users

    def sample(sampler: str, steps: int, guidance: float) -> tuple[torch.Tensor, float]:
        began = time.perf_counter()
        out = sample_ddim(unet, scheduler, noise, users, null_label=unet.null_label, num_steps=steps, sampler=sampler,
                          guidance_scale=guidance)
        return out, (time.perf_counter() - began) / args.samples

    rows = []
    for guidance in (1.0, args.guidance_scale):
        reference, _ = sample("ddim", args.reference_steps, guidance)
        for sampler, steps in ROWS:
            if steps > args.reference_steps:
                continue
            out, seconds = sample(sampler, steps, guidance)
            error = (out - reference).pow(2).mean().sqrt().item()
            rows.append({"guidance": guidance, "sampler": sampler, "steps": steps, "ode_error": error, "seconds": seconds})
    print(f"\n| guidance | sampler | steps | ODE error (RMS to DDIM-{args.reference_steps}) | s per sample |")
    print("|---:|---|---:|---:|---:|")
    for row in rows:
        print(f"| {row['guidance']:g} | {row['sampler']} | {row['steps']} | {row['ode_error']:.4f} | {row['seconds']:.4f} |")
    return rows


if __name__ == "__main__":
    main(parse_args())
