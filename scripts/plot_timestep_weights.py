"""Plot the learned timestep-adaptive weights w(t) of a SeeSR injector checkpoint (the users' note's tool).

    python scripts/plot_timestep_weights.py --checkpoint experience/timestep_multiscale/checkpoint-100000
    python scripts/plot_timestep_weights.py --checkpoint CKPT --output timestep_weights_visualization.png

Left: w(t) = ``injector.get_weight_at_step(t)`` for the training timesteps t = 0..999 (the index the sampler uses:
50 DDPM steps visit t = 981, 961, ..., 1), one curve per level or residual when the weights are per group. Right
(multi-scale injectors only): the combined weight s[group] * w(t) that actually multiplies each residual. The
training script draws the same figure at every validation (``validation/timestep_weights_step_<step>.png``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils.errors import CheckpointError, run_cli  # noqa: E402


def describe_injector(injector) -> str:
    """One line: the scale weights and w(t) at a few timesteps (for training logs)."""
    parts = []
    if injector.scale_weights is not None:
        weights = injector.scale_weights.weights.detach().float().cpu().tolist()
        parts.append("s = [" + ", ".join(f"{w:.3f}" for w in weights) + "]")
    if injector.timestep_weights is not None:
        for t in (999, 500, 1):
            weights = injector.get_weight_at_step(t).detach().float().cpu()
            shown = f"{weights[0]:.3f}" if injector.config.timestep_weights_shared else (
                "[" + ", ".join(f"{w:.3f}" for w in weights.tolist()) + "]")
            parts.append(f"w({t}) = {shown}")
    return "injector " + ", ".join(parts)


def plot_timestep_weights(injector, path: str | Path, title: str | None = None) -> Path:
    """Draw w(t) per group (and s * w(t) when there are scale weights) over t = 0..T-1 into ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-<step>/ folder (or its multi_scale_injector/ folder)")
    parser.add_argument("--output", default="timestep_weights_visualization.png",
                        help="PNG to write (default timestep_weights_visualization.png)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    from models.timestep_adaptive import load_injector

    injector, messages = load_injector(args.checkpoint)
    if injector is None:
        raise CheckpointError(
            f"{args.checkpoint} has no multi_scale_injector/ (a baseline or old checkpoint): there is no w(t) to plot."
        )
    path = plot_timestep_weights(injector, args.output, title=f"{Path(args.checkpoint).name}: {injector.variant}")
    print(describe_injector(injector))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
