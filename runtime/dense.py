"""The resident (non-expert) weights: model_weights.bin + model_weights.json, read once into host
tensors by canonical name (runtime/weights.py makes the typed tree of them).

Every tensor part is read with ``pread`` straight into the array it stays in, so loading never
holds more than the resident weights plus one bounded chunk: affine-quantised matrices stay packed
(QuantTensor), float tensors become float32 (bf16 widened exactly, chunk by chunk). The embedding
table is the exception: it stays in its stored form (bf16 bit patterns as uint16, or QuantTensor)
and the backend widens only the rows a prompt needs, so a 248k-row table never costs float32 memory.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.expert_manifest import header_problems
from fmoe.formats.packed import (
    DENSE_BIN,
    DENSE_MANIFEST,
    PART_DTYPES,
    QUANT_PARTS,
    manifest_digest_problem,
    read_json,
)
from fmoe.formats.quant import QuantTensor
from fmoe.formats.schemas import DenseManifestSchema, validated
from fmoe.fsutil import open_regular
from fmoe.runtime.preads import pread_into
from fmoe.runtime.weights import EMBED

_WIDEN_CHUNK = 8 << 20  # bf16 values widened per step while loading (bounds the transient memory)

HostTensor = np.ndarray | QuantTensor


def read_dense_weights(packed_dir: Path | str, config: TextConfig, *, verify: bool = True) -> dict[str, HostTensor]:
    """Canonical tensor name -> host tensor for every tensor the model of ``config`` reads (its
    fingerprint must be the manifest's); ``verify`` checks each tensor's xxh3_128 as it is read."""
    return _DenseFile(Path(packed_dir), config, digest=verify).load(verify)


class _DenseFile:
    def __init__(self, packed_dir: Path, config: TextConfig, *, digest: bool) -> None:
        self.config = config
        self.path = packed_dir / DENSE_BIN
        where = packed_dir / DENSE_MANIFEST
        doc = read_json(where, "dense manifest: run `fmoe extract` first")
        validated(doc, DenseManifestSchema, str(where))
        problems = header_problems(doc, "dense", config.fingerprint())
        if digest and not problems:
            problems = [p for p in [manifest_digest_problem(packed_dir, DENSE_MANIFEST, where.read_bytes())] if p]
        if problems:
            raise FmoeError(f"{where}: {problems[0]}; re-run `fmoe extract`")
        self.manifest = doc
        self.entries: dict[str, dict[str, Any]] = {}
        for name, shape in dense_tensor_shapes(config).items():
            entry = doc["tensors"].get(name)
            if entry is None:
                raise FmoeError(f"{where}: tensor {name} is missing (re-run `fmoe extract`)")
            if tuple(entry["shape"]) != shape:
                raise FmoeError(f"{where}: tensor {name} has shape {entry['shape']}, the config needs {list(shape)}")
            self.entries[name] = entry
        if not self.path.exists():
            raise FmoeError(f"{self.path}: missing (run `fmoe extract`)")
        self._file_size = 0

    def load(self, verify: bool) -> dict[str, HostTensor]:
        fd = open_regular(self.path)
        try:
            self._file_size = os.fstat(fd).st_size
            expected = self.manifest.get("file_size")
            if expected is not None and self._file_size != expected:
                raise CorruptionError(
                    f"{self.path}: {self._file_size} bytes, the manifest says {expected} (truncated or replaced)"
                )
            return {name: self._load(fd, name, entry, verify) for name, entry in self.entries.items()}
        finally:
            os.close(fd)

    # ---- loading -------------------------------------------------------------------------------
    def _load(self, fd: int, name: str, entry: dict[str, Any], verify: bool) -> np.ndarray | QuantTensor:
        """Read one tensor, its parts in the manifest's order (the order its xxh3_128 covers)."""
        kind, parts = entry["kind"], entry["parts"]
        want = {"affine": set(QUANT_PARTS), "float": {"data"}}[kind]
        if set(parts) != want or (kind == "affine" and (entry.get("bits") is None or entry.get("group_size") is None)):
            raise FmoeError(
                f"{DENSE_MANIFEST}: tensor {name}: kind {kind!r} with parts {sorted(parts)} is not "
                f"float (data) or affine (weight, scales, biases, with bits and group_size)"
            )
        expected = entry.get("xxh3_128")
        if verify and not expected:
            raise CorruptionError(f"{DENSE_MANIFEST}: tensor {name} has no xxh3_128")
        hasher = xxhash.xxh3_128() if verify else None
        # float matrices are widened to float32, except the embedding (rows widened on demand)
        widen = kind == "float" and name != EMBED
        arrays = {p: self._read_part(fd, name, p, spec, hasher, widen) for p, spec in parts.items()}
        if hasher is not None and hasher.hexdigest() != expected:
            raise CorruptionError(f"{self.path}: tensor {name} fails its xxh3_128 check (corrupt file)")
        if kind == "float":
            if list(arrays["data"].shape) != entry["shape"]:
                raise CorruptionError(f"{DENSE_MANIFEST}: tensor {name} data has shape {list(arrays['data'].shape)}")
            return arrays["data"]
        try:
            qt = QuantTensor(arrays["weight"], arrays["scales"], arrays["biases"], entry["bits"], entry["group_size"])
            consistent = (
                list(qt.shape) == entry["shape"]
                and qt.scales.shape == qt.biases.shape
                and (qt.scales.shape == (*qt.shape[:-1], qt.shape[-1] // qt.group_size))
            )
        except (ValueError, ZeroDivisionError):
            consistent = False
        if not consistent:
            raise CorruptionError(f"{DENSE_MANIFEST}: tensor {name}: its parts do not make a {entry['shape']} matrix")
        return qt

    def _read_part(self, fd: int, name: str, part_name: str, spec: Any, hasher: Any, widen: bool) -> np.ndarray:
        """One part as its own array: as stored, or float32 when ``widen`` (bf16 in bounded chunks)."""
        offset, size, dtype = spec["offset"], spec["size"], PART_DTYPES[spec["dtype"]]
        shape = tuple(spec["shape"])
        count = math.prod(shape)
        if size != count * dtype.itemsize or offset < 0 or offset + size > self._file_size:
            raise CorruptionError(
                f"{self.path}: tensor {name} part {part_name} (offset {offset}, size {size}) does not fit its "
                f"shape or the file"
            )
        if not widen or dtype == np.float32:
            out = np.empty(shape, dtype)
            self._read(fd, out, offset, name, hasher)
            return out
        if dtype != np.uint16:
            raise FmoeError(f"{DENSE_MANIFEST}: float tensor {name} is stored as {spec['dtype']}, not bf16/float32")
        out = np.empty(shape, np.float32)
        wide = out.reshape(-1).view(np.uint32)
        raw = np.empty(min(count, _WIDEN_CHUNK), np.uint16)
        for lo in range(0, count, _WIDEN_CHUNK):
            n = min(_WIDEN_CHUNK, count - lo)
            self._read(fd, raw[:n], offset + 2 * lo, name, hasher)
            wide[lo : lo + n] = raw[:n]
            wide[lo : lo + n] <<= 16  # bf16 bits are the high half of the float32's
        return out

    def _read(self, fd: int, out: np.ndarray, offset: int, name: str, hasher: Any) -> None:
        done = pread_into(fd, out, offset)
        if done != out.nbytes:
            raise CorruptionError(f"{self.path}: short read of tensor {name} ({done} of {out.nbytes} bytes)")
        if hasher is not None:
            hasher.update(out.reshape(-1).view(np.uint8))
