"""`dinovmf export CKPT OUT.safetensors`: the teacher backbone with timm key names + OUT.json."""
from __future__ import annotations

import argparse
import sys


def register(subparsers) -> None:
    """Add the `export` sub-command to the `dinovmf` parser."""
    parser = subparsers.add_parser(
        "export", help="export the teacher backbone of a checkpoint to safetensors (timm key names)",
        description="Write the EMA teacher backbone of a training checkpoint as safetensors with "
                    "timm vit_base_patch16_224-style key names, plus a JSON config beside it "
                    "(OUT.json). Load it back with dinovmf.models.load_backbone(OUT).")
    parser.add_argument("checkpoint", help="training checkpoint: a checkpoints/step_N directory (or a "
                                           "single-file step_N.pt of earlier versions)")
    parser.add_argument("out", help="output file, must end in .safetensors")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read a .pt checkpoint even if it holds pickled objects beyond tensors and plain "
                             "types; unpickling can run code: only for files you trust")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export; a bad checkpoint or output path is reported in one line with exit status 2."""
    from dinovmf.models.export import export_teacher_backbone

    try:
        out = export_teacher_backbone(args.checkpoint, args.out, trust_pickle=args.trust_pickle)
    except ValueError as e:
        print(f"dinovmf export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return 0
