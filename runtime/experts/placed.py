"""Experts at fixed homes: device slots, or page-locked host memory that the kernels read in place.

The device cache (device.py) copies each miss over the link into a slot before the expert kernels
run: every layer waits for its routing to come back to the host, for the cache's bookkeeping and for
the copies, and the link idles meanwhile. When device memory and page-locked host memory together
hold every expert, none of that is needed. :class:`PlacedExperts` gives each expert a *home*, a
device slot or a row of a host slab, and the expert kernels read the host-homed ones over the link
themselves (zero-copy; runtime/kernels/triton_moe.py, slots ``-2 - row``). Every layer is then all
resident: routing never leaves the device, and a decode step is one CUDA graph.

Homes follow the routing. The backend adds each layer's routed choices to a device counter (the
part's ``routed_counts``); :meth:`maintain`, called after every forward pass, queues their read into
page-locked memory and takes in the pass before's (the statistics: experts served from the device,
experts read over the link), so that nothing waits for the device and decode steps can be queued
ahead; now and then it swaps the host-homed experts routed to most with the device-homed ones routed
to least, on frequencies halved at each rebalance so that homes follow the recent routing, at a
bounded number of swaps per routed choice. A swap is three
copies on the compute stream between passes (host row to a device buffer, the device slot to the
host row, the buffer to the slot) and the layer's map row, so no kernel ever reads a half-moved
expert.

Host rows may hold another width than the device slots (``host_layout``, ``--host-bits 2``): the
host-homed experts' 2-bit files cross the link, 56% of the 4-bit ones' bytes, for the 2-bit
files' error on the share of routed choices they get (docs/QUALITY.md), which is smallest when the
least routed experts are the ones on the host. The parts then carry two maps, device slots
(host-homed experts -1: not here) and host rows in the other format (device-homed experts -1), and
the backend runs the expert kernels once for each. A swap then needs each expert's file of the other
width: the provider's ``files`` reads them on a thread of its own into a page-locked pool allocated
up front (that thread makes no CUDA call: one while a graph is being captured would void the
capture), and a later :meth:`maintain` queues the swap's copies on the compute stream (the host row's
new bytes go through a device buffer, so that they land after the kernels that read its old ones);
the pool is refilled only once those copies have run. Without ``files`` homes stay where they were
placed.

With :meth:`PlacedExperts.share_with_host` (``--host-compute``) host workers compute a share of each
decode token's host-homed experts from the same rows while the device reads the others
(cocompute_device.py); the parts carry it, and the jobs handed over come back with the counters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.homes import REBALANCE_CHOICES, SWAPS_PER_CHOICE, host_row_slot, initial_homes, plan_swaps
from fmoe.runtime.experts.page_lock import page_lock
from fmoe.runtime.experts.slots import DeviceSlots, ExpertPart, ExpertSlots
from fmoe.runtime.experts.stats import TIERS, ExpertStats

if TYPE_CHECKING:
    from fmoe.runtime.experts.cocompute_device import DeviceCoCompute

KEPT_PASSES = 4  # passes whose own statistics are kept for :meth:`PlacedExperts.pass_stats` (a step's collect)
SWAPS_IN_FLIGHT = 16  # two widths: the most swaps whose files are read at once (their page-locked pool)


class HomeFiles(Protocol):
    """The expert files a home of either width takes (two widths: a swap's bytes)."""

    def read_into(self, layer: int, expert: int, on_device: bool, buf: np.ndarray) -> None:
        """Fill ``buf`` with the expert's file in a device slot's width (``on_device``) or a host
        row's, checked."""
        ...

    def close(self) -> None: ...


class PlacedExperts:
    """Every expert of ``num_layers`` x ``num_experts`` at a home: ``capacity`` device slots (split
    evenly over the layers, each layer's first experts at the start), the rest in rows of ``host``
    (uint8 ``[R, file_size]``: page-locked here when the device is CUDA). With fewer host rows than
    host-homed experts (a synthetic model's slab), experts share rows in turn: the bytes each read
    moves are real, their values are not.

    Fill the device slab with :meth:`fill_device` (or write ``slab`` directly) and the host rows
    before the first pass."""

    host_reads = "direct"  # what `fmoe bench` reports (--host-reads)

    def __init__(
        self,
        layout: ExpertLayout,
        num_layers: int,
        num_experts: int,
        capacity: int,
        device: torch.device | str,
        host: np.ndarray,
        *,
        host_layout: ExpertLayout | None = None,
        files: HomeFiles | None = None,
        every: int = REBALANCE_CHOICES,
        swap_rate: float = SWAPS_PER_CHOICE,
    ) -> None:
        total = num_layers * num_experts
        if not 0 <= capacity <= total:
            raise FmoeError(f"placed experts: {capacity} device slots for {total} experts")
        host_layout = layout if host_layout is None else host_layout
        if host.dtype != np.uint8 or host.ndim != 2 or host.shape[1] != host_layout.file_size:
            raise FmoeError(f"placed experts: the host slab must be uint8 [rows, {host_layout.file_size}]")
        if capacity < total and host.shape[0] < 1:
            raise FmoeError("placed experts: experts left for the host, but the host slab has no rows")
        self.layout, self.host_layout = layout, host_layout
        # two widths at work only where some experts live in host rows (else one launch a layer as before)
        widths_differ = host_layout.file_size != layout.file_size or host_layout.bits != layout.bits
        self.mixed = widths_differ and capacity < total
        self.num_layers, self.num_experts = num_layers, num_experts
        self.device = torch.device(device)
        self.every, self.swap_rate = every, swap_rate
        self.slab = torch.empty((max(capacity, 1), layout.file_size), dtype=torch.uint8, device=self.device)
        self.host = host
        self.host_tensor = torch.from_numpy(host)
        self._unpin: Callable[[], Any] = lambda: None
        if self.device.type == "cuda":
            self._page_lock()
        self.table = DeviceSlots(
            self.slab, layout, host=self.host_tensor, host_layout=host_layout if self.mixed else None
        )
        self._stats = ExpertStats.zeros(num_layers)
        self.swaps = 0  # experts moved to the device by rebalancing (as many moved back)
        self.home = initial_homes(num_layers, num_experts, capacity, host.shape[0])  # int64 [layers, experts]
        cuda = self.device.type == "cuda"
        self._map = torch.from_numpy(self.home.astype(np.int32)).to(self.device)
        # two widths: the device slots alone and the host rows alone (each -1 for the other's experts)
        self._split_maps = (
            tuple(torch.from_numpy(m.astype(np.int32)).to(self.device) for m in _split(self.home))
            if self.mixed
            else None
        )
        self._counts = torch.zeros((num_layers, num_experts), dtype=torch.int32, device=self.device)
        # the last pass's counters, read back without waiting: taken in at the next maintain or stats
        self._counts_read = torch.zeros((num_layers, num_experts), dtype=torch.int32, pin_memory=cuda)
        self._counts_ready = torch.cuda.Event() if cuda else None
        self._counts_pending, self._counted_on_device = False, self.home >= 0
        self.passes = 0  # forward passes maintained; the pending counters are the last one's
        self._pass_stats: dict[int, ExpertStats] = {}  # the last few passes' own statistics, by number
        self._window = np.zeros((num_layers, num_experts), dtype=np.int64)  # choices since the last rebalance
        self._freq = np.zeros((num_layers, num_experts), dtype=np.float64)
        self._buffer: torch.Tensor | None = None  # a swap's device staging row (a host row's bytes)
        # two widths: the other width's files for swaps, read by a thread of their own
        self._files = files if self.mixed else None
        if files is not None and not self.mixed:
            files.close()  # (one width at work: no swap needs the other's files)
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="fmoe-homes") if self._files is not None else None
        self._fetching: Future[list[tuple[int, int, int]]] | None = None
        # each swap's files (to a slot, to a row), allocated here: the reader thread makes no CUDA call
        self._pool: list[tuple[torch.Tensor, torch.Tensor]] = []
        self._pool_free = torch.cuda.Event() if cuda and self._files is not None else None  # after their copies
        if self._files is not None:
            self._pool = [
                (
                    torch.empty(layout.file_size, dtype=torch.uint8, pin_memory=cuda),
                    torch.empty(host_layout.file_size, dtype=torch.uint8, pin_memory=cuda),
                )
                for _ in range(SWAPS_IN_FLIGHT)
            ]
        self.cocompute: DeviceCoCompute | None = None  # the host's share of decode's host-homed experts
        self._parts = [self._part(i) for i in range(num_layers)]

    def share_with_host(self, share: float | None, threads: int, int8: bool = False) -> float:
        """Let ``threads`` host workers compute ``share`` of each decode token's host-homed choices a
        layer (rounded; None: as measured now, the host's expert rate over its own and the link's)
        from the host rows, while the device reads the others (runtime/experts/cocompute_device.py);
        ``int8``: the workers round activations to int8 (as ``--int8-dot``). Returns the share."""
        if self.fully_resident:
            raise FmoeError("--host-compute: every expert fits the device; nothing is left on the host")
        from fmoe.runtime.experts.cocompute_device import DeviceCoCompute

        if self.cocompute is not None:
            self.cocompute.close()
        self.cocompute = DeviceCoCompute(
            self.host, self.host_layout, self.num_layers, self.num_experts, self.device, share or 0.0, threads, int8
        )
        if share is None:
            self.cocompute.share.fill_(self.cocompute.measured_share())
        self._parts = [self._part(i) for i in range(self.num_layers)]
        return float(self.cocompute.share.item())

    @property
    def host_share(self) -> float | None:
        """The share of each decode layer's host-homed choices the host computes (set or measured), or
        None when it computes none (``--host-compute`` off)."""
        return None if self.cocompute is None else float(self.cocompute.share.item())

    def stop_sharing(self) -> None:
        """The device reads every host-homed choice again (the host's workers stopped)."""
        if self.cocompute is not None:
            self.cocompute.close()
            self.cocompute = None
            self._parts = [self._part(i) for i in range(self.num_layers)]

    # ---- provider ------------------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Device slots."""
        return int((self.home >= 0).sum())

    @property
    def cache_bytes(self) -> int:
        return self.capacity * self.layout.file_size

    @property
    def bits(self) -> int:
        return self.layout.bits

    @property
    def host_bits(self) -> int | None:
        """The host rows' width where it is not the device slots' (``--host-bits``), else None."""
        return self.host_layout.bits if self.mixed else None

    @property
    def fully_resident(self) -> bool:
        """Every expert in device memory (no host rows read)."""
        return bool((self.home >= 0).all())

    def all_resident(self, layer: int) -> ExpertPart:
        """Every expert of ``layer``, wherever its home: one part, its slot map on the device."""
        return self._parts[layer]

    def resident(self, layer: int, experts: np.ndarray) -> Iterator[ExpertPart]:
        """The layer's one part, whichever experts are asked for (every one has a home)."""
        yield self._parts[layer]

    @property
    def stats(self) -> ExpertStats:
        """Experts served from each tier, up to the last pass maintained (waits for that pass)."""
        self._take_in()
        return self._stats

    def maintain(self) -> None:
        """After a forward pass: the pass before's routed experts into the statistics, a rebalance
        once ``every`` choices a layer have been routed since the last, and this pass's counters
        queued for reading (into page-locked memory: nothing waits for the device here)."""
        self._take_in()
        self._counts_read.copy_(self._counts, non_blocking=True)
        self._counts.zero_()
        if self.cocompute is not None:
            self.cocompute.queue_read()
        self.passes += 1
        self._counts_pending, self._counted_on_device = True, self.home >= 0  # (the homes this pass read)
        self._swap_fetched()  # (two widths: the swaps whose files are in)
        choices = self._window.sum() / self.num_layers
        if choices >= self.every and (not self.mixed or self._files is not None):
            self.rebalance(int(choices * self.swap_rate))
        if self._counts_ready is not None:
            self._counts_ready.record()

    def pass_stats(self, number: int) -> ExpertStats:
        """The statistics of the pass maintained as ``number`` (``passes`` right after it): waits for
        its counters if they are the ones pending, never for a later pass's (a step queued ahead keeps
        running); zeros for a pass that routed nothing or is too old to be kept."""
        if self._counts_pending and number >= self.passes:
            self._take_in()
        return self._pass_stats.pop(number, None) or ExpertStats.zeros(self.num_layers)

    def _take_in(self) -> None:
        """The counters of the pass last maintained, once read back, into the statistics and the
        rebalancing window."""
        if not self._counts_pending:
            return
        self._counts_pending = False
        if self._counts_ready is not None:
            self._counts_ready.synchronize()
        counts = self._counts_read.numpy().astype(np.int64)
        computed = None if self.cocompute is None else self.cocompute.take_in()
        if not counts.any():
            return
        # statistics by distinct expert a layer, as the other tiers count (a prefill reads each once)
        routed, on_device = counts > 0, self._counted_on_device
        hits, reads = (routed & on_device).sum(axis=1), (routed & ~on_device).sum(axis=1)
        own = ExpertStats.zeros(self.num_layers)
        own.requested += hits + reads
        if computed is not None:  # of the host-homed ones, computed by the host (not read over the link)
            own.host_computed += computed
        sizes = (("device", hits, self.layout.file_size), ("memory", reads, self.host_layout.file_size))
        for tier, n, size in sizes:  # every layer at once (no per-layer record calls)
            t = TIERS.index(tier)
            own.served[:, t] += n
            own.bytes[:, t] += n * size
        self._stats += own
        self._pass_stats = {n: s for n, s in self._pass_stats.items() if n > self.passes - KEPT_PASSES}
        self._pass_stats[self.passes] = own
        self._window += counts

    def rebalance(self, max_swaps: int) -> int:
        """Swap the host-homed experts routed to most with the device-homed ones routed to least, up
        to ``max_swaps`` (largest gains first); returns the number of swaps planned. With two widths
        their files are read first, and a later :meth:`maintain` swaps them."""
        if self.mixed and self._files is None:
            raise FmoeError("placed experts: homes of two widths move only with the other width's files")
        if self._reader is not None:
            if self._fetching is not None or (self._pool_free is not None and not self._pool_free.query()):
                return 0  # (the pool is busy: at a later pass)
            max_swaps = min(max_swaps, len(self._pool))
        self._freq = self._freq / 2 + self._window
        self._window[:] = 0
        moved = plan_swaps(self.home, self._freq, max_swaps)
        if self._reader is not None:
            if moved:
                self._fetching = self._reader.submit(self._fetch, moved)
            return len(moved)
        for layer, a, b in moved:
            self._swap(layer, a, b)
        self._upload_maps({m[0] for m in moved})
        return len(moved)

    def settle(self) -> None:
        """Wait for swaps being read (two widths) and queue them."""
        if self._fetching is not None:
            self._fetching.result()
            self._swap_fetched()

    def place(self, layer: int, part: ExpertPart) -> None:
        """Copy the experts of a host ``part`` of ``layer`` (a store's reads) to their homes; with two
        widths, each expert's file must be its home's width (:meth:`homed_on_device`)."""
        if not isinstance(part.table, ExpertSlots) or part.table.slab is None:
            raise FmoeError("placed experts: a part to place must be rows of a host slab")
        size = part.table.slab.shape[1]
        for e, src in zip(part.ids.tolist(), part.slots.tolist(), strict=True):
            home, data = int(self.home[layer, e]), part.table.slab[src]
            want = self.layout if home >= 0 else self.host_layout
            if size != want.file_size:
                where = "a device slot" if home >= 0 else "a host row"
                raise FmoeError(f"placed experts: layer {layer} expert {e} needs its {want.bits}-bit file for {where}")
            if home >= 0:
                self.slab[home].copy_(torch.from_numpy(data))
            else:
                self.host[host_row_slot(home)] = data

    def homed_on_device(self, layer: int) -> np.ndarray:
        """Whether each expert of ``layer`` lives in a device slot (bool ``[experts]``)."""
        return self.home[layer] >= 0

    def fill_device(self, generator: Any = None) -> None:
        """Random expert files in every device slot (a synthetic model; runtime/synthetic.py)."""
        from fmoe.runtime.synthetic import fill_random_experts

        fill_random_experts(self.slab, self.layout, generator)

    def close(self) -> None:
        """Unpin the host slab (before its memory can be unmapped and reused: the driver would take the
        new pages for the old ones); also done when the store is collected. Stops the swaps' reader."""
        if self._reader is not None:
            self._reader.shutdown(wait=True, cancel_futures=True)
            self._reader = self._fetching = None
        if self._files is not None:
            self._files.close()
            self._files = None
        if self.cocompute is not None:
            self.cocompute.close()
            self.cocompute = None
        self._unpin()

    # ---- helpers -------------------------------------------------------------------------------
    def _page_lock(self) -> None:
        """Page-lock the host slab: the kernels can read only page-locked host memory."""
        if self.host.size == 0:
            return
        unpin = page_lock(self, self.host, self.device)
        if unpin is None:
            raise FmoeError(
                f"--host-reads direct: could not page-lock {self.host.nbytes / 1e9:.1f} GB of host memory for the "
                "experts that live there (too little memory, or a locked-memory limit: ulimit -l); use fewer, or "
                "--host-reads copy"
            )
        self._unpin = unpin

    def _swap(self, layer: int, a: int, b: int) -> None:
        """Host-homed expert ``a`` to the slot of device-homed ``b``, ``b`` to ``a``'s host row."""
        row, slot = int(host_row_slot(self.home[layer, a])), int(self.home[layer, b])
        staging = self._staging()
        # one stream, in order: a's bytes leave the row before b's overwrite it, and b's leave the
        # slot before a's do; the kernels of the next pass are queued after all three
        staging.copy_(self.host_tensor[row], non_blocking=True)
        self.host_tensor[row].copy_(self.slab[slot], non_blocking=True)
        self.slab[slot].copy_(staging)
        self.home[layer, a], self.home[layer, b] = slot, host_row_slot(row)
        self.swaps += 1

    def _fetch(self, moved: list[tuple[int, int, int]]) -> list[tuple[int, int, int]]:
        """(The reader's thread: files and memory only, no CUDA call.) Swap i's files into pool entry i:
        the expert moving in at a device slot's width, the one moving out at a host row's."""
        assert self._files is not None
        for (layer, a, b), (into_slot, into_row) in zip(moved, self._pool, strict=False):
            self._files.read_into(layer, a, True, into_slot.numpy())
            self._files.read_into(layer, b, False, into_row.numpy())
        return moved

    def _swap_fetched(self) -> None:
        """Two widths: the swaps whose files have been read, queued (a reader's error surfaces here)."""
        if self._fetching is None or not self._fetching.done():
            return
        fetched, self._fetching = self._fetching.result(), None
        staging, cuda = self._staging(), self.device.type == "cuda"
        for (layer, a, b), (into_slot, into_row) in zip(fetched, self._pool, strict=False):
            row, slot = int(host_row_slot(self.home[layer, a])), int(self.home[layer, b])
            # on the compute stream, after every kernel queued so far: a's bytes into b's slot, and b's
            # host-width bytes into a's row through a device buffer (a host write would not wait for them)
            self.slab[slot].copy_(into_slot, non_blocking=cuda)
            staging.copy_(into_row, non_blocking=cuda)
            self.host_tensor[row].copy_(staging, non_blocking=cuda)
            self.home[layer, a], self.home[layer, b] = slot, host_row_slot(row)
            self.swaps += 1
        if self._pool_free is not None:
            self._pool_free.record()
        self._upload_maps({f[0] for f in fetched})

    def _staging(self) -> torch.Tensor:
        """A device row for a host row's bytes on their way (made once)."""
        if self._buffer is None:
            self._buffer = torch.empty(self.host_layout.file_size, dtype=torch.uint8, device=self.device)
        return self._buffer

    def _upload_maps(self, layers: set[int]) -> None:
        """The device maps of ``layers`` from their homes, queued (from fresh page-locked rows on CUDA,
        which torch's allocator keeps until their copies have run)."""
        cuda = self.device.type == "cuda"
        for layer in sorted(layers):
            rows = [self.home[layer]]
            targets = [self._map[layer]]
            if self._split_maps is not None:
                rows += _split(self.home[layer])
                targets += [m[layer] for m in self._split_maps]
            for row, target in zip(rows, targets, strict=True):
                src = torch.from_numpy(row.astype(np.int32))
                target.copy_(src.pin_memory() if cuda else src, non_blocking=cuda)
            self._parts[layer] = self._part(layer)

    def _part(self, layer: int) -> ExpertPart:
        """The layer's one part over its current homes."""
        ids = np.arange(self.num_experts, dtype=np.int64)
        cocompute = None if self.cocompute is None else (self.cocompute, layer)
        if self._split_maps is None:
            return ExpertPart(
                self.table, ids, self.home[layer].copy(), self._map[layer], routed_counts=self._counts[layer],
                cocompute=cocompute,
            )  # fmt: skip
        on_device, on_host = (m[layer] for m in self._split_maps)
        return ExpertPart(
            self.table, ids, self.home[layer].copy(), on_device, host_slots=on_host, routed_counts=self._counts[layer],
            cocompute=cocompute,
        )  # fmt: skip


def _split(home: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``home`` as device slots alone and host rows alone, -1 (not here) for the other's experts."""
    return np.where(home >= 0, home, -1), np.where(home <= -2, home, -1)
