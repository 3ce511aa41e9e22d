"""Training plots (matplotlib, headless): loss curves and any other named series over epochs or steps."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot_curves(
    series: Mapping[str, Sequence[float]],
    path: str | Path,
    title: str = "",
    xlabel: str = "epoch",
    ylabel: str = "loss",
    log_y: bool = False,
    x_start: int = 1,
) -> Path:
    """One line per named series, x counted from ``x_start``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, values in series.items():
        values = list(values)
        if values:
            ax.plot(range(x_start, x_start + len(values)), values, label=name, marker="o" if len(values) < 30 else None)
    if log_y:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(True, alpha=0.3)
    if len(series) > 1:
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
