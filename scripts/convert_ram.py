"""Convert RAM's release checkpoint (``ram_swin_large_14m.pth``) into a small safetensors file (run once, explicitly).

``models.ram.load_ram_tagger`` reads RAM's ``.pth`` directly with ``torch.load(weights_only=True)`` when the file
holds only tensors and plain Python values (``{'model': state_dict, ...}``). A copy whose extra entries are pickled
objects (a training ``Namespace``, numpy scalars, ...) is refused there, because unpickling runs code from the file;
this converter reads such a file only with ``--trust_pickle``. It keeps what SeeSR runs (the Swin, ``image_proj``,
``label_embed``, ``wordvec_proj``, the tagging head, ``fc``; RAM's tied tagging-head layers resolved as in
``models.ram.resolve_ram_keys``) and drops the optimizer state, the tag encoder and the text decoder, so the
output is about 0.8 GB instead of several. The output loads with ``load_ram_tagger(<out>.safetensors, ...)``.

Usage (from the repository root)::

    python scripts/convert_ram.py preset/models/ram_swin_large_14m.pth preset/models/ram_swin_large_14m.safetensors --trust_pickle
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

import argparse  # noqa: E402
import pickle  # noqa: E402

import torch  # noqa: E402

from models.ram import RAM_SWIN_L, RAM_WEIGHTS_NAME, RAMConfig, RAMTagger, load_tagger_state, read_weights, resolve_ram_keys  # noqa: E402
from utils.checkpoint import atomic_save_safetensors  # noqa: E402
from utils.errors import CheckpointError, UserError, run_cli  # noqa: E402


def read_release_file(path: Path, trust_pickle: bool) -> dict[str, torch.Tensor]:
    """RAM's state dict from ``path``: weights-only first, a full unpickle only when trusted."""
    if not path.is_file():
        raise UserError(f"Input file {path} does not exist; expected RAM's {RAM_WEIGHTS_NAME}.")
    try:
        return read_weights(path, "RAM", RAM_WEIGHTS_NAME)
    except CheckpointError:
        if not trust_pickle:
            raise
    try:
        obj = torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, ImportError, AttributeError, RuntimeError) as err:
        raise CheckpointError(f"Cannot unpickle {path} ({type(err).__name__}: {err}); it is damaged or not RAM's checkpoint.") from None
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not RAM's {{'model': state_dict}}.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def convert(in_path: Path, out_path: Path, trust_pickle: bool = False, config: RAMConfig = RAM_SWIN_L) -> int:
    """Write the used RAM tensors of ``in_path`` to ``out_path``; returns the number of tags (rows of ``label_embed``)."""
    if out_path.suffix != ".safetensors":
        raise UserError(f"The output {out_path} must end in .safetensors.")
    state = resolve_ram_keys(read_release_file(in_path, trust_pickle), config.num_hidden_layers)
    if "label_embed" not in state:
        raise CheckpointError(f"{in_path} has no label_embed; expected RAM's {RAM_WEIGHTS_NAME}.")
    num_tags = state["label_embed"].shape[0]
    model = RAMTagger(RAMConfig(**{**config.__dict__, "num_tags": num_tags}), [str(i) for i in range(num_tags)])
    load_tagger_state(model, state, str(in_path))  # strict: proves the output is complete
    atomic_save_safetensors(state, out_path, metadata={"format": "pt", "source": in_path.name})
    return num_tags


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help=f"RAM's release file ({RAM_WEIGHTS_NAME})")
    parser.add_argument("output", type=Path, help="where to write the used tensors (.safetensors)")
    parser.add_argument(
        "--trust_pickle",
        action="store_true",
        help="allow unpickling a file that holds Python objects besides tensors; this runs code from the file, so only "
        "for files from a trusted source (default off)",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    num_tags = convert(args.input, args.output, args.trust_pickle)
    print(f"wrote {args.output}: RAM Swin-L tagger, {num_tags} tags")


if __name__ == "__main__":
    run_cli(lambda: main(parse_args()))
