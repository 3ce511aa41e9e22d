"""Stage 1 of user-conditioned generation: encode every image once with the frozen VA-VAE.

After hustvl/LightningDiT ``extract_features.py``: images centre-cropped to 256 px and scaled to [-1, 1], encoded
by the VA-VAE (f16d32: 3x256x256 -> 32x16x16), written with LightningDiT's tensor names (``latents``,
``labels``, and ``latents_flip`` only with ``--flip``) plus metadata (VA-VAE file fingerprint, posterior mode
or sample, image size, number of users). Per-channel statistics (1,C,1,1) come from the train split only and
are saved beside the latents with the fingerprint, so training and decoding can check they belong together.

Input (``--data_dir``): one folder per user named ``ID_<n>`` or ``user_<n>`` (n = 1..num_users, mapped by the
number in the name, never by sorted order), either directly (a seeded, per-user ``--val_fraction`` goes to
validation) or under ``train/`` and ``val/``.

    python scripts/extract_features.py --data_dir /kaggle/working/data_split \\
        --vavae_path /kaggle/working/pretrained/vavae-imagenet256-f16d32-dinov2.pt \\
        --output_path /kaggle/working/latent_features --batch_size 32

Writes ``OUTPUT_PATH/train.safetensors``, ``val.safetensors`` (unless there is no validation split),
``latents_stats.safetensors`` and ``users.json`` (folder -> user ID, images per split).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from data.latents import POSTERIOR_MODES, STATS_FILENAME, compute_latent_stats, save_latent_file  # noqa: E402
from data.user_images import (  # noqa: E402
    RESIZE_MODES,
    UserImageDataset,
    as_user_images,
    find_split_folders,
    scan_user_folders,
    split_train_val,
)
from models.vavae import VAVAE_CONFIGS, file_fingerprint, load_vavae  # noqa: E402
from utils.accelerator import resolve_device  # noqa: E402
from utils.checkpoint import atomic_write_text  # noqa: E402
from utils.config import ArgumentParser, add_config_argument, parse_with_config  # noqa: E402
from utils.errors import DataError, UserError, run_cli  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    add_config_argument(parser)
    parser.add_argument("--data_dir", required=True,
                        help="folder of user folders ID_1, ID_2, ... (or user_1, ...), or a folder with train/ and val/ holding them")
    parser.add_argument("--val_dir", default=None,
                        help="validation user folders elsewhere "
                        "(default: DATA_DIR/val if DATA_DIR has train/, else a --val_fraction split)")
    parser.add_argument("--vavae_path", required=True,
                        help="VA-VAE weights: vavae-imagenet256-f16d32-dinov2.pt (LDM state dict), an LDM-key .safetensors, "
                        "or a diffusers AutoencoderKL folder")
    parser.add_argument("--vavae_config", choices=sorted(VAVAE_CONFIGS), default="f16d32",
                        help="architecture of a .pt/.safetensors VA-VAE: f16d32 (the release) or tiny (tests); a diffusers "
                        "folder carries its own (default f16d32)")
    parser.add_argument("--output_path", "--output_dir", dest="output_path", required=True,
                        help="where train.safetensors, val.safetensors, latents_stats.safetensors and users.json go")
    parser.add_argument("--batch_size", type=int, default=32, help="images encoded at once (default 32)")
    parser.add_argument("--image_size", type=int, default=256,
                        help="side of the square the images are brought to before encoding (default 256, the VA-VAE's)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="crop: ADM centre crop as LightningDiT (default); stretch: resize the whole image to a square, "
                        "keeping the full time axis of wide spectrograms")
    parser.add_argument("--val_fraction", type=float, default=0.1,
                        help="share of each user's images held out for validation when DATA_DIR has no val/ (default 0.1; "
                        "0 writes no val.safetensors)")
    parser.add_argument("--num_users", type=int, default=None,
                        help="number of users the model will know (default: the highest folder number); IDs run 1..num_users")
    parser.add_argument("--posterior", choices=POSTERIOR_MODES, default="sample",
                        help="sample: a draw from the VA-VAE posterior, seeded (LightningDiT's extractor, default); mode: its mean")
    parser.add_argument("--flip", action="store_true",
                        help="also store horizontally flipped copies (latents_flip); off by default because time reversal is "
                        "not label-safe for micro-Doppler gait")
    parser.add_argument("--seed", type=int, default=0, help="seed of the validation split and of posterior samples (default 0)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto uses the GPU when there is one")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="VA-VAE weights and activations: fp32 (default), bf16 or fp16 (GPU only)")
    parser.add_argument("--num_workers", type=int, default=None, help="image-loading worker processes (default 4 on GPU, 0 on CPU)")
    args = parse_with_config(parser, argv)
    if args.batch_size < 1 or args.image_size < 16:
        parser.error("--batch_size must be at least 1 and --image_size at least 16")
    if not 0.0 <= args.val_fraction < 1.0:
        parser.error("--val_fraction must be in [0, 1)")
    return args


def collect_splits(args) -> tuple[dict, list, list]:
    """The user folders, the train items and the validation items (explicit folders or a seeded split)."""
    data_dir = Path(args.data_dir)
    if not data_dir.is_dir():
        raise DataError(f"--data_dir {data_dir} does not exist; expected one folder per user (ID_1, ID_2, ...) or train/ and val/.")
    splits = find_split_folders(data_dir)
    train_root, val_root = (splits if splits else (data_dir, None))
    if args.val_dir:
        val_root = Path(args.val_dir)
    train_users = scan_user_folders(train_root)
    folders = {"train": {str(user): len(paths) for user, paths in train_users.items()}}
    if val_root is not None:
        val_users = scan_user_folders(val_root)
        unseen = sorted(set(val_users) - set(train_users))
        if unseen:
            raise DataError(
                f"Users {unseen} have validation images in {val_root} but no training folder in {train_root}; "
                "add their training images."
            )
        train_items, val_items = as_user_images(train_users), as_user_images(val_users)
        folders["val"] = {str(user): len(paths) for user, paths in val_users.items()}
        split = f"folders {train_root} and {val_root}"
    else:
        train_items, val_items = split_train_val(train_users, args.val_fraction, args.seed)
        split = f"seeded split of {train_root}: val_fraction {args.val_fraction}, seed {args.seed}"
    highest = max(train_users)
    num_users = args.num_users or highest
    if num_users < highest:
        raise UserError(f"--num_users {num_users} is smaller than the highest user folder number {highest}; raise it or drop the flag.")
    return {"num_users": num_users, "train_root": str(train_root), "val_root": str(val_root) if val_root else None,
            "split": split, "images_per_user": folders}, train_items, val_items


@torch.no_grad()
def encode_split(vae, items, args, device, generator, desc: str) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Latents (N,C,h,w) float32 on the CPU, flipped latents (or None) and the user IDs, in item order."""
    dataset = UserImageDataset(items, args.image_size, args.resize)
    workers = args.num_workers if args.num_workers is not None else (4 if device.type == "cuda" else 0)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=device.type == "cuda", drop_last=False)
    sample = args.posterior == "sample"
    latents, flips, users = [], [], []
    for images, user_ids in tqdm(loader, desc=desc, unit="batch"):
        images = images.to(device, non_blocking=True)
        latents.append(vae.encode(images, sample=sample, generator=generator).float().cpu())
        if args.flip:
            flips.append(vae.encode(torch.flip(images, dims=[-1]), sample=sample, generator=generator).float().cpu())
        users.append(user_ids)
    return torch.cat(latents), (torch.cat(flips) if args.flip else None), torch.cat(users)


def main(args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    info, train_items, val_items = collect_splits(args)
    if not train_items:
        raise DataError(f"No training images found under {info['train_root']}.")
    device = resolve_device(args.device)
    dtype = DTYPES[args.precision]
    if dtype != torch.float32 and device.type != "cuda":
        raise UserError(f"--precision {args.precision} needs a CUDA GPU; use fp32 on the CPU.")
    vae = load_vavae(args.vavae_path, device=device, dtype=dtype, config=args.vavae_config)
    factor = vae.downsample_factor
    if args.image_size % factor:
        raise UserError(f"--image_size {args.image_size} is not a multiple of the VA-VAE's downsampling factor {factor}.")
    fingerprint = file_fingerprint(args.vavae_path)
    print(f"VA-VAE {args.vavae_path} (fingerprint {fingerprint}): {vae.latent_channels} channels, "
          f"{args.image_size} px -> {args.image_size // factor}x{args.image_size // factor} latents on {device}")
    print(f"{info['num_users']} users; {len(train_items)} training and {len(val_items)} validation images ({info['split']})")

    generator = torch.Generator(device=device).manual_seed(args.seed)
    output = Path(args.output_path)
    extra = {"vae_config": args.vavae_config, "resize": args.resize, "source": info["train_root"], "seed": args.seed}
    written = {}
    stats = None
    for split, items in (("train", train_items), ("val", val_items)):
        path = output / f"{split}.safetensors"
        if not items:
            if path.exists():
                path.unlink()  # a stale validation file from an earlier extraction must not be picked up
            continue
        latents, flips, users = encode_split(vae, items, args, device, generator, f"encoding {split}")
        if split == "train":
            stats = compute_latent_stats(latents, fingerprint)
        save_latent_file(path, latents, users, num_users=info["num_users"], vae_fingerprint=fingerprint,
                         posterior=args.posterior, image_size=args.image_size, latents_flip=flips,
                         extra_metadata=dict(extra, split=split))
        written[split] = path
        print(f"wrote {path}: latents {tuple(latents.shape)}{' + flips' if flips is not None else ''}")
    stats.save(output / STATS_FILENAME)
    manifest = dict(info, vavae_path=str(args.vavae_path), vae_fingerprint=fingerprint, posterior=args.posterior,
                    image_size=args.image_size, resize=args.resize, flip=args.flip,
                    latent_shape=list(stats.mean.shape[1:2]) + [args.image_size // factor] * 2,
                    counts={"train": len(train_items), "val": len(val_items)})
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", output / "users.json")
    print(f"wrote {output / STATS_FILENAME} (train split, {stats.num_samples} latents) and users.json "
          f"in {time.perf_counter() - started:.1f} s")
    return {"files": written, "stats": stats, "num_users": info["num_users"], "manifest": manifest}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
