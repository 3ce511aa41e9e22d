"""Named registries for the repository's variation points (the ``DiT_models`` / BasicSR ``ARCH_REGISTRY`` idea).

A research change here is usually "one more of something": an injector variant, a loss term, a backbone, a
sampler, a UNet preset. Each of those lives in one :class:`Registry`, defined in the module that owns the
idea (``models/timestep_adaptive.py`` holds ``INJECTORS``, ``losses/phaseformer_loss.py`` holds ``LOSS_TERMS``,
...). The registry's keys are the only list of names in the tree: argparse ``choices``, the names recorded in
saved configs and checkpoints, and the names the shell scripts loop over (``python -m utils.registry
models.timestep_adaptive INJECTORS`` prints them) all come from it.

Usage::

    INJECTORS = Registry("injector", flag="--injector")

    @INJECTORS.register("timestep_only", help="residuals * w(t)")
    def timestep_only(residual_levels, **options):
        return MultiScaleInjector(...)

    parser.add_argument("--injector", choices=INJECTORS.names(), help=INJECTORS.help_text())
    injector = INJECTORS.get(args.injector)(residual_levels, **options)

An entry is any object (a builder function, a dataclass spec, a class); the registry stores it with a one-line
description. Looking up an unknown name is a :class:`~utils.errors.UserError` that names the flag and lists
the choices.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

from utils.errors import UserError

T = TypeVar("T")


class Registry(Generic[T]):
    """An ordered name -> entry mapping with one-line descriptions; registration order is the listing order."""

    def __init__(self, kind: str, flag: str | None = None):
        self.kind = kind
        self.flag = flag
        self._entries: dict[str, T] = {}
        self._help: dict[str, str] = {}

    def register(self, name: str, entry: T | None = None, *, help: str = "") -> Callable[[T], T] | T:
        """Add ``entry`` under ``name``; used bare (``register(name, obj)``) or as a decorator."""
        if entry is not None:
            return self._add(name, entry, help)

        def decorator(obj: T) -> T:
            return self._add(name, obj, help)

        return decorator

    def _add(self, name: str, entry: T, help: str) -> T:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._entries[name] = entry
        self._help[name] = help or (getattr(entry, "__doc__", None) or "").strip().split("\n")[0]
        return entry

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name is one line naming the flag and the choices."""
        try:
            return self._entries[name]
        except KeyError:
            where = self.flag or self.kind
            raise UserError(
                f"Expected {where} to be one of {', '.join(self._entries)}, found {name!r}.") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def help_text(self) -> str:
        """``name: description; ...`` for an argparse help line."""
        return "; ".join(f"{name}: {text}" if text else name for name, text in self._help.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self):
        return self._entries.items()

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {list(self._entries)})"


def _main(argv: list[str]) -> int:
    """``python -m utils.registry MODULE NAME``: print a registry's keys, space-separated (for shell loops)."""
    if len(argv) != 2:
        print("usage: python -m utils.registry MODULE REGISTRY  (e.g. models.timestep_adaptive INJECTORS)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(argv[0])
    registry: Any = getattr(module, argv[1])
    print(" ".join(registry.names()))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
