"""`train(cfg, out_dir, resume)`: the CLI's entry point, one process's share of a run.

Alone, or as one rank of a torchrun / srun job (the process group is set up from the environment by
`dinovmf.distributed`). Thin on purpose: resolve the data, build the loader, hand it to a `Trainer`
(`dinovmf.trainer`, where the training step and the loop live), then evaluate and plot.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from dinovmf import checkpoint as ckpt
from dinovmf import distributed as D
from dinovmf.config import Config
from dinovmf.models.init_from import require_file
from dinovmf.stopping import NonFiniteLossError
from dinovmf.trainer import UTILISATION_EPS, Trainer

__all__ = ["NonFiniteLossError", "UTILISATION_EPS", "Trainer", "train"]


def train(cfg: Config, out_dir: str | Path, resume: str | None = None, trust_pickle: bool = False) -> dict:
    """Train `cfg` into `out_dir`; returns the final metrics (loss, step, knn_top1 when evaluated...).

    `resume`: None, "auto" (the newest readable checkpoint in out_dir/checkpoints, or a fresh start) or a
    path. `trust_pickle`: resume from a version-1 file that holds more than tensors and plain types.
    Raises `NonFiniteLossError` when the loss becomes NaN/inf (last good checkpoint kept), `CheckpointError`
    when a checkpoint cannot be written (earlier ones kept) and ValueError for unusable input (missing
    data, bad checkpoint).
    """
    out_dir = Path(out_dir)
    info = D.init_distributed(cfg.dist.backend, cfg.dist.timeout_s, trace_dir=out_dir / "nccl_traces")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        resume_path = resolve_resume(resume, out_dir, info)
        if resume_path is None and cfg.model.init_from is not None:
            require_file(cfg.model.init_from)  # before the data, whose preparation can take hours
        loader = build_train_loader(cfg, out_dir, info)  # data first: a missing dataset fails in seconds
        if resume_path is None:
            trainer = Trainer(cfg, out_dir, steps_per_epoch=len(loader))
        else:
            trainer = Trainer.resume(resume_path, cfg, out_dir, steps_per_epoch=len(loader), trust_pickle=trust_pickle,
                                     verify=False)  # resolve_resume verified it
        summary = trainer.fit(loader)
        if summary["interrupted"]:
            return summary
        if cfg.data.val:
            backbone = trainer.teacher_backbone()  # gathered from the shards under FSDP2 (all ranks call it)
            summary.update(evaluate_knn_after_training(cfg, out_dir, backbone, trainer.device, info))
        elif info.is_main:
            print("no kNN evaluation: data.val is not set (the kNN needs labelled data.train and data.val)",
                  flush=True)
        if info.is_main:
            from dinovmf.plots import plot_run
            summary["plots"] = [str(p) for p in plot_run(out_dir, summary)]
        return summary
    finally:
        D.cleanup()


def resolve_resume(resume: str | None, out_dir: Path, info: D.DistInfo) -> Path | None:
    """`checkpoint.resolve_resume` on rank 0 (it reads every file to verify it), its answer (or error)
    sent to the other ranks."""
    answer = None
    if info.is_main:
        try:
            answer = ckpt.resolve_resume(resume, out_dir)
        except ValueError as e:
            answer = e
    if info.is_distributed:
        box = [answer]
        torch.distributed.broadcast_object_list(box, src=0)
        answer = box[0]
    if isinstance(answer, ValueError):
        raise answer
    return answer


def build_train_loader(cfg: Config, out_dir: Path, info: D.DistInfo):
    """This rank's multi-crop loader over data.train (prepared into out_dir/data when needed).

    The validation set is prepared now too: preparing forks FFCV's writer processes, which must happen
    before decoding starts."""
    from dinovmf.data import MultiCropLoader

    train_path = prepare_data(cfg.data.train, out_dir, info, "train", cfg.data.loader)
    if cfg.data.val:
        prepare_data(cfg.data.val, out_dir, info, "val", cfg.data.loader)
    loader = MultiCropLoader(train_path, cfg.train.batch_size, cfg.crops, D.device_for(info), augment=cfg.augment,
                             seed=cfg.train.seed, rank=info.rank, world_size=info.world_size,
                             num_workers=cfg.data.num_workers, drop_last=True, backend=cfg.data.loader)
    if info.is_main:
        print(loader.describe(), flush=True)
    return loader


def prepare_data(spec: str, out_dir: Path, info: D.DistInfo, split: str = "train", loader: str = "auto") -> Path:
    """Resolve a data spec to a dataset path; rank 0 prepares (an image folder -> .beton), others wait
    (without a timeout: preparing a large folder takes hours).

    With `data.loader=pil` an image folder is read as it is: converting it to a .beton would only
    cost time.
    """
    from dinovmf.data import resolve_dataset

    if loader == "pil" and Path(spec).is_dir():
        return Path(spec)
    workdir = out_dir / "data"
    path = None
    if info.is_main:
        path = resolve_dataset(spec, workdir, split=split)
    D.wait_all()
    if not info.is_main:
        path = resolve_dataset(spec, workdir, split=split)
    return Path(path)


def step0_backbone(cfg: Config) -> nn.Module:
    """The backbone the run started from, on the CPU: the seeded random initialisation, or the
    `model.init_from` weights loaded into it (what eval.baseline compares the trained teacher with)."""
    from dinovmf.models import build_backbone, model_args
    from dinovmf.models.init_from import load_init_weights

    torch.manual_seed(cfg.train.seed)  # the same draw as the student's initialisation
    backbone = build_backbone(drop_path_rate=0.0, attn_backend=cfg.model.attn_backend, **model_args(cfg))
    if cfg.model.init_from is not None:
        load_init_weights(backbone, cfg.model.init_from, strict=cfg.model.init_strict, ignore=cfg.model.init_ignore,
                          trust_pickle=cfg.model.init_trust_pickle)
    return backbone


def evaluate_knn_after_training(cfg: Config, out_dir: Path, backbone: nn.Module | None, device,
                                info: D.DistInfo) -> dict:
    """kNN top-1 of the trained teacher `backbone` (used on rank 0 only) on data.val, train features from
    data.train; with eval.baseline, also of the backbone the run started from (`step0_backbone`: random
    init, or model.init_from's weights)."""
    from dinovmf.eval.run import UnlabelledDataError, knn_for_backbone

    train_path = prepare_data(cfg.data.train, out_dir, info, "train", cfg.data.loader)
    val_path = prepare_data(cfg.data.val, out_dir, info, "val", cfg.data.loader)
    if not info.is_main:
        return {}
    image_size = cfg.eval.image_size or cfg.crops.global_size
    loading = {"loader_backend": cfg.data.loader, "num_workers": cfg.data.num_workers}
    try:
        result = knn_for_backbone(backbone, train_path, val_path, image_size, cfg.eval.batch_size, device,
                                  cfg.eval.knn_k, cfg.eval.knn_temperature, **loading)
    except UnlabelledDataError as e:  # training is done and saved; only the evaluation cannot run
        print(f"kNN skipped: {e}. The kNN needs labelled data.train (its memory bank) and data.val (its "
              "queries); leave data.val unset for unlabelled data.", flush=True)
        return {}
    summary = {"knn_top1": result["top1"]}
    print(f"kNN top-1: {result['top1']:.2f}% (trained teacher, k={cfg.eval.knn_k}, T={cfg.eval.knn_temperature})",
          flush=True)
    if cfg.eval.baseline:
        start = step0_backbone(cfg).to(device)
        base = knn_for_backbone(start, train_path, val_path, image_size, cfg.eval.batch_size, device,
                                cfg.eval.knn_k, cfg.eval.knn_temperature, **loading)
        pretrained = cfg.model.init_from is not None
        summary["knn_top1_init_from" if pretrained else "knn_top1_random_init"] = base["top1"]
        print(f"kNN top-1: {base['top1']:.2f}% "
              f"({'the model.init_from weights the run started from' if pretrained else 'random-init baseline'})",
              flush=True)
    with open(out_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"kind": "eval", "step": None, **summary}) + "\n")
    return summary
