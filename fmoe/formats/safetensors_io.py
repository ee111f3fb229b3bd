"""Streaming safetensors writer: tensors declared first, their bytes produced lazily, sharded by size.

A safetensors file is ``u64 header length | JSON header | data``; the header holds every tensor's
offsets, so all names, dtypes and shapes are declared up front (:meth:`ShardedSafetensorsWriter.add`)
and the data is pulled from each tensor's source only while its shard is written. With callables that
yield chunks (one expert slice, a block of rows), memory stays bounded by one chunk.
"""

from __future__ import annotations

import json
import re
import struct
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

_NUMPY_DTYPES = {
    "bool": "BOOL", "uint8": "U8", "int8": "I8", "uint16": "U16", "int16": "I16", "float16": "F16",
    "bfloat16": "BF16", "uint32": "U32", "int32": "I32", "float32": "F32", "uint64": "U64",
    "int64": "I64", "float64": "F64",
}  # fmt: skip

Chunk = Union[np.ndarray, bytes]  # noqa: UP007 (a runtime alias: py3.10 needs Union)
Source = Union[np.ndarray, Callable[[], Iterable[Chunk]]]  # noqa: UP007

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


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
                    # a uint8 view writes through the buffer protocol without a copy (any dtype)
                    data = chunk if isinstance(chunk, bytes) else np.ascontiguousarray(chunk).reshape(-1).view(np.uint8)
                    f.write(data)
                    written += len(data)
                    if self.on_bytes:
                        self.on_bytes(len(data))
                if written != e.nbytes:
                    raise ValueError(f"{e.name}: source gave {written} bytes, expected {e.nbytes}")
