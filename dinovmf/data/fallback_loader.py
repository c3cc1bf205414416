"""PIL + torch DataLoader decoding of multi-crop batches: the loader when FFCV is not importable.

Same outputs as `FFCVMultiCropSource` (global crops first, int64 labels; with `augment_in_workers`
the finished float crops, augmented per image in the DataLoader workers by the same C++ kernel,
otherwise uint8 crops and their parameters), same crop boxes (`crops.random_crop_box` with the same
keys), the same augmentation parameters (`augment_params.draw_crop_params`, same keys) and the same
per-rank order (`crops.epoch_order`); only the resampling differs (PIL's antialiased bilinear vs.
FFCV's OpenCV INTER_AREA), so the two agree in distribution, not bit for bit. Reads an image folder,
or a .beton when FFCV's reader is importable (so the two backends can be compared on one file).
"""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from . import augment_params as P
from .crops import DEFAULT_RATIO, crop_key, epoch_order, random_crop_box
from .prepare import list_images


class BetonImages:
    """Random access to the (image, label) records of a .beton without FFCV's loader."""

    def __init__(self, path: str | Path):
        from .beton import check_beton
        from .ffcv_loader import ffcv_available
        if not ffcv_available():
            raise RuntimeError(f"reading {path} needs ffcv; give an image folder to the PIL loader")
        from ffcv.reader import Reader
        check_beton(path)
        reader = Reader(str(path))
        names = reader.field_names
        if "image" not in names or "label" not in names:
            raise ValueError(f"{path} must have fields 'image' and 'label', has {names}")
        self.path = str(path)
        self.meta_image = reader.metadata[f"f{names.index('image')}"]
        self.labels = np.asarray(reader.metadata[f"f{names.index('label')}"]).astype(np.int64)
        table = reader.alloc_table
        self._sizes = dict(zip(table["ptr"].tolist(), table["size"].tolist()))
        self._data = None  # memory-mapped lazily, per DataLoader worker process

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, i: int) -> "PIL.Image.Image":  # noqa: F821
        from PIL import Image
        if self._data is None:
            self._data = np.memmap(self.path, dtype=np.uint8, mode="r")
        m = self.meta_image[i]
        ptr = int(m["data_ptr"])
        raw = self._data[ptr:ptr + self._sizes[ptr]]
        if int(m["mode"]) == 0:  # FFCV's IMAGE_MODES['jpg']
            return Image.open(io.BytesIO(raw.tobytes())).convert("RGB")
        return Image.fromarray(np.asarray(raw).reshape(int(m["height"]), int(m["width"]), 3))


class FolderImages:
    """Random access to the (image, label) records of an image folder (class sub-folders or flat)."""

    def __init__(self, path: str | Path):
        files, labels, self.class_names = list_images(Path(path))
        if not files:
            raise ValueError(f"image folder {str(path)!r} holds no images")
        self.files, self.labels = files, np.asarray(labels, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, i: int):
        from PIL import Image
        with Image.open(self.files[i]) as im:
            return im.convert("RGB")


def open_images(path: str | Path):
    """`BetonImages` for a .beton file, `FolderImages` for a folder."""
    path = Path(path)
    if path.is_dir():
        return FolderImages(path)
    if path.is_file():
        return BetonImages(path)
    raise FileNotFoundError(f"dataset {str(path)!r} does not exist")


class _MultiCropDataset(Dataset):
    """Item (sample, batch position, first sample of the batch) -> (crop_0, ..., crop_n, [params,] label):
    finished float crops with `augment_in_workers`, else uint8 crops and their parameters."""

    def __init__(self, images, crops, recipes: np.ndarray, seed: int, augment_in_workers: bool,
                 ratio=DEFAULT_RATIO):
        self.images, self.specs, self.seed = images, crops.crop_specs(), seed
        self.recipes, self.augment_in_workers = recipes, augment_in_workers
        self.log_ratio = (math.log(ratio[0]), math.log(ratio[1]))

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, item):
        from PIL import Image
        sample, position, batch_first = item
        im = self.images.image(sample)
        out, keys = [], []
        for index, (size, (lo, hi)) in enumerate(self.specs):
            key = crop_key(self.seed, sample, position, batch_first, index)
            top, left, h, w = random_crop_box(im.height, im.width, lo, hi, *self.log_ratio, key)
            crop = im.resize((size, size), Image.BILINEAR, box=(left, top, left + w, top + h))
            out.append(torch.from_numpy(np.asarray(crop).copy()))
            keys.append(key)
        params = torch.from_numpy(P.draw_params(keys, self.recipes))
        label = int(self.images.labels[sample])
        if not self.augment_in_workers:
            return (*out, params, label)
        from .fused import fused_augment
        finished: list[torch.Tensor | None] = [None] * len(out)
        for size in sorted({s for s, _ in self.specs}):  # one kernel call per crop size
            idx = [i for i, (s, _) in enumerate(self.specs) if s == size]
            for i, crop in zip(idx, fused_augment(torch.stack([out[i] for i in idx]), params[idx])):
                finished[i] = crop
        return (*finished, label)


class PILMultiCropSource:
    """Decoded batches via PIL in DataLoader workers: `batches(epoch)` -> (crops, params or None, labels),
    as `FFCVMultiCropSource`."""

    def __init__(self, path: str | Path, batch_size: int, crops, recipes: np.ndarray, augment_in_workers: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 0, drop_last: bool = True,
                 shuffle: bool = True):
        self.images = open_images(path)
        self.dataset = _MultiCropDataset(self.images, crops, recipes, seed, augment_in_workers)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_workers, self.drop_last, self.shuffle = num_workers, drop_last, shuffle
        self.augment_in_workers = augment_in_workers

    def _batch_items(self, epoch: int, start: int = 0) -> list[list[tuple[int, int, int]]]:
        order = epoch_order(len(self.images), self.seed, epoch, self.rank, self.world_size, self.shuffle, start)
        batches = []
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            if len(chunk) < self.batch_size and self.drop_last:
                break
            batches.append([(int(s), pos, int(chunk[0])) for pos, s in enumerate(chunk)])
        return batches

    def __len__(self) -> int:
        n = len(self.images) // self.world_size
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def batches(self, epoch: int, device: torch.device | str | None = None, start: int = 0
                ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]]:
        """Batches of epoch `epoch` from entry `start` of its order (`crops.epoch_order`) on the CPU
        (pinned when `device` is a GPU, for an async copy)."""
        pin = device is not None and torch.device(device).type == "cuda"
        loader = DataLoader(self.dataset, batch_sampler=self._batch_items(epoch, start),
                            num_workers=self.num_workers, persistent_workers=False, pin_memory=pin)
        for out in loader:
            if self.augment_in_workers:
                yield list(out[:-1]), None, out[-1]
            else:
                yield list(out[:-2]), out[-2], out[-1]
