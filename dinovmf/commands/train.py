"""`dinovmf train`: run a config (preset name or YAML) with dotted overrides, optionally resuming."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

EPILOG = """examples:
  dinovmf train --config demo --out runs/demo
  dinovmf train --config vit_b16_in1k data.train=/data/in1k/train.beton steps=1000 train.batch_size=32
  dinovmf train --out runs/demo --resume auto          # continue the newest checkpoint
  torchrun --nproc_per_node 8 -m dinovmf.cli train --config vit_s16_in1k --out runs/s16
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("train", help="self-supervised pretraining (DINO / DINO-vMF / iBOT-vMF)",
                              description="Train a ViT with DINO, DINO-vMF or iBOT-vMF.", epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None,
                   help="preset name (demo, vit_s16_in1k, vit_b16_in1k, vit_l16_in1k) or a YAML file; "
                        "default: the run folder's config.yaml when resuming, else demo")
    p.add_argument("--out", default=None, help="run folder (checkpoints, metrics, plots); default runs/<config>")
    p.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="'auto': the newest checkpoint in OUT/checkpoints (fresh start if none); or a file")
    p.add_argument("--trust-pickle", action="store_true",
                   help="resume from a single-file (.pt) checkpoint even if it holds pickled objects beyond "
                        "tensors and plain types; unpickling can run code: only for files you trust")
    p.add_argument("overrides", nargs="*", metavar="key=value",
                   help="dotted config overrides, e.g. steps=100 optim.lr=1e-3 data.val=embedded")
    p.set_defaults(func=run)


def _config_source(args) -> tuple[str, Path]:
    """(config name/path, run folder) from the arguments, reusing a run's own config on resume."""
    if args.config is not None:
        name = args.config
        out = Path(args.out) if args.out else Path("runs") / Path(name).stem
        return name, out
    out = Path(args.out) if args.out else Path("runs") / "demo"
    saved = out / "config.yaml"
    if args.resume is not None and saved.is_file():
        return str(saved), out
    return "demo", out


def run(args) -> int:
    from dinovmf.backends import BackendUnavailable
    from dinovmf.checkpoint_writer import CheckpointError
    from dinovmf.config import load_config
    from dinovmf.train import NonFiniteLossError, train

    try:
        name, out = _config_source(args)
        cfg = load_config(name, args.overrides)
        summary = train(cfg, out, resume=args.resume, trust_pickle=args.trust_pickle)
    except (ValueError, FileNotFoundError, BackendUnavailable) as e:
        print(f"dinovmf train: error: {e}", file=sys.stderr)
        return 2
    except (NonFiniteLossError, CheckpointError) as e:
        print(f"dinovmf train: stopped: {e}", file=sys.stderr)
        return 1
    if summary.get("interrupted"):
        return summary["exit_code"]  # 75 pre-empted (SIGTERM / SIGUSR1 / SIGUSR2), 130 Ctrl-C: saved either way
    if "knn_top1" in summary and "knn_top1_random_init" in summary:
        print(f"kNN top-1: trained teacher {summary['knn_top1']:.2f}% vs random init "
              f"{summary['knn_top1_random_init']:.2f}%")
    for path in summary.get("plots", []):
        if path.endswith("evaluation.png"):
            print(f"evaluation figure: {path}")
    return 0
