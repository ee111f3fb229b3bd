"""The resident (non-expert) weights: model_weights.bin + model_weights.json, loaded once.

The whole file is read with one ``readinto`` into a single buffer. Affine-quantised matrices stay
packed (QuantTensor views on that buffer); float tensors become float32 arrays (bf16 widened
exactly). The embedding table is the exception: it is kept in its stored form and only the rows a
prompt needs are widened or dequantised (``embed``), so a 248k-row table never costs float32 memory
unless something asks for the whole matrix.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import DENSE_BIN, DENSE_MANIFEST, read_json
from fmoe.formats.quant import QuantTensor, bf16_to_f32

EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"
_DTYPES = {"float32": np.float32, "bf16": np.uint16, "bfloat16": np.uint16, "uint32": np.uint32}


def required_tensors(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Every dense tensor the model needs, with its logical shape (all sizes from the config)."""
    h = cfg.hidden_size
    need: dict[str, tuple[int, ...]] = {EMBED: (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        need[LM_HEAD] = (cfg.vocab_size, h)
    q_out = cfg.num_attention_heads * cfg.head_dim
    kv_out = cfg.num_key_value_heads * cfg.head_dim
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        need[p + "input_layernorm.weight"] = (h,)
        need[p + "post_attention_layernorm.weight"] = (h,)
        if cfg.is_full_attention(layer):
            need[p + "self_attn.q_proj.weight"] = (2 * q_out, h)  # per head: [query | gate]
            need[p + "self_attn.k_proj.weight"] = (kv_out, h)
            need[p + "self_attn.v_proj.weight"] = (kv_out, h)
            need[p + "self_attn.o_proj.weight"] = (h, q_out)
            need[p + "self_attn.q_norm.weight"] = (cfg.head_dim,)
            need[p + "self_attn.k_norm.weight"] = (cfg.head_dim,)
        else:
            hv = cfg.linear_num_value_heads
            need[p + "linear_attn.in_proj_qkv.weight"] = (cfg.conv_dim, h)
            need[p + "linear_attn.in_proj_z.weight"] = (cfg.linear_value_dim, h)
            need[p + "linear_attn.in_proj_b.weight"] = (hv, h)
            need[p + "linear_attn.in_proj_a.weight"] = (hv, h)
            need[p + "linear_attn.conv1d.weight"] = (cfg.conv_dim, cfg.linear_conv_kernel_dim)
            need[p + "linear_attn.A_log"] = (hv,)
            need[p + "linear_attn.dt_bias"] = (hv,)
            need[p + "linear_attn.norm.weight"] = (cfg.linear_value_head_dim,)
            need[p + "linear_attn.out_proj.weight"] = (h, cfg.linear_value_dim)
        need[p + "mlp.gate.weight"] = (cfg.num_experts, h)
        need[p + "mlp.shared_expert.gate_proj.weight"] = (cfg.shared_expert_intermediate_size, h)
        need[p + "mlp.shared_expert.up_proj.weight"] = (cfg.shared_expert_intermediate_size, h)
        need[p + "mlp.shared_expert.down_proj.weight"] = (h, cfg.shared_expert_intermediate_size)
        need[p + "mlp.shared_expert_gate.weight"] = (1, h)
    return need


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

    ``embed_tokens.weight`` of a bf16 file is an EmbeddingTable (rows widened on access);
    ``embed(ids)`` is the way to read it.
    """

    def __init__(self, packed_dir: Path | str, config: TextConfig, *, fingerprint: str | None = None,
                 verify_reads: bool = False) -> None:
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
        self.dense_bits = self.manifest.get("dense_bits")
        entries: dict[str, Any] = self.manifest.get("tensors") or {}
        if not isinstance(entries, dict):
            raise FmoeError(f"{manifest_path}: 'tensors' is not an object")
        self._check_present(entries, manifest_path)
        self._buffer: np.ndarray = self._read_file()
        self._tensors: dict[str, np.ndarray | QuantTensor] = {}
        self._embed_raw: Any = None  # stored form of the embedding table (rows widened on demand)
        for name, entry in entries.items():
            if verify_reads:
                self._verify(name, entry)
            if name == EMBED:
                self._embed_raw = self._build(name, entry, widen=False)
            else:
                self._tensors[name] = self._build(name, entry)
        self.verified = verify_reads
        # Quantised matrices are views on the buffer and keep it alive; everything else was copied,
        # so with a bf16/float32-only file the buffer is freed here.
        del self._buffer

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
        ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
        vocab = self.config.vocab_size
        if ids.size and (ids.min() < 0 or ids.max() >= vocab):
            bad = int(ids[(ids < 0) | (ids >= vocab)][0])
            raise FmoeError(f"token id {bad} is outside the vocabulary (0..{vocab - 1})")
        raw = self._embed_raw
        if isinstance(raw, QuantTensor):
            rows = QuantTensor(raw.weight[ids], raw.scales[ids], raw.biases[ids], raw.bits, raw.group_size)
            return rows.dequantize()
        if raw.dtype == np.uint16:
            return bf16_to_f32(raw[ids])
        return np.array(raw[ids], dtype=np.float32)

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
        for name, shape in required_tensors(self.config).items():
            if name not in entries:
                raise FmoeError(f"{where}: tensor {name} is missing (re-run `fmoe extract`)")
            got = tuple(entries[name].get("shape") or ())
            if got != shape:
                raise FmoeError(f"{where}: tensor {name} has shape {list(got)}, the config needs {list(shape)}")

    def _read_file(self) -> np.ndarray:
        if not self.path.is_file():
            raise FmoeError(f"{self.path}: missing (run `fmoe extract`)")
        size = self.path.stat().st_size
        expected = self.manifest.get("file_size")
        if expected is not None and size != expected:
            raise CorruptionError(f"{self.path}: {size} bytes, the manifest says {expected} (truncated or replaced)")
        buf = np.empty(size, dtype=np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            view = memoryview(buf)
            done = 0
            while done < size:  # readinto may return less than asked for large files
                n = f.readinto(view[done:])
                if not n:
                    break
                done += n
        if done != size:
            raise CorruptionError(f"{self.path}: short read ({done} of {size} bytes)")
        return buf

    def _part(self, name: str, part_name: str, part: dict[str, Any]) -> np.ndarray:
        try:
            offset, size, dtype = int(part["offset"]), int(part["size"]), part["dtype"]
            shape = tuple(int(s) for s in part["shape"])
        except (KeyError, TypeError, ValueError):
            raise FmoeError(f"{DENSE_MANIFEST}: tensor {name} part {part_name} is malformed") from None
        if dtype not in _DTYPES:
            raise FmoeError(f"{DENSE_MANIFEST}: tensor {name} part {part_name} has unknown dtype {dtype!r}")
        np_dtype = np.dtype(_DTYPES[dtype])
        if size != int(np.prod(shape)) * np_dtype.itemsize or offset < 0 or offset + size > self._buffer.size:
            raise CorruptionError(
                f"{self.path}: tensor {name} part {part_name} (offset {offset}, size {size}) does not fit its "
                f"shape or the file"
            )
        return self._buffer[offset : offset + size].view(np_dtype).reshape(shape)

    def _build(self, name: str, entry: dict[str, Any], *, widen: bool = True) -> np.ndarray | QuantTensor:
        parts = entry.get("parts") or {}
        kind = entry.get("kind")
        if kind == "affine":
            arrays = {p: self._part(name, p, parts[p]) for p in ("weight", "scales", "biases") if p in parts}
            if len(arrays) != 3:
                raise FmoeError(f"{DENSE_MANIFEST}: affine tensor {name} needs weight, scales and biases parts")
            qt = QuantTensor(arrays["weight"], arrays["scales"], arrays["biases"], int(entry["bits"]),
                             int(entry.get("group_size", 64)))
            if qt.shape != tuple(entry["shape"]):
                raise CorruptionError(
                    f"{DENSE_MANIFEST}: tensor {name} parts give shape {list(qt.shape)}, not {entry['shape']}"
                )
            return qt
        if kind != "float" or "data" not in parts:
            raise FmoeError(f"{DENSE_MANIFEST}: tensor {name} has unknown kind {kind!r} or no data part")
        data = self._part(name, "data", parts["data"])
        if not widen:
            return data.copy()  # own copy, so the file buffer is not kept alive for it
        return bf16_to_f32(data) if data.dtype == np.uint16 else np.array(data, dtype=np.float32)

    def _verify(self, name: str, entry: dict[str, Any]) -> None:
        expected = entry.get("xxh3_128")
        if not expected:
            raise CorruptionError(f"{DENSE_MANIFEST}: tensor {name} has no xxh3_128")
        h = xxhash.xxh3_128()
        for part_name, part in (entry.get("parts") or {}).items():
            h.update(self._part(name, part_name, part).view(np.uint8).reshape(-1))
        if h.hexdigest() != expected:
            raise CorruptionError(f"{self.path}: tensor {name} fails its xxh3_128 check (corrupt file)")

