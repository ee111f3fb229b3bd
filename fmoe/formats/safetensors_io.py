"""The safetensors format, both halves: a bounded-memory reader and a streaming, sharding writer.

A safetensors file is ``u64 header length | JSON header | data``; the header holds every tensor's
dtype, shape and byte range.

Reading (:class:`SafetensorsFile`): the header is validated up front, with the safetensors library's
own rules (plus: no duplicate keys), then whole tensors or contiguous row ranges are read
positionally, so one expert of a stacked ``[E, ...]`` tensor is read without the rest. Own reader
(not ``safetensors.safe_open``) because the converter needs byte-range reads shared by worker
threads (``os.preadv`` on one descriptor releases the GIL and keeps no file position), and clear
one-line errors naming the file and the tensor for a truncated, corrupt or hostile file.

Writing (:class:`ShardedSafetensorsWriter`): all names, dtypes and shapes are declared up front
(:meth:`ShardedSafetensorsWriter.add`) and the data is pulled from each tensor's source only while its
shard is written. With callables that yield chunks (one expert slice, a block of rows), memory stays
bounded by one chunk.
"""

from __future__ import annotations

import json
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
from fmoe.fsutil import atomic_output, open_regular, write_json_atomic

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
# pattern (fmoe.formats.quant converts it exactly), float8 e4m3 as its uint8 code.
READ_DTYPES: dict[str, np.dtype] = {
    "BF16": np.dtype(np.uint16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32),
    "U8": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(np.uint8),  # raw codes; fmoe.convert.fp8 decodes them with their block scales
    "I8": np.dtype(np.int8),
    "I64": np.dtype(np.int64),
}
# Bits per element of every dtype the safetensors library knows (its ``Dtype::bitsize``); the reader
# refuses any other. Sub-byte dtypes must fill whole bytes.
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}  # fmt: skip
FP8_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FN", "F8_E4M3FNUZ", "F8_E5M2FNUZ")
MAX_HEADER = 100_000_000  # the library's limit (MAX_HEADER_SIZE)

Chunk = Union[np.ndarray, bytes]  # noqa: UP007 (a runtime alias: py3.10 needs Union)
Source = Union[np.ndarray, Callable[[], Iterable[Chunk]]]  # noqa: UP007

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
# The largest shard index read: real ones are a few MB even with per-expert tensor names (the whole
# index is parsed in memory, so a hostile multi-GB one is refused by its size first).
MAX_INDEX = 256 << 20


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
    """One ``.safetensors`` file, opened lazily; safe to read from several threads at once.

    The header is read and validated (:func:`_parse_header`) from a descriptor of a regular file, so
    the sizes it claims are checked against the file actually opened; FIFOs and devices are refused
    by name, never read."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        fd = open_regular(self.path, "a safetensors file")
        try:
            self.size = os.fstat(fd).st_size
            self.tensors, self.metadata = _parse_header(self.path, fd, self.size)
        finally:
            os.close(fd)
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
                fd = open_regular(self.path, "a safetensors file")
                size = os.fstat(fd).st_size
                if size != self.size:  # replaced or cut since its header was checked
                    os.close(fd)
                    raise FmoeError(f"{self.path}: changed size since it was opened ({self.size} -> {size} bytes)")
                self._fd = fd
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


@dataclass(frozen=True)
class _HeaderEntry:
    """One tensor's header entry, checked on its own; offsets relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class _HeaderError(Exception):
    """A problem found while decoding the header JSON (becomes an FmoeError naming the file)."""


def _parse_header(path: Path, fd: int, size: int) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Read and check the header the way the safetensors library does (``Metadata::validate`` in
    safetensors/src/tensor.rs), so a truncated, corrupt or hostile file fails here with one line
    naming the file and the tensor, not in the middle of a run; see docs/FORMAT.md."""
    bad = f"{path}: not a valid safetensors file"
    header_len = _header_length(path, fd, size)
    header = _decode_header(path, _pread_exact(fd, header_len, 8))
    metadata = _check_metadata(bad, header.pop("__metadata__", None))
    entries = [_check_entry(bad, name, value) for name, value in header.items()]
    data_start = 8 + header_len
    _check_layout(path, entries, data_start, size)
    tensors = {e.name: TensorInfo(e.name, e.dtype, e.shape, data_start + e.begin, e.end - e.begin) for e in entries}
    return tensors, metadata


def _header_length(path: Path, fd: int, size: int) -> int:
    """The u64 header length, checked against the format's limit and the file before it is read."""
    bad = f"{path}: not a valid safetensors file"
    if size < 8:
        raise FmoeError(f"{bad} (only {size} bytes)")
    (header_len,) = struct.unpack("<Q", _pread_exact(fd, 8, 0))
    if header_len > MAX_HEADER:
        raise FmoeError(f"{bad} (header length {header_len} is over the format's limit of {MAX_HEADER})")
    if 8 + header_len > size:
        raise FmoeError(f"{bad} (header length {header_len} does not fit a {size}-byte file)")
    return int(header_len)


def _pread_exact(fd: int, n: int, offset: int) -> bytes:
    parts: list[bytes] = []
    while n > 0:
        chunk = os.pread(fd, n, offset)
        if not chunk:
            break  # the caller checked the size: only a file cut meanwhile gets here
        parts.append(chunk)
        n -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


def _decode_header(path: Path, raw: bytes) -> dict[str, Any]:
    """The header as a JSON object: strict UTF-8, no duplicate keys (at any depth), no NaN/Infinity."""
    bad = f"{path}: not a valid safetensors file"
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except UnicodeDecodeError:
        raise FmoeError(f"{bad} (header is not UTF-8)") from None
    except _HeaderError as exc:
        raise FmoeError(f"{bad} ({exc})") from None
    except (ValueError, RecursionError):  # JSONDecodeError, an integer over Python's digit limit, deep nesting
        raise FmoeError(f"{bad} (header is not JSON)") from None
    if not isinstance(header, dict):
        raise FmoeError(f"{bad} (header is not a JSON object)")
    return header


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """json object hook: a duplicate key would silently hide one tensor (the last one wins)."""
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _HeaderError(f"duplicate key {_brief(key)} in the header")
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _HeaderError(f"{name} in the header")


def _check_metadata(bad: str, metadata: Any) -> dict[str, str]:
    """``__metadata__``: absent, null, or a map of strings to strings."""
    if metadata is None:
        return {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FmoeError(f"{bad} (__metadata__ is not a map of strings to strings)")
    return metadata


U64_LIMIT = 1 << 64  # the library reads shapes and offsets as usize (u64)


def _is_count(x: Any) -> bool:
    """A JSON integer that fits a u64 (bool is an int subclass in Python, not in JSON)."""
    return type(x) is int and 0 <= x < U64_LIMIT


def _nbits(shape: list[int], bits: int) -> int | None:
    """Bits of a tensor, None when the element count or the bit count overflows a u64, exactly as in
    the library (checked_mul in order); stopping there keeps a hostile shape of huge dims cheap."""
    count = 1
    for d in shape:
        count *= d
        if count >= U64_LIMIT:
            return None
    count *= bits
    return count if count < U64_LIMIT else None


def _check_entry(bad: str, name: str, entry: Any) -> _HeaderEntry:
    """One tensor entry on its own: a known dtype, a shape of counts, data_offsets [begin, end] with
    end - begin the shape's byte size. Unknown extra fields are ignored, as the library does."""
    where = f"{bad} (tensor {_brief(name)}"
    if not isinstance(entry, dict):
        raise FmoeError(f"{where}: entry is not a JSON object)")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in entry]
    if missing:
        raise FmoeError(f"{where}: no {missing[0]})")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str) or dtype not in DTYPE_BITS:
        raise FmoeError(f"{where}: unknown dtype {_brief(dtype)})")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FmoeError(f"{where}: shape {_brief(shape)} is not a list of non-negative 64-bit integers)")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(x) for x in offsets):
        raise FmoeError(
            f"{where}: data_offsets {_brief(offsets)} is not [begin, end] of two non-negative 64-bit integers)"
        )
    begin, end = offsets
    if end < begin:
        raise FmoeError(f"{where}: data_offsets {offsets} end before they begin)")
    nbits = _nbits(shape, DTYPE_BITS[dtype])
    if nbits is None:
        raise FmoeError(f"{where}: shape {_brief(shape)} of {dtype} overflows a 64-bit size)")
    if nbits % 8:
        raise FmoeError(f"{where}: {dtype} {_brief(shape)} does not fill whole bytes)")
    if end - begin != nbits // 8:
        raise FmoeError(
            f"{where}: data_offsets {offsets} hold {end - begin} bytes, {dtype} {_brief(shape)} needs {nbits // 8})"
        )
    return _HeaderEntry(name, dtype, tuple(shape), begin, end)


def _check_layout(path: Path, entries: list[_HeaderEntry], data_start: int, size: int) -> None:
    """Tensors sorted by offsets must tile the data section exactly, from 0 to the end of the file:
    no overlap (one tensor's bytes read as another's), no gap, nothing missing, nothing after."""
    bad = f"{path}: not a valid safetensors file"
    position, previous = 0, None
    for e in sorted(entries, key=lambda e: (e.begin, e.end)):
        if e.begin < position:
            assert previous is not None  # position > 0 only after a tensor
            raise FmoeError(
                f"{bad} (tensor {_brief(e.name)}: data_offsets [{e.begin}, {e.end}] overlap tensor "
                f"{_brief(previous.name)} [{previous.begin}, {previous.end}])"
            )
        if e.begin > position:
            raise FmoeError(
                f"{bad} (tensor {_brief(e.name)}: data_offsets [{e.begin}, {e.end}] leave a gap: "
                f"bytes {position}..{e.begin} of the data section belong to no tensor)"
            )
        position, previous = e.end, e
    data_size = size - data_start
    if position > data_size:
        assert previous is not None
        raise FmoeError(
            f"{path}: truncated (tensor {_brief(previous.name)} ends at byte {data_start + position}, file has {size})"
        )
    if position < data_size:
        raise FmoeError(
            f"{bad} (the tensors' data ends at byte {data_start + position} of {size}: "
            f"{data_size - position} bytes belong to no tensor)"
        )


def _brief(value: Any) -> str:
    """``repr`` cut to one short line: a hostile header can hold megabyte-long names and shapes."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


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

    def declared(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (dtype, shape) of every tensor declared so far, in declaration order."""
        return {e.name: (e.dtype, e.shape) for e in self._entries}

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
