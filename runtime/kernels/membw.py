"""The machine's memory read bandwidth, measured the way the kernels read: numba threads streaming
a buffer far larger than the caches (a STREAM-like probe), so a kernel's or a token's GB/s can be
read against the ceiling of the same machine in the same run."""

from __future__ import annotations

import time

import numpy as np
from numba import njit, prange

_CHUNKS = 256


@njit(parallel=True, cache=True)
def _read_sum(words):
    # Each chunk summed as a slice: numba compiles that to a vectorised loop with several loads in
    # flight. A hand-written element loop here ran 3.6x slower on the dev box (13.5 against 48.7 GB/s
    # on 2 threads; numpy's own sum, one thread per half: 46) and made every ceiling look too low.
    n = words.shape[0]
    step = (n + _CHUNKS - 1) // _CHUNKS
    sums = np.zeros(_CHUNKS, np.uint64)
    for c in prange(_CHUNKS):
        sums[c] = words[c * step : min(n, (c + 1) * step)].sum()
    return sums.sum()


def read_buffer(nbytes: int) -> np.ndarray:
    """A buffer for :func:`read_pass`, written so that its pages are committed (no page-fault pass)."""
    return np.ones(nbytes // 8, dtype=np.uint64)


def read_pass(words: np.ndarray) -> None:
    """One pass reading ``words`` with the current numba thread count."""
    _read_sum(words)


def read_bandwidth(nbytes: int = 512 << 20, repeat: int = 5) -> float:
    """Best-of-``repeat`` GB/s reading ``nbytes`` with the current numba thread count."""
    words = read_buffer(nbytes)
    read_pass(words)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        read_pass(words)
        best = min(best, time.perf_counter() - t0)
    return words.nbytes / best / 1e9
