"""Shared pieces of the trainer tests: a tiny labelled image folder, a tiny config, loader hooks."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

from dinovmf.config import load_config
from dinovmf.data.synthetic import synthetic_crops

# A 2-block ViT-Tiny on 32 px images (patch 8: 16 patches), 2 x 32 px + 2 x 16 px crops, K = 64: a step
# takes a fraction of a second on one CPU core and still runs every part of the real loop.
TINY_OVERRIDES = [
    "method=dino_vmf", "epochs=2",
    "model.arch=vit_tiny", "model.depth=2", "model.patch_size=8", "model.drop_path=0.1", "model.out_dim=64",
    "model.hidden_dim=64", "model.bottleneck_dim=32",
    "crops.global_size=32", "crops.local_size=16", "crops.n_local=2",
    "optim.warmup_epochs=0.4", "optim.freeze_last_layer=0.4", "loss.warmup_teacher_temp_epochs=0.5",
    "train.batch_size=8", "train.log_every=1", "train.ckpt_every=100", "train.keep_last=2",
    "data.num_workers=0", "data.loader=pil", "eval.batch_size=32", "eval.baseline=false",
]


def check_prototypes_frozen_then_train(trainer, cfg, frozen_steps: int = 2) -> None:
    """Run `frozen_steps` + 1 steps of `trainer` (its optim.freeze_last_layer covering `frozen_steps`):
    the prototypes v and g are bitwise unchanged through the frozen steps while the backbone trains,
    and move at the step after."""
    import torch

    head, backbone = trainer.models.student.head, trainer.models.student.backbone
    v0, g0 = head.v.detach().clone(), head.g.detach().clone()
    qkv0 = backbone.blocks[0].attn.qkv.weight.detach().clone()
    for step in range(frozen_steps):
        trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=step), step)
        assert torch.equal(head.v, v0) and torch.equal(head.g, g0), f"prototypes moved at step {step}"
    assert not torch.equal(backbone.blocks[0].attn.qkv.weight, qkv0)
    trainer.train_step(synthetic_crops(cfg.crops, cfg.train.batch_size, seed=frozen_steps), frozen_steps)
    assert not torch.equal(head.v, v0) and not torch.equal(head.g, g0)


def write_image_folder(root: Path, split: str, per_class: int, size: int = 32) -> Path:
    """`per_class` images of each of the embedded dataset's 10 classes, as PNGs in class folders."""
    from PIL import Image

    from dinovmf.data.embedded import CLASSES, render_image

    root.mkdir(parents=True, exist_ok=True)
    counts = {c: 0 for c in range(len(CLASSES))}
    index = 0
    while min(counts.values()) < per_class:
        img, label = render_image(split, index, size)
        index += 1
        if counts[label] >= per_class:
            continue
        (root / CLASSES[label]).mkdir(exist_ok=True)
        Image.fromarray(img).save(root / CLASSES[label] / f"{index:05d}.png")
        counts[label] += 1
    return root


def tiny_data(base: Path) -> tuple[Path, Path]:
    """(train, val) folders: 40 and 20 images, so 5 steps per epoch at batch 8."""
    return (write_image_folder(base / "train", "train", 4), write_image_folder(base / "val", "val", 2))


def tiny_config(train: Path, val: Path | None = None, extra: list[str] = ()):
    overrides = TINY_OVERRIDES + [f"data.train={train}", f"data.val={val if val else 'null'}"] + list(extra)
    return load_config(None, overrides)


def read_records(out_dir: Path, kind: str = "train") -> list[dict]:
    with open(Path(out_dir) / "metrics.jsonl") as f:
        return [r for r in map(json.loads, f) if r["kind"] == kind]


class HookedLoader:
    """A training loader whose batches pass through `hook(index, crops) -> crops` first (index counts the
    batches served, from 0): how tests inject a NaN batch or a signal at a chosen step through the
    public `Trainer.fit(loader)`, without patching the trainer."""

    def __init__(self, loader, hook):
        self.loader, self.hook, self.served = loader, hook, 0

    def __len__(self):
        return len(self.loader)

    def set_epoch(self, epoch: int) -> None:
        self.loader.set_epoch(epoch)

    def __iter__(self):
        for crops, labels in self.loader:
            crops = self.hook(self.served, crops)
            self.served += 1
            yield crops, labels


def signal_before_batch(index: int, sig: int = signal.SIGTERM):
    """A `HookedLoader` hook sending `sig` to this process when batch `index` is served (as a scheduler
    pre-empting the job would): the trainer finishes that step, then saves and stops."""
    def hook(i, crops):
        if i == index:
            os.kill(os.getpid(), sig)
        return crops
    return hook


def fit(cfg, out_dir: Path, hook=None) -> tuple[dict, object]:
    """`Trainer.fit` on cfg's own training loader (wrapped in a `HookedLoader` when `hook` is given);
    returns (summary, trainer)."""
    from dinovmf.distributed import DistInfo
    from dinovmf.train import build_train_loader
    from dinovmf.trainer import Trainer

    loader = build_train_loader(cfg, Path(out_dir), DistInfo())
    if hook is not None:
        loader = HookedLoader(loader, hook)
    trainer = Trainer(cfg, out_dir, steps_per_epoch=len(loader))
    return trainer.fit(loader), trainer
