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

from models.timestep_adaptive import describe_injector, load_injector  # noqa: E402
from utils.config import one_line_errors  # noqa: E402
from utils.errors import CheckpointError, run_cli  # noqa: E402
from utils.plots import plot_timestep_weights  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = one_line_errors(argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter))
    parser.add_argument("--checkpoint", required=True,
                        help="a checkpoint-<step>/ folder (or its multi_scale_injector/ folder)")
    parser.add_argument("--output", default="timestep_weights_visualization.png",
                        help="PNG to write (default timestep_weights_visualization.png)")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> Path:
    injector, messages = load_injector(args.checkpoint)
    if injector is None:
        raise CheckpointError(
            f"{args.checkpoint} has no multi_scale_injector/ (a baseline or old checkpoint): there is no w(t) to plot."
        )
    variant = injector.variant or "scale weights only (an older checkpoint)"
    path = plot_timestep_weights(injector, args.output, title=f"{Path(args.checkpoint).name}: {variant}")
    print(describe_injector(injector))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
