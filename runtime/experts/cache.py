"""Cache tiers: experts kept resident between forward passes, behind one small interface.

A tier owns a slot table and maps (layer, expert) to slots. The store asks it for hits, claims slots
for misses (a free slot, else one its replacement policy evicts, never one pinned by the request in
flight), and inserts what was read. Host memory is the tier here (:class:`HostCache`); pinned host memory and
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
        """A slot to read a miss into: a free one, else the one the policy evicts among those not in
        ``pinned``; None when every slot is pinned."""
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


POLICIES = ("lru", "slru")


class SlotIndex:
    """Which (layer, expert) each of ``capacity`` slots holds, and which to evict: the bookkeeping of a
    cache tier over any slab (host memory here, device memory in runtime/experts/device.py).

    ``policy``: "lru" evicts the least recently used; "slru" (segmented LRU, the default) keeps
    experts hit at least twice in a protected segment of ``protected`` of the slots and evicts from
    the probation segment (experts seen once) first, so a burst of one-off experts cannot flush the
    popular ones. Both are O(1) a lookup. Chosen by measurement: scripts/cache_policy.py replays
    uniform, Zipf and recorded routing through both (docs/PERFORMANCE.md)."""

    def __init__(self, capacity: int, policy: str = "slru", protected: float = 0.8) -> None:
        if policy not in POLICIES:
            raise ValueError(f"cache policy {policy!r}: must be one of {', '.join(POLICIES)}")
        self.capacity = capacity
        self.policy = policy
        self._protected_cap = int(capacity * protected) if policy == "slru" else 0
        self._probation: OrderedDict[tuple[int, int], int] = OrderedDict()  # (layer, expert) -> slot, LRU first
        self._protected: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._owner: dict[int, tuple[int, int]] = {}  # slot -> (layer, expert)
        self._free = list(range(capacity - 1, -1, -1))  # popped from the end: slot 0 first

    def __len__(self) -> int:
        return len(self._probation) + len(self._protected)

    def lookup(self, layer: int, expert: int) -> int | None:
        key = (layer, expert)
        slot = self._protected.get(key)
        if slot is not None:
            self._protected.move_to_end(key)
            return slot
        slot = self._probation.get(key)
        if slot is None:
            return None
        if self._protected_cap == 0:  # plain LRU: one segment
            self._probation.move_to_end(key)
            return slot
        del self._probation[key]  # a second hit: protected; its overflow goes back on probation
        self._protected[key] = slot
        if len(self._protected) > self._protected_cap:
            old, old_slot = self._protected.popitem(last=False)
            self._probation[old] = old_slot
        return slot

    def claim(self, pinned: Collection[int]) -> int | None:
        if self._free:
            return self._free.pop()
        for segment in (self._probation, self._protected):  # oldest first
            for key, slot in segment.items():
                if slot not in pinned:
                    del segment[key]
                    del self._owner[slot]
                    return slot
        return None

    def insert(self, layer: int, expert: int, slot: int) -> None:
        self._probation[(layer, expert)] = slot
        self._owner[slot] = (layer, expert)

    def release(self, slot: int) -> None:
        self._free.append(slot)


class HostCache(SlotIndex):
    """A cache of experts in one host slab: ``budget_bytes // file_size`` slots, SlotIndex's policy."""

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
        return len(self) * self.slab.layout.file_size

    def row(self, slot: int) -> np.ndarray:
        return self.slab.row(slot)
