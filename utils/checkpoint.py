"""Checkpoints: atomic writes, safe loading, saving with copies and rotation, ``--resume_from_checkpoint latest``, RNG.

* Atomic: every file is written to a temporary name in the same folder, flushed to disk and then renamed over
  the target (``os.replace`` is atomic on POSIX and Windows), so a crash while saving leaves the last good
  checkpoint untouched.
* Safe: ``torch.load(..., weights_only=True)`` or safetensors only. Checkpoints hold tensors and plain Python
  (dicts, lists, numbers, strings), never pickled objects (nanoGPT's habit).
* Typed: each checkpoint written here carries ``kind`` (``"ddpm"``, ``"phaseformer"``, ...); loading one of the
  wrong kind is a one-line :class:`~utils.errors.CheckpointError`.
* One save path for the single-file trainers (:func:`save_checkpoint_files`): the resumable "last" file written
  atomically, then byte copies of it ("best", "final", numbered ones) and rotation of the numbered ones.
* Folder checkpoints (diffusers' ``checkpoint-<step>/``, SeeSR's trainer): listed, rotated and found by step
  (:func:`checkpoint_folders`), written into a hidden staging folder and published by a rename
  (:func:`publish_checkpoint_folder`).
* RNG: Python, NumPy, torch CPU and CUDA generator states, one entry per process, so a resumed run draws the
  same noise as an uninterrupted one.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from utils.errors import CheckpointError

CHECKPOINT_FORMAT_VERSION = 1


# ----------------------------------------------------------------------------------------------- atomic writes
def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp_path)`` and move the finished file onto ``path`` in one atomic rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass
    return path


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def atomic_write_text(text: str, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: tmp.write_text(text))


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


# ------------------------------------------------------------------------------------------------ safe loading
def load_state_file(path: str | Path) -> dict:
    """Load a ``.safetensors`` file or a plain torch checkpoint with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"Checkpoint {path} does not exist; check the path.")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as err:
            raise CheckpointError(f"{path} is not a readable safetensors file ({err}).") from err
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{path} is not a torch checkpoint or a .safetensors file; check the path.")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(
            f"{path} holds pickled Python objects, not plain tensors, so it was not loaded "
            "(unpickling can run arbitrary code); convert it to a state dict or safetensors first."
        ) from err
    except Exception as err:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({str(err).splitlines()[0]}).") from err


def check_weights_file(path: str | Path, flag: str, expected: str) -> Path:
    """``path`` starts like a torch checkpoint or a safetensors file (only its first bytes are read), else one
    :class:`CheckpointError` naming ``flag`` and ``expected``: before a file is fingerprinted or loaded."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{flag} {path} does not exist; pass {expected}.")
    if path.suffix == ".safetensors":
        import json
        import struct

        try:
            with open(path, "rb") as handle:
                (length,) = struct.unpack("<Q", handle.read(8))
                json.loads(handle.read(min(length, 100_000_000)))
            return path
        except (struct.error, ValueError, UnicodeDecodeError, MemoryError):
            raise CheckpointError(f"{flag} {path} is not a readable .safetensors file; pass {expected}.") from None
    if not _looks_like_torch_file(path):
        raise CheckpointError(f"{flag} {path} is not a torch checkpoint (nor a .safetensors file); pass {expected}.")
    return path


def remove_stale_temporaries(run_dir: str | Path, max_depth: int = 2) -> list[Path]:
    """Delete the ``.<name>.*.tmp`` files and ``.<name>.tmp`` folders that an atomic save killed mid-write leaves in
    ``run_dir`` (and its sub-folders, ``max_depth`` levels down): they are never read and would stay forever."""
    removed = []
    for depth in range(max_depth + 1):
        for stale in Path(run_dir).glob("/".join(["*"] * depth + [".*.tmp"])):
            if stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)
            removed.append(stale)
    return removed


def _looks_like_torch_file(path: Path) -> bool:
    """torch.save writes a zip archive (or, before torch 1.6, a pickle whose first byte is the 0x80 opcode)."""
    import zipfile

    with open(path, "rb") as handle:
        first = handle.read(1)
    return zipfile.is_zipfile(path) or first == b"\x80"


def load_checkpoint(path: str | Path, kind: str, command: str = "") -> dict:
    """Load one of this repository's checkpoints and check that it is of ``kind``."""
    checkpoint = load_state_file(path)
    found = checkpoint.get("kind") if isinstance(checkpoint, dict) else None
    needed_by = f" {command}" if command else ""
    if found is None:
        raise CheckpointError(
            f"{path} is not a checkpoint written by this repository (it has no 'kind' entry);{needed_by} "
            f"needs a '{kind}' checkpoint."
        )
    if found != kind:
        raise CheckpointError(f"{path} is a '{found}' checkpoint, but{needed_by or ' this'} needs a '{kind}' checkpoint.")
    return checkpoint


# ---------------------------------------------------------------------------------------- rotation and latest
def _number(path: Path) -> int:
    numbers = re.findall(r"\d+", path.stem)
    return int(numbers[-1]) if numbers else -1


def numbered_checkpoints(folder: str | Path, pattern: str) -> list[Path]:
    """Files matching ``pattern`` (a glob with one number in the name), oldest number first."""
    return sorted(Path(folder).glob(pattern), key=_number)


def rotate_checkpoints(folder: str | Path, pattern: str, keep: int | None) -> list[Path]:
    """Delete all but the ``keep`` newest numbered checkpoints; ``None`` or ``0`` keeps everything."""
    if not keep:
        return []
    files = numbered_checkpoints(folder, pattern)
    removed = files[:-keep] if len(files) > keep else []
    for file in removed:
        file.unlink(missing_ok=True)
    return removed


def find_latest_checkpoint(folder: str | Path, patterns: list[str]) -> Path | None:
    """The most recently written file matching any of ``patterns`` in ``folder`` (None when there is none)."""
    files = [f for pattern in patterns for f in Path(folder).glob(pattern) if not f.name.startswith(".")]
    return max(files, key=lambda f: f.stat().st_mtime_ns) if files else None


def save_checkpoint_files(
    state: dict,
    last: str | Path,
    copies: Iterable[str | Path] = (),
    *,
    rotate_pattern: str | None = None,
    keep: int | None = None,
    variants: dict[str | Path, dict] | None = None,
) -> Path:
    """Write ``state`` atomically to ``last``, copy it to each of ``copies``, write ``variants`` (other states, e.g. a
    slim inference-only file) and keep the ``keep`` newest files matching ``rotate_pattern`` beside ``last``."""
    last = atomic_torch_save(state, last)
    for target in copies:
        atomic_write(target, lambda tmp: shutil.copyfile(last, tmp))
    for target, other in (variants or {}).items():
        atomic_torch_save(other, target)
    if rotate_pattern:
        rotate_checkpoints(last.parent, rotate_pattern, keep)
    return last


def resolve_resume(resume: str | None, folder: str | Path, patterns: list[str]) -> Path | None:
    """``--resume_from_checkpoint PATH|latest`` -> the file to resume from (None for ``latest`` in a fresh run folder)."""
    if not resume:
        return None
    if resume == "latest":
        return find_latest_checkpoint(folder, patterns)
    path = Path(resume)
    if not path.is_file():
        raise CheckpointError(f"--resume_from_checkpoint {resume}: no such file; give a checkpoint path or 'latest'.")
    return path


# ------------------------------------------------------------------------------------ checkpoint folders (accelerate)
# diffusers' trainers write ``checkpoint-<step>/`` folders (accelerate's state + model folders) instead of one file.
def checkpoint_folder_step(path: str | Path, prefix: str = "checkpoint-") -> int:
    """The step of a ``<prefix><step>`` folder name, -1 for any other name."""
    name = Path(path).name
    tail = name[len(prefix):] if name.startswith(prefix) else ""
    return int(tail) if tail.isdigit() else -1


def checkpoint_folders(folder: str | Path, prefix: str = "checkpoint-") -> list[Path]:
    """``<prefix><step>/`` folders in ``folder``, oldest step first; temporary (``.<name>.tmp``) folders are hidden."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{prefix}*") if p.is_dir() and checkpoint_folder_step(p, prefix) >= 0]
    return sorted(found, key=lambda p: checkpoint_folder_step(p, prefix))


def latest_checkpoint_folder(folder: str | Path, prefix: str = "checkpoint-") -> Path | None:
    """The checkpoint folder with the highest step (None when there is none)."""
    folders = checkpoint_folders(folder, prefix)
    return folders[-1] if folders else None


def rotate_checkpoint_folders(folder: str | Path, keep: int | None, prefix: str = "checkpoint-") -> list[Path]:
    """Delete all but the ``keep`` highest-step checkpoint folders; ``None`` or ``0`` keeps everything."""
    if not keep:
        return []
    folders = checkpoint_folders(folder, prefix)
    removed = folders[:-keep] if len(folders) > keep else []
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def staging_folder(final: str | Path) -> Path:
    """Where a checkpoint folder is written before :func:`publish_checkpoint_folder` renames it into place."""
    final = Path(final)
    return final.with_name(f".{final.name}.tmp")


def publish_checkpoint_folder(staging: str | Path, final: str | Path) -> Path:
    """Move a finished folder into place with renames: readers see the old folder or the new one, never half of one."""
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(staging, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, final)
    return final


# ----------------------------------------------------------------------------------------------------- RNG state
def capture_rng_state() -> dict:
    """This process's RNG states as tensors and plain Python (safe for ``weights_only`` loading)."""
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "name": np_name,
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    np_state = state["numpy"]
    np.random.set_state(
        (
            np_state["name"],
            np_state["keys"].numpy().astype(np.uint32),
            np_state["pos"],
            np_state["has_gauss"],
            np_state["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _as_tuple(value):
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
