"""fapc.memory: freed heap memory goes back to the operating system."""

from __future__ import annotations

import numpy as np
import pytest

from fapc.memory import TRIM_EVERY, trim_heap, trim_now


def _rss_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def test_trim_heap_returns_freed_memory():
    if not trim_heap():
        pytest.skip("no glibc malloc_trim here")
    blocks = [np.ones(2000) for _ in range(20000)]  # 320 MB in 16 KB blocks: glibc's heap
    keep = np.ones(2000)  # allocated above them, so the heap's top cannot simply shrink
    before = _rss_mb()
    del blocks
    freed = _rss_mb()
    trim_heap()
    after = _rss_mb()
    assert before - after > 200, (before, freed, after)
    assert keep.sum() == 2000


def test_trim_now_every_few_batches():
    due = [b for b in range(4 * TRIM_EVERY) if trim_now(b)]
    assert due == [TRIM_EVERY - 1, 2 * TRIM_EVERY - 1, 3 * TRIM_EVERY - 1, 4 * TRIM_EVERY - 1]
