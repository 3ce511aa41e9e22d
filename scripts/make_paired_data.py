"""SeeSR's ControlNet training pairs, written once: ``gt/``, ``lr/`` and ``sr_bicubic/`` PNGs of one numbered name.

After cswry/SeeSR ``utils_data/make_paired_data.py`` (SeeSR, Wu et al., CVPR 2024), same flags and layout:

    python scripts/make_paired_data.py --gt_path /data/DIV2K_train_HR /data/Flickr2K \\
        --save_dir preset/datasets/train_datasets/training_for_seesr --epoch 1
    python scripts/make_tags.py --root_path preset/datasets/train_datasets/training_for_seesr
    python train_seesr_timestep.py --root_folders preset/datasets/train_datasets/training_for_seesr ...

Each GT is a 512 px crop as SeeSR's ``RealESRGANDataset`` takes it (flipped half the time; an image with a side under
the crop is first padded at the bottom and right by mirroring), USM-sharpened (the training target), and degraded by
Real-ESRGAN's two-stage pipeline with the x4plus ranges (``data.degradations.DegradationConfig.seesr()``) into a
128 px LR; ``sr_bicubic`` is the LR bicubic-upsampled back to 512 px (``F.interpolate``, as the reference). Files are
numbered as the reference numbers them: ``images x epoch x start_gpu + 1`` onwards, seven digits.

Differences from the reference, on purpose: every image of every folder is used, recursively and of any common type
(SeeSR's dataset reads only ``*.png``, drops the last incomplete batch, and swaps images under 384 x 384 px or
100 KB for random others); every pair draws its own degradation, seeded by (seed, copy, round, image), so the same
seed writes the same files with any number of workers, and ``--batch_size`` changes nothing; a rerun skips the pairs
already written (each file appears complete or not at all) and refuses a folder written with other settings
(``make_paired_data.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402

from data.degradations import DegradationConfig  # noqa: E402
from data.sr_pairs import add_paired_data_arguments, check_paired_data_arguments, make_paired_data  # noqa: E402
from utils.config import ArgumentParser  # noqa: E402
from utils.errors import run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_paired_data_arguments(parser, "preset/datasets/train_datasets/training_for_seesr")
    args = parser.parse_args(argv)
    check_paired_data_arguments(parser, args)
    return args


def main(args: argparse.Namespace) -> dict:
    return make_paired_data(args, DegradationConfig.seesr(), "make_paired_data")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
