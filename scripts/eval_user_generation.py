"""Score user-conditioned spectrogram generation: is each sample the requested person, diverse, not a copy? And how
much does the VA-VAE itself lose?

    python infer.py user --checkpoint runs/dit/checkpoints/best.ckpt --vavae_path vavae.pt --output_dir samples \\
        --num_samples_per_user 50
    python scripts/eval_user_generation.py --data_dir /kaggle/working/data_split --generated_dir samples \\
        --vavae_path vavae-imagenet256-f16d32-dinov2.pt --output_dir eval_user

1. A per-user classifier (torchvision ResNet-18, from scratch or ``--classifier_weights`` resnet18-f37072fd.pth) is
   trained on the **training split** of ``--data_dir`` (``train/``+``val/`` folders, or the seeded split by recording
   that scripts/extract_features.py makes: same ``--val_fraction``/``--seed``), and scored on the held-out split.
   ``--classifier`` reuses a saved one (``<output_dir>/classifier.pt``).
2. On ``--generated_dir`` (infer.py user's ``user_XX/`` folders or ``micro_doppler_userXX_NNN.png`` files): accuracy
   for the requested user, ``confusion_matrix.png``, per-user FID/KID in the classifier's feature space against the
   held-out images, diversity and memorisation (see utils/user_generation_metrics.py).
3. With ``--vavae_path``: PSNR/SSIM (BasicSR, RGB) and, with ``--lpips_weights``, LPIPS of encode-decode of the
   held-out images, and the classifier's accuracy on those reconstructions: the ceiling for generated samples.

Writes ``report.json``, ``report.md`` and ``per_user.csv`` to ``--output_dir``. On a handful of images per user the
feature-space FID is dominated by its small-sample bias: compare runs with equal counts, and read KID beside it.
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.config import ArgumentParser  # noqa: E402
from utils.errors import DataError, UserError, run_cli  # noqa: E402
from utils.validators import check_output_dir, output_folder, positive_float, positive_int, seed  # noqa: E402

FLAT_NAME = re.compile(r"^micro_doppler_user0*(\d+)_\d+$")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", required=True, help="the users' ID_n folders (or train/ and val/ holding them)")
    parser.add_argument("--generated_dir", default=None, help="infer.py user's output folder (omit for the VA-VAE report only)")
    parser.add_argument("--output_dir", required=True, type=output_folder,
                        help="where report.json/.md, per_user.csv and the PNG go (created)")
    parser.add_argument("--vavae_path", default=None, help="VA-VAE file or diffusers folder: the reconstruction report")
    parser.add_argument("--vavae_config", choices=("f16d32", "tiny"), default="f16d32", help="VA-VAE architecture (tiny: tests)")
    parser.add_argument("--lpips_weights", default=None, help="lpips' weights/v0.1/alex.pth: LPIPS of the reconstructions")
    parser.add_argument("--lpips_backbone", default=None, help="torchvision's alexnet-owt-7be5be79.pth (default: torch hub cache)")
    parser.add_argument("--image_size", type=positive_int, default=256, help="side the VA-VAE sees, as extraction (default 256)")
    parser.add_argument("--resize", choices=("crop", "stretch"), default="crop", help="as scripts/extract_features.py (default crop)")
    parser.add_argument("--val_fraction", type=float, default=0.1, help="held-out share when there is no val/ (default 0.1)")
    parser.add_argument("--seed", type=seed, default=0, help="split and classifier seed (default 0, as extraction)")
    parser.add_argument("--classifier", default=None, help="a classifier.pt saved by an earlier run, instead of training one")
    parser.add_argument("--classifier_weights", default=None, help="torchvision's ImageNet resnet18-f37072fd.pth (default: from scratch)")
    parser.add_argument("--classifier_size", type=positive_int, default=128, help="side of the classifier's input (default 128)")
    parser.add_argument("--classifier_epochs", type=positive_int, default=15, help="training epochs (default 15)")
    parser.add_argument("--classifier_batch_size", type=positive_int, default=32, help="default 32")
    parser.add_argument("--classifier_lr", type=positive_float, default=1e-3, help="AdamW learning rate (default 1e-3)")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto")
    args = parser.parse_args(argv)
    if not 0.0 < args.val_fraction < 1.0:
        parser.error("--val_fraction must be between 0 and 1 (the held-out real images every score compares against)")
    return args


def split_real(data_dir: Path, val_fraction: float, seed: int) -> tuple[list, list]:
    """``(train, val)`` lists of data.user_images.UserImage, as scripts/extract_features.py splits them."""
    from data.user_images import as_user_images, find_split_folders, recording_groups, scan_user_folders, split_train_val

    folders = find_split_folders(data_dir)
    if folders is not None:
        train_dir, val_dir = folders
        if val_dir is None:
            raise DataError(f"{data_dir} has train/ but no val/: the scores need held-out images; add val/ or drop train/.")
        return as_user_images(scan_user_folders(train_dir)), as_user_images(scan_user_folders(val_dir))
    users = scan_user_folders(data_dir)
    return split_train_val(users, val_fraction, seed, recording_groups(users, data_dir))


def generated_images(folder: Path) -> list[tuple[Path, int]]:
    """``[(path, requested user)]`` from infer.py user's ``user_XX/`` folders, else its flat files."""
    from data.user_images import scan_user_folders
    from utils.images import list_images

    if not folder.is_dir():
        raise DataError(f"--generated_dir {folder} does not exist; pass infer.py user's --output_dir.")
    if any(p.is_dir() and not p.name.startswith((".", "_")) for p in folder.iterdir()):
        return [(path, user) for user, paths in scan_user_folders(folder).items() for path in paths]
    found = []
    for path in list_images(folder, recursive=False):
        match = FLAT_NAME.match(path.stem)
        if match:
            found.append((path, int(match[1])))
    if not found:
        raise DataError(f"--generated_dir {folder} holds no user_XX/ folders nor micro_doppler_userXX_NNN.png files.")
    return found


def load_images(paths, image_size: int, resize: str, classifier_size: int):
    """``(images in [-1, 1] at image_size, uint8 images at classifier_size)``."""
    import torch

    from data.user_images import prepare_image
    from utils.images import load_rgb

    full = torch.stack([prepare_image(load_rgb(path), image_size, resize) for path in paths])
    return full, to_classifier_input(full, classifier_size)


def to_classifier_input(images, size: int):
    """[-1, 1] images -> uint8 at ``size`` (antialiased bilinear)."""
    import torch
    import torch.nn.functional as F

    small = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return ((small.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def main(args: argparse.Namespace) -> dict:
    import torch

    from utils.accelerator import resolve_device
    from utils.user_generation_metrics import (
        build_user_classifier,
        classify,
        confusion_matrix,
        save_confusion_png,
        score_user,
        train_user_classifier,
    )

    device = resolve_device(args.device)
    output_dir = check_output_dir(args.output_dir)
    check_paths(args)
    torch.manual_seed(args.seed)
    train, val = split_real(Path(args.data_dir), args.val_fraction, args.seed)
    user_ids = sorted({item.user_id for item in train + val})
    if not val:
        raise DataError(f"The split of {args.data_dir} leaves no held-out image; raise --val_fraction or add val/.")
    generated = generated_images(Path(args.generated_dir)) if args.generated_dir else []
    unknown = sorted({user for _, user in generated} - set(user_ids))
    if unknown:
        raise DataError(f"--generated_dir holds samples of user(s) {unknown} that {args.data_dir} has no folder for.")
    index_of = {user: k for k, user in enumerate(user_ids)}
    # Every model file is read before the classifier trains, so a bad path costs seconds, not a training run.
    reconstruction_models = load_reconstruction_models(args, device) if args.vavae_path else None
    output_dir.mkdir(parents=True, exist_ok=True)

    train_full, train_small = load_images([i.path for i in train], args.image_size, args.resize, args.classifier_size)
    val_full, val_small = load_images([i.path for i in val], args.image_size, args.resize, args.classifier_size)
    train_labels = torch.tensor([index_of[i.user_id] for i in train])
    val_labels = torch.tensor([index_of[i.user_id] for i in val])
    print(f"{len(user_ids)} users: {len(train)} training and {len(val)} held-out images")

    if args.classifier:
        saved = torch.load(args.classifier, map_location="cpu", weights_only=True)
        if saved.get("user_ids") != user_ids or saved.get("classifier_size") != args.classifier_size:
            raise UserError(f"--classifier {args.classifier} was trained for users {saved.get('user_ids')} at "
                            f"{saved.get('classifier_size')} px, not users {user_ids} at {args.classifier_size} px; train a new one.")
        classifier = build_user_classifier(len(user_ids))
        classifier.load_state_dict(saved["model"])
        classifier = classifier.to(device).eval()
    else:
        classifier = build_user_classifier(len(user_ids), args.classifier_weights)
        classifier = train_user_classifier(classifier, train_small, train_labels, epochs=args.classifier_epochs,
                                           batch_size=args.classifier_batch_size, learning_rate=args.classifier_lr,
                                           seed=args.seed, device=device)
        torch.save({"model": classifier.state_dict(), "user_ids": user_ids, "classifier_size": args.classifier_size},
                   output_dir / "classifier.pt")
    _, train_features = classify(classifier, train_small, device)
    val_predicted, val_features = classify(classifier, val_small, device)
    report = {
        "users": user_ids, "num_train": len(train), "num_val": len(val),
        "classifier": {"accuracy_held_out_real": float((val_predicted == val_labels).double().mean()),
                       "source": args.classifier or "trained here", "image_size": args.classifier_size},
    }
    print(f"classifier accuracy on held-out real images: {report['classifier']['accuracy_held_out_real']:.3f}")

    rows = []
    if generated:
        _, gen_small = load_images([path for path, _ in generated], args.image_size, args.resize, args.classifier_size)
        requested = torch.tensor([index_of[user] for _, user in generated])
        gen_predicted, gen_features = classify(classifier, gen_small, device)
        matrix = confusion_matrix(requested, gen_predicted, len(user_ids))
        accuracy = float((gen_predicted == requested).double().mean())
        save_confusion_png(matrix, user_ids, output_dir / "confusion_matrix.png",
                           f"{len(generated)} generated samples\naccuracy {accuracy:.3f} for the requested user")
        for user in sorted({user for _, user in generated}):
            k = index_of[user]
            scores = score_user(user, gen_features[requested == k], gen_predicted[requested == k], k,
                                val_features[val_labels == k], train_features[train_labels == k])
            rows.append(vars(scores))
        report["generated"] = {"num_samples": len(generated), "accuracy": accuracy, "confusion_matrix": matrix.tolist(),
                               "per_user": rows}
        print(f"generated: {len(generated)} samples, accuracy {accuracy:.3f} for the requested user")

    if args.vavae_path:
        report["vavae"] = vavae_report(args, val_full, val_labels, classifier, device, *reconstruction_models)
    write_reports(report, rows, output_dir)
    return report


def check_paths(args) -> None:
    """Every file flag names an existing file and every folder flag a folder (before any image is read)."""
    for flag, hint in (("classifier", "pass a classifier.pt from an earlier run or drop it to train one"),
                       ("lpips_weights", "pass lpips' weights/v0.1/alex.pth or drop it"),
                       ("lpips_backbone", "pass torchvision's alexnet-owt-7be5be79.pth or drop it")):
        value = getattr(args, flag)
        if value and not Path(value).is_file():
            raise UserError(f"--{flag} {value} does not exist; {hint}.")
    if args.vavae_path and not Path(args.vavae_path).exists():
        raise UserError(f"--vavae_path {args.vavae_path} does not exist; pass the VA-VAE file or diffusers folder used for extraction.")
    if args.generated_dir and not Path(args.generated_dir).is_dir():
        raise DataError(f"--generated_dir {args.generated_dir} does not exist; pass infer.py user's output folder.")


def load_reconstruction_models(args, device) -> tuple:
    """``(vae, lpips_model or None)`` for the reconstruction report."""
    from models.vavae import load_vavae

    vae = load_vavae(args.vavae_path, device=device, config=args.vavae_config)
    lpips_model = None
    if args.lpips_weights:
        from utils.iqa_metrics import load_lpips

        lpips_model, note = load_lpips(args.lpips_weights, args.lpips_backbone, device)
        if lpips_model is None:
            raise UserError(note)
    return vae, lpips_model


def vavae_report(args, images, labels, classifier, device, vae, lpips_model) -> dict:
    """Encode-decode of the held-out images: PSNR/SSIM/LPIPS and the classifier's accuracy on the reconstructions."""
    import torch

    from utils.metrics import batch_psnr, batch_ssim
    from utils.user_generation_metrics import classify

    recon = []
    for start in range(0, len(images), 16):
        batch = images[start : start + 16].to(device)
        recon.append(vae.decode(vae.encode(batch)).float().clamp(-1, 1).cpu())
    recon = torch.cat(recon)
    original01, recon01 = (images + 1) / 2, (recon + 1) / 2
    result = {"psnr": float(batch_psnr(recon01, original01).mean()), "ssim": float(batch_ssim(recon01, original01).mean())}
    if lpips_model is not None:
        with torch.no_grad():
            result["lpips"] = float(torch.cat([lpips_model(recon[s : s + 16].to(device), images[s : s + 16].to(device)).cpu()
                                               for s in range(0, len(images), 16)]).mean())
    predicted, _ = classify(classifier, to_classifier_input(recon, args.classifier_size), device)
    result["classifier_accuracy_on_reconstructions"] = float((predicted == labels).double().mean())
    print("VA-VAE reconstruction of the held-out images: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


def write_reports(report: dict, rows: list[dict], output_dir: Path) -> None:
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"# User-generation evaluation\n\nUsers {report['users']}: {report['num_train']} training, {report['num_val']} "
             f"held-out real images. Classifier accuracy on held-out real images: "
             f"{report['classifier']['accuracy_held_out_real']:.3f}.\n"]
    columns = ["user", "num_generated", "accuracy", "fid", "kid", "diversity_generated", "diversity_real",
               "nn_train_distance_generated", "nn_train_distance_real", "suspiciously_close"]
    if rows:
        generated = report["generated"]
        lines.append(f"\n{generated['num_samples']} generated samples: accuracy {generated['accuracy']:.3f} for the requested "
                     "user (confusion_matrix.png). FID/KID, diversity and nearest-training distances in the classifier's "
                     "features; suspiciously_close = share of samples nearer their nearest training image than 95 % of "
                     "held-out real images are.\n\n")
        lines.append("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns) + "\n")
        for row in rows:
            lines.append("| " + " | ".join("" if row[c] is None else f"{row[c]:.4f}" if isinstance(row[c], float) else str(row[c])
                                           for c in columns) + " |\n")
        with open(output_dir / "per_user.csv", "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=columns + ["notes"])
            writer.writeheader()
            for row in rows:
                writer.writerow({**{c: row[c] for c in columns}, "notes": "; ".join(row["notes"])})
    if "vavae" in report:
        lines.append("\nVA-VAE encode-decode of the held-out images (the ceiling for generated samples): "
                     + ", ".join(f"{k} {v:.4f}" for k, v in report["vavae"].items()) + ".\n")
    (output_dir / "report.md").write_text("".join(lines))
    print(f"report: {output_dir / 'report.md'}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
