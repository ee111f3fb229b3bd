"""Reading the finished experts of an existing packed directory back (the input of
`fmoe repack PACKED --bits 2`); the file layout itself is ``ExpertLayout.encode``/``decode``."""

from __future__ import annotations

from pathlib import Path

import xxhash

from fmoe.errors import CorruptionError
from fmoe.formats.expert_manifest import ExpertManifest
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    expert_relpath,
    experts_dirname,
    read_identity,
    recorded_manifest_digest,
)
from fmoe.formats.quant import QuantTensor


class PackedExperts:
    """The finished ``experts-q{bits}`` of a packed directory, read expert by expert with each file's
    size and xxh3_128 checked against the manifest (bad bytes are never requantised)."""

    def __init__(self, packed: Path, bits: int = 4) -> None:
        self.packed = Path(packed)
        self.identity, self.config = read_identity(self.packed)
        self.manifest = ExpertManifest.read(self.packed, self.config, bits)
        self.layout = self.manifest.layout
        self.dir = self.manifest.path.parent
        self._check_digest(bits)

    def _check_digest(self, bits: int) -> None:
        """A manifest changed after it was written is never requantised (bad bytes in, bad bytes out)."""
        rel = f"{experts_dirname(bits)}/{EXPERT_MANIFEST}"
        recorded = recorded_manifest_digest(self.packed, rel)
        if recorded is not None and xxhash.xxh3_128_hexdigest(self.manifest.path.read_bytes()) != recorded:
            raise CorruptionError(
                f"{self.manifest.path}: xxh3_128 differs from the one fmoe.json records (edited or replaced "
                f"after it was written); re-run `fmoe repack --bits {bits}` from the source"
            )

    def read_expert(self, layer: int, expert: int) -> dict[str, QuantTensor]:
        path = self.dir / expert_relpath(layer, expert)
        entry = self.manifest.entry(layer, expert)
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
