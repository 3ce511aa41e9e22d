"""Phaseformer benchmarks: training images/s and peak memory with and without the 2x head, inference ms per image,
and optionally the official implementation at equal weights.

    python bench/bench_phaseformer.py                                      # 256 px training, 256/512 inference
    python bench/bench_phaseformer.py --precision bf16 --batch 8
    python bench/bench_phaseformer.py --official_dir /tmp/Phaseformer      # + the official model_with_eca.py
    python bench/bench_phaseformer.py --device cpu --model phaseformer_tiny --train_size 32 --infer_sizes 32 64 \
        --batch 2 --train_steps 2 --warmup 1 --infer_repeats 2               # a smoke run on CPU

Training: the step of train_phaseformer.py (forward under autocast, PhaseformerLoss in fp32, backward, gradient
clipping, Adam over the model and the loss weights) at a fixed batch, after warm-up steps. "both heads" trains
``fake_b_L`` and ``fake_b_H`` with the dual-branch loss; "L only" skips the 2x head (``return_high=False``) and
its loss branch. The perceptual term uses ImageNet VGG16 weights when ``--vgg_weights`` or torch's hub cache has
them, otherwise a randomly initialised VGG16 of the same cost, labelled "random VGG" (speed and memory are the
same; the loss value is meaningless). Rows without VGG show the model's own cost.

Inference: ``models.phaseformer_enhance.enhance`` (the function infer.py uses), batch 1, milliseconds per image.

Official comparison (``--official_dir``, a checkout of github.com/Mdraqibkhan/Phaseformer, never committed here):
its ``model_with_eca.Restormer`` gets our weights (``eca="phase"``, the official gate; its unused ``ups2`` and
``attention.3`` keep their own), the largest output difference is printed, and the same training and inference
measurements are taken, so the table holds ratios measured in one run. Prints Markdown; nothing here is a test.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import argparse  # noqa: E402
import contextlib  # noqa: E402
import importlib  # noqa: E402
import time  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402

from bench.common import bench_device, scaled_optimizer_step, synchronize, time_steps  # noqa: E402
from losses import PhaseformerLoss, optimizer_param_groups  # noqa: E402
from losses.perceptual import default_vgg16_weights_path  # noqa: E402
from models.phaseformer import PHASEFORMER_PRESETS, build_phaseformer  # noqa: E402
from models.phaseformer_enhance import enhance  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402


def autocast(device: torch.device, dtype: torch.dtype | None):
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


class OfficialAdapter(torch.nn.Module):
    """The official Restormer behind our call signature: ``model(x, return_high)`` -> (L, H or None)."""

    def __init__(self, official: torch.nn.Module):
        super().__init__()
        self.official = official

    def forward(self, x: torch.Tensor, return_high: bool = True):
        low, high = self.official(x)  # the official forward always computes both heads
        return low, high if return_high else None


def load_official(official_dir: Path, ours: torch.nn.Module) -> tuple[torch.nn.Module, list[str]]:
    """The official model_with_eca.Restormer with our weights copied in; returns it and the keys it kept its own."""
    if not (official_dir / "model_with_eca.py").is_file():
        raise SystemExit(f"--official_dir {official_dir} has no model_with_eca.py; pass a checkout of Mdraqibkhan/Phaseformer.")
    sys.path.insert(0, str(official_dir))
    try:
        importlib.import_module("cv2")
    except ImportError:  # imported by model_with_eca.py, never used by it
        sys.modules["cv2"] = types.ModuleType("cv2")
    module = importlib.import_module("model_with_eca")
    official = module.Restormer()
    missing, unexpected = official.load_state_dict(ours.state_dict(), strict=False)
    if unexpected or any(not key.startswith(("ups2.", "attention.3.")) for key in missing):
        raise SystemExit(f"the official model's keys differ from ours beyond ups2/attention.3: missing {missing}, unexpected {unexpected}")
    return OfficialAdapter(official), missing


def bench_training(model, device, size: int, batch: int, steps: int, warmup: int, dtype, both_heads: bool,
                   perceptual: str, vgg_weights: Path | None = None) -> dict:
    """images/s and peak GiB of the trainer's step; ``perceptual`` is 'imagenet', 'random' or 'none'."""
    loss_fn = PhaseformerLoss(
        "softmax", use_perceptual=perceptual != "none", vgg_weights=vgg_weights,
        perceptual_random_weights=perceptual == "random", seed=0,
    ).to(device)
    optimizer = torch.optim.Adam(optimizer_param_groups(model, loss_fn), lr=1e-4, betas=(0.5, 0.999))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    inputs, target = torch.rand(batch, 3, size, size, device=device), torch.rand(batch, 3, size, size, device=device)
    model.train()

    def step():
        with autocast(device, dtype):
            low, high = model(inputs, return_high=both_heads)
            total, _ = loss_fn(low.float(), high.float() if high is not None else None, target)
        scaled_optimizer_step(total, optimizer, scaler, model.parameters())

    seconds, peak = time_steps(step, warmup, steps, device)
    return {"img_s": batch * steps / seconds, "peak_gib": peak}


@torch.no_grad()
def bench_inference(model, device, size: int, repeats: int, dtype, return_high: bool) -> float:
    model.eval()
    image = torch.rand(1, 3, size, size, device=device)
    enhance(model, image, return_high=return_high, autocast_dtype=dtype)  # warm-up (cuDNN autotuning)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        enhance(model, image, return_high=return_high, autocast_dtype=dtype)
    synchronize(device)
    return 1000 * (time.perf_counter() - started) / repeats


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=list(PHASEFORMER_PRESETS), default="phaseformer")
    parser.add_argument("--train_size", type=int, default=256, help="training image side (default 256, as the note)")
    parser.add_argument("--batch", type=int, default=8, help="training batch (default 8, as the note)")
    parser.add_argument("--train_steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--infer_sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--infer_repeats", type=int, default=20)
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="fp32",
                        help="autocast dtype of training and inference (default fp32; auto: bf16/fp16 on CUDA)")
    parser.add_argument("--vgg_weights", default=None, help="ImageNet VGG16 file; without one a random VGG16 is timed")
    parser.add_argument("--official_dir", type=Path, default=None,
                        help="folder holding the official model_with_eca.py, to compare at equal weights")
    parser.add_argument("--skip_training", action="store_true")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (phaseformer_tiny at 32 px, "
                        "batch 1, one step of each kind; overrides model, sizes, steps and device)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.train_size, args.batch, args.train_steps, args.warmup = "phaseformer_tiny", 32, 1, 1, 0
        args.infer_sizes, args.infer_repeats, args.device, args.official_dir = [32], 1, "cpu", None

    if args.official_dir and args.model != "phaseformer":
        parser.error("--official_dir compares the official model, which has the 'phaseformer' preset's size; use --model phaseformer")
    device, dtype, precision = bench_device(args.device, args.precision)
    vgg_path = Path(args.vgg_weights) if args.vgg_weights else default_vgg16_weights_path()
    perceptual = "imagenet" if vgg_path.is_file() else "random"
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | model {args.model}\n")

    torch.manual_seed(0)
    # The official gate, so that the official model computes the same function; the default "feature" gate costs
    # the same up to three FFTs fewer.
    ours = build_phaseformer(args.model, eca="phase").to(device)
    models = {"ours": ours}
    if args.official_dir:
        official, kept = load_official(args.official_dir, ours)
        models["official"] = official.to(device)
        x = torch.rand(1, 3, 256, 256, device=device)
        with torch.no_grad():
            difference = max(float((a - b).abs().max()) for a, b in zip(ours.eval()(x), official.eval()(x)))
        print(f"official model_with_eca.Restormer loaded with our weights (kept its own: {', '.join(kept)}); "
              f"largest output difference at 256 px, fp32: {difference:.2e}\n")

    if not args.skip_training:
        vgg_label = {"imagenet": "VGG16 (ImageNet)", "random": "VGG16 (random VGG: no weights found, same cost)"}[perceptual]
        print(f"Training at {args.train_size} px, batch {args.batch}, {args.train_steps} steps after {args.warmup} warm-up steps\n")
        print("| implementation | heads | perceptual term | parameters | train img/s | peak GiB |")
        print("|---|---|---|---:|---:|---:|")
        for name, model in models.items():
            params = sum(p.numel() for p in model.parameters()) / 1e6
            initial = {k: v.clone() for k, v in model.state_dict().items()}
            for perceptual_mode in (perceptual, "none"):
                for both_heads in (True, False):
                    if name == "official" and not both_heads:
                        continue  # its forward always computes both heads
                    model.load_state_dict(initial)
                    result = bench_training(model, device, args.train_size, args.batch, args.train_steps, args.warmup,
                                            dtype, both_heads, perceptual_mode, vgg_path)
                    label = vgg_label if perceptual_mode != "none" else "none"
                    peak = f"{result['peak_gib']:.2f}" if device.type == "cuda" else "n/a (CPU)"
                    print(f"| {name} | {'L + H (2x)' if both_heads else 'L only'} | {label} | {params:.4f}M | "
                          f"{result['img_s']:.2f} | {peak} |", flush=True)
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
            model.load_state_dict(initial)

    print("\nInference (enhance(), batch 1)\n")
    print("| implementation | outputs | " + " | ".join(f"{s} px ms/image" for s in args.infer_sizes) + " |")
    print("|---|---|" + "---:|" * len(args.infer_sizes))
    for name, model in models.items():
        for return_high in (True, False):
            if name == "official" and not return_high:
                continue
            times = [bench_inference(model, device, size, args.infer_repeats, dtype, return_high) for size in args.infer_sizes]
            print(f"| {name} | {'L + H' if return_high else 'L only'} | " + " | ".join(f"{t:.1f}" for t in times) + " |", flush=True)


if __name__ == "__main__":
    main()
