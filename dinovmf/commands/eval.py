"""`dinovmf eval knn|linear CKPT --train X --val Y`: evaluate a checkpoint's frozen teacher backbone."""
from __future__ import annotations

import sys
from pathlib import Path


def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="kNN / linear-probe evaluation of a checkpoint",
                              description="Evaluate frozen features of a training checkpoint.")
    sub = p.add_subparsers(dest="protocol", metavar="PROTOCOL", required=True)
    knn = sub.add_parser("knn", help="weighted kNN (DINO protocol: k=20, T=0.07)")
    knn.add_argument("--k", type=int, default=20, help="neighbours (default 20)")
    knn.add_argument("--temperature", type=float, default=0.07, help="vote weight exp(sim/T) (default 0.07)")
    linear = sub.add_parser("linear", help="linear probe (L2-regularised logistic regression, L-BFGS)")
    linear.add_argument("--weight-decay", type=float, default=1e-4, help="L2 strength (default 1e-4)")
    for q in (knn, linear):
        q.add_argument("checkpoint", help="a training checkpoint (out/checkpoints/step_N, or a step_N.pt file)")
        q.add_argument("--train", required=True, help="labelled train set: embedded, an image folder or a .beton")
        q.add_argument("--val", required=True, help="labelled validation set (same forms)")
        q.add_argument("--which", choices=("teacher", "student"), default="teacher",
                       help="which network's backbone (default: teacher)")
        q.add_argument("--image-size", type=int, default=None,
                       help="evaluation resolution (default: the run's global crop size)")
        q.add_argument("--batch-size", type=int, default=128)
        q.add_argument("--loader", choices=("auto", "ffcv", "pil"), default="auto",
                       help="image loader; pil reads image folders directly, without preparing a .beton")
        q.add_argument("--trust-pickle", action="store_true",
                       help="read a .pt checkpoint even if it holds pickled objects beyond tensors and plain "
                            "types; unpickling can run code: only for files you trust")
        q.add_argument("--workdir", default=None,
                       help="where image folders are prepared (default: the run folder's data/)")
        q.set_defaults(func=run)


def run(args) -> int:
    import torch

    from dinovmf.data import resolve_dataset
    from dinovmf.eval.run import knn_for_backbone, linear_for_backbone
    from dinovmf.models import load_backbone

    try:
        if args.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        backbone = load_backbone(args.checkpoint, args.which, trust_pickle=args.trust_pickle).to(device)
        ckpt_path = Path(args.checkpoint)
        workdir = Path(args.workdir) if args.workdir else ckpt_path.resolve().parent.parent / "data"
        train_path, val_path = (Path(spec) if args.loader == "pil" and Path(spec).is_dir()
                                else resolve_dataset(spec, workdir, split=split)
                                for spec, split in ((args.train, "train"), (args.val, "val")))
        loading = {"loader_backend": args.loader}
        image_size = args.image_size or backbone.img_size  # the training's crops.global_size
        if args.protocol == "knn":
            if args.k < 1 or args.temperature <= 0:
                raise ValueError(f"need --k >= 1 and --temperature > 0, got {args.k} and {args.temperature}")
            result = knn_for_backbone(backbone, train_path, val_path, image_size, args.batch_size, device,
                                      args.k, args.temperature, **loading)
            top5 = f", top-5: {result['top5']:.2f}%" if "top5" in result else ""
            print(f"kNN top-1: {result['top1']:.2f}%{top5} (k={args.k}, T={args.temperature}, {args.which})")
        else:
            result = linear_for_backbone(backbone, train_path, val_path, image_size, args.batch_size, device,
                                         args.weight_decay, **loading)
            print(f"linear top-1: {result['top1']:.2f}% (train {result['train_top1']:.2f}%, {args.which})")
    except (ValueError, FileNotFoundError) as e:
        print(f"dinovmf eval: error: {e}", file=sys.stderr)
        return 2
    return 0
