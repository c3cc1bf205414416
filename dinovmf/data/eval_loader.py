"""`EvalLoader`: deterministic centre-cropped, normalised images with labels, for kNN / linear eval.

DINO's evaluation transform: resize the short side to image_size / CENTER_CROP_RATIO, take the
central image_size square (i.e. a central square of CENTER_CROP_RATIO of the short side, resized to
image_size), normalise with the ImageNet mean / std. All samples, in file order, no augmentation.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .augment import normalize, to_float_nchw
from .loader import default_num_workers, pick_backend

CENTER_CROP_RATIO = 224 / 256


def center_box(height: int, width: int, ratio: float = CENTER_CROP_RATIO) -> tuple[int, int, int]:
    """(top, left, side) of the central square covering `ratio` of the short side (FFCV's rule)."""
    side = int(ratio * min(height, width))
    return (height - side) // 2, (width - side) // 2, side


class EvalLoader:
    """Iterates (images [B, 3, s, s] normalised float32 on `device`, labels int64 [B] on `device`)."""

    def __init__(self, path: str | os.PathLike, batch_size: int, image_size: int,
                 device: torch.device | str, num_workers: int | None = None, backend: str = "auto"):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"dataset {str(path)!r} does not exist")
        self.path, self.batch_size, self.image_size = path, batch_size, image_size
        self.device = torch.device(device)
        self.backend = pick_backend(backend, path)
        workers = default_num_workers() if num_workers is None else num_workers
        if self.backend == "ffcv":
            self._ffcv = self._build_ffcv(max(1, workers))
        else:
            from .fallback_loader import open_images
            self.images = open_images(path)
            self.num_workers = workers

    def _build_ffcv(self, workers: int):
        from ffcv.fields.basics import IntDecoder
        from ffcv.fields.rgb_image import CenterCropRGBImageDecoder
        from ffcv.loader import OrderOption
        from ffcv.transforms import ToTensor

        from .ffcv_loader import build_ffcv_loader
        s = self.image_size
        return build_ffcv_loader(self.path, batch_size=self.batch_size, num_workers=workers,
                                 order=OrderOption.SEQUENTIAL, drop_last=False, batches_ahead=2,
                                 pipelines={"image": [CenterCropRGBImageDecoder((s, s), CENTER_CROP_RATIO),
                                                      ToTensor()],
                                            "label": [IntDecoder(), ToTensor()]})

    def __len__(self) -> int:
        if self.backend == "ffcv":
            return len(self._ffcv)
        return -(-len(self.images) // self.batch_size)

    def _pil_batches(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        from torch.utils.data import DataLoader
        dataset = _CenterCropDataset(self.images, self.image_size)
        yield from DataLoader(dataset, batch_size=self.batch_size, shuffle=False,
                              num_workers=self.num_workers)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self.backend == "ffcv":
            from .ffcv_loader import ffcv_epoch
            batches = ((img, lab.reshape(-1).clone()) for img, lab in ffcv_epoch(self._ffcv))
        else:
            batches = self._pil_batches()
        for images, labels in batches:
            yield normalize(to_float_nchw(images, self.device)), labels.to(self.device)


class _CenterCropDataset(torch.utils.data.Dataset):
    def __init__(self, images, size: int):
        self.images, self.size = images, size

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image
        im = self.images.image(i)
        top, left, side = center_box(im.height, im.width)
        im = im.resize((self.size, self.size), Image.BILINEAR, box=(left, top, left + side, top + side))
        return torch.from_numpy(np.asarray(im).copy()), int(self.images.labels[i])
