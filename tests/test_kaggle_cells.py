"""The Kaggle notebook cells of docs/*.md, run as written on CPU with tiny data.

Each family's doc has a "Kaggle" section whose cells are fenced ``bash`` blocks after an HTML comment
``<!-- kaggle-cell: ROLE -->``; a cell is a ``%%bash`` notebook cell. This test reads the cells, swaps
``/kaggle/input`` and ``/kaggle/working`` for temporary folders (``working/lab`` is a link to this repository, where
the set-up cell would have cloned it), writes tiny data where the cells expect the Kaggle data sets, and runs each
cell with bash, in document order:

* ``setup`` (git clone, pip install) is skipped;
* the cells name their sizes as shell variables with defaults (``EPOCHS=${EPOCHS:-50}``, ``GPUS``, ``PRECISION``,
  ``EXTRA_ARGS``): the test sets them in the environment (tiny presets, ``PRECISION`` fp32 on CPU), so the commands
  are the users' own;
* the two-process training cells run as two processes on CPU (torchrun, gloo; ``CUDA_VISIBLE_DEVICES`` is empty
  so a GPU machine runs the same): these are the suite's two-process runs of each trainer, so the checkpoint they
  leave (in ``previous-run``) must hold both processes' RNG states and no DDP ``module.`` prefix; the resume cells run
  with ``GPUS=1`` to save two interpreter start-ups per family (a checkpoint of two processes resumes on one);
* before a ``resume`` cell the session ends: everything the previous cells wrote in ``/kaggle/working`` moves to
  ``/kaggle/input/previous-run`` (a previous version's output attached as a data set), as in a new Kaggle session,
  and the ``data`` cells (links into ``/kaggle/working``) run again, as a user runs them in every session.

Cells of a second program in the same doc carry a group, ``<!-- kaggle-cell[dape]: ROLE -->`` (DAPE, SeeSR's
stage 1, in docs/seesr.md), and run as a notebook of their own after the group-less set-up cell.

The output of every cell must be free of carriage returns (readable progress in a notebook's log). SeeSR's cells
load RAM from its weight file, which does not record the architecture: a ``sitecustomize`` in the cells'
``PYTHONPATH`` swaps RAM's Swin-L for the tiny configuration of tests/ram_tiny.py, as the ``tiny_ram`` fixture of
tests/test_train_seesr.py does in-process. The file starts 18 Python processes that import torch and diffusers, and 8
torchrun launchers: the suite's longest file (its times are in docs/benchmarks.md), marked slow.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
CELL = re.compile(r"<!-- kaggle-cell(?:\[([\w-]+)\])?: ([\w-]+) -->\s*\n```bash\n(.*?)```", re.S)
ROLES = {"setup", "data", "extract", "train", "resume", "infer"}
PROGRESS_LINE = re.compile(r"step \d+/\d+ \| loss \d")
SKIPPED = {"setup"}  # git clone and pip install: the test runs in this checkout with its environment

pytestmark = pytest.mark.slow

TINY_RAM_SITECUSTOMIZE = '''
"""Test-only: RAM's Swin-L becomes the tiny configuration of tests/ram_tiny.py when models.ram is imported."""
import importlib.abc
import importlib.machinery
import sys


class _TinyRAM(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name != "models.ram":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            from tests.ram_tiny import TINY_RAM_CONFIG

            module.RAM_SWIN_L = TINY_RAM_CONFIG

        spec.loader.exec_module = exec_module
        return spec


sys.meta_path.insert(0, _TinyRAM())
'''


def read_cells(doc: str, group: str = "") -> list[tuple[str, str]]:
    """(role, bash text) of every marked cell of ``docs/<doc>`` in ``group``, in order, without the ``%%bash`` line."""
    text = (ROOT / "docs" / doc).read_text(encoding="utf-8")
    cells = []
    for cell_group, role, body in CELL.findall(text):
        if cell_group != group:
            continue
        assert role in ROLES, f"docs/{doc}: unknown cell role {role!r} (known: {sorted(ROLES)})"
        lines = body.splitlines()
        assert lines and lines[0].strip() == "%%bash", f"docs/{doc}: a {role} cell must start with %%bash"
        cells.append((role, "\n".join(lines[1:]) + "\n"))
    return cells


class KaggleSession:
    """A stand-in for a Kaggle notebook: /kaggle/input and /kaggle/working in a temporary folder."""

    def __init__(self, root: Path):
        self.input = root / "input"
        self.working = root / "working"
        self.home = root / "home"
        for folder in (self.input, self.working, self.home):
            folder.mkdir(parents=True)
        (self.working / "lab").symlink_to(ROOT, target_is_directory=True)
        self.site = root / "site"
        self.site.mkdir()

    def path(self, kaggle_path: str) -> Path:
        return Path(self.rewrite(kaggle_path))

    def rewrite(self, text: str) -> str:
        return text.replace("/kaggle/input", str(self.input)).replace("/kaggle/working", str(self.working))

    def new_session(self) -> None:
        """A new session: what the previous one wrote in /kaggle/working comes back as /kaggle/input/previous-run."""
        previous = self.input / "previous-run"
        previous.mkdir()
        for entry in self.working.iterdir():
            if entry.name != "lab":
                shutil.move(str(entry), previous / entry.name)

    def run(self, role: str, cell: str, env: dict[str, str], tiny_ram: bool = False) -> str:
        """Runs one cell with bash; ``env`` sets the cell's variables (Kaggle paths in them are rewritten too)."""
        environment = dict(
            os.environ,
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
            OMP_NUM_THREADS="1",
            CUDA_VISIBLE_DEVICES="",
            HOME=str(self.home),
            PYTHONPATH=os.pathsep.join(([str(self.site)] if tiny_ram else []) + [os.environ.get("PYTHONPATH", "")]).strip(os.pathsep),
            **{name: self.rewrite(value) for name, value in env.items()},
        )
        environment.pop("PROGRESS", None)
        if tiny_ram:
            (self.site / "sitecustomize.py").write_text(TINY_RAM_SITECUSTOMIZE)
        result = subprocess.run(["bash", "-e", "-c", self.rewrite(cell)], capture_output=True, text=True, env=environment,
                                timeout=600)
        output = result.stdout + result.stderr
        assert result.returncode == 0, f"{role} cell failed:\n{self.rewrite(cell)}\n{output[-4000:]}"
        assert "\r" not in output, f"{role} cell: carriage returns in the output (a progress bar off a terminal)"
        return output


def run_cells(session: KaggleSession, doc: str, env_per_role: dict[str, dict[str, str]], tiny_ram: bool = False,
              group: str = "") -> dict:
    """Runs every cell of ``doc`` (of ``group``) but the set-up; returns each role's output (the last cell of a role wins)."""
    cells = read_cells(doc, group)
    roles = [role for role, _ in cells]
    assert {"train", "resume"} <= set(roles) and (group or "setup" in roles), \
        f"docs/{doc}: a Kaggle section needs setup, train and resume cells"
    outputs = {}
    for role, cell in cells:
        if role in SKIPPED:
            continue
        if role == "resume":  # a new session: the user runs the set-up and data cells again, then this one
            session.new_session()
            for data_role, data_cell in cells:
                if data_role == "data":
                    session.run(data_role, data_cell, env_per_role.get(data_role, {}), tiny_ram=tiny_ram)
        outputs[role] = session.run(role, cell, env_per_role.get(role, {}), tiny_ram=tiny_ram)
    for role in ("train", "resume"):  # the plain progress lines a notebook shows instead of a tqdm bar
        assert PROGRESS_LINE.search(outputs[role]), f"docs/{doc} {role}: no progress line in\n{outputs[role][-3000:]}"
    return outputs


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_two_process_checkpoint(checkpoint: dict, weights: str) -> None:
    """A checkpoint written by two processes: both RNG states, and the weights without DDP's ``module.`` prefix."""
    assert checkpoint["num_processes"] == 2 and len(checkpoint["rng"]) == 2, {k: checkpoint.get(k) for k in ("num_processes",)}
    assert checkpoint[weights] and not any(key.startswith("module.") for key in checkpoint[weights])


def test_cells_are_marked_in_every_family_doc():
    for doc in ("ddpm.md", "phaseformer.md", "user_generation.md", "seesr.md"):
        cells = read_cells(doc)
        roles = [role for role, _ in cells]
        assert roles[0] == "setup" and "train" in roles and "resume" in roles, (doc, roles)
        assert roles.index("train") < roles.index("resume"), doc
        for role, cell in cells:
            if role in ("train", "resume"):
                assert "--checkpointing_minutes" in cell, f"{doc} {role}: no time-based checkpoints"
                assert "torchrun --standalone --nproc_per_node ${GPUS:-2}" in cell, f"{doc} {role}: not one process per GPU"
                assert "--mixed_precision ${PRECISION:-fp16}" in cell, f"{doc} {role}: not fp16 on the T4s"
            assert "/kaggle/working/lab" in cell or role == "setup", f"{doc} {role}: the cell does not cd to the code"
    dape = dict(read_cells("seesr.md", "dape"))  # SeeSR's stage 1, after the SeeSR section's set-up cell
    assert {"train", "resume"} <= set(dape)
    for role in ("train", "resume"):
        assert "--checkpointing_minutes" in dape[role] and "--mixed_precision ${PRECISION:-fp16}" in dape[role]
        assert "torchrun --standalone --nproc_per_node ${GPUS:-2}" in dape[role] and "/kaggle/working/lab" in dape[role]


def test_ddpm_cells(tmp_path):
    from data.demo_data import build_demo_image_folder

    session = KaggleSession(tmp_path)
    build_demo_image_folder(session.path("/kaggle/input/images"), size=16, count=8, seed=0)
    common = {"DATASET": "folder", "DATA": "/kaggle/input/images", "SIZE": "16", "PRECISION": "no", "RUN": "tiny"}
    tiny = "--model tiny --train_batch_size 2 --effective_batch 4 --lr_warmup_steps 1 --num_samples 2 --sample_steps 2 " \
           "--quick_every 0 --report_to none"
    env = {
        "train": {**common, "EPOCHS": "1", "EXTRA_ARGS": tiny},
        "resume": {**common, "GPUS": "1", "EXTRA_ARGS": "--epochs 2"},
        "infer": {**common, "EXTRA_ARGS": "--steps 2 --device cpu"},
    }
    outputs = run_cells(session, "ddpm.md", env)
    assert "x 2 process(es)" in outputs["train"]
    assert "resumed at epoch 1" in outputs["resume"]
    assert_two_process_checkpoint(load(session.path("/kaggle/input/previous-run/checkpoints/tiny/ddpm_last.pt")), "model")
    run = session.path("/kaggle/working/checkpoints/tiny")
    assert load(run / "ddpm_last.pt")["epoch"] == 2
    assert session.path("/kaggle/working/samples.png").is_file()


def test_phaseformer_cells(tmp_path):
    from data.underwater import build_synthetic_underwater

    session = KaggleSession(tmp_path)
    pairs = build_synthetic_underwater(tmp_path / "synthetic", size=32, train_count=6, test_count=2, seed=0)
    lsui = session.path("/kaggle/input/lsui/LSUI")
    for kaggle_name, name in (("input", "input"), ("GT", "gt")):  # LSUI ships one folder of pairs, GT in capitals
        (lsui / kaggle_name).mkdir(parents=True)
        for split in ("train", "test"):
            for image in (pairs / split / name).iterdir():
                shutil.copy(image, lsui / kaggle_name / f"{split}_{image.name}")
    common = {"CONFIG": "configs/phaseformer_tiny.yaml", "BATCH": "2", "PRECISION": "no"}
    env = {
        "train": {**common, "EXTRA_ARGS": "--test_split 2 --no_perceptual --stop_epoch 1 --report_to none"},
        "resume": {**common, "GPUS": "1", "EXTRA_ARGS": "--stop_epoch 2"},
        "infer": {"EXTRA_ARGS": "--device cpu"},
    }
    outputs = run_cells(session, "phaseformer.md", env)
    assert "batch 2 per device x 2 process(es) x accumulation 1 = 4 per optimiser step" in outputs["train"]
    assert "loss weights identical on all 2 processes" in outputs["train"]  # all-reduced outside the DDP module
    assert "resumed at epoch 1" in outputs["resume"]
    trained = load(session.path("/kaggle/input/previous-run/checkpoint/LSUI/netG_model_latest.pth"))
    assert_two_process_checkpoint(trained, "model")
    assert np.isfinite(trained["history"][-1]["psnr"])
    run = session.path("/kaggle/working/checkpoint/LSUI")
    assert load(run / "netG_model_latest.pth")["epoch"] == 2
    assert (session.path("/kaggle/working/results") / "metrics.csv").is_file()


def test_user_generation_cells(tmp_path):
    from tests.user_pipeline_data import write_tiny_vavae, write_user_folders

    session = KaggleSession(tmp_path)
    write_user_folders(session.path("/kaggle/input/micro-doppler/data_split"), [1, 2, 3, 4, 5], 3)
    vavae = session.path("/kaggle/input/vavae/vavae-imagenet256-f16d32-dinov2.pt")
    vavae.parent.mkdir(parents=True)
    write_tiny_vavae(vavae)
    tiny = "--vavae_config tiny"
    env = {
        "extract": {"EXTRA_ARGS": f"{tiny} --image_size 32 --val_fraction 0.34 --device cpu"},
        "train": {"BATCH": "4", "EPOCHS": "1", "PRECISION": "no",
                  "EXTRA_ARGS": f"{tiny} --model_size tiny --preview_samples 1 --preview_steps 2 --report_to none"},
        "resume": {"PRECISION": "no", "GPUS": "1", "EXTRA_ARGS": "--max_epochs 2"},
        "infer": {"EXTRA_ARGS": f"{tiny} --num_steps 2 --device cpu"},
    }
    outputs = run_cells(session, "user_generation.md", env)
    assert "batch 4 per device x 2 process(es)" in outputs["train"]
    assert "resumed at epoch 1" in outputs["resume"]
    assert_two_process_checkpoint(load(session.path("/kaggle/input/previous-run/trained_models/checkpoints/last.ckpt")), "model")
    run = session.path("/kaggle/working/trained_models/checkpoints")
    assert load(run / "last.ckpt")["epoch"] == 2
    generated = session.path("/kaggle/working/generated_images")
    assert (generated / "micro_doppler_grid.png").is_file() and (generated / "micro_doppler_user05_004.png").is_file()


def test_dape_cells(tmp_path):
    """DAPE (SeeSR's stage 1): pairs written by the data tool, two processes, a new session resumes, the report."""
    from data.demo_data import build_demo_image_folder
    from tests.ram_tiny import write_tiny_ram

    session = KaggleSession(tmp_path)
    write_tiny_ram(session.path("/kaggle/input/ram"))
    build_demo_image_folder(session.path("/kaggle/input/div2k/DIV2K_train_HR"), size=64, count=6, seed=0)
    common = {"CONFIG": "configs/dape_tiny.yaml", "PRECISION": "no"}
    env = {
        "train": {**common, "GT_SIZE": "64", "STEPS": "2", "EXTRA_ARGS": "--checkpointing_steps 2"},
        "resume": {**common, "GPUS": "1", "EXTRA_ARGS": "--max_train_steps 3"},
    }
    outputs = run_cells(session, "seesr.md", env, tiny_ram=True, group="dape")
    assert "x 2 process" in outputs["train"] and "resumed at step 2" in outputs["resume"]
    assert_two_process_checkpoint(load(session.path("/kaggle/input/previous-run/dape/checkpoints/dape_last.pt")), "model")
    run = session.path("/kaggle/working/dape")
    assert load(run / "checkpoints" / "dape_last.pt")["step"] == 3 and (run / "DAPE.pth").is_file()
    assert "before {'step': 0" in outputs["infer"] and "after {'step': 3" in outputs["infer"]


def test_seesr_cells(tmp_path):
    import numpy as np
    from PIL import Image

    from data.demo_data import build_demo_image_folder
    from tests.ram_tiny import write_tiny_ram
    from tests.sd2_tiny import build_tiny_sd2

    session = KaggleSession(tmp_path)
    build_tiny_sd2(session.path("/kaggle/input/sd2-base"), light_attention=True)
    write_tiny_ram(session.path("/kaggle/input/ram"))
    build_demo_image_folder(session.path("/kaggle/input/div2k/DIV2K_train_HR"), size=64, count=4, seed=0)
    lr = session.path("/kaggle/input/div2k/DIV2K_valid_LR_bicubic/X4")
    lr.mkdir(parents=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (12, 10, 3), dtype=np.uint8)).save(lr / "0801x4.png")
    tiny = "--resolution 64 --conditioning_embedding_channels 4 8 8 8 --train_batch_size 2 --gradient_accumulation_steps 1 " \
           "--lr_warmup_steps 0 --validation_steps 0 --logging_steps 1 --report_to none"
    env = {
        "train": {"STEPS": "2", "PRECISION": "no", "EXTRA_ARGS": tiny},
        "resume": {"PRECISION": "no", "GPUS": "1", "EXTRA_ARGS": "--max_train_steps 3"},
        "infer": {"EXTRA_ARGS": "--num_inference_steps 5 --process_size 64 --device cpu"},
    }
    outputs = run_cells(session, "seesr.md", env, tiny_ram=True)
    assert "x 2 process" in outputs["train"] and "DAPE" in outputs["train"]  # SeeSR proper: RAM + DAPE embeddings
    assert "at step 2" in outputs["resume"]
    trained = session.path("/kaggle/input/previous-run/experience/timestep_multiscale/checkpoint-2")
    assert (trained / "random_states_0.pkl").is_file() and (trained / "random_states_1.pkl").is_file()  # RNG per rank
    injector = load_file(trained / "multi_scale_injector/model.safetensors")
    assert set(injector) == {"scale_weights.weights", "timestep_weights.table"}  # no "module." prefix from DDP
    assert not any(key.startswith("module.") for key in load_file(trained / "controlnet/diffusion_pytorch_model.safetensors"))
    run = session.path("/kaggle/working/experience/timestep_multiscale")
    assert sorted(path.name for path in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-3"]
    results = session.path("/kaggle/working/results/timestep_multiscale")
    assert (results / "sample00/0801x4.png").is_file() and (results / "w_t.png").is_file()
