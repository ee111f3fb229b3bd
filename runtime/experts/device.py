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

import time
from collections.abc import Iterator, Sequence
from typing import Protocol

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.cache import SlotIndex
from fmoe.runtime.experts.slots import DeviceSlots, ExpertPart, ExpertSlots
from fmoe.runtime.experts.stats import ExpertStats


class HostExperts(Protocol):
    """What the device tier needs of the host tier behind it (ExpertStore, or a synthetic slab)."""

    layout: ExpertLayout
    stats: ExpertStats

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
    slab, filled by the caller, every expert resident)."""

    def __init__(
        self,
        layout: ExpertLayout,
        num_layers: int,
        num_experts: int,
        capacity: int,
        device: torch.device | str,
        host: HostExperts | None = None,
    ) -> None:
        if capacity < 1:
            raise FmoeError(f"device expert cache: {capacity} slots; it needs room for at least one expert")
        self.layout = layout
        self.num_layers = num_layers
        self.num_experts = num_experts
        self.device = torch.device(device)
        self.host = host
        self.slab = torch.empty((capacity, layout.file_size), dtype=torch.uint8, device=self.device)
        self.table = DeviceSlots(self.slab, layout)
        self.index = SlotIndex(capacity)
        self.stats = host.stats if host is not None else ExpertStats.zeros(num_layers)
        self._full: list[ExpertPart | None] = [None] * num_layers
        self.pinned = False  # the host tier's slabs page-locked (pin_host)
        self._registered: list[np.ndarray] = []
        self.copied_bytes = 0  # misses copied host -> device, and the seconds those copies took
        self.copy_seconds = 0.0

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
        if self._registered:
            torch.cuda.synchronize(self.device)
            for a in self._registered:
                torch.cuda.cudart().cudaHostUnregister(a.ctypes.data)
            self._registered.clear()
        if self.host is not None:
            self.host.close()

    # ---- provider ------------------------------------------------------------------------------
    def all_resident(self, layer: int) -> ExpertPart | None:
        """A part covering every expert of ``layer`` when all are resident and stay so (else None)."""
        return self._full[layer]

    def resident(self, layer: int, experts: Sequence[int] | np.ndarray) -> Iterator[ExpertPart]:
        """The experts on the device, in one part: hits, then misses copied in from the host store."""
        wanted = [int(e) for e in experts]
        slots: dict[int, int] = {}
        misses = []
        for e in wanted:
            slot = self.index.lookup(layer, e)
            if slot is None:
                misses.append(e)
            else:
                slots[e] = slot
        hits = len(slots)
        self.stats.requested[layer] += hits
        self.stats.record(layer, "device", hits, hits * self.layout.file_size)
        if misses:
            if self.host is None:
                raise FmoeError(f"device expert cache: layer {layer} experts {misses} are not resident")
            pinned = set(slots.values())
            t0 = time.perf_counter()
            for part in self.host.resident(layer, np.asarray(misses, dtype=np.int64)):
                assert isinstance(part.table, ExpertSlots) and part.table.slab is not None
                for e, src in zip(part.ids.tolist(), part.slots.tolist(), strict=True):
                    dst = self.index.claim(pinned)
                    if dst is None:
                        raise FmoeError(
                            f"device expert cache: {self.capacity} slots cannot hold the {len(wanted)} experts "
                            "one layer needs at once; give it more memory"
                        )
                    pinned.add(dst)
                    try:
                        self._copy_in(dst, part.table.slab[src])
                    except BaseException:
                        self.index.release(dst)  # claimed, never filled: back to the free list
                        raise
                    self.index.insert(layer, e, dst)
                    slots[e] = dst
                if self.device.type == "cuda":  # the host part's slots are reused once the next is drawn
                    torch.cuda.current_stream(self.device).synchronize()
            self.copied_bytes += len(misses) * self.layout.file_size
            self.copy_seconds += time.perf_counter() - t0
        ids = np.asarray(wanted, dtype=np.int64)
        slot_array = np.asarray([slots[e] for e in wanted], dtype=np.int64)
        yield ExpertPart(self.table, ids, slot_array, self._device_map(ids, slot_array))

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
                for _ in self.resident(layer, every):
                    pass
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
            self._freeze(layer)

    def pin_host(self) -> None:
        """Page-lock the host tier's slabs so misses are copied by DMA at the link's rate."""
        if self.host is None or self.device.type != "cuda":
            return
        cudart = torch.cuda.cudart()
        for a in self.host.host_buffers():
            if int(cudart.cudaHostRegister(a.ctypes.data, a.nbytes, 0)) == 0:
                self._registered.append(a)
            else:  # copies then go through a pageable bounce buffer: slower, still correct
                torch.cuda.synchronize(self.device)
                cudart.cudaGetLastError()  # clear the failure, or the next launch reports it
        self.pinned = bool(self._registered) and len(self._registered) == len(self.host.host_buffers())

    # ---- helpers -------------------------------------------------------------------------------
    def _freeze(self, layer: int) -> None:
        slot_array = np.array([self.index.lookup(layer, e) for e in range(self.num_experts)], dtype=np.int64)
        ids = np.arange(self.num_experts, dtype=np.int64)
        self._full[layer] = ExpertPart(self.table, ids, slot_array, self._device_map(ids, slot_array))

    def _device_map(self, ids: np.ndarray, slots: np.ndarray) -> torch.Tensor:
        """int32 ``[num_experts]`` on the device: slot of each expert id in ``ids``, -1 elsewhere."""
        m = np.full(self.num_experts, -1, dtype=np.int32)
        m[ids] = slots
        return torch.from_numpy(m).to(self.device, non_blocking=False)

    def _copy_in(self, slot: int, row: np.ndarray) -> None:
        self.slab[slot].copy_(torch.from_numpy(row), non_blocking=True)
