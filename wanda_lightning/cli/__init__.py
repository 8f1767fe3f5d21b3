"""The ``wanda-lightning`` command line: one subcommand per module of this package (:mod:`.prune`, :mod:`.eval`,
:mod:`.inspect`, :mod:`.bench`, :mod:`.demo`), sharing :mod:`.arguments` and :mod:`.loading`."""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

__all__ = ["main"]

# Each module defines `register(subparsers)`, which adds its parser and sets `handler=callable(args) -> int`.
SUBCOMMANDS: tuple[str, ...] = ("bench", "prune", "shrink", "speed", "eval", "inspect", "demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanda-lightning",
        description="Prune language models with Wanda (|W| x ||X||, per output row, one shot).",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in SUBCOMMANDS:
        importlib.import_module(f"wanda_lightning.cli.{name}").register(subparsers)
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
