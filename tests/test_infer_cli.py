"""infer.py's ddpm, phaseformer and user command lines: one vocabulary, every bad value one ``error:`` line, and the
DDPM samplers (an oracle noise model that knows the clean image must get it back from every sampler).

Tiny models built in temporary folders (a 16 px diffusers UNet, the tiny Phaseformer); parse-time errors are checked
in-process, one end-to-end ``error:`` line from ``infer.py`` run as ``__main__``.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

import infer
import pipelines.user
from models.ddpm_sampling import SAMPLERS, make_noise_scheduler, make_sampler, sample_ddpm
from tests.launch import run_in_process
from utils.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ fixtures
@pytest.fixture(scope="module")
def ddpm_folder(tmp_path_factory):
    """A diffusers DDPM folder (UNet2DModel + scheduler_config.json) at 16 px, like google/ddpm-cifar10-32."""
    from diffusers import DDPMScheduler, UNet2DModel

    from models.ddpm_unet import ddpm_unet_config

    folder = tmp_path_factory.mktemp("ddpm") / "ddpm-tiny-16"
    torch.manual_seed(0)
    UNet2DModel(**ddpm_unet_config("tiny", 16)).save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def short_ddpm_folder(tmp_path_factory, ddpm_folder):
    """The same UNet on a 50-timestep schedule."""
    import shutil

    from diffusers import DDPMScheduler

    folder = tmp_path_factory.mktemp("ddpm50") / "ddpm-tiny-16-t50"
    shutil.copytree(ddpm_folder, folder)
    DDPMScheduler(num_train_timesteps=50, beta_schedule="linear").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def phaseformer_set(tmp_path_factory):
    """A plain Phaseformer state dict and 24 px input/gt folders (one pair of a different size in ``odd/``)."""
    from models.phaseformer import build_phaseformer

    root = tmp_path_factory.mktemp("phaseformer")
    torch.manual_seed(0)
    torch.save(build_phaseformer("phaseformer_tiny").state_dict(), root / "weights.pth")
    generator = torch.Generator().manual_seed(0)
    for folder in ("input", "gt"):
        (root / folder).mkdir()
        for index in range(2):
            pixels = (torch.rand(24, 24, 3, generator=generator) * 255).to(torch.uint8).numpy()
            Image.fromarray(pixels).save(root / folder / f"img{index}.png")
    (root / "empty").mkdir()
    (root / "odd_gt").mkdir()
    for index in range(2):
        Image.new("RGB", (24, 20)).save(root / "odd_gt" / f"img{index}.png")
    return root


def parse_error(capsys, argv: list[str]) -> str:
    """The one line argparse prints for a bad flag (and that it exits with status 2)."""
    with pytest.raises(SystemExit) as exit_info:
        infer.parse_args(argv)
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


# ---------------------------------------------------------------------------------- one vocabulary, aliases
@pytest.mark.parametrize(
    "spellings",
    [
        [["--num_inference_steps", "7"], ["--steps", "7"], ["--num_steps", "7"]],
        [["--num_samples", "3"], ["--samples", "3"]],
        [["--mixed_precision", "no"], ["--no-amp"]],
    ],
)
def test_ddpm_aliases_parse_to_the_house_values(spellings):
    parsed = [vars(infer.parse_args(["ddpm", "--model", "m", *flags])) for flags in spellings]
    assert all(p == parsed[0] for p in parsed)


@pytest.mark.parametrize(
    "spellings",
    [
        [["--num_inference_steps", "3"], ["--num_steps", "3"], ["--steps", "3"]],
        [["--mixed_precision", "no"], ["--precision", "fp32"], ["--precision", "32"]],
        [["--mixed_precision", "fp16"], ["--precision", "fp16"], ["--precision", "16-mixed"]],
        [["--num_samples_per_user", "2"], ["--num_images_per_user", "2"]],
        [["--vavae_path", "v.pt"], ["--vae_path", "v.pt"]],
    ],
)
def test_user_aliases_parse_to_the_house_values(spellings):
    parsed = [vars(infer.parse_args(["user", "--dit_checkpoint", "c", *flags])) for flags in spellings]
    assert all(p == parsed[0] for p in parsed)


def test_phaseformer_amp_is_mixed_precision_auto():
    base = ["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o"]
    assert infer.parse_args(base).mixed_precision == "no"  # fp32: the precision of the training evaluation
    assert infer.parse_args([*base, "--amp"]).mixed_precision == infer.parse_args([*base, "--mixed_precision", "auto"]).mixed_precision


def test_spec_command_lines_parse():
    """The users' notes' command lines (quoted in docs/) as written."""
    ddpm = infer.parse_args(["ddpm", "--model", "checkpoints/cifar10_128x128/ddpm_best.pt", "--samples", "9", "--steps", "500",
                             "--output", "high_quality_samples.png"])
    assert (ddpm.num_samples, ddpm.num_inference_steps, ddpm.output) == (9, 500, "high_quality_samples.png")
    assert infer.parse_args(["ddpm", "--model", "m.pt", "--interpolate"]).interpolate
    assert len(infer.parse_args(["ddpm", "--compare", "a.pt", "b.pt", "c.pt"]).compare) == 3
    dit = infer.parse_args(["user", "--dit_checkpoint", "best.ckpt", "--vavae_path", "v.pt", "--output_dir", "g", "--user_ids",
                            "1", "2", "3", "4", "5", "--num_samples_per_user", "4", "--guidance_scale", "4.0", "--num_steps", "250"])
    assert (dit.num_inference_steps, dit.user_ids, dit.guidance_scale) == (250, [1, 2, 3, 4, 5], 4.0)
    unet = infer.parse_args(["user", "--vae_path", "/k/final-model", "--unet_path", "/k/diffusion-final-model",
                             "--condition_encoder_path", "/k/diffusion-final-model/condition_encoder.pt", "--num_users", "31",
                             "--user_ids", "1", "5", "10", "15", "--num_images_per_user", "5", "--num_inference_steps", "20",
                             "--output_dir", "/k/generated_images", "--device", "auto", "--seed", "42"])
    assert (unet.num_samples_per_user, unet.num_inference_steps, unet.seed, unet.vavae_path) == (5, 20, 42, "/k/final-model")


def test_help_lists_the_aliases(capsys):
    for command, fragments in {
        "ddpm": ["[alias: --steps, --num_steps]", "[alias: --samples]", "alias of --mixed_precision no", "t=999"],
        "user": ["[alias: --num_steps, --steps]", "[alias: --num_images_per_user]", "alias of --mixed_precision"],
        "phaseformer": ["alias of --mixed_precision auto"],
    }.items():
        with pytest.raises(SystemExit):
            infer.parse_args([command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        for fragment in fragments:
            assert fragment in text, (command, fragment)


# ------------------------------------------------------------------------------- bad values caught at parse
PARSE_ERRORS = [
    (["ddpm", "--model", "m", "--samples", "-3"], "--num_samples/--samples: must be at least 1, got -3"),
    (["ddpm", "--model", "m", "--samples", "0"], "--num_samples/--samples: must be at least 1, got 0"),
    (["ddpm", "--model", "m", "--steps", "0"], "--num_inference_steps/--steps/--num_steps: must be at least 1, got 0"),
    (["ddpm", "--model", "m", "--interpolate", "--frames", "0"], "--frames: must be at least 2, got 0"),
    (["ddpm", "--model", "m", "--interpolate", "--frames", "1"], "--frames: must be at least 2, got 1"),
    (["ddpm", "--model", "m", "--batch_size", "0"], "--batch_size: must be at least 1, got 0"),
    (["ddpm", "--model", "m", "--eta", "1.5"], "--eta: must be between 0 and 1, got 1.5"),
    (["ddpm", "--model", "m", "--eta", "nan"], "--eta: expected a finite number"),
    (["ddpm", "--model", "m", "--seed", "-1"], "--seed: must be a seed between 0 and"),
    (["ddpm", "--model", "m", "--steps", "ten"], "expected a whole number, got 'ten'"),
    (["ddpm", "--model", "m", "--mixed_precision", "fp8"], "'fp8' is not one of"),
    (["ddpm", "--model", "m", "--sampler", "euler"], "--sampler: invalid choice"),
    (["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o", "--crop_border", "-2"],
     "--crop_border: must be at least 0, got -2"),
    (["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o", "--tile", "16", "--tile_overlap", "-5"],
     "--tile_overlap: must be at least 0, got -5"),
    (["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o", "--tile", "-16"], "--tile: must be at least 0"),
    (["phaseformer", "--checkpoint", "c", "--input", "i", "--output_dir", "o", "--resize", "8"], "--resize: must be at least 16"),
    (["user", "--dit_checkpoint", "c", "--num_samples_per_user", "0"], "--num_samples_per_user/--num_images_per_user: must be at least 1"),
    (["user", "--dit_checkpoint", "c", "--batch_size", "0"], "--batch_size: must be at least 1"),
    (["user", "--dit_checkpoint", "c", "--start_index", "-1"], "--start_index: must be at least 0"),
    (["user", "--dit_checkpoint", "c", "--num_steps", "0"], "--num_inference_steps/--num_steps/--steps: must be at least 1"),
    (["user", "--dit_checkpoint", "c", "--guidance_scale", "-1"], "--guidance_scale: must be between 0 and 100"),
    (["user", "--dit_checkpoint", "c", "--guidance_interval", "0.5", "1.5"], "--guidance_interval: must be between 0 and 1"),
    (["user", "--dit_checkpoint", "c", "--guidance_channels", "0"], "--guidance_channels: must be at least 1"),
    (["user", "--dit_checkpoint", "c", "--shift", "0"], "--shift: must be greater than 0"),
    (["user", "--dit_checkpoint", "c", "--eta", "-0.1"], "--eta: must be between 0 and 1"),
    (["user", "--dit_checkpoint", "c", "--num_users", "0"], "--num_users: must be at least 1"),
    (["user", "--dit_checkpoint", "c", "--seed", "-5"], "--seed: must be a seed between 0 and"),
    (["user", "--dit_checkpoint", "c", "--precision", "64"], "'64' is not one of"),
]


@pytest.mark.parametrize("argv, message", PARSE_ERRORS, ids=[" ".join(a[3:] if a[0] == "phaseformer" else a[1:]) for a, _ in PARSE_ERRORS])
def test_bad_values_are_one_line_at_parse_time(capsys, argv, message):
    assert message in parse_error(capsys, argv)


# ------------------------------------------------------------------------ bad values that need a file or model
def ddpm_run(*flags: str):
    return infer.main(infer.parse_args(["ddpm", *flags, "--device", "cpu"]))


def test_ddpm_bad_combinations_and_paths(ddpm_folder, tmp_path):
    from models.ddpm_unet import ddpm_unet_config

    model = ["--model", str(ddpm_folder)]
    Image.new("RGB", (8, 8)).save(tmp_path / "picture.jpg")
    torch.save({"kind": "ddpm", "model_config": ddpm_unet_config("tiny", 16), "model": {"conv_in.weight": torch.zeros(1)},
                "scheduler_config": dict(make_noise_scheduler().config)}, tmp_path / "damaged.pt")
    cases = [
        (model + ["--steps", "5000"], "--num_inference_steps 5000 is more than the 1000 timesteps"),
        (["--compare", str(ddpm_folder)] + model, "--model CKPT or --compare CKPT"),
        ([], "--model CKPT or --compare CKPT"),
        (model + ["--frames", "4"], "--frames sets the length of an --interpolate strip"),
        (model + ["--interpolate", "--samples", "4"], "--num_samples does not apply to --interpolate"),
        (model + ["--sampler", "ddpm", "--eta", "0.5"], "--eta applies to --sampler ddim only"),
        (model + ["--output", str(tmp_path)], "is a folder"),
        (model + ["--output", str(tmp_path / "grid.txt")], "is not an image file name"),
        (model + ["--output_dir", str(ddpm_folder / "config.json")], "--output_dir"),
        (model + ["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU"),
        (["--model", str(tmp_path / "missing.pt")], "missing.pt does not exist"),
        (["--model", str(tmp_path)], "is not a diffusers DDPM folder"),
        (["--model", str(tmp_path / "picture.jpg")], "is not a torch checkpoint or a .safetensors file"),
        (["--model", str(tmp_path / "damaged.pt")], "do not fit the UNet its own configuration describes"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError) as error:
            ddpm_run(*flags)
        assert message in str(error.value), (flags, str(error.value))
    assert not list(tmp_path.glob("*.png"))


def test_compare_checks_every_checkpoint_before_sampling(ddpm_folder, short_ddpm_folder, tmp_path, monkeypatch):
    import models.ddpm_sampling

    calls = []
    monkeypatch.setattr(models.ddpm_sampling, "sample_ddpm", lambda *a, **k: calls.append(a))
    for bad, message in ((short_ddpm_folder, "--num_inference_steps 100 is more than the 50 timesteps"),
                         (tmp_path / "missing.pt", "does not exist")):
        with pytest.raises(UserError) as error:
            ddpm_run("--compare", str(ddpm_folder), str(bad), "--steps", "100", "--output", str(tmp_path / "cmp.png"))
        assert str(bad) in str(error.value) and message in str(error.value)
    assert calls == [] and not (tmp_path / "cmp.png").exists()


def test_steps_beyond_the_schedule_is_one_line_from_the_command_line(ddpm_folder):
    result = run_in_process("infer.py", "ddpm", "--model", str(ddpm_folder), "--steps", "5000", "--device", "cpu")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: --num_inference_steps 5000 is more than the 1000 timesteps {ddpm_folder} was trained with; use 1..1000."]


def phaseformer_run(root: Path, output: Path, *flags: str):
    return infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(root / "weights.pth"), "--input", str(root / "input"),
                                        "--output_dir", str(output), "--device", "cpu", *flags]))


def test_phaseformer_bad_values_stop_before_anything_is_written(phaseformer_set, tmp_path):
    root = phaseformer_set
    out = tmp_path / "out"
    gt = ["--gt_dir", str(root / "gt")]
    cases = [
        (gt + ["--crop_border", "30"], "--crop_border 30 leaves less than 11 px of"),
        (gt + ["--crop_border", "7"], "use at most 6"),
        (gt + ["--resize", "16", "--crop_border", "3"], "--crop_border 3 leaves less than 11 px of a --resize 16 image"),
        (["--crop_border", "2"], "add --gt_dir"),
        (["--test_y_channel"], "add --gt_dir"),
        (["--tile", "16", "--tile_overlap", "16"], "--tile_overlap 16 must be less than --tile 16"),
        (["--tile", "8"], "--tile 8 is too small"),
        (["--tile_overlap", "8"], "add --tile N"),
        (["--gt_dir", str(root / "odd_gt")], "is 24x24 px but its ground truth"),
        (["--output_dir", str(root / "weights.pth")], "is a file"),
        (["--split_file", str(root / "weights.pth")], "is not a text file"),
        (["--mixed_precision", "fp16"], "--mixed_precision fp16 needs a CUDA GPU"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError) as error:
            phaseformer_run(root, out, *flags)
        assert message in str(error.value), (flags, str(error.value))
    assert not list(tmp_path.rglob("*.png"))
    (tmp_path / "split.txt").write_text("train img0\ntrain img1\n")
    with pytest.raises(UserError, match="lists no 'test' images"):
        phaseformer_run(root, out, "--split_file", str(tmp_path / "split.txt"))
    with pytest.raises(UserError, match="holds no images"):
        infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(root / "weights.pth"), "--input", str(root / "empty"),
                                     "--output_dir", str(out), "--device", "cpu"]))
    with pytest.raises(UserError, match="is a folder"):
        infer.main(infer.parse_args(["phaseformer", "--checkpoint", str(root), "--input", str(root / "input"),
                                     "--output_dir", str(out), "--device", "cpu"]))


def test_phaseformer_scores_at_the_largest_allowed_border_and_tiles_without_nan(phaseformer_set, tmp_path):
    report = phaseformer_run(phaseformer_set, tmp_path / "a", "--gt_dir", str(phaseformer_set / "gt"), "--crop_border", "6",
                             "--outputs", "L")
    assert len(report["metrics"]) == 2 and all(row["ssim"] == row["ssim"] for row in report["metrics"])  # not NaN
    report = phaseformer_run(phaseformer_set, tmp_path / "b", "--tile", "16", "--outputs", "L")  # overlap defaults to 8
    assert len(report["written"]) == 2


def test_enhance_refuses_a_negative_overlap_instead_of_writing_nan():
    from models.phaseformer_enhance import enhance

    with pytest.raises(UserError, match="must not be negative"):
        enhance(torch.nn.Identity(), torch.rand(1, 3, 40, 40), tile=16, tile_overlap=-5)


def test_user_bad_values_before_loading(tmp_path):
    base = ["user", "--dit_checkpoint", str(tmp_path / "missing.ckpt"), "--device", "cpu"]
    cases = [
        (["--user_ids", "2", "2"], "--user_ids lists 2 more than once"),
        (["--guidance_interval", "0.8", "0.2"], "START must not be after END"),
        ([], "--dit_checkpoint"),
        (["--dit_checkpoint", str(Path(__file__)), "--output_dir", str(Path(__file__))], "is a file"),
    ]
    for flags, message in cases:
        with pytest.raises(UserError) as error:
            infer.main(infer.parse_args([*base, *flags]))  # a later --dit_checkpoint wins
        assert message in str(error.value), (flags, str(error.value))


@pytest.mark.parametrize(
    "backbone, flags, message",
    [
        ("dit", {"eta": 0.5}, "--eta applies to the UNet backbone"),
        ("unet", {"shift": 0.3}, "--shift applies to the DiT backbone"),
        ("unet", {"num_inference_steps": 2000}, "--num_inference_steps 2000 is more than the 1000 timesteps"),
        ("dit", {"sampler": "ddim"}, "--sampler ddim: the dit backbone samples with euler, heun"),
        ("unet", {"sampler": "heun"}, "--sampler heun: the unet backbone samples with ddpm, ddim, dpmsolver++, unipc"),
        ("dit", {"guidance_channels": 33}, "--guidance_channels 33 is more than the model's 32 latent channels"),
        ("unet", {"sampler": "unipc", "eta": 0.5}, "--eta applies to DDIM; unipc is deterministic"),
    ],
)
def test_user_flags_the_model_cannot_honour(backbone, flags, message):
    from diffusers import DDPMScheduler

    args = infer.parse_args(["user", "--dit_checkpoint", "c"])
    for name, value in flags.items():
        setattr(args, name, value)
    bundle = SimpleNamespace(backbone=backbone, noise_scheduler=DDPMScheduler(num_train_timesteps=1000),
                             stats=SimpleNamespace(mean=torch.zeros(1, 32, 1, 1)), model=SimpleNamespace(null_label=10))
    settings = {"sampler": flags.get("sampler"), "num_steps": flags.get("num_inference_steps", 50),
                "guidance_channels": flags.get("guidance_channels"), "eta": flags.get("eta")}
    with pytest.raises(UserError) as error:
        pipelines.user.check_sampling(args, bundle, settings)
    assert message in str(error.value)


# ------------------------------------------------------------------------------------------ DDPM samplers
class OracleNoise(torch.nn.Module):
    """The noise that takes a known clean image to ``x_t`` on the schedule: a perfect epsilon model of one image."""

    def __init__(self, clean: torch.Tensor, alphas_cumprod: torch.Tensor):
        super().__init__()
        self.config = SimpleNamespace(in_channels=clean.shape[1], sample_size=clean.shape[-1])
        self.register_buffer("clean", clean)
        self.register_buffer("alphas_cumprod", alphas_cumprod.double())
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # sample_ddpm reads the device from a parameter

    def forward(self, x, t):
        alpha = self.alphas_cumprod[int(t)]
        return SimpleNamespace(sample=((x.double() - alpha.sqrt() * self.clean.double()) / (1 - alpha).sqrt()).float())


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("spacing", ["trailing", "leading"])
def test_every_sampler_recovers_the_clean_image_from_an_oracle(sampler, spacing):
    # Not the default schedule: a sampler that dropped the model's schedule for diffusers' default would miss.
    schedule = make_noise_scheduler(num_train_timesteps=500, beta_end=0.03)
    clean = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.8 - 0.9
    oracle = OracleNoise(clean, schedule.alphas_cumprod)
    images = sample_ddpm(oracle, dict(schedule.config), num_samples=2, steps=10, sampler=sampler, seed=0,
                         timestep_spacing=spacing)
    # Measured: <= 1.2e-7 (float32 rounding); a wrong schedule or final step is off by 1e-2 or more.
    torch.testing.assert_close(images, clean.expand(2, -1, -1, -1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_trailing_spacing_starts_at_the_last_training_timestep(sampler):
    config = dict(make_noise_scheduler().config)
    for steps in (10, 50, 100):
        assert int(make_sampler(config, sampler, steps).timesteps[0]) == 999
    leading = int(make_sampler(config, sampler, 100, timestep_spacing="leading").timesteps[0])
    assert leading == 990 if sampler in ("ddpm", "ddim") else leading < 999  # 990: diffusers' DDIM and DDPM default
    short = dict(make_noise_scheduler(num_train_timesteps=500).config)
    assert int(make_sampler(short, sampler, 10).timesteps[0]) == 499
    with pytest.raises(UserError, match="between 1 and the model's 500 training timesteps"):
        make_sampler(short, sampler, 501)


def test_interpolation_shares_the_per_step_noise_along_the_strip():
    from models.ddpm_unet import build_ddpm_unet

    torch.manual_seed(0)
    unet = build_ddpm_unet("tiny", 16)
    config = dict(make_noise_scheduler().config)
    same_start = torch.randn(1, 3, 16, 16).expand(3, -1, -1, -1).contiguous()
    shared = sample_ddpm(unet, config, steps=4, sampler="ddpm", noise=same_start, shared_step_noise=True)
    independent = sample_ddpm(unet, config, steps=4, sampler="ddpm", noise=same_start)
    # Same start and same per-step noise: the same image (measured: identical). Fresh noise per image differs by > 0.1.
    torch.testing.assert_close(shared[1:], shared[:1].expand(2, -1, -1, -1), atol=1e-4, rtol=0)
    assert (independent[1] - independent[0]).abs().max() > 0.1
    # The strip does not depend on how it is batched: the same noise per step in every batch. Batch 1 against batch 3
    # differs only by convolution rounding (measured 1.1e-5), far below the > 0.1 that different noise makes.
    one_by_one = sample_ddpm(unet, config, steps=4, sampler="ddpm", noise=same_start, shared_step_noise=True, batch_size=1)
    torch.testing.assert_close(one_by_one, shared, atol=1e-3, rtol=0)


def test_eta_is_a_ddim_setting():
    oracle = OracleNoise(torch.zeros(1, 3, 4, 4), make_noise_scheduler().alphas_cumprod)
    config = dict(make_noise_scheduler().config)
    with pytest.raises(ValueError, match="ddim sampler only"):
        sample_ddpm(oracle, config, num_samples=1, steps=2, sampler="ddpm", eta=0.5)
    with pytest.raises(ValueError, match="between 0 and 1"):
        sample_ddpm(oracle, config, num_samples=1, steps=2, sampler="ddim", eta=1.5)
