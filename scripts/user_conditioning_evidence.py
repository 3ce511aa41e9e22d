"""Evidence that user conditioning works, offline on a CPU: does a sample for user k look like user k?

A stand-in for the users' 31-person micro-Doppler set that the repository can build without network:
procedurally drawn micro-Doppler-like spectrograms (time on x, Doppler on y, a jet colour map), one pattern
family per "user": a torso line at a user-specific Doppler offset and one or two limb traces swinging with a
user-specific amplitude and gait rate, with random phase, jitter, width and background noise within each user.

The diffusion model is trained by ``train_dit_user.py`` itself (the tiny LightningDiT, rectified flow, label
dropout 0.1, EMA) and sampled by the same ``generate_latents`` that ``infer.py user`` uses. The VA-VAE is skipped:
the "latents" are the 3x16x16 images themselves, written in the latent-file format with statistics computed on
the train split (the run's VA-VAE fingerprint is the string ``pixels-16px``), so only the decoder is missing.

The judge is a small CNN trained on the real training images. Reported: its accuracy on held-out real images
(the ceiling), on generated samples labelled with the user they were requested for (guidance scales 1 = none,
and above), and chance (1 / users).

    OMP_NUM_THREADS=1 python scripts/user_conditioning_evidence.py --threads 1   # ~10 min on one CPU core
                                                               # -> outputs/user_conditioning_evidence/results.md
    python scripts/user_conditioning_evidence.py --epochs 2 --samples_per_user 8 --out_dir /tmp/quick   # a smoke run
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import train_dit_user  # noqa: E402
from data.latents import STATS_FILENAME, compute_latent_stats, save_latent_file  # noqa: E402
from models.user_generation import generate_latents  # noqa: E402
from models.user_pipeline import load_user_checkpoint, sampling_kwargs  # noqa: E402
from pipelines.user_io import save_user_grid  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.config import ArgumentParser  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.validators import fraction_below_one, guidance_scale, int_between, positive_float, positive_int, seed  # noqa: E402

PIXEL_FINGERPRINT = "pixels-16px"

# One pattern family per user: torso Doppler offset, limb swing amplitude, gait cycles across the window,
# number of limb traces. Neighbouring users share some parameters, so the classes are not trivially separable.
USER_PATTERNS = [
    dict(offset=0.00, amp=0.22, cycles=1.0, limbs=1),
    dict(offset=0.00, amp=0.22, cycles=2.0, limbs=1),
    dict(offset=0.16, amp=0.12, cycles=1.5, limbs=2),
    dict(offset=-0.16, amp=0.30, cycles=1.0, limbs=2),
    dict(offset=0.08, amp=0.34, cycles=2.5, limbs=1),
    dict(offset=-0.08, amp=0.16, cycles=3.0, limbs=2),
]


def add_data_and_training_flags(parser: argparse.ArgumentParser) -> None:
    """The evidence set, the DiT's training recipe and the judge: shared with ``bench/bench_dit_samplers.py``, whose
    runs therefore train the same model on the same data."""
    parser.add_argument("--num_users", type=int_between(2, len(USER_PATTERNS)), default=5,
                        help=f"users (pattern families), 2 to {len(USER_PATTERNS)} (default 5)")
    parser.add_argument("--train_per_user", type=positive_int, default=160, help="training images per user (default 160)")
    parser.add_argument("--test_per_user", type=positive_int, default=40, help="held-out real images per user (default 40)")
    parser.add_argument("--size", type=positive_int, default=16, help="image side = latent side (default 16, the VA-VAE latent grid)")
    parser.add_argument("--model_size", default="tiny", help="DiT size (default tiny)")
    parser.add_argument("--patch_size", type=positive_int, default=2, help="DiT patch size (default 2: 64 tokens, fast on a CPU)")
    parser.add_argument("--epochs", type=positive_int, default=250, help="diffusion training epochs (default 250: 6250 steps at batch 32)")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="diffusion training batch (default 32)")
    parser.add_argument("--lr", type=positive_float, default=1e-3, help="diffusion learning rate (default 1e-3 for the tiny model)")
    parser.add_argument("--ema_decay", type=fraction_below_one, default=0.999, help="EMA decay (default 0.999, with warm-up)")
    parser.add_argument("--classifier_epochs", type=positive_int, default=30, help="epochs of the judging classifier (default 30)")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--seed", type=seed, default=0, help="seed of data, training and the judge (default 0)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default="outputs/user_conditioning_evidence", help="data, run, grids and the table go here")
    add_data_and_training_flags(parser)
    parser.add_argument("--guidance_scales", type=guidance_scale, nargs="+", default=[1.0, 2.0, 4.0],
                        help="guidance scales to evaluate (default 1 2 4)")
    parser.add_argument("--samples_per_user", type=positive_int, default=60,
                        help="generated samples per user and guidance scale (default 60)")
    parser.add_argument("--num_steps", type=positive_int, default=50, help="Euler steps (default 50)")
    return parser.parse_args(argv)


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


def draw_spectrogram(pattern: dict, rng: np.random.Generator, size: int, oversample: int = 4) -> np.ndarray:
    """One micro-Doppler-like spectrogram of a user's pattern family: (size, size, 3) uint8, jet colours."""
    import matplotlib

    side = size * oversample
    time_axis = np.linspace(0.0, 1.0, side)[None, :]
    doppler = np.linspace(0.5, -0.5, side)[:, None]  # positive Doppler at the top, as in radar plots
    offset = pattern["offset"] + rng.normal(0, 0.025)
    amp = pattern["amp"] * rng.uniform(0.85, 1.15)
    cycles = pattern["cycles"] * rng.uniform(0.92, 1.08)
    phase = rng.uniform(0, 2 * np.pi)
    width = rng.uniform(0.018, 0.03)
    torso = offset + 0.02 * np.sin(2 * np.pi * cycles * time_axis + phase)
    image = 1.0 * np.exp(-((doppler - torso) ** 2) / (2 * (1.6 * width) ** 2))
    swing = np.sin(2 * np.pi * cycles * time_axis + phase)
    image += 0.75 * np.exp(-((doppler - (offset + amp * swing)) ** 2) / (2 * width**2))
    if pattern["limbs"] == 2:
        image += 0.55 * np.exp(-((doppler - (offset - 0.6 * amp * swing)) ** 2) / (2 * width**2))
    image += rng.uniform(0.04, 0.12) * rng.random(image.shape)
    image = np.log1p(4 * image) / np.log1p(4 * image.max())
    colours = (matplotlib.colormaps["jet"](image)[..., :3] * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(colours).resize((size, size), Image.BOX))


def build_images(num_users: int, per_user: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,3,S,S) images in [-1, 1] and their 1-based user IDs, user-major."""
    images, users = [], []
    for user in range(1, num_users + 1):
        rng = np.random.default_rng([seed, user])
        for _ in range(per_user):
            images.append(draw_spectrogram(USER_PATTERNS[user - 1], rng, size))
            users.append(user)
    tensor = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 127.5 - 1
    return tensor, torch.tensor(users)


# --------------------------------------------------------------------------------------------------
# The judge
# --------------------------------------------------------------------------------------------------


class UserClassifier(nn.Module):
    """A small CNN: which user drew this spectrogram?"""

    def __init__(self, num_users: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.GELU(),
            nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(64, 64, 3, stride=2, padding=1), nn.GELU(),
        )
        self.head = nn.Linear(64, num_users)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


def train_classifier(images, users, num_users: int, epochs: int, seed: int) -> UserClassifier:
    torch.manual_seed(seed)
    model = UserClassifier(num_users)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    labels = users - 1
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(order), 64):
            index = order[start:start + 64]
            batch = images[index] + 0.05 * torch.randn(images[index].shape, generator=generator)  # mild noise: no pixel-exact shortcuts
            loss = F.cross_entropy(model(batch), labels[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(classifier, images, users) -> tuple[float, list[float]]:
    predicted = torch.cat([classifier(images[i:i + 256]).argmax(1) for i in range(0, len(images), 256)]) + 1
    correct = (predicted == users).float()
    per_user = [float(correct[users == u].mean()) for u in sorted(set(users.tolist()))]
    return float(correct.mean()), per_user


# --------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------


def build_splits(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The training images and users, and the held-out ones (another seed), of ``add_data_and_training_flags``' args."""
    train_images, train_users = build_images(args.num_users, args.train_per_user, args.size, args.seed)
    test_images, test_users = build_images(args.num_users, args.test_per_user, args.size, args.seed + 1000)
    return train_images, train_users, test_images, test_users


def train_evidence_model(args: argparse.Namespace, train_images, train_users, test_images, test_users, out: Path,
                         extra_flags: list[str]) -> dict:
    """Write the images as latent files to ``out/latents`` and train the DiT with ``train_dit_user.py`` into
    ``out/run`` (``add_data_and_training_flags``' recipe, on the CPU, plus ``extra_flags``); its result dict."""
    # The images are the "latents": same files, statistics and dataset code as a VA-VAE run.
    latent_dir = out / "latents"
    common = dict(num_users=args.num_users, vae_fingerprint=PIXEL_FINGERPRINT, posterior="mode", image_size=args.size)
    save_latent_file(latent_dir / "train.safetensors", train_images, train_users, **common)
    save_latent_file(latent_dir / "val.safetensors", test_images, test_users, **common)
    compute_latent_stats(train_images, PIXEL_FINGERPRINT).save(latent_dir / STATS_FILENAME)
    print(f"== diffusion: {args.model_size} DiT, {args.epochs} epochs of {len(train_images)} images ==", flush=True)
    return train_dit_user.main(train_dit_user.parse_args([
        "--latent_dir", str(latent_dir), "--output_dir", str(out / "run"), "--model_size", args.model_size,
        "--patch_size", str(args.patch_size), "--batch_size", str(args.batch_size), "--max_epochs", str(args.epochs),
        "--lr", str(args.lr), "--ema_decay", str(args.ema_decay), "--seed", str(args.seed), "--device", "cpu",
        "--val_every", str(max(1, args.epochs // 10)), *extra_flags,
    ]))


def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out_dir)
    train_images, train_users, test_images, test_users = build_splits(args)
    examples = torch.cat([train_images[train_users == u][:8] for u in range(1, args.num_users + 1)])
    save_user_grid(examples, list(range(1, args.num_users + 1)), 8, out / "real_examples.png")

    run_dir = out / "run"
    train_started = time.perf_counter()
    result = train_evidence_model(args, train_images, train_users, test_images, test_users, out, [
        "--preview_every", str(args.epochs), "--preview_users", *map(str, range(1, args.num_users + 1)),
        "--preview_steps", str(args.num_steps)])
    train_seconds = time.perf_counter() - train_started
    bundle = load_user_checkpoint(run_dir / "checkpoints" / "last.ckpt", command="user_conditioning_evidence.py")

    print("== judge: classifier on the real training images ==", flush=True)
    classifier = train_classifier(train_images, train_users, args.num_users, args.classifier_epochs, args.seed)
    real_accuracy, real_per_user = accuracy(classifier, test_images, test_users)

    users = list(range(1, args.num_users + 1))
    rows = []
    for scale in args.guidance_scales:
        settings = dict(bundle.sampling, num_steps=args.num_steps, guidance_scale=scale)
        latents = generate_latents(bundle.model, "dit", users, args.samples_per_user, seed=args.seed + 1, batch_size=128,
                                   **sampling_kwargs(settings))
        images = bundle.stats.denormalize(latents).clamp(-1, 1)
        requested = torch.tensor(users).repeat_interleave(args.samples_per_user)
        generated_accuracy, per_user = accuracy(classifier, images, requested)
        save_user_grid(images.view(args.num_users, args.samples_per_user, *images.shape[1:])[:, :8].flatten(0, 1), users, 8,
                       out / f"generated_guidance_{scale:g}.png")
        rows.append({"guidance_scale": scale, "accuracy": generated_accuracy, "per_user": per_user})
        print(f"guidance {scale:g}: classifier accuracy on generated samples {generated_accuracy:.3f}", flush=True)

    chance = 1.0 / args.num_users
    table = [
        "| samples judged | classifier accuracy for the requested user |",
        "|---|---|",
        f"| chance (1/{args.num_users} users) | {chance:.3f} |",
        f"| real held-out images ({len(test_images)}) | {real_accuracy:.3f} |",
    ]
    for row in rows:
        label = "no guidance (scale 1)" if row["guidance_scale"] == 1.0 else f"guidance scale {row['guidance_scale']:g}"
        table.append(f"| generated, {label} ({args.samples_per_user * args.num_users}) | {row['accuracy']:.3f} |")
    interval = bundle.sampling["guidance_interval"]
    setup = (f"{args.num_users} users, {args.train_per_user} training / {args.test_per_user} held-out images each, "
             f"{args.size}x{args.size} px; DiT-{args.model_size} patch {args.patch_size}, {result['step']} steps "
             f"(batch {args.batch_size}, lr {args.lr:g}, EMA {args.ema_decay}), Euler {args.num_steps} steps, shift "
             f"{bundle.sampling['shift']}, guidance interval {interval}, EMA weights; training {train_seconds / 60:.1f} min, "
             f"total {(time.perf_counter() - started) / 60:.1f} min on the CPU")
    markdown = "\n".join(table) + f"\n\n{setup}\n"
    report = {"chance": chance, "real_heldout_accuracy": real_accuracy, "real_per_user": real_per_user, "generated": rows,
              "train_history": result["history"], "setup": setup, "args": vars(args)}
    atomic_write_text(json.dumps(report, indent=2) + "\n", out / "results.json")
    atomic_write_text(markdown, out / "results.md")
    print("\n" + markdown)
    return report


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
