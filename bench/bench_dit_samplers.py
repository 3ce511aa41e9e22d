"""The user DiT's Euler/Heun step counts, guidance interval and shift at equal conditional accuracy, on the CPU.

    OMP_NUM_THREADS=1 python bench/bench_dit_samplers.py --threads 1       # trains once (~10 min), then the table
    OMP_NUM_THREADS=1 python bench/bench_dit_samplers.py --threads 1       # again: reuses <out_dir>/run, samples only
    python bench/bench_dit_samplers.py --checkpoint outputs/user_conditioning_evidence/run/checkpoints/last.ckpt
    python bench/bench_dit_samplers.py --smoke                              # seconds: tiny everything (the test suite)

Which sampler settings keep the user accuracy at fewer steps. The model and the judge are
``scripts/user_conditioning_evidence.py``'s, imported
from it: procedural micro-Doppler-like spectrograms, one pattern family per "user", standing in for the latents (so
everything but the VA-VAE decoder is the real code path); the tiny LightningDiT trained by ``train_dit_user.py``
(rectified flow, label dropout, EMA); a small CNN trained on the real training images judges which user a sample
shows. Its data and seeds are the evidence script's, so ``--checkpoint`` of an evidence run works as it is.

Sampling is ``models.user_generation.generate_latents``, what the previews and ``infer.py user`` call, with the same
run seed for every row, so sample (user, index) starts from the same noise in every row. Rows: Euler and Heun at
several step counts (``num_steps`` counts updates, as the flag does: Euler-250 is the current default, one update
more than LightningDiT's 250-point grid; Heun-n makes 2n evaluations), in four settings: unguided; guidance
``--guidance_scale`` with LightningDiT's interval (from t = 0.11, the default) at shift 0.3; the same guidance over
the whole trajectory; and the default interval at shift 1 (``--other_shifts``).

Reported per row:

* **model passes**: batch evaluations of the model per sample, conditional + unconditional as
  ``bench/bench_dit_user.py`` counts them (``model_passes``, imported): 1 per evaluation time, 2 inside the guidance
  interval, where the null-user pass runs too.
* **accuracy** of the judge for the requested user, with its binomial standard error sqrt(p (1 - p) / n), and the
  **paired difference** to the default sampler (Euler-250, guidance interval from 0.11, shift 0.3; for unguided rows
  unguided Euler-250) over the same noises, with the standard error of the mean per-sample difference: the rows share
  their noise, so this is far tighter than the two binomial errors together.
* **ODE error**: RMS distance of the final (normalised) latents to Euler-250's from the same noise with the same
  guidance, interval and shift: the sensitive measure of how well a row solves the reference's ODE.
* seconds per image (wall time of the row / samples, one batch of ``--sample_batch``).

Prints Markdown tables and writes ``<out_dir>/results.{md,json}``; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_dit_user import model_passes  # noqa: E402
from data.latents import compute_latent_stats  # noqa: E402
from models.user_generation import BACKBONES, RECTIFIED_FLOW, generate_latents  # noqa: E402
from models.user_pipeline import load_user_checkpoint  # noqa: E402
from scripts.user_conditioning_evidence import (  # noqa: E402
    PIXEL_FINGERPRINT,
    USER_PATTERNS,
    accuracy,
    add_data_and_training_flags,
    build_splits,
    train_classifier,
    train_evidence_model,
)
from utils.checkpoint import atomic_write_text
from utils.config import setting_changes  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402

DEFAULT_INTERVAL = (0.11, 1.0)  # LightningDiT's cfg_interval_start, the DiT's sampling default
WHOLE = (0.0, 1.0)
DEFAULT_SHIFT = 0.3
# What decides whether a trained run in <out_dir> can be reused: the data and the training recipe.
TRAINING_KEYS = ("num_users", "train_per_user", "size", "model_size", "patch_size", "epochs", "batch_size", "lr", "ema_decay",
                 "seed")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out_dir", default=None, help="latents, the training run and the results (default "
                        "outputs/bench_dit_samplers; with --smoke a fresh temporary folder)")
    parser.add_argument("--checkpoint", default=None, help="a trained run's checkpoint (e.g. an evidence run's "
                        "run/checkpoints/last.ckpt) to sample instead of training; its data must be this --seed's")
    add_data_and_training_flags(parser)  # the evidence script's: same data, recipe and judge
    parser.add_argument("--samples_per_user", type=int, default=50, help="generated samples per user and row (default 50)")
    parser.add_argument("--reference_steps", type=int, default=250, help="Euler updates of the reference (default 250, "
                        "the DiT's sampling default)")
    parser.add_argument("--euler_steps", type=int, nargs="*", default=[100, 50, 25, 10], help="Euler rows besides the "
                        "reference (default 100 50 25 10)")
    parser.add_argument("--heun_steps", type=int, nargs="*", default=[50, 25, 13, 7], help="Heun rows (default 50 25 13 7)")
    parser.add_argument("--guidance_scale", type=float, default=4.0, help="the guided settings' scale (default 4, the "
                        "sampling default)")
    parser.add_argument("--other_shifts", type=float, nargs="*", default=[1.0], help="shifts tried besides 0.3, guided with "
                        "the default interval (default 1 = no shift; none: skip)")
    parser.add_argument("--sample_batch", type=int, default=256, help="samples generated at once (default 256)")
    parser.add_argument("--noise_seed", type=int, default=None, help="run seed of the samples' noise (default --seed + 1, as the "
                        "evidence script); another value is another draw from the same trained model")
    parser.add_argument("--smoke", action="store_true", help="tiny everything for the test suite (seconds): 2 users, 1 "
                        "epoch of batch 8, 2 samples per user, reference Euler-4, rows Euler-2 and Heun-1")
    args = parser.parse_args(argv)
    if args.smoke:
        args.num_users, args.train_per_user, args.test_per_user, args.epochs, args.classifier_epochs = 2, 8, 4, 1, 1
        args.batch_size = 8
        args.samples_per_user, args.reference_steps, args.euler_steps, args.heun_steps = 2, 4, [2], [1]
        args.out_dir = args.out_dir or tempfile.mkdtemp(prefix="bench_dit_samplers_")
    args.out_dir = args.out_dir or "outputs/bench_dit_samplers"
    args.noise_seed = args.seed + 1 if args.noise_seed is None else args.noise_seed
    if not 2 <= args.num_users <= len(USER_PATTERNS):
        parser.error(f"--num_users must be between 2 and {len(USER_PATTERNS)}")
    if any(steps < 1 for steps in [args.reference_steps, *args.euler_steps, *args.heun_steps]) or args.samples_per_user < 1:
        parser.error("step counts and --samples_per_user must be at least 1")
    return args


# --------------------------------------------------------------------------------------------------
# The model and the judge
# --------------------------------------------------------------------------------------------------


def train_or_reuse(args: argparse.Namespace, train_images: torch.Tensor, train_users: torch.Tensor,
                   test_images: torch.Tensor, test_users: torch.Tensor) -> Path:
    """The checkpoint to sample: ``--checkpoint``, else ``<out_dir>/run`` if trained with these settings, else a new run."""
    if args.checkpoint:
        return Path(args.checkpoint)
    out = Path(args.out_dir)
    checkpoint = out / "run" / "checkpoints" / "last.ckpt"
    recipe = {key: getattr(args, key) for key in TRAINING_KEYS}
    recipe_file = out / "training.json"
    if checkpoint.is_file() and recipe_file.is_file():
        if changed := setting_changes(json.loads(recipe_file.read_text()), recipe):
            raise UserError(f"{out} holds a run trained with other settings ({'; '.join(changed)}); pass a new --out_dir, "
                            f"or the run's own settings to reuse it.")
        print(f"== reusing the trained run {checkpoint} ==", flush=True)
        return checkpoint
    started = time.perf_counter()
    train_evidence_model(args, train_images, train_users, test_images, test_users, out, ["--preview_every", "0", "--report_to", "none"])
    atomic_write_text(json.dumps(recipe, indent=2) + "\n", recipe_file)
    print(f"trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return checkpoint


def load_matching(checkpoint: Path, args: argparse.Namespace, train_images: torch.Tensor):
    """The run's EMA model, checked against this data: its users, latent size and latent statistics."""
    bundle = load_user_checkpoint(checkpoint, command="bench_dit_samplers.py")
    spec = BACKBONES.get(bundle.backbone)
    size = spec.latent_shape(bundle.model)[-1]
    if spec.objective is not RECTIFIED_FLOW or bundle.num_users != args.num_users or size != args.size:
        raise UserError(f"{checkpoint} is a {bundle.backbone} for {bundle.num_users} users at {size} px; this "
                        f"bench needs a flow-trained backbone (the DiT) for --num_users {args.num_users} at --size {args.size}.")
    stats = compute_latent_stats(train_images, PIXEL_FINGERPRINT)
    if not torch.allclose(bundle.stats.mean.flatten(), stats.mean.flatten(), atol=1e-4):
        raise UserError(f"{checkpoint} was trained on other images than this --seed / --train_per_user draws (its latent "
                        f"statistics differ); pass the settings of its run.")
    return bundle


# --------------------------------------------------------------------------------------------------
# The rows
# --------------------------------------------------------------------------------------------------


def settings_list(args: argparse.Namespace) -> list[dict]:
    """(guidance, interval, shift) settings; the first guided one is the sampling default."""
    settings = [dict(name="unguided", guidance=1.0, interval=WHOLE, shift=DEFAULT_SHIFT),
                dict(name="guided, from 0.11", guidance=args.guidance_scale, interval=DEFAULT_INTERVAL, shift=DEFAULT_SHIFT),
                dict(name="guided, whole", guidance=args.guidance_scale, interval=WHOLE, shift=DEFAULT_SHIFT)]
    settings += [dict(name=f"guided, from 0.11, shift {shift:g}", guidance=args.guidance_scale, interval=DEFAULT_INTERVAL,
                      shift=shift) for shift in args.other_shifts if shift != DEFAULT_SHIFT]
    return settings


def binomial_se(p: float, n: int) -> float:
    return math.sqrt(max(p * (1 - p), 0.0) / n)


def paired(correct: torch.Tensor, baseline: torch.Tensor) -> tuple[float, float]:
    """Mean per-sample difference of two 0/1 verdict vectors over the same noises, and its standard error."""
    difference = correct.float() - baseline.float()
    se = difference.std(unbiased=True).item() / math.sqrt(len(difference)) if len(difference) > 1 else float("nan")
    return difference.mean().item(), se


@torch.no_grad()
def main(args: argparse.Namespace) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    started = time.perf_counter()
    out = Path(args.out_dir)
    train_images, train_users, test_images, test_users = build_splits(args)
    with torch.enable_grad():
        checkpoint = train_or_reuse(args, train_images, train_users, test_images, test_users)
        bundle = load_matching(checkpoint, args, train_images)
        print("== judge: classifier on the real training images ==", flush=True)
        classifier = train_classifier(train_images, train_users, args.num_users, args.classifier_epochs, args.seed)
    real_accuracy, _ = accuracy(classifier, test_images, test_users)

    users = list(range(1, args.num_users + 1))
    requested = torch.tensor(users).repeat_interleave(args.samples_per_user)
    count = len(requested)
    samplers = [("euler", args.reference_steps)] + [("euler", n) for n in args.euler_steps if n != args.reference_steps]
    samplers += [("heun", n) for n in args.heun_steps]
    rows, baselines = [], {}
    for setting in settings_list(args):
        reference = None
        for sampler, steps in samplers:
            began = time.perf_counter()
            latents = generate_latents(bundle.model, "dit", users, args.samples_per_user, seed=args.noise_seed, num_steps=steps,
                                       sampler=sampler, guidance_scale=setting["guidance"], guidance_interval=setting["interval"],
                                       shift=setting["shift"], batch_size=args.sample_batch, device="cpu")
            seconds = (time.perf_counter() - began) / count
            images = bundle.stats.denormalize(latents).clamp(-1, 1)
            predicted = torch.cat([classifier(images[i:i + 256]).argmax(1) for i in range(0, count, 256)]) + 1
            correct = predicted == requested
            if reference is None:  # the first row of every setting is its Euler reference
                reference = latents
            baseline_key = "unguided" if setting["guidance"] == 1.0 else "guided"
            baselines.setdefault(baseline_key, correct)  # the first row of the first setting of each kind: the default
            p = correct.float().mean().item()
            delta, delta_se = paired(correct, baselines[baseline_key])
            guided = setting["guidance"] != 1.0
            no_guidance = (math.inf, math.inf)  # unguided: the null-user pass never runs, one pass per evaluation
            row = dict(setting=setting["name"], guidance=setting["guidance"], interval=list(setting["interval"]) if guided else None,
                       shift=setting["shift"], sampler=sampler, steps=steps,
                       passes=model_passes(sampler, steps, setting["interval"] if guided else no_guidance, setting["shift"]),
                       accuracy=p, accuracy_se=binomial_se(p, count), delta=delta, delta_se=delta_se,
                       ode_error=(latents - reference).pow(2).mean().sqrt().item(), s_per_image=seconds)
            rows.append(row)
            print(f"{row['setting']:<28} {sampler:>5}-{steps:<4} passes {row['passes']:>4}  accuracy {p:.3f}  "
                  f"ODE error {row['ode_error']:.4f}  {seconds:.4f} s/image", flush=True)

    markdown = render(args, rows, real_accuracy, len(test_images), count, time.perf_counter() - started)
    print("\n" + markdown)
    report = {"rows": rows, "real_heldout_accuracy": real_accuracy, "chance": 1 / args.num_users, "samples": count,
              "checkpoint": str(checkpoint), "args": vars(args)}
    atomic_write_text(json.dumps(report, indent=2) + "\n", out / "results.json")
    atomic_write_text(markdown, out / "results.md")
    return report


def render(args, rows: list[dict], real_accuracy: float, real_count: int, count: int, seconds: float) -> str:
    ref = f"Euler-{args.reference_steps}"
    lines = [
        f"| setting | sampler | model passes | accuracy ± SE | Δ accuracy vs default {ref} (paired SE) | ODE error (RMS to {ref}, "
        "same setting) | s per image |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['sampler'].capitalize()}-{row['steps']} | {row['passes']} | "
                     f"{row['accuracy']:.3f} ± {row['accuracy_se']:.3f} | {row['delta']:+.3f} ({row['delta_se']:.3f}) | "
                     f"{row['ode_error']:.4f} | {row['s_per_image']:.4f} |")
    notes = (f"{count} samples per row ({args.samples_per_user} per user, {args.num_users} users, the same noises in every row, "
             f"noise seed {args.noise_seed}); judge accuracy on {real_count} real held-out images {real_accuracy:.3f}, chance "
             f"{1 / args.num_users:.3f}. Guidance {args.guidance_scale:g}; the default is {ref}, guidance from t = 0.11, shift "
             f"{DEFAULT_SHIFT}. {seconds / 60:.1f} min in all, {torch.get_num_threads()} thread(s).")
    return "\n".join(lines) + f"\n\n{notes}\n"


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
