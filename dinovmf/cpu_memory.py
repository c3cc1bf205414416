"""Large CPU buffers kept between calls and handed out again only once nothing refers to them.

Why: glibc serves blocks above its mmap threshold (dynamic, at most 32 MiB) with a fresh mapping and unmaps
it on free, so a large buffer allocated every call pays one page fault per 4 KiB page on first touch, every
call. The fused op needs three such buffers a call on the CPU (`dinovmf.head_loss`): the student chunk
buffer, the teacher's dots (which become its probabilities) and the [K, p] prototype gradient (64 MiB at
K = 65536, p = 256 fp32). Keeping them is worth a noticeable share of the op at DINO's head (DESIGN §2;
the measured step is in bench/results/step_vs_dino.csv).

How: a kept buffer is an anonymous `mmap`; the tensors handed out are `torch.frombuffer` views of it, and
a tensor's storage holds a reference to the mmap object for as long as anything shares that storage (a
view, the .grad autograd made of it, ...). A buffer is handed out only while the pool's own reference is
the only one (`sys.getrefcount`), so nothing still readable is ever overwritten: the prototype gradient
autograd keeps as .grad is reused only after `zero_grad(set_to_none=True)` dropped it, a caller that keeps
the teacher probabilities keeps their buffer out of the pool, and concurrent calls never share a buffer.
Buffers of at least 2 MiB are aligned to and advised onto 2 MiB transparent huge pages (32 first-touch
faults instead of 16384 for 64 MiB; fewer TLB misses in the GEMMs that stream them).
"""
from __future__ import annotations

import math
import mmap
import sys
import threading

import torch

HUGE_PAGE = 2 << 20
# One op call keeps three buffers; an iBOT step (two calls, each gradient and teacher probabilities held to the
# step's end) five. Beyond this the smallest free entry, or else the oldest, is forgotten (safe: a buffer in
# use lives on in its tensors and is unmapped when they die).
MAX_BUFFERS = 6
_POOL: list["_Kept"] = []
_LOCK = threading.Lock()


# Private: Python's default for an anonymous mmap is MAP_SHARED, which is shmem (no THP through madvise) and
# stays shared with processes forked after it (data-loader workers) instead of copy-on-write.
_PRIVATE = {"flags": mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS} if hasattr(mmap, "MAP_PRIVATE") else {}


class _Kept:
    """One anonymous mapping the pool keeps, and where its (huge-page aligned) usable bytes start."""
    __slots__ = ("mem", "offset", "capacity", "requested", "used", "free_refs")

    def __init__(self, nbytes: int):
        huge = nbytes >= HUGE_PAGE
        self.requested = self.used = nbytes
        self.mem = mmap.mmap(-1, nbytes + (HUGE_PAGE if huge else 0), **_PRIVATE)
        self.offset = 0
        if huge:
            self.offset = -torch.frombuffer(self.mem, dtype=torch.uint8).data_ptr() % HUGE_PAGE
            if hasattr(mmap, "MADV_HUGEPAGE"):  # Linux; elsewhere (or THP off) the pages stay small
                try:
                    self.mem.madvise(mmap.MADV_HUGEPAGE)
                except OSError:
                    pass
        self.capacity = len(self.mem) - self.offset
        self.free_refs = self.refs()  # what `refs` reads while nothing but the pool holds the mapping

    def refs(self) -> int:
        return sys.getrefcount(self.mem)

    def in_use(self) -> bool:
        return self.refs() > self.free_refs

    def fits(self, nbytes: int) -> bool:
        """Large enough, and not so large that a small request would tie up a big buffer."""
        return nbytes <= self.capacity and self.requested <= 2 * nbytes


def kept_empty(*shape: int, dtype: torch.dtype, device: torch.device | str = "cpu") -> torch.Tensor:
    """`torch.empty(shape, dtype)` over a kept buffer (module docstring) on the CPU; plain `torch.empty` on
    other devices (CUDA's caching allocator already reuses blocks) and for empty shapes."""
    device = torch.device(device)
    numel = math.prod(shape)
    if device.type != "cpu" or numel == 0:
        return torch.empty(*shape, dtype=dtype, device=device)
    nbytes = numel * dtype.itemsize
    with _LOCK:  # choose and hand out under the lock: two threads must never both see one buffer free
        buf = min((b for b in _POOL if b.fits(nbytes) and not b.in_use()), key=lambda b: b.capacity, default=None)
        if buf is None:
            while len(_POOL) >= MAX_BUFFERS:
                free = [b for b in _POOL if not b.in_use()]
                _POOL.remove(min(free, key=lambda b: b.capacity) if free else _POOL[0])
            buf = _Kept(nbytes)
            _POOL.append(buf)
        buf.used = max(buf.used, nbytes)
        return torch.frombuffer(buf.mem, dtype=dtype, count=numel, offset=buf.offset).view(shape)


def release_kept() -> None:
    """Forget every kept buffer: free ones are unmapped now, ones in use when their last tensor dies."""
    with _LOCK:
        _POOL.clear()


def kept_bytes() -> int:
    """Bytes of the pool's mappings (in use or free) that requests have used: memory kept between calls, which
    benchmarks count. The alignment slack around them is never touched, so it takes no memory."""
    with _LOCK:
        return sum(b.used for b in _POOL)


__all__ = ["HUGE_PAGE", "MAX_BUFFERS", "kept_bytes", "kept_empty", "release_kept"]
