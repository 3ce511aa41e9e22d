"""Convert an official Phaseformer release file into a plain safetensors state dict (run once, explicitly).

The official release (github.com/Mdraqibkhan/Phaseformer, ``checkpoints/<dataset>/best.pth``) and its
``train.py`` save the *whole pickled module* (``torch.save(net_g, path)``). Reading such a file runs code
from it, so this converter does it only with ``--trust_pickle``; the official ``model_with_eca.py`` is not
needed: classes that cannot be imported are replaced by empty ``nn.Module`` stand-ins, which still carry
the parameters. Plain state dicts (possibly nested under ``state_dict``/``model``/``netG``...) are read with
``torch.load(weights_only=True)`` and need no flag.

The output holds the Phaseformer state dict (official unused ``ups2.*``/``attention.3.*`` dropped) and, in
its metadata, the model configuration with ``eca="phase"`` (the official gate; override with ``--eca``) and
``value_range="signed"`` (the official code feeds and returns images in [-1, 1]; override with ``--value_range``),
so ``models.phaseformer.phaseformer_from_weights_file`` and ``infer.py phaseformer`` rebuild the model without
flags. Checkpoints of other models (AGSSF/Spectroformer, Restormer...) are refused with a sentence saying what
they are.

Usage (from the repository root)::

    python scripts/convert_phaseformer.py checkpoints/UIEB/best.pth phaseformer_uieb.safetensors --trust_pickle
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import argparse  # noqa: E402
import json  # noqa: E402
import pickle  # noqa: E402
import types  # noqa: E402

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from models.phaseformer import (  # noqa: E402
    ECA_GATES,
    OFFICIAL_UNUSED_PREFIXES,
    Phaseformer,
    extract_state_dict,
    infer_phaseformer_config,
    load_phaseformer_state_dict,
)
from utils.errors import CheckpointError, UserError, run_cli  # noqa: E402


class _StandInUnpickler(pickle.Unpickler):
    """An unpickler that replaces classes it cannot import with empty nn.Module subclasses."""

    stand_ins: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str):
        try:
            return super().find_class(module, name)
        except (ImportError, AttributeError):
            key = (module, name)
            if key not in self.stand_ins:
                # nn.Module's __setstate__ restores _parameters/_buffers/_modules, which is all we read.
                self.stand_ins[key] = type(name, (nn.Module,), {"__module__": module})
            return self.stand_ins[key]


# torch.load(pickle_module=...) subclasses ``pickle_module.Unpickler``; everything else comes from pickle.
_STAND_IN_PICKLE = types.SimpleNamespace(**{k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps", "UnpicklingError")})
_STAND_IN_PICKLE.Unpickler = _StandInUnpickler
_STAND_IN_PICKLE.__name__ = "pickle"


def read_release_file(path: Path, trust_pickle: bool) -> object:
    """The object stored in ``path``: safetensors, weights-only torch.load, or (trusted) a full unpickle."""
    if not path.is_file():
        raise UserError(f"Input file {path} does not exist.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:
        if not trust_pickle:
            raise CheckpointError(
                f"{path} is a pickled Python object (the official releases save the whole module), and reading it runs "
                "code from the file; if you trust its source, rerun with --trust_pickle to convert it once."
            ) from None
    except Exception as err:
        raise CheckpointError(f"Cannot read {path} ({type(err).__name__}: {err}); is it a PyTorch checkpoint?") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=False, pickle_module=_STAND_IN_PICKLE)
    except Exception as err:
        raise CheckpointError(f"Cannot unpickle {path} ({type(err).__name__}: {err}); it is damaged or not a PyTorch file.") from None


def convert(in_path: Path, out_path: Path, trust_pickle: bool = False, eca: str = "phase", value_range: str = "signed") -> dict:
    """Convert ``in_path`` to ``out_path``; returns the model configuration written to the metadata."""
    if out_path.suffix != ".safetensors":
        raise UserError(f"The output {out_path} must end in .safetensors.")
    state_dict = extract_state_dict(read_release_file(in_path, trust_pickle), str(in_path))
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(OFFICIAL_UNUSED_PREFIXES)}
    config = {**infer_phaseformer_config(state_dict), "eca": eca}
    model = Phaseformer(**config)
    load_phaseformer_state_dict(model, state_dict, str(in_path))  # strict: proves the file is complete
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    out_path.parent.mkdir(parents=True, exist_ok=True)
    metadata = {"format": "pt", "phaseformer_config": json.dumps(config), "value_range": value_range, "source": in_path.name}
    save_file(tensors, str(out_path), metadata=metadata)
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="official release file (.pth: whole pickled module or a state dict) or .safetensors")
    parser.add_argument("output", type=Path, help="where to write the safetensors state dict (.safetensors)")
    parser.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow unpickling a whole pickled module; this runs code from the file, so only for files from a trusted source (default off)",
    )
    parser.add_argument(
        "--eca", choices=ECA_GATES, default="phase",
        help="ECA gate recorded in the metadata; official weights were trained with 'phase' (default phase)",
    )
    parser.add_argument(
        "--value_range", choices=("unit", "signed"), default="signed",
        help="range of the images the weights expect, recorded in the metadata: the official train.py/test.py "
        "normalise to [-1, 1] ('signed', default); 'unit' for weights trained on [0, 1] images",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    config = convert(args.input, args.output, args.trust_pickle, args.eca, args.value_range)
    print(f"wrote {args.output}: Phaseformer channels {config['channels']}, blocks {config['num_blocks']}, eca {config['eca']}")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
