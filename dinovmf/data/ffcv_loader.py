"""FFCV decoding of multi-crop batches: one random-resized-crop decoder per crop, all on one .beton.

One FFCV op (`MultiCropDecoder`) decodes each image once and cuts all its crops (crop + resize in
FFCV's C code, in numba threads), packed into one uint8 row per image. Crop boxes come from `crops.random_crop_box` keyed per (sample, batch position, batch, crop), and the
order from `crops.epoch_order` through a custom traversal order: reproducible for a given (seed,
epoch, rank) whatever the thread schedule, and the same rules as the PIL fallback.

Note: FFCV sets torch's intra-op thread count to `num_workers` (its Compiler does so), which is
harmless on a GPU box and matches the default on a CPU one.
"""
from __future__ import annotations

import functools
import math
import sys
import traceback
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .crops import DEFAULT_RATIO, MultiCropConfig, crop_key, epoch_order, random_crop_box


@functools.lru_cache(maxsize=1)
def ffcv_available() -> bool:
    """Whether FFCV (and its numba / OpenCV dependencies) imports."""
    try:
        import ffcv.loader  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native dependency raises OSError/ImportError alike
        return False
    _silence_numba_finalizer_keyerror()
    return True


def is_numba_finalizer_keyerror(exc: BaseException | None, tb) -> bool:
    """Whether (exc, tb) is the KeyError numba's dispatcher finalizer raises while releasing FFCV's
    compiled pipeline functions after a loader is garbage collected (seen with numba 0.68 in long
    processes that build several FFCV loaders, e.g. training then kNN evaluation). The finalizer only
    drops references to code that is being freed anyway, so the error is harmless, but Python prints
    it as "Exception ignored in: <finalize object ...>" with a traceback that alarms users."""
    if not isinstance(exc, KeyError) or tb is None:
        return False
    last = traceback.extract_tb(tb)[-1]
    return last.name == "finalizer" and Path(last.filename).parts[-3:] == ("numba", "core", "dispatcher.py")


def _silence_numba_finalizer_keyerror() -> None:
    """Route exactly that error away from `sys.unraisablehook`; everything else reaches the previous hook."""
    previous = sys.unraisablehook
    if getattr(previous, "_dinovmf_numba_filter", False):
        return

    def hook(unraisable):
        if not is_numba_finalizer_keyerror(unraisable.exc_value, unraisable.exc_traceback):
            previous(unraisable)

    hook._dinovmf_numba_filter = True
    sys.unraisablehook = hook


def _multicrop_decoder_class():
    """The FFCV decoder class (built lazily: FFCV is optional at import time)."""
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class MultiCropDecoder(Operation):
        """Decode each image once and cut all its random-resized crops, packed into one uint8 row.

        FFCV's own RandomResizedCropRGBImageDecoder makes one crop per pipeline, so 12 crops would
        decode every JPEG 12 times and compile 12 numba pipelines. Here one op decodes once, cuts
        every crop (boxes from `random_crop_box` keyed by `crop_key`) and writes crop c at
        offsets[c] of a flat [total_bytes] row; `unpack_crops` views the row as the crops.
        """

        def __init__(self, crops: MultiCropConfig, seed: int, ratio: tuple[float, float] = DEFAULT_RATIO):
            super().__init__()
            specs = crops.crop_specs()
            self.sizes = np.array([s for s, _ in specs], dtype=np.int64)
            self.scale_lo = np.array([sc[0] for _, sc in specs], dtype=np.float64)
            self.scale_hi = np.array([sc[1] for _, sc in specs], dtype=np.float64)
            nbytes = 3 * self.sizes * self.sizes
            self.offsets = np.concatenate([[0], np.cumsum(nbytes)]).astype(np.int64)
            self.seed, self.ratio = int(seed), ratio

        def declare_state_and_memory(self, previous_state):
            max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
            total = int(self.offsets[-1])
            return (replace(previous_state, jit_mode=True, shape=(total,), dtype=np.dtype("<u1")),
                    (AllocationQuery((total,), np.dtype("<u1")),
                     AllocationQuery((max_pixels * np.uint64(3),), np.dtype("<u1"))))

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            seed = self.seed
            sizes, offsets, scale_lo, scale_hi = self.sizes, self.offsets, self.scale_lo, self.scale_hi
            num_crops = len(sizes)
            log_r_lo, log_r_hi = math.log(self.ratio[0]), math.log(self.ratio[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage = my_storage
                batch_first = np.int64(batch_indices[0])
                for dst_ix in my_range(len(batch_indices)):
                    source_ix = batch_indices[dst_ix]
                    field = metadata[source_ix]
                    image_data = mem_read(field["data_ptr"], storage_state)
                    height = np.uint32(field["height"])
                    width = np.uint32(field["width"])
                    if field["mode"] == jpg:
                        temp_buffer = temp_storage[dst_ix]
                        imdecode_c(image_data, temp_buffer, height, width, height, width,
                                   0, 0, 1, 1, False, False)
                        temp_buffer = temp_buffer.reshape(-1)[:3 * height * width]
                        temp_buffer = temp_buffer.reshape(height, width, 3)
                    else:
                        temp_buffer = image_data.reshape(height, width, 3)
                    row = destination[dst_ix]
                    for c in range(num_crops):
                        key = crop_key(seed, np.int64(source_ix), np.int64(dst_ix), batch_first, c)
                        i, j, h, w = random_crop_box(np.int64(height), np.int64(width), scale_lo[c],
                                                     scale_hi[c], log_r_lo, log_r_hi, key)
                        size = sizes[c]
                        out = row[offsets[c]:offsets[c + 1]].reshape(size, size, 3)
                        resize_crop_c(temp_buffer, i, i + h, j, j + w, out)
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiCropDecoder


def unpack_crops(packed: torch.Tensor, crops: MultiCropConfig) -> list[torch.Tensor]:
    """Views [B, s, s, 3] of each crop in the packed rows [B, total_bytes] `MultiCropDecoder` writes."""
    out, offset = [], 0
    for size, _ in crops.crop_specs():
        n = 3 * size * size
        out.append(packed[:, offset:offset + n].unflatten(1, (size, size, 3)))
        offset += n
    if offset != packed.shape[1]:
        raise ValueError(f"packed rows hold {packed.shape[1]} bytes, the crop layout needs {offset}")
    return out


def _shard_order_class():
    from ffcv.traversal_order.base import TraversalOrder

    class ShardOrder(TraversalOrder):
        """`epoch_order` as an FFCV traversal order (FFCV instantiates it by calling it with the loader)."""

        def __init__(self, seed: int, rank: int, world_size: int, shuffle: bool):
            self.seed, self.rank, self.world_size, self.shuffle = seed, rank, world_size, shuffle

        def __call__(self, loader):
            self.loader, self.indices, self.distributed = loader, loader.indices, False
            return self

        def sample_order(self, epoch: int):
            picks = epoch_order(len(self.indices), self.seed, epoch, self.rank, self.world_size,
                                self.shuffle)
            return self.indices[picks]

    return ShardOrder


class FFCVMultiCropSource:
    """Batches of uint8 crops from a .beton: iterate `batches(epoch)` -> (crops [B,H,W,3] list, labels [B])."""

    def __init__(self, path: str | Path, batch_size: int, crops: MultiCropConfig, seed: int = 0,
                 rank: int = 0, world_size: int = 1, num_workers: int = 1, drop_last: bool = True,
                 shuffle: bool = True):
        from ffcv.fields.basics import IntDecoder
        from ffcv.loader import Loader
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        pipelines = {"image": None, "label": [IntDecoder(), ToTensor()],
                     "crops": PipelineSpec("image", decoder=_multicrop_decoder_class()(crops, seed),
                                           transforms=[ToTensor()])}
        self.crops = crops
        self.loader = Loader(str(path), batch_size=batch_size, num_workers=num_workers,
                             order=_shard_order_class()(seed, rank, world_size, shuffle),
                             pipelines=pipelines, drop_last=drop_last, batches_ahead=2)

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, device: torch.device | str | None = None
                ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor]]:
        """Crops of epoch `epoch`; with a CUDA `device`, the packed (pinned, contiguous) rows are
        copied there in one transfer and the crops are views of that copy."""
        self.loader.next_epoch = epoch
        to_gpu = device is not None and torch.device(device).type == "cuda"
        for labels, packed in self.loader:  # reader fields with a pipeline first, then added ones
            if to_gpu:
                packed = packed.to(device, non_blocking=True)
            crops = unpack_crops(packed, self.crops)
            # FFCV reuses its output buffers a few batches later: hand out copies of the labels; the
            # crops are consumed (copied to the device / converted to float) before the next batch.
            yield crops, labels.reshape(-1).clone()
