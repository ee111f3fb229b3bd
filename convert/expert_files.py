"""One expert file (docs/FORMAT.md): building its bytes from three QuantTensors, and reading the
experts of an existing packed directory back (the input of `fmoe repack PACKED --bits 2`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    EXPERT_PROJECTIONS,
    PART_DTYPES,
    QUANT_PARTS,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
    read_identity,
)
from fmoe.formats.quant import QuantTensor
from fmoe.fsutil import read_json


def expert_bytes(layout: ExpertLayout, tensors: dict[str, QuantTensor]) -> bytearray:
    """The file's bytes: the nine arrays at their aligned offsets, zero padding elsewhere."""
    buf = bytearray(layout.file_size)
    for proj in EXPERT_PROJECTIONS:
        qt = tensors[proj]
        if qt.bits != layout.bits or qt.group_size != layout.group_size:
            raise ValueError(f"{proj}: {qt.bits}-bit/group {qt.group_size} does not fit the layout")
        for part in QUANT_PARTS:
            comp = layout.components[f"{proj}.{part}"]
            arr = np.ascontiguousarray(getattr(qt, part), dtype=PART_DTYPES[comp.dtype])
            if arr.shape != comp.shape:
                raise ValueError(f"{proj}.{part}: shape {arr.shape}, layout expects {comp.shape}")
            buf[comp.offset : comp.offset + comp.size] = memoryview(arr).cast("B")
    return buf


def parse_expert(layout: ExpertLayout, data: bytes | bytearray | memoryview) -> dict[str, QuantTensor]:
    """Inverse of :func:`expert_bytes` (arrays are views of ``data``)."""
    out = {}
    for proj in EXPERT_PROJECTIONS:
        arrays = {}
        for part in QUANT_PARTS:
            comp = layout.components[f"{proj}.{part}"]
            dtype = PART_DTYPES[comp.dtype]
            arrays[part] = np.frombuffer(data, dtype, comp.size // dtype.itemsize, comp.offset).reshape(comp.shape)
        out[proj] = QuantTensor(arrays["weight"], arrays["scales"], arrays["biases"], layout.bits, layout.group_size)
    return out


class PackedExperts:
    """The finished ``experts-q{bits}`` of a packed directory, read expert by expert with each file's
    size and xxh3_128 checked against the manifest (bad bytes are never requantised)."""

    def __init__(self, packed: Path, bits: int = 4) -> None:
        self.packed = Path(packed)
        self.identity, self.config = read_identity(self.packed)
        self.dir = self.packed / experts_dirname(bits)
        manifest_path = self.dir / EXPERT_MANIFEST
        self.manifest = read_json(manifest_path, f"no finished {bits}-bit experts: run `fmoe repack --bits {bits}`")
        self.layout = ExpertLayout.for_config(self.config, bits)
        self._check(manifest_path, bits)
        self.files: dict[str, Any] = self.manifest["files"]

    def _check(self, path: Path, bits: int) -> None:
        m, cfg = self.manifest, self.config
        if m.get("model_fingerprint") != cfg.fingerprint() or m.get("bits") != bits:
            raise FmoeError(f"{path}: does not describe {bits}-bit experts of this directory's model")
        if m.get("file_size") != self.layout.file_size or m.get("components") != self.layout.to_dict()["components"]:
            raise FmoeError(f"{path}: expert layout differs from the format's for this model")
        files = m.get("files")
        if not isinstance(files, dict) or len(files) != cfg.num_hidden_layers * cfg.num_experts:
            raise FmoeError(f"{path}: incomplete file list")

    def read_expert(self, layer: int, expert: int) -> dict[str, QuantTensor]:
        rel = expert_relpath(layer, expert)
        path = self.dir / rel
        entry = self.files.get(rel)
        if entry is None:
            raise FmoeError(f"{self.dir / EXPERT_MANIFEST}: no entry for {rel}")
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise CorruptionError(f"{path}: missing (listed in the manifest)") from None
        if len(data) != entry["size"] or xxhash.xxh3_128_hexdigest(data) != entry["xxh3_128"]:
            raise CorruptionError(f"{path}: size or xxh3_128 does not match the manifest (corrupt); "
                                  "re-run `fmoe repack --bits 4` from the source")
        return parse_expert(self.layout, data)

    def expert_nbytes(self) -> int:
        return self.layout.file_size

    def close(self) -> None:
        """Nothing held open (each read opens its file); part of the reader protocol of repack."""
