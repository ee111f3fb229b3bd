"""``io="mmap"``: a layer's expert files mapped side by side, so the page cache is the slab.

One address range of ``num_experts x file_size`` bytes is reserved per layer (no memory, no access);
an expert's file is mapped read-only at its own offset in it the first time it is routed to
(``MAP_FIXED``), and stays mapped. The range is then an ordinary uint8 ``[num_experts, file_size]``
array whose slot ``e`` is expert ``e``: the CPU kernels read the experts straight from the OS page
cache, as llama.cpp does, with no copy into a slot and no reader threads; the OS pages them in and
out. Where the files do not fit in memory, ``io="pread"`` with a host cache is the better choice
(the OS evicts by its own policy, and a page fault is a synchronous 4 KiB read).

POSIX only (Linux, macOS); needs the file size to be a multiple of the page size (4 KiB files on
16 KiB pages are refused with a message). A file shortened while mapped makes reading past its end
raise SIGBUS, as with any mapping: the store checks each file's size when it maps it.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import weakref

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.slots import ExpertSlots

# Not in Python's mmap module; the same values on Linux and macOS (sys/mman.h).
_MAP_FIXED = 0x10
_PROT_NONE = 0
_MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0)
_MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0)  # Linux: fault the pages in at map time, not one by one
_MAP_FAILED = ctypes.c_void_p(-1).value


def _libc() -> ctypes.CDLL:
    if os.name != "posix":
        raise FmoeError("--io mmap: needs a POSIX system (Linux, macOS); use --io pread")
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    return libc


class MappedSlab:
    """``count`` expert files of one layer in one reserved range; slot ``e`` holds expert ``e`` once
    :meth:`map` has put its file there."""

    def __init__(self, layout: ExpertLayout, count: int) -> None:
        if layout.file_size % mmap.PAGESIZE:
            raise FmoeError(
                f"--io mmap: expert files of {layout.file_size} bytes are not a multiple of this system's "
                f"{mmap.PAGESIZE}-byte pages; use --io pread"
            )
        self._libc = _libc()
        self.layout = layout
        length = count * layout.file_size
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE
        base = self._libc.mmap(None, length, _PROT_NONE, flags, -1, 0)
        if base is None or base == _MAP_FAILED:
            raise FmoeError(f"--io mmap: could not reserve {length} bytes of address space ({_errno()})")
        self._base = base
        buf = (ctypes.c_uint8 * length).from_address(base)
        # the range is unmapped when the last array over it is gone, never under a live view
        weakref.finalize(buf, self._libc.munmap, base, length)
        self.data = np.ctypeslib.as_array(buf).reshape(count, layout.file_size)
        self.data.flags.writeable = False
        views = {p.removesuffix("_proj"): qt for p, qt in layout.decode_stacked(self.data).items()}
        self.table = ExpertSlots(**views, slab=self.data, layout=layout)
        self.mapped = np.zeros(count, dtype=bool)

    def map(self, slot: int, fd: int) -> np.ndarray:
        """Map the whole file ``fd`` (``file_size`` bytes, checked by the caller) into ``slot``; its bytes."""
        size = self.layout.file_size
        addr = self._base + slot * size
        flags = mmap.MAP_SHARED | _MAP_FIXED | _MAP_POPULATE
        got = self._libc.mmap(addr, size, mmap.PROT_READ, flags, fd, 0)
        if got != addr:
            raise FmoeError(f"--io mmap: could not map an expert file ({_errno()}); use --io pread")
        self.mapped[slot] = True
        return self.data[slot]


def _errno() -> str:
    return os.strerror(ctypes.get_errno())
