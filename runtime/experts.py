"""The expert store: routed experts read from their per-expert files on demand.

Reads are ``os.preadv`` calls from a thread pool (pread releases the GIL, so files are read in
parallel) straight into preallocated, 4 KiB-aligned buffers. By default the OS page cache is the
only cache; ``cache_bytes`` adds an in-process LRU cache with that byte budget. Every read is
checked for length, and with ``verify_reads`` also against the manifest's xxh3_128: a short or
corrupt read raises CorruptionError and is never computed on.

Memory is bounded by the read buffers (as many expert files as the largest single ``fetch``, at
most one layer's experts; the model caps a fetch at a byte budget, see ``load_model``) plus the
cache budget, never by the model size. Buffers are reused: evicted cache entries become the next
misses' buffers, so a running cache allocates nothing per token.
"""

from __future__ import annotations

import contextlib
import os
import resource
import time
from collections import OrderedDict
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import (
    EXPERT_ALIGN,
    EXPERT_MANIFEST,
    EXPERT_PROJECTIONS,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
    read_identity,
    read_json,
)
from fmoe.formats.quant import QuantTensor
from fmoe.runtime.preads import pread_into

_PARALLEL_MIN_BYTES = 256 << 10  # expert files at least this big are read in parallel


@dataclass
class ExpertWeights:
    """One expert's SwiGLU matrices (QuantTensor views on a store buffer or a cache entry)."""

    gate: QuantTensor
    up: QuantTensor
    down: QuantTensor


@dataclass
class LayerStats:
    reads: int = 0  # expert files read from disk (page cache or SSD)
    bytes: int = 0  # bytes read from disk
    hits: int = 0  # experts served by the in-process cache
    misses: int = 0  # experts not in the in-process cache (each one a read)
    seconds: float = 0.0  # wall time inside fetch


@dataclass
class ExpertStats:
    """Per-layer read statistics of an ExpertStore."""

    layers: list[LayerStats] = field(default_factory=list)

    def reset(self) -> None:
        self.layers = [LayerStats() for _ in self.layers]

    def summary(self) -> dict[str, Any]:
        """Totals, hit rate, read throughput and the per-layer rows (plain dict, JSON-ready)."""
        total = LayerStats()
        for s in self.layers:
            total.reads += s.reads
            total.bytes += s.bytes
            total.hits += s.hits
            total.misses += s.misses
            total.seconds += s.seconds
        lookups = total.hits + total.misses
        return {
            "reads": total.reads,
            "bytes": total.bytes,
            "hits": total.hits,
            "misses": total.misses,
            "hit_rate": total.hits / lookups if lookups else 0.0,
            "seconds": total.seconds,
            "read_gb_per_s": total.bytes / total.seconds / 1e9 if total.seconds else 0.0,
            "per_layer": [vars(s).copy() for s in self.layers],
        }


@dataclass
class _Slot:
    """A buffer holding one expert file and the QuantTensor views on it."""

    buf: np.ndarray
    weights: ExpertWeights


def _aligned_empty(size: int) -> np.ndarray:
    """A uint8 buffer of ``size`` bytes starting on an EXPERT_ALIGN boundary (O_DIRECT-friendly)."""
    raw = np.empty(size + EXPERT_ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % EXPERT_ALIGN
    return raw[start : start + size]


class ExpertStore:
    """Reads experts of one bit width from ``PACKED/experts-q{bits}/``.

    ``fetch`` returns QuantTensor *views*: they stay valid until the next ``fetch`` call (the
    buffers are reused); the model uses them immediately. Not thread-safe: one caller at a time.
    """

    def __init__(
        self,
        packed_dir: Path | str,
        bits: int,
        cache_bytes: int = 0,
        verify_reads: bool = False,
        io_threads: int | None = None,
        max_open_files: int | None = None,
        parallel_min_bytes: int = _PARALLEL_MIN_BYTES,
    ) -> None:
        self.packed_dir = Path(packed_dir)
        self.bits = bits
        self.verify_reads = verify_reads
        identity, self.config = read_identity(self.packed_dir)
        self.root = self.packed_dir / experts_dirname(bits)
        manifest_path = self.root / EXPERT_MANIFEST
        self.manifest = read_json(
            manifest_path, f"no {bits}-bit experts: run `fmoe repack SOURCE --bits {bits} --out {self.packed_dir}`"
        )
        self.layout = self._check_manifest(manifest_path, identity["model_fingerprint"])
        self._files: dict[str, Any] = self.manifest["files"]
        self.num_layers = self.config.num_hidden_layers
        self.num_experts = self.config.num_experts
        self.stats = ExpertStats([LayerStats() for _ in range(self.num_layers)])

        # Reusable read buffers, each with its views built once (the views are fixed; only the bytes
        # under them change). Without a cache: the pool, grown to the largest fetch. With one: a
        # miss is read into a slot that the cache then owns; evicted slots are recycled, but only
        # from the next fetch on (this fetch's caller may still hold views on them).
        self._pool: list[_Slot] = []
        self._spare: list[_Slot] = []  # evicted before this fetch: free
        self._evicted: list[_Slot] = []  # evicted during this fetch: free from the next one
        self.cache_bytes = int(cache_bytes)
        self._cache: OrderedDict[tuple[int, int], _Slot] = OrderedDict()
        self._cached_bytes = 0
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._max_fds = max_open_files or max(16, min(1024, soft // 2))
        self._threads = io_threads or min(16, (os.cpu_count() or 2) * 2)
        self._parallel_min_bytes = parallel_min_bytes
        self._executor: ThreadPoolExecutor | None = None

    # ---- public --------------------------------------------------------------------------------
    @property
    def pool_bytes(self) -> int:
        """Bytes held by the reusable read buffers (cache entries not included)."""
        return sum(slot.buf.nbytes for slot in (*self._pool, *self._spare, *self._evicted))

    @property
    def cached_bytes(self) -> int:
        return self._cached_bytes

    def fetch(self, layer: int, experts: Sequence[int]) -> dict[int, ExpertWeights]:
        """Read (or take from the cache) the given experts of ``layer``; views valid until the next fetch."""
        t0 = time.perf_counter()
        wanted = list(dict.fromkeys(int(e) for e in experts))  # unique, order kept
        if not 0 <= layer < self.num_layers:
            raise FmoeError(f"expert store: layer {layer} out of range 0..{self.num_layers - 1}")
        for e in wanted:
            if not 0 <= e < self.num_experts:
                raise FmoeError(f"expert store: expert {e} out of range 0..{self.num_experts - 1}")
        stats = self.stats.layers[layer]
        if self._evicted:  # the previous fetch's views are void now
            self._spare += self._evicted
            self._evicted = []
        slots: dict[int, _Slot] = {}
        misses: list[int] = []
        for e in wanted:
            entry = self._cache.get((layer, e)) if self.cache_bytes else None
            if entry is not None:
                self._cache.move_to_end((layer, e))
                slots[e] = entry
                stats.hits += 1
            else:
                misses.append(e)
        stats.misses += len(misses)
        if misses:
            targets = self._targets(len(misses))
            self._read_all(layer, misses, [t.buf for t in targets])
            for e, slot in zip(misses, targets, strict=True):
                slots[e] = slot
                if self.cache_bytes:
                    self._insert(layer, e, slot)
            stats.reads += len(misses)
            stats.bytes += len(misses) * self.layout.file_size
        stats.seconds += time.perf_counter() - t0
        return {e: slots[e].weights for e in wanted}

    def close(self) -> None:
        """Close the open expert files and stop the I/O threads."""
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown may have torn things down
            self.close()

    # ---- reads ---------------------------------------------------------------------------------
    def _targets(self, count: int) -> list[_Slot]:
        """Where missed experts are read to: slots the cache will own (recycled evicted ones first)
        when experts are cached, else the pool's."""
        if self.cache_bytes and self.layout.file_size <= self.cache_bytes:
            return [self._spare.pop() if self._spare else self._slot() for _ in range(count)]
        while len(self._pool) < count:
            self._pool.append(self._slot())
        return self._pool[:count]

    def _slot(self) -> _Slot:
        buf = _aligned_empty(self.layout.file_size)
        return _Slot(buf, self._views(buf))

    def _read_all(self, layer: int, experts: list[int], targets: list[np.ndarray]) -> None:
        fds = [self._fd(layer, e, keep=experts) for e in experts]
        jobs = list(zip(experts, fds, targets, strict=True))
        # Small files are read faster in this thread than handed to the pool (queue + GIL handoffs).
        if len(jobs) == 1 or self._threads == 1 or self.layout.file_size < self._parallel_min_bytes:
            for e, fd, buf in jobs:
                self._read_one(layer, e, fd, buf)
            return
        if self._executor is None:
            self._executor = ThreadPoolExecutor(self._threads, thread_name_prefix="fmoe-io")
        futures = [self._executor.submit(self._read_one, layer, e, fd, buf) for e, fd, buf in jobs]
        errors = [f.exception() for f in futures]
        for exc in errors:
            if exc is not None:
                raise exc

    def _read_one(self, layer: int, expert: int, fd: int, buf: np.ndarray) -> None:
        size = buf.nbytes
        done = pread_into(fd, buf)
        rel = expert_relpath(layer, expert)
        if done != size:
            raise CorruptionError(
                f"{self.root / rel}: short read ({done} of {size} bytes): truncated file; re-run `fmoe repack`"
            )
        if self.verify_reads:
            digest = xxhash.xxh3_128_hexdigest(buf)
            if digest != self._files[rel].get("xxh3_128"):
                raise CorruptionError(
                    f"{self.root / rel}: xxh3_128 mismatch (corrupt expert file); re-run `fmoe repack`"
                )

    def _fd(self, layer: int, expert: int, keep: list[int]) -> int:
        key = (layer, expert)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        path = self.root / expert_relpath(layer, expert)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FmoeError(f"{path}: missing expert file (re-run `fmoe repack --bits {self.bits}`)") from None
        size = os.fstat(fd).st_size
        if size > self.layout.file_size:  # a shorter file fails its read's length check
            os.close(fd)
            raise CorruptionError(
                f"{path}: {size} bytes, longer than the {self.layout.file_size} of its layout (replaced or "
                f"corrupt); re-run `fmoe repack`"
            )
        self._fds[key] = fd
        if len(self._fds) > self._max_fds:  # bound the open descriptors; never close one this fetch needs
            keep_keys = {(layer, e) for e in keep}
            for old in [k for k in self._fds if k not in keep_keys][: len(self._fds) - self._max_fds]:
                os.close(self._fds.pop(old))
        return fd

    # ---- cache ---------------------------------------------------------------------------------
    def _insert(self, layer: int, expert: int, slot: _Slot) -> None:
        if slot.buf.nbytes > self.cache_bytes:
            return
        self._cache[(layer, expert)] = slot
        self._cached_bytes += slot.buf.nbytes
        while self._cached_bytes > self.cache_bytes:
            _, old = self._cache.popitem(last=False)  # least recently used
            self._cached_bytes -= old.buf.nbytes
            self._evicted.append(old)

    # ---- views ---------------------------------------------------------------------------------
    def _views(self, buf: np.ndarray) -> ExpertWeights:
        tensors = self.layout.decode(buf)
        return ExpertWeights(*(tensors[proj] for proj in EXPERT_PROJECTIONS))

    # ---- manifest ------------------------------------------------------------------------------
    def _check_manifest(self, path: Path, fingerprint: str) -> ExpertLayout:
        m = self.manifest
        if m.get("format") != "fmoe-experts":
            raise FmoeError(f"{path}: not an fmoe expert manifest")
        if m.get("model_fingerprint") != fingerprint:
            raise FmoeError(
                f"{path}: model_fingerprint {m.get('model_fingerprint')} belongs to another model "
                f"(fmoe.json says {fingerprint}); re-run `fmoe repack --bits {self.bits}`"
            )
        if m.get("bits") != self.bits:
            raise FmoeError(f"{path}: holds {m.get('bits')}-bit experts, expected {self.bits}")
        cfg = self.config
        if m.get("num_layers") != cfg.num_hidden_layers or m.get("num_experts") != cfg.num_experts:
            raise FmoeError(
                f"{path}: {m.get('num_layers')} layers x {m.get('num_experts')} experts, the config has "
                f"{cfg.num_hidden_layers} x {cfg.num_experts}"
            )
        layout = ExpertLayout.for_config(cfg, self.bits, int(m.get("group_size", 64)))
        got = {"file_size": m.get("file_size"), "components": m.get("components")}
        want = {"file_size": layout.file_size, "components": {k: c.to_dict() for k, c in layout.components.items()}}
        if got != want:
            raise FmoeError(f"{path}: expert file layout does not match the config (written by another fmoe version?)")
        files = m.get("files")
        if not isinstance(files, dict):
            raise FmoeError(f"{path}: no 'files' table")
        for layer in range(cfg.num_hidden_layers):
            for e in range(cfg.num_experts):
                rel = expert_relpath(layer, e)
                entry = files.get(rel)
                if entry is None or entry.get("size") != layout.file_size:
                    raise FmoeError(f"{path}: {rel} is not listed with size {layout.file_size} (incomplete repack)")
        return layout
