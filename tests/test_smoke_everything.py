"""Everything runs somewhere: every bench/ script, every scripts/*.sh, every preset in configs/.

* **Benchmarks.** Each ``bench/*.py`` runs at its smallest setting on the CPU (``--smoke`` where the script has one)
  and must finish and print its Markdown table. They share one interpreter (tests/bench_driver.py: one torch and
  diffusers import instead of seventeen). A new bench script without a row in :data:`BENCH_SMOKE` fails the suite.
* **Shell scripts.** Each ``scripts/*.sh`` runs with bash in a stand-in checkout whose Python (``.venv/bin/python``,
  ``$PYTHON``) and ``accelerate`` only record their command lines (the GPU count they are asked for is 2, so the
  multi-GPU launchers take their multi-process form). Every recorded command must then parse with the parser of the
  program it calls (``train_*.py``, ``infer.py`` sub-commands, ``scripts/*.py``) and, for launchers, with
  ``accelerate launch``'s own parser. What the programs then do with tiny settings is tested by their own test files
  and by tests/test_kaggle_cells.py, which runs the docs' cells (torchrun, two processes) for real.
* **Presets.** Every ``configs/*.yaml`` is read by its trainer's ``--config`` and the model it names is built.

The shell scripts and presets cost mostly the first import of the trainers.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# The smallest setting of each benchmark; every bench/*.py except the helpers in bench/common.py needs a row.
BENCH_SMOKE = {
    "bench_ddpm.py": "--smoke",
    "bench_ddpm_vs_diffusers.py": "--smoke",
    # This checkout as its own --baseline_checkout: the option's import path runs too.
    "bench_degradations.py": f"--size 64 --batch 2 --rounds 1 --devices cpu --baseline_checkout {shlex.quote(str(ROOT))}",
    "bench_dit_samplers.py": "--smoke",
    "bench_dit_user.py": "--smoke",
    "bench_dit_vs_lightningdit.py": "--smoke",
    "bench_fast_samplers.py": "--smoke",
    "bench_latent_samplers.py": "--smoke",
    "bench_latent_unet_vs_note.py": "--size tiny --channels 4 --latent_size 8 --per_user 2 --steps 3 --rounds 1",
    "bench_loop_overhead.py": "--smoke",
    "bench_loop_overhead_families.py": "--smoke",
    "bench_phaseformer.py": "--smoke",
    "bench_seesr_injector.py": "--device cpu --skip_real_size --tiny_resolution 64 --repeats 1 --warmup 0 --tile_sizes 32 "
    "--tile_image_size 64 --tile_steps 1 --tile_rounds 1",
    "bench_seesr_pipeline.py": "--device cpu --size tiny --steps 1 --time_resolution 64 --memory_resolutions --repeats 1",
    # Every method in the driver's process: a fresh process per method (the default, for the CPU memory column) would
    # cost an interpreter start-up each.
    "bench_seesr_tiled_vae.py": "--device cpu --config tiny --latent_size 16 --tile_size 8 --same_process",
    "bench_seesr_vs_reference.py": "--smoke",  # no --reference_checkout: ours alone, the reference cells n/a
    "bench_throughput.py": "--smoke",
}
BENCH_HELPERS = {"common.py", "__init__.py"}


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), CUDA_VISIBLE_DEVICES="", PYTHONUNBUFFERED="1")


@pytest.fixture(scope="module")
def bench_results(tmp_path_factory):
    """``{script: (status, output)}`` for every benchmark of :data:`BENCH_SMOKE` that exists in this checkout."""
    work = tmp_path_factory.mktemp("bench")
    together = [f"{ROOT / 'bench' / name} {args}" for name, args in BENCH_SMOKE.items() if (ROOT / "bench" / name).is_file()]
    driver = subprocess.run([sys.executable, str(ROOT / "tests" / "bench_driver.py"), str(work / "results.json"), *together],
                            cwd=work, env=child_env(), capture_output=True, text=True, timeout=600)
    assert driver.returncode == 0, driver.stderr[-3000:]
    return {Path(shlex.split(r["command"])[0]).name: (r["status"], r["output"]) for r in json.loads((work / "results.json").read_text())}


def test_every_bench_script_has_a_smoke_setting():
    scripts = {path.name for path in (ROOT / "bench").glob("*.py")} - BENCH_HELPERS
    assert scripts - set(BENCH_SMOKE) == set(), "add the new bench script's smallest CPU setting to BENCH_SMOKE"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(BENCH_SMOKE))
def test_bench_script_runs_at_its_smallest_setting(bench_results, name):
    if not (ROOT / "bench" / name).is_file():
        pytest.skip(f"bench/{name} is not in this checkout")
    status, output = bench_results[name]
    assert status == "ok", output[-3000:]
    assert "|---" in output, output[-2000:]  # its Markdown table was printed


def put_sum(a, b, queue):  # a spawned process's target: importable from this module
    queue.put(a + b)


def test_run_in_fresh_process_returns_the_queued_result_and_stops_on_a_failure():
    """bench/common.run_in_fresh_process, the benches' process per measurement (their default, the CPU memory
    column), which the --smoke settings above skip: the result comes back; a failing process is one error line."""
    from bench.common import run_in_fresh_process

    assert run_in_fresh_process(put_sum, (2, 3), "the sum") == 5
    with pytest.raises(SystemExit, match=r"^error: the sum failed \(exit 1\); see its traceback above\.$"):
        run_in_fresh_process(put_sum, (2, None), "the sum")


def test_run_all_names_only_scripts_that_exist_with_flags_they_define(tmp_path):
    """bench/run_all.sh with a recording Python: every command is an existing bench script and each --flag it passes is
    one that script defines (a renamed flag would otherwise only fail on the GPU server)."""
    calls = run_shell_script(tmp_path, "bench/run_all.sh", [str(tmp_path / "out")], {})
    scripts = [call for call in calls if call[0] == "python" and call[1].startswith("bench/")]
    assert len(scripts) >= 6
    for call in scripts:
        source = (ROOT / call[1]).read_text()
        flags = [arg for arg in call[2:] if arg.startswith("--")]
        assert all(f'"{flag}"' in source for flag in flags), (call, flags)


# --------------------------------------------------------------------------------------------------
# Shell scripts: run for real by bash, the Python they call replaced by a recorder
# --------------------------------------------------------------------------------------------------

RECORDER = r"""#!/usr/bin/env bash
# Test stand-in for python / accelerate: records its command line; answers the GPU-count probe.
name=$(basename "$0")
printf '%s\0' "$name" "$@" > "$CALL_LOG/$(date +%s%N)-$$"
if [ "$name" != accelerate ] && [ "${1:-}" = "-m" ] && [ "${2:-}" = utils.registry ]; then
  PYTHONPATH="$REPO_ROOT" exec "$REAL_PYTHON" "$@"  # the registries' keys, read for real (scripts loop over them)
fi
if [ "$name" != accelerate ] && [ "${1:-}" = "-c" ]; then
  case "${2:-}" in *device_count*) echo "${STUB_GPUS:-2}" ;; esac
else
  echo "recorded: $name $*"  # some output, as the real program gives (run_all.sh filters it with grep)
fi
exit 0
"""


def run_shell_script(tmp_path: Path, script: str, args: list[str], env: dict) -> list[list[str]]:
    """Run ``script`` with bash in a stand-in checkout (links to scripts/, bench/ and configs/; a recording
    ``.venv/bin/python``, ``$PYTHON`` and ``accelerate``); return the recorded commands in order."""
    root = tmp_path / "checkout"
    if not root.exists():
        root.mkdir()
        for folder in ("scripts", "bench", "configs"):
            (root / folder).symlink_to(ROOT / folder)
        (root / ".venv" / "bin").mkdir(parents=True)
        (root / "bin").mkdir()
        for stub in (root / ".venv" / "bin" / "python", root / "bin" / "python", root / "bin" / "accelerate"):
            stub.write_text(RECORDER)
            stub.chmod(0o755)
    log = tmp_path / "calls"
    log.mkdir(exist_ok=True)
    for old in log.iterdir():
        old.unlink()
    full_env = dict(os.environ, CALL_LOG=str(log), PATH=f"{root / 'bin'}:{os.environ['PATH']}", PYTHON=str(root / "bin" / "python"),
                    REPO_ROOT=str(ROOT), REAL_PYTHON=sys.executable, STUB_GPUS="2", OMP_NUM_THREADS="1", **env)
    full_env.pop("CUDA_VISIBLE_DEVICES", None)
    result = subprocess.run(["bash", str(root / script), *args], cwd=tmp_path, env=full_env, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    calls = []
    for entry in sorted(log.iterdir(), key=lambda p: int(p.name.split("-")[0])):
        calls.append(entry.read_bytes().decode().split("\0")[:-1])
    return calls


def program_calls(calls: list[list[str]]) -> list[tuple[list[str], list[str]]]:
    """``(launcher args, program argv)`` for each recorded call that runs one of the repository's programs."""
    programs = []
    for call in calls:
        args = call[1:]
        if call[0] == "accelerate":
            assert args[0] == "launch", call
            args = args[1:]
        elif args[:2] == ["-m", "accelerate.commands.launch"]:
            args = args[2:]
        elif args and args[0] in ("-c", "-m"):
            continue  # version checks, GPU probes, pip, pytest
        index = next(i for i, arg in enumerate(args) if arg.endswith(".py"))
        programs.append((args[:index], args[index:]))
    return programs


def parse_program(argv: list[str]):
    """Parse ``argv`` (``program.py ARGS``) with that program's own parser, from the repository root."""
    import importlib
    import importlib.util

    path = ROOT / argv[0]
    if path.parent == ROOT:  # train_*.py, infer.py: importable modules (pytest puts the root on sys.path)
        return importlib.import_module(path.stem).parse_args(argv[1:])
    name = f"_smoke_{path.parent.name}_{path.stem}"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name].parse_args(argv[1:])


def check_calls(calls, monkeypatch, expected_programs: list[str]) -> list:
    from accelerate.commands.launch import launch_command_parser

    monkeypatch.chdir(ROOT)  # configs/... paths are relative to the checkout
    programs = program_calls(calls)
    assert [argv[0] for _, argv in programs] == expected_programs
    parsed = []
    for launcher, argv in programs:
        if launcher:
            launch = launch_command_parser().parse_args([*launcher, argv[0], *argv[1:]])
            assert launch.training_script == argv[0]
        parsed.append(parse_program(argv))
    return parsed


def test_demo_and_setup_scripts(tmp_path, monkeypatch):
    calls = run_shell_script(tmp_path, "scripts/demo.sh", [], {})
    assert any(call[1:4] == ["-m", "pip", "install"] and "requirements.txt" in call for call in calls)  # setup.sh ran
    make_data, train, infer_args = check_calls(calls, monkeypatch, ["scripts/make_demo_data.py", "train_ddpm_highres.py", "infer.py"])
    assert train.config == "configs/ddpm_demo.yaml" and train.model == "tiny"
    assert infer_args.sampler == "ddpm" and infer_args.num_inference_steps == 250


def test_test_script_installs_then_runs_pytest_with_the_arguments(tmp_path):
    calls = run_shell_script(tmp_path, "scripts/test.sh", ["-x", "-q", "tests/test_cli.py"], {})
    # two xdist workers, the 15 slowest tests listed, then the caller's arguments (which override, e.g. -n 0)
    assert calls[-1][1:] == ["-m", "pytest", "-n", "auto", "--maxprocesses", "4", "--dist", "worksteal", "--durations=15",
                             "-x", "-q", "tests/test_cli.py"]
    assert any("requirements-eval.txt" in call for call in calls[:-1])


def test_train_phaseformer_launcher_takes_its_two_process_form(tmp_path, monkeypatch):
    data = tmp_path / "LSUI"
    data.mkdir()
    calls = run_shell_script(tmp_path, "scripts/train_phaseformer.sh", ["--dataset_path", str(data), "--stop_epoch", "1"], {})
    launcher, _ = program_calls(calls)[0]
    assert "--multi_gpu" in launcher and launcher[launcher.index("--num_processes") + 1] == "2"
    (args,) = check_calls(calls, monkeypatch, ["train_phaseformer.py"])
    assert args.config == "configs/phaseformer_lsui.yaml"


def test_train_and_infer_user_scripts(tmp_path, monkeypatch):
    data, vavae = tmp_path / "users", tmp_path / "vavae.pt"
    data.mkdir()
    vavae.write_bytes(b"")
    env = {"DATA": str(data), "VAVAE": str(vavae), "OUT": str(tmp_path / "run")}
    calls = run_shell_script(tmp_path, "scripts/train_dit_user.sh", ["--max_epochs", "1"], env)
    extract, train = check_calls(calls, monkeypatch, ["scripts/extract_features.py", "train_dit_user.py"])
    assert train.config == "configs/user_dit_b.yaml" and train.num_processes == 2
    calls = run_shell_script(tmp_path, "scripts/infer_user.sh", [str(tmp_path / "best.ckpt"), "--user_ids", "1", "2"], env)
    (infer_args,) = check_calls(calls, monkeypatch, ["infer.py"])
    assert list(infer_args.user_ids) == [1, 2]


def test_infer_phaseformer_script(tmp_path, monkeypatch):
    calls = run_shell_script(
        tmp_path, "scripts/infer_phaseformer.sh", [str(tmp_path / "netG.pth"), str(tmp_path / "in"), str(tmp_path / "out"),
                                                   str(tmp_path / "gt"), "--tile", "64"], {}
    )
    (args,) = check_calls(calls, monkeypatch, ["infer.py"])
    assert args.gt_dir == str(tmp_path / "gt") and args.tile == 64
    calls = run_shell_script(tmp_path, "scripts/infer_phaseformer.sh", [str(tmp_path / "netG.pth"), "in", "out", ""], {})
    (args,) = check_calls(calls, monkeypatch, ["infer.py"])
    assert args.gt_dir is None


def test_seesr_variant_scripts(tmp_path, monkeypatch):
    from models.timestep_adaptive import INJECTORS

    variants = list(INJECTORS.names())  # the scripts' default: every registered variant
    calls = run_shell_script(tmp_path, "scripts/train_seesr_variants.sh", [], {"EXTRA": "--max_train_steps 2"})
    parsed = check_calls(calls, monkeypatch, ["train_seesr_timestep.py"] * len(variants))
    assert [args.injector for args in parsed] == variants and "timestep_multiscale" in variants
    assert all("--multi_gpu" in launcher for launcher, _ in program_calls(calls))
    calls = run_shell_script(tmp_path, "scripts/train_seesr_variants.sh", [], {"VARIANTS": "timestep_only"})
    assert [args.injector for args in check_calls(calls, monkeypatch, ["train_seesr_timestep.py"])] == ["timestep_only"]
    experience, lr = tmp_path / "experience", tmp_path / "LR"
    for variant in variants:
        (experience / variant / "checkpoint-4").mkdir(parents=True)
    (experience / "timestep_multiscale" / "checkpoint-4" / "multi_scale_injector").mkdir()
    lr.mkdir()
    (lr / "0001.png").write_bytes(b"")
    env = {"EXPERIENCE": str(experience), "LR": str(lr), "GT": str(tmp_path / "GT"), "RESULTS": str(tmp_path / "results")}
    calls = run_shell_script(tmp_path, "scripts/compare_seesr_variants.sh", [], env)
    expected = ["infer.py"] * len(variants) + ["scripts/create_comparison_grid.py"] + ["scripts/eval_sr.py"] * len(variants)
    parsed = check_calls(calls, monkeypatch, expected + ["scripts/plot_timestep_weights.py"])
    assert parsed[len(variants)].inputs == [str(tmp_path / "results" / v / "sample00" / "0001.png") for v in variants]


def test_train_dape_launcher_takes_its_two_process_form(tmp_path, monkeypatch):
    """SeeSR's scripts/train_dape.sh (basicsr/train.py -opt dape.yaml) as accelerate launch with configs/dape.yaml."""
    calls = run_shell_script(tmp_path, "scripts/train_dape.sh", ["--root_folders", str(tmp_path), "--max_train_steps", "2"], {})
    launcher, _ = program_calls(calls)[0]
    assert "--multi_gpu" in launcher and launcher[launcher.index("--num_processes") + 1] == "2"
    (args,) = check_calls(calls, monkeypatch, ["train_dape.py"])
    assert args.config == "configs/dape.yaml" and args.train_batch_size == 8 and args.lr_milestones == [20000, 30000]


@pytest.mark.parametrize("script, program", [("train_dape.sh", "train_dape.py"), ("train_phaseformer.sh", "train_phaseformer.py")])
def test_gpu_launchers_without_a_gpu_are_one_line_naming_the_cpu_command(tmp_path, script, program):
    """scripts/lib/launch_on_gpus.sh with no GPU (GPUS=0): exit 2, one line, the CPU command with the same flags."""
    env = dict(os.environ, GPUS="0", PYTHON="python")
    result = subprocess.run(["bash", str(ROOT / "scripts" / script), "--max_train_steps", "2"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stdout == "", result.stdout + result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: no CUDA GPU is visible; on a CPU run: python {program} --config configs/")
    assert line.endswith("--max_train_steps 2 --device cpu")


def test_every_shell_script_is_exercised():
    tested = {"demo.sh", "setup.sh", "test.sh", "train_phaseformer.sh", "train_dit_user.sh", "infer_user.sh",
              "infer_phaseformer.sh", "train_seesr_variants.sh", "compare_seesr_variants.sh", "train_dape.sh"}
    assert {path.name for path in (ROOT / "scripts").glob("*.sh")} - tested == set()


# --------------------------------------------------------------------------------------------------
# Presets: every configs/*.yaml read by its trainer, and the model it names built
# --------------------------------------------------------------------------------------------------

PRESET_FAMILIES = {"ddpm": "train_ddpm_highres", "phaseformer": "train_phaseformer", "seesr": "train_seesr_timestep",
                   "user": "train_dit_user", "dape": "train_dape"}


def test_every_preset_has_a_family():
    names = sorted(path.stem for path in (ROOT / "configs").glob("*.yaml"))
    assert all(name.split("_")[0] in PRESET_FAMILIES for name in names), names
    assert len(names) >= 10


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name, expected", [
    ("ddpm_cifar10_32_paper", ("32", 32, 35_746_307)),  # Ho et al. 2020's CIFAR-10 network, 35.7M
    ("ddpm_celeba_64", ("64", 64, None)),
    ("ddpm_demo", ("tiny", 32, None)),
])
def test_ddpm_presets_build_their_unet(name, expected):
    import train_ddpm_highres as train
    from models.ddpm_unet import build_ddpm_unet

    args = train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml")])
    config = train.resolve_config(args, None, "flags")
    unet = build_ddpm_unet(config.model, config.size, config.dropout)
    preset, size, count = expected
    assert (config.model, unet.config.sample_size) == (preset, size)
    if count is not None:
        assert parameters(unet) == count


@pytest.mark.parametrize("name, model", [("phaseformer_lsui", "phaseformer"), ("phaseformer_reference", "phaseformer"),
                                         ("phaseformer_tiny", "phaseformer_tiny")])
def test_phaseformer_presets_build_their_model(tmp_path, name, model):
    import torch

    import train_phaseformer as train
    from models.phaseformer import build_phaseformer

    args = train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--dataset_path", str(tmp_path)])
    config = train.resolve_config(args, None, "flags")
    network = build_phaseformer(config.model, eca=config.eca).eval()
    assert config.model == model
    if model == "phaseformer":
        assert round(parameters(network) / 1e6, 2) == 1.78  # the official model_with_eca.Restormer
    with torch.no_grad():
        low, high = network(torch.rand(1, 3, 16, 16))
    assert low.shape == (1, 3, 16, 16) and high.shape == (1, 3, 32, 32)


@pytest.mark.parametrize("name, size", [("user_dit_b", "B"), ("user_dit_tiny", "tiny")])
def test_user_presets_build_their_dit(tmp_path, name, size):
    import train_dit_user as train
    from models.user_generation import BACKBONES

    args = train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--latent_dir", str(tmp_path),
                             "--output_dir", str(tmp_path / "out")])
    config = train.resolve_config(args, None, "flags")
    model = BACKBONES.get(config.backbone).build(
        config.model_size, num_users=31, in_channels=32, input_size=16, patch_size=config.patch_size, cfg_dropout=config.cfg_dropout,
        qk_norm=config.qk_norm,
        gradient_checkpointing=False, init_from=None).model
    assert config.model_size == size and model.num_classes == 31
    if size == "B":
        assert 125e6 < parameters(model) < 135e6  # DiT-B/1 on 32-channel latents, ~130M


@pytest.mark.parametrize("name", ["dape", "dape_tiny"])
def test_dape_presets_build_their_student(tmp_path, monkeypatch, name):
    """On tiny RAM files (RAM's Swin-L weights are not available here): the preset's LoRA student, teacher and data."""
    import numpy as np
    from PIL import Image

    import models.ram
    import train_dape as train
    from models.dape import lora_parameters
    from recipes.dape import build_dape_training
    from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram

    monkeypatch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)
    ram = write_tiny_ram(tmp_path / "ram")["ram"]
    for sub in ("gt", "sr_bicubic"):
        (tmp_path / "data" / sub).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((64, 64, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "data" / sub / f"{i:07d}.png")
    args = train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--ram_path", str(ram),
                             "--root_folders", str(tmp_path / "data"), "--num_validation_images", "1"])
    parts = build_dape_training(args, "cpu")
    student = parts.models["student"].tagger
    assert args.lora_rank == 8 and student.visual_encoder.layers[0].blocks[0].attn.qkv.lora_A.shape == (16, 8)
    assert len(lora_parameters(student)) == 2 * (sum(TINY_RAM_CONFIG.depths) + 2 * TINY_RAM_CONFIG.num_hidden_layers)
    assert len(parts.datasets["train"]) == 2 and parts.datasets["train"][0]["gt"].shape[-1] == args.image_size
    if name == "dape":  # SeeSR's dape.yaml
        expected = (1e-4, 8, [20000, 30000], 0.5, 10, 300000)
        assert (args.learning_rate, args.train_batch_size, args.lr_milestones, args.lr_gamma, args.seed, args.max_train_steps) == expected


@pytest.mark.parametrize("name", ["seesr_sd2_base", "seesr_tiny"])
def test_seesr_presets_build_their_models(tmp_path, name, monkeypatch):
    """On the tiny SD2 folder and a tiny RAM (SD2-base's and RAM's weights are not available here): the preset's
    ControlNet, image attention and injector build through the trainer's builder."""
    import models.ram
    import train_seesr_timestep as train
    from models.seesr import has_image_attention
    from recipes.seesr import build_seesr_training
    from tests.ram_tiny import TINY_RAM_CONFIG, write_tiny_ram
    from tests.sd2_tiny import build_tiny_sd2

    monkeypatch.setattr(models.ram, "RAM_SWIN_L", TINY_RAM_CONFIG)
    ram = write_tiny_ram(tmp_path / "ram")
    args = train.parse_args(["--config", str(ROOT / "configs" / f"{name}.yaml"), "--pretrained_model_path",
                             str(build_tiny_sd2(tmp_path / "sd2")), "--train_data_dir", str(tmp_path),
                             "--output_dir", str(tmp_path / "out"), "--ram_path", str(ram["ram"])])
    parts = build_seesr_training(args, "cpu", datasets={})
    unet, controlnet, injector = parts.models["unet"], parts.models["controlnet"], parts.models.get("injector")
    assert has_image_attention(controlnet) == has_image_attention(unet) == (name == "seesr_sd2_base")  # SeeSR proper
    assert ("tagger" in parts.models) == (name == "seesr_sd2_base")
    assert (injector is None) == (args.injector == "baseline") and (injector is None or injector.variant == args.injector)
    if name == "seesr_tiny":
        assert args.injector == "timestep_multiscale" and tuple(controlnet.config.conditioning_embedding_out_channels) == (4, 8, 8, 8)
