"""Tiled VAE decoding of a 2048 px image: shared GroupNorm statistics (ours) against diffusers' per-tile tiling.

    python bench/bench_seesr_tiled_vae.py                                  # tiny VAE, 256x256 latents, tile 224
    python bench/bench_seesr_tiled_vae.py --config sd2 --device cuda      # SD2-base-size VAE on the GPU
    python bench/bench_seesr_tiled_vae.py --latent_size 128 --tile_size 48   # quicker on a busy CPU

Decodes one ``--latent_size`` x ``--latent_size`` latent (256 -> a 2048 px image) with a random-weight VAE in SD2's
layout (``--config tiny``: the tests' block layout with 8-16 channels; ``sd2``: SD2-base's VAE config, 128-512
channels, nothing downloaded) three ways: untiled, diffusers' ``AutoencoderKL`` tiling (what ``models.seesr.vae_tiling`` sets:
each tile normalised on its own statistics, overlaps blended over 1/4 tile) and ``models.tiled_vae.tiled_decode``
(one GroupNorm estimate shared by all tiles; tiles wait on the CPU between norms when computing on a GPU, and on the
GPU itself in the "GPU storage" row), both with ``--tile_size`` latent px (SeeSR's ``--vae_decoder_tiled_size``
default 224). Smooth latents (bicubic-upsampled noise) make seams stand out against the image's own detail.

Reported per method: max and mean |difference| to the untiled image (values in [-1, 1] units), the colour shift
(mean |difference| of 32 px block means: tile-sized colour error, which blending spreads out), the seam score
(``models.tiled_vae.seam_score``: mean |jump| between neighbouring pixels across the method's own tile boundaries
minus the mean jump everywhere; the untiled image's score at the same boundaries beside it), seconds, and peak memory
above what the process held before the call (CUDA: ``max_memory_allocated``; CPU: the peak resident set of a fresh
process per method, or '-' with ``--same_process``). Random weights exaggerate diffusers' seams compared with SD2's
trained VAE; the equality of ours with the untiled decode does not depend on the weights. Prints a Markdown table;
nothing here is a test.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path
from queue import SimpleQueue

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from bench.common import run_in_fresh_process, synchronize  # noqa: E402
from utils.accelerator import describe_device, resolve_device  # noqa: E402

TINY_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(8, 16, 16, 16),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=4,
    sample_size=64, scaling_factor=0.18215,
)
METHODS = ("untiled", "diffusers tiling", "shared norms (ours)", "shared norms (ours), GPU storage")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto")
    parser.add_argument("--config", choices=("tiny", "sd2"), default="tiny",
                        help="VAE size: the tests' tiny layout or SD2-base's (default tiny: SD2 size at 2048 px "
                             "takes tens of minutes on a CPU)")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default="fp32",
                        help="VAE weights and activations (default fp32; the statistics are fp32 always)")
    parser.add_argument("--latent_size", type=int, default=256, help="latent side (default 256 = 2048 px image)")
    parser.add_argument("--tile_size", type=int, default=224,
                        help="decoder tile side in latent px (default 224, SeeSR's --vae_decoder_tiled_size)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights and latents (default 0)")
    parser.add_argument("--same_process", action="store_true",
                        help="decode every method in this process instead of a fresh process each (no interpreter "
                             "start-ups; the CPU peak-memory column then reads '-', as one process's peak covers them all)")
    args = parser.parse_args(argv)
    if args.latent_size < 2 or args.tile_size < 1:
        parser.error("--latent_size must be at least 2 and --tile_size at least 1")
    return args


def build_vae(config: str, device: torch.device, dtype: torch.dtype, seed: int):
    from diffusers import AutoencoderKL

    if config == "sd2":
        from bench.bench_seesr_injector import SD2_BASE_VAE as kwargs
    else:
        kwargs = TINY_VAE
    torch.manual_seed(seed)
    vae = AutoencoderKL(**kwargs).to(device).eval().requires_grad_(False)
    return vae if dtype == torch.float32 else vae.to(dtype)


def smooth_latents(size: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, 4, max(2, size // 8), max(2, size // 8), generator=generator)
    return F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)


def colour_shift(image: torch.Tensor, reference: torch.Tensor, block: int = 32) -> float:
    """Mean |difference| of ``block`` px block means: the low-frequency (colour/brightness) error that reads as
    patches, which diffusers' 1/4-tile blending turns from jumps into ramps."""
    return float(F.avg_pool2d(image - reference, block, ceil_mode=True).abs().mean())


def _resident_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize()


def run_method(method: str, args: argparse.Namespace, output_path: str, queue) -> None:
    """One decode in this (fresh) process; puts (seconds, peak bytes) on ``queue`` and saves the image."""
    from models.tiled_vae import tiled_decode

    device = resolve_device(args.device)
    dtype = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.precision]
    vae = build_vae(args.config, device, dtype, args.seed)
    latents = smooth_latents(args.latent_size, args.seed).to(device, dtype)

    def decode(z):
        if method == "untiled":
            return vae.decode(z).sample
        if method == "diffusers tiling":
            vae.use_tiling, vae.tile_sample_min_size, vae.tile_latent_min_size = True, args.tile_size * 8, args.tile_size
            return vae.decode(z).sample
        storage = device if method.endswith("GPU storage") else None
        return tiled_decode(vae, z, args.tile_size, storage_device=storage)

    with torch.no_grad():
        if device.type == "cuda":  # kernels and cuDNN autotuning outside the timed call
            decode(latents[..., : min(64, args.latent_size), : min(64, args.latent_size)])
            synchronize(device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
        else:
            before = _resident_bytes()
        started = time.perf_counter()
        image = decode(latents)
        synchronize(device)
        seconds = time.perf_counter() - started
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device) - before
    elif args.same_process:
        peak = None
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    torch.save(image.float().cpu(), output_path)
    queue.put((seconds, peak))


def tile_boundaries(method: str, args: argparse.Namespace, vae_factor: int = 8) -> list[int]:
    """Image rows (= columns, the latent is square) where a method's tiles meet."""
    from models.tiled_vae import _decoder_ops, split_tiles, tile_padding

    size = args.latent_size * vae_factor
    if method == "diffusers tiling":  # diffusers: tiles every 3/4 tile, rows kept up to 3/4 tile, then blended
        row_limit = args.tile_size * vae_factor - int(args.tile_size * vae_factor * 0.25)
        return list(range(row_limit, size, row_limit))
    padding, _ = tile_padding(_decoder_ops(build_vae(args.config, torch.device("cpu"), torch.float32, args.seed)))
    tiles = split_tiles(args.latent_size, args.latent_size, args.tile_size, padding)
    return sorted({tile.core_y[0] * vae_factor for tile in tiles} - {0})


def main(args: argparse.Namespace) -> list[dict]:
    from models.tiled_vae import seam_score

    device = resolve_device(args.device)
    methods = [m for m in METHODS if device.type == "cuda" or not m.endswith("GPU storage")]
    print(f"device: {describe_device(device)}, VAE {args.config} ({args.precision}, random weights), "
          f"{args.latent_size}x{args.latent_size} latents -> {args.latent_size * 8} px, tile {args.tile_size} latent px, "
          f"torch {torch.__version__}")
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for index, method in enumerate(methods):
            path = str(Path(folder) / f"{index}.pt")
            if args.same_process:
                queue = SimpleQueue()
                run_method(method, args, path, queue)
                seconds, peak = queue.get()
            else:
                seconds, peak = run_in_fresh_process(run_method, (method, args, path), f"the {method!r} run")
            rows.append({"method": method, "seconds": seconds, "peak_gib": None if peak is None else peak / 2**30, "path": path})
        untiled = torch.load(rows[0]["path"], weights_only=True)
        for row in rows:
            image = torch.load(row["path"], weights_only=True)
            difference = (image - untiled).abs()
            row["max_diff"], row["mean_diff"] = float(difference.max()), float(difference.mean())
            row["shift"] = colour_shift(image, untiled)
            if row["method"] == "untiled":
                row["seam"] = row["untiled_seam"] = None
            else:
                boundaries = tile_boundaries(row["method"], args)
                row["seam"] = seam_score(image, boundaries, boundaries)
                row["untiled_seam"] = seam_score(untiled, boundaries, boundaries)
    print("\n| method | max abs diff to untiled | mean abs diff | colour shift (32 px blocks) "
          "| seam score (untiled at the same boundaries) | seconds | peak memory, GiB |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        seam = "-" if row["seam"] is None else f"{row['seam']:+.4f} ({row['untiled_seam']:+.4f})"
        print(f"| {row['method']} | {row['max_diff']:.2e} | {row['mean_diff']:.2e} | {row['shift']:.2e} | {seam} "
              f"| {row['seconds']:.2f} "
              f"| {'-' if row['peak_gib'] is None else format(row['peak_gib'], '.2f')} |")
    return rows


if __name__ == "__main__":
    main(parse_args())
