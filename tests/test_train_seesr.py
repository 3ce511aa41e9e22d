"""train_seesr_timestep.py, infer.py seesr and the SeeSR tools end to end on a tiny SD2-layout folder."""

import csv
import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

import infer
import train_seesr_timestep as train
from models.timestep_adaptive import INJECTORS
from tests.launch import run_in_process
from tests.sd2_tiny import build_tiny_sd2
from utils.errors import CheckpointError, UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]



@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny SD2 folder (light attention: 512 px sampling in seconds), 8 HR images, 2 LR test images."""
    from data.demo_data import build_demo_image_folder

    root = tmp_path_factory.mktemp("seesr")
    sd2 = build_tiny_sd2(root / "preset/models/stable-diffusion-2-base", light_attention=True)
    hr = build_demo_image_folder(root / "HR", size=64, count=8, seed=0)
    first = sorted(hr.rglob("*.png"))[0]
    first.with_suffix(".txt").write_text("cat, grass")
    lr = root / "LR"
    lr.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(lr / "image_001.png")
    Image.fromarray(rng.integers(0, 256, (9, 9, 3), dtype=np.uint8)).save(lr / "image_002.png")
    (lr / "image_001.txt").write_text("a red wall")
    return {"root": root, "sd2": sd2, "hr": hr, "lr": lr}


def tiny_args(workspace, output_dir, *extra, image_attention=False):
    """Our earlier plain-ControlNet runs by default (no RAM); ``image_attention=True`` trains SeeSR proper."""
    plain = [] if image_attention else ["--no_image_cross_attention"]
    return train.parse_args([*plain,
        "--pretrained_model_path", str(workspace["sd2"]), "--train_data_dir", str(workspace["hr"]),
        "--output_dir", str(output_dir), "--resolution", "64", "--train_batch_size", "2",
        "--conditioning_embedding_channels", "4", "8", "8", "8", "--lr_warmup_steps", "0", "--logging_steps", "1",
        "--num_validation_images", "1", "--validation_num_inference_steps", "2", "--device", "cpu", "--seed", "42",
        *extra,
    ])


# Every registered variant; timestep_only with the MLP so both kinds of w(t) are trained.
VARIANTS = {name: ["--injector", name, *{"timestep_only": ["--timestep_weights", "mlp"]}.get(name, [])]
            for name in INJECTORS.names()}


@pytest.fixture(scope="module")
def runs(workspace):
    """Two steps of each variant, a checkpoint every step, only the newest kept."""
    results = {}
    for name, flags in VARIANTS.items():
        output = workspace["root"] / "experience" / name
        results[name] = train.main(tiny_args(
            workspace, output, *flags, "--max_train_steps", "2", "--checkpointing_steps", "1",
            "--checkpoints_total_limit", "1", "--validation_steps", "2",
        ))
    return results


def files_under(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


ACCELERATE_STATE = {"optimizer.bin", "scheduler.bin", "random_states_0.pkl", "training_state.json"}
CONTROLNET_FILES = {"controlnet/config.json", "controlnet/diffusion_pytorch_model.safetensors"}
INJECTOR_FILES = {f"multi_scale_injector/{name}" for name in ("config.json", "model.safetensors", "pytorch_model.bin")}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_checkpoint_layout_keys_and_limit(runs, workspace, name):
    result = runs[name]
    run = workspace["root"] / "experience" / name
    assert result["step"] == 2 and [p.name for p in result["checkpoints"]] == ["checkpoint-2"]  # limit 1 honoured
    assert not (run / "checkpoint-1").exists() and not list(run.glob(".checkpoint-*"))  # no temporary folders left
    assert {"args.yaml", "train.log", "loss_curve.png", "validation/step_000002.png"} <= files_under(run)
    checkpoint = run / "checkpoint-2"
    expected = CONTROLNET_FILES | ACCELERATE_STATE | (set() if name == "baseline" else INJECTOR_FILES)
    assert files_under(checkpoint) == expected  # nothing of the frozen SD2 UNet, VAE or text encoder

    controlnet = load_file(checkpoint / "controlnet/diffusion_pytorch_model.safetensors")
    assert any(key.startswith("controlnet_cond_embedding.") for key in controlnet)
    assert "controlnet_mid_block.weight" in controlnet and not any(key.startswith("up_blocks.") for key in controlnet)
    initial_zero_conv = controlnet["controlnet_mid_block.weight"]
    assert initial_zero_conv.abs().sum() > 0  # trained away from the zero initialisation

    if name == "baseline":
        assert (run / "validation").is_dir() and not list((run / "validation").glob("timestep_weights_*"))
        return
    safetensors_state = load_file(checkpoint / "multi_scale_injector/model.safetensors")
    bin_state = torch.load(checkpoint / "multi_scale_injector/pytorch_model.bin", weights_only=True)
    assert set(bin_state) == set(safetensors_state)
    assert all(torch.equal(bin_state[key], safetensors_state[key]) for key in bin_state)
    if name == "timestep_only":
        assert set(bin_state) == {f"timestep_weights.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
        assert bin_state["timestep_weights.mlp.2.weight"].abs().sum() > 0  # left its zero initialisation
    else:
        assert set(bin_state) == {"scale_weights.weights", "timestep_weights.table"}
        assert bin_state["scale_weights.weights"].shape == (5,)  # 4 levels + mid
        assert bin_state["timestep_weights.table"].shape == (1000, 1)
        assert not torch.equal(bin_state["scale_weights.weights"], torch.ones(5))
        assert (run / "validation/timestep_weights_step_000002.png").is_file()
    log = (run / "train.log").read_text()
    assert "step 2: saved" in log and "removed" in log and "checkpoints_total_limit 1" in log
    assert ("injector s = [" in log) == (name == "timestep_multiscale")  # the w(t) and s summary at validation


def test_report_to_tensorboard_logs_loss_injector_and_images(runs, workspace):
    """--report_to's default (tensorboard, installed here) in the variants' runs: loss and LR every logging step, the
    injector's s and w(t) as scalars, the validation grid and the w(t) figure as images."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = workspace["root"] / "experience/timestep_multiscale"
    events = EventAccumulator(str(run / "logs" / run.name)).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/lr_injector", "injector/s/level0", "injector/s/mid",
            "injector/w/t999", "injector/w/t1"} <= scalars
    assert [e.step for e in events.Scalars("train/loss")] == [1, 2]  # --logging_steps 1
    np.testing.assert_allclose([e.value for e in events.Scalars("train/loss")],
                               [loss for _, loss in runs["timestep_multiscale"]["history"]], rtol=1e-6)
    injector = load_file(run / "checkpoint-2/multi_scale_injector/model.safetensors")
    assert events.Scalars("injector/s/mid")[-1].value == pytest.approx(float(injector["scale_weights.weights"][-1]))
    assert {"validation/LR_SR_HR", "injector/timestep_weights"} <= set(events.Tags()["images"])
    baseline = workspace["root"] / "experience/baseline"
    assert not any(tag.startswith("injector/") for tag in
                   EventAccumulator(str(baseline / "logs" / baseline.name)).Reload().Tags()["scalars"])


def test_injector_only_training_keeps_the_controlnet(runs, workspace):
    baseline = workspace["root"] / "experience/baseline/checkpoint-2"
    output = workspace["root"] / "experience/injector_only"
    result = train.main(tiny_args(
        workspace, output, "--injector", "timestep_multiscale", "--train_injector_only", "--controlnet_model_path",
        str(baseline), "--max_train_steps", "2", "--checkpointing_steps", "0", "--validation_steps", "0",
        "--gradient_accumulation_steps", "2", "--checkpointing_minutes", "1e-9",  # time-based: due after every step
    ))
    assert [p.name for p in result["checkpoints"]] == ["checkpoint-1", "checkpoint-2"]
    checkpoint = result["checkpoints"][-1]
    assert files_under(checkpoint) == CONTROLNET_FILES | ACCELERATE_STATE | INJECTOR_FILES
    state = json.loads((checkpoint / "training_state.json").read_text())
    assert (state["step"], state["micro_step"], state["batches_in_epoch"]) == (2, 4, 4)  # 2 steps of 2 batches
    for name in ("config.json", "diffusion_pytorch_model.safetensors"):  # the frozen ControlNet, byte for byte
        assert (checkpoint / "controlnet" / name).read_bytes() == (baseline / "controlnet" / name).read_bytes()
    injector = load_file(checkpoint / "multi_scale_injector/model.safetensors")
    assert not torch.equal(injector["scale_weights.weights"], torch.ones(5))
    with pytest.raises(SystemExit):  # refused at parse time: nothing to freeze
        tiny_args(workspace, output, "--train_injector_only")


def test_resume_latest_continues_exactly(workspace):
    root = workspace["root"] / "resume"
    flags = ["--injector", "timestep_multiscale", "--checkpointing_steps", "2", "--validation_steps", "0"]
    straight = train.main(tiny_args(workspace, root / "straight", *flags, "--max_train_steps", "5"))
    first = train.main(tiny_args(workspace, root / "paused", *flags, "--max_train_steps", "2"))
    assert first["step"] == 2 and first["resumed_from"] is None
    resumed = train.main(tiny_args(workspace, root / "paused", *flags, "--max_train_steps", "5",
                                   "--resume_from_checkpoint", "latest"))
    assert resumed["resumed_from"].name == "checkpoint-2" and resumed["step"] == 5
    # 8 images in batches of 2: the pause fell mid-epoch; same data, noise and optimiser state afterwards.
    assert [p.name for p in resumed["checkpoints"]] == ["checkpoint-2", "checkpoint-4", "checkpoint-5"]
    np.testing.assert_allclose([loss for _, loss in resumed["history"]],
                               [loss for _, loss in straight["history"]], rtol=1e-5)
    for folder in ("controlnet/diffusion_pytorch_model.safetensors", "multi_scale_injector/model.safetensors"):
        a = load_file(root / "straight/checkpoint-5" / folder)
        b = load_file(root / "paused/checkpoint-5" / folder)
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    with pytest.raises(CheckpointError, match="was trained with --injector timestep_multiscale, not timestep_only"):
        train.main(tiny_args(workspace, root / "paused", "--injector", "timestep_only", "--max_train_steps", "6",
                             "--resume_from_checkpoint", "latest", "--validation_steps", "0"))

    # From the checkpoint alone: the uninterrupted run's checkpoint-2 in a new run folder, resumed with no setting
    # repeated (--device is this machine's, never taken from a checkpoint). Paths, resolution, batch, LR warm-up,
    # injector flags and --max_train_steps 5 come from checkpoint-2's saved configuration.
    alone = root / "alone"
    shutil.copytree(root / "straight/checkpoint-2", alone / "checkpoint-2")
    resumed = train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(alone),
                                           "--device", "cpu", "--report_to", "none"]))
    assert resumed["resumed_from"] == alone / "checkpoint-2" and resumed["step"] == 5
    np.testing.assert_allclose([loss for _, loss in resumed["history"]],
                               [loss for _, loss in straight["history"]], rtol=1e-5)
    saved = yaml.safe_load((alone / "args.yaml").read_text())
    assert (saved["output_dir"], saved["train_data_dir"], saved["resolution"], saved["lr_warmup_steps"]) == (
        str(alone), str(workspace["hr"]), 64, 0)
    assert saved["conditioning_embedding_channels"] == [4, 8, 8, 8] and saved["injector"] == "timestep_multiscale"
    # A changed model setting is one line naming the flag, before anything loads.
    with pytest.raises(CheckpointError, match="was trained with --trainable_modules image_attentions, not attn2"):
        train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(alone),
                                     "--device", "cpu", "--trainable_modules", "attn2"]))


def spec_command(workspace, checkpoint, output_dir, *overrides):
    """The spec's inference command line, with the paths of this test."""
    return infer.parse_args([
        "seesr",
        "--pretrained_model_path", str(workspace["sd2"]),
        "--prompt", "",
        "--seesr_model_path", str(checkpoint),
        "--image_path", str(workspace["lr"]),
        "--output_dir", str(output_dir),
        "--start_point", "lr",
        "--num_inference_steps", "50",
        "--guidance_scale", "5.5",
        "--process_size", "512",
        *overrides,
    ])


def test_spec_command_as_written(runs, workspace, capsys):
    checkpoint = workspace["root"] / "experience/timestep_multiscale/checkpoint-2"
    single = workspace["root"] / "LR_single"
    single.mkdir()
    (single / "image_001.png").write_bytes((workspace["lr"] / "image_001.png").read_bytes())
    args = spec_command(workspace, checkpoint, workspace["root"] / "results_spec/timestep_multiscale")
    assert (args.num_inference_steps, args.process_size) == (50, 512)  # the note's command, as written
    # What follows is checked on one image at 5 steps and a 64 px process size: 50 steps at 512 px repeat the same
    # step many times over; the note's log and the 4x output do not depend on them.
    args.image_path, args.num_inference_steps, args.process_size = str(single), 5, 64
    result = infer.main(args)
    lines = capsys.readouterr().out.splitlines()
    assert lines[:3] == [  # the note's log, word for word
        f"Loading checkpoint from {checkpoint}",
        "✓ Multi-scale injector loaded",
        "✓ Timestep adaptive weights loaded (if applicable)",
    ]
    assert f"✓ ControlNet loaded from {checkpoint / 'controlnet'}" in lines[3:5]
    [output] = result["written"]
    assert output.name == "image_001.png" and Image.open(output).size == (40, 48)  # 4x the 10x12 input


@pytest.fixture(scope="module")
def inferred(runs, workspace):
    """The spec's command from each variant's checkpoint (2 steps at a 64 px process size)."""
    outputs = {}
    for name in VARIANTS:
        checkpoint = workspace["root"] / "experience" / name / "checkpoint-2"
        args = spec_command(workspace, checkpoint, workspace["root"] / "results" / name,
                            "--num_inference_steps", "5", "--process_size", "64")
        outputs[name] = infer.main(args)
    return outputs


def test_inference_from_each_checkpoint(inferred, workspace):
    for name, result in inferred.items():
        assert [p.name for p in result["written"]] == ["image_001.png", "image_002.png"]
        sizes = [Image.open(p).size for p in result["written"]]
        assert sizes == [(40, 48), (36, 36)]
        messages = result["messages"]
        if name == "baseline":  # a checkpoint without the injector: standard SeeSR inference
            assert messages[1].startswith("No multi_scale_injector/ in") and "identity" in messages[1]
            assert not any(m.startswith("✓ Multi-scale") for m in messages)
        else:
            assert messages[1:3] == ["✓ Multi-scale injector loaded", "✓ Timestep adaptive weights loaded (if applicable)"]


def test_the_checkpoints_injector_scales_the_control(runs, workspace):
    """Inference applies the injector it loads: level weights 0 remove the ControlNet, 1 keep it.

    Two training steps leave the ControlNet's zero convolutions near 1e-4, so the trained checkpoints' images
    differ from one another only below 8-bit rounding. The difference is made large by construction instead:
    the zero convolutions get O(1) weights, and only the injector's level weights differ between the two copies.
    """
    from safetensors.torch import save_file

    source = workspace["root"] / "experience/timestep_multiscale/checkpoint-2"
    generator = torch.Generator().manual_seed(0)
    controlnet = load_file(source / "controlnet/diffusion_pytorch_model.safetensors")
    for key in controlnet:
        if key.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) and key.endswith(".weight"):
            controlnet[key] = torch.randn(controlnet[key].shape, generator=generator) * 0.5
    images = {}
    for scale in (0.0, 1.0):
        checkpoint = workspace["root"] / f"injector_scale_{scale:g}/checkpoint-2"
        shutil.copytree(source, checkpoint)
        save_file(controlnet, checkpoint / "controlnet/diffusion_pytorch_model.safetensors", metadata={"format": "pt"})
        injector = load_file(checkpoint / "multi_scale_injector/model.safetensors")
        injector["scale_weights.weights"] = torch.full_like(injector["scale_weights.weights"], scale)
        injector["timestep_weights.table"] = torch.ones_like(injector["timestep_weights.table"])
        save_file(injector, checkpoint / "multi_scale_injector/model.safetensors")
        torch.save(injector, checkpoint / "multi_scale_injector/pytorch_model.bin")
        result = infer.main(spec_command(workspace, checkpoint, checkpoint.parent / "results",
                                         "--num_inference_steps", "5", "--process_size", "64"))
        images[scale] = np.asarray(Image.open(result["written"][0]), dtype=np.float64) / 255
    # Measured: a mean absolute difference of 0.072 (18 grey levels); 8-bit rounding moves it by at most 0.002.
    assert np.abs(images[1.0] - images[0.0]).mean() > 0.007


def test_run_folder_picks_its_newest_checkpoint_and_tags_are_prompts(runs, workspace, capsys):
    run = workspace["root"] / "experience/timestep_only"
    args = spec_command(workspace, run, workspace["root"] / "results_run", "--num_inference_steps", "5",
                        "--process_size", "64", "--seed", "3")
    result = infer.main(args)
    assert result["checkpoint"] == run / "checkpoint-2"
    assert "is a run folder: using its newest checkpoint checkpoint-2" in capsys.readouterr().out
    # The tag file beside image_001.png is its prompt: without it the result changes.
    (workspace["lr"] / "image_001.txt").rename(workspace["lr"] / "image_001.tags")
    try:
        untagged = infer.main(spec_command(workspace, run, workspace["root"] / "results_untagged",
                                           "--num_inference_steps", "5", "--process_size", "64", "--seed", "3"))
    finally:
        (workspace["lr"] / "image_001.tags").rename(workspace["lr"] / "image_001.txt")
    tagged_pixels = np.asarray(Image.open(result["written"][0]))
    assert not np.array_equal(tagged_pixels, np.asarray(Image.open(untagged["written"][0])))
    assert np.array_equal(np.asarray(Image.open(result["written"][1])), np.asarray(Image.open(untagged["written"][1])))


def test_plot_and_inspect_tools(runs, workspace, tmp_path, capsys):
    from scripts import inspect_checkpoint, plot_timestep_weights

    checkpoint = workspace["root"] / "experience/timestep_multiscale/checkpoint-2"
    png = plot_timestep_weights.main(plot_timestep_weights.parse_args(
        ["--checkpoint", str(checkpoint), "--output", str(tmp_path / "timestep_weights_visualization.png")]))
    assert Image.open(png).size[0] > 1000  # two panels: w(t) and s * w(t)
    report = inspect_checkpoint.main(inspect_checkpoint.parse_args([str(checkpoint)]))
    assert report["controlnet"] and report["variant"] == "timestep_multiscale"
    assert report["injector_keys"] == ["scale_weights.weights", "timestep_weights.table"]
    out = capsys.readouterr().out
    assert "scale_weights.weights" in out and "[1000, 1]" in out and "Training state: step 2" in out

    baseline = workspace["root"] / "experience/baseline/checkpoint-2"
    report = inspect_checkpoint.main(inspect_checkpoint.parse_args([str(baseline)]))
    assert report["controlnet"] and report["injector_keys"] == [] and report["variant"] is None
    assert "Injector: none" in capsys.readouterr().out
    with pytest.raises(CheckpointError, match="no multi_scale_injector"):
        plot_timestep_weights.main(plot_timestep_weights.parse_args(["--checkpoint", str(baseline)]))
    bin_file = checkpoint / "multi_scale_injector/pytorch_model.bin"
    report = inspect_checkpoint.main(inspect_checkpoint.parse_args([str(bin_file)]))
    assert report["injector_keys"] == ["scale_weights.weights", "timestep_weights.table"]


def test_comparison_grid_labels_runs(inferred, workspace, tmp_path, monkeypatch):
    from scripts import create_comparison_grid as grid_tool
    from utils.images import label_width, letterbox

    monkeypatch.chdir(workspace["root"])
    output = tmp_path / "comparison.png"
    grid_tool.main(grid_tool.parse_args(["--inputs", "results/*/sample00/image_001.png", "--output", str(output)]))
    image = Image.open(output)
    # Three tiles (the 40x48 outputs letterboxed, widened to fit the longest label) with 2 px padding, captions below.
    side = label_width(["baseline", "timestep_multiscale", "timestep_only"])
    assert side > 48 and image.width == 3 * (side + 2) + 2 and image.height > side + 4
    paths = grid_tool.expand_inputs(["results/*/sample00/image_001.png"])  # infer.py seesr's (SeeSR's) layout
    assert [p.parent.parent.name for p in paths] == ["baseline", "timestep_multiscale", "timestep_only"]
    with pytest.raises(UserError, match="2 labels for 3 images"):
        grid_tool.create_comparison_grid(paths, output, labels=["a", "b"])
    tile = letterbox(torch.zeros(3, 10, 20), 40)  # wide image: white bars above and below
    assert tile.shape == (3, 40, 40) and tile[:, :10].min() == 1.0 and tile[:, 15:25].max() == 0.0


def test_eval_sr_metrics_csv_and_lpips(tmp_path, capsys, monkeypatch):
    from scripts import eval_sr
    from utils.metrics import calculate_psnr, calculate_ssim

    # Whatever this machine has installed or cached: no LPIPS weights unless named.
    monkeypatch.setattr(eval_sr, "default_lpips_paths", lambda: (None, tmp_path / "no-alexnet.pth"))

    rng = np.random.default_rng(1)
    gt_dir, sr_dir = tmp_path / "gt", tmp_path / "sr"
    gt_dir.mkdir()
    sr_dir.mkdir()
    for index in range(2):
        gt = rng.integers(0, 256, (40, 36, 3), dtype=np.uint8)
        sr = np.clip(gt.astype(int) + rng.integers(-20, 21, gt.shape), 0, 255).astype(np.uint8)
        Image.fromarray(gt).save(gt_dir / f"{index:04d}.png")
        Image.fromarray(sr).save(sr_dir / f"{index:04d}.png")
    Image.fromarray(gt).save(gt_dir / "unscored.png")
    report = eval_sr.main(eval_sr.parse_args(["--results", str(sr_dir), "--gt", str(gt_dir), "--device", "cpu"]))
    out = capsys.readouterr().out
    assert not report["lpips"] and "LPIPS skipped" in out and "unscored" in out
    expected = calculate_psnr(np.asarray(Image.open(sr_dir / "0001.png")), np.asarray(Image.open(gt_dir / "0001.png")),
                              crop_border=4, test_y_channel=True)
    assert report["rows"][1]["psnr"] == pytest.approx(expected)
    rows = list(csv.DictReader(open(report["csv"])))
    assert [row["image"] for row in rows] == ["0000", "0001", "mean"]
    # The CSV keeps 6 decimals: rounding up to 5e-7 (measured 4.3e-7); 5e-6 is 10x the worst case.
    assert float(rows[-1]["ssim"]) == pytest.approx(np.mean([r["ssim"] for r in report["rows"]]), abs=5e-6)
    assert report["rows"][0]["ssim"] == pytest.approx(calculate_ssim(
        np.asarray(Image.open(sr_dir / "0000.png")), np.asarray(Image.open(gt_dir / "0000.png")), 4, True))

    # LPIPS from weight files in the lpips / torchvision formats (random values: structure, not calibration).
    from torchvision.models import alexnet

    torch.save(alexnet(weights=None).state_dict(), tmp_path / "alexnet-owt-7be5be79.pth")
    heads = {f"lin{i}.model.1.weight": torch.rand(1, c, 1, 1) for i, c in enumerate(eval_sr.LPIPS_CHANNELS)}
    torch.save(heads, tmp_path / "alex.pth")
    report = eval_sr.main(eval_sr.parse_args([
        "--results", str(sr_dir), "--gt", str(gt_dir), "--device", "cpu", "--csv", str(tmp_path / "m.csv"),
        "--lpips_weights", str(tmp_path / "alex.pth"), "--lpips_backbone", str(tmp_path / "alexnet-owt-7be5be79.pth"),
    ]))
    assert report["lpips"] and all(row["lpips"] > 0 for row in report["rows"])
    model, _ = eval_sr.load_lpips(str(tmp_path / "alex.pth"), str(tmp_path / "alexnet-owt-7be5be79.pth"), "cpu")
    image = torch.rand(1, 3, 64, 64) * 2 - 1
    assert model(image, image).item() == 0.0

    (sr_dir / "orphan.png").write_bytes((sr_dir / "0000.png").read_bytes())
    with pytest.raises(UserError, match="No ground truth .* for 1 result"):
        eval_sr.main(eval_sr.parse_args(["--results", str(sr_dir), "--gt", str(gt_dir)]))


def test_user_errors_are_one_line(workspace, tmp_path, capsys):
    result = run_in_process("train_seesr_timestep.py", "--pretrained_model_path", str(tmp_path / "missing-sd2"),
                            "--train_data_dir", str(workspace["hr"]), "--output_dir", str(tmp_path / "run"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: --pretrained_model_path")
    assert "missing-sd2 does not exist; expected a diffusers Stable Diffusion 2 base folder" in lines[0]

    for argv, fragment in (
        (["--image_path", str(tmp_path / "nothing")], "--image_path"),
        (["--seesr_model_path", str(tmp_path / "no-checkpoint")], "does not exist"),
    ):
        args = spec_command(workspace, workspace["root"] / "experience/baseline/checkpoint-2", tmp_path / "out")
        for flag, value in zip(argv[::2], argv[1::2]):
            setattr(args, flag.lstrip("-"), value)
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda args=args: infer.main(args))
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip().splitlines()
        assert len(error) == 1 and error[0].startswith("error: ") and fragment in error[0]


def test_presets_and_scripts_parse():
    args = train.parse_args(["--config", str(ROOT / "configs/seesr_sd2_base.yaml"), "--train_data_dir", "HR",
                             "--injector", "baseline"])
    assert args.learning_rate == 5e-5 and args.gradient_checkpointing and args.injector == "baseline"
    assert args.pretrained_model_path == "preset/models/stable-diffusion-2-base" and args.max_train_steps == 100000
    tiny = train.parse_args(["--config", str(ROOT / "configs/seesr_tiny.yaml")])
    assert tiny.conditioning_embedding_channels == [4, 8, 8, 8] and tiny.injector == "timestep_multiscale"
    for script in ("train_seesr_variants.sh", "compare_seesr_variants.sh"):
        assert subprocess.run(["bash", "-n", str(ROOT / "scripts" / script)]).returncode == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("precision", ["fp16", "bf16"])
def test_mixed_precision_training_and_fp16_inference_on_cuda(workspace, tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    args = tiny_args(workspace, tmp_path / "run", "--max_train_steps", "3", "--checkpointing_steps", "3",
                     "--validation_steps", "3", "--mixed_precision", precision, "--gradient_checkpointing")
    args.device = "cuda"
    result = train.main(args)
    checkpoint = result["checkpoints"][-1]
    # Trainable weights are kept and saved in fp32; the losses stayed finite under half precision.
    assert all(v.dtype == torch.float32 for v in load_file(checkpoint / "controlnet/diffusion_pytorch_model.safetensors").values())
    assert all(v.dtype == torch.float32 for v in load_file(checkpoint / "multi_scale_injector/model.safetensors").values())
    assert all(np.isfinite(loss) for _, loss in result["history"])
    output = infer.main(spec_command(workspace, checkpoint, tmp_path / "results", "--num_inference_steps", "5",
                                     "--process_size", "64", "--device", "cuda", "--mixed_precision", "fp16"))
    pixels = np.asarray(Image.open(output["written"][0]))
    assert pixels.shape == (48, 40, 3) and pixels.std() > 0


# ------------------------------------------------------------------------------------------------ SeeSR proper


@pytest.fixture(scope="module")
def seesr_release(workspace):
    """SeeSR's release layout under the workspace: preset/models/seesr/{unet,controlnet} (config.json +
    diffusion_pytorch_model.bin, image attention on, O(1) zero convolutions so the ControlNet matters), RAM, DAPE
    and the tag files in preset/models; one LR test image in preset/datasets/test_datasets."""
    from diffusers import UNet2DConditionModel

    from models.seesr_unet import SeeSRControlNetModel, unet_with_image_attention
    from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram

    models = workspace["root"] / "preset/models"
    ram = write_tiny_ram(models)
    torch.manual_seed(0)
    unet = unet_with_image_attention(UNet2DConditionModel.from_pretrained(workspace["sd2"], subfolder="unet"),
                                     TINY_RAM_CONFIG.embed_width)
    controlnet = SeeSRControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 8))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")) and name.endswith(".weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    unet.save_pretrained(models / "seesr/unet", safe_serialization=False)
    controlnet.save_pretrained(models / "seesr/controlnet", safe_serialization=False)
    images = workspace["root"] / "preset/datasets/test_datasets"
    images.mkdir(parents=True)
    (images / "image_001.png").write_bytes((workspace["lr"] / "image_001.png").read_bytes())
    return {"models": models, "seesr": models / "seesr", "ram": ram, "images": images}


@pytest.fixture()
def tiny_ram(monkeypatch):
    """The tagger's architecture is not in its weight file: load_ram_tagger's default (Swin-L) becomes the tiny one."""
    import models.ram
    from tests.ram_tiny import TINY_RAM_CONFIG

    monkeypatch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)


def test_seesr_own_command_line_on_the_release_layout(seesr_release, workspace, tiny_ram, monkeypatch, capsys):
    """scripts/test_seesr.sh of cswry/SeeSR, word for word, run from the folder holding preset/.

    Parsed as written; the run then takes 2 steps at a 64 px process size instead of 50 at 512 to keep the suite
    fast (test_spec_command_as_written runs the full 50 steps at 512 px through the same sampler).
    """
    monkeypatch.chdir(workspace["root"])
    argv = """seesr --pretrained_model_path preset/models/stable-diffusion-2-base --prompt None
        --seesr_model_path preset/models/seesr --ram_ft_path preset/models/DAPE.pth
        --image_path preset/datasets/test_datasets --output_dir preset/datasets/output --start_point lr
        --num_inference_steps 50 --guidance_scale 5.5 --process_size 512""".split()
    args = infer.parse_args(argv)
    assert (args.num_inference_steps, args.process_size, args.start_steps, args.seed) == (50, 512, 999, None)
    args.num_inference_steps, args.process_size = 5, 64
    result = infer.main(args)
    out = capsys.readouterr().out
    assert "tags: RAM (preset/models/ram_swin_large_14m.pth + DAPE preset/models/DAPE.pth)" in out
    [output] = result["written"]
    assert output == Path("preset/datasets/output/sample00/image_001.png") and Image.open(output).size == (40, 48)
    prompt = result["prompts"]["image_001"]
    assert prompt.endswith(", None,clean, high-resolution, 8k")  # test_seesr.py's f"{tags}, {prompt}," + added
    assert prompt in out.splitlines()


def test_seesr_flags(seesr_release, workspace, tiny_ram, tmp_path, monkeypatch, capsys):
    """--sample_times, --save_prompts, --start_steps (steps above it skipped), --seed None, --blending_alpha."""
    import models.seesr

    calls = []
    predict_noise = models.seesr.predict_noise
    monkeypatch.setattr(models.seesr, "predict_noise", lambda *a, **k: calls.append(a[4]) or predict_noise(*a, **k))

    def run(*flags):
        calls.clear()
        return infer.main(infer.parse_args([
            "seesr", "--pretrained_model_path", str(workspace["sd2"]), "--seesr_model_path", str(seesr_release["seesr"]),
            "--ram_path", str(seesr_release["ram"]["ram"]), "--image_path", str(seesr_release["images"]),
            "--process_size", "64", "--num_inference_steps", "5", *flags]))

    result = run("--output_dir", str(tmp_path / "a"), "--sample_times", "2", "--save_prompts", "--seed", "5",
                 "--blending_alpha", "0.3")
    assert [p.relative_to(tmp_path / "a").as_posix() for p in result["written"]] == [
        "sample00/image_001.png", "sample01/image_001.png"]  # SeeSR's output names
    first, second = (np.asarray(Image.open(p), dtype=np.float64) for p in result["written"])
    assert np.abs(first - second).mean() > 0.5  # two draws of one generator, not one image twice
    assert (tmp_path / "a/txt/image_001.txt").read_text() == result["prompts"]["image_001"]
    assert result["prompts"]["image_001"].endswith(", ,clean, high-resolution, 8k")  # default --prompt ''
    assert [int(t) for t in calls] == [801, 601, 401, 201, 1] * 2  # 5 leading steps; start_steps 999 skips none

    result = run("--output_dir", str(tmp_path / "b"), "--start_steps", "400")  # and no --seed
    assert [int(t) for t in calls] == [201, 1]  # the steps above 400 are skipped, not only the latent noised
    assert result["seed"] is not None and f"pass --seed {result['seed']} to repeat" in capsys.readouterr().out


def test_bad_seesr_inputs_are_one_line(runs, seesr_release, workspace, tmp_path, capsys):
    baseline = workspace["root"] / "experience/baseline/checkpoint-2"
    other_base = tmp_path / "sd15_controlnet"
    shutil.copytree(baseline, other_base)
    config = json.loads((other_base / "controlnet/config.json").read_text())
    (other_base / "controlnet/config.json").write_text(json.dumps({**config, "cross_attention_dim": 768}))
    ddpm = tmp_path / "ddpm_best.pt"
    torch.save({"model": {"conv.weight": torch.zeros(1)}}, ddpm)
    file = tmp_path / "a_file"
    file.write_text("")
    cases = [  # numbers alone are refused while parsing, with the flag's name; the rest before anything loads
        (["--lr_start_timestep", "1000"], "--lr_start_timestep 1000 is beyond the noise schedule"),
        (["--start_steps", "-1"], "argument --start_steps: must be at least 0, got -1"),
        (["--num_inference_steps", "0"], "argument --num_inference_steps/--steps/--num_steps: must be at least 1, got 0"),
        (["--steps", "5000"], "--num_inference_steps 5000 is more than the 1000 training timesteps"),
        (["--upscale", "0"], "argument --upscale: must be at least 1, got 0"),
        (["--guidance_scale", "-1"], "argument --guidance_scale: must be between 0 and 100, got -1"),
        (["--process_size", "4"], "argument --process_size: must be at least 8, got 4"),
        (["--sample_times", "0"], "argument --sample_times: must be at least 1, got 0"),
        (["--seed", "-3"], "argument --seed: must be a seed between 0 and"),
        (["--latent_tiled_overlap", "-5"], "argument --latent_tiled_overlap: must be at least 0, got -5"),
        (["--latent_tiled_size", "4", "--latent_tiled_overlap", "4"], "must be smaller than --latent_tiled_size 4"),
        (["--control_schedule", "window", "--control_guidance_start", "0.8", "--control_guidance_end", "0.2"],
         "--control_guidance_start 0.8 must be below --control_guidance_end 0.2"),
        (["--control_guidance_end", "1.5"], "argument --control_guidance_end: must be between 0 and 1, got 1.5"),
        (["--mixed_precision", "fp8"], "argument --mixed_precision: 'fp8' is not one of"),
        (["--output_dir", str(file)], f"--output_dir {file} is a file"),
        (["--seesr_model_path", str(other_base)], "built for text embeddings of width 768"),
        (["--seesr_model_path", str(ddpm)], f"--seesr_model_path {ddpm} is a file"),
    ]
    for flags, fragment in cases:
        with pytest.raises(SystemExit) as exit_info:
            run_cli(lambda flags=flags: infer.main(spec_command(workspace, baseline, tmp_path / "out", *flags)))
        error = capsys.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(error) == 1 and error[0].startswith("error: "), (flags, error)
        assert fragment in error[0], (fragment, error[0])
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_corrupt_lr_image_is_skipped_with_a_warning(runs, workspace, tmp_path, capsys):
    folder = tmp_path / "LR"
    folder.mkdir()
    (folder / "good.png").write_bytes((workspace["lr"] / "image_002.png").read_bytes())
    (folder / "broken.png").write_bytes(b"not a png")
    checkpoint = workspace["root"] / "experience/baseline/checkpoint-2"
    args = spec_command(workspace, checkpoint, tmp_path / "out", "--num_inference_steps", "5", "--process_size", "64")
    args.image_path = str(folder)
    result = infer.main(args)
    assert [p.name for p in result["written"]] == ["good.png"] and result["skipped"] == [folder / "broken.png"]
    out = capsys.readouterr().out
    assert f"warning: skipped {folder / 'broken.png'}" in out
    assert "tags: <name>.txt beside each image" in out  # an old checkpoint without image attention needs no RAM


def test_bad_training_images_are_found_before_the_models_load(workspace, tmp_path, capsys):
    # An image smaller than the crop is no bad image: it is mirrored up to it, as SeeSR's dataset (test_seesr_data_tools).
    for name, content in (("broken", b"not a png"),):
        folder = tmp_path / name
        folder.mkdir()
        (folder / "good.png").write_bytes(next(workspace["hr"].rglob("*.png")).read_bytes())
        if content is None:
            Image.fromarray(np.zeros((32, 80, 3), np.uint8)).save(folder / "bad.png")
        else:
            (folder / "bad.png").write_bytes(content)
        args = tiny_args(workspace, tmp_path / "run", "--train_data_dir", str(folder))
        with pytest.raises(SystemExit):
            run_cli(lambda args=args: train.main(args))
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error.startswith("error: Bad HR training image: ") and str(folder / "bad.png") in error
        assert ("cannot read" in error) if content else ("80x32 px, smaller than 64x64 px" in error)
        assert not (tmp_path / "run/train.log").exists()  # stopped before the accelerator, logger and models


def test_training_seesr_with_image_attention_and_inference_from_it(seesr_release, workspace, tiny_ram, capsys):
    """SeeSR proper from plain SD2: RAM embeddings of the LR, RAM tags of untagged GTs, image attentions trained; the
    training preview of an LR image is what infer.py seesr makes of it with the checkpoint (tags of the LR by RAM +
    DAPE, not the tag file beside it; test_seesr.py's prompt; the LR latent noised to t=999; the run's seed)."""
    from diffusers import UNet2DConditionModel

    from models.seesr_unet import unet_with_image_attention
    from tests.ram_tiny import TINY_RAM_CONFIG

    output = workspace["root"] / "experience/seesr"
    ram = ["--ram_path", str(seesr_release["ram"]["ram"]), "--ram_ft_path", str(seesr_release["ram"]["dape"])]
    result = train.main(tiny_args(
        workspace, output, "--injector", "timestep_multiscale", "--max_train_steps", "2", "--checkpointing_steps", "2",
        "--validation_steps", "2", *ram, "--null_text_ratio", "0", "--validation_image",
        str(workspace["lr"] / "image_001.png"), "--validation_num_inference_steps", "5", image_attention=True,
    ))
    checkpoint = result["checkpoints"][-1]
    assert {"unet/config.json", "unet/diffusion_pytorch_model.safetensors"} <= files_under(checkpoint)
    assert json.loads((checkpoint / "controlnet/config.json").read_text())["use_image_cross_attention"]
    trained = load_file(checkpoint / "unet/diffusion_pytorch_model.safetensors")
    torch.manual_seed(42)  # the trainer's seed: the same fresh image attentions
    initial = unet_with_image_attention(UNet2DConditionModel.from_pretrained(workspace["sd2"], subfolder="unet"),
                                        TINY_RAM_CONFIG.embed_width).state_dict()
    assert set(trained) == set(initial)
    images = [k for k in trained if "image_attentions" in k]
    assert all(torch.equal(trained[k], initial[k]) for k in trained if k not in images)  # the rest stays SD2's
    assert sum(not torch.equal(trained[k], initial[k]) for k in images) > len(images) // 2  # image attentions trained
    log = (output / "train.log").read_text()
    assert "UNet: SD2's with new image attentions" in log and "modules ending in image_attentions" in log

    # Not under results/, which holds the variants' outputs only (the grid test globs results/*).
    inferred = infer.main(spec_command(workspace, checkpoint, workspace["root"] / "results_seesr_proper",
                                       "--num_inference_steps", "5", "--process_size", "64", "--seed", "42", *ram))
    assert [p.name for p in inferred["written"]] == ["image_001.png", "image_002.png"] and inferred["tagger"]
    assert "image embeddings to the image cross-attention" in capsys.readouterr().out
    assert "a red wall" not in inferred["prompts"]["image_001"]  # RAM's tags of the LR, not the file beside it
    preview = np.asarray(Image.open(output / "validation/step_000002/image_001.png"), dtype=np.int16)
    np.testing.assert_allclose(preview, np.asarray(Image.open(inferred["written"][0]), dtype=np.int16), atol=1)


def test_seesr_training_flags_parse_or_are_refused(workspace, capsys):
    args = tiny_args(workspace, "out", "--pretrained_model_name_or_path", str(workspace["sd2"]),
                     "--controlnet_model_name_or_path", "x", "--unet_model_name_or_path", "y", "--null_prompt_ratio",
                     "0.3", "--trainable_modules", "image_attentions", "attn2", "--num_train_epochs", "3",
                     "--scale_lr", "--enable_xformers_memory_efficient_attention", "--set_grads_to_none",
                     image_attention=True)
    assert (args.controlnet_model_path, args.unet_model_path, args.null_text_ratio) == ("x", "y", 0.3)
    assert args.trainable_modules == ["image_attentions", "attn2"] and args.num_train_epochs == 3
    root = train.parse_args(["--pretrained_model_path", "sd2", "--root_folders", "a,b", "--null_text_ratio", "0.5"])
    assert root.root_folders == "a,b" and root.max_train_steps is None and root.trainable_modules == ["image_attentions"]
    # The house names' aliases (the other trainers' spellings), SeeSR's tracker flags, the time-based checkpoints.
    house = train.parse_args(["--pretrained_model_path", "sd2", "--root_folders", "a", "--batch_size", "8", "--lr", "1e-4",
                              "--grad_accum", "2", "--warmup_steps", "0", "--grad_clip", "0.5", "--keep_last", "3",
                              "--resume", "latest", "--precision", "16-mixed", "--checkpointing_minutes", "30",
                              "--logging_dir", "tb", "--tracker_project_name", "SeeSR", "--report_to", "none"])
    assert (house.train_batch_size, house.learning_rate, house.gradient_accumulation_steps, house.lr_warmup_steps,
            house.max_grad_norm, house.checkpoints_total_limit, house.resume_from_checkpoint, house.mixed_precision,
            house.checkpointing_minutes, house.logging_dir) == (8, 1e-4, 2, 0, 0.5, 3, "latest", "fp16", 30.0, "tb")
    assert {"train_batch_size", "learning_rate", "resume_from_checkpoint"} <= set(house.given_flags)
    assert (root.learning_rate, root.lr_warmup_steps, root.train_batch_size, root.seed) == (5e-5, 500, 16, None)
    for flag, fragment in ((["--lr", "0"], "--learning_rate must be positive"),
                           (["--checkpointing_minutes", "-1"], "--checkpointing_minutes must not be negative")):
        with pytest.raises(SystemExit):
            train.parse_args(["--pretrained_model_path", "sd2", "--root_folders", "a", *flag])
        assert fragment in capsys.readouterr().err
    train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", "run"])  # paths come from the checkpoint
    for flag in (["--use_8bit_adam"], ["--revision", "main"], ["--dataset_name", "x"]):
        with pytest.raises(SystemExit):
            train.parse_args(["--pretrained_model_path", "sd2", "--root_folders", "a", *flag])
        [error] = capsys.readouterr().err.strip().splitlines()
        assert error.startswith(f"error: {flag[0]} is not supported: ")


def test_training_on_seesr_release_from_prepared_folders(seesr_release, workspace, tiny_ram, tmp_path, capsys):
    """--seesr_model_path (SeeSR's release) + --root_folders (make_paired_data.py's layout) + the injector on top."""
    from scripts import inspect_checkpoint

    root = tmp_path / "training_datasets"
    for index, path in enumerate(sorted(workspace["hr"].rglob("*.png"))[:2]):
        for sub in ("gt", "sr_bicubic"):
            (root / sub).mkdir(parents=True, exist_ok=True)
            (root / sub / f"{index:07d}.png").write_bytes(path.read_bytes())
    (root / "tag").mkdir()
    (root / "tag/0000000.txt").write_text("cat, grass")  # the other GT is tagged by RAM online
    ram = seesr_release["ram"]

    def run(steps, *extra):
        return train.main(train.parse_args([
            "--pretrained_model_name_or_path", str(workspace["sd2"]), "--root_folders", str(root),
            "--seesr_model_path", str(seesr_release["seesr"]), "--ram_path", str(ram["ram"]),
            "--ram_tag_list", str(ram["tag_list"]), "--ram_tag_thresholds", str(ram["thresholds"]),
            "--output_dir", str(tmp_path / "run"), "--resolution", "64", "--train_batch_size", "2",
            "--max_train_steps", str(steps), "--validation_steps", "0", "--device", "cpu", "--lr_warmup_steps", "0",
            "--injector", "timestep_multiscale", "--null_text_ratio", "0", *extra,
        ]))

    checkpoint = run(1)["checkpoints"][-1]
    released = torch.load(seesr_release["seesr"] / "unet/diffusion_pytorch_model.bin", weights_only=True)
    trained = load_file(checkpoint / "unet/diffusion_pytorch_model.safetensors")
    assert set(trained) == set(released)  # SeeSR's UNet, image attentions included, continued
    assert any(not torch.equal(trained[k], released[k]) for k in trained if "image_attentions" in k)
    log = (tmp_path / "run/train.log").read_text()
    assert "✓ UNet loaded from" in log and "1 steps per epoch" in log
    report = inspect_checkpoint.main(inspect_checkpoint.parse_args([str(checkpoint)]))
    assert report["unet"] and report["image_attention"] and report["variant"] == "timestep_multiscale"
    assert "image cross-attention yes" in capsys.readouterr().out
    resumed = run(2, "--resume_from_checkpoint", "latest")  # the UNet's trained modules come back from unet/
    assert resumed["resumed_from"] == checkpoint and resumed["step"] == 2
    again = load_file(resumed["checkpoints"][-1] / "unet/diffusion_pytorch_model.safetensors")
    moved = [k for k in again if "image_attentions" in k and not torch.equal(again[k], trained[k])]
    assert moved and all(torch.equal(again[k], trained[k]) for k in again if "image_attentions" not in k)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_seesr_proper_in_fp16_on_cuda(seesr_release, workspace, tiny_ram, tmp_path):
    """Image attentions trained in fp32 under fp16 autocast with RAM in fp16; fp16 inference with RAM embeddings."""
    ram = seesr_release["ram"]
    args = tiny_args(workspace, tmp_path / "run", "--max_train_steps", "2", "--checkpointing_steps", "2",
                     "--validation_steps", "2", "--mixed_precision", "fp16", "--ram_path", str(ram["ram"]),
                     "--ram_ft_path", str(ram["dape"]), image_attention=True)
    args.device = "cuda"
    result = train.main(args)
    checkpoint = result["checkpoints"][-1]
    assert all(v.dtype == torch.float32 for v in load_file(checkpoint / "unet/diffusion_pytorch_model.safetensors").values())
    assert all(np.isfinite(loss) for _, loss in result["history"])
    output = infer.main(spec_command(workspace, checkpoint, tmp_path / "results", "--num_inference_steps", "5",
                                     "--process_size", "64", "--device", "cuda", "--mixed_precision", "fp16", "--ram_path", str(ram["ram"]),
                                     "--ram_ft_path", str(ram["dape"])))
    pixels = np.asarray(Image.open(output["written"][0]))
    assert output["tagger"] and pixels.shape == (48, 40, 3) and pixels.std() > 0


def test_a_nan_loss_stops_before_it_reaches_a_checkpoint(workspace, tmp_path, monkeypatch):
    """A NaN at step 2 with logging every 5 steps: found before checkpoint-2 is written, checkpoint-1 kept."""
    import models.seesr

    real_loss = models.seesr.seesr_training_loss
    calls = []

    def loss_with_a_nan_at_step_2(*args, **kwargs):
        calls.append(1)
        loss = real_loss(*args, **kwargs)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(models.seesr, "seesr_training_loss", loss_with_a_nan_at_step_2)
    output = tmp_path / "nan_run"
    with pytest.raises(UserError, match="The loss became nan by optimiser step 2"):
        train.main(tiny_args(workspace, output, "--injector", "timestep_multiscale", "--max_train_steps", "4",
                             "--checkpointing_steps", "1", "--logging_steps", "5", "--validation_steps", "0"))
    assert (output / "checkpoint-1").is_dir() and not (output / "checkpoint-2").exists()


def test_training_defaults_are_seesrs_and_a_drawn_seed_resumes_exactly(workspace, tmp_path, monkeypatch):
    """train_seesr.py's defaults: batch 16, --seed None, --allow_tf32 off (parsed there but never applied, so its
    matmuls run in full fp32). Without --seed the run draws one, logs it and saves it: a resume continues exactly."""
    seesr_reference = {"train_batch_size": 16, "seed": None, "allow_tf32": False, "learning_rate": 5e-5,
                       "null_text_ratio": 0.5, "trainable_modules": ["image_attentions"]}
    defaults = train.parse_args(["--pretrained_model_path", "sd2", "--root_folders", "a"])
    assert {key: getattr(defaults, key) for key in seesr_reference} == seesr_reference

    torch.backends.cuda.matmul.allow_tf32 = True  # what the other trainers set (utils.accelerator.enable_fast_math)
    argv = ["--no_image_cross_attention", "--pretrained_model_path", str(workspace["sd2"]), "--train_data_dir",
            str(workspace["hr"]), "--output_dir", str(tmp_path / "run"), "--resolution", "64", "--train_batch_size", "2",
            "--conditioning_embedding_channels", "4", "8", "8", "8", "--lr_warmup_steps", "0", "--logging_steps", "1",
            "--validation_steps", "0", "--device", "cpu", "--checkpointing_steps", "1", "--report_to", "none"]
    try:
        straight = train.main(train.parse_args([*argv, "--max_train_steps", "2"]))
        assert torch.backends.cuda.matmul.allow_tf32 is False
    finally:
        torch.backends.cuda.matmul.allow_tf32 = False  # PyTorch's default
    seed = straight["seed"]
    assert isinstance(seed, int) and f"seed: {seed} (random" in (tmp_path / "run/train.log").read_text()
    assert yaml.safe_load((tmp_path / "run/args.yaml").read_text())["seed"] == seed
    alone = tmp_path / "alone"
    shutil.copytree(tmp_path / "run/checkpoint-1", alone / "checkpoint-1")
    resumed = train.main(train.parse_args(["--resume_from_checkpoint", "latest", "--output_dir", str(alone),
                                           "--device", "cpu", "--report_to", "none"]))
    assert resumed["seed"] == seed and resumed["step"] == 2
    np.testing.assert_allclose([loss for _, loss in resumed["history"]],
                               [loss for _, loss in straight["history"]], rtol=1e-5)


def test_untagged_gts_are_tagged_by_plain_ram_as_make_tags(workspace, tiny_ram, tmp_path, monkeypatch):
    """With --ram_ft_path, the LR's embeddings come from RAM + DAPE, but a GT without a tag file is tagged by plain RAM
    (SeeSR's make_tags.py), and the log says so."""
    import models.seesr
    from models.ram import load_ram_tagger
    from tests.ram_tiny import dape_layout_state_dict, write_tiny_ram

    # A DAPE strong enough to change some of the tiny RAM's tags, so the two taggers can be told apart.
    dape_state = {k: v * 5 if ".lora_B" in k else v for k, v in dape_layout_state_dict(seed=1).items()}
    ram = write_tiny_ram(tmp_path / "ram", dape_state=dape_state)

    seen = []
    real_loss = models.seesr.seesr_training_loss

    def recording_loss(batch, **kwargs):
        seen.append((list(batch["prompt"]), list(batch["tag_source"]), batch["hr"].clone()))
        return real_loss(batch, **kwargs)

    monkeypatch.setattr(models.seesr, "seesr_training_loss", recording_loss)
    train.main(tiny_args(workspace, tmp_path / "run", "--max_train_steps", "2", "--train_batch_size", "4",
                         "--validation_steps", "0", "--null_text_ratio", "0", "--ram_path", str(ram["ram"]),
                         "--ram_ft_path", str(ram["dape"]), image_attention=True))
    plain = load_ram_tagger(ram["ram"], None, ram["tag_list"], ram["thresholds"])
    dape = load_ram_tagger(ram["ram"], ram["dape"], ram["tag_list"], ram["thresholds"])
    compared = differs = 0
    for prompts, sources, hr in seen:
        gt = ((hr + 1) / 2).clamp(0, 1)
        for prompt, source, plain_tags, dape_tags in zip(prompts, sources, plain.tags(gt), dape.tags(gt), strict=True):
            if source == "none":
                assert prompt == f"{plain_tags},"  # make_tags.py's file text
                compared += 1
                differs += plain_tags != dape_tags
    assert compared >= 6 and differs >= 1  # the DAPE tagger would have given other prompts
    assert "GT tags: plain RAM" in (tmp_path / "run/train.log").read_text()
