"""FFCV decoding of multi-crop batches: one op decodes each image, cuts its crops and, on a CPU training
device, augments them, all in FFCV's numba threads.

One FFCV op (`MultiCropDecoder`) decodes each image once and, per crop, cuts the random-resized crop
(crop + resize in FFCV's C code), draws the crop's augmentation parameters (`augment_params`, from the
same key as the box) and then either
- runs the fused augmentation on it (`augment_in_workers`: the C++ kernel of csrc/augment_cpu.cpp,
  called through ctypes from the numba thread) and writes the normalised float32 crop, or
- writes the uint8 crop and its parameters, for the augmentation on the training device (a GPU).
Crop boxes come from `crops.random_crop_box` keyed per (sample, batch position, batch, crop), and the
order from `crops.epoch_order` through a custom traversal order: reproducible for a given (seed,
epoch, rank) whatever the thread schedule, and the same rules as the PIL fallback.

Threads. FFCV sets torch's intra-op thread count to `num_workers` when it is imported, when a loader
is built and when an epoch starts (its Compiler does so); every such call here is wrapped in
`keep_torch_threads`, so the training process keeps the thread count it had. Each epoch's decoding
runs in a background thread that FFCV leaves running when the consumer stops early; `ffcv_epoch`
closes and joins it when its generator is closed, so a later fork (a DataLoader worker, FFCV's dataset
writer) does not find numba's TBB threads attached to a live thread (numba then prints "Unable to join
threads to shut down before fork()").

Numba types. FFCV mutates numba's interned array types, which made numba print KeyErrors from its
finalizers when loaders were freed; `_immutable_state_types` replaces the code that does it.
"""
from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import queue
import time
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from . import augment_params as P
from .augment import IMAGENET_MEAN, IMAGENET_STD
from .crops import DEFAULT_RATIO, crop_key, epoch_order, random_crop_box

# How long closing an epoch waits for FFCV's thread (`stop_epoch`); it usually ends within 1 s.
EPOCH_STOP_TIMEOUT_S = 30.0


@contextlib.contextmanager
def keep_torch_threads():
    """Restore torch's intra-op thread count on exit (FFCV's Compiler sets it to its worker count)."""
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


@functools.lru_cache(maxsize=1)
def ffcv_available() -> bool:
    """Whether FFCV (and its numba / OpenCV dependencies) imports. The first call also replaces FFCV's
    numba state types (`_immutable_state_types`)."""
    try:
        with keep_torch_threads():
            import ffcv.loader  # noqa: F401
    except Exception:  # noqa: BLE001 - a broken native dependency raises OSError/ImportError alike
        return False
    _immutable_state_types()
    return True


def _immutable_state_types() -> None:
    """Make FFCV's memory managers build their numba state types without mutating numba's own.

    FFCV 1.0 writes `t.mutable = False` on `nb.uint8[::1]` and friends: numba interns types, so that
    mutates the very objects numba's dispatchers hold in their signature dicts (an FFCV decoder compiled
    for uint8 arrays, say) and changes their hash. When such a dispatcher is freed (a loader garbage
    collected after another was built), numba's finalizer cannot find its own keys and Python prints
    "Exception ignored in: <finalize object ...> ... KeyError: (Array(uint8, 1, 'C', True, ...), ...)".
    The replacement properties return the same types, built as new read-only types. FFCV's OS-cache
    reader declares its result as `nb.uint8[::1]`, which that mutation had made read-only too, so it
    is compiled again with the read-only result type spelled out.
    """
    import numba as nb
    from ffcv.memory_managers.os_cache import OSCacheManager
    from ffcv.memory_managers.process_cache.manager import ProcessCacheManager
    from ffcv.pipeline.compiler import Compiler

    def readonly(dtype, ndim: int):
        return nb.types.Array(dtype, ndim, "C", readonly=True)

    def compile_os_cache_reader(self):
        def read(address, mem_state):  # FFCV's OSCacheManager.compile_reader, same body
            size = mem_state[2][np.searchsorted(mem_state[1], address)]
            return mem_state[0][address:address + size]

        return Compiler.compile(read, readonly(nb.uint8, 1)(nb.uint64, self.state_type))

    OSCacheManager.state_type = property(
        lambda self: nb.types.Tuple([readonly(nb.uint8, 1), nb.uint64[::1], nb.uint64[::1]]))
    OSCacheManager.compile_reader = compile_os_cache_reader
    ProcessCacheManager.state_type = property(
        lambda self: nb.types.Tuple([readonly(nb.uint8, 2), readonly(nb.uint64, 1), readonly(nb.uint64, 1),
                                     readonly(nb.uint32, 1)]))


class CropLayout:
    """Where each crop (and, for the device path, its parameters) lies in one packed decoder row.

    `augment_in_workers`: float32 rows, crop c as normalised [3, s, s] floats at float offset
    `offsets[c]`. Otherwise: uint8 rows, crop c as [s, s, 3] bytes at byte offset `offsets[c]`, then
    the float32 parameter rows [num_crops, NUM_PARAMS] at the 4-byte aligned byte offset `params_at`.
    """

    def __init__(self, crops, augment_in_workers: bool):
        self.sizes = np.array([size for size, _ in crops.crop_specs()], dtype=np.int64)
        self.augment_in_workers = augment_in_workers
        self.offsets = np.concatenate([[0], np.cumsum(3 * self.sizes * self.sizes)]).astype(np.int64)
        if augment_in_workers:
            self.dtype, self.params_at, self.row_size = np.dtype("<f4"), 0, int(self.offsets[-1])
        else:
            self.dtype = np.dtype("<u1")
            self.params_at = -(-int(self.offsets[-1]) // 4) * 4
            self.row_size = self.params_at + 4 * len(self.sizes) * P.NUM_PARAMS

    def unpack(self, packed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Views of the crops in rows [B, row_size], and the parameters [B, num_crops, NUM_PARAMS]
        (None for worker-augmented rows)."""
        if packed.shape[1] != self.row_size:
            raise ValueError(f"packed rows hold {packed.shape[1]} values, the crop layout needs {self.row_size}")
        crops = []
        for c, size in enumerate(self.sizes.tolist()):
            part = packed[:, self.offsets[c]:self.offsets[c + 1]]
            crops.append(part.unflatten(1, (3, size, size) if self.augment_in_workers else (size, size, 3)))
        if self.augment_in_workers:
            return crops, None
        params = packed[:, self.params_at:].contiguous().view(torch.float32)
        return crops, params.unflatten(1, (len(self.sizes), P.NUM_PARAMS))


@functools.lru_cache(maxsize=1)
def _augment_crop_ctypes():
    """`dinovmf_augment_crop_u8` of the dinovmf._C extension as a ctypes function numba can call."""
    from dinovmf._ext import load_extension
    lib = ctypes.CDLL(load_extension().__file__)
    fn = lib.dinovmf_augment_crop_u8
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p,
                   ctypes.c_void_p]
    fn.restype = ctypes.c_int64
    return fn


def _multicrop_decoder_class():
    """The FFCV decoder class (built lazily: FFCV is optional at import time)."""
    from dataclasses import replace

    from ffcv.fields.rgb_image import IMAGE_MODES
    from ffcv.libffcv import imdecode, resize_crop
    from ffcv.pipeline.allocation_query import AllocationQuery
    from ffcv.pipeline.compiler import Compiler
    from ffcv.pipeline.operation import Operation

    class MultiCropDecoder(Operation):
        """Decode each image once, cut all its random-resized crops and draw their augmentation;
        augment them too when `augment_in_workers`. One packed row per image (`CropLayout`).

        FFCV's own RandomResizedCropRGBImageDecoder makes one crop per pipeline, so 12 crops would
        decode every JPEG 12 times and compile 12 numba pipelines. Here one op decodes once, cuts
        every crop (boxes from `random_crop_box` keyed by `crop_key`, parameters from
        `draw_crop_params` with the same key) and writes the row `CropLayout.unpack` reads.
        """

        def __init__(self, crops, recipes: np.ndarray, seed: int, augment_in_workers: bool,
                     ratio: tuple[float, float] = DEFAULT_RATIO):
            super().__init__()
            self.layout = CropLayout(crops, augment_in_workers)
            specs = crops.crop_specs()
            self.scale_lo = np.array([sc[0] for _, sc in specs], dtype=np.float64)
            self.scale_hi = np.array([sc[1] for _, sc in specs], dtype=np.float64)
            self.recipes = np.ascontiguousarray(recipes, dtype=np.float64)
            self.seed, self.ratio = int(seed), ratio

        def declare_state_and_memory(self, previous_state):
            max_pixels = np.uint64(self.metadata["width"].max()) * np.uint64(self.metadata["height"].max())
            layout = self.layout
            crop_bytes = int(3 * layout.sizes.max() ** 2)
            return (replace(previous_state, jit_mode=True, shape=(layout.row_size,), dtype=layout.dtype),
                    (AllocationQuery((layout.row_size,), layout.dtype),
                     AllocationQuery((max_pixels * np.uint64(3),), np.dtype("<u1")),   # the decoded image
                     AllocationQuery((crop_bytes,), np.dtype("<u1")),                 # one uint8 crop
                     AllocationQuery((len(layout.sizes) * P.NUM_PARAMS,), np.dtype("<f4"))))  # parameters

        def generate_code(self):
            jpg = IMAGE_MODES["jpg"]
            mem_read = self.memory_read
            my_range = Compiler.get_iterator()
            imdecode_c = Compiler.compile(imdecode)
            resize_crop_c = Compiler.compile(resize_crop)
            augment_c = _augment_crop_ctypes()

            def augment_crop(crop, size, params, mean_std, out):
                return augment_c(crop.ctypes.data, size, size, params.ctypes.data, mean_std.ctypes.data,
                                 out.ctypes.data)

            augment_crop_c = Compiler.compile(augment_crop)
            draw = P.draw_crop_params  # register_jitable, like crop_key and random_crop_box
            seed, recipes = self.seed, self.recipes
            layout = self.layout
            sizes, offsets, in_workers, params_at = layout.sizes, layout.offsets, layout.augment_in_workers, layout.params_at
            scale_lo, scale_hi = self.scale_lo, self.scale_hi
            num_crops, num_params = len(sizes), P.NUM_PARAMS
            mean_std = np.array(IMAGENET_MEAN + IMAGENET_STD, dtype=np.float32)
            log_r_lo, log_r_hi = math.log(self.ratio[0]), math.log(self.ratio[1])

            def decode(batch_indices, my_storage, metadata, storage_state):
                destination, temp_storage, crop_storage, param_storage = my_storage
                batch_first = np.int64(batch_indices[0])
                failed = 0
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
                    params = param_storage[dst_ix]
                    for c in range(num_crops):
                        key = crop_key(seed, np.int64(source_ix), np.int64(dst_ix), batch_first, c)
                        i, j, h, w = random_crop_box(np.int64(height), np.int64(width), scale_lo[c],
                                                     scale_hi[c], log_r_lo, log_r_hi, key)
                        p = params[c * num_params:(c + 1) * num_params]
                        draw(key, recipes[c], p)
                        size = sizes[c]
                        if in_workers:
                            crop = crop_storage[dst_ix][:3 * size * size].reshape(size, size, 3)
                            resize_crop_c(temp_buffer, i, i + h, j, j + w, crop)
                            failed += augment_crop_c(crop, size, params[c * num_params:], mean_std,
                                                     row[offsets[c]:offsets[c + 1]])
                        else:
                            resize_crop_c(temp_buffer, i, i + h, j, j + w,
                                          row[offsets[c]:offsets[c + 1]].reshape(size, size, 3))
                    if not in_workers:
                        row[params_at:] = params.view(np.uint8)
                if failed:
                    raise ValueError("the fused augmentation rejected a crop's parameters")
                return destination[:len(batch_indices)]

            decode.is_parallel = True
            return decode

    return MultiCropDecoder


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


def build_ffcv_loader(path: str | Path, **kwargs):
    """`ffcv.loader.Loader(str(path), **kwargs)`, keeping torch's thread count."""
    from ffcv.loader import Loader
    with keep_torch_threads():
        return Loader(str(path), **kwargs)


def ffcv_epoch(loader) -> Iterator:
    """The batches of `loader`'s next epoch, keeping torch's thread count; closing (or exhausting)
    this generator stops and joins FFCV's decoding thread (see the module docstring)."""
    with keep_torch_threads():
        epoch = iter(loader)
    try:
        yield from epoch
    finally:
        stop_epoch(epoch)


def stop_epoch(epoch, timeout_s: float = EPOCH_STOP_TIMEOUT_S) -> bool:
    """Stop an FFCV epoch iterator's thread and wait for it; True when it has ended.

    FFCV's thread checks the stop flag only when its output queue is full (every 0.5 s), and at the end
    of an epoch it blocks, without a timeout, putting its end marker into a full queue: a consumer that
    stops within `batches_ahead` batches of the end would leave it blocked forever. So after a grace
    period the queue is drained, which lets that last put through.
    """
    epoch.close()
    deadline = time.monotonic() + timeout_s
    while epoch.is_alive() and time.monotonic() < deadline:
        epoch.join(1.0)
        while epoch.is_alive():
            try:
                epoch.output_queue.get_nowait()
            except queue.Empty:
                break
    if epoch.is_alive():
        return False
    # join() returns before the OS thread has run its thread-local destructors (where TBB forgets the
    # thread); a fork in that window still warns. On Linux, wait until the task itself is gone.
    task = Path(f"/proc/self/task/{epoch.native_id}")
    while task.exists() and time.monotonic() < deadline:
        time.sleep(0.001)
    return True


class FFCVMultiCropSource:
    """Decoded batches of a .beton: `batches(epoch)` -> (crops, params or None, labels [B]).

    `augment_in_workers`: crops are the finished, normalised float32 [B, 3, s, s] crops (params None);
    otherwise uint8 [B, s, s, 3] crops and their parameters [B, num_crops, NUM_PARAMS].
    """

    def __init__(self, path: str | Path, batch_size: int, crops, recipes: np.ndarray, augment_in_workers: bool,
                 seed: int = 0, rank: int = 0, world_size: int = 1, num_workers: int = 1, drop_last: bool = True,
                 shuffle: bool = True):
        from ffcv.fields.basics import IntDecoder
        from ffcv.pipeline import PipelineSpec
        from ffcv.transforms import ToTensor

        decoder = _multicrop_decoder_class()(crops, recipes, seed, augment_in_workers)
        self.layout = decoder.layout
        pipelines = {"image": None, "label": [IntDecoder(), ToTensor()],
                     "crops": PipelineSpec("image", decoder=decoder, transforms=[ToTensor()])}
        self.num_workers = num_workers
        self.loader = build_ffcv_loader(path, batch_size=batch_size, num_workers=num_workers,
                                        order=_shard_order_class()(seed, rank, world_size, shuffle),
                                        pipelines=pipelines, drop_last=drop_last, batches_ahead=2)
        # FFCV allocates its batch buffers anew for every epoch, and the first writes to fresh memory
        # fault every page in (a large share of a short epoch for DINO's float crops). One epoch runs at a
        # time per source (`batches` stops the previous one), so the buffers are allocated once.
        graph = self.loader.graph
        graph.allocate_memory = functools.lru_cache(maxsize=1)(graph.allocate_memory)
        self._live = None

    def __len__(self) -> int:
        return len(self.loader)

    def batches(self, epoch: int, device: torch.device | str | None = None
                ) -> Iterator[tuple[list[torch.Tensor], torch.Tensor | None, torch.Tensor]]:
        """Batches of epoch `epoch`; with a CUDA `device`, the packed (pinned, contiguous) rows are
        copied there in one transfer and the crops and parameters are views of that copy.

        FFCV reuses its output buffers a few batches later: the crops (and parameters) of a batch are
        valid until the next batch is drawn; the labels are copies."""
        live = self._live() if self._live is not None else None
        if live is not None:
            live.close()  # the buffers are shared between epochs
        batches = self._batches(epoch, device)
        self._live = weakref.ref(batches)
        return batches

    def _batches(self, epoch, device):
        self.loader.next_epoch = epoch
        to_gpu = device is not None and torch.device(device).type == "cuda"
        if to_gpu:  # the last epoch's asynchronous copies out of the shared buffers must be done
            torch.cuda.current_stream(device).synchronize()
        for labels, packed in ffcv_epoch(self.loader):  # reader fields with a pipeline first, then added ones
            if to_gpu:
                packed = packed.to(device, non_blocking=True)
            crops, params = self.layout.unpack(packed)
            yield crops, params, labels.reshape(-1).clone()
