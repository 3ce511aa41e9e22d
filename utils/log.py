"""Run logging: one logger to console and ``train.log``, a tqdm bar with loss / running average / LR.

Rank-0 discipline (DiT, diffusers): only the main process writes the log file and shows the bar; other
processes log warnings only. Losses are accumulated on the device and read back (one host-device sync) only
when the bar is refreshed, not at every step.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

LOGGER_NAME = "diffusion_lab"


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
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        file = logging.FileHandler(Path(run_dir) / filename)
        file.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"))
        logger.addHandler(file)
    return logger


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


class TrainingProgress:
    """tqdm bar showing the latest loss, the running average of the epoch and the learning rate.

    ``update(loss, lr)`` every optimiser step; the postfix is refreshed every ``refresh_every`` steps, which is
    the only point where the loss is copied to the host.
    """

    def __init__(self, total: int, desc: str, enabled: bool = True, refresh_every: int = 10, initial: int = 0):
        self.bar = tqdm(total=total, desc=desc, disable=not enabled, dynamic_ncols=True, initial=initial)
        self.refresh_every = refresh_every
        self.epoch_meter = LossMeter()
        self.latest: torch.Tensor | None = None
        self.steps = 0

    def update(self, loss: torch.Tensor, lr: float) -> None:
        self.latest = loss.detach()
        self.epoch_meter.update(loss)
        self.steps += 1
        self.bar.update(1)
        if not self.bar.disable and self.steps % self.refresh_every == 0:
            self.bar.set_postfix(
                loss=f"{self.latest.float().item():.4f}", avg=f"{self.epoch_meter.mean():.4f}", lr=f"{lr:.2e}"
            )

    def close(self) -> None:
        self.bar.close()
