"""The ``wanda-lightning`` command line: one subcommand per module of this package (:mod:`.prune`, :mod:`.shrink`,
:mod:`.gguf`, :mod:`.speed`, :mod:`.eval`, :mod:`.inspect`, :mod:`.bench`, :mod:`.demo`), sharing :mod:`.arguments` and
:mod:`.loading`.

A subcommand is declared once, by its module, named in :data:`SUBCOMMANDS`:

- the module docstring is its help text: the first paragraph is the one-line ``help`` listed by
  ``wanda-lightning --help``, the rest the ``description`` of ``wanda-lightning COMMAND --help`` (see
  :func:`.arguments.command_texts`);
- ``add_arguments(parser: argparse.ArgumentParser) -> None`` adds its arguments;
- ``run(args: argparse.Namespace) -> int`` runs it and returns the exit status.

:func:`build_parser` adds the sub-parser of each and sets ``run`` as its ``handler``.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from .arguments import command_texts

__all__ = ["main"]

# The modules of the subcommands, in the order `wanda-lightning --help` lists them; see the module docstring.
SUBCOMMANDS: tuple[str, ...] = ("bench", "prune", "shrink", "gguf", "speed", "eval", "inspect", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanda-lightning",
        description="Prune language models with Wanda (|W| x ||X||, per output row, one shot).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        module = importlib.import_module(f"wanda_lightning.cli.{name}")
        help_text, description = command_texts(module.__doc__)
        command = subparsers.add_parser(name, help=help_text, description=description)
        command.set_defaults(handler=module.run)
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except (ValueError, TypeError, OSError, ModuleNotFoundError, FloatingPointError) as error:
        print(f"wanda-lightning {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
