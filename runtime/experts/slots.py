"""Slot tables: where resident experts are for the MoE op.

A slot table holds, per projection (gate, up, down), the experts' quantised matrices stacked along a
leading slot axis; an :class:`ExpertPart` says which expert ids sit in which slots of one table. A
:class:`HostSlab` is a table over one 4 KiB-aligned host buffer of expert files side by side, so an
expert is made resident by one ``pread`` into its slot's row and the stacked views cost nothing.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.formats.packed import EXPERT_ALIGN, ExpertLayout
from fmoe.formats.quant import QuantTensor


@dataclass(frozen=True)
class ExpertWeights:
    """One expert's SwiGLU matrices."""

    gate: QuantTensor  # [moe_inter, hidden]
    up: QuantTensor  # [moe_inter, hidden]
    down: QuantTensor  # [hidden, moe_inter]


@dataclass(frozen=True)
class ExpertSlots:
    """Per projection, matrices stacked along a leading slot axis: ``gate.weight [S, inter, ...]``.

    A table over a slab of expert files also gives the slab (uint8 ``[S, file_size]``) and its
    layout, so that kernels can read every expert of a part in one pass."""

    gate: QuantTensor
    up: QuantTensor
    down: QuantTensor
    slab: np.ndarray | None = None
    layout: ExpertLayout | None = None

    @property
    def num_slots(self) -> int:
        return int(self.gate.weight.shape[0])

    def expert(self, slot: int) -> ExpertWeights:
        """Views of one slot's matrices."""
        return ExpertWeights(*(_slot(qt, slot) for qt in (self.gate, self.up, self.down)))

    @classmethod
    def stack(cls, experts: Sequence[ExpertWeights]) -> ExpertSlots:
        """A table holding copies of ``experts`` in slots ``0 .. len - 1`` (in-memory sources, tests)."""
        gate, up, down = (_stack([getattr(e, p) for e in experts]) for p in ("gate", "up", "down"))
        return cls(gate, up, down)


@dataclass(frozen=True)
class DeviceSlots:
    """Expert files side by side in a device buffer: ``slab`` is a backend's uint8 array
    ``[S, file_size]`` (runtime/experts/device.py), read by the device kernels at ``layout``'s offsets.

    ``host``: more expert files in page-locked host memory (uint8 ``[R, file_size]``) that the device
    kernels read over the link in place; a part's slot ``-2 - r`` is its row r (runtime/experts/
    placed.py). Slot -1 is an expert computed elsewhere. ``host_layout``: the host rows' format
    where it is not ``layout`` (``--host-bits``; the parts then say where each width's experts are)."""

    slab: Any
    layout: ExpertLayout
    host: Any = None
    host_layout: ExpertLayout | None = None


@dataclass(frozen=True)
class ExpertPart:
    """Experts ``ids[i]`` resident in slot ``slots[i]`` of ``table``. A part on a device also has
    ``device_slots``: the slot of every expert id of the layer as a device int array (-1 where the
    expert is not in the part), so that routing maps to slots without leaving the device."""

    table: ExpertSlots | DeviceSlots
    ids: np.ndarray  # int64 [n]
    slots: np.ndarray  # int64 [n]
    device_slots: Any = None
    # a host part a device tier hands over to be computed on the host: the device event after which
    # the step's inputs may be read back (recorded before the tier queued its copies)
    ready: Any = None
    # a device part whose provider follows the routing without reading it back: a device int32
    # [num_experts] counter the backend adds each routed choice to (runtime/experts/placed.py)
    routed_counts: Any = None
    # with host rows of another width (the table's host_layout): each expert's host row (-2 - r) as a
    # device int array, -1 for the experts in device_slots (which then holds -1 for these)
    host_slots: Any = None
    # a device part whose host rows' experts the host may compute in decode: (DeviceCoCompute, layer)
    # (runtime/experts/cocompute_device.py)
    cocompute: Any = None

    def __len__(self) -> int:
        return len(self.ids)

    def experts(self) -> Iterator[tuple[int, ExpertWeights]]:
        """(expert id, its matrices) for each expert of a host part."""
        if not isinstance(self.table, ExpertSlots):
            raise TypeError("ExpertPart.experts: a device part has no host matrices")
        for e, s in zip(self.ids.tolist(), self.slots.tolist(), strict=True):
            yield e, self.table.expert(s)


class HostSlab:
    """``count`` expert files side by side in one 4 KiB-aligned uint8 buffer ``[count, file_size]``.

    The buffer is reserved at once but the OS commits its pages only when a slot is first written, so
    an unused slot costs address space, not memory."""

    def __init__(self, layout: ExpertLayout, count: int) -> None:
        if count < 1:
            raise ValueError("a slab needs at least one slot")
        self.layout = layout
        self.count = count
        self.data = _anonymous_pages(count * layout.file_size).reshape(count, layout.file_size)
        views = {p.removesuffix("_proj"): qt for p, qt in layout.decode_stacked(self.data).items()}
        self.table = ExpertSlots(**views, slab=self.data, layout=layout)

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def row(self, slot: int) -> np.ndarray:
        """The writable bytes of one slot (a read target)."""
        return self.data[slot]


def _slot(qt: QuantTensor, slot: int) -> QuantTensor:
    return QuantTensor(qt.weight[slot], qt.scales[slot], qt.biases[slot], qt.bits, qt.group_size)


def _stack(qts: Sequence[QuantTensor]) -> QuantTensor:
    first = qts[0]
    return QuantTensor(
        np.stack([q.weight for q in qts]),
        np.stack([q.scales for q in qts]),
        np.stack([q.biases for q in qts]),
        first.bits,
        first.group_size,
    )


def _anonymous_pages(size: int) -> np.ndarray:
    """A uint8 buffer of ``size`` bytes on fresh anonymous pages (page-aligned, so O_DIRECT-friendly).

    Not numpy's allocator: for large arrays numpy asks the kernel for transparent huge pages, and
    first-touching a slab of them stalled now and then on memory compaction (0.6 s for 452 MB,
    measured, against 0.2 s on plain pages), right inside the first long prefill."""
    buf = np.frombuffer(mmap.mmap(-1, size), dtype=np.uint8)
    assert buf.ctypes.data % EXPERT_ALIGN == 0
    return buf
