"""`MultiCropLoader`: decoded, cropped and augmented multi-crop batches, the augmentation where the cores are.

On a CPU training device the loader's workers (FFCV's numba threads, or the PIL DataLoader processes)
decode, crop and augment each image (the fused C++ kernel), so the training process receives finished
float crops and the augmentation runs in parallel with the training step. On a GPU the workers decode
and crop; the uint8 crops and their parameters go to the GPU in one copy and are augmented there
(`MultiCropAugmentation`: one Triton kernel call per crop size). Without the C++ extension (CPU) or
triton (GPU) the training process augments with the torch reference, after a one-line notice.
"""
from __future__ import annotations

import os
import weakref
from pathlib import Path
from typing import Iterator

import torch

from dinovmf.config import AugmentConfig, CropsConfig, validate_augment, validate_crops

from .augment_params import crop_recipes
from .ffcv_loader import ffcv_available
from .fused import MultiCropAugmentation, fused_unavailable

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
    """Per batch: (crops, labels) with `crops` the `crops.n_global` global then `crops.n_local` local
    views, normalised float32 [B, 3, s, s] on `device`, and `labels` int64 [B] on `device` (-1 for
    unlabelled data).

    `crops` (`CropsConfig`) and `augment` (`AugmentConfig`, default DINO's recipe) are the config's
    groups. Each rank reads its own disjoint shard; batches, crops and augmentation are a pure function
    of (seed, epoch, rank): set the epoch with `set_epoch` before iterating. `backend`: `auto` (FFCV for
    a .beton when it imports, else PIL with a notice), `ffcv`, or `pil`. `num_workers`: FFCV decoding
    threads or PIL DataLoader processes (default: this rank's share of the CPU cores; 0 decodes
    in-process for PIL). With FFCV the crops of a batch are views of FFCV's buffers, valid until the
    next batch is drawn (clone them to keep them longer). `close()` stops a partly read epoch.
    """

    def __init__(self, path: str | os.PathLike, batch_size: int, crops: CropsConfig, device: torch.device | str,
                 augment: AugmentConfig | None = None, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int | None = None, drop_last: bool = True, backend: str = "auto",
                 shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not isinstance(crops, CropsConfig):
            raise ValueError(f"crops must be a dinovmf.config.CropsConfig, got {type(crops).__name__}")
        augment = AugmentConfig() if augment is None else augment
        if not isinstance(augment, AugmentConfig):
            raise ValueError(f"augment must be a dinovmf.config.AugmentConfig, got {type(augment).__name__}")
        validate_crops(crops)
        validate_augment(augment)
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
        self.path, self.batch_size, self.crops, self.augment = path, batch_size, crops, augment
        self.device = torch.device(device)
        self.seed, self.rank, self.world_size, self.epoch, self.start = seed, rank, world_size, 0, 0
        self.backend = pick_backend(backend, path)
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        if self.backend == "ffcv":
            self.num_workers = max(1, self.num_workers)
        # The workers call the C++ kernel; without it the training process augments (with a notice).
        self.augment_in_workers = self.device.type == "cpu" and fused_unavailable("cpu") is None
        self._source_args = dict(path=path, batch_size=batch_size, crops=crops, recipes=crop_recipes(augment, crops),
                                 seed=seed, rank=rank, world_size=world_size, num_workers=self.num_workers,
                                 drop_last=drop_last, shuffle=shuffle)
        self.source = self._build_source(self.augment_in_workers)
        self._decoded_source = None if self.augment_in_workers else self.source
        self._on_device = None if self.augment_in_workers else MultiCropAugmentation(self.device)
        self._epoch_batches = None

    def _build_source(self, augment_in_workers: bool):
        if self.backend == "ffcv":
            from .ffcv_loader import FFCVMultiCropSource
            return FFCVMultiCropSource(augment_in_workers=augment_in_workers, **self._source_args)
        from .fallback_loader import PILMultiCropSource
        return PILMultiCropSource(augment_in_workers=augment_in_workers, **self._source_args)

    def describe(self) -> str:
        """One line for the log: where decoding and augmentation run, and with how many threads."""
        kind = "FFCV threads" if self.backend == "ffcv" else "PIL DataLoader processes"
        workers = (f"{self.num_workers} {kind}" if self.backend == "ffcv" or self.num_workers
                   else "the training process (PIL, num_workers=0)")
        where = "decode + crop + augmentation" if self.augment_in_workers else "decode + crop"
        line = f"data: {where} in {workers}"
        if not self.augment_in_workers:
            line += f"; augmentation on {self.device}"
        return line + f"; training: {torch.get_num_threads()} torch threads"

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch the next iteration reads (order, crops and augmentation depend on it), from
        entry `start` of its permutation on (the samples all ranks have trained on: a resumed epoch; see
        `crops.epoch_order`). `len()` stays the length of a whole epoch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        if start < 0:
            raise ValueError(f"start must be >= 0, got {start}")
        self.epoch, self.start = int(epoch), int(start)

    def __len__(self) -> int:
        return len(self.source)

    def decoded_batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]]:
        """(uint8 [B, s, s, 3] crops, parameters [B, num_crops, NUM_PARAMS], labels [B]) on the CPU:
        the input of the augmentation (tests compare the fused paths on it; benchmarks time decoding
        alone). On a CPU device this decodes through a second, un-augmented source."""
        if self._decoded_source is None:
            self._decoded_source = self._build_source(False)
        return self._decoded_source.batches(self.epoch, start=self.start)

    def close(self) -> None:
        """Stop the epoch being read, if any (FFCV: its decoding thread). Dropping the iterator does
        the same; this is for a caller that keeps it."""
        batches = self._epoch_batches() if self._epoch_batches is not None else None
        if batches is not None:
            batches.close()
        self._epoch_batches = None

    def __iter__(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        self.close()  # one epoch at a time: FFCV's buffers are per loader
        batches = self._batches()
        self._epoch_batches = weakref.ref(batches)
        return batches

    def _batches(self) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        batches = self.source.batches(self.epoch, self.device, self.start)
        try:
            for crops, params, labels in batches:
                if not self.augment_in_workers:
                    crops = self._on_device(crops, params)
                yield crops, labels.to(self.device, non_blocking=True)
        finally:
            batches.close()
