"""train_dape.py (SeeSR's stage 1) on tiny RAM files: SeeSR's loss written out, exact resumes, a DAPE.pth that the
SeeSR pipeline's tagger loader reads back, the tag agreement report and one-line errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
import subprocess
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import models.ram
import train_dape as train
import utils.launch as launch_utils
from models.dape import LoRALinear, load_dape, ram_pixels, tag_f1
from models.ram import load_ram_tagger
from recipes.dape import DAPEPairs, build_dape_training, dape_pairs
from tests.launch import run_in_process
from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram
from utils.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--config", str(ROOT / "configs" / "dape_tiny.yaml")]
SIZE = 96  # the tiny images: resized to the preset's 64 px as SeeSR's dataset resizes to 512


@pytest.fixture(scope="module", autouse=True)
def tiny_ram():
    """RAM's Swin-L becomes the tiny configuration (the weight file does not record the architecture)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)
        yield


def write_dape_folder(folder: Path, count: int, seed: int) -> Path:
    """SeeSR's DAPE layout: gt/ (smooth colour fields) and sr_bicubic/ (the same, noisier and blurred), by name."""
    rng = np.random.default_rng(seed)
    for sub in ("gt", "sr_bicubic", "lr"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        coarse = rng.uniform(0, 255, (6, 6, 3)).astype(np.uint8)
        gt = Image.fromarray(coarse).resize((SIZE, SIZE), Image.BICUBIC)
        blurred = gt.resize((SIZE // 4, SIZE // 4), Image.BICUBIC).resize((SIZE, SIZE), Image.BICUBIC)
        noisy = np.clip(np.asarray(blurred, dtype=np.float64) + rng.normal(0, 25, (SIZE, SIZE, 3)), 0, 255).astype(np.uint8)
        gt.save(folder / "gt" / f"{i + 1:07d}.png")
        Image.fromarray(noisy).save(folder / "sr_bicubic" / f"{i + 1:07d}.png")
        gt.resize((SIZE // 4, SIZE // 4)).save(folder / "lr" / f"{i + 1:07d}.png")  # written by SeeSR's tool, never read
    return folder


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dape")
    return {**write_tiny_ram(root / "ram"), "data": write_dape_folder(root / "training_for_dape", 8, seed=0),
            "held_out": write_dape_folder(root / "held_out", 3, seed=1), "root": root}


def command(files: dict, output: Path, *extra: str) -> list[str]:
    return [*TINY, "--ram_path", str(files["ram"]), "--root_folders", str(files["data"]), "--output_dir", str(output), *extra]


@pytest.fixture(scope="module")
def runs(files) -> dict:
    """6 steps straight (checkpoints at 2, 4, 6), and the same run killed after its step-2 checkpoint and resumed with
    ``--output_dir`` and ``latest`` only (step 2 is mid-epoch: 6 training pairs, batch 2). The killed run's folder keeps
    what it wrote after that checkpoint (the step-6 rows of tag_agreement.csv), as after a crash."""
    straight_dir, paused_dir = files["root"] / "straight", files["root"] / "paused"
    straight = train.main(train.parse_args(command(files, straight_dir, "--checkpointing_steps", "2", "--checkpoints_total_limit", "0")))
    shutil.copytree(straight_dir, paused_dir)
    for name in ("dape_last.pt", "dape_step_4.pt", "dape_step_6.pt"):
        (paused_dir / "checkpoints" / name).unlink()
    resumed = train.main(train.parse_args(["--output_dir", str(paused_dir), "--resume_from_checkpoint", "latest"]))
    return {"straight": straight, "resumed": resumed, "straight_dir": straight_dir, "paused_dir": paused_dir}


def test_resume_latest_continues_exactly(runs):
    straight, resumed = runs["straight"], runs["resumed"]
    assert straight["step"] == resumed["step"] == 6 and len(straight["losses"]) == 6 and len(resumed["losses"]) == 4
    # lr 1e-3, halved after step 4 (the preset's milestone), no warm-up
    np.testing.assert_allclose(straight["lr_per_step"], [1e-3] * 4 + [5e-4] * 2, rtol=1e-12)
    assert resumed["lr_per_step"] == straight["lr_per_step"][2:]
    # same data order, same dropout and stochastic depth, same LoRA: the same losses as the uninterrupted run
    np.testing.assert_allclose(resumed["losses"], straight["losses"][2:], rtol=1e-5)
    a = torch.load(runs["straight_dir"] / "DAPE.pth", weights_only=True)
    b = torch.load(runs["paused_dir"] / "DAPE.pth", weights_only=True)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=1e-5, atol=1e-7)
    assert resumed["config"].root_folders == straight["config"].root_folders  # from the checkpoint, not repeated


def test_run_folder_checkpoints_and_tag_agreement_report(runs, files):
    run = runs["straight_dir"]
    assert {p.name for p in (run / "checkpoints").iterdir()} == {"dape_last.pt", "dape_step_2.pt", "dape_step_4.pt", "dape_step_6.pt"}
    checkpoint = torch.load(run / "checkpoints" / "dape_step_6.pt", weights_only=True)
    assert checkpoint["kind"] == "dape" and checkpoint["step"] == 6
    assert checkpoint["config"]["lora_rank"] == 8 and checkpoint["config"]["root_folders"] == str(files["data"])
    assert "given_flags" not in checkpoint["config"] and {"optimizer", "lr_scheduler", "rng"} <= set(checkpoint)
    assert all(".lora_" in key for key in checkpoint["model"])  # RAM itself comes from --ram_path, not the checkpoint
    assert (run / "args.yaml").is_file() and "tag agreement (mean F1)" in (run / "train.log").read_text()
    report = json.loads((run / "tag_agreement.json").read_text())
    assert report["before"]["step"] == 0 and report["after"]["step"] == 6 and report["after"]["images"] == 2
    assert 0 <= report["after"]["mean_f1"] <= 1 and "per image" in report["definition"]
    for folder in (run, runs["paused_dir"]):
        rows = list(csv.DictReader(open(folder / "tag_agreement.csv")))
        assert [row["step"] for row in rows] == ["0", "0", "6", "6"]  # the resumed run's step 6 replaced, not repeated
        assert {"image", "f1", "precision", "recall", "clean_tags", "degraded_tags"} <= set(rows[0])
    # SeeSR's stage-2 trainer reads the same preset names: its 6 pairs trained, 2 held out
    assert "data: 6 training pairs, 2 held out" in (run / "train.log").read_text()


def test_dape_pth_loads_as_the_seesr_pipeline_loads_the_release(runs, files):
    """``infer.py seesr --ram_ft_path`` and ``train_seesr_timestep.py --ram_ft_path`` call load_ram_tagger(ram, dape):
    the tagger it builds (LoRA merged) gives the trained student's embeddings and tags."""
    dape = torch.load(runs["straight_dir"] / "DAPE.pth", weights_only=True)
    assert all(key.endswith((".lora_A", ".lora_B")) for key in dape)
    assert {key.rsplit(".", 2)[0].split(".")[0] for key in dape} == {"visual_encoder", "tagging_head"}
    assert dape["visual_encoder.layers.0.blocks.0.attn.qkv.lora_A"].shape == (16, 8)  # rank 8 x (query, value)
    assert dape["tagging_head.encoder.layer.1.crossattention.self.key.lora_B"].shape == (16, 8)
    assert any(value.abs().max() > 0 for key, value in dape.items() if key.endswith("lora_B"))  # it trained
    loaded = load_ram_tagger(files["ram"], runs["straight_dir"] / "DAPE.pth", config=TINY_RAM_CONFIG)
    student = runs["straight"]["tagger"].eval()
    images = torch.rand(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected_embeds = student.encode(student.preprocess(images))
        expected_logits = student.logits(expected_embeds)
    tags, embeds = loaded(images)
    torch.testing.assert_close(embeds, expected_embeds, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(loaded.logits(embeds), expected_logits, rtol=1e-4, atol=1e-5)
    assert tags == student.tags_from_logits(expected_logits)
    plain = load_ram_tagger(files["ram"], config=TINY_RAM_CONFIG)
    assert not torch.allclose(plain(images)[1], embeds, atol=1e-4)  # the LoRA changes the embeddings


def test_loss_is_dape_models_formula(files):
    """DAPEModel.optimize_parameters, written out: MSE of the embeddings + mean BCE of the sigmoids, weight 1 each,
    on SeeSR's dataset preprocessing (ToTensor, Resize to the training size, Resize to RAM's input, ImageNet
    normalisation; tensor resizes without antialiasing as in the torchvision SeeSR pins)."""
    from torchvision import transforms

    config = train.parse_args(command(files, files["root"] / "unused", "--image_size", "64", "--ram_tag_list", str(files["tag_list"]),
                                      "--ram_tag_thresholds", str(files["thresholds"])))
    parts = build_dape_training(config, "cpu")
    student, teacher = parts.models["student"], parts.models["teacher"]
    student.eval()  # no dropout: the same forward twice
    with torch.no_grad():
        for module in student.modules():
            if isinstance(module, LoRALinear):
                module.lora_B.normal_(0, 0.5, generator=torch.Generator().manual_seed(2))
    pairs = dape_pairs([str(files["data"])])[:3]
    batch = torch.utils.data.default_collate([DAPEPairs(pairs, 64)[i] for i in range(3)])
    loss, terms = parts.objective(batch, student, teacher)

    img_preproc = transforms.Compose([transforms.ToTensor(), transforms.Resize((64, 64), antialias=False)])
    ram_preproc = transforms.Compose([transforms.Resize((64, 64), antialias=False),
                                      transforms.Normalize(mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225])])
    lq_ram = torch.stack([ram_preproc(img_preproc(Image.open(lq).convert("RGB"))) for lq, _ in pairs])
    gt_ram = torch.stack([ram_preproc(img_preproc(Image.open(gt).convert("RGB"))) for _, gt in pairs])
    with torch.no_grad():
        feature_gt = teacher.encode(gt_ram)
        logits_gt = teacher.logits(feature_gt)
        feature_lq = student.tagger.encode(lq_ram)
        logits_lq = student.tagger.logits(feature_lq)
    l_fea = ((feature_lq - feature_gt) ** 2).mean()
    sigmoid_lq, sigmoid_gt = torch.sigmoid(logits_lq), torch.sigmoid(logits_gt)
    l_logits = 1.0 * (-(sigmoid_gt * torch.log(sigmoid_lq) + (1 - sigmoid_gt) * torch.log(1 - sigmoid_lq))).mean()
    assert feature_gt.shape == (3, TINY_RAM_CONFIG.num_tokens, TINY_RAM_CONFIG.embed_width)  # image_proj outputs
    torch.testing.assert_close(terms["l_fea"], l_fea, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(terms["l_logits"], l_logits, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(loss.detach(), l_fea + l_logits, rtol=1e-5, atol=1e-7)
    assert l_fea > 1e-3 and l_logits > 1e-3
    # only the LoRA learns, and both terms reach it
    loss.backward()
    trainable = {name for name, p in student.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in name for name in trainable)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for name, p in student.named_parameters() if p.requires_grad)


def test_training_lowers_the_loss(files, tmp_path):
    """Without dropout and at lr 3e-2, 10 steps lower SeeSR's loss on the training pairs (measured in eval mode); the
    tag agreement is measured on a held-out folder before, every 5 steps and after."""
    argv = command(files, tmp_path / "run", "--drop_path_rate", "0", "--head_dropout", "0", "--learning_rate", "3e-2",
                   "--max_train_steps", "10", "--lr_milestones", "100", "--lr_gamma", "1", "--lr_warmup_steps", "2",
                   "--validation_root_folders", str(files["held_out"]), "--validation_steps", "5", "--max_grad_norm", "1.0",
                   "--gradient_accumulation_steps", "2", "--seed", "3", "--adam_weight_decay", "0", "--dataloader_num_workers", "0")
    result = train.main(train.parse_args(argv))
    assert result["step"] == 10 and [e["step"] for e in result["evaluations"]] == [0, 5, 10]
    assert {e["images"] for e in result["evaluations"]} == {3}  # the held-out folder; all 8 pairs of --root_folders trained
    assert result["lr_per_step"][:3] == [1.5e-2, 3e-2, 3e-2]  # BasicSR's warm-up: iteration 1 of 2 at half the rate
    config = result["config"]
    parts = build_dape_training(config, "cpu")
    student, teacher = parts.models["student"].eval(), parts.models["teacher"]
    batch = torch.utils.data.default_collate([parts.datasets["train"][i] for i in range(8)])
    with torch.no_grad():  # the cross-entropy's floor: the entropy of the teacher's probabilities
        logits_gt = teacher.logits(teacher.encode(ram_pixels(batch["gt"], 64)))
        floor = float(F.binary_cross_entropy_with_logits(logits_gt, torch.sigmoid(logits_gt)))
        before = float(parts.objective(batch, student, teacher)[0]) - floor
        load_dape(student.tagger, tmp_path / "run" / "DAPE.pth")
        after = float(parts.objective(batch, student, teacher)[0]) - floor
    assert after < 0.8 * before, (before, after)


def test_starting_from_a_dape_file(files, runs, tmp_path):
    """--ram_ft_path starts the LoRA from a DAPE.pth (fine-tuning); another rank is one error line."""
    config = train.parse_args(command(files, tmp_path, "--ram_ft_path", str(runs["straight_dir"] / "DAPE.pth"),
                                      "--num_validation_images", "0"))
    parts = build_dape_training(config, "cpu")
    student = parts.models["student"]
    assert len(parts.datasets["train"]) == 8 and parts.datasets["val"] is None
    saved = torch.load(runs["straight_dir"] / "DAPE.pth", weights_only=True)
    for key, value in saved.items():
        torch.testing.assert_close(student.tagger.state_dict()[key], value)
    wrong = train.parse_args(command(files, tmp_path, "--ram_ft_path", str(files["dape"])))  # tests/ram_tiny's rank 4
    with pytest.raises(models.ram.CheckpointError, match="give --lora_rank the rank the file was trained with"):
        build_dape_training(wrong, "cpu")
    wrong.lora_rank = 4  # SeeSR's file layout (with the tag encoder's and text decoder's untrained LoRA) loads
    assert build_dape_training(wrong, "cpu") is not None


def test_lr_schedule_is_basicsr_warmup_and_multistep():
    """BasicSR: iteration k (= step + 1) under warmup_iter runs at lr * k / warmup_iter; MultiStepRestartLR multiplies by
    gamma when its counter reaches a milestone, i.e. from iteration milestone + 1 on."""
    factor = lambda step: train.lr_factor(step, 50, [20000, 30000], 0.5)  # noqa: E731
    assert factor(0) == 1 / 50 and factor(48) == 49 / 50 and factor(49) == 1.0
    assert factor(19999) == 1.0 and factor(20000) == 0.5 and factor(29999) == 0.5 and factor(30000) == 0.25


def test_lora_layer_is_loralibs():
    """loralib's MergedLinear(enable_lora=[True, False, True]) and Linear, written out: W x + b + (alpha / r) B A x on
    the enabled thirds of the output."""
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 12)
    layer = LoRALinear.from_linear(base, rank=2, parts=(True, False, True))
    assert layer.weight is base.weight and layer.lora_A.shape == (4, 6) and layer.lora_B.shape == (8, 2)
    assert torch.equal(layer.lora_B, torch.zeros(8, 2))  # starts as the plain layer
    layer.lora_B.data.normal_()
    x = torch.randn(5, 6)
    a_q, a_v = layer.lora_A[:2], layer.lora_A[2:]
    b_q, b_v = layer.lora_B[:4], layer.lora_B[4:]
    delta = torch.cat([x @ a_q.T @ b_q.T, torch.zeros(5, 4), x @ a_v.T @ b_v.T], dim=1) * (1.0 / 2)
    torch.testing.assert_close(layer(x), base(x) + delta)
    single = LoRALinear(6, 4, rank=3)
    single.lora_B.data.normal_()
    torch.testing.assert_close(single(x), F.linear(x, single.weight, single.bias) + x @ single.lora_A.T @ single.lora_B.T / 3)
    bound = 1 / math.sqrt(6)  # kaiming_uniform_(a=sqrt(5)) on fan_in 6, loralib's init of A
    assert layer.lora_A.abs().max() <= bound


def test_tag_f1_per_image():
    degraded = torch.tensor([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    clean = torch.tensor([[1, 0, 1, 0], [0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)
    scores = tag_f1(degraded, clean)
    torch.testing.assert_close(scores["f1"], torch.tensor([0.5, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores["precision"], torch.tensor([0.5, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(scores["recall"], torch.tensor([0.5, 1.0, 0.0, 0.0]))


def one_line_error(capsys, main) -> str:
    with pytest.raises(SystemExit) as exit_info:
        run_cli(main)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


def test_user_errors_are_one_line(files, tmp_path, capsys):
    def run(*argv):
        return lambda: train.main(train.parse_args(list(argv)))

    line = one_line_error(capsys, run(*command(files, tmp_path / "a", "--lora_rank", "0")))
    assert "--lora_rank must be at least 1" in line
    line = one_line_error(capsys, run(*TINY, "--output_dir", str(tmp_path / "b")))
    assert "--root_folders is required" in line
    line = one_line_error(capsys, run(*TINY, "--root_folders", str(files["data"]), "--ram_path", str(tmp_path / "missing.pth"),
                                      "--output_dir", str(tmp_path / "c")))
    assert "--ram_path" in line and "ram_swin_large_14m.pth" in line
    (tmp_path / "flat").mkdir()
    line = one_line_error(capsys, run(*command(files, tmp_path / "d"), "--root_folders", str(tmp_path / "flat")))
    assert "lacks gt/ or sr_bicubic/" in line and "make_paired_data_DAPE.py" in line
    line = one_line_error(capsys, run(*command(files, tmp_path / "e", "--num_validation_images", "8")))
    assert "--num_validation_images 8 leaves no training pairs" in line
    line = one_line_error(capsys, run("--output_dir", str(tmp_path / "f"), "--resume_from_checkpoint", "latest"))
    assert "--root_folders is required for a new run" in line
    for name in ("a", "b", "c", "d", "e", "f"):
        assert not (tmp_path / name).exists()  # refused before anything was written
    bad = dict(vars(train.parse_args(command(files, tmp_path / "g"))), validation_root_folders=str(tmp_path / "flat"))
    line = one_line_error(capsys, lambda: train.main(Namespace(**bad)))
    assert "--validation_root_folders" in line


def test_bad_flag_from_the_command_line(files):
    result = run_in_process("train_dape.py", *command(files, files["root"] / "x", "--lr_gamma", "2"))
    expected = "error: --lr_gamma must be in (0, 1], got 2.0 (see train_dape.py --help)"
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [expected]


def test_num_processes_checks_in_the_parent_then_launches_this_script(files, tmp_path, monkeypatch, capsys):
    """--num_processes 2: the inputs are checked once, here, then train_dape.py runs as two processes."""
    commands = []

    def processes(command, env):
        commands.append(command)
        return subprocess.CompletedProcess(command, 0)

    monkeypatch.setattr(launch_utils.subprocess, "run", processes)
    (tmp_path / "flat").mkdir()
    with pytest.raises(UserError, match="lacks gt/ or sr_bicubic/"):
        train.launch([*command(files, tmp_path / "a", "--num_processes", "2"), "--root_folders", str(tmp_path / "flat")])
    assert not commands
    argv = command(files, tmp_path / "b", "--num_processes", "2")
    train.launch(argv)
    assert "starting 2 CPU processes (gloo) with torch.distributed.run" in capsys.readouterr().out
    assert [command[3:] for command in commands] == [["--standalone", "--nproc_per_node=2", str(ROOT / "train_dape.py"), *argv]]
