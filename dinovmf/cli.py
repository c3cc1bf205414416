"""The `dinovmf` command line.

Each sub-command lives in `dinovmf/commands/<name>.py` and exposes `register(subparsers)`, which adds
its parser and sets `func=run` on it. Modules are imported lazily by name so that `dinovmf --help`
stays fast and a missing optional dependency of one command does not break the others.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = ("prepare", "train", "eval", "export")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dinovmf",
        description="DINO-vMF / iBOT-vMF self-supervised pretraining with fused kernels.")
    parser.add_argument("--version", action="version", version=f"dinovmf {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"dinovmf.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name != f"dinovmf.commands.{name}":
                raise
            continue  # command not part of this build
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
