"""User-facing errors and the one place that turns them into a single line and a non-zero exit.

Every entry point (the ``train_*.py`` scripts, ``infer.py``, ``scripts/*.py``) runs its ``main`` through
:func:`run_cli`. A :class:`UserError` (bad flag, missing file, wrong checkpoint kind, NaN loss) is printed
as one sentence on stderr, never as a traceback. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


class UserError(Exception):
    """A problem the user can fix: the message says what was expected, what was found and what to do."""


class DataError(UserError):
    """Missing, empty, unpaired or unreadable data."""


class CheckpointError(UserError):
    """A checkpoint that is missing, of the wrong kind, or does not fit the model."""


def one_line(message: str) -> str:
    """The last meaningful line of a message.

    DataLoader workers re-raise our exceptions in the main process with the worker's traceback
    prepended; the user needs only the sentence at the end.
    """
    lines = [line.strip() for line in str(message).strip().splitlines() if line.strip()]
    if not lines:
        return ""
    last = lines[-1]
    # "DataError: Cannot read image ..." -> "Cannot read image ..."
    for cls in (UserError, DataError, CheckpointError):
        prefix = f"{cls.__name__}: "
        if last.startswith(prefix):
            last = last[len(prefix):]
    return last


def run_cli(main: Callable[[], object]) -> None:
    """Run ``main()``; a UserError becomes ``error: <one line>`` on stderr and exit status 2."""
    try:
        main()
        _release_run_objects()
    except UserError as err:
        _close_progress_bars()
        log = sys.modules.get("utils.log")
        if log is not None:  # a run refused before it trained leaves no run folder holding only its log
            log.remove_unstarted_run_folders()
        print(f"error: {one_line(str(err))}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


def _release_run_objects() -> None:
    """Free what the finished run left behind while the interpreter is whole, then end any process group.

    A DDP-wrapped model keeps its Gloo process group alive; torn down during interpreter finalization, Gloo's worker
    threads can abort a finished run ("terminate called without an active exception", exit -6 under torchrun).
    """
    import gc

    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def _close_progress_bars() -> None:
    """End open tqdm bars so that the error starts on a line of its own."""
    try:
        from tqdm import tqdm
    except ImportError:
        return
    for bar in list(getattr(tqdm, "_instances", [])):
        bar.close()
