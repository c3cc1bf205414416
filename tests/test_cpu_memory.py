"""dinovmf.cpu_memory: large CPU buffers kept between calls and reused only once nothing refers to them."""
import threading
from pathlib import Path

import pytest
import torch

from dinovmf import cpu_memory
from dinovmf.cpu_memory import HUGE_PAGE, MAX_BUFFERS, kept_bytes, kept_empty, release_kept

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")
BIG = 3 * HUGE_PAGE // 4  # float32 elements: 3 huge pages


def _thp_mode() -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where there is no such file."""
    try:
        return THP.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


@pytest.fixture(autouse=True)
def empty_pool():
    release_kept()
    yield
    release_kept()


def test_kept_empty_is_an_ordinary_tensor():
    t = kept_empty(BIG // 8, 8, dtype=torch.float32)
    assert t.shape == (BIG // 8, 8) and t.dtype == torch.float32 and t.is_contiguous() and t.device.type == "cpu"
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()
    small = kept_empty(4, 5, dtype=torch.float64)
    assert small.shape == (4, 5) and small.dtype == torch.float64
    assert kept_empty(0, 7, dtype=torch.float32).shape == (0, 7)
    assert kept_empty(3, dtype=torch.float32, device="meta").device.type == "meta"  # other devices: torch.empty


def test_a_buffer_is_reused_once_its_tensors_are_gone():
    t = kept_empty(BIG, dtype=torch.float32)
    ptr = t.data_ptr()
    assert kept_bytes() == BIG * 4  # what requests used: the alignment slack is never touched
    del t
    assert kept_empty(BIG, dtype=torch.float32).data_ptr() == ptr
    assert kept_empty(BIG // 2, 2, dtype=torch.float32).data_ptr() == ptr  # any shape of the same size
    assert kept_bytes() == BIG * 4


@pytest.mark.parametrize("holder", ["tensor", "view", "grad"])
def test_a_buffer_in_use_is_never_handed_out(holder):
    """Whatever shares the storage keeps the buffer out of the pool: the tensor, a view of it, or the
    parameter .grad autograd made of it (the op's prototype gradient) until zero_grad drops it."""
    t = kept_empty(BIG // 4, 4, dtype=torch.float32).fill_(1.0)
    ptr = t.data_ptr()
    param = torch.nn.Parameter(torch.zeros(BIG // 4, 4))
    if holder == "view":
        t = t[1:]
    elif holder == "grad":
        class HandOver(torch.autograd.Function):  # a Function returning its own buffer, as the fused op does
            @staticmethod
            def forward(ctx, x):
                return x.sum()

            @staticmethod
            def backward(ctx, grad):
                return kept_empty(BIG // 4, 4, dtype=torch.float32).fill_(1.0)
        del t
        HandOver.apply(param).backward()
        t = param.grad
        ptr = t.data_ptr()
    other = kept_empty(BIG // 4, 4, dtype=torch.float32).fill_(2.0)
    assert other.data_ptr() != ptr and bool((t == 1.0).all())
    if holder == "grad":
        param.grad = None  # what zero_grad(set_to_none=True) does
    del t
    del other
    assert kept_empty(BIG // 4, 4, dtype=torch.float32).data_ptr() == ptr


def test_requests_take_a_buffer_of_their_size():
    """A smaller request may take a free buffer up to twice its size, not a much larger one."""
    big = kept_empty(2 * BIG, dtype=torch.float32)
    ptr = big.data_ptr()
    del big
    assert kept_empty(BIG + 1, dtype=torch.float32).data_ptr() == ptr
    assert kept_empty(BIG // 4, dtype=torch.float32).data_ptr() != ptr


def test_concurrent_threads_never_share_a_buffer():
    barrier, seen, errors = threading.Barrier(4), [], []

    def worker(value):
        try:
            for _ in range(20):
                t = kept_empty(BIG, dtype=torch.float32).fill_(value)
                barrier.wait()  # all four hold a buffer at once
                seen.append(t.data_ptr())
                if not bool((t == value).all()):
                    errors.append(value)
                barrier.wait()
        except threading.BrokenBarrierError:
            errors.append("barrier")

    threads = [threading.Thread(target=worker, args=(float(i),)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    rounds = [seen[i:i + 4] for i in range(0, len(seen), 4)]
    assert all(len(set(r)) == 4 for r in rounds)


def test_the_pool_stays_bounded_and_forgotten_buffers_stay_valid():
    held = [kept_empty(BIG, dtype=torch.float32).fill_(float(i)) for i in range(MAX_BUFFERS + 3)]
    assert len(cpu_memory._POOL) <= MAX_BUFFERS
    assert len({t.data_ptr() for t in held}) == len(held)
    for i, t in enumerate(held):
        assert bool((t == float(i)).all())
    release_kept()
    assert kept_bytes() == 0
    assert bool((held[-1] == float(len(held) - 1)).all())  # still mapped while it is referenced


def test_large_buffers_are_huge_page_aligned():
    assert kept_empty(BIG, dtype=torch.float32).data_ptr() % HUGE_PAGE == 0


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_large_buffers_are_backed_by_huge_pages():
    """The kernel honours the advice: after touching a buffer, its mapping holds anonymous huge pages
    (AnonHugePages in /proc/self/smaps; THP may fall back to small pages when memory is fragmented, so at
    least one of the advised 2 MiB pages is asked for, not all)."""
    t = kept_empty(64 * HUGE_PAGE // 4, dtype=torch.float32)
    t.fill_(1.0)
    start, end = t.data_ptr(), t.data_ptr() + t.numel() * 4
    huge_kb, inside = 0, False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and ":" not in head:
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo < end and hi > start
        elif inside and line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
    assert huge_kb >= HUGE_PAGE // 1024, f"no huge pages in the kept buffer's mapping ({huge_kb} kB)"
