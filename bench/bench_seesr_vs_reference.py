"""``infer.py seesr``'s per-image computation against SeeSR's own, side by side: same weights, inputs and noise.

    python bench/bench_seesr_vs_reference.py --reference_checkout ~/SeeSR --reference_python ~/seesr-venv/bin/python
    python bench/bench_seesr_vs_reference.py --smoke          # ours only (no checkout): the table with the reference blank

SeeSR (cswry/SeeSR) runs from a checkout given by ``--reference_checkout``, in a process of ``--reference_python``
(its code needs the diffusers of its time, 0.21: ``diffusers.pipeline_utils``, ``diffusers.models.dual_transformer_2d``
and ``AdaGroupNorm`` in ``diffusers.models.attention`` are gone from current diffusers, so a throwaway environment with
``diffusers==0.21.0``, ``transformers==4.36.2``, ``huggingface_hub==0.20.3``, ``tokenizers==0.15.2`` and ``einops``
beside this repository's torch does; nothing of it is committed). The reference side is ``test_seesr.py``'s per-image
code as written there, with its ``load_seesr_pipeline`` (``test_seesr_turbo.py``'s ``from_pretrained_orig`` UNet for
turbo): PIL resizes, ``StableDiffusionControlNetPipeline.__call__``, AdaIN colour fix, the final resize. Ours is
``pipelines.seesr.super_resolve``'s: ``models.seesr.super_resolve_image`` with the prompt encoded per image. RAM is
left out of both (a fixed prompt and fixed 145 x 512 image embeddings; RAM is compared with SeeSR's in its own tests).

Weights are random and tiny (``tests/sd2_tiny.py`` layouts with SeeSR's 512-wide image attention), written once as
SeeSR's release folders, an SD2-base folder and an sd-turbo one (its scheduler config), and read by both sides. Two
settings: SeeSR (SD2 base, 50 steps, guidance 5.5) and SeeSR-Turbo (2 steps, guidance 1.0, overlap 32). Starting
noise: both draw it from a generator seeded alike; SeeSR samples the LR latent from the unseeded global RNG, so the
reference seeds that RNG and ours takes the same seed for that one draw. First the two images are compared (largest
difference in 8-bit levels, with SeeSR's AdaIN colour fix and without), then each side's seconds per image are timed,
the two sides interleaved for ``--rounds`` rounds of ``--images`` images each, after a warm-up image (median of the
rounds). Prints Markdown tables; nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = {  # test_seesr.py's and test_seesr_turbo.py's defaults
    "seesr": {"steps": 50, "guidance": 5.5, "overlap": 4, "base": "stable-diffusion-2-base"},
    "turbo": {"steps": 2, "guidance": 1.0, "overlap": 32, "base": "sd-turbo"},
}
PROMPT = "cat, tree, sky, , clean, high-resolution, 8k"  # test_seesr.py's f"{tags}, {prompt}," + added_prompt
NEGATIVE_PROMPT = "dotted, noise, blur, lowres, smooth"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reference_checkout", default=None,
                        help="a checkout of cswry/SeeSR (test_seesr.py, pipelines/, models/, utils/); none: ours only")
    parser.add_argument("--reference_python", default=sys.executable,
                        help="Python that imports SeeSR's code (default this one; its diffusers must be 0.21-era)")
    parser.add_argument("--modes", nargs="+", choices=tuple(SETTINGS), default=list(SETTINGS),
                        help="seesr (50 steps, guidance 5.5) and/or turbo (2 steps, guidance 1.0); default both")
    parser.add_argument("--lr_size", type=int, default=64, help="side of the LR input in px (default 64)")
    parser.add_argument("--process_size", type=int, default=256,
                        help="--process_size of both (default 256: the 64 px LR becomes a 256 px output)")
    parser.add_argument("--images", type=int, default=2, help="images per timed round (default 2)")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per side (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads of both sides (default 1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of weights, inputs and noise (default 0)")
    parser.add_argument("--smoke", action="store_true",
                        help="smallest setting: turbo only, 16 px LR, process size 64, 1 image, 1 round")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # the reference side's own process
    args = parser.parse_args(argv)
    if args.smoke:
        args.modes, args.lr_size, args.process_size, args.images, args.rounds = ["turbo"], 16, 64, 1, 1
    if min(args.lr_size, args.process_size, args.images, args.rounds, args.threads) < 1:
        parser.error("--lr_size, --process_size, --images, --rounds and --threads must be positive")
    return args


# ------------------------------------------------------------------------------------------------ the reference side
# Runs in --reference_python with the checkout first on sys.path; imports nothing of this repository.


def reference_worker(spec_file: str) -> None:
    """Load SeeSR's pipeline as test_seesr.py (or test_seesr_turbo.py) does, then serve one image per stdin line."""
    spec = json.loads(Path(spec_file).read_text())
    sys.path[:] = [spec["checkout"]] + [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, ROOT / "bench")]
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler
    from PIL import Image
    from pipelines.pipeline_seesr import StableDiffusionControlNetPipeline
    from transformers import CLIPTextModel, CLIPTokenizer

    from models.controlnet import ControlNetModel
    from models.unet_2d_condition import UNet2DConditionModel
    from utils.wavelet_color_fix import adain_color_fix, wavelet_color_fix

    torch.set_num_threads(spec["threads"])
    base, seesr = spec["base"], spec["seesr"]
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer")
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae")
    if spec["mode"] == "turbo":  # test_seesr_turbo.py
        unet = UNet2DConditionModel.from_pretrained_orig(base, seesr, subfolder="unet", use_image_cross_attention=True)
    else:
        unet = UNet2DConditionModel.from_pretrained(seesr, subfolder="unet")
    controlnet = ControlNetModel.from_pretrained(seesr, subfolder="controlnet")
    for model in (vae, text_encoder, unet, controlnet):
        model.requires_grad_(False)
    pipeline = StableDiffusionControlNetPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, feature_extractor=None, unet=unet, controlnet=controlnet,
        scheduler=scheduler, safety_checker=None, requires_safety_checker=False,
    )
    pipeline._init_tiled_vae(encoder_tile_size=1024, decoder_tile_size=224)
    pipeline.set_progress_bar_config(disable=True)
    ram_encoder_hidden_states = torch.load(spec["ram"], weights_only=True)
    args = argparse.Namespace(**spec["args"])
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        started = time.perf_counter()
        # test_seesr.py's per-image code from here, as written there (RAM's prompt and embeddings given).
        validation_image = Image.open(spec["image"]).convert("RGB")
        ori_width, ori_height = validation_image.size
        rscale = args.upscale
        if ori_width < args.process_size // rscale or ori_height < args.process_size // rscale:
            scale = (args.process_size // rscale) / min(ori_width, ori_height)
            validation_image = validation_image.resize((int(scale * ori_width), int(scale * ori_height)))
        validation_image = validation_image.resize((validation_image.size[0] * rscale, validation_image.size[1] * rscale))
        validation_image = validation_image.resize((validation_image.size[0] // 8 * 8, validation_image.size[1] // 8 * 8))
        width, height = validation_image.size
        generator = torch.Generator().manual_seed(spec["seed"])
        torch.manual_seed(spec["lr_latent_seed"])  # SeeSR's LR latent sample reads the global RNG
        image = pipeline(
            PROMPT, validation_image, num_inference_steps=args.num_inference_steps, generator=generator, height=height,
            width=width, guidance_scale=args.guidance_scale, negative_prompt=NEGATIVE_PROMPT,
            conditioning_scale=args.conditioning_scale, start_point=args.start_point,
            ram_encoder_hidden_states=ram_encoder_hidden_states, latent_tiled_size=args.latent_tiled_size,
            latent_tiled_overlap=args.latent_tiled_overlap, args=args,
        ).images[0]
        if command["align_method"] == "wavelet":
            image = wavelet_color_fix(image, validation_image)
        elif command["align_method"] == "adain":
            image = adain_color_fix(image, validation_image)
        image = image.resize((ori_width * rscale, ori_height * rscale))
        seconds = time.perf_counter() - started
        if command.get("save"):
            np.save(command["save"], np.asarray(image))
        print(json.dumps({"seconds": seconds}), flush=True)


class Reference:
    """The reference worker process: ``run(align_method, save)`` -> seconds of one image."""

    def __init__(self, python: str, spec: dict, folder: Path):
        spec_file = folder / f"spec_{spec['mode']}.json"
        spec_file.write_text(json.dumps(spec))
        env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
        env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HOME=str(folder / "hf"), OMP_NUM_THREADS=str(spec["threads"]))
        self.process = subprocess.Popen(
            [python, str(Path(__file__).resolve()), "--worker", str(spec_file)], cwd=spec["checkout"], env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self._answer()

    def _answer(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"SeeSR's side stopped: {self.process.stderr.read()[-3000:]}")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, align_method: str = "adain", save: str | None = None) -> float:
        self.process.stdin.write(json.dumps({"align_method": align_method, "save": save}) + "\n")
        self.process.stdin.flush()
        return self._answer()["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait(timeout=60)


# ------------------------------------------------------------------------------------------------ our side


def build_weights(folder: Path, seed: int, lr_size: int):
    """SD2-base and sd-turbo folders, SeeSR's release folder (SeeSR's class names), the LR image and the embeddings."""
    import numpy as np
    import torch
    from diffusers import UNet2DConditionModel
    from PIL import Image
    from safetensors.torch import load_file, save_file

    from models.seesr_unet import RAM_EMBEDDING_DIM, SeeSRControlNetModel, unet_with_image_attention
    from tests.sd2_tiny import SD_TURBO_SCHEDULER_CONFIG, build_tiny_sd2

    sd2 = build_tiny_sd2(folder / "stable-diffusion-2-base", seed=seed, light_attention=True)
    build_tiny_sd2(folder / "sd-turbo", seed=seed + 1, light_attention=True, scheduler_config=SD_TURBO_SCHEDULER_CONFIG)
    for base in ("stable-diffusion-2-base", "sd-turbo"):
        # Current transformers saves CLIPTextModel without the "text_model." prefix that SD2's release (and the
        # transformers SeeSR runs with) has; both read the prefixed names.
        weights = folder / base / "text_encoder" / "model.safetensors"
        state = load_file(weights)
        save_file({key if key.startswith("text_model.") else f"text_model.{key}": value for key, value in state.items()},
                  weights, metadata={"format": "pt"})
    torch.manual_seed(seed)
    unet = unet_with_image_attention(UNet2DConditionModel.from_pretrained(sd2, subfolder="unet"), RAM_EMBEDDING_DIM)
    controlnet = SeeSRControlNetModel.from_unet(unet)
    generator = torch.Generator().manual_seed(seed + 2)
    with torch.no_grad():  # trained-looking image attentions and zero convolutions, so that every part matters
        for name, parameter in list(unet.named_parameters()) + list(controlnet.named_parameters()):
            if "image_attentions" in name or name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    for model, sub, class_name in ((unet, "unet", "UNet2DConditionModel"), (controlnet, "controlnet", "ControlNetModel")):
        model.save_pretrained(folder / "seesr" / sub, safe_serialization=True)
        config_file = folder / "seesr" / sub / "config.json"
        config = json.loads(config_file.read_text())
        config["_class_name"] = class_name  # as SeeSR's release names its classes
        config_file.write_text(json.dumps(config, indent=2))
    # A smooth picture with some texture: random pixels would make every resize an edge case.
    axis = np.linspace(0, 1, lr_size)
    rng = np.random.default_rng(seed)
    picture = np.stack([np.outer(axis, axis), np.outer(axis[::-1], axis), np.outer(axis, axis[::-1])], -1)
    picture = np.clip(picture * 200 + rng.normal(0, 12, picture.shape) + 20, 0, 255).astype(np.uint8)
    Image.fromarray(picture).save(folder / "lr.png")
    torch.save(torch.randn(1, 145, RAM_EMBEDDING_DIM, generator=generator), folder / "ram.pt")


class Ours:
    """``infer.py seesr``'s per-image computation (pipelines.seesr.super_resolve without RAM), timed per image."""

    def __init__(self, folder: Path, mode: str, args: argparse.Namespace, lr_latent_seed: int):
        import torch

        from models.seesr import SeeSRPipeline

        self.pipeline, self.messages = SeeSRPipeline.from_pretrained(folder / SETTINGS[mode]["base"], folder / "seesr")
        self.mode, self.args, self.folder = mode, args, folder
        self.ram = torch.load(folder / "ram.pt", weights_only=True)
        self.lr_latent_seed = lr_latent_seed

    def _seeded_lr_latent(self):
        """While it is active, the LR latent's sample (our only posterior draw) takes the seed SeeSR's global RNG gets."""
        import contextlib

        import torch
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        sample, seed = DiagonalGaussianDistribution.sample, self.lr_latent_seed

        @contextlib.contextmanager
        def seeded():
            DiagonalGaussianDistribution.sample = lambda posterior, generator=None: sample(
                posterior, torch.Generator().manual_seed(seed))
            try:
                yield
            finally:
                DiagonalGaussianDistribution.sample = sample

        return seeded()

    def run(self, align_method: str = "adain", save: str | None = None) -> float:
        import numpy as np
        import torch

        from data.sr_pairs import load_image_tensor
        from models.seesr import encode_prompts, super_resolve_image
        from utils.images import tensor_to_pil

        setting, pipeline = SETTINGS[self.mode], self.pipeline
        started = time.perf_counter()
        lr = load_image_tensor(self.folder / "lr.png")
        prompt_embeds = encode_prompts(pipeline.tokenizer, pipeline.text_encoder, [PROMPT], pipeline.device)
        with self._seeded_lr_latent():
            result = super_resolve_image(
                pipeline, lr, upscale=4, process_size=self.args.process_size, prompt_embeds=prompt_embeds,
                negative_prompt=NEGATIVE_PROMPT, image_embeds=self.ram, num_inference_steps=setting["steps"],
                guidance_scale=setting["guidance"], start_point="lr", start_steps=999, latent_tiled_size=96,
                latent_tiled_overlap=setting["overlap"], align_method=align_method,
                generator=torch.Generator().manual_seed(self.args.seed),
            )
        picture = tensor_to_pil(result, (0.0, 1.0))
        seconds = time.perf_counter() - started
        if save:
            np.save(save, np.asarray(picture))
        return seconds


# ------------------------------------------------------------------------------------------------ main


def reference_available(args: argparse.Namespace) -> str | None:
    """None when SeeSR's side can run, else why not (one line)."""
    if not args.reference_checkout:
        return "no --reference_checkout given"
    checkout = Path(args.reference_checkout)
    for needed in ("test_seesr.py", "pipelines/pipeline_seesr.py", "models/unet_2d_condition.py"):
        if not (checkout / needed).is_file():
            return f"--reference_checkout {checkout} has no {needed} (a checkout of cswry/SeeSR is expected)"
    try:
        probe = subprocess.run([args.reference_python, "-c", "import diffusers.pipeline_utils, einops"], cwd=checkout,
                               capture_output=True, text=True,
                               env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    except OSError as error:
        return f"--reference_python {args.reference_python} cannot run ({error.strerror})"
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["?"])[-1]
        return (f"--reference_python {args.reference_python} cannot import SeeSR's dependencies ({last}); give a Python "
                "with diffusers==0.21.0 (see this script's header)")
    return None


def main(args: argparse.Namespace) -> dict:
    import numpy as np
    import torch

    from bench.common import median

    torch.set_num_threads(args.threads)
    missing = reference_available(args)
    if missing:
        print(f"reference rows skipped: {missing}")
    rows, agreement = [], []
    with tempfile.TemporaryDirectory() as work:
        folder = Path(work)
        build_weights(folder, args.seed, args.lr_size)
        for mode in args.modes:
            setting = SETTINGS[mode]
            ours = Ours(folder, mode, args, lr_latent_seed=args.seed + 10)
            runs = {"ours": ours}
            if not missing:
                spec = {"mode": mode, "checkout": str(Path(args.reference_checkout).resolve()),
                        "base": str(folder / setting["base"]), "seesr": str(folder / "seesr"), "image": str(folder / "lr.png"),
                        "ram": str(folder / "ram.pt"), "seed": args.seed, "lr_latent_seed": args.seed + 10,
                        "threads": args.threads,
                        "args": {"upscale": 4, "process_size": args.process_size, "num_inference_steps": setting["steps"],
                                 "guidance_scale": setting["guidance"], "conditioning_scale": 1.0, "start_point": "lr",
                                 "latent_tiled_size": 96, "latent_tiled_overlap": setting["overlap"]}}
                runs["SeeSR"] = Reference(args.reference_python, spec, folder)
                outputs = {}
                for align in ("adain", "nofix"):
                    for name, side in runs.items():
                        side.run(align, save=str(folder / f"{mode}_{name}_{align}.npy"))
                    ours_image, reference_image = (np.load(folder / f"{mode}_{name}_{align}.npy").astype(np.int16)
                                                   for name in ("ours", "SeeSR"))
                    difference = np.abs(ours_image - reference_image)
                    outputs[align] = (int(difference.max()), float(difference.mean()), ours_image.shape)
                agreement.append((mode, outputs))
            else:
                ours.run()  # warm-up
            seconds = {name: [] for name in runs}
            for _ in range(args.rounds):
                for name, side in runs.items():
                    seconds[name].append(sum(side.run() for _ in range(args.images)) / args.images)
            for side in runs.values():
                if isinstance(side, Reference):
                    side.close()
            ours_time = median(seconds["ours"])
            reference_time = median(seconds["SeeSR"]) if "SeeSR" in seconds else float("nan")
            rows.append((mode, setting, ours_time, reference_time))

    print(f"\nSeeSR's inference vs infer.py seesr on the CPU ({args.threads} thread(s)), tiny random weights, "
          f"{args.lr_size} px LR at --process_size {args.process_size} (x4)")
    if agreement:
        print("\n| setting | output | colour fix | largest difference (8-bit levels) | mean difference |")
        print("|---|---|---|---|---|")
        for mode, outputs in agreement:
            for align, (largest, mean, shape) in outputs.items():
                print(f"| {mode} | {shape[1]}x{shape[0]} | {align} | {largest} | {mean:.3f} |")
    print("\n| setting | steps | guidance | SeeSR s/image | ours s/image | ours / SeeSR |")
    print("|---|---|---|---|---|---|")
    for mode, setting, ours_time, reference_time in rows:
        ratio = ours_time / reference_time if reference_time == reference_time else float("nan")
        reference_cell = f"{reference_time:.3f}" if reference_time == reference_time else "n/a"
        ratio_cell = f"{ratio:.2f}x" if ratio == ratio else "n/a"
        print(f"| {mode} | {setting['steps']} | {setting['guidance']} | {reference_cell} | {ours_time:.3f} | {ratio_cell} |")
    return {"rows": rows, "agreement": agreement, "skipped": missing}


if __name__ == "__main__":
    if "--worker" in sys.argv:
        reference_worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        sys.path.insert(0, str(ROOT))
        main(parse_args())
