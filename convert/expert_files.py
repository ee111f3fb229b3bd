"""Reading the finished experts of an existing packed directory back (the input of
`fmoe repack PACKED --bits 2`); the file layout itself is ``ExpertLayout.encode``/``decode``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import xxhash

from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
    read_identity,
)
from fmoe.formats.quant import QuantTensor
from fmoe.fsutil import read_json


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
            raise CorruptionError(
                f"{path}: size or xxh3_128 does not match the manifest (corrupt); "
                "re-run `fmoe repack --bits 4` from the source"
            )
        return self.layout.decode(data)

    def expert_nbytes(self) -> int:
        return self.layout.file_size

    def close(self) -> None:
        """Nothing held open (each read opens its file); part of the reader protocol of repack."""
