"""A minimal safetensors reader: validated header, and positional reads of whole tensors or of
contiguous row ranges, so one expert of a stacked ``[E, ...]`` tensor is read without the rest.

Own reader (not ``safetensors.safe_open``) because the converter needs byte-range reads shared by
worker threads (``os.preadv`` on one descriptor releases the GIL and keeps no file position), and
clear one-line errors for a truncated or corrupt file.
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fmoe.errors import FmoeError

# safetensors dtype -> (numpy dtype used to hold the raw bytes, item size). bf16 is kept as its
# uint16 bit pattern (fmoe.formats.quant converts it exactly).
DTYPES: dict[str, tuple[np.dtype, int]] = {
    "BF16": (np.dtype(np.uint16), 2),
    "F16": (np.dtype(np.float16), 2),
    "F32": (np.dtype(np.float32), 4),
    "F64": (np.dtype(np.float64), 8),
    "U32": (np.dtype(np.uint32), 4),
    "I32": (np.dtype(np.int32), 4),
    "U8": (np.dtype(np.uint8), 1),
    "I8": (np.dtype(np.int8), 1),
    "I64": (np.dtype(np.int64), 8),
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FN")
MAX_HEADER = 100 << 20  # the format's own limit


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str  # safetensors dtype string ("BF16", "U32", ...)
    shape: tuple[int, ...]
    start: int  # absolute byte offset of the data in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        """Bytes of one index along the first dimension."""
        return self.nbytes // self.shape[0] if self.shape and self.shape[0] else self.nbytes


class SafetensorsFile:
    """One ``.safetensors`` file, opened lazily; safe to read from several threads at once."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.size = self.path.stat().st_size
        self.tensors, self.metadata = _parse_header(self.path, self.size)
        self._fd: int | None = None
        self._lock = threading.Lock()

    # ---- reading --------------------------------------------------------------------------------
    def read(self, name: str) -> np.ndarray:
        info = self.tensors[name]
        return self.read_rows(name, 0, info.shape[0]) if info.shape else self._read(info, 0, info.nbytes, ())

    def read_rows(self, name: str, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop`` of the first dimension (contiguous bytes), raw dtype."""
        info = self.tensors[name]
        if not 0 <= start <= stop <= info.shape[0]:
            raise IndexError(f"{name}: rows {start}:{stop} outside {info.shape[0]}")
        shape = (stop - start, *info.shape[1:])
        return self._read(info, start * info.row_bytes, (stop - start) * info.row_bytes, shape)

    def _read(self, info: TensorInfo, offset: int, nbytes: int, shape: tuple[int, ...]) -> np.ndarray:
        dtype = _numpy_dtype(info, self.path)
        buf = np.empty(nbytes, dtype=np.uint8)
        fd = self._descriptor()
        done = 0
        view = memoryview(buf)
        while done < nbytes:
            n = os.preadv(fd, [view[done:]], info.start + offset + done)
            if n <= 0:
                raise FmoeError(f"{self.path}: truncated while reading tensor {info.name!r}")
            done += n
        return buf.view(dtype).reshape(shape)

    def _descriptor(self) -> int:
        with self._lock:
            if self._fd is None:
                self._fd = os.open(self.path, os.O_RDONLY)
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


def _numpy_dtype(info: TensorInfo, path: Path) -> np.dtype:
    if info.dtype not in DTYPES:
        raise FmoeError(f"{path}: tensor {info.name!r} has dtype {info.dtype}, which fmoe does not read")
    return DTYPES[info.dtype][0]


def _parse_header(path: Path, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check the JSON header: every tensor's byte range must lie inside the file and match
    its shape and dtype, so a truncated or corrupt file fails here, not in the middle of a run."""
    bad = f"{path}: not a valid safetensors file"
    if size < 8:
        raise FmoeError(f"{bad} (only {size} bytes)")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > MAX_HEADER or 8 + header_len > size:
            raise FmoeError(f"{bad} (header length {header_len} does not fit a {size}-byte file)")
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FmoeError(f"{bad} (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FmoeError(f"{bad} (header is not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    data_start = 8 + header_len
    tensors: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(x) for x in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise FmoeError(f"{bad} (malformed header entry for {name!r})") from None
        if dtype in DTYPES:
            expected = math.prod(shape) * DTYPES[dtype][1]
            if end - begin != expected:
                raise FmoeError(f"{bad} (tensor {name!r}: {end - begin} bytes for {dtype} {list(shape)})")
        if begin < 0 or end < begin or data_start + end > size:
            raise FmoeError(f"{path}: truncated (tensor {name!r} ends at byte {data_start + end}, file has {size})")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
    return tensors, metadata
