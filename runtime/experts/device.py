"""Experts in device memory (HBM): the first tier of the NVIDIA path, in front of the host store.

A :class:`DeviceExpertStore` holds ``capacity`` expert files side by side in one device slab and
maps (layer, expert) to slots with the host cache's bookkeeping (:class:`SlotIndex`). It is an
expert provider (runtime/model.py) that yields *device* parts: hits at once, misses fetched through
the host :class:`ExpertStore` (its page cache, pinned host cache or disk reads) and copied into
evicted slots. When every expert of a layer is resident (``capacity`` covers the model, or a
synthetic model), :meth:`all_resident` hands the model a part that covers the whole layer, so the
MoE step needs no host read-back and a decode step can be captured in a CUDA graph.

Host buffers are page-locked (``cudaHostRegister``) when :meth:`pin_host` is called, so the copies
of misses run at the link's DMA rate instead of through a pageable bounce buffer.
"""

from __future__ import annotations

import dataclasses
import time
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.cache import SlotIndex
from fmoe.runtime.experts.host_share import HOST_COMPUTE_MAX_EXPERTS, HostShare
from fmoe.runtime.experts.page_lock import page_lock
from fmoe.runtime.experts.slots import DeviceSlots, ExpertPart, ExpertSlots
from fmoe.runtime.experts.stats import ExpertStats


class HostExperts(Protocol):
    """What the device tier needs of the host tier behind it (ExpertStore, or a synthetic slab)."""

    layout: ExpertLayout
    stats: ExpertStats
    stable_rows: bool  # a part's rows keep their bytes after the next request (else: until the next part)

    def resident(self, layer: int, experts: Sequence[int] | np.ndarray) -> Iterator[ExpertPart]: ...

    def host_buffers(self) -> list[np.ndarray]:
        """Its slabs, to page-lock."""
        ...

    def close(self) -> None: ...


DEVICE_MARGIN = 4 << 30  # device memory left free for activations, KV caches and the kernels' workspaces


def default_budget(device: torch.device) -> int:
    """Bytes for the device tier when none are asked for: on CUDA, the free memory now (after the
    dense weights) less :data:`DEVICE_MARGIN`; elsewhere none."""
    if device.type != "cuda":
        return 0
    return max(0, torch.cuda.mem_get_info(device)[0] - DEVICE_MARGIN)


class DeviceExpertStore:
    """``capacity`` expert slots in device memory over an optional host store (None: a synthetic
    slab, filled by the caller, every expert resident).

    Misses are copied on a stream of their own, and the compute stream waits for them on the device,
    not the host. The slot of every expert id is kept on the device (one row a layer, re-uploaded
    only when it changed), so a step uploads no map. With ``host_compute`` (a :class:`HostShare`),
    part of a step's misses are not copied: the host tier's parts are handed to the backend after
    the device part, to be computed on the host from where they lie while the link carries the rest."""

    def __init__(
        self,
        layout: ExpertLayout,
        num_layers: int,
        num_experts: int,
        capacity: int,
        device: torch.device | str,
        host: HostExperts | None = None,
        host_compute: HostShare | None = None,
    ) -> None:
        if capacity < 1:
            raise FmoeError(f"device expert cache: {capacity} slots; it needs room for at least one expert")
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.host = host
        self.host_compute = host_compute if host is not None else None
        self.slab = torch.empty((capacity, layout.file_size), dtype=torch.uint8, device=self.device)
        self.table = DeviceSlots(self.slab, layout)
        self.index = SlotIndex(capacity)
        self.stats = host.stats if host is not None else ExpertStats.zeros(num_layers)
        self._full: list[ExpertPart | None] = [None] * num_layers
        self.pinned = False  # the host tier's slabs page-locked (pin_host)
        self._unpin: list[weakref.finalize] = []  # one a page-locked host buffer (pin_host)
        self.copied_bytes = 0  # misses copied host -> device
        cuda = self.device.type == "cuda"
        # slot of each (layer, expert), -1 where not resident: the host's copy (page-locked, so a row
        # uploads asynchronously) and the device's, which the kernels read
        host_map = torch.full((num_layers, num_experts), -1, dtype=torch.int32, pin_memory=cuda)
        self._map_host = host_map.numpy()
        self._map_pinned = host_map
        self._map = host_map.to(self.device)
        self._map_dirty = np.zeros(num_layers, dtype=bool)
        self._owner = np.full(capacity, -1, dtype=np.int64)  # slot -> layer * num_experts + expert
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._copies: tuple[Any, Any, int] | None = None  # the last copies: (start, end events, experts)

    @property
    def capacity(self) -> int:
        return self.index.capacity

    @property
    def cache_bytes(self) -> int:
        return self.capacity * self.layout.file_size

    @property
    def fully_resident(self) -> bool:
        """Every expert of every layer is on the device for good."""
        return all(p is not None for p in self._full)

    @property
    def bits(self) -> int:
        return self.layout.bits

    def close(self) -> None:
        """Unpin the host slabs (before their memory can be unmapped and reused) and close the host tier."""
        for unpin in self._unpin:
            unpin()
        self._unpin.clear()
        if self.host is not None:
            self.host.close()

    # ---- provider ------------------------------------------------------------------------------
    def all_resident(self, layer: int) -> ExpertPart | None:
        """A part covering every expert of ``layer`` when all are resident and stay so (else None)."""
        return self._full[layer]

    def slot_map(self, layer: int) -> torch.Tensor:
        """The device tensor of ``layer``'s slot map (int32 ``[num_experts]``, -1: not resident): the same
        tensor every step, which the device part of every :meth:`resident` call carries, so a CUDA graph
        that computes a layer's experts can be captured once and replayed after each call."""
        return self._map[layer]

    def resident(self, layer: int, experts: Sequence[int] | np.ndarray) -> Iterator[ExpertPart]:
        """The experts on the device, in one part (hits, and misses copied in from the host tier);
        then, with host computation, the misses left on the host, in the host tier's parts."""
        wanted = [int(e) for e in experts]
        row = self._map_host[layer]
        hits = [e for e in wanted if row[e] >= 0]
        misses = [e for e in wanted if row[e] < 0]
        for e in hits:  # marked recently used
            self.index.lookup(layer, e)
        self.stats.requested[layer] += len(hits)
        self.stats.record(layer, "device", len(hits), len(hits) * self.layout.file_size)
        on_host: list[int] = []
        if misses:
            if self.host is None:
                raise FmoeError(f"device expert cache: layer {layer} experts {misses} are not resident")
            if self.host_compute is not None and len(wanted) <= HOST_COMPUTE_MAX_EXPERTS:
                n = self.host_compute.split(len(misses))
                misses, on_host = misses[: len(misses) - n], misses[len(misses) - n :]
        ready = None
        if on_host and self._copy_stream is not None:  # the inputs are ready before the copies are waited on
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(self.device))
        if misses:
            self._copy_misses(layer, misses, {int(row[e]) for e in hits})
        if self._map_dirty[layer]:  # async from page-locked memory: the host row is not written again
            # before the compute stream has passed this copy (the next step reads routing back first)
            self._map[layer].copy_(self._map_pinned[layer], non_blocking=True)
            self._map_dirty[layer] = False
        ids = np.asarray([e for e in wanted if row[e] >= 0], dtype=np.int64)
        yield ExpertPart(self.table, ids, row[ids].astype(np.int64), self._map[layer])
        if on_host:
            assert self.host is not None and self.host_compute is not None
            if self._copy_stream is not None and not self.host.stable_rows:
                self._copy_stream.synchronize()  # the copies' source rows may be reused by the next request
            t0 = time.perf_counter()
            for part in self.host.resident(layer, np.asarray(on_host, dtype=np.int64)):
                yield dataclasses.replace(part, ready=ready)  # computed on the host before the next is asked for
            self.stats.host_computed[layer] += len(on_host)
            self.host_compute.observe_host(time.perf_counter() - t0, len(on_host))

    def _copy_misses(self, layer: int, misses: list[int], in_use: set[int]) -> None:
        """Copy ``misses`` from the host tier into evicted slots (never those of ``in_use``: this step's
        hits) on the copy stream; the compute stream waits for them on the device, not the host."""
        stream = self._copy_stream
        if stream is None:  # torch on the CPU: plain copies, timed on the host
            t0 = time.perf_counter()
            self._fill(layer, misses, in_use, None)
            if self.host_compute is not None:
                self.host_compute.observe_link(time.perf_counter() - t0, len(misses))
            return
        if self._copies is not None:  # the host tier may reuse the rows the last copies read
            start, end, n = self._copies
            end.synchronize()
            if self.host_compute is not None:
                self.host_compute.observe_link(start.elapsed_time(end) / 1e3, n)
        compute = torch.cuda.current_stream(self.device)
        stream.wait_stream(compute)  # evicted slots may still be read by work queued before
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(stream)
        try:
            with torch.cuda.stream(stream):
                self._fill(layer, misses, in_use, stream)
        finally:  # even after a failure: what was inserted is complete before anything reads it
            end.record(stream)
            compute.wait_stream(stream)
            self._copies = (start, end, len(misses))

    def _fill(self, layer: int, misses: list[int], in_use: set[int], stream: Any) -> None:
        assert self.host is not None
        for n, part in enumerate(self.host.resident(layer, np.asarray(misses, dtype=np.int64))):
            assert isinstance(part.table, ExpertSlots) and part.table.slab is not None
            if n and stream is not None:  # the host tier reuses a part's rows once the next is drawn
                stream.synchronize()
            for e, src in zip(part.ids.tolist(), part.slots.tolist(), strict=True):
                dst = self.index.claim(in_use)
                if dst is None:
                    raise FmoeError(
                        f"device expert cache: {self.capacity} slots cannot hold the experts one layer needs "
                        "at once; give it more memory"
                    )
                in_use.add(dst)
                try:
                    self.slab[dst].copy_(torch.from_numpy(part.table.slab[src]), non_blocking=True)
                except BaseException:
                    self.index.release(dst)  # claimed, never filled: back to the free list
                    raise
                self.index.insert(layer, e, dst)
                self._set_slot(layer, e, dst)
                self.copied_bytes += self.layout.file_size

    def _set_slot(self, layer: int, expert: int, slot: int) -> None:
        """``slot`` now holds (layer, expert): the map follows, the slot's previous expert unmapped."""
        old = int(self._owner[slot])
        if old >= 0:
            old_layer, old_expert = divmod(old, self.num_experts)
            self._map_host[old_layer, old_expert] = -1
            self._map_dirty[old_layer] = True
        self._owner[slot] = layer * self.num_experts + expert
        self._map_host[layer, expert] = slot
        self._map_dirty[layer] = True

    # ---- filling -------------------------------------------------------------------------------
    def load_all(self) -> None:
        """Copy every expert of every layer in from the host store and freeze the map (the model
        fits): decode then never leaves the device for experts."""
        if self.capacity < self.num_layers * self.num_experts:
            raise FmoeError(
                f"device expert cache: {self.capacity} slots cannot hold all "
                f"{self.num_layers * self.num_experts} experts"
            )
        from fmoe.progress import byte_progress

        every = np.arange(self.num_experts, dtype=np.int64)
        per_layer = self.num_experts * self.layout.file_size
        with byte_progress(transient=True) as bar:
            task = bar.add_task("experts to the device", total=self.num_layers * per_layer)
            for layer in range(self.num_layers):
                self._copy_misses(layer, every.tolist(), set())
                self._freeze(layer)
                bar.advance(task, per_layer)

    def assign_all(self) -> None:
        """Give every (layer, expert) a slot in order and freeze the map, with no host tier behind: for
        a slab the caller fills itself (the synthetic model, runtime/synthetic.py)."""
        if self.capacity < self.num_layers * self.num_experts:
            raise FmoeError("device expert cache: a synthetic model needs a slot for every expert")
        for layer in range(self.num_layers):
            for e in range(self.num_experts):
                slot = self.index.claim(())
                assert slot is not None
                self.index.insert(layer, e, slot)
                self._set_slot(layer, e, slot)
            self._freeze(layer)

    def pin_host(self) -> None:
        """Page-lock the host tier's slabs so misses are copied by DMA at the link's rate."""
        if self.host is None or self.device.type != "cuda":
            return
        buffers = self.host.host_buffers()
        # a buffer the driver refuses is copied through a pageable bounce buffer: slower, still correct
        self._unpin = [unpin for a in buffers if (unpin := page_lock(self, a, self.device)) is not None]
        self.pinned = bool(buffers) and len(self._unpin) == len(buffers)

    # ---- helpers -------------------------------------------------------------------------------
    def _freeze(self, layer: int) -> None:
        row = self._map_host[layer]
        if self._map_dirty[layer]:
            self._map[layer].copy_(self._map_pinned[layer])
            self._map_dirty[layer] = False
        ids = np.arange(self.num_experts, dtype=np.int64)
        self._full[layer] = ExpertPart(self.table, ids, row.astype(np.int64), self._map[layer])
