"""Print what a SeeSR checkpoint holds: the ControlNet and UNet (image attention or not), the injector's keys and
values, the training state. SeeSR's release folder (unet/ + controlnet/) works too.

    python scripts/inspect_checkpoint.py experience/timestep_multiscale/checkpoint-100000
    python scripts/inspect_checkpoint.py experience/timestep_multiscale/checkpoint-100000/multi_scale_injector/pytorch_model.bin

The users' note: the injector's keys are ``scale_weights.weights`` (one weight per level or residual) and
``timestep_weights.*`` (``timestep_weights.table`` or ``timestep_weights.mlp.{0,2}.{weight,bias}``). A checkpoint
without ``multi_scale_injector/`` (the baseline, or one written before the injector existed) runs as standard
SeeSR inference.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from utils.errors import CheckpointError, run_cli  # noqa: E402


def summarise_tensor(tensor: torch.Tensor, shown: int = 6) -> str:
    """Values of a small tensor, or min / mean / max of a large one."""
    values = tensor.detach().float().flatten()
    if values.numel() <= shown:
        return ", ".join(f"{v:.4f}" for v in values.tolist())
    return f"min {values.min():.4f}, mean {values.mean():.4f}, max {values.max():.4f}"


def injector_report(state: dict[str, torch.Tensor], source: Path) -> list[str]:
    lines = [f"Injector weights ({source}):"]
    width = max(len(key) for key in state)
    for key in sorted(state):
        tensor = state[key]
        lines.append(f"  {key:<{width}}  {str(list(tensor.shape)):<12} {str(tensor.dtype).removeprefix('torch.'):<8}"
                     f"  {summarise_tensor(tensor)}")
    return lines


def read_weights_file(path: Path) -> dict[str, torch.Tensor]:
    from models.timestep_adaptive import read_injector_state
    from utils.checkpoint import load_state_file

    if path.is_dir():
        return read_injector_state(path)[0]
    state = load_state_file(path)
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"Expected a dict of tensors in {path}, found {type(state).__name__}.")
    return state


def inspect(path: Path) -> dict:
    """Report lines and what was found (for tests): ``{"lines", "controlnet", "unet", "image_attention",
    "injector_keys", "variant"}``."""
    from models.seesr import CONTROLNET_FOLDER
    from models.timestep_adaptive import INJECTOR_FOLDER, load_injector

    if not path.exists():
        raise CheckpointError(f"{path} does not exist; pass a checkpoint-<step>/ folder or an injector weights file.")
    lines = [f"Checkpoint: {path}"]
    report = {"controlnet": False, "unet": False, "image_attention": False, "injector_keys": [], "variant": None,
              "lines": lines}
    if path.is_file() or path.name == INJECTOR_FOLDER:  # the injector alone
        state = read_weights_file(path)
        report["injector_keys"] = sorted(state)
        lines += injector_report(state, path)
        return report

    controlnet_dir = path / CONTROLNET_FOLDER
    if (controlnet_dir / "config.json").is_file():
        config = json.loads((controlnet_dir / "config.json").read_text())
        weights = sorted(p.name for p in controlnet_dir.glob("diffusion_pytorch_model*"))
        size = sum((controlnet_dir / name).stat().st_size for name in weights) / 2**20
        report["controlnet"] = True
        lines.append(
            f"ControlNet: {controlnet_dir} ({', '.join(weights) or 'no weights file!'}, {size:.1f} MiB; "
            f"block_out_channels {config.get('block_out_channels')}, conditioning_channels "
            f"{config.get('conditioning_channels')}, cross_attention_dim {config.get('cross_attention_dim')}, "
            f"image cross-attention {'yes' if config.get('use_image_cross_attention') else 'no'})"
        )
        report["image_attention"] = bool(config.get("use_image_cross_attention"))
    else:
        lines.append(f"ControlNet: none ({controlnet_dir} missing)")
    unet_dir = path / "unet"
    if (unet_dir / "config.json").is_file():
        config = json.loads((unet_dir / "config.json").read_text())
        weights = sorted(p.name for p in unet_dir.glob("diffusion_pytorch_model*"))
        report["unet"] = True
        lines.append(f"UNet: {unet_dir} ({', '.join(weights) or 'no weights file!'}; image cross-attention "
                     f"{'yes' if config.get('use_image_cross_attention') else 'no'}): used instead of SD2's UNet")
    else:
        lines.append("UNet: none (SD2's UNet is used)")

    injector, messages = load_injector(path)
    if injector is None:
        lines.append(f"Injector: none ({INJECTOR_FOLDER}/ missing): standard SeeSR inference (identity weights)")
    else:
        folder = path / INJECTOR_FOLDER
        state = read_weights_file(folder)
        files = sorted(p.name for p in folder.iterdir() if p.is_file())
        report["injector_keys"] = sorted(state)
        report["variant"] = injector.variant
        lines.append(f"Injector: {injector.variant} ({', '.join(files)})")
        lines += [f"  {message.strip()}" for message in messages if message.startswith("  ")]
        lines += injector_report(state, folder)

    state_file = path / "training_state.json"
    if state_file.is_file():
        state = json.loads(state_file.read_text())
        config = state.get("config", {})
        lines.append(
            f"Training state: step {state.get('step')}, epoch {state.get('epoch')}, --injector {config.get('injector')}, "
            f"--timestep_weights {config.get('timestep_weights')}, --injector_grouping {config.get('injector_grouping')}"
            f"{', injector only' if config.get('train_injector_only') else ''}"
            f"{', plain ControlNet' if config.get('no_image_cross_attention') else ''}"
        )
        accelerate_files = sorted(p.name for p in path.iterdir() if p.is_file() and p.suffix in (".bin", ".pkl", ".pt"))
        lines.append(f"Resumable state (accelerate): {', '.join(accelerate_files)}")
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a checkpoint-<step>/ folder, its multi_scale_injector/, or a weights file")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> dict:
    report = inspect(Path(args.checkpoint))
    print("\n".join(report["lines"]))
    return report


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
