"""Run logging: one logger to console and ``train.log``, a progress display, and the experiment tracker.

Rank-0 discipline (DiT, diffusers): only the main process writes the log file and shows progress; other
processes log warnings only. Losses are accumulated on the device and read back (one host-device sync) only
when the display is refreshed, not at every step.

Progress in a terminal is a tqdm bar with loss / running average / LR. In a notebook's or a batch job's log
(Kaggle, ``> train.log``, anything that is not a terminal) a bar redraws itself with carriage returns that
pile up as thousands of lines, so there the bar is off and one plain line is logged every tenth of the epoch and
at least every ``LINE_SECONDS`` (:func:`interactive_output`; ``PROGRESS=bar`` or ``PROGRESS=lines`` in the environment forces either).

Experiment tracking goes through accelerate's trackers (``Accelerator(log_with=...)``): :func:`start_tracking`,
:func:`log_scalars` and :func:`log_image` (through the tracker's own writer: TensorBoard's ``add_image``,
wandb's ``Image``). With ``--report_to none`` they do nothing.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

LOGGER_NAME = "diffusion_lab"
# Files a run folder may hold before training starts; a refused run's folder holding only these is removed.
SETUP_FILES = ("train.log", "args.yaml")
_created_run_folders: list[Path] = []  # the topmost folder each setup_logger call created, for a refused run's clean-up
LINE_SECONDS = 60.0  # off a terminal, the longest wait between two progress lines (checked every refresh_every steps)


def setup_logger(run_dir: str | Path | None, is_main: bool = True, filename: str = "train.log") -> logging.Logger:
    """Console + file logger for a run; calling it again (a second run in one process) replaces the handlers."""
    logger = logging.getLogger(LOGGER_NAME)
    for handler in list(logger.handlers):
        handler.close()
        logger.removeHandler(handler)
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.propagate = False
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(logging.Formatter("%(message)s"))
    logger.addHandler(console)
    if run_dir is not None and is_main:
        new = [folder for folder in (Path(run_dir), *Path(run_dir).parents) if not folder.exists()]
        if new:
            _created_run_folders.append(new[-1])
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(run_dir) / filename)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file)
        from utils.checkpoint import remove_stale_temporaries

        for stale in remove_stale_temporaries(run_dir):
            logger.info("note: removed %s, left by a save that was killed before it finished", stale)
    return logger


def remove_unstarted_run_folders() -> list[Path]:
    """Remove the folders :func:`setup_logger` created in this process that hold nothing but :data:`SETUP_FILES` and
    empty folders: a run refused before it trained (bad data, a wrong flag found late) leaves no folder that looks
    like a run. Called by ``utils.errors.run_cli`` on a user error."""
    import shutil

    removed = []
    logger = logging.getLogger(LOGGER_NAME)
    for folder in _created_run_folders:
        if not folder.is_dir() or not all(p.is_dir() or p.name in SETUP_FILES for p in folder.rglob("*")):
            continue
        for handler in list(logger.handlers):
            if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename).is_relative_to(folder.resolve()):
                handler.close()
                logger.removeHandler(handler)
        shutil.rmtree(folder, ignore_errors=True)
        removed.append(folder)
    _created_run_folders.clear()
    return removed


def get_logger() -> logging.Logger:
    return logging.getLogger(LOGGER_NAME)


class LossMeter:
    """Sum of losses kept on the device; ``mean()`` syncs once. ``reset()`` starts a new window."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.count = 0

    def update(self, loss: torch.Tensor) -> None:
        loss = loss.detach().float()
        self.total = loss.clone() if self.total is None else self.total + loss
        self.count += 1

    def mean(self) -> float:
        return float(self.total.item() / self.count) if self.count else float("nan")

    def reset(self) -> None:
        self.total, self.count = None, 0


def interactive_output() -> bool:
    """True when progress bars can redraw in place: stderr is a terminal (``PROGRESS=bar|lines`` overrides)."""
    forced = os.environ.get("PROGRESS", "").lower()
    if forced in ("bar", "lines"):
        return forced == "bar"
    return sys.stderr.isatty()


def progress_kwargs() -> dict:
    """tqdm settings for any other bar (samplers, extraction): off when the output is not a terminal."""
    return {"disable": not interactive_output(), "dynamic_ncols": True}


class TrainingProgress:
    """Progress of an epoch: the latest loss, the running average of the epoch and the learning rate.

    ``update(loss, lr)`` every optimiser step. In a terminal a tqdm bar whose postfix is refreshed every
    ``refresh_every`` steps (the only point where the loss is copied to the host); elsewhere one logged line every
    tenth of ``total`` steps and at least every ``LINE_SECONDS``, ``desc step i/total | loss | avg | lr | s/step``.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, refresh_every: int = 10, initial: int = 0):
        self.interactive = interactive_output()
        self.bar = tqdm(total=total, desc=desc, disable=not (enabled and self.interactive), dynamic_ncols=True, initial=initial)
        self.enabled, self.desc, self.total = enabled, desc, total
        self.refresh_every = refresh_every
        self.line_every = max(refresh_every, math.ceil(total / 10)) if total else refresh_every
        self.epoch_meter = LossMeter()
        self.latest: torch.Tensor | None = None
        self.steps = 0
        self.position = initial
        self.started = self.last_line = time.perf_counter()

    def update(self, loss: torch.Tensor, lr: float) -> None:
        self.latest = loss.detach()
        self.epoch_meter.update(loss)
        self.steps += 1
        self.position += 1
        self.bar.update(1)
        if not self.bar.disable and self.steps % self.refresh_every == 0:
            self.bar.set_postfix(
                loss=f"{self.latest.float().item():.4f}", avg=f"{self.epoch_meter.mean():.4f}", lr=f"{lr:.2e}"
            )
        elif self.enabled and not self.interactive and self._line_due():
            self.last_line = time.perf_counter()
            seconds = (self.last_line - self.started) / self.steps
            get_logger().info("%s step %d/%s | loss %.4f | avg %.4f | lr %.2e | %.2f s/step", self.desc, self.position,
                              self.total, self.latest.float().item(), self.epoch_meter.mean(), lr, seconds)

    def _line_due(self) -> bool:
        if self.steps % self.line_every == 0 or self.position == self.total:
            return True
        return self.steps % self.refresh_every == 0 and time.perf_counter() - self.last_line >= LINE_SECONDS

    def close(self) -> None:
        self.bar.close()


# -------------------------------------------------------------------------------------------- experiment tracking
def start_tracking(accelerator, project_name: str, config: dict) -> None:
    """``accelerator.init_trackers`` with the run's configuration as hyper-parameters (scalars only; lists as text)."""
    if not accelerator.log_with:
        return
    hparams = {}
    for key, value in config.items():
        if value is None or isinstance(value, (bool, int, float, str)):
            hparams[key] = "none" if value is None else value
        else:
            hparams[key] = str(value)
    accelerator.init_trackers(project_name, config=hparams)


def log_scalars(accelerator, values: dict[str, Any], step: int) -> None:
    """Scalars to every tracker (main process only); tensors and NumPy numbers become floats."""
    if not accelerator.trackers:
        return
    plain = {key: float(value.detach()) if torch.is_tensor(value) else float(value) for key, value in values.items() if value is not None}
    accelerator.log(plain, step=step)


def log_image(accelerator, name: str, image: Any, step: int) -> None:
    """One image (a PNG path, PIL image or HWC uint8 array) to every tracker, through the tracker's own writer."""
    if not accelerator.trackers or not accelerator.is_main_process:
        return
    from PIL import Image

    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            image = opened.convert("RGB")
    array = np.asarray(image)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.tracker.add_image(name, array, global_step=step, dataformats="HWC")
            tracker.tracker.flush()
        elif tracker.name == "wandb":
            import wandb

            tracker.log({name: wandb.Image(array)}, step=step)
