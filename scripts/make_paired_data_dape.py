"""SeeSR's DAPE training pairs, written once: whole images resized to 512 px, degraded, in SeeSR's layout.

After cswry/SeeSR ``utils_data/make_paired_data_DAPE.py`` (SeeSR, Wu et al., CVPR 2024), same flags and layout:

    python scripts/make_paired_data_dape.py --gt_path /data/DIV2K_train_HR \\
        --save_dir preset/datasets/train_datasets/training_for_dape

Each GT is the whole image resized to 512 x 512 with PIL's LANCZOS (aspect ratio not kept, never flipped: SeeSR's
``SimpleDataset``), USM-sharpened and degraded with the same Real-ESRGAN x4plus ranges as the ControlNet pairs
(``data.degradations.DegradationConfig.dape()``; SeeSR's milder ``params_realesrgan.yml`` is not what this script
uses). The output is what SeeSR's ``DAPEDataset`` (``basicsr/data/dape_dataset.py``) reads: ``gt/`` and
``sr_bicubic/`` under each root, plus ``lr/``, numbered as ``make_paired_data.py`` numbers them.

Differences from the reference, on purpose: as ``scripts/make_paired_data.py`` (every image used, per-pair seeded
degradations, resumable, settings recorded in ``make_paired_data.json``).
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
    add_paired_data_arguments(parser, "preset/datasets/train_datasets/training_for_dape")
    args = parser.parse_args(argv)
    check_paired_data_arguments(parser, args)
    return args


def main(args: argparse.Namespace) -> dict:
    return make_paired_data(args, DegradationConfig.dape(), "make_paired_data_dape")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
