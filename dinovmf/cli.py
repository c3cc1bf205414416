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

COMMANDS = ("prepare", "train", "eval", "export", "attention", "plan")


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


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse the command line; `key=value` overrides may sit anywhere on it.

    argparse stops filling a positional list at the first option (`train --config demo steps=5 --out x
    optim.lr=1` leaves `optim.lr=1` over), so the stragglers are appended to the command's overrides.
    """
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    args.print_help = parser.print_help
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if getattr(args, "func", None) is None:
        args.print_help()
        return 0
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
