"""Configuration: argparse flags, ``--config preset.yaml`` defaults, and the resolved config of a run.

Precedence (as in timm's train.py): argparse defaults < keys of the YAML file given by ``--config`` < flags on
the command line. A YAML key is a flag's destination (``batch_size``) or the flag's own name (``no-amp``,
``no_amp``: ``true`` means "the flag is given"). An unknown key or a value outside a flag's choices is an error
that names the file and the key, so a typo in a preset never passes silently.

The resolved configuration is plain data (``config_to_dict``): it is written as ``args.yaml`` beside every run's
outputs and stored inside every checkpoint, where ``torch.load(weights_only=True)`` can read it back.
"""

from __future__ import annotations

import argparse
import copy
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from utils.errors import UserError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=str,
        default=None,
        help="YAML preset whose keys set this script's defaults (flag names or destinations); "
        "flags given on the command line override it.",
    )


def _load_yaml(path: str) -> dict:
    file = Path(path)
    if not file.is_file():
        raise UserError(f"--config {path}: no such file; pass a YAML preset such as one in configs/.")
    try:
        values = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"--config {path}: not valid YAML ({str(err).splitlines()[0]}).") from err
    if not isinstance(values, dict):
        raise UserError(f"--config {path}: expected a mapping of flag names to values, found {type(values).__name__}.")
    return values


def _yaml_defaults(parser: argparse.ArgumentParser, values: dict, path: str) -> dict:
    """Map YAML keys to parser destinations, checking names and choices."""
    by_dest = {}
    for action in parser._actions:  # the first action of a destination is its house flag, later ones its aliases
        if action.dest not in ("help", "config"):
            by_dest.setdefault(action.dest, action)
    by_option = {}
    for action in parser._actions:
        for option in action.option_strings:
            name = option.lstrip("-")
            by_option[name] = action
            by_option[name.replace("-", "_")] = action

    defaults = {}
    for key, value in values.items():
        key = str(key)
        if key in by_dest:
            action = by_dest[key]
        elif key in by_option:
            action = by_option[key]
            # `no-amp: true` in YAML means the flag `--no-amp` is given; `no-compile: true` means `--no-compile`.
            if isinstance(action, (argparse._StoreConstAction, argparse.BooleanOptionalAction)):
                if not isinstance(value, bool):
                    raise UserError(f"--config {path}: key '{key}' is a switch; give true or false, not {value!r}.")
                if isinstance(action, argparse.BooleanOptionalAction):
                    value = value != key.startswith("no")
                elif not value and action.default is None:
                    continue  # `no-amp: false`: the alias is not given, the house flag keeps its default
                else:
                    value = action.const if value else action.default
        else:
            valid = ", ".join(sorted(by_dest))
            raise UserError(f"--config {path}: unknown key '{key}'; valid keys are: {valid}.")
        # A translating alias (`precision: 32` -> mixed_precision no) converts numbers too.
        translates = getattr(action.type, "translates", False)
        if translates and value is not None:
            value = str(value)
        if action.type is not None and isinstance(value, str) and action.type is not str:
            try:
                value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise UserError(f"--config {path}: '{key}: {value}' is not a valid value ({err}).") from err
        if action.choices is not None and value is not None:
            items = value if isinstance(value, list) else [value]
            bad = [v for v in items if v not in action.choices]
            if bad:
                raise UserError(
                    f"--config {path}: '{key}: {bad[0]}' is not one of {', '.join(map(str, action.choices))}."
                )
        defaults[action.dest] = value
    return defaults


def one_line_errors(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Report a bad flag as one line, ``error: ... (see PROG --help)``, instead of the usage block; sub-commands too."""

    def error(message: str) -> None:
        sys.stderr.write(f"error: {message} (see {parser.prog} --help)\n")
        sys.exit(2)

    parser.error = error
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for subparser in action.choices.values():
                one_line_errors(subparser)
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the YAML file named by ``--config`` (if any) supplying the defaults."""
    one_line_errors(parser)
    if not any(a.dest == "config" for a in parser._actions):
        add_config_argument(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, _load_yaml(known.config), known.config))
    return parser.parse_args(argv)


def explicitly_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None, config_path: str | None = None) -> set[str]:
    """Destinations set on the command line or in the ``--config`` file rather than left at their defaults.

    A resumed run takes every other setting from its checkpoint.
    """
    probe = copy.deepcopy(parser)
    probe._defaults.clear()
    for action in probe._actions:
        action.default = argparse.SUPPRESS
    given = set(vars(probe.parse_args(argv)))
    if config_path:
        given |= set(_yaml_defaults(probe, _load_yaml(config_path), config_path))
    return given - {"config"}


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    return str(value)


def config_to_dict(config: argparse.Namespace | dict) -> dict:
    """Plain, YAML- and ``weights_only``-safe copy of a Namespace or dict (paths and tuples become str/list)."""
    items = vars(config) if isinstance(config, argparse.Namespace) else dict(config)
    return {key: _plain(value) for key, value in items.items()}


def save_config(config: argparse.Namespace | dict, path: str | Path) -> Path:
    """Write the resolved configuration as YAML (atomically)."""
    from utils.checkpoint import atomic_write_text

    text = yaml.safe_dump(config_to_dict(config), sort_keys=False)
    return atomic_write_text(text, path)


def load_config(path: str | Path) -> dict:
    return yaml.safe_load(Path(path).read_text()) or {}
