"""Test helpers for app.py: the tiny models of every tab, the uploads (good and bad), and the app served on a free port.

The models are the tests' usual tiny ones (a 16 px diffusers DDPM as tests/test_infer_cli.py builds, the tiny
Phaseformer, a one-epoch tiny DiT on a tiny VA-VAE as tests/test_train_dit_user.py trains it, a random user classifier),
built once per process however many test modules ask for them.
"""

from __future__ import annotations

import importlib.util
import socket
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
_BUILT: dict[str, dict] = {}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_for_app_tests", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def build_models(root: Path) -> dict:
    """Every tab's tiny weights under ``root`` (built on the first call of the process, then reused)."""
    if "models" in _BUILT:
        return _BUILT["models"]
    from diffusers import DDPMScheduler, UNet2DModel

    import train_dit_user
    from models.ddpm_unet import ddpm_unet_config
    from models.phaseformer import build_phaseformer
    from tests.user_pipeline_data import write_tiny_vavae, write_user_folders
    from utils.user_generation_metrics import build_user_classifier

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    ddpm = root / "ddpm-tiny-16"
    UNet2DModel(**ddpm_unet_config("tiny", 16)).save_pretrained(ddpm)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(ddpm)
    phaseformer = root / "phaseformer_tiny.pth"
    torch.save(build_phaseformer("phaseformer_tiny").state_dict(), phaseformer)

    vavae = write_tiny_vavae(root / "vavae-tiny.pt")
    data = write_user_folders(root / "users", [1, 2, 3], 4, pattern="ramp")
    extract = _load_script("extract_features")
    extract.main(extract.parse_args(["--data_dir", str(data), "--vavae_path", str(vavae), "--vavae_config", "tiny",
                                     "--output_path", str(root / "latents"), "--image_size", "32", "--val_fraction", "0.2",
                                     "--device", "cpu"]))
    run = root / "dit_run"
    train_dit_user.main(train_dit_user.parse_args([
        "--latent_dir", str(root / "latents"), "--output_dir", str(run), "--model_size", "tiny", "--batch_size", "6",
        "--device", "cpu", "--max_epochs", "1", "--preview_every", "0", "--report_to", "none"]))
    classifier = root / "classifier.pt"
    torch.save({"model": build_user_classifier(3).state_dict(), "user_ids": [1, 2, 3], "classifier_size": 32}, classifier)
    _BUILT["models"] = {"ddpm": ddpm, "phaseformer": phaseformer, "vavae": vavae, "dit": run / "checkpoints/last.ckpt",
                        "classifier": classifier, **build_seesr(root / "seesr")}
    return _BUILT["models"]


def build_seesr(root: Path) -> dict:
    """A tiny SeeSR layout as tests/test_seesr_turbo.py builds it: SD2 base, sd-turbo, two release folders, RAM + DAPE.

    RAM's weight file does not record its architecture: :func:`use_tiny_ram` must be in force when the app loads it.
    """
    from diffusers import UNet2DConditionModel

    from models.seesr import build_controlnet
    from models.seesr_unet import unet_with_image_attention
    from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram
    from tests.sd2_tiny import SD_TURBO_SCHEDULER_CONFIG, build_tiny_sd2

    sd2 = build_tiny_sd2(root / "stable-diffusion-2-base", light_attention=True)
    turbo = build_tiny_sd2(root / "sd-turbo", seed=1, light_attention=True, scheduler_config=SD_TURBO_SCHEDULER_CONFIG)
    ram = write_tiny_ram(root / "ram", thresholds=[0.0, 1.0, 0.0, 1.0, 0.0, 1.0])  # tags that fire whatever the image
    releases = []
    for seed, name in ((2, "seesr"), (3, "seesr_b")):
        torch.manual_seed(seed)
        unet = unet_with_image_attention(UNet2DConditionModel.from_pretrained(sd2, subfolder="unet"), TINY_RAM_CONFIG.embed_width)
        generator = torch.Generator().manual_seed(seed)
        controlnet = build_controlnet(unet)
        with torch.no_grad():  # trained-looking weights: random changes, so that the two checkpoints differ
            for parameter in [*unet.parameters(), *controlnet.parameters()]:
                parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))
        unet.save_pretrained(root / name / "unet")
        controlnet.save_pretrained(root / name / "controlnet")
        releases.append(root / name)
    return {"sd2": sd2, "turbo": turbo, "seesr": releases[0], "seesr_b": releases[1], "ram": ram["ram"], "dape": ram["dape"]}


def use_tiny_ram():
    """A context in which models.ram builds the tiny RAM of tests/ram_tiny.py instead of Swin-L."""
    import pytest

    import models.ram
    from tests.ram_tiny import TINY_RAM_CONFIG

    patch = pytest.MonkeyPatch()
    patch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)
    return patch


def write_uploads(folder: Path) -> dict[str, Path]:
    """Uploads for every case of the app's upload check: an RGB photo, the conversions and each refusal."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = np.random.default_rng(0)
    rgb = generator.integers(0, 256, (24, 32, 3), dtype=np.uint8)
    files = {"rgb": folder / "photo.png", "reference": folder / "reference.png", "rgba": folder / "transparent.png",
             "gray": folder / "gray.png", "sixteen_bit": folder / "gray16.png", "tiny": folder / "one_pixel.png",
             "text": folder / "notes.png", "truncated": folder / "truncated.png", "large": folder / "large.png",
             "other_size": folder / "other_size.png", "heavy": folder / "heavy.png",
             "lr": folder / "frog.png"}
    Image.fromarray(rgb).save(files["rgb"])
    Image.fromarray(generator.integers(0, 256, (24, 32, 3), dtype=np.uint8)).save(files["reference"])
    alpha = generator.integers(0, 256, (24, 32, 1), dtype=np.uint8)
    Image.fromarray(np.concatenate([rgb, alpha], axis=-1), "RGBA").save(files["rgba"])
    Image.fromarray(rgb[..., 0]).save(files["gray"])
    Image.fromarray((generator.integers(0, 65536, (24, 32))).astype(np.uint16)).save(files["sixteen_bit"])
    Image.new("RGB", (1, 1), (10, 20, 30)).save(files["tiny"])
    files["text"].write_text("these are notes, not an image\n")
    whole = files["rgb"].read_bytes()
    files["truncated"].write_bytes(whole[: len(whole) // 2])
    Image.new("RGB", (640, 480), (0, 90, 120)).save(files["large"])  # over the tests' --max_upload_pixels
    Image.new("RGB", (20, 20), (0, 90, 120)).save(files["other_size"])
    Image.fromarray(generator.integers(0, 256, (16, 20, 3), dtype=np.uint8)).save(files["lr"])
    from PIL.PngImagePlugin import PngInfo

    padding = PngInfo()
    padding.add_text("padding", "x" * 1_500_000)  # a 32x24 image of 1.5 MB: over the tests' --max_upload_mb 1
    Image.fromarray(rgb).save(files["heavy"], pnginfo=padding)
    return files


def start_app(argv: list[str]):
    """``(demo, url)``: app.py built from ``argv`` and served on a free loopback port without blocking."""
    import app

    args = app.parse_args([*argv, "--port", str(free_port())])
    demo = app.build_app(args)
    url = app.launch(demo, args, block=False)
    return demo, url.rstrip("/")


def app_argv(models: dict, output_dir: Path) -> list[str]:
    """Every tab with a model (SeeSR: none), small upload limits for the refusal tests."""
    return ["--model", str(models["ddpm"]), "--checkpoint", str(models["phaseformer"]), "--dit_checkpoint", str(models["dit"]),
            "--vavae_path", str(models["vavae"]), "--vavae_config", "tiny", "--classifier", str(models["classifier"]),
            "--classifier_image_size", "32", "--device", "cpu", "--output_dir", str(output_dir),
            "--max_upload_pixels", "100000", "--max_upload_mb", "1",
            "--pretrained_model_path", str(models["sd2"]), "--seesr_model_path", str(models["seesr"]), str(models["seesr_b"]),
            "--turbo_model_path", str(models["turbo"]), "--ram_path", str(models["ram"]), "--ram_ft_path", str(models["dape"]),
            "--process_size", "64"]


def pixels(path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def assert_same_picture(shown, written) -> None:
    """The app's picture is infer.py's file: same size, every pixel within one 8-bit level.

    The same code runs in both, but the served app is another process (another thread count), and a float sum in
    another order can move a value across a rounding boundary on some CPU; one level is far below any real change.
    """
    a, b = pixels(shown).astype(np.int16), pixels(written).astype(np.int16)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert np.abs(a - b).max() <= 1, f"pictures differ by up to {np.abs(a - b).max()} levels"
