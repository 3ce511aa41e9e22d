"""Training-loop overhead of the DiT, Phaseformer and SeeSR trainers over the bare forward/backward of the same step.

    python bench/bench_loop_overhead_families.py                                  # all three, CPU: the tiny models
    python bench/bench_loop_overhead_families.py --trainer dit --dit_size S --dit_batch 32 --dit_latents 416
    python bench/bench_loop_overhead_families.py --trainer phaseformer --pf_crop 64 --pf_batch 8
    python bench/bench_loop_overhead_families.py --trainer seesr --sr_resolution 128 --sr_batch 4
    python bench/bench_loop_overhead_families.py --smoke

The DDPM trainer has this in ``bench/bench_loop_overhead.py``; here the same measurement for ``train_dit_user.py``
(on generated latents in the latent-file format, ``data.latents.save_latent_file``: 32x16x16 like VA-VAE f16d32,
``configs/user_dit_tiny.yaml`` with the size and batch given) and ``train_phaseformer.py`` (``configs/phaseformer_tiny.yaml``
on generated LSUI-layout pairs, ``data.underwater.build_synthetic_underwater``, the perceptual term on a random VGG16
written in torchvision's file layout: same cost as ImageNet weights) and ``train_seesr_timestep.py`` (the tests' tiny
SD2-layout folder, ``tests/sd2_tiny.py`` with light attention as tests/test_train_seesr.py builds it, the plain
ControlNet with the trainer's default injector, timestep_multiscale with a w(t) table), on two kinds of data
(``--sr_data``): a folder of HR crops degraded on the fly by the trainer's default pipeline (SeeSR's Real-ESRGAN
degradations, per sample on the CPU in the loader: ``degraded``) and the same pairs degraded once beforehand and read
as prepared LR/HR folders (``--lr_dir``/``--hr_dir``, as SeeSR itself trains on make_paired_data.py's output: ``pairs``).

Rows, per trainer, from the trainer's own argument parsing of the same command line (model, objective, learning
rate, clipping): the bare step (forward, loss, backward, gradient clipping, the trainer's optimiser built as the
trainer builds it; one batch from the trainer's own data set resident in memory; for SeeSR its prompt embeddings
too, which the trainer's cache returns after the first step, and the VAE encoding each step, as the trainer does);
for the DiT the bare step plus
the trainer's EMA update (``utils.ema.EMA``, the only work the loop adds per step besides data and bookkeeping);
and the trainer whole, one epoch per round, timed per step on its progress bar (``bench.common.StepClock``: data
loading, accelerate's wrappers, the NaN guard, the loss meter, the LR schedule, EMA, a tracker scalar every 10 steps)
without the first ``--skip`` steps of each epoch and without the epoch boundaries (validation, previews, checkpoints:
timed by the trainers' own logs). The trainer's ratio to the bare step is the loop's overhead; target at most 5%.
With paired steps the time each trainer step spent in its data loader (PyTorch's iterator under accelerate's, which
fetches one batch ahead) is timed too, and a last row gives the whole loop less it: where a
trainer makes its batches on the step's core (SeeSR's degradations with the CPU default of no loader workers), the
loop's own overhead and its data's cost are told apart.

Interleaving (``--interleave``): on the CPU (``step``) every bare row takes one step right after each trainer step,
inside its loop, and that time is taken out of the trainer's interval, so trainer and bare steps alternate one by one
and each trainer step has a bare step taken at the same moment, under the same load; the overhead is then the median
of these paired differences over the bare median (the ratio of medians is printed too). On the 2-core machine shared
by several jobs (load 1-5), epoch-long blocks gave 4% to 19% for the same DiT loop, paired steps 1% to 5%. On a GPU
(``epoch``, as bench/bench_loop_overhead.py) each round runs the bare rows step by step in turn, then a trainer epoch
timed by window means, so its loop stays asynchronous; the ratio of medians is the overhead there.
Prints Markdown tables; not a test.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.bench_ddpm_vs_diffusers import run_quietly, step_clock, step_times  # noqa: E402
from bench.common import bench_device, median, scaled_optimizer_step, synchronize  # noqa: E402
from models.timestep_adaptive import INJECTORS  # noqa: E402
from utils.accelerator import describe_device  # noqa: E402
from utils.training import fused_optimizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TRAINERS = ("dit", "phaseformer", "seesr")
DIT_USERS = 8
DIT_LATENT = (32, 16, 16)  # VA-VAE f16d32 on 256 px spectrograms


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", choices=(*TRAINERS, "all"), default="all", help="which trainer (default all)")
    parser.add_argument("--dit_size", default="tiny", help="DiT size (default tiny; S is the smallest real one)")
    parser.add_argument("--dit_batch", type=int, default=8, help="DiT latents per step (default 8, configs/user_dit_tiny.yaml)")
    parser.add_argument("--dit_latents", type=int, default=272, help="training latents generated (default 272: 34 steps of 8)")
    parser.add_argument("--pf_crop", type=int, default=32, help="Phaseformer training side in pixels (default 32, the tiny config)")
    parser.add_argument("--pf_batch", type=int, default=4, help="Phaseformer images per step (default 4, the tiny config)")
    parser.add_argument("--pf_pairs", type=int, default=136, help="training pairs generated (default 136: 34 steps of 4)")
    parser.add_argument("--pf_image_size", type=int, default=64, help="side of the generated pairs on disk (default 64)")
    parser.add_argument("--sr_resolution", type=int, default=64, help="SeeSR HR training crop in pixels (default 64, as the tests)")
    parser.add_argument("--sr_batch", type=int, default=4, help="SeeSR images per step (default 4, the trainer's)")
    parser.add_argument("--sr_images", type=int, default=136, help="HR images generated (default 136: 34 steps of 4)")
    parser.add_argument("--sr_data", choices=("degraded", "pairs", "both"), default="both",
                        help="SeeSR training data: HR crops degraded on the fly, pairs degraded beforehand, or both (default)")
    parser.add_argument("--sr_injector", choices=INJECTORS.names(), default="timestep_multiscale",
                        help="SeeSR --injector (default timestep_multiscale, the trainer's): " + INJECTORS.help_text())
    parser.add_argument("--sr_logging_steps", type=int, default=10,
                        help="SeeSR --logging_steps (default 10: a mean loss, the injector's s and w(t) to the tracker every "
                        "10 steps, as the other rows; the trainer's default is 50)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (default 3)")
    parser.add_argument("--skip", type=int, default=2, help="first steps of each epoch not counted (default 2)")
    parser.add_argument("--workers", type=int, default=0, help="the trainers' data loader workers (default 0, their CPU default)")
    parser.add_argument("--report_to", choices=("tensorboard", "none"), default="tensorboard",
                        help="the trainers' tracker (default tensorboard, their default where installed)")
    parser.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), default="auto",
                        help="auto: bf16 on a GPU that has it, else fp16; fp32 on the CPU")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu (default auto)")
    parser.add_argument("--interleave", choices=("auto", "step", "epoch"), default="auto",
                        help="step: a bare step after every trainer step, trainer time net of it (CPU default, robust to load on a "
                        "shared machine); epoch: each round's bare steps, then a trainer epoch (GPU default: the trainer's "
                        "loop must stay asynchronous, timed by window means)")
    parser.add_argument("--smoke", action="store_true", help="tiny CPU setting for the test suite (one round, few steps)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.dit_size, args.dit_batch, args.dit_latents, args.rounds, args.device = "tiny", 4, 20, 1, "cpu"
        args.pf_crop, args.pf_batch, args.pf_pairs, args.pf_image_size, args.report_to = 16, 2, 8, 16, "none"
        args.sr_batch, args.sr_images = 2, 8
    return args


# ------------------------------------------------------------------------------------------------------------- DiT
def write_latents(folder: Path, count: int, seed: int = 0) -> Path:
    """``train.safetensors`` and ``latents_stats.safetensors`` as scripts/extract_features.py writes them."""
    from data.latents import STATS_FILENAME, compute_latent_stats, save_latent_file

    generator = torch.Generator().manual_seed(seed)
    latents = 2.0 * torch.randn(count, *DIT_LATENT, generator=generator) + 0.5
    users = torch.arange(count) % DIT_USERS + 1
    fingerprint = "bench-random-latents"
    save_latent_file(folder / "train.safetensors", latents, users, num_users=DIT_USERS, vae_fingerprint=fingerprint,
                     posterior="mode", image_size=16 * DIT_LATENT[1])
    compute_latent_stats(latents, fingerprint).save(folder / STATS_FILENAME)
    return folder


def dit_argv(args, latent_dir: Path, output_dir: Path, precision: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "user_dit_tiny.yaml"), "--latent_dir", str(latent_dir), "--output_dir", str(output_dir),
        "--model_size", args.dit_size, "--train_batch_size", str(args.dit_batch), "--max_epochs", "1", "--preview_every", "0",
        "--device", args.device, "--mixed_precision", precision, "--report_to", args.report_to,
        "--dataloader_num_workers", str(args.workers),
    ]


def dit_bare_steps(args, latent_dir: Path, work: Path, device, dtype, precision: str) -> dict:
    """{row: step function returning its seconds}: the trainer's step on a resident batch, without and with EMA; the
    model, objective and optimiser from the trainer's builder (recipes.user)."""
    import train_dit_user as trainer
    from recipes.user import build_user_training, complete_config, load_latents
    from utils.ema import EMA

    config = complete_config(trainer.parse_args(dit_argv(args, latent_dir, work / "unused", precision)))
    data = load_latents(config)
    train_set = data[1]
    latents = train_set.latents[: config.train_batch_size].to(device)
    labels = train_set.labels[: config.train_batch_size].to(device)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def make(with_ema: bool):
        torch.manual_seed(config.seed)
        parts = build_user_training(config, device, data=data)
        model = parts.model.train()
        optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused_optimizer(device))
        ema = EMA(model, decay=config.ema_decay, warmup=config.ema_warmup) if with_ema else None

        def step() -> float:
            synchronize(device)
            started = time.perf_counter()
            with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
                loss = parts.objective(latents, labels, model=model)["loss"]
            scaled_optimizer_step(loss, optimizer, scaler, model.parameters(), config.max_grad_norm)
            if ema is not None:
                ema.update(model)
            synchronize(device)
            return time.perf_counter() - started

        return step

    return {"bare (forward, loss, backward, clip, fused AdamW)": make(False), "bare + EMA update (utils.ema, as the trainer)": make(True)}


def run_dit_trainer(args, latent_dir: Path, work: Path, precision: str, steppers: dict | None) -> tuple[list[float], dict]:
    import train_dit_user as trainer

    out = Path(tempfile.mkdtemp(dir=work, prefix="dit_run_"))
    argv = dit_argv(args, latent_dir, out, precision)
    return timed_run(lambda: trainer.main(trainer.parse_args(argv)), work / "dit.log", args, steppers)


# ----------------------------------------------------------------------------------------------------- Phaseformer
def write_random_vgg16(path: Path) -> Path:
    """VGG16 features (to relu4_3) with random weights in torchvision's file layout: the perceptual term at its cost."""
    from losses.perceptual import build_vgg16_features

    torch.manual_seed(0)
    torch.save({f"features.{key}": value for key, value in build_vgg16_features().state_dict().items()}, path)
    return path


def phaseformer_argv(args, data: Path, vgg: Path, output_dir: Path, precision: str) -> list[str]:
    return [
        "--config", str(ROOT / "configs" / "phaseformer_tiny.yaml"), "--dataset_path", str(data), "--output_dir", str(output_dir),
        "--crop_size", str(args.pf_crop), "--eval_size", str(max(args.pf_crop, 16)), "--train_batch_size", str(args.pf_batch),
        "--niter", "1", "--niter_decay", "0", "--vgg_weights", str(vgg), "--num_preview", "0", "--device", args.device,
        "--mixed_precision", precision, "--report_to", args.report_to, "--dataloader_num_workers", str(args.workers),
    ]


def phaseformer_bare_steps(args, data: Path, vgg: Path, work: Path, device, dtype, precision: str) -> dict:
    """{row: step function}: train_phaseformer.py's step (both heads, the weighted loss, clipping of the model's
    gradients, fused Adam over the model and the loss weights) on one resident batch of its own training set."""
    from torch.utils.data import default_collate

    import train_phaseformer as trainer
    from recipes.phaseformer import build_phaseformer_training

    config = trainer.parse_args(phaseformer_argv(args, data, vgg, work / "unused", precision))
    torch.manual_seed(config.seed)
    parts = build_phaseformer_training(config, device, split_dir=work / "bare_split")
    train_set, model = parts.datasets["train"], parts.model.train()
    parts.models["loss"].train()
    batch = default_collate([train_set[i] for i in range(config.train_batch_size)])
    batch = {key: batch[key].to(device) for key in ("input", "target", "target_2x")}
    optimizer = parts.extras["optimizer_class"](parts.param_groups, fused=fused_optimizer(device))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)

    def step() -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            total, _ = parts.objective(batch, model=model)
        scaled_optimizer_step(total, optimizer, scaler, model.parameters(), config.max_grad_norm)
        synchronize(device)
        return time.perf_counter() - started

    return {"bare (forward, loss, backward, clip, fused Adam)": step}


def run_phaseformer_trainer(args, data: Path, vgg: Path, work: Path, precision: str, steppers: dict | None) -> tuple[list[float], dict]:
    import train_phaseformer as trainer

    out = Path(tempfile.mkdtemp(dir=work, prefix="phaseformer_run_"))
    argv = phaseformer_argv(args, data, vgg, out, precision)
    return timed_run(lambda: trainer.main(trainer.parse_args(argv)), work / "phaseformer.log", args, steppers)


# ----------------------------------------------------------------------------------------------------------- SeeSR
def write_seesr_folders(folder: Path, args) -> dict[str, Path]:
    """The tests' tiny SD2-layout folder (light attention, as tests/test_train_seesr.py's workspace) and a folder of
    ``--sr_images`` HR crops of ``--sr_resolution`` px (data.demo_data), degraded on the fly by the trainer."""
    from data.demo_data import build_demo_image_folder
    from tests.sd2_tiny import build_tiny_sd2

    sd2 = build_tiny_sd2(folder / "sd2", light_attention=True)
    hr = build_demo_image_folder(folder / "HR", size=args.sr_resolution, count=args.sr_images, seed=0)
    return {"sd2": sd2, "hr": hr}


def write_seesr_pairs(folders: dict[str, Path], args, precision: str) -> dict[str, Path]:
    """The HR folder degraded once by the trainer's own data set (as make_paired_data.py prepares SeeSR's data):
    ``pairs/lr`` (``--sr_resolution / 4`` px) and ``pairs/hr`` (the sharpened target), PNGs matched by stem."""
    import numpy as np
    from PIL import Image

    from recipes.seesr import build_training_dataset

    config = seesr_config(args, folders, folders["hr"].parent / "unused", precision)
    dataset = build_training_dataset(config, config.seed)
    pairs = {"lr": folders["hr"].parent / "pairs/lr", "hr": folders["hr"].parent / "pairs/hr"}
    for folder in pairs.values():
        folder.mkdir(parents=True, exist_ok=True)
    for index in range(len(dataset)):
        item = dataset[index]
        for key, image in (("lr", item["lr"]), ("hr", (item["hr"] + 1) / 2)):
            pixels = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
            Image.fromarray(np.ascontiguousarray(pixels)).save(pairs[key] / f"{index:05d}.png")
    return {**folders, "lr_dir": pairs["lr"], "hr_dir": pairs["hr"]}


def seesr_argv(args, folders: dict[str, Path], output_dir: Path, precision: str) -> list[str]:
    return [
        "--no_image_cross_attention", "--pretrained_model_path", str(folders["sd2"]),
        *(["--lr_dir", str(folders["lr_dir"]), "--hr_dir", str(folders["hr_dir"])] if "lr_dir" in folders else
          ["--train_data_dir", str(folders["hr"])]),
        "--output_dir", str(output_dir), "--resolution", str(args.sr_resolution), "--train_batch_size", str(args.sr_batch),
        "--conditioning_embedding_channels", "4", "8", "8", "8", "--injector", args.sr_injector, "--num_train_epochs", "1",
        "--checkpointing_steps", "0", "--validation_steps", "0", "--logging_steps", str(args.sr_logging_steps),
        "--device", args.device, "--mixed_precision", precision, "--report_to", args.report_to,
        "--dataloader_num_workers", str(args.workers), "--seed", "42",
    ]


def seesr_config(args, folders: dict[str, Path], output_dir: Path, precision: str):
    """The trainer's configuration for this command line: its own flags and defaults, through its public entry point
    (``parse_args``, as the trainer row runs it), so the bare step and the trainer read the same settings."""
    import train_seesr_timestep as trainer

    return trainer.parse_args(seesr_argv(args, folders, output_dir, precision))


def seesr_bare_steps(args, folders: dict[str, Path], work: Path, device, dtype, precision: str) -> dict:
    """{row: step function}: train_seesr_timestep.py's step (VAE encoding, noise, ControlNet + injector + frozen UNet,
    the epsilon MSE, backward, clipping, fused AdamW over the ControlNet and the injector) on one resident batch of its
    own degraded training set, everything built by the trainer's builder (recipes.seesr.build_seesr_training)."""
    from torch.utils.data import default_collate

    from recipes.seesr import build_seesr_training, loss_generator

    config = seesr_config(args, folders, work / "unused", precision)
    torch.manual_seed(config.seed)  # the new ControlNet's conditioning encoder
    parts = build_seesr_training(config, device, weight_dtype=dtype or torch.float32)
    dataset = parts.datasets["train"]
    dataset.set_epoch(0)
    batch = default_collate([dataset[i] for i in range(config.train_batch_size)])
    optimizer = torch.optim.AdamW(parts.param_groups, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_epsilon,
                                  fused=fused_optimizer(device))
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    batch.update(hr=batch["hr"].to(device), lr_upsampled=batch["lr_upsampled"].to(device),
                 prompt_embeds=parts.extras["prompt_cache"](batch["prompt"]))
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    micro = [0]

    def step() -> float:
        synchronize(device)
        started = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = parts.objective(batch, controlnet=parts.models["controlnet"], injector=parts.models.get("injector"),
                                   generator=loss_generator(config.seed, micro[0], device))
        micro[0] += 1
        scaled_optimizer_step(loss, optimizer, scaler, parameters, config.max_grad_norm)
        synchronize(device)
        return time.perf_counter() - started

    return {"bare (VAE encode, ControlNet + injector + UNet, loss, backward, clip, fused AdamW)": step}


def run_seesr_trainer(args, folders: dict[str, Path], work: Path, precision: str, steppers: dict | None) -> tuple[list[float], dict]:
    import train_seesr_timestep as trainer

    out = Path(tempfile.mkdtemp(dir=work, prefix="seesr_run_"))
    argv = seesr_argv(args, folders, out, precision)
    return timed_run(lambda: trainer.main(trainer.parse_args(argv)), work / "seesr.log", args, steppers)


# ------------------------------------------------------------------------------------------------------------ all
DATA_ROW = "data loading"  # timed_run's extra row: seconds the trainer's step spent in its loader's __next__


def timed_run(run, log_path: Path, args, steppers: dict | None) -> tuple[list[float], dict[str, list[float]]]:
    """Run a trainer (``run()``) quietly, timed per step on its progress bar by a StepClock: (its step seconds, the
    bare rows' step seconds).

    With ``steppers`` (``--interleave step``) every bare row takes one step right after each step of the trainer
    (after its bar's stamp) and that time is taken out of the trainer's next interval: trainer and bare steps
    alternate one by one, so a load spike on a shared machine hits both alike. The seconds each trainer interval
    spent fetching batches (PyTorch's loader iterator, under accelerate's) come back too, as the row ``DATA_ROW``.
    Without (``--interleave epoch``) the bare rows run apart (:func:`interleaved`) and the clock gives plain
    intervals on the CPU, window means on a GPU.
    """
    import torch.utils.data.dataloader as dataloader

    import utils.log

    clock = step_clock(args)
    restore = clock.patch(utils.log)
    inserted: dict[int, list[float]] = {}  # per bar (by id of its stamp list): seconds of bare steps after each stamp
    alongside: dict[int, dict[str, list[float]]] = {}  # per bar: each bare row's step after each stamp
    fetched: dict[int, list[float]] = {}  # per bar: the loader's seconds so far, at each stamp
    loading = [0.0]
    plain_next = dataloader._BaseDataLoaderIter.__next__  # its subclasses (0 or more workers) keep this __next__
    if steppers:
        stamped = utils.log.tqdm

        class AlternatingTqdm(stamped):
            def update(self, n=1):
                result = super().update(n)  # the stamp ends the trainer's step
                fetched.setdefault(id(self._stamps), []).append(loading[0])
                started = time.perf_counter()
                rows = alongside.setdefault(id(self._stamps), {name: [] for name in steppers})
                for name, step in steppers.items():
                    rows[name].append(step())
                inserted.setdefault(id(self._stamps), []).append(time.perf_counter() - started)
                return result

        def timed_next(self):
            started = time.perf_counter()
            try:
                return plain_next(self)
            finally:
                loading[0] += time.perf_counter() - started

        utils.log.tqdm = AlternatingTqdm
        dataloader._BaseDataLoaderIter.__next__ = timed_next
    try:
        run_quietly(run, log_path)
    finally:
        restore()
        dataloader._BaseDataLoaderIter.__next__ = plain_next
    if not steppers:
        return step_times(clock, args), {}
    # Trainer interval i runs from stamp i to stamp i + 1, less the bare steps taken right after stamp i: those are its
    # pair (same moment, same load), kept from stamp ``skip`` on, as the intervals.
    times: list[float] = []
    bare: dict[str, list[float]] = {name: [] for name in (*steppers, DATA_ROW)}
    for stamps in clock.bars:
        intervals = [b - a - pause for a, b, pause in zip(stamps, stamps[1:], inserted.get(id(stamps), []))][args.skip :]
        times += intervals
        for name, values in alongside.get(id(stamps), {}).items():
            bare[name] += values[args.skip : args.skip + len(intervals)]
        totals = fetched.get(id(stamps), [])
        bare[DATA_ROW] += [b - a for a, b in zip(totals, totals[1:])][args.skip : args.skip + len(intervals)]
    return times, bare


def interleaved(steppers: dict, run_trainer, steps: int, args) -> tuple[dict[str, list[float]], list[float]]:
    """``--rounds`` rounds of the trainer's epoch and the bare rows' steps, by ``--interleave`` (see :func:`timed_run`);
    with ``epoch``, each round runs every bare row ``steps + skip`` steps in turn (the first ``skip`` not kept), then
    one trainer epoch."""
    bare: dict[str, list[float]] = {name: [] for name in steppers}
    trainer: list[float] = []
    for _ in range(args.rounds):
        if args.interleave == "epoch":
            for index in range(steps + args.skip):
                for name, step in steppers.items():
                    seconds = step()
                    if index >= args.skip:
                        bare[name].append(seconds)
        times, alongside = run_trainer(steppers if args.interleave == "step" else None)
        trainer += times
        for name, values in alongside.items():
            bare.setdefault(name, []).extend(values)  # aligned with ``times``: pairs (and DATA_ROW)
    return bare, trainer


def print_table(title: str, script: str, batch: int, unit: str, bare: dict[str, list[float]], trainer: list[float],
                paired: bool) -> dict:
    """The rows' medians and overheads over the first (bare) row: the ratio of medians, and with ``paired`` (steps
    taken alternately, one by one) also the median of the step-by-step differences over the bare median, which
    cancels the load that both steps of a pair met. With the trainer's data loading timed (``DATA_ROW``, paired
    runs), also the whole loop less it, step by step: the loop's own overhead apart from producing the batches."""
    bare = dict(bare)
    data = bare.pop(DATA_ROW, None)
    rows = {**bare, f"{script} (whole loop)": trainer}
    if data is not None:
        rows[f"{script} (whole loop less its data loading)"] = [t - d for t, d in zip(trainer, data)]
    seconds = {name: median(times) for name, times in rows.items()}
    floor_name = next(iter(bare))
    floor = seconds[floor_name]
    print(f"\n{title}\n")
    print(f"| step | median s per step | {unit}/s | steps timed | over bare (medians) | over bare (paired steps) |")
    print("|---|---:|---:|---:|---:|---:|")
    overheads = {}
    for name, times in rows.items():
        by_medians = 100 * (seconds[name] / floor - 1)
        by_pairs = 100 * median([a - b for a, b in zip(times, rows[floor_name])]) / floor if paired else float("nan")
        overheads[name] = by_pairs if paired else by_medians
        pairs_text = f"{by_pairs:+.1f}%" if paired else "n/a (--interleave epoch)"
        print(f"| {name} | {seconds[name]:.4f} | {batch / seconds[name]:.1f} | {len(times)} | {by_medians:+.1f}% | {pairs_text} |")
    if data is not None:
        share = 100 * median(data) / floor
        print(f"\nthe trainer's data loading: median {1000 * median(data):.2f} ms per step ({share:.1f}% of the bare step)")
    return {"seconds": seconds, "times": rows, "overhead_percent": overheads[f"{script} (whole loop)"], "overheads": overheads,
            "data_seconds": median(data) if data is not None else None}


def main(args: argparse.Namespace) -> dict:
    device, dtype, precision = bench_device(args.device, args.precision)
    args.device = device.type  # the trainers get the device the bare steps run on
    if args.interleave == "auto":
        args.interleave = "epoch" if device.type == "cuda" else "step"
    work = Path(tempfile.mkdtemp(prefix="bench_loop_overhead_families_"))
    print(f"device: {describe_device(device)} | torch {torch.__version__} | {precision} | "
          f"{args.rounds} rounds, first {args.skip} steps of each epoch not counted | logs in {work}")
    results = {}
    if args.trainer in ("dit", "all"):
        latent_dir = write_latents(work / "latents", args.dit_latents)
        steps = max(args.dit_latents // args.dit_batch - args.skip, 1)
        bare, trainer = interleaved(dit_bare_steps(args, latent_dir, work, device, dtype, precision),
                                    lambda steppers: run_dit_trainer(args, latent_dir, work, precision, steppers), steps, args)
        results["dit"] = print_table(
            f"train_dit_user.py: DiT-{args.dit_size}, batch {args.dit_batch}, latents {'x'.join(map(str, DIT_LATENT))}, "
            f"{args.dit_latents} latents ({steps + args.skip} steps per epoch)",
            "train_dit_user.py", args.dit_batch, "latents", bare, trainer, args.interleave == "step")
    if args.trainer in ("phaseformer", "all"):
        from data.underwater import build_synthetic_underwater

        data = build_synthetic_underwater(work / "LSUI", size=args.pf_image_size, train_count=args.pf_pairs, test_count=2)
        vgg = write_random_vgg16(work / "vgg16-397923af.pth")
        steps = max(args.pf_pairs // args.pf_batch - args.skip, 1)
        bare, trainer = interleaved(phaseformer_bare_steps(args, data, vgg, work, device, dtype, precision),
                                    lambda steppers: run_phaseformer_trainer(args, data, vgg, work, precision, steppers), steps, args)
        results["phaseformer"] = print_table(
            f"train_phaseformer.py: phaseformer_tiny, crop {args.pf_crop} px from {args.pf_image_size} px pairs, batch {args.pf_batch}, "
            f"{args.pf_pairs} pairs ({steps + args.skip} steps per epoch), perceptual term on a random VGG16",
            "train_phaseformer.py", args.pf_batch, "images", bare, trainer, args.interleave == "step")
    if args.trainer in ("seesr", "all"):
        folders = write_seesr_folders(work / "seesr", args)
        steps = max(args.sr_images // args.sr_batch - args.skip, 1)
        kinds = {"degraded": folders}
        if args.sr_data in ("pairs", "both"):
            kinds["pairs"] = write_seesr_pairs(folders, args, precision)
        if args.sr_data == "pairs":
            del kinds["degraded"]
        for kind, data in kinds.items():
            bare, trainer = interleaved(seesr_bare_steps(args, data, work, device, dtype, precision),
                                        lambda steppers, data=data: run_seesr_trainer(args, data, work, precision, steppers), steps, args)
            source = ("HR crops degraded on the fly (per sample on the CPU, in the loader)" if kind == "degraded" else
                      "pairs degraded beforehand (--lr_dir/--hr_dir)")
            results[f"seesr_{kind}"] = print_table(
                f"train_seesr_timestep.py: tiny SD2 (tests/sd2_tiny.py, light attention), plain ControlNet + {args.sr_injector} "
                f"injector, {args.sr_resolution} px, {source}, batch {args.sr_batch}, {args.sr_images} images "
                f"({steps + args.skip} steps per epoch), logging every {args.sr_logging_steps} steps",
                "train_seesr_timestep.py", args.sr_batch, "images", bare, trainer, args.interleave == "step")
    return results


if __name__ == "__main__":
    main(parse_args())
