"""The safetensors format, both halves: a bounded-memory reader and a streaming, sharding writer.

A safetensors file is ``u64 header length | JSON header | data``; the header holds every tensor's
dtype, shape and byte range.

Reading (:class:`SafetensorsFile`): the header is validated up front, then whole tensors or contiguous
row ranges are read positionally, so one expert of a stacked ``[E, ...]`` tensor is read without the
rest. Own reader (not ``safetensors.safe_open``) because the converter needs byte-range reads shared
by worker threads (``os.preadv`` on one descriptor releases the GIL and keeps no file position), and
clear one-line errors for a truncated or corrupt file.

Writing (:class:`ShardedSafetensorsWriter`): all names, dtypes and shapes are declared up front
(:meth:`ShardedSafetensorsWriter.add`) and the data is pulled from each tensor's source only while its
shard is written. With callables that yield chunks (one expert slice, a block of rows), memory stays
bounded by one chunk.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import numpy as np

from fmoe.errors import FmoeError
from fmoe.fsutil import atomic_output, write_json_atomic

DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "U16": 2, "I16": 2, "F16": 2, "BF16": 2,
    "U32": 4, "I32": 4, "F32": 4,
    "U64": 8, "I64": 8, "F64": 8,
}  # fmt: skip

# numpy dtype name -> safetensors dtype (writer). bf16 needs ``ml_dtypes.bfloat16``.
_NUMPY_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
    "bfloat16": "BF16", "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64",
    "int64": "I64", "float64": "F64",
}  # fmt: skip

# safetensors dtype -> numpy dtype holding the raw bytes (reader). bf16 is kept as its uint16 bit
# pattern (fmoe.formats.quant converts it exactly).
READ_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "I64": np.dtype(np.int64),
}
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FN")
MAX_HEADER = 100 << 20  # the format's own limit

Chunk = Union[np.ndarray, bytes]  # noqa: UP007 (a runtime alias: py3.10 needs Union)
Source = Union[np.ndarray, Callable[[], Iterable[Chunk]]]  # noqa: UP007

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


# ---- reading -------------------------------------------------------------------------------------
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
        view = buf.data  # the array's memoryview, for preadv to fill
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
    if info.dtype not in READ_DTYPES:
        raise FmoeError(f"{path}: tensor {info.name!r} has dtype {info.dtype}, which fmoe does not read")
    return READ_DTYPES[info.dtype]


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
        if dtype in DTYPE_SIZES:
            expected = math.prod(shape) * DTYPE_SIZES[dtype]
            if end - begin != expected:
                raise FmoeError(f"{bad} (tensor {name!r}: {end - begin} bytes for {dtype} {list(shape)})")
        if begin < 0 or end < begin or data_start + end > size:
            raise FmoeError(f"{path}: truncated (tensor {name!r} ends at byte {data_start + end}, file has {size})")
        tensors[name] = TensorInfo(name, dtype, shape, data_start + begin, end - begin)
    return tensors, metadata


# ---- writing -------------------------------------------------------------------------------------
def parse_size(text: str | int, *, what: str = "--shard-size") -> int:
    """``"2GB"``, ``"500MB"``, ``"64KB"``, ``"1.5GiB"`` or a plain byte count -> bytes (decimal units,
    ``*iB`` binary)."""
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(I?)B?\s*", str(text).upper())
        if not m:
            raise FmoeError(f"{what}: cannot parse size {text!r} (use e.g. 2GB, 500MB, 64KB)")
        base = 1024 if m.group(3) else 1000
        value = int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))
    if value <= 0:
        raise FmoeError(f"{what}: size must be positive, got {text!r}")
    return value


def safetensors_dtype(array: np.ndarray) -> str:
    """The safetensors dtype name of a numpy array (bf16 needs ``ml_dtypes.bfloat16``)."""
    name = np.dtype(array.dtype).name
    if name not in _NUMPY_DTYPES:
        raise ValueError(f"no safetensors dtype for numpy dtype {name}")
    return _NUMPY_DTYPES[name]


@dataclass
class _Entry:
    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int
    source: Source


class ShardedSafetensorsWriter:
    """Collect tensor declarations, then :meth:`write` them into ``folder``.

    One ``model.safetensors`` when everything fits in ``shard_size`` bytes; otherwise
    ``model-0000i-of-0000N.safetensors`` filled in declaration order (a shard is closed before a
    tensor would push it past ``shard_size``; a tensor larger than that gets a shard of its own) plus
    ``model.safetensors.index.json`` (``metadata.total_size`` and ``weight_map``). Every file is
    written atomically and carries ``metadata`` (default ``{"format": "pt"}``).
    """

    def __init__(
        self,
        folder: Path,
        *,
        shard_size: int,
        metadata: dict[str, str] | None = None,
        on_bytes: Callable[[int], None] | None = None,
    ) -> None:
        if shard_size <= 0:
            raise ValueError("shard_size must be positive")
        self.folder = Path(folder)
        self.shard_size = shard_size
        self.metadata = dict(metadata or {"format": "pt"})
        self.on_bytes = on_bytes
        self._entries: list[_Entry] = []
        self._names: set[str] = set()

    # ---- declaration ----------------------------------------------------------------------------
    def add(self, name: str, dtype: str, shape: tuple[int, ...] | list[int], source: Source) -> None:
        """Declare a tensor; ``source`` is an array or a callable yielding its bytes in order
        (arrays or ``bytes``, C order), called only while the tensor is written."""
        if name in self._names:
            raise ValueError(f"duplicate tensor name {name}")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"{name}: unknown safetensors dtype {dtype}")
        shape = tuple(int(s) for s in shape)
        nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPE_SIZES[dtype]
        if isinstance(source, np.ndarray) and source.nbytes != nbytes:
            raise ValueError(f"{name}: array has {source.nbytes} bytes, {dtype}{list(shape)} needs {nbytes}")
        self._names.add(name)
        self._entries.append(_Entry(name, dtype, shape, nbytes, source))

    def add_array(self, name: str, array: np.ndarray, dtype: str | None = None) -> None:
        """Declare a tensor held in memory (``dtype`` overrides, e.g. ``"BF16"`` for uint16 bits)."""
        array = np.ascontiguousarray(array)
        self.add(name, dtype or safetensors_dtype(array), array.shape, array)

    @property
    def tensor_count(self) -> int:
        return len(self._entries)

    @property
    def total_size(self) -> int:
        return sum(e.nbytes for e in self._entries)

    def plan(self) -> list[tuple[str, list[str]]]:
        """``[(file name, [tensor names])]`` as :meth:`write` will lay them out."""
        groups: list[list[_Entry]] = []
        size = 0
        for e in self._entries:
            if not groups or (size + e.nbytes > self.shard_size and groups[-1]):
                groups.append([])
                size = 0
            groups[-1].append(e)
            size += e.nbytes
        if len(groups) <= 1:
            return [(SINGLE_FILE, [e.name for e in self._entries])]
        n = len(groups)
        return [(f"model-{i + 1:05d}-of-{n:05d}.safetensors", [e.name for e in g]) for i, g in enumerate(groups)]

    # ---- writing --------------------------------------------------------------------------------
    def write(self) -> dict[str, Any]:
        """Write every shard (and the index when sharded); returns ``{files, total_size, index}``."""
        by_name = {e.name: e for e in self._entries}
        layout = self.plan()
        for file_name, names in layout:
            self._write_file(self.folder / file_name, [by_name[n] for n in names])
        index = None
        if len(layout) > 1:
            index = INDEX_FILE
            weight_map = {n: f for f, names in layout for n in names}
            write_json_atomic(
                self.folder / INDEX_FILE, {"metadata": {"total_size": self.total_size}, "weight_map": weight_map}
            )
        return {"files": [f for f, _ in layout], "total_size": self.total_size, "index": index}

    def _write_file(self, path: Path, entries: list[_Entry]) -> None:
        header: dict[str, Any] = {"__metadata__": self.metadata}
        offset = 0
        for e in entries:
            header[e.name] = {"dtype": e.dtype, "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)  # data starts 8-byte aligned, as the reference writer does
        with atomic_output(path) as f:
            f.write(struct.pack("<Q", len(blob)))
            f.write(blob)
            for e in entries:
                written = 0
                chunks = [e.source] if isinstance(e.source, np.ndarray) else e.source()
                for chunk in chunks:
                    # a uint8 view's memoryview writes without a copy (any dtype)
                    data = (
                        chunk
                        if isinstance(chunk, bytes)
                        else np.ascontiguousarray(chunk).reshape(-1).view(np.uint8).data
                    )
                    f.write(data)
                    written += len(data)
                    if self.on_bytes:
                        self.on_bytes(len(data))
                if written != e.nbytes:
                    raise ValueError(f"{e.name}: source gave {written} bytes, expected {e.nbytes}")
