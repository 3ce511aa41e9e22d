"""The timestep-adaptive injector's cost per denoising step, and SeeSR inference time against latent tile size.

    python bench/bench_seesr_injector.py                          # tiny and SD2-base size, on the GPU if present
    python bench/bench_seesr_injector.py --skip_real_size         # CPU: the tiny size only
    python bench/bench_seesr_injector.py --repeats 200 --tile_sizes 32 48 64 96 --tile_image_size 1024

Part 1, one denoising step as the sampler runs it (``models.seesr.predict_noise``: ControlNet -> injector -> UNet,
classifier-free-guidance batch of 2, one scalar timestep), with no injector and with each injector variant, at the
tiny test size and at SD2-base's real UNet / ControlNet size (configs written here, random weights, nothing
downloaded; fp16 on CUDA). The variants run interleaved in a new random order every round, many rounds, timed with
CUDA events on the GPU (perf_counter on the CPU); the overhead is the median over rounds of each round's time ratio
to the plain step, with the interquartile half-range as its noise. Peak memory: ``max_memory_allocated`` of one step
per variant (CUDA only). The users' note claims +0.3% time / +0.1% memory for the timestep weights, +0.5% / +0.2% for
multi-scale and +0.8% / +0.3% for both.

Part 2, ``SeeSRPipeline`` seconds per image (text encoding, LR encoding, ``--tile_steps`` steps, decoding) for an
image of ``--tile_image_size`` px against ``--latent_tiled_size``; the VAE tiles stay at their defaults.
Prints Markdown tables; nothing here is a test.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import synchronize  # noqa: E402
from models.seesr import SeeSRPipeline, build_controlnet, predict_noise  # noqa: E402
from models.timestep_adaptive import build_injector, residual_levels_of  # noqa: E402
from utils.accelerator import describe_device, resolve_device  # noqa: E402

# stabilityai/stable-diffusion-2-base: unet/, vae/ and text_encoder/ config.json (OpenCLIP ViT-H text tower).
SD2_BASE_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024, use_linear_projection=True, norm_num_groups=32,
)
SD2_BASE_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=(128, 256, 512, 512),
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4, norm_num_groups=32,
    sample_size=768, scaling_factor=0.18215,
)
SD2_BASE_TEXT = dict(
    vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16,
    max_position_embeddings=77, projection_dim=512, hidden_act="gelu",
)
# (label, build_injector arguments); None is the plain ControlNet path.
VARIANTS = [
    ("no injector", None),
    ("timestep_only, table", dict(variant="timestep_only", timestep_weights="table")),
    ("timestep_only, mlp", dict(variant="timestep_only", timestep_weights="mlp")),
    ("timestep_multiscale, table, level", dict(variant="timestep_multiscale", timestep_weights="table", grouping="level")),
    ("timestep_multiscale, table, per level", dict(variant="timestep_multiscale", timestep_weights="table",
                                                   grouping="level", timestep_weights_shared=False)),
    ("timestep_multiscale, mlp, per level", dict(variant="timestep_multiscale", timestep_weights="mlp",
                                                 grouping="level", timestep_weights_shared=False)),
    ("timestep_multiscale, mlp, per residual", dict(variant="timestep_multiscale", timestep_weights="mlp",
                                                    grouping="tensor", timestep_weights_shared=False)),
]
NOTE_CLAIMS = {"timestep_only": "+0.3% / +0.1%", "timestep_multiscale": "+0.8% / +0.3%"}


class StepTimer:
    """Milliseconds of a callable: CUDA events on the GPU (no host sync inside the timed region), else perf_counter."""

    def __init__(self, device: torch.device):
        self.device = device

    def __call__(self, function) -> float:
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            function()
            end.record()
            end.synchronize()
            return start.elapsed_time(end)
        started = time.perf_counter()
        function()
        return (time.perf_counter() - started) * 1e3


def build_real_size(device: torch.device, dtype: torch.dtype):
    """SD2-base-sized UNet, ControlNet, VAE and text encoder with random weights, built on ``device``."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device(device):
        unet = UNet2DConditionModel(**SD2_BASE_UNET)
        controlnet = build_controlnet(unet)
        vae = AutoencoderKL(**SD2_BASE_VAE)
        text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_BASE_TEXT))
    # A fresh ControlNet's zero convolutions output zeros; random ones keep the benchmark honest about values.
    with torch.no_grad():
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.01)
    models = [m.to(dtype=dtype).eval().requires_grad_(False) for m in (unet, controlnet, vae, text_encoder)]
    return models


def build_tiny(folder: Path, device: torch.device, dtype: torch.dtype):
    """The tests' tiny SD2-layout folder (tests/sd2_tiny.py), loaded like the real one."""
    from models.seesr import load_sd2_components
    from tests.sd2_tiny import build_tiny_sd2

    components = load_sd2_components(build_tiny_sd2(folder / "sd2-tiny"), device, dtype)
    controlnet = build_controlnet(components.unet).to(device).eval().requires_grad_(False)
    if dtype != torch.float32:
        controlnet.to(dtype=dtype)
    with torch.no_grad():
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.2)
    return components, controlnet


def bench_step(unet, controlnet, device, dtype, resolution: int, repeats: int, warmup: int, seed: int) -> list[dict]:
    """Time / memory of one guided denoising step per variant, interleaved rounds."""
    generator = torch.Generator().manual_seed(seed)
    latent = resolution // 8
    latents = torch.randn(2, unet.config.in_channels, latent, latent, generator=generator).to(device, dtype)
    image = torch.rand(2, 3, resolution, resolution, generator=generator).to(device, dtype)
    embeds = torch.randn(2, 77, unet.config.cross_attention_dim, generator=generator).to(device, dtype)
    timestep = torch.tensor(981, device=device)
    levels = residual_levels_of(controlnet)
    injectors = {label: None if kwargs is None else build_injector(residual_levels=levels, **kwargs).to(device).eval()
                 for label, kwargs in VARIANTS}
    timer = StepTimer(device)

    def step(injector):
        with torch.no_grad():
            predict_noise(unet, controlnet, injector, latents, timestep, embeds, image)

    for _ in range(warmup):
        for injector in injectors.values():
            step(injector)
    synchronize(device)
    times = {label: [] for label in injectors}
    order = list(injectors)
    shuffle = random.Random(seed)
    for _ in range(repeats):
        shuffle.shuffle(order)
        for label in order:
            times[label].append(timer(lambda injector=injectors[label]: step(injector)))

    memory = {}
    if device.type == "cuda":
        for label, injector in injectors.items():
            synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            step(injector)
            synchronize(device)
            memory[label] = torch.cuda.max_memory_allocated(device) / 2**20

    # The injector alone on the real residual shapes (its whole cost, outside the step's noise).
    with torch.no_grad():
        down, mid = controlnet(latents, timestep, encoder_hidden_states=embeds, controlnet_cond=image, return_dict=False)
    alone = {}
    for label, injector in injectors.items():
        if injector is None:
            continue
        for _ in range(warmup):
            with torch.no_grad():
                injector(down, mid, timestep)
        samples = [timer(lambda injector=injector: injector(down, mid, timestep)) for _ in range(repeats)]
        alone[label] = statistics.median(samples)

    plain = times["no injector"]
    rows = []
    for label, injector in injectors.items():
        ratios = sorted(t / p for t, p in zip(times[label], plain))
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) >= 4 else [ratios[0], ratios[0], ratios[-1]]
        rows.append({
            "variant": label,
            "ms": statistics.median(times[label]),
            "overhead": (statistics.median(ratios) - 1) * 100,
            "noise": (quartiles[2] - quartiles[0]) / 2 * 100,
            "alone_ms": alone.get(label),
            "params": 0 if injector is None else sum(p.numel() for p in injector.parameters()),
            "peak_mib": memory.get(label),
            "memory_delta": None if not memory else memory[label] - memory["no injector"],
        })
    return rows


def print_step_table(title: str, rows: list[dict]) -> None:
    print(f"\n### {title}\n")
    print("| variant | ms / step | overhead (median ratio) | noise (IQR/2) | injector alone, ms | injector params "
          "| peak memory, MiB | memory delta, MiB | the note claims (time / memory) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        alone = "-" if row["alone_ms"] is None else f"{row['alone_ms']:.3f}"
        peak = "n/a (CPU)" if row["peak_mib"] is None else f"{row['peak_mib']:.1f}"
        delta = "n/a (CPU)" if row["memory_delta"] is None else f"{row['memory_delta']:+.2f}"
        claim = NOTE_CLAIMS.get(row["variant"].split(",")[0], "-")
        overhead = "baseline" if row["variant"] == "no injector" else f"{row['overhead']:+.2f}%"
        print(f"| {row['variant']} | {row['ms']:.2f} | {overhead} | ±{row['noise']:.2f}% | {alone} | {row['params']} "
              f"| {peak} | {delta} | {claim} |")


def bench_tiles(components, controlnet, device, dtype, image_size: int, tile_sizes: list[int], overlap: int,
                steps: int, seed: int, rounds: int) -> list[dict]:
    """Seconds per image of the whole pipeline against the latent tile size."""
    from models.seesr import tile_starts

    unet, vae, text_encoder, tokenizer, scheduler = components
    injector = build_injector("timestep_multiscale", residual_levels_of(controlnet)).to(device)
    pipeline = SeeSRPipeline(unet, vae, text_encoder, tokenizer, scheduler, controlnet, injector)
    image = torch.rand(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(seed))
    latent = image_size // 8
    rows = []
    pipeline(image, num_inference_steps=1, latent_tiled_size=min(tile_sizes), generator=torch.Generator().manual_seed(0))
    for tile in tile_sizes:
        tiles = len(tile_starts(latent, min(tile, latent), overlap)) ** 2
        seconds = []
        for _ in range(rounds):
            synchronize(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            started = time.perf_counter()
            pipeline(image, num_inference_steps=steps, latent_tiled_size=tile, latent_tiled_overlap=overlap,
                     generator=torch.Generator().manual_seed(0))
            synchronize(device)
            seconds.append(time.perf_counter() - started)
        peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        rows.append({"tile": tile, "overlap": overlap, "tiles": tiles, "seconds": min(seconds), "peak_gib": peak})
    return rows


def print_tile_table(title: str, rows: list[dict], steps: int) -> None:
    print(f"\n### {title}\n")
    print(f"| latent tile (overlap) | tiles per step | s / image ({steps} sampling steps) | s / step | peak memory, GiB |")
    print("|---|---|---|---|---|")
    for row in rows:
        peak = "n/a (CPU)" if row["peak_gib"] is None else f"{row['peak_gib']:.2f}"
        label = f"{row['tile']} (untiled)" if row["tiles"] == 1 else f"{row['tile']} ({row['overlap']})"
        print(f"| {label} | {row['tiles']} | {row['seconds']:.2f} | {row['seconds'] / steps:.3f} | {peak} |")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto")
    parser.add_argument("--skip_real_size", action="store_true",
                        help="only the tiny size (use on a CPU: one SD2-size step takes tens of seconds there)")
    parser.add_argument("--resolution", type=int, default=512, help="image px of the real-size step (default 512)")
    parser.add_argument("--tiny_resolution", type=int, default=64, help="image px of the tiny step (default 64)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved rounds (default 100 on CUDA, 20 on the CPU)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per variant first (default 3)")
    parser.add_argument("--tile_sizes", type=int, nargs="+", default=None,
                        help="latent tile sides (default 48 64 96 128 on CUDA; 8 16 32 on the CPU at tiny size)")
    parser.add_argument("--tile_overlap", type=int, default=4,
                        help="latent pixels shared by neighbouring tiles (default 4, SeeSR's)")
    parser.add_argument("--tile_image_size", type=int, default=None,
                        help="image px of the tile benchmark (default 1024 real size, 256 tiny)")
    parser.add_argument("--tile_steps", type=int, default=10, help="sampling steps per image in part 2 (default 10)")
    parser.add_argument("--tile_rounds", type=int, default=2, help="runs per tile size, best kept (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="seed of inputs and round order (default 0)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    device = resolve_device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (100 if device.type == "cuda" else 20)
    print(f"device: {describe_device(device)}, {str(dtype).removeprefix('torch.')}, torch {torch.__version__}")
    results = {}
    with tempfile.TemporaryDirectory() as folder:
        components, controlnet = build_tiny(Path(folder), device, dtype)
        rows = bench_step(components.unet, controlnet, device, dtype, args.tiny_resolution, repeats, args.warmup,
                          args.seed)
        print_step_table(f"Tiny SD2 layout ({args.tiny_resolution} px, latent {args.tiny_resolution // 8}), guidance "
                         f"batch 2, {repeats} interleaved rounds", rows)
        results["tiny_step"] = rows
        if args.skip_real_size:
            tile_sizes = args.tile_sizes or [8, 16, 32]
            size = args.tile_image_size or 256
            rows = bench_tiles(
                (components.unet, components.vae, components.text_encoder, components.tokenizer,
                 components.noise_scheduler), controlnet, device, dtype, size, tile_sizes, args.tile_overlap,
                args.tile_steps, args.seed, args.tile_rounds,
            )
            print_tile_table(f"Tiny SD2 layout: seconds per {size} px image against the latent tile size", rows,
                             args.tile_steps)
            results["tiny_tiles"] = rows
            return results
        tokenizer = components.tokenizer  # byte-level test vocabulary: any ids fit the real-size text encoder
        scheduler = components.noise_scheduler
        del components, controlnet
        unet, controlnet, vae, text_encoder = build_real_size(device, dtype)
        rows = bench_step(unet, controlnet, device, dtype, args.resolution, repeats, args.warmup, args.seed)
        print_step_table(f"SD2-base size, random weights ({args.resolution} px, latent {args.resolution // 8}), "
                         f"guidance batch 2, {repeats} interleaved rounds", rows)
        results["real_step"] = rows
        tile_sizes = args.tile_sizes or [48, 64, 96, 128]
        size = args.tile_image_size or 1024
        rows = bench_tiles((unet, vae, text_encoder, tokenizer, scheduler), controlnet, device, dtype, size,
                           tile_sizes, args.tile_overlap, args.tile_steps, args.seed, args.tile_rounds)
        print_tile_table(f"SD2-base size: seconds per {size} px image against the latent tile size", rows,
                         args.tile_steps)
        results["real_tiles"] = rows
    return results


if __name__ == "__main__":
    main(parse_args())
