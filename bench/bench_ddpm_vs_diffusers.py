"""Pixel DDPM training: our loop (train_ddpm_highres.py) against diffusers' train_unconditional.py, side by side.

    python bench/bench_ddpm_vs_diffusers.py --diffusers_examples ~/src/diffusers/examples       # CPU or GPU
    python bench/bench_ddpm_vs_diffusers.py --diffusers_examples DIR --size 32 --preset 32 --batch 64 --rounds 3
    python bench/bench_ddpm_vs_diffusers.py --smoke                     # tiny CPU setting (a few seconds, no reference)

Both trainers run as a user runs them, whole (data loading from an image folder, the step, EMA, logging, progress),
in this process, in alternating rounds (ours, reference, bare, ours, ...), on the same images, with the same UNet
configuration (ours, written to a ``config.json`` for the reference's ``--model_config_name_or_path``), the same batch,
EMA on, fp32 on the CPU and bf16 autocast on the GPU (``--mixed_precision``). A step's time is the gap between two
advances of the trainer's own progress bar (``bench.common.StepClock``), the median over the rounds with the first
steps of each epoch dropped: end-of-epoch work (our checkpoint, the reference's sample grid) is not a training step.
On a GPU, where our loop runs ahead of the device and the reference waits for it every step, each epoch's window
is timed between two synchronisations instead and the median is over epochs (``StepClock.window_means``).
"bare" is the same model's forward, loss, backward, clipping and optimiser step on one batch already on the device,
and nothing else: ours / bare is the training loop's overhead (the target: at most 5%).

The reference is read from a local diffusers checkout (``--diffusers_examples``, the ``examples`` folder, holding
``unconditional_image_generation/train_unconditional.py``), never from this repository. It imports Hugging Face
``datasets`` only for ``load_dataset("imagefolder")``; when that package is not installed a minimal stand-in (the
folder's images in sorted order, with ``set_transform``) takes its place, so the reference's own transforms and
loader still run. Its other settings are its defaults (AdamW betas 0.95/0.999, weight decay 1e-6, cosine schedule,
EMA warm-up, non-fused AdamW, EMA without ``foreach``, one ``loss.item()`` per step), as a user would run it.
Prints a Markdown table; nothing here is a test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import types
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from bench.common import (  # noqa: E402
    StepClock,
    bench_device,
    import_from_checkout,
    median,
    missing_checkout,
    synchronize,
)
from data.demo_data import build_demo_image_folder  # noqa: E402
from models.ddpm_unet import ddpm_unet_config  # noqa: E402
from utils.accelerator import describe_device, reset_accelerate_state, resolve_device  # noqa: E402

REFERENCE = "unconditional_image_generation/train_unconditional.py"


def install_imagefolder_stand_in() -> None:
    """A minimal ``datasets`` module for the reference's ``load_dataset("imagefolder", data_dir=...)`` (see the
    module docstring); only used when Hugging Face ``datasets`` is not installed."""
    try:
        import datasets  # noqa: F401

        return
    except ImportError:
        pass

    class ImageFolder(torch.utils.data.Dataset):
        def __init__(self, folder: str):
            suffixes = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}
            self.files = sorted(p for p in Path(folder).rglob("*") if p.suffix.lower() in suffixes)
            self.transform = None

        def __len__(self) -> int:
            return len(self.files)

        def set_transform(self, transform) -> None:
            self.transform = transform

        def __getitem__(self, index: int) -> dict:
            example = {"image": [Image.open(self.files[index])]}
            example = self.transform(example) if self.transform else example
            return {key: value[0] for key, value in example.items()}

    def load_dataset(kind, data_dir=None, cache_dir=None, split=None, **_):
        if kind != "imagefolder" or data_dir is None:
            raise ValueError("the stand-in for Hugging Face datasets reads only load_dataset('imagefolder', data_dir=...)")
        return ImageFolder(data_dir)

    module = types.ModuleType("datasets")
    module.load_dataset = load_dataset
    module.utils = types.SimpleNamespace(
        logging=types.SimpleNamespace(set_verbosity_warning=lambda: None, set_verbosity_error=lambda: None)
    )
    sys.modules["datasets"] = module


def run_quietly(fn, log_path: Path):
    """Run ``fn()`` with its stdout/stderr in ``log_path``; on failure print the log's tail and re-raise."""
    with open(log_path, "a") as log:
        # Library loggers (diffusers, accelerate) hold the terminal's stream from their creation on: point them here
        # too, and after the run point every handler that writes here (also those the run made) back to the terminal.
        terminal = sys.stderr
        saved = {handler: handler.stream for handler in _stream_handlers()}
        for handler in saved:
            handler.stream = log
        try:
            with contextlib.redirect_stdout(log), contextlib.redirect_stderr(log):
                return fn()
        except BaseException:
            log.flush()
            print("".join(open(log_path).readlines()[-15:]), file=sys.stderr)
            raise
        finally:
            for handler in _stream_handlers():
                if handler in saved:
                    handler.stream = saved[handler]
                elif handler.stream is log:
                    handler.stream = terminal


def _stream_handlers() -> list:
    import logging

    loggers = [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]
    return [h for lg in loggers for h in getattr(lg, "handlers", []) if type(h) is logging.StreamHandler]


def run_ours(folder: Path, work: Path, args, precision: str) -> list[float]:
    import train_ddpm_highres
    import utils.log

    clock = step_clock(args)
    restore = clock.patch(utils.log)
    out = Path(tempfile.mkdtemp(dir=work, prefix="ours_"))
    argv = [
        "--dataset", "folder", "--data_dir", str(folder), "--size", str(args.size), "--model", args.preset,
        "--train_batch_size", str(args.batch), "--effective_batch", str(args.batch), "--epochs", str(args.epochs),
        "--output_dir", str(out), "--save_every", "1000", "--sample_every", "1000", "--quick_every", "0",
        "--num_samples", "1", "--sample_steps", "1", "--mixed_precision", precision, "--device", args.device,
        "--dataloader_num_workers", str(args.workers), "--no-compile", "--report_to", args.report_to,
    ]
    try:
        run_quietly(lambda: train_ddpm_highres.main(train_ddpm_highres.parse_args(argv)), work / "ours.log")
    finally:
        restore()
    return step_times(clock, args)


def step_clock(args) -> StepClock:
    """Per-step gaps on the CPU; on a GPU, window averages synchronised at both ends (see StepClock)."""
    cuda = resolve_device(args.device).type == "cuda"
    return StepClock(args.skip, sync=torch.cuda.synchronize if cuda else None)


def step_times(clock: StepClock, args) -> list[float]:
    return clock.window_means() if clock.sync is not None else clock.intervals()


def run_reference(module, folder: Path, work: Path, args, precision: str) -> list[float]:
    clock = step_clock(args)
    restore = clock.patch(module)
    out = Path(tempfile.mkdtemp(dir=work, prefix="reference_"))
    config = work / "unet_config.json"
    config.write_text(json.dumps(ddpm_unet_config(args.preset, args.size)))
    argv = [
        "train_unconditional.py", "--train_data_dir", str(folder), "--output_dir", str(out), "--resolution", str(args.size),
        "--model_config_name_or_path", str(config), "--train_batch_size", str(args.batch), "--num_epochs", str(args.epochs),
        "--use_ema", "--mixed_precision", {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}[precision],
        "--save_images_epochs", "1000", "--save_model_epochs", "1000", "--checkpointing_steps", "1000000",
        "--ddpm_num_inference_steps", "1", "--eval_batch_size", "1", "--dataloader_num_workers", str(args.workers),
    ]  # the reference always logs, to tensorboard by default
    reset_accelerate_state()
    saved_argv = sys.argv
    sys.argv = argv
    try:
        run_quietly(lambda: module.main(module.parse_args()), work / "reference.log")
    finally:
        sys.argv = saved_argv
        restore()
        reset_accelerate_state()
    return step_times(clock, args)


def make_bare_step(args, device: torch.device, dtype: torch.dtype | None, ema: str | None = None, fused: bool = True):
    """One step of forward, loss, backward, clipping and optimiser on a resident batch (the floor a loop adds to), as
    a function returning (seconds of the step, of its optimiser step, of its EMA update). ``ema`` adds an EMA update:
    ``lerp`` (ours, ``utils.ema.EMA``) or ``diffusers`` (``EMAModel.step`` with ``foreach``). The UNet, objective and
    AdamW come from train_ddpm_highres.py's builder (recipes.ddpm), fused as there; ``fused=False`` gives PyTorch's
    default (``foreach``) path."""
    import time

    from recipes.ddpm import build_ddpm_training

    torch.manual_seed(0)
    config = argparse.Namespace(model=args.preset, size=args.size, dropout=None, learning_rate=1e-4)
    parts = build_ddpm_training(config, device, with_data=False)
    unet = parts.model.train()
    images = torch.randn(args.batch, 3, args.size, args.size, device=device)
    if parts.extras["channels_last"]:
        images = images.contiguous(memory_format=torch.channels_last)
    optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused or None)
    update = lambda: None  # noqa: E731
    if ema == "lerp":
        from utils.ema import EMA

        average = EMA(unet, decay=0.9999)
        update = lambda: average.update(unet)  # noqa: E731
    elif ema == "diffusers":
        from diffusers.training_utils import EMAModel

        average = EMAModel(list(unet.parameters()), decay=0.9999, use_ema_warmup=True, power=0.75, foreach=True)
        update = lambda: average.step(list(unet.parameters()))  # noqa: E731

    def step() -> tuple[float, float, float]:
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = parts.objective(images, model=unet)["loss"]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        synchronize(device)
        before_optimizer = time.perf_counter()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        synchronize(device)
        before_ema = time.perf_counter()
        update()
        synchronize(device)
        ended = time.perf_counter()
        return ended - started, before_ema - before_optimizer, ended - before_ema

    return step


def bare_step_seconds(args, device: torch.device, dtype: torch.dtype | None, steps: int) -> list[float]:
    """Seconds of ``steps`` bare steps (:func:`make_bare_step`), after ``args.skip`` untimed ones."""
    step = make_bare_step(args, device, dtype)
    return [step()[0] for _ in range(steps + args.skip)][args.skip :]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--diffusers_examples", default=None,
                        help=f"the examples folder of a diffusers checkout (holding {REFERENCE}); without it the "
                        "reference row is skipped")
    parser.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    parser.add_argument("--preset", default="tiny", help="our UNet preset, used by both trainers (default tiny; 32 = the "
                        "paper's 35.7M CIFAR-10 network)")
    parser.add_argument("--batch", type=int, default=16, help="batch per step for both (default 16)")
    parser.add_argument("--images", type=int, default=192, help="images in the generated folder (default 192)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run (default 1)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each epoch not counted (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="data loader workers for both (default 0, the "
                        "reference's default)")
    parser.add_argument("--report_to", choices=("tensorboard", "none"), default="tensorboard",
                        help="our tracker; the reference always logs to tensorboard (default tensorboard, both alike)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (16 px, 32 images, "
                        "batch 8, one round, no reference)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.size, args.preset, args.batch, args.images, args.rounds, args.device = 16, "tiny", 8, 32, 1, "cpu"
        args.diffusers_examples, args.report_to = None, "none"
    return args


def main(args: argparse.Namespace) -> dict:
    device, dtype, precision = bench_device(args.device, args.precision)
    reference = None
    if not missing_checkout("--diffusers_examples", args.diffusers_examples, REFERENCE, "github.com/huggingface/diffusers"):
        install_imagefolder_stand_in()
        (reference,) = import_from_checkout(Path(args.diffusers_examples) / Path(REFERENCE).parent, "train_unconditional")
    work = Path(tempfile.mkdtemp(prefix="bench_ddpm_vs_diffusers_"))
    folder = build_demo_image_folder(work / "images", size=args.size, count=args.images)
    steps_per_epoch = args.images // args.batch
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | UNet '{args.preset}' at "
          f"{args.size} px | batch {args.batch} | {args.images} images, {steps_per_epoch} steps per epoch x "
          f"{args.epochs} | {args.rounds} rounds | logs in {work}\n")

    times: dict[str, list[float]] = {"ours": [], "reference": [], "bare": []}
    for _ in range(args.rounds):
        times["ours"] += run_ours(folder, work, args, precision)
        if reference is not None:
            times["reference"] += run_reference(reference, folder, work, args, precision)
        times["bare"] += bare_step_seconds(args, device, dtype, max(steps_per_epoch - args.skip, 1))
    seconds = {name: median(values) for name, values in times.items()}
    print("| training loop | median s per step | img/s | timings (steps; epochs on a GPU) | ours / this |")
    print("|---|---:|---:|---:|---:|")
    names = {"ours": "ours (train_ddpm_highres.py)", "reference": "diffusers train_unconditional.py",
             "bare": "bare forward/backward + fused AdamW"}
    for name, values in times.items():
        if not values:
            continue
        ratio = seconds["ours"] / seconds[name]
        print(f"| {names[name]} | {seconds[name]:.4f} | {args.batch / seconds[name]:.1f} | {len(values)} | {ratio:.3f} |")
    overhead = seconds["ours"] / seconds["bare"] - 1
    print(f"\nloop overhead of ours over bare: {100 * overhead:+.1f}% (target at most +5%)")
    if times["reference"]:
        print(f"ours / reference: {seconds['ours'] / seconds['reference']:.3f} (target at most 1.0)")
    return {"seconds": seconds, "times": times}


if __name__ == "__main__":
    main(parse_args())
