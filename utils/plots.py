"""Training plots (matplotlib, headless): loss curves and any other named series over epochs or steps, and a SeeSR
injector's learned timestep weights w(t) (the figure of scripts/plot_timestep_weights.py and of training validation)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

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


def plot_timestep_weights(injector, path: str | Path, title: str | None = None) -> Path:
    """Draw w(t) per group (and s * w(t) when there are scale weights) over t = 0..T-1 into ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    timesteps, weights, labels = injector.timestep_weight_curves()
    shared = injector.timestep_weights is None or injector.config.timestep_weights_shared
    panels = [("w(t)", weights[:, :1] if shared else weights, ["w(t), all residuals"] if shared else labels)]
    if injector.scale_weights is not None:
        scale = injector.scale_weights.weights.detach().float().cpu()
        panels.append(("s[group] * w(t)", weights * scale, labels))
    figure, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.2), dpi=100, squeeze=False)
    for axis, (name, curves, curve_labels) in zip(axes[0], panels):
        for column, label in enumerate(curve_labels):
            axis.plot(timesteps.numpy(), curves[:, column].numpy(), label=label, linewidth=1.2)
        axis.axhline(1.0, color="grey", linewidth=0.6, linestyle="--")
        axis.set_xlabel("training timestep t (999 = pure noise, first sampling step)")
        axis.set_ylabel(name)
        axis.set_xlim(0, len(timesteps) - 1)
        axis.grid(True, alpha=0.3)
        if len(curve_labels) > 1 or injector.timestep_weights is None:
            axis.legend(fontsize=7, ncol=2 if len(curve_labels) > 6 else 1)
    kind = injector.config.timestep_weights_kind or "none"
    figure.suptitle(title or f"{injector.variant} injector, timestep weights: {kind}", fontsize=10)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path
