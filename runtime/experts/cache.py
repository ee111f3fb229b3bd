"""Cache tiers: experts kept resident between forward passes, behind one small interface.

A tier owns a slot table and maps (layer, expert) to slots. The store asks it for hits, claims slots
for misses (a free slot, else the least recently used one not pinned by the request in flight), and
inserts what was read. Host memory is the tier here (:class:`HostCache`); pinned host memory and
device slots are the same interface over other slabs.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Collection
from typing import Protocol

import numpy as np

from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.slots import ExpertSlots, HostSlab


class CacheTier(Protocol):
    name: str  # its row in ExpertStats.TIERS
    table: ExpertSlots
    capacity: int  # slots

    def lookup(self, layer: int, expert: int) -> int | None:
        """The expert's slot if it is cached (and mark it recently used), else None."""
        ...

    def claim(self, pinned: Collection[int]) -> int | None:
        """A slot to read a miss into: a free one, else the least recently used not in ``pinned``
        (evicted); None when every slot is pinned."""
        ...

    def insert(self, layer: int, expert: int, slot: int) -> None:
        """``slot`` now holds the expert (claimed before, filled since)."""
        ...

    def release(self, slot: int) -> None:
        """A claimed slot that was not filled goes back to the free list."""
        ...

    def row(self, slot: int) -> np.ndarray:
        """The slot's bytes, to read into."""
        ...


class SlotIndex:
    """Which (layer, expert) each of ``capacity`` slots holds, least recently used first: the
    bookkeeping of a cache tier over any slab (host memory here, device memory in
    runtime/experts/device.py)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._lru: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot
        self._owner: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert)
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slot 0 first

    def __len__(self) -> int:
        return len(self._lru)

    def lookup(self, layer: int, expert: int) -> int | None:
        slot = self._lru.get((layer, expert))
        if slot is not None:
            self._lru.move_to_end((layer, expert))
        return slot

    def claim(self, pinned: Collection[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for key, slot in self._lru.items():  # oldest first
            if slot not in pinned:
                del self._lru[key]
                del self._owner[slot]
                return slot
        return None

    def insert(self, layer: int, expert: int, slot: int) -> None:
        self._lru[(layer, expert)] = slot
        self._owner[slot] = (layer, expert)

    def release(self, slot: int) -> None:
        self._free.append(slot)


class HostCache(SlotIndex):
    """An LRU of experts in one host slab: ``budget_bytes // file_size`` slots."""

    name = "memory"

    def __init__(self, layout: ExpertLayout, budget_bytes: int) -> None:
        capacity = budget_bytes // layout.file_size
        if capacity < 1:
            raise ValueError(f"cache budget {budget_bytes} bytes holds no {layout.file_size}-byte expert")
        super().__init__(capacity)
        self.slab = HostSlab(layout, capacity)
        self.table = self.slab.table

    @property
    def nbytes(self) -> int:
        """Bytes held by cached experts."""
        return len(self._lru) * self.slab.layout.file_size

    def row(self, slot: int) -> np.ndarray:
        return self.slab.row(slot)
