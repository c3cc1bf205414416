"""`MultiCropLoader`: decoded uint8 crops (FFCV or PIL) -> batched augmentation on the training device."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import torch

from .augment import MultiCropAugmentation, augmentation_generator, dino_view_recipes
from .crops import MultiCropConfig
from .ffcv_loader import ffcv_available

BACKENDS = ("auto", "ffcv", "pil")


def default_num_workers() -> int:
    """CPU cores available to this process, shared among the ranks on this node."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return max(1, cores // max(1, local_ranks))


def pick_backend(backend: str, path: Path) -> str:
    """`ffcv` or `pil` for `backend` (auto: ffcv for a .beton when importable) and the data at `path`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "pil":
        return "pil"
    if path.is_dir():
        if backend == "ffcv":
            raise ValueError(f"backend='ffcv' reads .beton files; {path} is a folder (run `dinovmf prepare`)")
        return "pil"
    if ffcv_available():
        return "ffcv"
    if backend == "ffcv":
        raise RuntimeError("backend='ffcv' but ffcv does not import; install it or use backend='pil'")
    print("[dinovmf.data] ffcv is not importable: using the PIL fallback loader (slower)")
    return "pil"


class MultiCropLoader:
    """Per batch: (crops, labels) with `crops` the 2 global then N local views, normalised float32
    [B, 3, s, s] on `device`, and `labels` int64 [B] on `device` (-1 for unlabelled data).

    Each rank reads its own disjoint shard; batches are a pure function of (seed, epoch, rank), set
    the epoch with `set_epoch` before iterating. `backend`: `auto` (FFCV for a .beton when it
    imports, else PIL with a notice), `ffcv`, or `pil`. `num_workers`: FFCV decoding threads or PIL
    DataLoader processes (default: this rank's share of the CPU cores; 0 decodes in-process for PIL).
    `view_recipes`: ((global 1, global 2), local) `ViewRecipe`s (default: DINO's, `dino_view_recipes()`).
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, crops: MultiCropConfig,
                 device: torch.device | str, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, drop_last: bool = True, backend: str = "auto",
                 shuffle: bool = True, view_recipes=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(crops, MultiCropConfig):
            if not hasattr(crops, "n_local"):
                raise ValueError(f"crops must be a MultiCropConfig (or the trainer's CropsConfig), "
                                 f"got {type(crops).__name__}")
            crops = MultiCropConfig.from_config(crops)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
        self.path, self.batch_size, self.crops = path, batch_size, crops
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.epoch = seed, rank, world_size, 0
        self.backend = pick_backend(backend, path)
        workers = default_num_workers() if num_workers is None else num_workers
        args = dict(batch_size=batch_size, crops=crops, seed=seed, rank=rank, world_size=world_size,
                    drop_last=drop_last, shuffle=shuffle)
        if self.backend == "ffcv":
            from .ffcv_loader import FFCVMultiCropSource
            self.source = FFCVMultiCropSource(path, num_workers=max(1, workers), **args)
        else:
            from .fallback_loader import PILMultiCropSource
            self.source = PILMultiCropSource(path, num_workers=workers, **args)
        global_recipes, local_recipe = dino_view_recipes() if view_recipes is None else view_recipes
        self.augment = MultiCropAugmentation(self.device, global_recipes, local_recipe)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch the next iteration reads (order, crops and augmentation depend on it)."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def decoded_batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """The decoder's uint8 [B, H, W, 3] crops and labels, before augmentation (on the CPU)."""
        return self.source.batches(self.epoch)  # no device: the CPU tensors the decoder produced

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        for step, (crops, labels) in enumerate(self.source.batches(self.epoch, self.device)):
            g = augmentation_generator(self.device, self.seed, self.epoch, self.rank, step)
            yield self.augment(crops, g), labels.to(self.device, non_blocking=True)
