"""The expert files of one bit width: ``pread`` an expert into a buffer, every read length-checked
and, with ``verify_reads``, checked against the manifest's xxh3_128. A short or corrupt read raises
CorruptionError and is never computed on.

Descriptors are opened on demand and kept in a bounded LRU (the soft RLIMIT_NOFILE allows), so a
hot expert costs one syscall per read. ``open`` runs in the caller's thread; ``read_into`` may run
in I/O threads (pread releases the GIL, so files are read in parallel).
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
from fmoe.runtime.preads import pread_into


class ExpertFiles:
    def __init__(self, manifest: ExpertManifest, *, verify_reads: bool = False, max_open_files: int | None = None):
        self.manifest = manifest
        self.root = manifest.path.parent
        self.layout = manifest.layout
        self.verify_reads = verify_reads
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
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise FmoeError(f"{path}: missing expert file (re-run `fmoe repack --bits {self.manifest.bits}`)") from None
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
        if self.verify_reads and xxhash.xxh3_128_hexdigest(buf.data) != self.manifest.entry(layer, expert)["xxh3_128"]:
            raise CorruptionError(
                f"{self.path(layer, expert)}: xxh3_128 mismatch (corrupt expert file); re-run `fmoe repack`"
            )

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()
