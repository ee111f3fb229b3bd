"""The packed directory: file names, the expert file layout and the manifests' schema.

A packed directory (written by `fmoe extract` and `fmoe repack`, read by `fmoe verify` and the
runtime) holds::

    fmoe.json                  identity: format version, model fingerprint, text config, source (and
                               its identity), the xxh3_128 of every manifest ("manifests")
    .fmoe.lock                 the writers' advisory lock (fmoe/locking.py)
    model_weights.bin          non-expert tensors, each part 64-byte aligned
    model_weights.json         per tensor: shape, kind (float|affine), parts (offset/size/dtype/shape), xxh3_128
    tokenizer.json, tokenizer_config.json, chat_template.jinja, generation_config.json
    experts-q4/manifest.json   expert layout (component offsets), per-file size and xxh3_128
    experts-q4/layer_000/expert_0000.bin ...
    experts-q2/...             (optional) 2-bit experts beside the 4-bit ones

See docs/FORMAT.md for the full description.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor
from fmoe.fsutil import read_json, write_json_atomic

FORMAT_VERSION = 1
IDENTITY_FILE = "fmoe.json"
DENSE_BIN = "model_weights.bin"
DENSE_MANIFEST = "model_weights.json"
EXPERT_MANIFEST = "manifest.json"
PROGRESS_FILE = ".progress.jsonl"  # repack's log of finished expert files, until the manifest exists
MANIFEST_DIGESTS = "manifests"  # fmoe.json: manifest path -> xxh3_128 of its bytes (tamper evidence)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
GENERATION_CONFIG = "generation_config.json"  # copied from the source when present (stop tokens)

DENSE_ALIGN = 64
DENSE_BITS = (16, 8, 4)  # model_weights.bin's matrices: bf16, or affine at 8 or 4 bits
EXPERT_ALIGN = 4096  # every component of an expert file starts 4 KiB aligned (O_DIRECT-friendly)
EXPERT_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")
QUANT_PARTS = ("weight", "scales", "biases")
# The dtype names used in the manifests -> the numpy dtype of the stored bytes (bf16 as uint16 bits).
PART_DTYPES: dict[str, np.dtype[Any]] = {
    "uint32": np.dtype(np.uint32),
    "bf16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}
_EXPERTS_DIR = re.compile(r"^experts-q(\d+)$")


def align_up(n: int, alignment: int) -> int:
    return (n + alignment - 1) // alignment * alignment


def experts_dirname(bits: int) -> str:
    return f"experts-q{bits}"


def experts_dir_bits(name: str) -> int | None:
    """The bit width an ``experts-q{bits}`` directory name stands for, None for any other name."""
    m = _EXPERTS_DIR.match(name)
    return int(m.group(1)) if m else None


def expert_relpath(layer: int, expert: int) -> str:
    return f"layer_{layer:03d}/expert_{expert:04d}.bin"


def progress_entries(experts_dir: Path) -> list[dict[str, Any]]:
    """The JSON objects of ``experts_dir``'s progress log (none when absent); a torn line is skipped."""
    path = Path(experts_dir) / PROGRESS_FILE
    if not path.is_file():
        return []
    entries = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(entry, dict):
            entries.append(entry)
    return entries


# ---- expert file layout -------------------------------------------------------------------------
@dataclass(frozen=True)
class Component:
    """One array inside an expert file."""

    offset: int
    size: int
    dtype: str  # "uint32" (packed codes) or "bf16" (scales, biases)
    shape: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "size": self.size, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class ExpertLayout:
    """Where each of the nine arrays (gate/up/down x weight/scales/biases) lies in an expert file."""

    bits: int
    group_size: int
    components: dict[str, Component]  # "gate_proj.weight" -> Component
    file_size: int

    @classmethod
    def for_config(cls, cfg: TextConfig, bits: int, group_size: int = 64) -> ExpertLayout:
        inter, hidden = cfg.moe_intermediate_size, cfg.hidden_size
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        components: dict[str, Component] = {}
        offset = 0
        for proj in EXPERT_PROJECTIONS:
            out_dim, in_dim = shapes[proj]
            if in_dim % group_size:
                raise FmoeError(f"{proj}: input dimension {in_dim} is not a multiple of group size {group_size}")
            parts = {
                "weight": ("uint32", (out_dim, in_dim * bits // 32)),
                "scales": ("bf16", (out_dim, in_dim // group_size)),
                "biases": ("bf16", (out_dim, in_dim // group_size)),
            }
            for part, (dtype, shape) in parts.items():
                size = shape[0] * shape[1] * PART_DTYPES[dtype].itemsize
                components[f"{proj}.{part}"] = Component(offset, size, dtype, shape)
                offset = align_up(offset + size, EXPERT_ALIGN)
        return cls(bits, group_size, components, offset)

    def encode(self, tensors: dict[str, QuantTensor]) -> bytearray:
        """An expert file's bytes: the nine arrays at their aligned offsets, zero padding elsewhere."""
        buf = bytearray(self.file_size)
        for proj in EXPERT_PROJECTIONS:
            qt = tensors[proj]
            if qt.bits != self.bits or qt.group_size != self.group_size:
                raise ValueError(f"{proj}: {qt.bits}-bit/group {qt.group_size} does not fit the layout")
            for part in QUANT_PARTS:
                comp = self.components[f"{proj}.{part}"]
                arr = np.ascontiguousarray(getattr(qt, part), dtype=PART_DTYPES[comp.dtype])
                if arr.shape != comp.shape:
                    raise ValueError(f"{proj}.{part}: shape {arr.shape}, layout expects {comp.shape}")
                buf[comp.offset : comp.offset + comp.size] = arr.data.cast("B")
        return buf

    def decode(self, data: bytes | bytearray | memoryview | np.ndarray) -> dict[str, QuantTensor]:
        """Inverse of :meth:`encode`: ``{"gate_proj", "up_proj", "down_proj"}``, arrays are read-only
        views of ``data``."""
        row = np.frombuffer(data, np.uint8, self.file_size).reshape(1, self.file_size)
        return {
            proj: QuantTensor(q.weight[0], q.scales[0], q.biases[0], q.bits, q.group_size)
            for proj, q in self.decode_stacked(row).items()
        }

    def decode_stacked(self, slab: np.ndarray) -> dict[str, QuantTensor]:
        """:meth:`decode` over ``slab``, a uint8 ``[slots, file_size]`` array of expert files side by
        side: each array gets a leading slot axis (strided views of ``slab``, no copy)."""
        if slab.dtype != np.uint8 or slab.ndim != 2 or slab.shape[1] != self.file_size or slab.strides[1] != 1:
            raise ValueError(f"expert slab: need uint8 [slots, {self.file_size}] rows, got {slab.dtype} {slab.shape}")
        out = {}
        for proj in EXPERT_PROJECTIONS:
            arrays = {}
            for part in QUANT_PARTS:
                comp = self.components[f"{proj}.{part}"]
                dtype = PART_DTYPES[comp.dtype]
                flat = slab[:, comp.offset : comp.offset + comp.size].view(dtype)
                arrays[part] = np.lib.stride_tricks.as_strided(
                    flat,
                    (slab.shape[0], *comp.shape),
                    (slab.strides[0], comp.shape[1] * dtype.itemsize, dtype.itemsize),
                    writeable=False,
                )
            out[proj] = QuantTensor(arrays["weight"], arrays["scales"], arrays["biases"], self.bits, self.group_size)
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_size": self.group_size,
            "file_size": self.file_size,
            "components": {k: c.to_dict() for k, c in self.components.items()},
        }


# ---- manifests ----------------------------------------------------------------------------------
def identity_document(cfg: TextConfig, source: dict[str, Any]) -> dict[str, Any]:
    """The content of fmoe.json for a model."""
    return {
        "format": "fmoe-packed",
        "version": FORMAT_VERSION,
        "model_fingerprint": cfg.fingerprint(),
        "text_config": cfg.to_dict(),
        "source": source,
    }


def read_identity(packed: Path) -> tuple[dict[str, Any], TextConfig]:
    """Read and check fmoe.json; returns the document and the model's config."""
    path = Path(packed) / IDENTITY_FILE
    doc = read_json(path, "not a packed fmoe directory: run `fmoe extract` or `fmoe repack` first")
    if doc.get("format") != "fmoe-packed":
        raise FmoeError(f"{path}: not an fmoe packed-directory identity file")
    if doc.get("version") != FORMAT_VERSION:
        raise FmoeError(f"{path}: format version {doc.get('version')} is not supported (expected {FORMAT_VERSION})")
    cfg = TextConfig.from_dict(
        {"model_type": "qwen3_5_moe_text", **_config_keys(doc.get("text_config", {}))}, where=str(path)
    )
    if doc.get("model_fingerprint") != cfg.fingerprint():
        raise FmoeError(f"{path}: model_fingerprint does not match its text_config (edited or corrupt)")
    return doc, cfg


def _config_keys(d: dict[str, Any]) -> dict[str, Any]:
    """Map a stored TextConfig dict back to config.json key names."""
    d = dict(d)
    d["eos_token_id"] = d.pop("eos_token_ids", None)
    d["rope_parameters"] = {
        "rope_theta": d.pop("rope_theta", None),
        "partial_rotary_factor": d.pop("partial_rotary_factor", None),
    }
    return d


# ---- manifest digests in fmoe.json ----------------------------------------------------------------
def record_manifest_digest(packed_dir: Path, relpath: str) -> None:
    """Record the xxh3_128 of ``packed_dir/relpath`` (a manifest just written) in fmoe.json's
    ``manifests``; fmoe.json is rewritten atomically (the caller holds the directory's lock)."""
    digest = xxhash.xxh3_128_hexdigest((Path(packed_dir) / relpath).read_bytes())
    _update_manifest_digests(Path(packed_dir), relpath, digest)


def forget_manifest_digest(packed_dir: Path, relpath: str) -> None:
    """Drop ``relpath``'s recorded digest (before its manifest is replaced or removed, so that a run
    killed in between leaves "not recorded", never a digest of another version)."""
    if recorded_manifest_digest(packed_dir, relpath) is not None:
        _update_manifest_digests(Path(packed_dir), relpath, None)


def recorded_manifest_digest(packed_dir: Path, relpath: str) -> str | None:
    """The digest fmoe.json records for ``relpath``; None when none (or no readable fmoe.json)."""
    try:
        doc = read_json(Path(packed_dir) / IDENTITY_FILE)
    except FmoeError:
        return None
    digests = doc.get(MANIFEST_DIGESTS)
    value = digests.get(relpath) if isinstance(digests, dict) else None
    return value if isinstance(value, str) else None


def manifest_digest_problem(packed_dir: Path, relpath: str, data: bytes) -> str | None:
    """None when fmoe.json records ``xxh3_128(data)`` for the manifest ``relpath``; else a short text:
    the manifest was changed after it was written, or its digest was never recorded."""
    recorded = recorded_manifest_digest(packed_dir, relpath)
    if recorded is None:
        return "xxh3_128 not recorded (made by an older fmoe? re-run the command)"
    if xxhash.xxh3_128_hexdigest(data) != recorded:
        return (
            f"xxh3_128 differs from the one {IDENTITY_FILE} records (edited or replaced after it was "
            "written; re-run the command that wrote it)"
        )
    return None


def _update_manifest_digests(packed: Path, relpath: str, digest: str | None) -> None:
    path = packed / IDENTITY_FILE
    doc = read_json(path, "not a packed fmoe directory")
    digests = doc.get(MANIFEST_DIGESTS)
    digests = dict(digests) if isinstance(digests, dict) else {}
    if digest is None:
        digests.pop(relpath, None)
    else:
        digests[relpath] = digest
    doc[MANIFEST_DIGESTS] = dict(sorted(digests.items()))
    write_json_atomic(path, doc)
