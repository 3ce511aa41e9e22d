"""Nothing silent, nothing half-written: bad input to every entry point is one ``error:`` line, early.

One table per entry point, rows ``(argv, fragment)``: the command run in-process through ``utils.errors.run_cli``
(as its ``__main__`` does) must exit with status 2 and print exactly one line, ``error: ...`` holding the fragment,
which names the flag or the file. ``{file}`` in an argv stands for an existing ordinary file, ``{dir}`` for an empty
folder, ``{text_pt}`` for a text file named ``.pt``. Where the failure must also leave nothing behind, the test says so.
"""

from __future__ import annotations

import importlib
import json
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from utils.errors import run_cli

ROOT = Path(__file__).resolve().parents[1]


def run_entry(module_name: str, argv: list[str], capsys) -> tuple[int, list[str]]:
    """Run an entry point as ``python <script> argv`` would, in this process: (exit status, stderr lines)."""
    module = importlib.import_module(module_name)
    if module_name == "train_dit_user":
        call = lambda: sys.exit(module.launch(argv))  # noqa: E731 - its __main__ runs launch()
    else:
        call = lambda: module.main(module.parse_args(argv))  # noqa: E731
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        run_cli(call)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    return exit_.value.code, lines


@pytest.fixture
def places(tmp_path):
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    text_pt = tmp_path / "weights.pt"
    text_pt.write_text("this is not a checkpoint\n")
    empty = tmp_path / "empty"
    empty.mkdir()
    return {"file": str(file), "dir": str(empty), "text_pt": str(text_pt), "tmp": tmp_path}


def assert_one_error_line(code: int, lines: list[str], fragment: str) -> None:
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert fragment in lines[0], lines[0]


def _fill(argv: list[str], places: dict) -> list[str]:
    return [arg.format(**places) for arg in argv]


TRAINERS = {
    "train_ddpm_highres": [
        (["--size", "-32"], "--size: must be at least 1, got -32"),
        (["--size", "0"], "--size: must be at least 1, got 0"),
        (["--ema_decay", "2"], "--ema_decay: must be in [0, 1), got 2"),
        (["--dropout", "1"], "--dropout: must be in [0, 1)"),
        (["--output_dir", "{file}"], "--output_dir: {file} is a file; pass a folder to write into"),
        (["--output_dir", "{file}/run"], "--output_dir: {file}/run goes through the file {file}"),
        (["--train_batch_size", "4", "--effective_batch", "6"],
         "--effective_batch 6 is not a multiple of --train_batch_size 4; pass --effective_batch 4 or 8"),
        (["--config", "configs/ddpm_demo.yaml", "--effective_batch", "7"],
         "--effective_batch 7 is not a multiple of --train_batch_size 16; pass --effective_batch 16"),
        (["--no-amp", "--mixed_precision", "bf16"], "--mixed_precision bf16 contradicts the precision given before it (no)"),
        (["--mixed_precision", "fp16", "--no-amp"], "--no-amp contradicts the precision given before it (fp16)"),
        (["--seed", "-1"], "--seed: must be a seed between 0 and"),
        (["--learning_rate", "-1"], "--learning_rate must be positive"),
    ],
    "train_phaseformer": [
        (["--dataset_path", "{dir}", "--beta1", "1.5"], "--beta1: must be in [0, 1), got 1.5"),
        (["--dataset_path", "{dir}", "--loss_weights_lr", "-1"], "--loss_weights_lr: must be at least 0, got -1"),
        (["--dataset_path", "{dir}", "--output_dir", "{file}"], "--output_dir: {file} is a file"),
        (["--dataset_path", "{dir}", "--crop_border", "128"], "--crop_border 128 leaves nothing of the 256 px test images"),
        (["--dataset_path", "{dir}", "--test_split", "-1"], "--test_split: must be a count of test pairs"),
    ],
    "train_dit_user": [
        (["--latent_dir", "{dir}", "--adam_beta2", "1.5"], "--adam_beta2: must be in [0, 1), got 1.5"),
        (["--latent_dir", "{dir}", "--weight_decay", "-1"], "--weight_decay: must be at least 0, got -1"),
        (["--latent_dir", "{dir}", "--ema_decay", "1.5"], "--ema_decay: must be in [0, 1), got 1.5"),
        (["--latent_dir", "{dir}", "--guidance_scale", "1e30"], "--guidance_scale: must be between 0 and 100, got 1e+30"),
        (["--latent_dir", "{dir}", "--output_dir", "{file}"], "--output_dir: {file} is a file"),
    ],
    "train_seesr_timestep": [
        (["--pretrained_model_path", "{dir}", "--root_folders", "{dir}", "--resolution", "0"], "--resolution: must be at least 16"),
        (["--pretrained_model_path", "{dir}", "--root_folders", "{dir}", "--output_dir", "{file}"], "--output_dir: {file} is a file"),
        (["--pretrained_model_path", "{dir}", "--root_folders", "{dir}", "--adam_beta2", "1.5"], "--adam_beta2: must be in [0, 1)"),
        (["--pretrained_model_path", "{dir}", "--root_folders", "{dir}", "--validation_guidance_scale", "1e30"],
         "--validation_guidance_scale: must be between 0 and 100"),
    ],
}


@pytest.mark.parametrize("module_name,argv,fragment",
                         [(module, argv, fragment) for module, rows in TRAINERS.items() for argv, fragment in rows],
                         ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_trainers_refuse_bad_flags_in_one_line(module_name, argv, fragment, places, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    code, lines = run_entry(module_name, _fill(argv, places), capsys)
    assert_one_error_line(code, lines, fragment.format(**places))


def test_a_sd2_path_that_is_a_file_says_so():
    from models.seesr import check_sd2_folder
    from utils.errors import UserError

    with pytest.raises(UserError, match="--pretrained_model_path .* is a file, not a folder"):
        check_sd2_folder(__file__)


INFER = [
    (["seesr", "--pretrained_model_path", "p", "--seesr_model_path", "s", "--image_path", "i", "--output_dir", "o",
      "--vae_encoder_tiled_size", "1"], "--vae_encoder_tiled_size: must be 0 (off) or at least 64, got 1"),
    (["seesr", "--pretrained_model_path", "p", "--seesr_model_path", "s", "--image_path", "i", "--output_dir", "o",
      "--vae_decoder_tiled_size", "1"], "--vae_decoder_tiled_size: must be 0 (off) or at least 8, got 1"),
    (["seesr", "--pretrained_model_path", "p", "--seesr_model_path", "s", "--image_path", "i", "--output_dir", "o",
      "--guidance_scale", "1e30"], "--guidance_scale: must be between 0 and 100"),
    (["user", "--dit_checkpoint", "c", "--guidance_scale", "1e30"], "--guidance_scale: must be between 0 and 100, got 1e+30"),
    # --input is checked before the checkpoint is read (the checkpoint here does not exist either)
    (["phaseformer", "--checkpoint", "{tmp}/none.pth", "--input", "{tmp}/no_input", "--output_dir", "{tmp}/out"],
     "--input {tmp}/no_input does not exist"),
]


@pytest.mark.parametrize("argv,fragment", INFER,
                         ids=lambda value: " ".join(value[:2]) + " " + value[-1] if isinstance(value, list) else None)
def test_infer_refuses_bad_flags_in_one_line(argv, fragment, places, capsys):
    code, lines = run_entry("infer", _fill(argv, places), capsys)
    assert_one_error_line(code, lines, fragment.format(**places))


def _write_image(path: Path, size=(24, 24), mode="RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    seed = zlib.crc32(str(path).encode())  # distinct pictures: duplicates across splits are refused
    array = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(array.squeeze(-1) if channels == 1 else array, mode).save(path)
    return path


def test_phaseformer_leaves_no_output_folders_when_an_input_is_truncated(tmp_path, capsys):
    from models.phaseformer import build_phaseformer

    weights = tmp_path / "weights.pth"
    torch.save(build_phaseformer("phaseformer_tiny").state_dict(), weights)
    inputs = tmp_path / "input"
    _write_image(inputs / "a.png")
    broken = _write_image(inputs / "b.png")
    broken.write_bytes(broken.read_bytes()[:60])
    code, lines = run_entry("infer", ["phaseformer", "--checkpoint", str(weights), "--input", str(inputs), "--output_dir",
                                      str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert_one_error_line(code, lines, f"Cannot read image {broken}")
    assert not (tmp_path / "out" / "L").exists() and not (tmp_path / "out" / "H").exists()


def test_user_unet_path_of_a_controlnet_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "controlnet"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"_class_name": "ControlNetModel", "in_channels": 4}))
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"\x80")
    code, lines = run_entry("infer", ["user", "--unet_path", str(folder), "--num_users", "2", "--vavae_path", str(vae),
                                      "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, lines, f"--unet_path {folder} holds a diffusers ControlNetModel, not a UNet2DConditionModel")


def test_a_text_file_named_pt_is_no_weights_file(places):
    from utils.checkpoint import check_weights_file
    from utils.errors import CheckpointError

    with pytest.raises(CheckpointError, match=r"--vavae_path .*weights.pt is not a torch checkpoint \(nor a .safetensors file\)"):
        check_weights_file(places["text_pt"], "--vavae_path", "the VA-VAE weights file")
    fake = Path(places["tmp"]) / "w.safetensors"
    fake.write_text("hello")
    with pytest.raises(CheckpointError, match="is not a readable .safetensors file"):
        check_weights_file(fake, "--vavae_path", "the VA-VAE weights file")


def test_a_refused_training_run_leaves_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    empty = tmp_path / "no_images"
    empty.mkdir()
    output = tmp_path / "checkpoints"
    code, lines = run_entry("train_ddpm_highres", [
        "--dataset", "folder", "--data_dir", str(empty), "--size", "16", "--model", "tiny", "--no-compile", "--device", "cpu",
        "--output_dir", str(output), "--report_to", "none"], capsys)
    assert code == 2 and len(lines) == 1 and str(empty) in lines[0], lines
    assert not output.exists()


def _user_folders(root: Path, users=2, per_user=3) -> Path:
    for user in range(1, users + 1):
        for index in range(per_user):
            _write_image(root / f"ID_{user}" / f"rec{index}" / "img.png", (32, 32))
    return root


SCRIPTS = [
    ("scripts.extract_features", ["--data_dir", "{dir}", "--vavae_path", "v", "--output_path", "{file}"],
     "--output_path/--output_dir: {file} is a file"),
    ("scripts.extract_features", ["--data_dir", "{dir}", "--vavae_path", "v", "--output_path", "o", "--num_users", "0"],
     "--num_users: must be at least 1, got 0"),
    ("scripts.eval_sr", ["--results", "{dir}", "--gt", "{dir}", "--csv", "{file}/metrics.csv"],
     "--csv: {file}/metrics.csv goes through the file {file}"),
    ("scripts.eval_user_generation", ["--data_dir", "{dir}", "--output_dir", "{file}"], "--output_dir: {file} is a file"),
    ("scripts.eval_generation", ["--samples", "{dir}", "--out", "{dir}"], "--out: {dir} is a folder"),
    ("scripts.run_user_pipeline", ["--data_dir", "{dir}", "--vavae_path", "v", "--output_dir", "o", "--guidance_scale", "-2"],
     "--guidance_scale: must be between 0 and 100, got -2"),
    ("scripts.run_user_pipeline", ["--data_dir", "{dir}", "--vavae_path", "v", "--output_dir", "{file}"],
     "--output_dir: {file} is a file"),
]


@pytest.mark.parametrize("module_name,argv,fragment", SCRIPTS, ids=lambda value: " ".join(value) if isinstance(value, list) else None)
def test_scripts_refuse_bad_flags_in_one_line(module_name, argv, fragment, places, capsys):
    code, lines = run_entry(module_name, _fill(argv, places), capsys)
    assert_one_error_line(code, lines, fragment.format(**places))


def test_eval_sr_checks_the_border_against_every_image_first(tmp_path, capsys):
    _write_image(tmp_path / "sr" / "a.png")
    _write_image(tmp_path / "gt" / "a.png")
    code, lines = run_entry("scripts.eval_sr", ["--results", str(tmp_path / "sr"), "--gt", str(tmp_path / "gt"),
                                                "--crop_border", "1000", "--device", "cpu"], capsys)
    assert_one_error_line(code, lines, f"--crop_border 1000 leaves nothing of {tmp_path / 'sr' / 'a.png'} (24x24)")
    assert not (tmp_path / "sr" / "metrics.csv").exists()


def test_eval_user_generation_checks_the_vae_before_training_a_classifier(tmp_path, places, capsys):
    data = _user_folders(tmp_path / "users")
    output = tmp_path / "report"
    code, lines = run_entry("scripts.eval_user_generation", [
        "--data_dir", str(data), "--output_dir", str(output), "--vavae_path", places["text_pt"], "--vavae_config", "tiny",
        "--val_fraction", "0.4", "--device", "cpu", "--image_size", "32", "--classifier_size", "32"], capsys)
    assert code == 2 and len(lines) == 1 and places["text_pt"] in lines[0], lines
    assert not (output / "classifier.pt").exists()


def test_run_user_pipeline_points_to_the_help_of_the_command_that_owns_the_flag(tmp_path, capsys):
    data = _user_folders(tmp_path / "users")
    vae = tmp_path / "vae.pt"
    vae.write_bytes(b"\x80")
    code, lines = run_entry("scripts.run_user_pipeline", [
        "--data_dir", str(data), "--vavae_path", str(vae), "--output_dir", str(tmp_path / "pipe"), "--device", "cpu",
        "--train_extra", "--cfg_dropout 2"], capsys)
    assert_one_error_line(code, lines, "--cfg_dropout: must be in [0, 1), got 2")
    assert "(see train_dit_user.py --help)" in lines[0]
    assert not (tmp_path / "pipe" / "latent_features").exists()


def test_eval_generation_help_shows_the_command_that_writes_the_sample_folder(capsys):
    module = importlib.import_module("scripts.eval_generation")
    with pytest.raises(SystemExit):
        module.parse_args(["--help"])
    text = capsys.readouterr().out
    assert "infer.py ddpm --model" in text and "--save_images" in text


def test_phaseformer_init_weights_of_another_kind_names_the_flag(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    for split in ("train", "test"):
        for stem in ("a", "b"):
            for side in ("input", "gt"):
                _write_image(tmp_path / "LSUI" / split / side / f"{stem}.png", (32, 32))
    ddpm = tmp_path / "ddpm_last.pt"
    torch.save({"kind": "ddpm", "model": {}}, ddpm)
    code, lines = run_entry("train_phaseformer", [
        "--dataset_path", str(tmp_path / "LSUI"), "--init_weights", str(ddpm), "--model", "phaseformer_tiny", "--no_perceptual",
        "--crop_size", "16", "--eval_size", "16", "--train_batch_size", "2", "--device", "cpu", "--report_to", "none",
        "--output_dir", str(tmp_path / "out")], capsys)
    assert_one_error_line(code, lines, f"{ddpm} is a 'ddpm' checkpoint, but train_phaseformer.py --init_weights needs a 'phaseformer'")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------- diverged weights


def test_a_diverging_ddpm_run_keeps_no_diverged_checkpoint(demo_images, tmp_path, capsys, monkeypatch):
    """The issue's run: the loss stays finite (GroupNorm absorbs the scale) while the weights reach 1e9; the guard stops
    it before any checkpoint is written from them, so what is on disk is from before the blow-up (here: nothing)."""
    monkeypatch.chdir(ROOT)
    output = tmp_path / "run"
    code, lines = run_entry("train_ddpm_highres", [
        "--dataset", "folder", "--data_dir", str(demo_images), "--size", "16", "--model", "tiny", "--train_batch_size", "8",
        "--effective_batch", "8", "--epochs", "2", "--num_samples", "2", "--sample_steps", "2", "--quick_every", "0",
        "--device", "cpu", "--report_to", "none", "--output_dir", str(output), "--checkpointing_steps", "1",
        "--learning_rate", "1e9", "--lr_warmup_steps", "0", "--max_grad_norm", "0"], capsys)
    assert code == 2 and len(lines) == 1 and ("diverged" in lines[0] or "NaN" in lines[0]), lines
    for file in output.rglob("ddpm_*.pt"):
        state = torch.load(file, weights_only=True)
        for weights in (state["model"], state.get("ema", {}).get("weights", {})):
            assert all(torch.isfinite(v).all() and v.abs().max() < 1e3 for v in weights.values() if v.is_floating_point()), file


def test_the_guard_stops_before_diverged_weights_replace_the_last_good_checkpoint(tmp_path):
    from utils.checkpoint import atomic_torch_save
    from utils.errors import UserError
    from utils.training import NonFiniteGuard, check_finite_weights

    class Single:  # what the guard asks of an accelerator on one process
        num_processes = 1

        @staticmethod
        def gather(tensor):
            return tensor

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.GroupNorm(1, 8), torch.nn.Linear(8, 1))
    guard = NonFiniteGuard(torch.device("cpu"), model=model)
    last = tmp_path / "last.pt"
    guard.update(torch.tensor(1.0), 1)
    guard.check(Single)
    atomic_torch_save(model.state_dict(), last)
    with torch.no_grad():  # a learning rate of 1e9 for one step: finite, but a million times the norm
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 1e9)
    guard.update(torch.tensor(3.0), 2)  # the loss is still finite
    with pytest.raises(UserError, match=r"The weights diverged by optimiser step 2: their norm grew from .* \(the limit is 100x\)"):
        guard.check(Single)
    assert torch.load(last, weights_only=True)["0.weight"].abs().max() < 10
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="weights became NaN or infinite by optimiser step 7; nothing was saved"):
        check_finite_weights(model, 7)


def test_no_image_is_written_from_nan_pixels(tmp_path):
    from utils.errors import UserError
    from utils.images import save_grid, tensor_to_pil

    images = torch.zeros(2, 3, 8, 8)
    images[1, 0, 0, 0] = float("nan")
    with pytest.raises(UserError, match="The model produced NaN or infinite pixels, so no image was written"):
        tensor_to_pil(images[1])
    with pytest.raises(UserError, match="NaN or infinite pixels"):
        save_grid(images, tmp_path / "grid.png", nrow=2)
    assert not (tmp_path / "grid.png").exists()


def test_infer_ddpm_refuses_to_write_nan_samples(tmp_path, capsys):
    from diffusers import DDPMScheduler, UNet2DModel

    from models.ddpm_unet import ddpm_unet_config

    folder = tmp_path / "diverged"
    unet = UNet2DModel(**ddpm_unet_config("tiny", 16))
    with torch.no_grad():
        unet.conv_out.weight.fill_(float("nan"))
    unet.save_pretrained(folder)
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear").save_pretrained(folder)
    output = tmp_path / "samples"
    code, lines = run_entry("infer", ["ddpm", "--model", str(folder), "--num_samples", "2", "--num_inference_steps", "2",
                                      "--save_images", "--output_dir", str(output), "--device", "cpu"], capsys)
    assert_one_error_line(code, lines, "The model produced NaN or infinite pixels, so no image was written")
    assert not list(output.rglob("*.png")) if output.exists() else True


# ------------------------------------------------------------------------ `latest` with the output folder alone


def test_ddpm_latest_alone_finds_and_continues_a_killed_run(demo_images, tmp_path, monkeypatch):
    import shutil

    import train_ddpm_highres as train
    from utils.errors import CheckpointError

    monkeypatch.chdir(ROOT)
    data = tmp_path / "images"
    shutil.copytree(demo_images, data)
    output = tmp_path / "checkpoints"
    finish_epoch = train.end_of_epoch

    def killed_after_the_first_epoch(run, done, *rest):
        finish_epoch(run, done, *rest)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "end_of_epoch", killed_after_the_first_epoch)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args([
            "--dataset", "folder", "--data_dir", str(data), "--size", "16", "--model", "tiny", "--train_batch_size", "8",
            "--effective_batch", "8", "--epochs", "2", "--lr_warmup_steps", "2", "--num_samples", "2", "--sample_steps", "2",
            "--quick_every", "0", "--device", "cpu", "--report_to", "none", "--output_dir", str(output)]))
    monkeypatch.setattr(train, "end_of_epoch", finish_epoch)
    run_dir = output / "folder_16x16"
    stale = run_dir / ".ddpm_last.pt.x1y2.tmp"
    stale.write_bytes(b"")  # what a save killed mid-write leaves

    for argv, message in ((["--size", "32"], "was trained with --size 16, not 32"),
                          (["--dropout", "0.2"], "was trained with --dropout 0.0, not 0.2")):
        with pytest.raises(CheckpointError, match=message):
            train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output), *argv]))
    moved = tmp_path / "moved"
    data.rename(moved)
    with pytest.raises(CheckpointError, match=f"--data_dir {data} .* does not exist any more; resume with --data_dir"):
        train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    moved.rename(data)

    result = train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    assert result["paths"]["run"] == run_dir and len(result["history"]) == 2 and result["step"] == 6
    assert not stale.exists() and f"removed {stale}" in (run_dir / "train.log").read_text()


def test_phaseformer_latest_alone_finds_the_run_and_its_data(tmp_path, monkeypatch):
    import train_phaseformer as train
    from data.underwater import build_synthetic_underwater
    from utils.errors import CheckpointError

    monkeypatch.chdir(ROOT)
    data = build_synthetic_underwater(tmp_path / "LSUI", size=16, train_count=4, test_count=2)
    output = tmp_path / "out"
    first = train.main(train.parse_args([
        "--dataset_path", str(data), "--config", str(ROOT / "configs" / "phaseformer_tiny.yaml"), "--crop_size", "16",
        "--eval_size", "16", "--device", "cpu", "--batch_size", "2", "--niter", "1", "--niter_decay", "1", "--stop_epoch", "1",
        "--no_perceptual", "--report_to", "none", "--output_dir", str(output)]))
    assert len(first["history"]) == 1
    moved = tmp_path / "elsewhere"
    data.rename(moved)
    with pytest.raises(CheckpointError, match=f"--dataset_path {data} .* does not exist any more; resume with --dataset_path"):
        train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    moved.rename(data)
    resumed = train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    assert resumed["run_dir"] == first["run_dir"] and len(resumed["history"]) == 2 and resumed["step"] == 2 * first["step"]


def test_dit_latest_alone_continues_a_killed_run_and_takes_latent_dir_from_it(tmp_path, monkeypatch):
    import train_dit_user as train
    from tests.user_pipeline_data import write_tiny_vavae, write_user_folders
    from utils.errors import CheckpointError

    extract = importlib.import_module("scripts.extract_features")
    vavae = write_tiny_vavae(tmp_path / "vavae-tiny.pt")
    data = write_user_folders(tmp_path / "data", [1, 2, 3], 6, pattern="ramp")
    latents = tmp_path / "latents"
    extract.main(extract.parse_args(["--data_dir", str(data), "--vavae_path", str(vavae), "--vavae_config", "tiny",
                                     "--output_path", str(latents), "--image_size", "32", "--val_fraction", "0.2", "--device", "cpu"]))
    output = tmp_path / "run"
    save = train.save_checkpoint_files

    def killed_after_the_first_save(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "save_checkpoint_files", killed_after_the_first_save)
    with pytest.raises(KeyboardInterrupt):
        train.main(train.parse_args(["--latent_dir", str(latents), "--output_dir", str(output), "--model_size", "tiny",
                                     "--batch_size", "6", "--device", "cpu", "--max_epochs", "2", "--preview_every", "0",
                                     "--report_to", "none"]))
    monkeypatch.setattr(train, "save_checkpoint_files", save)
    first_step = torch.load(output / "checkpoints" / "last.ckpt", weights_only=True)["step"]
    latents.rename(tmp_path / "moved")
    with pytest.raises(CheckpointError, match=f"--latent_dir {latents} .* does not exist any more; resume with --latent_dir"):
        train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    (tmp_path / "moved").rename(latents)
    resumed = train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(output)]))
    assert first_step > 0 and resumed["step"] == 2 * first_step

    # infer.py user with a text file named .pt as the VA-VAE: that it is no weights file, not "another VA-VAE"
    text_pt = tmp_path / "vavae.pt"
    text_pt.write_text("not weights\n")
    with pytest.raises(CheckpointError, match=f"--vavae_path {text_pt} is not a torch checkpoint"):
        infer = importlib.import_module("infer")
        infer.main(infer.parse_args(["user", "--dit_checkpoint", str(output / "checkpoints" / "last.ckpt"), "--vavae_path",
                                     str(text_pt), "--vavae_config", "tiny", "--output_dir", str(tmp_path / "images"),
                                     "--device", "cpu"]))
    assert not (tmp_path / "images").exists()
