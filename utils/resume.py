"""What a resumed run takes from its checkpoint: the one rule every trainer follows.

A checkpoint stores the run's resolved configuration (``checkpoint["config"]``, plain data). Resuming with
``--resume_from_checkpoint PATH|latest``:

* every setting **not given** on the command line (or in ``--config``) comes from the checkpoint, so
  ``train_X.py --resume_from_checkpoint PATH`` alone continues the run as it was started (LR schedule, clipping,
  batch plan, data path...);
* a setting **given** on the command line wins when it may change within a run (epochs, steps, output cadence);
* a setting that may **not** change (model shape, data layout: each trainer lists them) raises one
  :class:`~utils.errors.CheckpointError` line naming the flag;
* settings of the session or the machine (device, workers, the resume flag itself...) are never inherited.

The arguments are never modified: :func:`resolve_resumed_config` returns a new Namespace (Phaseformer's
``merge_resumed_config`` did this first; diffusers' examples leave it to the user).

``latest`` with the same ``--output_dir`` alone finds the run (:func:`find_latest_run_checkpoint`): the newest
checkpoint in the run folder the flags name when they name one, else the newest under the output folder, so a run
whose folder name depends on flags not given (DDPM's ``<dataset>_<size>x<size>``, Phaseformer's data folder name)
is found all the same. A data path taken from the checkpoint that no longer exists is one line naming the flag to pass
(:func:`check_saved_path`).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from utils.cli import upgrade_saved_config
from utils.config import config_to_dict
from utils.errors import CheckpointError

# Never taken from a checkpoint: they describe this session, this machine or this command, not the run.
SESSION_SETTINGS = frozenset({
    "resume_from_checkpoint", "config", "given_flags", "device", "dataloader_num_workers", "mixed_precision", "compile",
    "report_to", "checkpointing_minutes", "num_processes",
})


def _same(a: Any, b: Any) -> bool:
    a, b = config_to_dict({"v": a})["v"], config_to_dict({"v": b})["v"]
    if isinstance(a, str) and isinstance(b, str):
        return a.lower() == b.lower()
    return a == b


def given_flags(args: argparse.Namespace) -> set[str]:
    """The settings given on the command line or in ``--config`` (``args.given_flags``, which each trainer's
    ``parse_args`` records); for a Namespace built in code (tests, notebooks), every value that is set."""
    given = getattr(args, "given_flags", None)
    if given is None:
        return {key for key, value in vars(args).items() if value is not None}
    return set(given)


def resolve_resumed_config(
    args: argparse.Namespace,
    given: Iterable[str] | None,
    saved: dict | None,
    *,
    fixed: Iterable[str] = (),
    session: Iterable[str] = (),
    source: str = "the checkpoint",
) -> argparse.Namespace:
    """The run's configuration: ``args`` with every setting not in ``given`` (default :func:`given_flags`) taken
    from ``saved``; the bookkeeping ``given_flags`` itself is not part of it.

    ``fixed`` names the settings that may not change within a run: giving one with another value than ``saved``
    raises :class:`CheckpointError` naming the flag. ``session`` adds trainer-specific settings that are never
    inherited (beside :data:`SESSION_SETTINGS`). ``saved`` of ``None`` (a new run) returns a copy of ``args``.
    """
    config = argparse.Namespace(**{key: value for key, value in vars(args).items() if key != "given_flags"})
    if saved is None:
        return config
    saved = upgrade_saved_config(saved)
    given = given_flags(args) if given is None else set(given)
    for key in fixed:
        if key in given and key in saved and not _same(getattr(args, key), saved[key]):
            raise CheckpointError(
                f"{source} was trained with --{key} {_text(saved[key])}, not {_text(getattr(args, key))}; resume without "
                f"--{key} (it cannot change within a run) or start a new run in another --output_dir."
            )
    never = SESSION_SETTINGS | set(session)
    for key, value in saved.items():
        if key not in never and key not in given and hasattr(config, key):
            setattr(config, key, value)
    return config


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return " ".join(map(str, value))
    return str(value)


def find_latest_run_checkpoint(output_dir: str | Path, patterns: Iterable[str], run_dir: str | Path | None = None,
                               max_depth: int = 3) -> Path | None:
    """``--resume_from_checkpoint latest``: the most recently written checkpoint matching ``patterns`` in ``run_dir``
    when it has one, else in any folder under ``output_dir`` (``max_depth`` levels down); None for a fresh start.

    Hidden files (``.name.XXXX.tmp`` of an unfinished atomic save) never count.
    """
    patterns = list(patterns)

    def newest(files: list[Path]) -> Path | None:
        files = [f for f in files if f.is_file() and not f.name.startswith(".")]
        return max(files, key=lambda f: f.stat().st_mtime_ns) if files else None

    if run_dir is not None and Path(run_dir).is_dir():
        found = newest([f for pattern in patterns for f in Path(run_dir).glob(pattern)])
        if found is not None:
            return found
    root = Path(output_dir)
    if not root.is_dir():
        return None
    levels = ["/".join(["*"] * depth) for depth in range(max_depth + 1)]
    return newest([f for level in levels for pattern in patterns
                   for f in root.glob(f"{level}/{pattern}" if level else pattern)])


def check_saved_path(config: argparse.Namespace, key: str, source: str, what: str = "folder") -> None:
    """A data path that a resumed run took from its checkpoint must still exist: else one line naming ``--key``."""
    values = getattr(config, key, None)
    for value in values if isinstance(values, (list, tuple)) else [values]:
        if value is not None and not Path(value).exists():
            raise CheckpointError(f"--{key} {value} (recorded in {source}) does not exist any more; resume with --{key} "
                                  f"<the {what}'s new place>.")
