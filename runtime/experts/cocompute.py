"""Experts of host-homed rows computed by the host while the GPU computes the rest of the layer.

With ``--host-reads direct`` the GPU reads the experts it does not hold from page-locked host
memory over the link. The host can compute some of those itself, from the same memory, while the
link carries the others: both sides then work at once. :class:`HostCoCompute` holds the buffers the
device and the host share (page-locked, through ``alloc``: the layer's input, its jobs and weights,
a step number each way, the host's sum) and the worker threads that serve them
(runtime/kernels/cpu_cocompute.py): the device writes a layer's input and jobs, then its step in
``mark``; the host writes the jobs' weighted sum to ``out``, then the step in ``flag``.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from numba import njit

from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.kernels import cpu_cocompute, int8dot
from fmoe.runtime.kernels.atomics import load_acquire, store_release
from fmoe.runtime.kernels.cpu_cocompute import IDLE_AFTER_WORK, STOPPED, SYNC_STRIDE

# A worker polls for IDLE_SPINS rounds of every layer's mark (milliseconds: the gaps between a step's
# layers and between steps) after its last step, then naps in Python, each nap twice the last up to
# NAP_MAX with SHORT_SPINS rounds of polls between: an idle machine gets its cores back, and the first
# layer of a new burst waits at most NAP_MAX.
IDLE_SPINS, SHORT_SPINS = 1 << 16, 64
NAP_MIN, NAP_MAX = 50e-6, 2e-3

Alloc = Callable[[tuple[int, ...], type], np.ndarray]


def _zeros(shape: tuple[int, ...], dtype: type) -> np.ndarray:
    return np.zeros(shape, dtype)


@njit(nogil=True, cache=True)
def _post_and_wait(mark, flag, layer, step, control):
    """Play the device's part for one layer: post ``step``, spin until the host's flag shows it."""
    store_release(mark, layer, step)
    while load_acquire(flag, layer) < step:
        if load_acquire(control, 0) != 0:
            return False
    return True


def default_cores(threads: int) -> list[int] | None:
    """The last ``threads`` CPUs this process may run on, one per worker (the first ones left to the
    thread driving the device); None where affinity cannot be set or there are too few."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return None
    return cpus[-threads:] if threads < len(cpus) else None


class HostCoCompute:
    """Worker threads computing, for each layer of a step, the experts the device leaves them.

    ``slab``: the host-homed expert files (uint8 ``[rows, file_size]`` laid out as ``layout``), read
    in place; ``layers`` the layers (each its own buffers and steps); ``max_experts`` the most jobs a layer;
    ``alloc(shape, dtype)`` makes the shared buffers (page-locked for a device; zeroed)."""

    def __init__(
        self,
        slab: np.ndarray,
        layout: ExpertLayout,
        layers: int,
        max_experts: int,
        threads: int,
        int8: bool = False,
        alloc: Alloc = _zeros,
        cores: Sequence[int] | None = None,
    ) -> None:
        if slab.dtype != np.uint8 or slab.ndim != 2 or slab.shape[1] != layout.file_size or not slab.flags.c_contiguous:
            raise ValueError(f"host co-compute: slab must be C-contiguous uint8 [rows, {layout.file_size}]")
        if layout.bits not in (2, 4, 8) or layers < 1 or max_experts < 1 or threads < 1:
            raise ValueError("host co-compute: needs 2, 4 or 8 bits and at least one layer, job and thread")
        if cores is not None and len(cores) != threads:
            raise ValueError(f"host co-compute: {len(cores)} cores for {threads} threads")
        comp = layout.components
        hidden, inter = comp["down_proj.weight"].shape[0], comp["gate_proj.weight"].shape[0]
        self.slab, self.layout, self.layers, self.max_experts, self.threads = slab, layout, layers, max_experts, threads
        self.mark = alloc((layers,), np.int64)
        self.flag = alloc((layers,), np.int64)
        self.jobs = alloc((layers, 1 + max_experts), np.int64)
        self.weights = alloc((layers, max_experts), np.float32)
        self.x = alloc((layers, hidden), np.float32)
        self.out = alloc((layers, hidden), np.float32)
        self._control = np.zeros(2, np.int64)  # stop; the layer (plus one) whose jobs did not fit
        self._sync = np.zeros(layers * SYNC_STRIDE, np.int64)
        self._h = np.zeros((max_experts, inter), np.float32)
        # int8 activations where the CPU's integer dots take this layout (as the CPU kernels' --int8-dot)
        self.int8 = int8 and layout.bits in (4, 2) and layout.group_size == int8dot.GROUP_COLUMNS and int8dot.AVAILABLE
        self._loop = cpu_cocompute.worker_loop_int8 if self.int8 else cpu_cocompute.worker_loop_float
        self._step, self._next_layer = 0, 0  # compute()'s: its last step, and the layer it posts next (each in turn)
        self.error: BaseException | None = None
        self.naps = [0] * threads  # each worker's naps (idle spells)
        gate, up, down = (
            np.array([comp[f"{proj}.{part}"].offset for part in ("weight", "scales", "biases")], np.int64)
            for proj in ("gate_proj", "up_proj", "down_proj")
        )
        self._loop_args = (self.mark, self.flag, self.jobs, self.weights, self.x, self.out, self._sync, self._h, slab,
                           gate, up, down, layout.group_size, layout.bits)  # fmt: skip
        self._workers = []
        for tid in range(threads):
            core = None if cores is None else cores[tid]
            self._workers.append(
                threading.Thread(target=self._serve, args=(tid, core), name=f"fmoe-cocompute-{tid}", daemon=True)
            )
        for worker in self._workers:
            worker.start()

    def _serve(self, tid: int, core: int | None) -> None:
        if core is not None:
            with contextlib.suppress(AttributeError, OSError):
                os.sched_setaffinity(0, {core})  # this thread only (Linux)
        state = np.zeros(2 * self.layers + 1, np.int64)
        spins, nap = IDLE_SPINS, 0.0
        try:
            while (done := self._loop(tid, self.threads, self._control, state, spins, *self._loop_args)) != STOPPED:
                if done == IDLE_AFTER_WORK:
                    spins, nap = IDLE_SPINS, 0.0
                    continue
                self.naps[tid] += 1
                spins, nap = SHORT_SPINS, min(NAP_MAX, max(NAP_MIN, 2 * nap))
                time.sleep(nap)
        except BaseException as e:  # seen by the caller (close, compute); the device would wait for nothing
            self.error = e
            self._control[0] = 1

    def compute(self, x: np.ndarray, rows: Sequence[int], weights: Sequence[float]) -> np.ndarray:
        """Play the device's part for the next layer in turn (tests, benchmarks): ``sum_j weights[j] *
        expert(rows[j])(x)`` computed by the workers, as float32 ``[hidden]``."""
        layer = self._next_layer
        n = len(rows)
        if not 0 <= n <= self.max_experts or len(weights) != n:
            raise ValueError(f"host co-compute: {n} jobs (at most {self.max_experts}), {len(weights)} weights")
        if n and not all(0 <= r < self.slab.shape[0] for r in rows):
            raise ValueError("host co-compute: host row out of range")
        self.x[layer] = x
        self.jobs[layer, 0] = n
        self.jobs[layer, 1 : 1 + n] = rows
        self.weights[layer, :n] = weights
        self._step = max(self._step, int(self.mark.max())) + 1
        if not _post_and_wait(self.mark, self.flag, layer, self._step, self._control):
            raise RuntimeError(f"host co-compute stopped: {self.error!r}")
        self.check()
        self._next_layer = (layer + 1) % self.layers
        return self.out[layer].copy()

    def check(self) -> None:
        """Raise if a worker failed, or if a layer's jobs (written by the device) named more experts
        than ``max_experts`` or rows outside the slab: that layer's host sum was left zero."""
        if self.error is not None:
            raise RuntimeError(f"host co-compute: a worker failed: {self.error!r}")
        if self._control[1]:
            raise RuntimeError(f"host co-compute: layer {self._control[1] - 1}'s jobs do not fit the host rows")

    def close(self) -> None:
        """Stop the workers (each returns from its loop at its next poll) and wait for them."""
        self._control[0] = 1
        for worker in self._workers:
            worker.join()

    def __enter__(self) -> HostCoCompute:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
