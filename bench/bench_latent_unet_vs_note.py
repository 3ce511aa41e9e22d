"""The latent-UNet backbone's sampling: ``infer.py user`` (``generate_latents``) against the users' training-time sampler.

    python bench/bench_latent_unet_vs_note.py                          # the note's UNet size, its command's settings
    python bench/bench_latent_unet_vs_note.py --size tiny --rounds 2    # the smoke setting

The reference is the users' latent-UNet note's ``generate_samples`` (docs/user_generation.md): a diffusers
``DDIMScheduler.from_config`` of the DDPM training config, the UNet called once per step with the user's
cross-attention token, and, where the note guides, a second call with the null token. :func:`note_ddim_loop` writes
it out from diffusers' public API (``tests/test_user_unet_note.py`` checks the CLI against the same function). Ours
is ``models.user_generation.generate_latents`` with ``timestep_spacing="leading"`` (the note's; our default is
``trailing``), which the CLI and the training previews call: one batched call with the conditional and null halves
together when guiding, and DDIM steps with the timesteps kept on the host.

Both run the same random UNet (``models.user_unet`` sizes: ``default`` is the note's ~115M network on 32x16x16 VA-VAE
latents) from the same noise, interleaved, after a warm-up. Reported: seconds per image, ours / note, and the largest
difference between the two latents (the outputs must agree; guidance may differ by float rounding of the batched
call). Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from diffusers import DDIMScheduler, UNet2DConditionModel  # noqa: E402

from bench.common import median, synchronize  # noqa: E402
from models.user_generation import build_noise_scheduler, generate_latents, initial_noise  # noqa: E402
from models.user_unet import UNET_SIZES, UserConditionedUNet, UserConditionEncoder, user_unet_config  # noqa: E402


@torch.no_grad()
def note_ddim_loop(unet, table: torch.Tensor, scheduler_config, latents: torch.Tensor, users: list[int], steps: int,
                   guidance: float = 1.0, spacing: str = "leading") -> torch.Tensor:
    """The note's ``generate_samples`` up to the decoder: DDIM from the DDPM config, token ``table[user - 1]``, and
    with ``guidance`` != 1 a second call with the null token (the table's last row)."""
    scheduler = DDIMScheduler.from_config(scheduler_config, timestep_spacing=spacing)
    scheduler.set_timesteps(steps)
    tokens = table[[user - 1 for user in users]][:, None]
    for t in scheduler.timesteps:
        eps = unet(latents, t, encoder_hidden_states=tokens).sample
        if guidance != 1.0:
            uncond = unet(latents, t, encoder_hidden_states=table[-1:].expand(len(users), -1)[:, None]).sample
            eps = uncond + guidance * (eps - uncond)
        latents = scheduler.step(eps, t, latents).prev_sample
    return latents


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(UNET_SIZES), default="default", help="UNet size (default: the note's)")
    parser.add_argument("--channels", type=int, default=32, help="latent channels (default 32, VA-VAE)")
    parser.add_argument("--latent_size", type=int, default=16, help="latent side (default 16)")
    parser.add_argument("--users", type=int, nargs="+", default=[1, 5, 10, 15], help="user IDs (default: the note's command)")
    parser.add_argument("--per_user", type=int, default=5, help="images per user (default 5, the note's command)")
    parser.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20, the note's command)")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 4.0], help="guidance scales (default 1 and 4)")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds per path (default 3, after one warm-up)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**user_unet_config(args.size, in_channels=args.channels, sample_size=args.latent_size))
    with torch.no_grad():  # diffusers zero-initialises the output conv; a random one makes every step count
        unet.conv_out.weight.normal_(0, 0.05)
    encoder = UserConditionEncoder(31, unet.config.cross_attention_dim, null_row=True)
    model = UserConditionedUNet(unet, encoder).to(device).eval().requires_grad_(False)
    table = encoder.embedding.weight.detach()
    scheduler = build_noise_scheduler()
    pairs = [(user, index) for user in args.users for index in range(args.per_user)]
    users = [user for user, _ in pairs]
    noise, _ = initial_noise(42, users, [index for _, index in pairs], (args.channels, args.latent_size, args.latent_size))
    noise = noise.to(device)

    print(f"\nLatent UNet `{args.size}` ({sum(p.numel() for p in unet.parameters()) / 1e6:.1f}M), "
          f"{args.channels}x{args.latent_size}x{args.latent_size} latents, {len(pairs)} images in one batch, DDIM "
          f"{args.steps} steps, {args.device}, {torch.get_num_threads()} thread(s), {args.rounds} rounds\n")
    print("| guidance | note s/image | ours s/image | ours / note | max latent difference |")
    print("|---:|---:|---:|---:|---:|")
    for guidance in args.guidance:
        def ours(guidance=guidance):
            return generate_latents(model, "unet", args.users, args.per_user, seed=42, num_steps=args.steps, sampler="ddim",
                                    guidance_scale=guidance, noise_scheduler=scheduler, timestep_spacing="leading",
                                    batch_size=len(pairs), device=device)

        def note(guidance=guidance):
            return note_ddim_loop(unet, table, scheduler.config, noise, users, args.steps, guidance).float().cpu()

        times = {"note": [], "ours": []}
        results = {"note": note(), "ours": ours()}  # warm-up
        for _ in range(args.rounds):
            for name, function in (("note", note), ("ours", ours)):
                synchronize(device)
                started = time.perf_counter()
                function()
                synchronize(device)
                times[name].append((time.perf_counter() - started) / len(pairs))
        difference = (results["note"] - results["ours"]).abs().max().item()
        note_s, ours_s = median(times["note"]), median(times["ours"])
        print(f"| {guidance:g} | {note_s:.4f} | {ours_s:.4f} | {ours_s / note_s:.3f} | {difference:.1e} |")


if __name__ == "__main__":
    main()
