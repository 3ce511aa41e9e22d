"""Tag prompts of SeeSR's training GT: plain RAM's tags of every ``gt/<name>.png``, written to ``tag/<name>.txt``.

After cswry/SeeSR ``utils_data/make_tags.py`` (SeeSR, Wu et al., CVPR 2024): RAM Swin-L
(``ram_swin_large_14m.pth``, without SeeSR's DAPE LoRA: the GT is clean, so the plain tagger is the right one) on
each GT image resized to 384 px, fp32; the file holds the tags joined by ", " with a trailing comma (``"cat, grass,"``),
which ``train_seesr_timestep.py --root_folders`` reads as the image's prompt.

    python scripts/make_paired_data.py --gt_path /data/DIV2K_train_HR --save_dir preset/datasets/train_datasets/training_for_seesr
    python scripts/make_tags.py --root_path preset/datasets/train_datasets/training_for_seesr \\
        --ram_path preset/models/ram_swin_large_14m.pth

``--start_gpu i --all_gpu n`` tags the i-th of n equal shards (one process per GPU, as the reference). A tag file
that exists is kept, so a rerun finishes an interrupted one; each file is written under a temporary name and renamed.

Differences from the reference, on purpose: the files go into ``tag/`` (the reference's ``tag_path + name`` lacks the
separator and writes ``<root>/tag<name>.txt`` beside the folder its own dataset reads); every common image type in
``gt/`` is tagged, not only ``*.png``.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from the repository root or anywhere

import argparse  # noqa: E402

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import UserError, run_cli  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from utils.cli import add_device_flag, add_ram_arguments

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root_path", default="preset/datasets/train_datasets/training_for_seesr",
                        help="the folder make_paired_data.py wrote: its gt/ is tagged into tag/ (default "
                        "preset/datasets/train_datasets/training_for_seesr, SeeSR's)")
    parser.add_argument("--start_gpu", type=int, default=0, help="which shard this process tags, 0..all_gpu-1 (default 0)")
    parser.add_argument("--all_gpu", type=int, default=1, help="how many shards the GT images are split into (default 1)")
    add_ram_arguments(parser, fine_tuned=False)  # --ram_ft_path is refused below, with the reason
    add_device_flag(parser)
    args = parser.parse_args(argv)
    if args.ram_ft_path is not None:
        parser.error("--ram_ft_path: make_tags.py tags the clean GT with plain RAM, as SeeSR's make_tags.py; DAPE is for "
                     "degraded inputs, drop the flag")
    if args.all_gpu < 1 or not 0 <= args.start_gpu < args.all_gpu:
        parser.error(f"--start_gpu must be in 0..--all_gpu-1 and --all_gpu at least 1, found {args.start_gpu} and {args.all_gpu}")
    return args


def main(args: argparse.Namespace) -> dict:
    from tqdm import tqdm

    from data.sr_pairs import check_training_images, load_image_tensor
    from models.ram import load_ram_tagger
    from utils.accelerator import resolve_device
    from utils.checkpoint import atomic_write_text
    from utils.images import list_images

    root = Path(args.root_path)
    files = list_images(root / "gt", recursive=False) if (root / "gt").is_dir() else []
    if not files:
        state = "holds no images" if (root / "gt").is_dir() else "does not exist"
        raise UserError(f"--root_path {root}: its gt/ folder {state}; pass the --save_dir that make_paired_data.py wrote.")
    shard = files[args.start_gpu * len(files) // args.all_gpu : (args.start_gpu + 1) * len(files) // args.all_gpu]
    tag_dir = root / "tag"
    todo = [path for path in shard if not (tag_dir / f"{path.stem}.txt").is_file()]
    check_training_images(todo, what="GT image")
    if not Path(args.ram_path).is_file():
        raise UserError(f"--ram_path {args.ram_path} does not exist; pass RAM's ram_swin_large_14m.pth.")
    device = resolve_device(args.device)
    written = []
    if todo:
        tagger = load_ram_tagger(args.ram_path, None, args.ram_tag_list, args.ram_tag_thresholds, device=device)
        print(f"tagging {len(todo)} GT images of {root / 'gt'} with plain RAM ({args.ram_path}, fp32, {device})")
        for path in tqdm(todo, desc="tags", unit="image"):
            tags = tagger.tags(load_image_tensor(path)[None])[0]
            atomic_write_text(f"{tags},", tag_dir / f"{path.stem}.txt")
            written.append(path.stem)
    print(f"make_tags: {len(written)} tag files written, {len(shard) - len(todo)} already there, in {tag_dir}")
    return {"written": written, "skipped": len(shard) - len(todo), "tag_dir": tag_dir}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
