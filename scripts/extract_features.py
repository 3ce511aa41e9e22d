"""Stage 1 of user-conditioned generation: encode every image once with the frozen VA-VAE.

After hustvl/LightningDiT ``extract_features.py``: images centre-cropped to 256 px and scaled to [-1, 1], encoded
by the VA-VAE (f16d32: 3x256x256 -> 32x16x16), written with LightningDiT's tensor names (``latents``,
``labels``, and ``latents_flip`` only with ``--flip``) plus metadata (VA-VAE file fingerprint, posterior mode
or sample, image size, number of users). Per-channel statistics (1,C,1,1) come from the train split only and
are saved beside the latents with the fingerprint, so training and decoding can check they belong together.

Input (``--data_dir``): one folder per user named ``ID_<n>`` or ``user_<n>`` (n = 1..num_users, mapped by the
number in the name, never by sorted order), either directly (a seeded, per-user ``--val_fraction`` of each user's
recordings goes to validation, a recording's crops together: the subfolder inside the user folder by default, or
``--group_pattern`` / ``--split_manifest``) or under ``train/`` and ``val/``. A validation file identical to a
training file is an error. The work is ``pipelines/user_features.py``; this is its command line.

    python scripts/extract_features.py --data_dir /kaggle/working/data_split \\
        --vavae_path /kaggle/working/pretrained/vavae-imagenet256-f16d32-dinov2.pt \\
        --output_path /kaggle/working/latent_features --batch_size 32

Writes ``OUTPUT_PATH/train.safetensors``, ``val.safetensors`` (unless there is no validation split),
``latents_stats.safetensors`` and ``users.json`` (folder -> user ID, images per split, how the split was made, the
validation files).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402

from data.latents import POSTERIOR_MODES  # noqa: E402
from data.user_images import RESIZE_MODES  # noqa: E402
from models.vavae import VAVAE_CONFIGS  # noqa: E402
from pipelines.user_features import DTYPES, ExtractionSettings, extract_features  # noqa: E402
from utils.config import ArgumentParser, add_config_argument, parse_with_config  # noqa: E402
from utils.errors import run_cli  # noqa: E402
from utils.validators import fraction_below_one, int_at_least, non_negative_int, output_folder, positive_int, seed  # noqa: E402


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
    parser.add_argument("--output_path", "--output_dir", dest="output_path", required=True, type=output_folder,
                        help="where train.safetensors, val.safetensors, latents_stats.safetensors and users.json go")
    parser.add_argument("--batch_size", type=positive_int, default=32, help="images encoded at once (default 32)")
    parser.add_argument("--image_size", type=int_at_least(16), default=256,
                        help="side of the square the images are brought to before encoding (default 256, the VA-VAE's)")
    parser.add_argument("--resize", choices=RESIZE_MODES, default="crop",
                        help="crop: ADM centre crop as LightningDiT (default); stretch: resize the whole image to a square, "
                        "keeping the full time axis of wide spectrograms")
    parser.add_argument("--val_fraction", type=fraction_below_one, default=0.1,
                        help="share of each user's images held out for validation when DATA_DIR has no val/ (default 0.1; "
                        "0 writes no val.safetensors)")
    parser.add_argument("--group_pattern", default=None,
                        help="regular expression naming an image's recording in its path inside the user folder (first group, "
                        "or the whole match), e.g. '^(rec\\d+)_' for rec3_crop07.png; a recording's images stay on one side "
                        "of the --val_fraction split (default: the subfolder inside the user folder; an image directly in "
                        "the user folder is its own recording)")
    parser.add_argument("--split_manifest", default=None,
                        help="CSV with a header path,group (recordings for the seeded split) or path,split (train/val given); "
                        "paths relative to --data_dir")
    parser.add_argument("--num_users", type=positive_int, default=None,
                        help="number of users the model will know (default: the highest folder number); IDs run 1..num_users")
    parser.add_argument("--posterior", choices=POSTERIOR_MODES, default="sample",
                        help="sample: a draw from the VA-VAE posterior, seeded (LightningDiT's extractor, default); mode: its mean")
    parser.add_argument("--flip", action="store_true",
                        help="also store horizontally flipped copies (latents_flip); off by default because time reversal is "
                        "not label-safe for micro-Doppler gait")
    parser.add_argument("--seed", type=seed, default=0, help="seed of the validation split and of posterior samples (default 0)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="auto uses the GPU when there is one")
    parser.add_argument("--precision", choices=sorted(DTYPES), default="fp32",
                        help="VA-VAE weights and activations: fp32 (default), bf16 or fp16 (GPU only)")
    parser.add_argument("--num_workers", type=non_negative_int, default=None,
                        help="image-loading worker processes (default 4 on GPU, 0 on CPU)")
    return parse_with_config(parser, argv)


def main(args: argparse.Namespace) -> dict:
    settings = ExtractionSettings(**{k: v for k, v in vars(args).items() if k != "config"})
    return extract_features(settings)


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
