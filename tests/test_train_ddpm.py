"""train_ddpm_highres.py and infer.py ddpm end to end on a tiny UNet, 16 px images, in temporary folders."""

import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import infer
import train_ddpm_highres as train
import utils.launch as launch_utils
from models.ddpm_unet import build_ddpm_unet
from tests.launch import run_in_process
from utils.errors import CheckpointError, UserError
from utils.training import BestMetric

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--dataset", "folder", "--size", "16", "--model", "tiny", "--train_batch_size", "8", "--effective_batch", "8",
        "--lr_warmup_steps", "2", "--num_samples", "4", "--sample_steps", "3", "--quick_steps", "2", "--device", "cpu",
        "--report_to", "none"]

# Same code on the same weights in one process, saved once as PNG: uint8 rounding of values that can differ by ~1e-7
# after a reload (tests/test_seesr_model.py) may flip a level; one level is the tolerance (measured 0 at 1 and 2
# threads), a wrong model is tens of levels away.
LEVEL = 1


def run_training(demo_images, output_dir, *extra):
    args = train.parse_args(TINY + ["--data_dir", str(demo_images), "--output_dir", str(output_dir), *extra])
    return train.main(args)


@pytest.fixture(scope="module")
def trained(demo_images, tmp_path_factory):
    output = tmp_path_factory.mktemp("ddpm_run")
    result = run_training(demo_images, output, "--epochs", "2", "--save_every", "1", "--sample_every", "2", "--quick_every", "1")
    return output, result


def test_tiny_run_writes_every_file_the_spec_lists(trained):
    output, result = trained
    files = {str(p.relative_to(output)) for p in output.rglob("*") if p.is_file()}
    name = "folder_16x16"
    assert files == {
        f"{name}/ddpm_best.pt", f"{name}/ddpm_final.pt", f"{name}/ddpm_last.pt",
        f"{name}/ddpm_epoch_1.pt", f"{name}/ddpm_epoch_2.pt", f"{name}/args.yaml", f"{name}/train.log",
        f"samples/{name}/epoch_2_samples.png", f"samples/{name}/loss_curve_epoch_2.png",
        f"training_progress/{name}/quick_epoch_1.png", f"training_progress/{name}/quick_epoch_2.png",
    }
    assert result["step"] == 2 * 3  # 24 images, batches of 8
    checkpoint = torch.load(output / name / "ddpm_final.pt", weights_only=True)
    assert checkpoint["kind"] == "ddpm" and checkpoint["epoch"] == 2 and checkpoint["step"] == 6
    assert checkpoint["config"]["size"] == 16 and checkpoint["batch_plan"] == [8, 1, 1]
    assert checkpoint["config"]["learning_rate"] == 1e-3 and checkpoint["config"]["model"] == "tiny"  # resolved values
    assert "given_flags" not in checkpoint["config"]
    assert checkpoint["scheduler_config"]["beta_end"] == 0.02
    assert set(checkpoint["ema"]["weights"]) == {n for n in checkpoint["model"] if "weight" in n or "bias" in n}
    assert len(checkpoint["loss_history"]) == 2 and all(np.isfinite(checkpoint["loss_history"]))
    log = (output / name / "train.log").read_text()
    assert "batch 8 x accumulation 1 = effective 8 on CPU" in log


def test_resume_latest_continues_the_same_run(demo_images, tmp_path):
    straight = run_training(demo_images, tmp_path / "straight", "--epochs", "3", "--sample_every", "5", "--quick_every", "0")
    run_training(demo_images, tmp_path / "paused", "--epochs", "2", "--sample_every", "1", "--quick_every", "1")
    resumed = run_training(demo_images, tmp_path / "paused", "--epochs", "3", "--resume_from_checkpoint", "latest",
                           "--sample_every", "5", "--quick_every", "0")
    assert resumed["step"] == straight["step"] == 9
    # Same data order, noise and optimiser state: the losses continue exactly.
    np.testing.assert_allclose(resumed["history"], straight["history"], rtol=1e-6)
    a = torch.load(tmp_path / "straight/folder_16x16/ddpm_final.pt", weights_only=True)
    b = torch.load(tmp_path / "paused/folder_16x16/ddpm_final.pt", weights_only=True)
    for name, tensor in a["ema"]["weights"].items():
        torch.testing.assert_close(b["ema"]["weights"][name], tensor, rtol=1e-5, atol=1e-6)


def test_resume_from_the_checkpoint_alone_keeps_every_setting(demo_images, tmp_path):
    """A bug once: a resume without the flags repeated fell back to the default warm-up (5000 steps),
    clipping and effective batch. Here the run uses none of the defaults; the resume names only the file."""
    flags = ["--dataset", "folder", "--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--size", "16",
             "--model", "tiny", "--batch_size", "4", "--effective_batch", "8", "--warmup_steps", "3", "--grad_clip", "0.05",
             "--lr", "2e-3", "--ema_decay", "0.99", "--seed", "7", "--epochs", "3", "--save_every", "1", "--sample_every", "5",
             "--quick_every", "0", "--num_samples", "2", "--device", "cpu", "--report_to", "none"]
    straight = train.main(train.parse_args(flags))
    run = tmp_path / "folder_16x16"
    final = torch.load(run / "ddpm_final.pt", weights_only=True)
    assert final["batch_plan"] == [4, 2, 1] and final["step"] == 9  # 24 images: 6 batches of 4, accumulation 2
    resumed = train.main(train.parse_args(["--resume_from_checkpoint", str(run / "ddpm_epoch_1.pt"), "--device", "cpu"]))
    config = resumed["config"]
    inherited = (config.lr_warmup_steps, config.max_grad_norm, config.effective_batch, config.learning_rate, config.seed)
    assert inherited == (3, 0.05, 8, 2e-3, 7)
    assert resumed["step"] == straight["step"] == 9
    np.testing.assert_allclose(resumed["history"], straight["history"], rtol=1e-6)  # same LR, batches and noise
    again = torch.load(run / "ddpm_final.pt", weights_only=True)
    assert again["optimizer"]["param_groups"][0]["lr"] == final["optimizer"]["param_groups"][0]["lr"] == 2e-3
    for name, tensor in final["model"].items():
        torch.testing.assert_close(again["model"][name], tensor, rtol=1e-5, atol=1e-6)
    # A rate given with the resume is the rate trained with (the optimiser and schedule states carry 2e-3).
    changed = train.main(train.parse_args(["--resume_from_checkpoint", str(run / "ddpm_epoch_1.pt"), "--device", "cpu", "--lr", "5e-4"]))
    groups = torch.load(run / "ddpm_final.pt", weights_only=True)["optimizer"]["param_groups"]
    assert changed["config"].learning_rate == groups[0]["lr"] == groups[0]["initial_lr"] == 5e-4  # warm-up over by step 3
    assert "learning rate 0.002 -> 0.0005" in (run / "train.log").read_text()


def test_a_step_checkpoint_resumes_within_the_epoch(demo_images, tmp_path, monkeypatch):
    """--checkpointing_steps rewrites ddpm_last.pt within an epoch; a run killed there continues at the next batch."""
    common = ["--epochs", "2", "--sample_every", "5", "--quick_every", "0"]
    straight = run_training(demo_images, tmp_path / "straight", *common)
    calls = {"n": 0}
    real_build = train.build_ddpm_training

    def build_dying_at_the_fifth_batch(*args, **kwargs):
        parts = real_build(*args, **kwargs)
        real_loss = parts.objective

        def dies_at_the_fifth_batch(*loss_args, **loss_kwargs):
            calls["n"] += 1
            if calls["n"] == 5:  # epoch 2, second batch; the step checkpoint after step 4 is on disk
                raise KeyboardInterrupt
            return real_loss(*loss_args, **loss_kwargs)

        parts.objective = dies_at_the_fifth_batch
        return parts

    monkeypatch.setattr(train, "build_ddpm_training", build_dying_at_the_fifth_batch)
    with pytest.raises(KeyboardInterrupt):
        run_training(demo_images, tmp_path / "killed", *common, "--checkpointing_steps", "2")
    last = torch.load(tmp_path / "killed/folder_16x16/ddpm_last.pt", weights_only=True)
    assert (last["epoch"], last["step"], last["batches_done"]) == (1, 4, 1)
    assert last["model_preset"] == "tiny"  # the registry key the UNet was built from
    monkeypatch.setattr(train, "build_ddpm_training", real_build)
    resumed = run_training(demo_images, tmp_path / "killed", *common, "--resume_from_checkpoint", "latest")
    assert resumed["step"] == straight["step"] == 6
    np.testing.assert_allclose(resumed["history"], straight["history"], rtol=1e-6)


def test_resume_with_another_size_is_refused(trained, demo_images, tmp_path):
    output, _ = trained
    checkpoint = output / "folder_16x16" / "ddpm_final.pt"
    args = train.parse_args(TINY + ["--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--resume", str(checkpoint),
                                    "--size", "32"])
    with pytest.raises(CheckpointError, match="was trained with --size 16, not 32; resume without --size"):
        train.main(args)


def test_best_checkpoint_follows_the_smoothed_loss():
    losses = [1.0, 0.9, 0.5, 0.9, 0.8, 0.7, 0.6]  # epoch 3 is a lucky low; the run keeps improving after it
    raw, smoothed = BestMetric("min"), BestMetric("min", smoothing=train.BEST_LOSS_SMOOTHING)
    assert [raw.update(v, e) for e, v in enumerate(losses, start=1)][-1] is False and raw.epoch == 3
    assert [smoothed.update(v, e) for e, v in enumerate(losses, start=1)][-1] is True and smoothed.epoch == 7
    restored = BestMetric("min", smoothing=0.9)
    restored.load_state_dict(smoothed.state_dict())  # a resumed run keeps the average
    assert restored.update(0.65, 8) == smoothed.update(0.65, 8)


def test_size_96_uses_the_64_px_network(tmp_path):
    args = train.parse_args(["--dataset", "imagenet", "--size", "96"])
    config = train.resolve_config(args, None, "")
    assert config.model == "64" and config.learning_rate == 1e-4
    unet = build_ddpm_unet(config.model, 96, dropout=0.2)
    assert unet.config.sample_size == 96 and unet.config.dropout == 0.2


def test_inference_reproduces_the_training_sample_grid(trained, tmp_path):
    output, _ = trained
    out = tmp_path / "samples.png"
    infer.main(infer.parse_args(["ddpm", "--model", str(output / "folder_16x16/ddpm_final.pt"), "--samples", "4",
                                 "--steps", "3", "--seed", "42", "--device", "cpu", "--output", str(out)]))
    training_grid = np.asarray(Image.open(output / "samples/folder_16x16/epoch_2_samples.png"))
    # The training loop's EMA model and the one reloaded from ddpm_final.pt: one uint8 level (see LEVEL), measured 0.
    assert np.abs(np.asarray(Image.open(out)).astype(np.int16) - training_grid).max() <= LEVEL


def grid_tiles(path, rows, columns, side=16, padding=2):
    """The ``rows x columns`` tiles of a saved grid as uint8 ``[rows, columns, side, side, 3]``; row labels sit
    left of the tiles (their width is what is left over), captions below."""
    pixels = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
    left = pixels.shape[1] - (columns * (side + padding) + padding)
    cell = side + padding
    return np.stack([
        np.stack([pixels[padding + r * cell : padding + r * cell + side, left + padding + c * cell : left + padding + c * cell + side]
                  for c in range(columns)])
        for r in range(rows)
    ])


def expected_tiles(unet, scheduler_config, count, **kwargs):
    """What sample_ddpm gives, as the uint8 tiles a grid holds."""
    from models.ddpm_sampling import sample_ddpm
    from utils.images import to_uint8

    images = sample_ddpm(unet, scheduler_config, count, **kwargs)
    return to_uint8(images).permute(0, 2, 3, 1).numpy().astype(np.int16)




def test_interpolation_and_comparison(trained, tmp_path):
    from models.ddpm_sampling import interpolation_noise, load_ddpm_for_sampling

    output, _ = trained
    run = output / "folder_16x16"
    strip = infer.main(infer.parse_args(["ddpm", "--model", str(run / "ddpm_best.pt"), "--interpolate", "--frames", "5",
                                         "--steps", "2", "--device", "cpu", "--output", str(tmp_path / "strip.png")]))
    image = Image.open(strip)
    assert image.width == 5 * 18 + 2 and image.height > 18  # five 16 px tiles with padding, captions below
    unet, scheduler_config, _ = load_ddpm_for_sampling(run / "ddpm_best.pt")
    # The strip is the best checkpoint's EMA model denoising (the default sampler, dpmsolver++) the slerp of seed 0's two
    # noises, one per-step noise.
    expected = expected_tiles(unet, scheduler_config, 5, steps=2, sampler="dpmsolver++", seed=0,
                              noise=interpolation_noise(3, 16, 5, 0), shared_step_noise=True)
    tiles = grid_tiles(strip, 1, 5)[0]
    assert np.abs(tiles - expected).max() <= LEVEL
    assert np.abs(tiles[0] - tiles[-1]).mean() > 10  # the two ends are different images (measured 116 levels)

    checkpoints = [run / "ddpm_epoch_1.pt", run / "ddpm_epoch_2.pt"]
    grid = infer.main(infer.parse_args(["ddpm", "--compare", *map(str, checkpoints), "--samples", "3", "--steps", "2",
                                        "--device", "cpu", "--output", str(tmp_path / "cmp.png")]))
    pixels = np.asarray(Image.open(grid))
    assert pixels.shape[0] == 2 * 18 + 2  # one row per checkpoint
    assert pixels.shape[1] > 3 * 18 + 2  # row labels to the left
    rows = grid_tiles(grid, 2, 3)
    for row, checkpoint in zip(rows, checkpoints):  # each row: its own checkpoint, the same seed
        unet, scheduler_config, _ = load_ddpm_for_sampling(checkpoint)
        assert np.abs(row - expected_tiles(unet, scheduler_config, 3, steps=2, sampler="dpmsolver++", seed=0)).max() <= LEVEL
    assert np.abs(rows[0] - rows[1]).mean() > 4  # two epochs apart: different images (measured 40 levels)


@pytest.mark.parametrize("serialization", ["safetensors", "bin"])
def test_inference_from_a_diffusers_ddpm_folder(tmp_path, serialization):
    """The folder's weights and schedule are the ones sampled: the grid equals sample_ddpm on the model saved there,
    and a folder with other weights gives other images."""
    from diffusers import DDPMScheduler, UNet2DModel

    from models.ddpm_unet import ddpm_unet_config

    grids, unets = [], []
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear")
    for seed in (0, 1):
        # Laid out like google/ddpm-cifar10-32: config.json, weights and scheduler_config.json side by side.
        folder = tmp_path / f"ddpm-tiny-16-{seed}"
        torch.manual_seed(seed)
        unet = UNet2DModel(**ddpm_unet_config("tiny", 16))
        unet.save_pretrained(folder, safe_serialization=serialization == "safetensors")
        scheduler.save_pretrained(folder)
        out = infer.main(infer.parse_args(["ddpm", "--model", str(folder), "--samples", "4", "--steps", "2",
                                           "--sampler", "ddpm", "--device", "cpu", "--output", str(tmp_path / f"s{seed}.png")]))
        assert Image.open(out).size == (2 * 18 + 2, 2 * 18 + 2)
        grids.append(grid_tiles(out, 2, 2).reshape(4, 16, 16, 3))
        unets.append(unet.eval())
    expected = expected_tiles(unets[0], dict(scheduler.config), 4, steps=2, sampler="ddpm", seed=0)
    assert np.abs(grids[0] - expected).max() <= LEVEL
    assert np.abs(grids[0] - grids[1]).mean() > 3  # measured 36 levels


def assert_one_line_error(result, *fragments):
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:], result.stderr  # one error line, the last (progress bars may precede it)
    for fragment in fragments:
        assert fragment in errors[0]


def assert_one_line_error_in_process(capsys, program_main, argv, *fragments):
    """The same contract through utils.errors.run_cli in this process (what ``__main__`` runs), without paying an
    interpreter start-up per case; one real entry point per program runs as ``__main__`` (tests/launch.run_in_process)."""
    from utils.errors import run_cli as run_in_cli

    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        run_in_cli(lambda: program_main(argv))
    captured = capsys.readouterr()
    assert_one_line_error(subprocess.CompletedProcess(argv, stop.value.code, captured.out, captured.err), *fragments)


def test_bad_input_is_one_line_and_a_nonzero_exit(tmp_path, capsys):
    broken = tmp_path / "broken"
    broken.mkdir()
    for index in range(8):
        Image.new("RGB", (16, 16)).save(broken / f"{index}.png")
    (broken / "3.png").write_bytes(b"truncated")
    train_main = lambda argv: train.main(train.parse_args(argv))  # noqa: E731
    assert_one_line_error_in_process(capsys, train_main, [*TINY, "--data_dir", str(broken), "--output_dir", str(tmp_path / "o"),
                                                          "--epochs", "1", "--quick_every", "0"], "Cannot read image", "3.png")
    assert_one_line_error_in_process(capsys, train_main, [*TINY, "--data_dir", str(tmp_path / "missing"), "--output_dir",
                                                          str(tmp_path / "o")], "missing does not exist")
    wrong = tmp_path / "wrong.pt"
    torch.save({"kind": "phaseformer", "model": {}}, wrong)
    infer_main = lambda argv: infer.main(infer.parse_args(argv))  # noqa: E731
    assert_one_line_error_in_process(capsys, infer_main, ["ddpm", "--model", str(wrong), "--device", "cpu"],
                                     "is a 'phaseformer' checkpoint", "'ddpm'")


def test_unknown_dataset_and_help(capsys):
    result = run_in_process("train_ddpm_highres.py", "--dataset", "mnist")  # the real entry point, once
    assert_one_line_error(result, "invalid choice: 'mnist'", "see train_ddpm_highres.py --help")
    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert stop.value.code == 0
    for flag in ("--dataset", "--size", "--no-amp", "--no-compile", "--effective_batch", "--resume_from_checkpoint", "--resume",
                 "--quick_every", "--dropout", "--checkpointing_minutes", "--report_to", "--warmup_steps", "[alias:"):
        assert flag in help_text


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_compiled_training_with_the_batch_probe_on_cuda(demo_images, tmp_path, monkeypatch):
    """The CUDA defaults' three paths, each observed where it acts: the UNet's layers compute in fp16 (autocast), the
    UNet goes through torch.compile, and without --train_batch_size the batch comes from the memory probe."""
    dtypes, compiled = [], []
    real_build, real_compile = train.build_ddpm_training, torch.compile

    def build_watched(*args, **kwargs):
        parts = real_build(*args, **kwargs)
        parts.model.conv_out.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
        return parts

    def compile_watched(model, *args, **kwargs):
        compiled.append(type(model).__name__)
        return real_compile(model, *args, **kwargs)

    monkeypatch.setattr(train, "build_ddpm_training", build_watched)
    monkeypatch.setattr(torch, "compile", compile_watched)
    flags = ["--dataset", "folder", "--size", "16", "--model", "tiny", "--effective_batch", "8", "--lr_warmup_steps", "2",
             "--num_samples", "4", "--sample_steps", "3", "--report_to", "none"]  # TINY without --train_batch_size, --device
    result = train.main(train.parse_args([*flags, "--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--device", "cuda",
                                          "--mixed_precision", "fp16", "--epochs", "1", "--quick_every", "0"]))
    assert dtypes and all(dtype == torch.float16 for dtype in dtypes)
    assert compiled == ["UNet2DModel"]
    assert "(largest that fits: 8)" in (tmp_path / "folder_16x16" / "train.log").read_text()  # probed up to the effective 8
    checkpoint = torch.load(tmp_path / "folder_16x16" / "ddpm_final.pt", weights_only=True)
    assert all(value.dtype == torch.float32 for value in checkpoint["model"].values())  # fp32 master weights
    assert all(np.isfinite(result["history"]))


# Two processes: the standalone form (torchrun --standalone --nproc_per_node 2) runs in the Kaggle cells of docs/ddpm.md
# (tests/test_kaggle_cells.py), the two-node form in tests/test_cli.py and --num_processes 2 below.


def test_num_processes_is_accepted_and_starts_the_processes_only_from_launch():
    assert train.parse_args(TINY).num_processes == 1
    assert train.parse_args([*TINY, "--num_processes", "2"]).num_processes == 2
    assert train.parse_args([*TINY, "--devices", "3"]).num_processes == 3
    with pytest.raises(UserError, match="--num_processes 2 starts 2 processes from the command line"):
        train.main(train.parse_args([*TINY, "--num_processes", "2"]))


def test_num_processes_checks_the_inputs_in_the_parent(demo_images, tmp_path, monkeypatch):
    """A missing data folder under --num_processes 2 is one error before any process starts; valid inputs start
    train_ddpm_highres.py itself."""
    commands = []

    def processes(command, env):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch_utils.subprocess, "run", processes)
    with pytest.raises(UserError, match="missing does not exist"):
        train.launch([*TINY, "--data_dir", str(tmp_path / "missing"), "--output_dir", str(tmp_path / "a"), "--num_processes", "2"])
    assert not commands
    argv = [*TINY, "--data_dir", str(demo_images), "--output_dir", str(tmp_path / "b"), "--num_processes", "2"]
    train.launch(argv)
    assert [command[3:] for command in commands] == [["--standalone", "--nproc_per_node=2", str(ROOT / "train_ddpm_highres.py"),
                                                      *argv]]


def test_num_processes_2_relaunches_this_script_as_two_processes(demo_images, tmp_path, monkeypatch, capsys):
    """--num_processes 2 outside a launcher re-runs this script through torch.distributed.run with the same flags.

    The two-process training itself (one DDP job over gloo, both RNG states and the plan in the checkpoint) is run
    for real by tests/test_cli.py's two-node launch; utils.launch's error forwarding by test_train_dit_user.py.
    """
    import utils.launch as launch_utils

    started = []

    def fake_run(command, **kwargs):
        started.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch_utils.subprocess, "run", fake_run)
    argv = [*TINY, "--data_dir", str(demo_images), "--output_dir", str(tmp_path), "--epochs", "1", "--num_processes", "2"]
    train.launch(argv)
    assert len(started) == 1
    command = started[0]
    assert "--standalone" in command and "--nproc_per_node=2" in command
    assert command[command.index("--nproc_per_node=2") + 1] == str(Path(train.__file__).resolve())
    assert command[-len(argv):] == argv
    assert "starting 2 CPU processes (gloo) with torch.distributed.run" in capsys.readouterr().out
    assert not list(tmp_path.rglob("*.pt"))  # the parent only checked the inputs and launched


def test_a_resumed_plan_keeps_its_effective_batch_on_another_number_of_processes():
    """Two GPUs in one session, one in the next: the batch stays, the accumulation doubles (and old plans stay)."""
    import logging
    from types import SimpleNamespace

    from train_ddpm_highres import plan_batch_size

    one_process = SimpleNamespace(device=torch.device("cpu"), num_processes=1)
    config = SimpleNamespace(effective_batch=32, train_batch_size=None)  # the new default must not win over the run's
    logger = logging.getLogger("test")
    plan = plan_batch_size(config, None, None, one_process, logger, [2, 1, 2])
    assert (plan.batch_size, plan.accumulation, plan.effective) == (2, 2, 4)
    plan = plan_batch_size(config, None, None, one_process, logger, [2, 1])  # a checkpoint without a process count
    assert (plan.batch_size, plan.accumulation, plan.effective) == (2, 1, 2)
