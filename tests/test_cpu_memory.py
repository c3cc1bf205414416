"""dinovmf.cpu_memory: large fresh CPU buffers advised onto transparent huge pages."""
import sys
from pathlib import Path

import pytest
import torch

from dinovmf.cpu_memory import HUGE_PAGE, MIN_BYTES, advise_huge_pages, empty_huge

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _thp_mode() -> str | None:
    """The kernel's THP mode ('always', 'madvise', 'never'), or None where there is no such file."""
    try:
        return THP.read_text().split("[")[1].split("]")[0]
    except (OSError, IndexError):
        return None


def test_empty_huge_is_an_ordinary_tensor():
    t = empty_huge(2 * MIN_BYTES // 4, dtype=torch.float32, device=torch.device("cpu"))
    assert t.shape == (2 * MIN_BYTES // 4,) and t.dtype == torch.float32 and t.is_contiguous()
    t.fill_(3.0)
    assert float(t.sum()) == 3.0 * t.numel()
    small = empty_huge(4, 5, dtype=torch.float64, device=torch.device("cpu"))
    assert small.shape == (4, 5) and small.dtype == torch.float64


def test_advice_is_given_only_where_it_can_help():
    assert not advise_huge_pages(torch.empty(16))  # far below MIN_BYTES
    big = torch.empty(MIN_BYTES // 2, 4)
    assert not advise_huge_pages(big.t())  # not contiguous
    if sys.platform.startswith("linux"):
        assert advise_huge_pages(torch.empty(MIN_BYTES // 4 + HUGE_PAGE))


@pytest.mark.skipif(_thp_mode() not in ("madvise", "always"), reason="transparent huge pages are off here")
def test_advised_buffer_is_backed_by_huge_pages():
    """The kernel honours the advice: after touching the buffer, its mapping holds anonymous huge pages
    (AnonHugePages in /proc/self/smaps for the range; THP may fall back to small pages when memory is
    fragmented, so at least one of the advised 2 MiB pages is asked for, not all)."""
    t = empty_huge(64 * HUGE_PAGE // 4, dtype=torch.float32, device=torch.device("cpu"))
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
    assert huge_kb >= HUGE_PAGE // 1024, f"no huge pages in the advised buffer's mapping ({huge_kb} kB)"
