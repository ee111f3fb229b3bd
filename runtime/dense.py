"""The resident (non-expert) weights: model_weights.bin + model_weights.json, loaded once.

Every tensor part is read with ``pread`` straight into the array it stays in, so loading never
holds more than the resident weights plus one bounded chunk: affine-quantised matrices stay packed
(QuantTensor), float tensors become float32 (bf16 widened exactly, chunk by chunk). The embedding
table is the exception: it is kept in its stored form and only the rows a prompt needs are widened
or dequantised (``embed``), so a 248k-row table never costs float32 memory unless something asks
for the whole matrix (a tied lm_head does).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import DENSE_BIN, DENSE_MANIFEST, PART_DTYPES, QUANT_PARTS, read_json
from fmoe.formats.quant import QuantTensor, bf16_to_f32
from fmoe.runtime.model import check_token_ids, embedding_rows, expected_dense_shapes
from fmoe.runtime.preads import pread_into

EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_WIDEN_CHUNK = 8 << 20  # bf16 values widened per step while loading (bounds the transient memory)


class EmbeddingTable:
    """A bf16 embedding table kept in its stored form: ``shape``, rows by index (widened to float32),
    and the whole float32 matrix only through ``np.asarray``."""

    def __init__(self, bits: np.ndarray) -> None:
        self.bits = bits  # uint16 bf16 patterns [vocab, hidden]
        self.shape = bits.shape
        self.dtype = np.dtype(np.float32)

    @property
    def nbytes(self) -> int:
        return self.bits.nbytes

    def __getitem__(self, index: Any) -> np.ndarray:
        return bf16_to_f32(self.bits[index])

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        full = bf16_to_f32(self.bits)
        return full if dtype is None else full.astype(dtype)


class DenseWeights(Mapping[str, "np.ndarray | QuantTensor"]):
    """Canonical tensor name -> float32 array or QuantTensor (see docs/FORMAT.md).

    ``embed_tokens.weight`` of a bf16 file is an EmbeddingTable (rows widened when indexed);
    ``embed(ids)`` reads rows with a vocabulary check.
    """

    def __init__(
        self, packed_dir: Path | str, config: TextConfig, *, fingerprint: str | None = None, verify_reads: bool = False
    ) -> None:
        self.config = config
        self.path = Path(packed_dir) / DENSE_BIN
        manifest_path = Path(packed_dir) / DENSE_MANIFEST
        self.manifest = read_json(manifest_path, "dense manifest: run `fmoe extract` first")
        if self.manifest.get("format") != "fmoe-dense":
            raise FmoeError(f"{manifest_path}: not an fmoe dense manifest")
        if fingerprint is not None and self.manifest.get("model_fingerprint") != fingerprint:
            raise FmoeError(
                f"{manifest_path}: model_fingerprint {self.manifest.get('model_fingerprint')} belongs to another "
                f"model (fmoe.json says {fingerprint}); re-run `fmoe extract`"
            )
        entries: dict[str, Any] = self.manifest.get("tensors") or {}
        if not isinstance(entries, dict):
            raise FmoeError(f"{manifest_path}: 'tensors' is not an object")
        self._check_present(entries, manifest_path)
        if not self.path.is_file():
            raise FmoeError(f"{self.path}: missing (run `fmoe extract`)")
        self._tensors: dict[str, np.ndarray | QuantTensor] = {}
        self._embed_raw: Any = None  # stored form of the embedding table (rows widened on demand)
        with open(self.path, "rb", buffering=0) as f:
            self._file_size = os.fstat(f.fileno()).st_size
            expected = self.manifest.get("file_size")
            if expected is not None and self._file_size != expected:
                raise CorruptionError(
                    f"{self.path}: {self._file_size} bytes, the manifest says {expected} (truncated or replaced)"
                )
            for name, entry in entries.items():
                tensor = self._load(f.fileno(), name, entry, verify_reads)
                if name == EMBED:
                    self._embed_raw = tensor
                else:
                    self._tensors[name] = tensor

    # ---- Mapping -------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> np.ndarray | QuantTensor:
        if name == EMBED or (name == LM_HEAD and LM_HEAD not in self._tensors and self.config.tie_word_embeddings):
            return self._embed_full()
        return self._tensors[name]

    def __iter__(self) -> Iterator[str]:
        yield EMBED
        yield from self._tensors
        if self.config.tie_word_embeddings and LM_HEAD not in self._tensors:
            yield LM_HEAD

    def __len__(self) -> int:
        return sum(1 for _ in self)

    @property
    def nbytes(self) -> int:
        """Bytes of the resident weights (packed matrices, float32 tensors, the stored embedding)."""
        tensors = [*self._tensors.values(), self._embed_raw]
        return sum(t.nbytes for t in tensors)

    # ---- embedding -----------------------------------------------------------------------------
    def embed(self, token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """float32 ``[T, hidden]`` rows of the embedding table; only those rows are widened."""
        return embedding_rows(self._embed_raw, check_token_ids(token_ids, self.config.vocab_size))

    def _embed_full(self) -> np.ndarray | QuantTensor | EmbeddingTable:
        raw = self._embed_raw
        if isinstance(raw, np.ndarray) and raw.dtype == np.uint16:
            if self.config.tie_word_embeddings:  # it is the lm_head too: matmuls need float32
                if "_embed_f32" not in self.__dict__:
                    self._embed_f32 = bf16_to_f32(raw)
                return self._embed_f32
            return EmbeddingTable(raw)
        return raw

    # ---- loading -------------------------------------------------------------------------------
    def _check_present(self, entries: dict[str, Any], where: Path) -> None:
        for name, shape in expected_dense_shapes(self.config, with_lm_head=False).items():
            if name not in entries:
                raise FmoeError(f"{where}: tensor {name} is missing (re-run `fmoe extract`)")
            got = tuple(entries[name].get("shape") or ())
            if got != shape:
                raise FmoeError(f"{where}: tensor {name} has shape {list(got)}, the config needs {list(shape)}")

    def _load(self, fd: int, name: str, entry: dict[str, Any], verify: bool) -> np.ndarray | QuantTensor:
        """Read one tensor, its parts in the manifest's order (the order its xxh3_128 covers)."""
        kind = entry.get("kind")
        parts = entry.get("parts") or {}
        want = {"affine": set(QUANT_PARTS), "float": {"data"}}.get(kind)
        if want is None or set(parts) != want:
            raise FmoeError(
                f"{DENSE_MANIFEST}: tensor {name}: kind {kind!r} with parts {sorted(parts)} is not "
                f"float (data) or affine (weight, scales, biases)"
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
            return arrays["data"]
        qt = QuantTensor(
            arrays["weight"], arrays["scales"], arrays["biases"], int(entry["bits"]), int(entry.get("group_size", 64))
        )
        if list(qt.shape) != list(entry["shape"]):
            raise CorruptionError(
                f"{DENSE_MANIFEST}: tensor {name} parts give shape {list(qt.shape)}, not {entry['shape']}"
            )
        return qt

    def _read_part(self, fd: int, name: str, part_name: str, spec: Any, hasher: Any, widen: bool) -> np.ndarray:
        """One part as its own array: as stored, or float32 when ``widen`` (bf16 in bounded chunks)."""
        try:
            offset, size, dtype = int(spec["offset"]), int(spec["size"]), PART_DTYPES[spec["dtype"]]
            shape = tuple(int(n) for n in spec["shape"])
        except (KeyError, TypeError, ValueError):
            raise FmoeError(
                f"{DENSE_MANIFEST}: tensor {name} part {part_name} is malformed or has an unknown dtype"
            ) from None
        count = int(np.prod(shape))
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
