"""`dinovmf export CKPT OUT [--layout dinovmf|timm|dinov2|dinov3]`: the teacher backbone + OUT.json."""
from __future__ import annotations

import argparse
import sys

from dinovmf.models.layouts import LAYOUTS


def register(subparsers) -> None:
    """Add the `export` sub-command to the `dinovmf` parser."""
    parser = subparsers.add_parser(
        "export", help="export the teacher backbone of a checkpoint (timm key names, or DINOv2 / DINOv3 layouts)",
        description="Write the EMA teacher backbone of a training checkpoint as safetensors (or a .pth state "
                    "dict) plus a JSON config beside it (OUT.json). The default key names are timm's "
                    "vit_base_patch16_224-style ones; --layout writes those of timm's DINOv2 / DINOv3 ports "
                    "(timm) or of the released DINOv2 / DINOv3 .pth files (dinov2, dinov3), so the weights load "
                    "where they came from. Load any of them back with dinovmf.models.load_backbone(OUT).")
    parser.add_argument("checkpoint", help="training checkpoint: a checkpoints/step_N directory (or a "
                                           "single-file step_N.pt of earlier versions)")
    parser.add_argument("out", help="output file, ending in .safetensors or .pth")
    parser.add_argument("--layout", choices=LAYOUTS, default="dinovmf",
                        help="key names to write (default: dinovmf, i.e. timm's classic ViT names)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="read a .pt checkpoint even if it holds pickled objects beyond tensors and plain "
                             "types; unpickling can run code: only for files you trust")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export; a bad checkpoint, output path or layout is reported in one line with exit status 2."""
    from dinovmf.models.export import export_teacher_backbone

    try:
        out = export_teacher_backbone(args.checkpoint, args.out, layout=args.layout, trust_pickle=args.trust_pickle)
    except ValueError as e:
        print(f"dinovmf export: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.layout} layout) and {out.with_suffix('.json')}")
    return 0
