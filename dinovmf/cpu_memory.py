"""Fresh large CPU buffers backed by transparent huge pages.

The fused op returns a new [K, p] prototype gradient every step (autograd takes the buffer as the
parameter's .grad, so it cannot be kept between steps). glibc maps blocks this large afresh and returns
them to the OS on free, so each step pays one page fault per 4 KiB on first touch: 16384 faults for
K = 65536, p = 256 fp32, ~21 ms of the op's ~330 ms at DINO's head on the 2-core EPYC VM (measured: the
first chunk's U GEMM took 53 ms into a fresh buffer, the second 32 ms into a touched one). Advising the
kernel to back the buffer with 2 MiB pages before it is touched cuts that to 32 faults (filling a fresh
64 MiB buffer: 27 ms plain, 11 ms advised). PyTorch's allocator does the same for every block when
THP_MEM_ALLOC_ENABLE=1 is set before it starts; this does it for the one buffer that needs it.

Linux only; elsewhere, or when the kernel refuses (THP disabled), the buffer is simply a plain one.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14  # <sys/mman.h> on Linux
MIN_BYTES = 8 * HUGE_PAGE  # below this the faults cost little and rounding to huge pages wastes memory


@functools.lru_cache(maxsize=None)
def _madvise():
    """libc's madvise, or None where there is none to call (not Linux, no libc found)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.madvise
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    fn.restype = ctypes.c_int
    return fn


def advise_huge_pages(t: torch.Tensor) -> bool:
    """Ask the kernel to back the whole 2 MiB pages inside `t`'s memory with huge pages (call it before
    anything touches `t`). Returns whether the advice was given; a no-op (False) for small, non-CPU or
    non-contiguous tensors and where madvise is unavailable or refused."""
    madvise = _madvise()
    nbytes = t.numel() * t.element_size()
    if madvise is None or t.device.type != "cpu" or nbytes < MIN_BYTES or not t.is_contiguous():
        return False
    start = -(-t.data_ptr() // HUGE_PAGE) * HUGE_PAGE
    end = (t.data_ptr() + nbytes) // HUGE_PAGE * HUGE_PAGE
    return end > start and madvise(start, end - start, MADV_HUGEPAGE) == 0


def empty_huge(*shape: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape)`, advised onto huge pages when it is a large CPU buffer (`advise_huge_pages`)."""
    t = torch.empty(*shape, dtype=dtype, device=device)
    advise_huge_pages(t)
    return t
