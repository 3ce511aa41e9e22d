"""Small ``type=`` validators for argparse: a bad value is refused while parsing, with the flag's name.

argparse calls a flag's ``type`` on the string the user typed; an :class:`argparse.ArgumentTypeError` raised
there becomes ``error: argument --flag: <message>`` (one line through :func:`utils.config.one_line_errors`), so
a zero step count or a negative overlap never reaches the code that would turn it into NaN pixels or a silently
changed value. Validators that need another flag or a loaded checkpoint (steps against the training timesteps,
a border crop against the image size) live with the code that knows both.

    parser.add_argument("--samples", type=positive_int)
    parser.add_argument("--eta", type=fraction)
    parser.add_argument("--resize", type=int_at_least(16))
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from pathlib import Path

__all__ = [
    "GUIDANCE_SCALE_MAX",
    "check_output_dir",
    "check_output_file",
    "float_between",
    "fraction",
    "fraction_below_one",
    "guidance_scale",
    "int_at_least",
    "int_between",
    "non_negative_float",
    "non_negative_int",
    "output_file",
    "output_folder",
    "positive_float",
    "positive_int",
    "seed",
    "zero_or_at_least",
]

SEED_MAX = 2**32 - 1  # numpy's seed range, which accelerate.utils.set_seed also feeds
# Classifier-free guidance scales in use stay below 20 (SeeSR 5.5, DiT 1.5-4); far above, the guided prediction is the
# amplified difference of two predictions and the sampler leaves the image range (1e30 overflowed to NaN images).
GUIDANCE_SCALE_MAX = 100.0


def _int(text: str) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None


def _float(text: str) -> float:
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value


def int_at_least(minimum: int) -> Callable[[str], int]:
    """A validator for whole numbers >= ``minimum``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value

    parse.__name__ = f"int_at_least_{minimum}"
    return parse


def int_between(minimum: int, maximum: int) -> Callable[[str], int]:
    """A validator for whole numbers in ``[minimum, maximum]``."""

    def parse(text: str) -> int:
        value = _int(text)
        if not minimum <= value <= maximum:
            raise argparse.ArgumentTypeError(f"must be between {minimum} and {maximum}, got {value}")
        return value

    parse.__name__ = f"int_between_{minimum}_{maximum}"
    return parse


def float_between(minimum: float, maximum: float, *, below_maximum: bool = False) -> Callable[[str], float]:
    """A validator for finite numbers in ``[minimum, maximum]`` (``[minimum, maximum)`` with ``below_maximum``)."""
    upper = ")" if below_maximum else "]"

    def parse(text: str) -> float:
        value = _float(text)
        if value < minimum or value > maximum or (below_maximum and value == maximum):
            raise argparse.ArgumentTypeError(f"must be in [{minimum:g}, {maximum:g}{upper}, got {value:g}")
        return value

    parse.__name__ = f"float_between_{minimum:g}_{maximum:g}"
    return parse


def zero_or_at_least(minimum: int) -> Callable[[str], int]:
    """A validator for 0 (a feature turned off) or a whole number >= ``minimum``."""

    def parse(text: str) -> int:
        value = _int(text)
        if value != 0 and value < minimum:
            raise argparse.ArgumentTypeError(f"must be 0 (off) or at least {minimum}, got {value}")
        return value

    parse.__name__ = f"zero_or_at_least_{minimum}"
    return parse


positive_int = int_at_least(1)
positive_int.__name__ = "positive_int"
non_negative_int = int_at_least(0)
non_negative_int.__name__ = "non_negative_int"


def seed(text: str) -> int:
    """A random seed in 0..2**32-1 (numpy's range; torch and accelerate take it too)."""
    value = _int(text)
    if not 0 <= value <= SEED_MAX:
        raise argparse.ArgumentTypeError(f"must be a seed between 0 and {SEED_MAX}, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    value = _float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0."""
    value = _float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value:g}")
    return value


def fraction(text: str) -> float:
    """A number in [0, 1]."""
    value = _float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value:g}")
    return value


def fraction_below_one(text: str) -> float:
    """A number in [0, 1): Adam's betas, EMA decays, dropout (1 would freeze the average or drop everything)."""
    value = _float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {value:g}")
    return value


def guidance_scale(text: str) -> float:
    """A classifier-free guidance scale in [0, :data:`GUIDANCE_SCALE_MAX`]."""
    value = _float(text)
    if not 0.0 <= value <= GUIDANCE_SCALE_MAX:
        raise argparse.ArgumentTypeError(f"must be between 0 and {GUIDANCE_SCALE_MAX:g}, got {value:g}")
    return value


def output_folder(text: str) -> str:
    """A folder to write into (it may not exist yet): a file there, or a file where one of its parents should be, is
    refused while parsing, before any work that would end in ``NotADirectoryError`` after hours."""
    blocker = _file_in_the_way(Path(text))
    if blocker is not None:
        where = "is a file" if blocker == Path(text) else f"goes through the file {blocker}"
        raise argparse.ArgumentTypeError(f"{text} {where}; pass a folder to write into")
    return text


def output_file(text: str) -> str:
    """A file to write (it may not exist yet): a folder there, or a file where its parent folder should be, is refused."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder; pass a file name to write")
    blocker = _file_in_the_way(path.parent)
    if blocker is not None:
        raise argparse.ArgumentTypeError(f"{text} goes through the file {blocker}; pass a path inside a folder")
    return text


def _file_in_the_way(folder: Path) -> Path | None:
    """The first existing non-folder on the way to ``folder`` (itself included), or None."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def check_output_dir(path: str | Path, flag: str = "--output_dir") -> Path:
    """``path`` as a folder to write into, checked as :func:`output_folder` but after parsing (a :class:`UserError`)."""
    return Path(_checked(output_folder, path, flag))


def check_output_file(path: str | Path, flag: str) -> Path:
    """``path`` as a file to write, checked as :func:`output_file` but after parsing (a :class:`UserError`)."""
    return Path(_checked(output_file, path, flag))


def _checked(validator: Callable[[str], str], path: str | Path, flag: str) -> str:
    from utils.errors import UserError

    try:
        return validator(str(path))
    except argparse.ArgumentTypeError as err:
        raise UserError(f"{flag} {err}.") from None
