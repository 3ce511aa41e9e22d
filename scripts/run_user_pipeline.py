"""All three stages of user-conditioned generation in one command (the users' ``run_complete_pipeline.py``).

1. ``scripts/extract_features.py``: user folders ``ID_<n>`` -> VA-VAE latents in OUTPUT_DIR/latent_features;
2. ``train_dit_user.py``: the DiT (or latent UNet) on those latents -> OUTPUT_DIR/trained_models;
3. ``infer.py user``: images for ``--generate_user_ids`` from checkpoints/best.ckpt -> OUTPUT_DIR/generated_images.

    python scripts/run_user_pipeline.py --data_dir /kaggle/working/data_split \\
        --vavae_path /kaggle/working/pretrained/vavae-imagenet256-f16d32-dinov2.pt --output_dir /kaggle/working/pipeline \\
        --batch_size 32 --max_epochs 50 --devices 2 --generate_user_ids 1 2 3 4 5 --num_samples_per_user 4

Each stage calls the library the stage's own command calls (``pipelines.user_features.extract_features``,
``train_dit_user.launch``/``main``, ``infer.py user``), with the same checks; flags not listed here reach training
through ``--train_extra "..."`` (e.g. ``--train_extra "--cfg_dropout 0.15 --preview_every 10"``). Before stage 1
starts, every stage's flags are checked: the data folders and their users (so ``--generate_user_ids`` outside them
stops here, not after training), the VA-VAE path and the training flags; messages name this script's flags.
``--skip_extraction`` reuses OUTPUT_DIR/latent_features; ``--resume`` continues the training stage from its last
checkpoint.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402
import contextlib  # noqa: E402
import shlex  # noqa: E402

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402
from utils.validators import (  # noqa: E402
    fraction_below_one,
    guidance_scale,
    int_at_least,
    output_folder,
    positive_float,
    positive_int,
    seed,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--data_dir", required=True, help="user folders ID_1, ID_2, ... (or train/ and val/ holding them)")
    parser.add_argument("--vavae_path", required=True, help="vavae-imagenet256-f16d32-dinov2.pt (or a diffusers AutoencoderKL folder)")
    parser.add_argument("--vavae_config", default="f16d32", help="architecture of a .pt VA-VAE: f16d32 (default) or tiny (tests)")
    parser.add_argument("--output_dir", required=True, type=output_folder,
                        help="gets latent_features/, trained_models/ and generated_images/")
    parser.add_argument("--image_size", type=int_at_least(16), default=256, help="extraction image size (default 256)")
    parser.add_argument("--val_fraction", type=fraction_below_one, default=0.1,
                        help="per-user validation share of recordings without a val/ folder (default 0.1)")
    parser.add_argument("--group_pattern", default=None,
                        help="regular expression naming an image's recording (see scripts/extract_features.py; default: the "
                        "subfolder inside the user folder)")
    parser.add_argument("--extract_batch_size", type=positive_int, default=32, help="images encoded at once (default 32)")
    parser.add_argument("--skip_extraction", action="store_true", help="reuse OUTPUT_DIR/latent_features from an earlier run")
    from models.user_generation import BACKBONES

    parser.add_argument("--backbone", choices=BACKBONES.names(), default=BACKBONES.names()[0],
                        help=f"{', '.join(BACKBONES.names())} (default {BACKBONES.names()[0]})")
    parser.add_argument("--model_size", default=None, help="DiT tiny|S|B|L|XL (default B) or UNet tiny|default")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="training batch per device (default 32)")
    parser.add_argument("--max_epochs", type=positive_int, default=50, help="training epochs (default 50)")
    parser.add_argument("--lr", type=positive_float, default=1e-4, help="learning rate (default 1e-4)")
    parser.add_argument("--devices", type=positive_int, default=1, help="training processes/GPUs (default 1)")
    parser.add_argument("--precision", default="auto", help="32 | 16-mixed | bf16-mixed | no | fp16 | bf16 | auto (default auto)")
    parser.add_argument("--resume", action="store_true", help="continue training from OUTPUT_DIR/trained_models/checkpoints/last.ckpt")
    parser.add_argument("--train_extra", default="", help="more train_dit_user.py flags, one quoted string")
    parser.add_argument("--generate_user_ids", type=positive_int, nargs="+", default=None, help="users to generate (default: all)")
    parser.add_argument("--num_samples_per_user", type=positive_int, default=4, help="images per user (default 4)")
    parser.add_argument("--guidance_scale", type=guidance_scale, default=None,
                        help="guidance for generation, 0-100 (default: the checkpoint's, 4.0)")
    parser.add_argument("--num_steps", type=positive_int, default=None, help="sampling steps for generation (default: the checkpoint's)")
    parser.add_argument("--seed", type=seed, default=42, help="seed of the split, training and generation (default 42)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto (GPU if present)")
    return parser.parse_args(argv)


def check_stages(args: argparse.Namespace, settings, latents: Path) -> int:
    """Every stage's flags, before stage 1 starts; returns the number of users the data (or the latents) hold."""
    import infer
    import train_dit_user
    from data.latents import load_latent_file
    from pipelines.user_features import collect_splits

    if not Path(args.vavae_path).exists():
        raise UserError(f"--vavae_path {args.vavae_path} does not exist; pass vavae-imagenet256-f16d32-dinov2.pt.")
    if args.skip_extraction:
        if not (latents / "train.safetensors").is_file():
            raise UserError(f"--skip_extraction: {latents / 'train.safetensors'} does not exist; run without the flag first.")
        num_users = load_latent_file(latents / "train.safetensors").num_users
        where = str(latents)
    else:
        num_users = collect_splits(settings)[0]["num_users"]  # folders, users, split and duplicates checked here
        where = f"--data_dir {args.data_dir}"
    if args.generate_user_ids:
        outside = sorted({user for user in args.generate_user_ids if not 1 <= user <= (num_users or 0)})
        if outside:
            raise UserError(f"--generate_user_ids {' '.join(map(str, outside))}: {where} holds users 1..{num_users}; "
                            f"pass IDs between 1 and {num_users}.")
        if len(set(args.generate_user_ids)) != len(args.generate_user_ids):
            raise UserError("--generate_user_ids lists a user more than once; give each once and raise --num_samples_per_user.")
    # A refused training or generation flag (--train_extra) prints its own one-line error and exits 2, before stage 1,
    # pointing to the help of the command that owns the flag.
    output = Path(args.output_dir)
    with _program("train_dit_user.py"):
        train_dit_user.parse_args(training_argv(args, latents, output / "trained_models"))
    with _program("infer.py"):
        infer.parse_args(generation_argv(args, output / "trained_models" / "checkpoints" / "best.ckpt", output / "generated_images"))
    return num_users


@contextlib.contextmanager
def _program(name: str):
    """Parsers built inside take ``name`` as their program, so their errors say ``see <name> --help``."""
    saved = sys.argv[0]
    sys.argv[0] = name
    try:
        yield
    finally:
        sys.argv[0] = saved


def generation_argv(args: argparse.Namespace, checkpoint: Path, generated: Path) -> list[str]:
    return [
        "user", "--dit_checkpoint", str(checkpoint), "--vavae_path", str(args.vavae_path), "--vavae_config", args.vavae_config,
        "--output_dir", str(generated), "--num_samples_per_user", str(args.num_samples_per_user), "--seed", str(args.seed),
        "--device", args.device,
        *(["--user_ids", *map(str, args.generate_user_ids)] if args.generate_user_ids else []),
        *(["--guidance_scale", str(args.guidance_scale)] if args.guidance_scale is not None else []),
        *(["--num_steps", str(args.num_steps)] if args.num_steps is not None else []),
    ]


def training_argv(args: argparse.Namespace, latents: Path, trained: Path) -> list[str]:
    vae = ["--vavae_path", str(args.vavae_path), "--vavae_config", args.vavae_config]
    return [
        "--latent_dir", str(latents), "--output_dir", str(trained), "--backbone", args.backbone, "--batch_size", str(args.batch_size),
        "--max_epochs", str(args.max_epochs), "--lr", str(args.lr), "--devices", str(args.devices), "--precision", args.precision,
        "--seed", str(args.seed), "--device", args.device, *vae,
        *(["--model_size", args.model_size] if args.model_size else []),
        *(["--resume", "latest"] if args.resume else []),
        *shlex.split(args.train_extra),
    ]


def main(args: argparse.Namespace) -> dict:
    import infer
    import train_dit_user
    from pipelines.user_features import ExtractionSettings, extract_features

    output = Path(args.output_dir)
    latents, trained, generated = output / "latent_features", output / "trained_models", output / "generated_images"
    settings = ExtractionSettings(
        data_dir=str(args.data_dir), vavae_path=str(args.vavae_path), output_path=str(latents), vavae_config=args.vavae_config,
        image_size=args.image_size, val_fraction=args.val_fraction, group_pattern=args.group_pattern,
        batch_size=args.extract_batch_size, seed=args.seed, device=args.device,
    )
    check_stages(args, settings, latents)

    print("== stage 1/3: feature extraction ==", flush=True)
    if not args.skip_extraction:
        extract_features(settings)

    print("== stage 2/3: training ==", flush=True)
    train_argv = training_argv(args, latents, trained)
    if args.devices > 1:
        train_dit_user.launch(train_argv)  # N processes through torch.distributed.run; a user error comes back as one line
    else:
        train_dit_user.main(train_dit_user.parse_args(train_argv))

    print("== stage 3/3: generation ==", flush=True)
    checkpoint = trained / "checkpoints" / "best.ckpt"
    result = infer.main(infer.parse_args(generation_argv(args, checkpoint, generated)))
    print(f"pipeline done: latents in {latents}, checkpoints in {trained / 'checkpoints'}, images in {generated}")
    return {"latents": latents, "trained": trained, "generated": generated, "generation": result}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
