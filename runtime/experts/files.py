"""The expert files of one bit width: ``pread`` an expert into a buffer, every read length-checked
and checked against the manifest's xxh3_128 as ``checks`` says: "first-read" (the default: each
file the first time this process reads it; hashing runs at about 20 GB/s, far above any disk, and
later reads come from a file already proven), "every-read", or "off". A short or corrupt read
raises CorruptionError and is never computed on.

Descriptors are opened on demand (regular files only: a FIFO or device in an expert's place is
refused, never read) and kept in a bounded LRU, so a hot expert costs one syscall per read. ``open``
runs in the caller's thread; ``read_into`` may run in I/O threads (pread releases the GIL).
"""

from __future__ import annotations

import os
import resource
from collections import OrderedDict
from collections.abc import Set
from pathlib import Path

import numpy as np
import xxhash

from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.expert_manifest import ExpertManifest
from fmoe.formats.packed import expert_relpath
from fmoe.fsutil import open_regular
from fmoe.runtime.experts.mapped import MappedSlab
from fmoe.runtime.preads import pread_into

CHECKS = ("first-read", "every-read", "off")
IO_MODES = ("pread", "mmap")


class ExpertFiles:
    def __init__(
        self,
        manifest: ExpertManifest,
        *,
        checks: str = "first-read",
        io: str = "pread",
        max_open_files: int | None = None,
    ):
        if checks not in CHECKS:
            raise FmoeError(f"--checks {checks!r}: must be one of {', '.join(CHECKS)}")
        if io not in IO_MODES:
            raise FmoeError(f"--io {io!r}: must be one of {', '.join(IO_MODES)}")
        self.io = io
        self.manifest = manifest
        self.root = manifest.path.parent
        self.layout = manifest.layout
        self.checks = checks
        self._proven: set[tuple[int, int]] = set()  # files whose bytes matched their xxh3_128 in this process
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._max_fds = max_open_files or max(16, min(1024, soft // 2))

    @property
    def file_size(self) -> int:
        return self.layout.file_size

    def path(self, layer: int, expert: int) -> Path:
        return self.root / expert_relpath(layer, expert)

    def open(self, layer: int, expert: int, keep: Set[int] = frozenset()) -> int:
        """A descriptor of the expert's file; never closes one of ``keep`` (this layer's in-flight reads)."""
        key = (layer, expert)
        fd = self._fds.get(key)
        if fd is not None:
            self._fds.move_to_end(key)
            return fd
        path = self.path(layer, expert)
        fd = open_regular(path, f"an expert file; re-run `fmoe repack --bits {self.manifest.bits}`")
        size = os.fstat(fd).st_size
        if size > self.file_size:  # a shorter file fails its read's length check
            os.close(fd)
            raise CorruptionError(
                f"{path}: {size} bytes, longer than the {self.file_size} of its layout (replaced or corrupt); "
                "re-run `fmoe repack`"
            )
        self._fds[key] = fd
        excess = len(self._fds) - self._max_fds
        if excess > 0:  # close the least recently used, oldest first
            stale = []
            for k in self._fds:
                if not (k[0] == layer and k[1] in keep):
                    stale.append(k)
                    if len(stale) == excess:
                        break
            for old in stale:
                os.close(self._fds.pop(old))
        return fd

    def read_into(self, layer: int, expert: int, fd: int, buf: np.ndarray) -> None:
        """Fill ``buf`` (``file_size`` bytes) with the expert's file, checked."""
        done = pread_into(fd, buf)
        if done != buf.nbytes:
            raise CorruptionError(
                f"{self.path(layer, expert)}: short read ({done} of {buf.nbytes} bytes): truncated file; "
                "re-run `fmoe repack`"
            )
        self.check(layer, expert, buf)

    def map_into(self, slab: MappedSlab, layer: int, expert: int) -> None:
        """io="mmap": map the expert's file into its slot of ``slab`` (one layer's range), checked."""
        path = self.path(layer, expert)
        fd = open_regular(path, f"an expert file; re-run `fmoe repack --bits {self.manifest.bits}`")
        try:
            size = os.fstat(fd).st_size
            if size != self.file_size:
                raise CorruptionError(
                    f"{path}: {size} bytes, not the {self.file_size} of its layout (truncated or replaced); "
                    "re-run `fmoe repack`"
                )
            data = slab.map(expert, fd)  # the mapping holds the file; its descriptor is not needed after
        finally:
            os.close(fd)
        self.check(layer, expert, data)

    def check(self, layer: int, expert: int, data: np.ndarray) -> None:
        """``data`` (the expert's bytes, just read or mapped) against the manifest's xxh3_128, as ``checks`` says."""
        key = (layer, expert)
        if self.checks == "off" or (self.checks == "first-read" and key in self._proven):
            return
        if xxhash.xxh3_128_hexdigest(data.data) != self.manifest.entry(layer, expert)["xxh3_128"]:
            raise CorruptionError(
                f"{self.path(layer, expert)}: xxh3_128 mismatch (corrupt or replaced expert file); re-run `fmoe repack`"
            )
        self._proven.add(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
