"""`dinovmf attention CKPT_OR_EXPORT IMAGE... --out DIR`: last-block CLS attention maps over images."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  dinovmf attention runs/demo/checkpoints/step_0000744 photo.jpg --out attn --image-size 64 --threshold 0.6
  dinovmf attention vit_b16.safetensors images/ --out attn     # a folder: every image in it
"""


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "attention", help="last-block CLS-to-patch attention maps of a checkpoint or export over images",
        description="For each image: the last block's CLS-to-patch attention of every head and their mean, "
                    "as heat maps over the image (<stem>_head<h>.png, <stem>_mean.png), and one "
                    "attention_overview.png. Maps are renormalised over the patches; the share of the CLS "
                    "attention on the CLS token and on register tokens is printed.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="a training checkpoint (a checkpoints/step_N directory, or a .pt file) or an "
                                 "export (.safetensors with its .json)")
    p.add_argument("images", nargs="+", help="image files, or folders of images")
    p.add_argument("--out", required=True, help="folder for the PNGs (created)")
    p.add_argument("--image-size", type=int, default=None, metavar="N",
                   help="images are centre-cropped to a square and resized to N x N (a multiple of the patch "
                        "size; the patch grid is N / patch); default: the model's training resolution")
    p.add_argument("--threshold", type=float, default=None, metavar="F",
                   help="also write binary masks of the patches holding the top F of each map's attention "
                        "mass (DINO's figure: 0.6)")
    p.add_argument("--which", choices=("teacher", "student"), default="teacher",
                   help="checkpoints only: which network's backbone (default: teacher)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="read a .pt checkpoint even if it holds pickled objects beyond tensors and plain types; "
                        "unpickling can run code: only for files you trust")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from dinovmf.eval.attention import expand_image_paths, write_attention_maps
    from dinovmf.models import load_backbone

    try:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = load_backbone(args.model, args.which, trust_pickle=args.trust_pickle).to(device)
        image_size = args.image_size or backbone.img_size
        summaries = write_attention_maps(backbone, expand_image_paths(args.images), args.out, image_size,
                                         args.threshold, device)
    except (ValueError, FileNotFoundError) as e:
        print(f"dinovmf attention: error: {e}", file=sys.stderr)
        return 2
    grid = image_size // backbone.patch_size
    print(f"{len(summaries)} image(s) at {image_size} px ({grid}x{grid} patches of {backbone.patch_size}), "
          f"{backbone.num_heads} heads, {backbone.num_register_tokens} register token(s) -> {args.out}")
    for s in summaries:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731 - over heads
        registers = f", registers {mean(s['register_mass']):.2f}" if backbone.num_register_tokens else ""
        print(f"  {s['image']}: CLS attention on patches {mean(s['patch_mass']):.2f} (itself "
              f"{mean(s['cls_mass']):.2f}{registers}; mean over heads), {len(s['files'])} PNGs")
    print(f"overview: {args.out}/attention_overview.png")
    return 0
