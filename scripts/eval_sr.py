"""Score super-resolved images the way the Real-ISR tables (SeeSR, OSEDiff) do: PSNR/SSIM, LPIPS, DISTS, FID, NIQE,
MUSIQ, MANIQA, CLIP-IQA; one CSV per image and a Markdown summary per run, ``--compare`` for one table of several runs.

    python scripts/eval_sr.py --results results/timestep_multiscale --gt preset/datasets/test_datasets/DIV2K/HR
    # the published table's protocol (Y channel, no border crop, every metric; files from local paths):
    python scripts/eval_sr.py --compare results/baseline results/timestep_multiscale --gt RealSR/HR --crop_border 0 \\
        --lpips_weights alex.pth --lpips_backbone alexnet-owt-7be5be79.pth --dists_weights dists_weights.pt \\
        --vgg16_weights vgg16-397923af.pth --inception_weights weights-inception-2015-12-05-6726825d.pth \\
        --pyiqa_metrics niqe musiq maniqa clipiqa --pyiqa_weights_dir iqa_weights

A run folder of ``infer.py seesr`` is read from its ``sample00/`` (SeeSR's layout). Files are matched by name stem
(``results/x/0801.png`` with ``GT/0801.png``); a result without a ground truth is an
error, ground truths without a result are listed and skipped. Writes one row per image to ``--csv`` (default
``<results>/metrics.csv``, last row the means) and the means as a Markdown table to ``--summary`` (default
``<results>/metrics.md``); ``--compare DIR ...`` does so for each folder and writes one table (``--compare_out``).

* PSNR / SSIM: BasicSR's definitions (``utils/metrics.py``): 8-bit, BT.601 Y channel (``--rgb`` for RGB),
  ``--crop_border`` pixels removed on each side (default 4, BasicSR's x4 habit; SeeSR's and OSEDiff's tables, made
  with pyiqa's ``psnr``/``ssim`` on Y, use 0: pass ``--crop_border 0`` to compare with them).
* LPIPS (Zhang et al., CVPR 2018, version 0.1 with AlexNet, the setting SeeSR reports): RGB in [-1, 1], whole image.
  Implemented here on torchvision's AlexNet and tested equal to the ``lpips`` package on the same weights; its two
  files: ``--lpips_weights`` the linear heads (``lpips/weights/v0.1/alex.pth``, found automatically when the lpips
  package is installed) and ``--lpips_backbone`` torchvision's AlexNet (default: torch hub's cache,
  ``alexnet-owt-7be5be79.pth``). Without them LPIPS is skipped with a note.
* DISTS by piq (``utils/iqa_metrics.py``): ``--dists_weights`` piq's ``dists_weights.pt`` and ``--vgg16_weights``
  torchvision's ``vgg16-397923af.pth`` (default: torch hub's cache); skipped with a note without them.
* FID between the SR and the HR folder by torch-fidelity (``--inception_weights``; ``utils/generation_metrics.py``):
  one value per folder, so it is in the summary and the returned means, not in the per-image CSV.
  pyiqa's FID (used by the tables) follows clean-fid's resizing, torch-fidelity the TensorFlow one: the values differ
  slightly; compare runs with each other, not digits with a paper.
* NIQE, MUSIQ, MANIQA, CLIP-IQA by pyiqa itself (``--pyiqa_metrics``; pyiqa is installed apart, its files read from
  ``--pyiqa_weights_dir``, see ``utils/iqa_metrics.py`` for the names).

Results are only comparable with published numbers when the data set, the crop and these settings are the same;
say which in any table.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import DataError, UserError, run_cli  # noqa: E402
from utils.iqa_metrics import (  # noqa: E402
    ALEXNET_FILE,
    DISTS_WEIGHTS_FILE,
    LPIPS_CHANNELS,  # noqa: F401 (tests build the heads from it)
    PYIQA_FILES,
    VGG16_FILE,
    LPIPSAlex,
    load_dists,
    load_pyiqa_metrics,
    markdown_table,
)
from utils.iqa_metrics import default_lpips_paths as lpips_default_paths  # noqa: E402
from utils.iqa_metrics import load_lpips as load_lpips_model  # noqa: E402
from utils.validators import non_negative_int, output_file  # noqa: E402

TABLE_ORDER = ("psnr", "ssim", "lpips", "dists", "fid", "niqe", "musiq", "maniqa", "clipiqa")  # the SeeSR/OSEDiff tables' order
MAX_SIZE_MISMATCH = 8  # px: SR of an LR whose side was floored by the scale can miss a few GT pixels


def default_lpips_paths() -> tuple[Path | None, Path]:
    """Where the LPIPS heads (an installed lpips package) and torchvision's AlexNet (torch hub cache) would be."""
    return lpips_default_paths()


def load_lpips(weights: str | None, backbone: str | None, device: torch.device) -> tuple[LPIPSAlex | None, str]:
    """The LPIPS network, or None and the reason it is skipped. Explicitly named files must exist."""
    return load_lpips_model(weights, backbone, device, defaults=default_lpips_paths())


def match_by_stem(results_dir: Path, gt_dir: Path) -> tuple[list[tuple[str, Path, Path]], list[str]]:
    """``[(stem, result, gt)]`` sorted by stem, and the stems of ground truths without a result."""
    from utils.images import list_images

    found = {}
    for what, folder in (("--results", results_dir), ("--gt", gt_dir)):
        if not folder.is_dir():
            raise DataError(f"{what} {folder} does not exist; pass a folder of images.")
        files = list_images(folder, recursive=False)
        if not files and what == "--results" and (folder / "sample00").is_dir():
            files = list_images(folder / "sample00", recursive=False)  # infer.py seesr's (SeeSR's) <run>/sample00/
        if not files:
            raise DataError(f"{what} {folder} holds no images.")
        by_stem = {}
        for path in files:
            if path.stem in by_stem:
                raise DataError(f"Two images in {folder} share the stem {path.stem!r}: {by_stem[path.stem].name}, {path.name}.")
            by_stem[path.stem] = path
        found[what] = by_stem
    results, gts = found["--results"], found["--gt"]
    orphans = sorted(set(results) - set(gts))
    if orphans:
        raise DataError(
            f"No ground truth in {gt_dir} for {len(orphans)} result(s): {', '.join(orphans[:5])}"
            f"{' ...' if len(orphans) > 5 else ''}; files are matched by name stem."
        )
    return [(stem, results[stem], gts[stem]) for stem in sorted(results)], sorted(set(gts) - set(results))


def evaluate(pairs, crop_border: int, test_y_channel: bool, lpips_model, device, dists_model=None, nr_metrics=None) -> list[dict]:
    """One row per image: PSNR/SSIM (BasicSR), LPIPS and DISTS against the GT when loaded, no-reference metrics of the SR."""
    from utils.images import load_rgb, pil_to_tensor
    from utils.metrics import calculate_psnr, calculate_ssim

    rows = []
    for stem, result_path, gt_path in pairs:
        result = pil_to_tensor(load_rgb(result_path), (0.0, 1.0))
        gt = pil_to_tensor(load_rgb(gt_path), (0.0, 1.0))
        note = ""
        if result.shape != gt.shape:
            (rh, rw), (gh, gw) = result.shape[-2:], gt.shape[-2:]
            if abs(rh - gh) > MAX_SIZE_MISMATCH or abs(rw - gw) > MAX_SIZE_MISMATCH:
                raise DataError(
                    f"{result_path} is {rw}x{rh} px but its ground truth {gt_path} is {gw}x{gh} px; super-resolve "
                    "with the --upscale that produced the LR images."
                )
            height, width = min(rh, gh), min(rw, gw)
            result, gt = result[:, :height, :width], gt[:, :height, :width]
            note = f"cropped to {width}x{height}"
        row = {
            "image": stem,
            "psnr": calculate_psnr(result, gt, crop_border, test_y_channel),
            "ssim": calculate_ssim(result, gt, crop_border, test_y_channel),
        }
        with torch.no_grad():
            if lpips_model is not None:
                row["lpips"] = float(lpips_model(result[None].to(device) * 2 - 1, gt[None].to(device) * 2 - 1)[0])
            if dists_model is not None:
                row["dists"] = float(dists_model(result[None].to(device), gt[None].to(device)).reshape(-1)[0])
            for name, metric in (nr_metrics or {}).items():
                row[name] = float(metric(result[None].to(device)).reshape(-1)[0])
        row["note"] = note
        rows.append(row)
    return rows


def check_crop_border(pairs: list[tuple[str, Path, Path]], crop_border: int) -> None:
    """Every image keeps some pixels after the border crop (image headers only, before any network loads)."""
    from PIL import Image

    for _, result, gt in pairs:
        for path in (result, gt):
            try:
                with Image.open(path) as image:
                    width, height = image.size
            except OSError as err:
                raise DataError(f"Cannot read image {path} ({err}); replace or remove it.") from err
            if 2 * crop_border >= min(width, height):
                raise UserError(f"--crop_border {crop_border} leaves nothing of {path} ({width}x{height}); pass a border "
                                f"below {(min(width, height) + 1) // 2}.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=None, help="folder of super-resolved images (or several with --compare)")
    parser.add_argument("--compare", nargs="+", default=None, metavar="DIR",
                        help="several result folders scored alike against --gt, one table in --compare_out")
    parser.add_argument("--gt", required=True, help="folder of ground-truth HR images (matched by name stem)")
    parser.add_argument("--crop_border", type=non_negative_int, default=4,
                        help="pixels removed from each side before PSNR/SSIM (default 4, BasicSR's x4 habit; the SeeSR and "
                             "OSEDiff tables use 0)")
    parser.add_argument("--rgb", action="store_true", help="PSNR/SSIM on RGB instead of the Y channel")
    parser.add_argument("--lpips_weights", default=None,
                        help="LPIPS linear heads, lpips/weights/v0.1/alex.pth (default: from an installed lpips package)")
    parser.add_argument("--lpips_backbone", default=None,
                        help=f"torchvision ImageNet AlexNet weights (default: torch hub cache, {ALEXNET_FILE})")
    parser.add_argument("--dists_weights", default=None,
                        help=f"piq's {DISTS_WEIGHTS_FILE} (default: torch hub cache; DISTS is skipped without it)")
    parser.add_argument("--vgg16_weights", default=None,
                        help=f"torchvision's ImageNet VGG16 {VGG16_FILE} for DISTS (default: torch hub cache)")
    parser.add_argument("--inception_weights", default=None,
                        help="torch-fidelity's weights-inception-2015-12-05-6726825d.pth: FID between the SR and HR folders")
    parser.add_argument("--pyiqa_metrics", nargs="+", default=[], choices=sorted(PYIQA_FILES),
                        help="no-reference metrics computed by pyiqa (installed apart): niqe musiq maniqa clipiqa")
    parser.add_argument("--pyiqa_weights_dir", default=None,
                        help="folder laid out like torch hub's cache that holds pyiqa/<file> and clip/RN50.pt "
                             "(default: torch hub's cache, where pyiqa keeps them)")
    parser.add_argument("--csv", default=None, type=output_file, help="per-image metrics file (default <results>/metrics.csv)")
    parser.add_argument("--summary", default=None, type=output_file, help="Markdown summary of the run (default <results>/metrics.md)")
    parser.add_argument("--compare_out", default=None, type=output_file,
                        help="Markdown table of a --compare run (default comparison.md beside the first folder)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="for the networks (default auto)")
    args = parser.parse_args(argv)
    if (args.results is None) == (args.compare is None):
        parser.error("pass --results DIR, or --compare DIR [DIR ...]")
    if args.compare and (args.csv or args.summary):
        parser.error("--csv and --summary name one run's files; with --compare each folder gets its own metrics.csv/.md")
    return args


def score_folder(results: Path, args, models: dict, device) -> dict:
    """Every metric of one results folder against --gt; writes its CSV and Markdown summary."""
    pairs, unscored = match_by_stem(results, Path(args.gt))
    if unscored:
        print(f"{len(unscored)} ground truth(s) without a result, not scored: {', '.join(unscored[:5])}"
              f"{' ...' if len(unscored) > 5 else ''}")
    rows = evaluate(pairs, args.crop_border, not args.rgb, models["lpips"], device, models["dists"], models["nr"])
    metrics = [name for name in ("psnr", "ssim", "lpips", "dists", *models["nr"]) if name in rows[0]]
    means = {name: sum(row[name] for row in rows) / len(rows) for name in metrics}
    if args.inception_weights:
        from utils.generation_metrics import compute_generation_metrics

        # The whole SR folder against the whole HR folder, as the Real-ISR tables do (pyiqa's FID of two folders).
        fid = compute_generation_metrics(str(results), args.gt, args.inception_weights, ("fid",), device=str(device),
                                         batch_size=16)
        means["fid"] = fid["frechet_inception_distance"]
    csv_path = Path(args.csv) if args.csv else results / "metrics.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=["image"] + metrics + ["note"])
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (f"{value:.6f}" if isinstance(value, float) else value) for key, value in row.items()})
        writer.writerow({"image": "mean", **{name: f"{means[name]:.6f}" for name in metrics}, "note": ""})
    channel = "RGB" if args.rgb else "Y"
    setting = f"{len(rows)} images, PSNR/SSIM on {channel} with a {args.crop_border} px border crop"
    summary_path = Path(args.summary) if args.summary else results / "metrics.md"
    summary_path.parent.mkdir(parents=True, exist_ok=True)
    columns = [name for name in TABLE_ORDER if name in means]
    summary_path.write_text(f"# {results}\n\nAgainst {args.gt}: {setting}.\n\n"
                            + markdown_table([{"method": results.name, **means}], columns))
    print(f"{results}: {setting}: " + ", ".join(f"{name.upper()} {means[name]:.4f}" for name in columns))
    print(f"per image: {csv_path}; summary: {summary_path}")
    return {"rows": rows, "means": means, "csv": csv_path, "summary": summary_path, "setting": setting,
            "lpips": models["lpips"] is not None}


def main(args: argparse.Namespace) -> dict:
    from utils.accelerator import resolve_device

    device = resolve_device(args.device)
    folders = [Path(args.results)] if args.results else [Path(folder) for folder in args.compare]
    for folder in folders:  # before any network is loaded
        check_crop_border(match_by_stem(folder, Path(args.gt))[0], args.crop_border)
    if args.inception_weights:
        from utils.generation_metrics import check_inception_weights

        check_inception_weights(args.inception_weights)
    lpips_model, lpips_note = load_lpips(args.lpips_weights, args.lpips_backbone, device)
    dists_model, dists_note = load_dists(args.dists_weights, args.vgg16_weights, device)
    nr = load_pyiqa_metrics(args.pyiqa_metrics, args.pyiqa_weights_dir, device)
    print(lpips_note)
    print(dists_note)
    if not args.inception_weights:
        print("FID skipped: pass --inception_weights weights-inception-2015-12-05-6726825d.pth")
    models = {"lpips": lpips_model, "dists": dists_model, "nr": nr}
    reports = [score_folder(folder, args, models, device) for folder in folders]
    if args.results:
        return reports[0]
    table_rows = [{"method": folder.name, **report["means"]} for folder, report in zip(folders, reports)]
    columns = [name for name in TABLE_ORDER if name in reports[0]["means"]]
    out = Path(args.compare_out) if args.compare_out else folders[0].parent / "comparison.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"Against {args.gt}: {reports[0]['setting']}.\n\n" + markdown_table(table_rows, columns))
    print(out.read_text(), end="")
    print(f"table: {out}")
    return {"reports": reports, "table": out}


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
