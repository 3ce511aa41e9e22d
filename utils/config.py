"""Configuration: argparse flags, ``--config preset.yaml`` defaults, and the resolved config of a run.

Precedence (as in timm's train.py): argparse defaults < keys of the YAML file given by ``--config`` < flags on
the command line. A YAML key is a flag's destination (``batch_size``) or the flag's own name (``no-amp``,
``no_amp``: ``true`` means "the flag is given"). An unknown key or a value outside a flag's choices is an error
that names the file and the key, so a typo in a preset never passes silently.

Parsers are :class:`ArgumentParser`, argparse's own with two additions: a bad flag is one ``error:`` line, and the
parser keeps a public list of its flags (``parser.flags``), which the YAML mapping and :func:`explicitly_given` read
(argparse keeps its list private).

The resolved configuration is plain data (``config_to_dict``): it is written as ``args.yaml`` beside every run's
outputs and stored inside every checkpoint, where ``torch.load(weights_only=True)`` can read it back.
"""

from __future__ import annotations

import argparse
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


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` that reports a bad flag in one line and records its flags in ``self.flags``.

    Every action added through ``add_argument``, also inside argument groups, is appended to ``flags`` in order, so a
    destination's first action is its house flag and later ones its aliases (utils/cli.py). Sub-command parsers are
    of this class too (argparse builds them with the parent's class).
    """

    def __init__(self, *args, **kwargs):
        self.flags: list[argparse.Action] = []  # before super().__init__, which adds -h/--help
        super().__init__(*args, **kwargs)

    def add_argument(self, *args, **kwargs) -> argparse.Action:
        action = super().add_argument(*args, **kwargs)
        self.flags.append(action)
        return action

    def add_argument_group(self, *args, **kwargs):
        group = super().add_argument_group(*args, **kwargs)
        add_to_group = group.add_argument

        def add_argument(*names, **options) -> argparse.Action:
            action = add_to_group(*names, **options)
            self.flags.append(action)
            return action

        group.add_argument = add_argument
        return group

    def error(self, message: str):
        sys.stderr.write(f"error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _flags_of(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    if not isinstance(parser, ArgumentParser):
        raise TypeError("build the parser with utils.config.ArgumentParser: YAML presets and resumes need its list of flags")
    return parser.flags


def _is_switch(action: argparse.Action) -> bool:
    """A flag that takes no value: store_true/false/const, and each half of --x/--no-x."""
    return action.nargs == 0 or isinstance(action, argparse.BooleanOptionalAction)


def _yaml_defaults(parser: argparse.ArgumentParser, values: dict, path: str) -> dict:
    """Map YAML keys to parser destinations, checking names and choices."""
    flags = _flags_of(parser)
    by_dest = {}
    for action in flags:  # the first action of a destination is its house flag, later ones its aliases
        if action.dest not in ("help", "config"):
            by_dest.setdefault(action.dest, action)
    by_option = {}
    for action in flags:
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
            if _is_switch(action):
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
    """A plain argparse parser (no sub-commands) that reports a bad flag as one line, ``error: ... (see PROG --help)``.

    Parsers built as :class:`ArgumentParser` do this already, sub-commands included.
    """

    def error(message: str) -> None:
        sys.stderr.write(f"error: {message} (see {parser.prog} --help)\n")
        sys.exit(2)

    if not isinstance(parser, ArgumentParser):
        parser.error = error
    return parser


def parse_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv`` with the YAML file named by ``--config`` (if any) supplying the defaults."""
    if not any(action.dest == "config" for action in _flags_of(parser)):
        add_config_argument(parser)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, _ = pre.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_yaml_defaults(parser, _load_yaml(known.config), known.config))
    return parser.parse_args(argv)


class _NothingDefaulted(argparse.Namespace):
    """A namespace on which every attribute seems present, so argparse fills in no default: only given flags land.

    Unset attributes read as None, which is what argparse's append and count actions expect of a fresh destination;
    argparse's own bookkeeping attributes (``_unrecognized_args``) and dunders stay absent.
    """

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        return None


def explicitly_given(parser: argparse.ArgumentParser, argv: Sequence[str] | None, config_path: str | None = None) -> set[str]:
    """Destinations set on the command line or in the ``--config`` file rather than left at their defaults.

    A resumed run takes every other setting from its checkpoint.
    """
    given = set(vars(parser.parse_args(argv, namespace=_NothingDefaulted())))
    if config_path:
        given |= set(_yaml_defaults(parser, _load_yaml(config_path), config_path))
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


def setting_changes(recorded: dict, current: dict) -> list[str]:
    """``"key old -> new"`` for each of ``current``'s settings that differs from ``recorded`` (as read back from JSON:
    ``current`` is compared as JSON would store it, so tuples equal lists). Sample folders use it to refuse a rerun
    with other settings, which would mix two sample sets."""
    import json

    current = json.loads(json.dumps(current))
    return [f"{key} {recorded.get(key)!r} -> {value!r}" for key, value in current.items() if recorded.get(key) != value]


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
