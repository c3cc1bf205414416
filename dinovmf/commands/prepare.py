"""`dinovmf prepare SRC OUT [--force] [--max-resolution N]`: an image folder or `embedded` -> .beton."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "prepare", help="write an image folder (or the embedded dataset) to an FFCV .beton",
        description="Write SRC to the FFCV file OUT. SRC is an image folder (class sub-folders give "
                    "labels, a flat folder gives label -1) or 'embedded' ('embedded:val' for its "
                    "validation split). Corrupt or unreadable images are skipped and listed.")
    p.add_argument("src", help="image folder, or 'embedded' / 'embedded:train' / 'embedded:val'")
    p.add_argument("out", help="the .beton file to write")
    p.add_argument("--force", action="store_true", help="overwrite OUT if it exists")
    p.add_argument("--max-resolution", type=int, default=None, metavar="N",
                   help="shrink images whose longer side exceeds N pixels")
    p.add_argument("--workers", type=int, default=None, help="writer processes (default: min(8, cores))")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from dinovmf.data.ffcv_loader import ffcv_available
    if not ffcv_available():
        print("dinovmf prepare: error: ffcv is not importable, so no .beton can be written; the PIL "
              "loader reads image folders directly (give the folder as data.train)", file=sys.stderr)
        return 2
    from dinovmf.data.prepare import prepare_dataset
    try:
        report = prepare_dataset(args.src, args.out, force=args.force,
                                 max_resolution=args.max_resolution, num_workers=args.workers)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"dinovmf prepare: error: {e}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0
