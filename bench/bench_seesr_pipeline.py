"""The whole SeeSR pipeline per image: RAM/DAPE tagger + 50 guided steps + VAE, with and without the injector.

    python bench/bench_seesr_pipeline.py                          # SD2-base + RAM Swin-L size on CUDA, tiny on CPU
    python bench/bench_seesr_pipeline.py --size tiny --steps 50 --repeats 3
    python bench/bench_seesr_pipeline.py --size real --memory_resolutions 512 1024

SeeSR proper as ``infer.py seesr`` runs it: the tagger (``models.ram.RAMTagger``: tags and the 145 image embeddings
of the upscaled LR image) then ``models.seesr.SeeSRPipeline`` (text encoding of the tag prompt, LR encoding, ``--steps``
steps of ControlNet -> injector -> UNet with SeeSR's image cross-attention under classifier-free guidance, VAE
decoding, AdaIN colour fix), at the pipeline's default tiles. Models have random weights, built here (nothing
downloaded): ``--size real`` is SD2-base's UNet / ControlNet / VAE / OpenCLIP-H text tower with SeeSR's image
attention and RAM Swin-L 384 with 4585 tags (fp16 on CUDA), ``tiny`` the tests' layouts (tests/sd2_tiny.py with
``light_attention``: no self-attention over every latent pixel, which would dominate CPU time; tests/ram_tiny.py).
The injector is ``--injector`` (default the largest variant: timestep_multiscale, MLP weights per level).

Time: seconds per image at ``--time_resolution`` (512), the configurations interleaved for ``--repeats`` rounds after
one warm-up; the tagger's share of the pipeline and the injector's overhead are the medians over rounds (ratio to
the same round's plain run); the spread is half the range over rounds. On a busy CPU that spread is larger than 1%,
so the injector's own calls are also timed in one instrumented run (their share of that run's time).
Memory at each of ``--memory_resolutions``: CUDA ``max_memory_allocated`` of one image (weights included), with and
without the injector; on the CPU the peak resident set of a fresh process per configuration (weights, Python and
allocator noise included: at tiny size it says little about the injector). Targets: tagger under 5% of
the time, injector under 1% time and 0.3% memory. Prints Markdown tables; nothing here is a test.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.common import run_in_fresh_process, synchronize  # noqa: E402
from utils.accelerator import describe_device, resolve_device  # noqa: E402

CONFIGS = ("no injector", "injector")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="default auto")
    parser.add_argument("--size", choices=("auto", "tiny", "real"), default="auto",
                        help="model sizes (default auto: real on CUDA, tiny on the CPU)")
    parser.add_argument("--steps", type=int, default=50, help="denoising steps per image (default 50, SeeSR's)")
    parser.add_argument("--time_resolution", type=int, default=512, help="output px of the timed runs (default 512)")
    parser.add_argument("--memory_resolutions", type=int, nargs="*", default=[512, 1024],
                        help="output px of the memory runs (default 512 1024; none to skip)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved rounds (default 5 on CUDA, 3 on the CPU)")
    parser.add_argument("--injector", default="timestep_multiscale",
                        help="injector variant (default timestep_multiscale, the one with both weights)")
    parser.add_argument("--timestep_weights", choices=("table", "mlp"), default="mlp",
                        help="w(t) kind (default mlp, the larger)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and sampling (default 0)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.time_resolution < 8 or any(r < 8 for r in args.memory_resolutions):
        parser.error("--steps must be positive and resolutions at least 8 px")
    return args


def build_models(size: str, folder: Path, device: torch.device, dtype: torch.dtype, seed: int, args):
    """(pipeline, tagger, injector) with random weights; the pipeline starts without the injector."""
    from models.ram import RAMConfig, RAMTagger
    from models.seesr import SeeSRPipeline
    from models.seesr_unet import SeeSRControlNetModel, SeeSRUNet2DConditionModel, unet_with_image_attention
    from models.timestep_adaptive import build_injector, residual_levels_of

    torch.manual_seed(seed)
    if size == "tiny":
        from models.seesr import load_sd2_components
        from tests.ram_tiny import TINY_RAM_CONFIG, TINY_TAGS
        from tests.sd2_tiny import build_tiny_sd2

        components = load_sd2_components(build_tiny_sd2(folder / "sd2-tiny", light_attention=True))
        unet = unet_with_image_attention(components.unet, TINY_RAM_CONFIG.embed_width)
        vae, text_encoder, tokenizer = components.vae, components.text_encoder, components.tokenizer
        scheduler = components.noise_scheduler
        tagger = RAMTagger(TINY_RAM_CONFIG, TINY_TAGS)
    else:
        from diffusers import AutoencoderKL, DDPMScheduler
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from bench.bench_seesr_injector import SD2_BASE_TEXT, SD2_BASE_UNET, SD2_BASE_VAE
        from tests.sd2_tiny import SD2_BASE_SCHEDULER_CONFIG, write_tiny_clip_tokenizer

        with torch.device(device):
            unet = SeeSRUNet2DConditionModel(**SD2_BASE_UNET, use_image_cross_attention=True)
            vae = AutoencoderKL(**SD2_BASE_VAE)
            text_encoder = CLIPTextModel(CLIPTextConfig(**SD2_BASE_TEXT))
            tagger = RAMTagger(RAMConfig(), [f"tag{i}" for i in range(RAMConfig().num_tags)])
        write_tiny_clip_tokenizer(folder / "tokenizer")  # token ids only index the random embedding table
        tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
        scheduler = DDPMScheduler.from_config(SD2_BASE_SCHEDULER_CONFIG)
    controlnet = SeeSRControlNetModel.from_unet(unet)
    with torch.no_grad():  # a fresh ControlNet's zero convolutions output zeros; random ones keep values honest
        for block in list(controlnet.controlnet_down_blocks) + [controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(block.weight, std=0.01)
    injector = build_injector(args.injector, residual_levels_of(controlnet), timestep_weights=args.timestep_weights,
                              timestep_weights_shared=False)
    pipeline = SeeSRPipeline(unet, vae, text_encoder, tokenizer, scheduler, controlnet, None).to(device, dtype)
    tagger = tagger.to(device).eval()
    if dtype != torch.float32:
        tagger.to(dtype=dtype)
    return pipeline, tagger, injector.to(device).eval()


class TimedInjector(torch.nn.Module):
    """The injector with the seconds of its own calls added up (synchronised around each call: an instrumented run,
    not one of the timed rounds)."""

    def __init__(self, injector: torch.nn.Module, device: torch.device):
        super().__init__()
        self.injector, self.device, self.seconds = injector, device, 0.0

    def forward(self, *args, **kwargs):
        synchronize(self.device)
        started = time.perf_counter()
        result = self.injector(*args, **kwargs)
        synchronize(self.device)
        self.seconds += time.perf_counter() - started
        return result


def one_image(pipeline, tagger, injector, resolution: int, steps: int, seed: int, device) -> tuple[float, float]:
    """(tagger seconds, whole seconds) of one image at ``resolution`` px (tagger + pipeline)."""
    generator = torch.Generator().manual_seed(seed)
    lr_upsampled = torch.rand(1, 3, resolution, resolution, generator=generator).to(device)
    pipeline.injector = injector
    synchronize(device)
    started = time.perf_counter()
    tags, embeds = tagger(lr_upsampled)
    synchronize(device)
    tagged = time.perf_counter()
    pipeline(lr_upsampled, prompt=tags, image_embeds=embeds, num_inference_steps=steps,
             generator=torch.Generator(device).manual_seed(seed))
    synchronize(device)
    return tagged - started, time.perf_counter() - started


def setup(args):
    device = resolve_device(args.device)
    size = args.size if args.size != "auto" else ("real" if device.type == "cuda" else "tiny")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    return device, size, dtype


def memory_worker(args, config: str, resolution: int, queue) -> None:
    """Fresh process: build, run one image, report the peak resident bytes (CPU) -- see the module docstring."""
    device, size, dtype = setup(args)
    with tempfile.TemporaryDirectory() as folder:
        pipeline, tagger, injector = build_models(size, Path(folder), device, dtype, args.seed, args)
        one_image(pipeline, tagger, injector if config == "injector" else None, resolution, args.steps, args.seed, device)
    queue.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def print_times(args, times: dict, repeats: int, injector_params: int, injector_share: float) -> None:
    plain_total = [total for _, total in times["no injector"]]
    print(f"\n### Seconds per {args.time_resolution} px image ({repeats} rounds, median; spread = half the range)\n")
    print("| configuration | s / image | tagger s | tagger share | injector overhead | injector's own calls "
          "| injector params |")
    print("|---|---|---|---|---|---|---|")
    for config in CONFIGS:
        tagger_s = [t for t, _ in times[config]]
        total = [total for _, total in times[config]]
        shares = [t / s * 100 for t, s in times[config]]
        ratios = [(s / p - 1) * 100 for s, p in zip(total, plain_total)]
        plain = config == "no injector"
        overhead = "-" if plain else f"{statistics.median(ratios):+.2f}% (± {(max(ratios) - min(ratios)) / 2:.2f})"
        own = "-" if plain else f"{injector_share:.3f}%"
        params = "-" if plain else f"{injector_params:,} ({injector_params * 4 / 2**20:.3f} MiB fp32)"
        print(f"| {config} | {statistics.median(total):.3f} | {statistics.median(tagger_s):.3f} "
              f"| {statistics.median(shares):.2f}% | {overhead} | {own} | {params} |")


def main(args: argparse.Namespace) -> dict:
    device, size, dtype = setup(args)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    repeats = args.repeats or (5 if device.type == "cuda" else 3)
    print(f"device: {describe_device(device)}, {str(dtype).removeprefix('torch.')}, {size} size, {args.steps} steps, "
          f"injector {args.injector} ({args.timestep_weights}), torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as folder:
        pipeline, tagger, injector = build_models(size, Path(folder), device, dtype, args.seed, args)
        injectors = {"no injector": None, "injector": injector}
        injector_params = sum(p.numel() for p in injector.parameters())
        one_image(pipeline, tagger, None, args.time_resolution, min(args.steps, 2), args.seed, device)  # warm-up
        times = {config: [] for config in CONFIGS}
        for round_index in range(repeats):
            order = CONFIGS if round_index % 2 == 0 else CONFIGS[::-1]
            for config in order:
                times[config].append(one_image(pipeline, tagger, injectors[config], args.time_resolution, args.steps,
                                               args.seed, device))
        timed = TimedInjector(injector, device)
        instrumented = one_image(pipeline, tagger, timed, args.time_resolution, args.steps, args.seed, device)[1]
        injector_share = timed.seconds / instrumented * 100
        print_times(args, times, repeats, injector_params, injector_share)
        memory = {}
        if device.type == "cuda":
            for resolution in args.memory_resolutions:
                for config in CONFIGS:
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats(device)
                    one_image(pipeline, tagger, injectors[config], resolution, args.steps, args.seed, device)
                    memory[config, resolution] = torch.cuda.max_memory_allocated(device)
    if device.type != "cuda" and args.memory_resolutions:
        for resolution in args.memory_resolutions:
            for config in CONFIGS:
                memory[config, resolution] = run_in_fresh_process(memory_worker, (args, config, resolution),
                                                                  f"the memory run {config!r} at {resolution} px")

    results = {"times": times, "injector_share": injector_share}
    if memory:
        kind = "max_memory_allocated" if device.type == "cuda" else "peak resident set of a fresh process"
        print(f"\n### Peak memory per image ({kind}, MiB)\n")
        print("| resolution | no injector | injector | injector delta |")
        print("|---|---|---|---|")
        for resolution in args.memory_resolutions:
            plain, with_injector = memory["no injector", resolution], memory["injector", resolution]
            delta = (with_injector - plain) / plain * 100
            print(f"| {resolution} px | {plain / 2**20:.1f} | {with_injector / 2**20:.1f} | {delta:+.3f}% |")
        results["memory"] = {f"{config} {resolution}": value for (config, resolution), value in memory.items()}
    print("\nTargets: tagger under 5% of the time; injector under 1% time and 0.3% memory.")
    return results


if __name__ == "__main__":
    main(parse_args())
