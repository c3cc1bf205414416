"""`dinovmf plan`: what a run needs on a cluster (images/s, communication, loader cores, checkpoints, wall time,
GPU-hours), from the models' FLOP counts and stated assumptions (`dinovmf.plan`)."""
from __future__ import annotations

import argparse
import sys

EPILOG = """examples:
  dinovmf plan --config vit_b16_in1k --gpu H100 --nodes 4                  # 32 H100s, 100 and 300 epochs
  dinovmf plan --config vit_l16_in1k --gpu A100 --nodes 2 --inter-node-gbps 12.5 --cpu-cores-per-gpu 6
  dinovmf plan --config vit_s16_in1k --gpu MI300X --peak-tflops 1307 --nodes 1 train.batch_size=128
  dinovmf plan --published                                                 # the model against published runs
"""


def register(subparsers) -> None:
    p = subparsers.add_parser("plan", help="size a run on a cluster: img/s, communication, loader cores, "
                                           "checkpoints, wall time and GPU-hours",
                              description="Predict what a training run needs on a cluster, printing every "
                                          "assumption with the result (docs/DESIGN.md §3).",
                              epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="vit_b16_in1k", help="preset name or YAML file (default vit_b16_in1k)")
    p.add_argument("--gpu", default="H100", help="GPU kind with a known data-sheet peak (H100, A100, V100, ...)")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="dense bf16 peak per GPU in TFLOP/s, for a GPU kind the table does not know")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--mfu", type=float, default=None, help="model FLOP utilisation to assume (default 0.35)")
    p.add_argument("--intra-node-gbps", type=float, default=200.0,
                   help="bus bandwidth per GPU inside a node, GB/s (nccl-tests busbw; default 200)")
    p.add_argument("--inter-node-gbps", type=float, default=25.0,
                   help="bus bandwidth per GPU across nodes, GB/s (default 25: a 200 Gb/s NIC per GPU)")
    p.add_argument("--cpu-cores-per-gpu", type=float, default=8.0, help="CPU cores for each GPU's loader")
    p.add_argument("--fs-write-gbps", type=float, default=2.0, help="checkpoint write bandwidth, GB/s")
    p.add_argument("--loader", default="ffcv", help="loader pipeline whose measured per-core rate to use: "
                                                    "ffcv, pil, dino_pil (bench/results/data_pipeline.csv)")
    p.add_argument("--loader-rate", type=float, default=None, help="images per CPU-core-second instead")
    p.add_argument("--epochs", type=float, nargs="+", default=[100, 300])
    p.add_argument("--steps", type=int, default=None, help="a run length in steps instead of epochs")
    p.add_argument("--dataset-images", type=int, default=None, help="images per epoch (default ImageNet-1k)")
    p.add_argument("--published", action="store_true",
                   help="predict the published DINO / DINOv2 / DINOv3 runs and compare with their wall times")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.batch_size=64")
    p.set_defaults(func=run)


def run(args) -> int:
    from dinovmf import plan as P
    from dinovmf.config import load_config

    try:
        if args.published:
            for published in P.PUBLISHED_RUNS:
                plan = published.plan()
                predicted = plan.run(epochs=published.epochs, steps=published.steps)["hours"]
                print("\n".join(plan.lines(steps=plan.run(epochs=published.epochs, steps=published.steps)["steps"])))
                print(f"=> {published.name}: predicted {predicted:.1f} h, published {published.hours:.1f} h "
                      f"(ratio {predicted / published.hours:.2f})\n")
            return 0
        cfg = load_config(args.config, args.overrides)
        cluster = P.cluster_for(args.gpu, args.peak_tflops, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
                                intra_node_gbps=args.intra_node_gbps, inter_node_gbps=args.inter_node_gbps,
                                cpu_cores_per_gpu=args.cpu_cores_per_gpu, fs_write_gbps=args.fs_write_gbps)
        plan = P.make_plan(cfg, cluster, P.DEFAULT_MFU if args.mfu is None else args.mfu, loader=args.loader,
                           loader_rate=args.loader_rate,
                           dataset_images=args.dataset_images or P.IMAGENET_1K_TRAIN_IMAGES)
    except ValueError as e:
        print(f"dinovmf plan: error: {e}", file=sys.stderr)
        return 2
    print("\n".join(plan.lines(tuple(args.epochs), args.steps)))
    return 0
