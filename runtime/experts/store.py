"""The expert store: makes a layer's routed experts resident and hands them to the MoE op in parts.

``resident(layer, ids)`` is an iterator of :class:`ExpertPart` (a ticket): cache hits come first,
at once, while the misses are being read by the I/O threads; then each batch of misses as soon as
its reads are done. Each requested expert is in exactly one part, so it is read at most once per
layer per forward pass, and the model never learns about buffer budgets: misses that do not fit the
read pool at once are read in batches of half the pool, so the next batch is read while the
previous one is computed.

Memory is bounded by the read pool (``pool_bytes``, default 1 GiB, reserved once and committed by
the OS only where written) plus the cache budget, never by the model size. Not thread-safe: one
request at a time (the engine's runner holds a lock around each forward pass).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.cache import CacheTier
from fmoe.runtime.experts.files import ExpertFiles
from fmoe.runtime.experts.mapped import MappedSlab
from fmoe.runtime.experts.slots import ExpertPart, ExpertSlots, HostSlab
from fmoe.runtime.experts.stats import ExpertStats

_PARALLEL_MIN_BYTES = 256 << 10  # expert files at least this big are read by the I/O threads


@dataclass
class _Batch:
    """Misses being read into slots of one table."""

    ids: list[int]
    slots: list[int]
    table: ExpertSlots
    cached: bool  # slots belong to the cache tier (inserted when read), else to the read pool
    submitted: float
    jobs: list[Future[float] | float] = field(default_factory=list)  # each read's finish time

    def wait(self) -> float:
        """Wait for every read (all of them, even after a failure); the last finish time. Raises
        the first read's error."""
        finished, error = self.submitted, None
        for job in self.jobs:
            try:
                finished = max(finished, job.result() if isinstance(job, Future) else job)
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error
        return finished


class ExpertStore:
    """Experts of one bit width from ``files``, through an optional cache tier and a read pool."""

    stable_rows = False  # read-pool rows and evictable cache slots are reused by later requests

    def __init__(
        self,
        files: ExpertFiles,
        num_layers: int,
        num_experts: int,
        *,
        cache: CacheTier | None = None,
        pool_bytes: int = 1 << 30,
        io_threads: int | None = None,
        parallel_min_bytes: int = _PARALLEL_MIN_BYTES,
    ) -> None:
        self.files = files
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.cache = cache
        self.stats = ExpertStats.zeros(num_layers)
        size = files.file_size
        self.pool = HostSlab(self.layout, max(1, min(num_experts, pool_bytes // size)))
        self._pool_free = list(range(self.pool.count - 1, -1, -1))  # popped from the end: slot 0 first
        self._batch_size = max(1, self.pool.count // 2)
        # Page-cache copies are bandwidth-bound (a few threads saturate it) and an SSD wants a queue,
        # but more readers than half the cores only fight the compute threads for them.
        self._threads = io_threads or min(8, max(2, (os.cpu_count() or 2) // 2))
        self._inline = self._threads == 1 or size < parallel_min_bytes  # small files: read in this thread
        self._executor: ThreadPoolExecutor | None = None
        self._mapped: dict[int, MappedSlab] = {}  # io="mmap": each layer's files, mapped

    @property
    def layout(self) -> ExpertLayout:
        return self.files.layout

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def cache_bytes(self) -> int:
        """The cache tier's size in bytes (0 without one)."""
        return 0 if self.cache is None else self.cache.capacity * self.layout.file_size

    # ---- the ticket ----------------------------------------------------------------------------
    def resident(self, layer: int, experts: Sequence[int] | np.ndarray) -> Iterator[ExpertPart]:
        """Make ``experts`` of ``layer`` resident; yields them in parts (see the module docstring).
        A part's slots stay valid until the next part is drawn."""
        wanted = self._check(layer, experts)
        self.stats.requested[layer] += len(wanted)
        if self.files.io == "mmap":
            yield self._mapped_part(layer, wanted)
            return
        hits: list[tuple[int, int]] = []
        misses: deque[int] = deque()
        for e in wanted:
            slot = self.cache.lookup(layer, e) if self.cache is not None else None
            if slot is None:
                misses.append(e)
            else:
                hits.append((e, slot))
        pinned = {slot for _, slot in hits}  # cache slots this request uses: never evicted under it
        keep = frozenset(wanted)  # their files stay open while the request runs
        queue: deque[_Batch] = deque()
        current: _Batch | None = None  # read and handed out; its pool slots are free once the caller is back
        try:
            self._submit(layer, misses, queue, pinned, keep)
            if hits:
                assert self.cache is not None
                self.stats.record(layer, self.cache.name, len(hits), len(hits) * self.layout.file_size)
                yield _part(self.cache.table, hits)
            busy_until = 0.0
            while queue:
                batch = queue[0]
                finished = batch.wait()
                current = queue.popleft()
                # disk time: from submission to the last read's end, overlap with the batch before not counted twice
                seconds = finished - max(batch.submitted, busy_until)
                busy_until = finished
                self.stats.record(layer, "disk", len(batch.ids), len(batch.ids) * self.layout.file_size, seconds)
                if batch.cached:
                    assert self.cache is not None
                    for e, s in zip(batch.ids, batch.slots, strict=True):
                        self.cache.insert(layer, e, s)
                yield _part(batch.table, list(zip(batch.ids, batch.slots, strict=True)))
                if not batch.cached:
                    self._pool_free += batch.slots
                current = None
                self._submit(layer, misses, queue, pinned, keep)
        finally:  # an error or an abandoned ticket: no read may still write into a slot once we return
            if current is not None and not current.cached:
                self._pool_free += current.slots
            for batch in queue:
                with contextlib.suppress(BaseException):  # the first error is already propagating
                    batch.wait()
                if batch.cached:
                    assert self.cache is not None
                    for s in batch.slots:
                        self.cache.release(s)
                else:
                    self._pool_free += batch.slots

    def host_buffers(self) -> list[np.ndarray]:
        """The slabs experts are read into (read pool, host cache): what a device tier page-locks."""
        cache = getattr(self.cache, "slab", None)
        return [self.pool.data] + ([cache.data] if cache is not None else [])

    def close(self) -> None:
        """Close the expert files and stop the I/O threads."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        self._mapped.clear()  # each range is unmapped once no array over it is left
        self.files.close()

    # ---- reads ---------------------------------------------------------------------------------
    def _submit(
        self, layer: int, misses: deque[int], queue: deque[_Batch], pinned: set[int], keep: frozenset[int]
    ) -> None:
        """Start reading as many misses as free slots allow, in batches: into cache slots while the
        tier has unpinned ones, else into the read pool."""
        while misses:
            batch = self._claim(misses, pinned)
            if batch is None:
                if not queue:  # nothing in flight would free a slot: slots leaked from an earlier ticket
                    raise FmoeError("expert store: no free read slot (an earlier request still holds them)")
                return  # the next batch starts when a part has been computed
            queue.append(batch)
            for e, slot in zip(batch.ids, batch.slots, strict=True):
                fd = self.files.open(layer, e, keep)
                row = self._row(batch, slot)
                if self._inline:
                    batch.jobs.append(self._read(layer, e, fd, row))
                else:
                    batch.jobs.append(self._pool().submit(self._read, layer, e, fd, row))

    def _claim(self, misses: deque[int], pinned: set[int]) -> _Batch | None:
        now = time.perf_counter()
        ids: list[int] = []
        slots: list[int] = []
        if self.cache is not None:
            while misses and len(ids) < self._batch_size:
                slot = self.cache.claim(pinned)
                if slot is None:
                    break
                pinned.add(slot)
                ids.append(misses.popleft())
                slots.append(slot)
            if ids:
                return _Batch(ids, slots, self.cache.table, True, now)
        n = min(len(misses), len(self._pool_free))
        if n < len(misses):  # more misses than free slots: batches of half the pool, to overlap
            n = min(n, self._batch_size)
        if n == 0:
            return None
        ids = [misses.popleft() for _ in range(n)]
        slots = [self._pool_free.pop() for _ in range(n)]
        return _Batch(ids, slots, self.pool.table, False, now)

    def _row(self, batch: _Batch, slot: int) -> np.ndarray:
        if batch.cached:
            assert self.cache is not None
            return self.cache.row(slot)
        return self.pool.row(slot)

    def _mapped_part(self, layer: int, wanted: list[int]) -> ExpertPart:
        """io="mmap": the layer's files mapped side by side (slot = expert id), each mapped on first use."""
        slab = self._mapped.get(layer)
        if slab is None:
            slab = self._mapped[layer] = MappedSlab(self.layout, self.num_experts)
        for e in wanted:
            if not slab.mapped[e]:
                self.files.map_into(slab, layer, e)
            elif self.files.checks == "every-read":
                self.files.check(layer, e, slab.data[e])
        self.stats.record(layer, "mapped", len(wanted), len(wanted) * self.layout.file_size)
        ids = np.array(wanted, dtype=np.int64)
        return ExpertPart(slab.table, ids, ids)

    def _read(self, layer: int, expert: int, fd: int, row: np.ndarray) -> float:
        self.files.read_into(layer, expert, fd, row)
        return time.perf_counter()

    def _pool(self) -> ThreadPoolExecutor:
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="fmoe-io")
        return self._executor

    def _check(self, layer: int, experts: Sequence[int] | np.ndarray) -> list[int]:
        if not 0 <= layer < self.num_layers:
            raise FmoeError(f"expert store: layer {layer} out of range 0..{self.num_layers - 1}")
        wanted = list(dict.fromkeys(int(e) for e in experts))  # unique, order kept
        for e in wanted:
            if not 0 <= e < self.num_experts:
                raise FmoeError(f"expert store: expert {e} out of range 0..{self.num_experts - 1}")
        return wanted


def _part(table: ExpertSlots, pairs: list[tuple[int, int]]) -> ExpertPart:
    ids = np.array([e for e, _ in pairs], dtype=np.int64)
    slots = np.array([s for _, s in pairs], dtype=np.int64)
    return ExpertPart(table, ids, slots)
