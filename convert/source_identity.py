"""What an artifact was made from: the identity of a source checkpoint, or of the 4-bit expert
manifest that `fmoe repack PACKED --bits 2` reads.

A checkpoint's identity is cheap to compute and to check, and independent of where the files lie
and of their mtimes (a plain copy is the same source): per safetensors shard holding text-model
tensors, its name, size, the xxh3_128 of its header and the xxh3_128 of ``SAMPLE_BLOCKS`` blocks
of ``SAMPLE_BYTES`` at fixed, evenly spaced offsets of its data (the first and last included). A
fine-tune or a new revision rewrites every tensor, so the samples differ; an edit confined to bytes
between the samples is not seen (that is `fmoe verify --deep`'s job, not the identity's).

``digest`` (xxh3_128 of the canonical JSON of the rest) is what is compared; the details say what
differs. ``root_digest`` is the checkpoint an identity leads back to (a packed-4bit identity
records the checkpoint its manifest was made from).
"""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Any

import xxhash

from fmoe.convert.source import SourceCheckpoint, is_text_tensor
from fmoe.formats.safetensors_io import MAX_HEADER
from fmoe.fsutil import open_regular

SAMPLE_BLOCKS = 8
SAMPLE_BYTES = 64 << 10
CHECKPOINT = "checkpoint"
PACKED_4BIT = "packed-4bit"


def source_identity(src: SourceCheckpoint) -> dict[str, Any]:
    """The identity of an opened source checkpoint (reads each shard's header and samples)."""
    shards = [_shard_identity(src.path, name, size) for name, size in src.shards()]
    body = {"kind": CHECKPOINT, "layout": src.layout, "shards": [s for s in shards if s is not None]}
    return _with_digest(body)


def packed_identity(manifest: Path, checkpoint: dict[str, Any] | None) -> dict[str, Any]:
    """The identity of a packed directory's 4-bit expert manifest (the exact bytes of the file), and
    the checkpoint identity it records (None for one written by an older fmoe)."""
    body = {
        "kind": PACKED_4BIT,
        "manifest_xxh3_128": xxhash.xxh3_128_hexdigest(Path(manifest).read_bytes()),
        "checkpoint_digest": root_digest(checkpoint),
    }
    return _with_digest(body)


def root_digest(identity: Any) -> str | None:
    """The digest of the checkpoint an identity leads back to; None when unknown."""
    if not isinstance(identity, dict):
        return None
    value = identity.get("digest") if identity.get("kind") == CHECKPOINT else identity.get("checkpoint_digest")
    return value if isinstance(value, str) else None


def digest_of(identity: Any) -> str | None:
    """An identity's own digest; None when there is no (well-formed) identity."""
    value = identity.get("digest") if isinstance(identity, dict) else None
    return value if isinstance(value, str) else None


def identity_difference(old: Any, new: dict[str, Any]) -> str:
    """A short text saying how ``new`` differs from the recorded ``old`` (for one-line errors)."""
    if not isinstance(old, dict) or digest_of(old) is None:
        return "no source identity is recorded (made by an older fmoe)"
    if old.get("kind") != new.get("kind"):
        return f"made from {old.get('kind')}, this input is a {new.get('kind')}"
    if new.get("kind") == PACKED_4BIT:
        return "the 4-bit expert manifest it was made from has changed"
    if old.get("layout") != new.get("layout"):
        return f"layout {old.get('layout')}, this source is {new.get('layout')}"
    before = {str(s.get("name")): s for s in old.get("shards", []) if isinstance(s, dict)}
    after = {s["name"]: s for s in new["shards"]}
    if before.keys() != after.keys():
        gone, added = sorted(before.keys() - after.keys()), sorted(after.keys() - before.keys())
        parts = [f"{len(added)} new (e.g. {added[0]})"] if added else []
        parts += [f"{len(gone)} gone (e.g. {gone[0]})"] if gone else []
        return "other shard files: " + ", ".join(parts)
    for name in sorted(after):
        a, b = before[name], after[name]
        if a.get("size") != b["size"]:
            return f"shard {name} has {b['size']} bytes, was {a.get('size')}"
        if a.get("header_xxh3_128") != b["header_xxh3_128"]:
            return f"shard {name} has another safetensors header"
        if a.get("sample_xxh3_128") != b["sample_xxh3_128"]:
            return f"shard {name} holds other data (sampled blocks differ)"
    return "the recorded identity differs"


# ---- internals ---------------------------------------------------------------------------------
def _with_digest(body: dict[str, Any]) -> dict[str, Any]:
    text = json.dumps(body, sort_keys=True, separators=(",", ":"))
    return {**body, "digest": xxhash.xxh3_128_hexdigest(text.encode())}


def _shard_identity(folder: Path, name: str, size: int) -> dict[str, Any] | None:
    """A shard's identity, None for a shard holding no text-model tensor (vision/MTP only: whether
    it was downloaded does not change the text model)."""
    with os.fdopen(open_regular(folder / name), "rb") as f:
        fd = f.fileno()
        header = _header(fd, size)
        if header is not None and not _has_text_tensor(header):
            return None
        data_start = 8 + len(header) if header is not None else 0
        samples = xxhash.xxh3_128()
        for offset in _sample_offsets(data_start, size):
            samples.update(os.pread(fd, SAMPLE_BYTES, offset))
    return {
        "name": name,
        "size": size,
        "header_xxh3_128": xxhash.xxh3_128_hexdigest(header if header is not None else b""),
        "sample_xxh3_128": samples.hexdigest(),
    }


def _header(fd: int, size: int) -> bytes | None:
    """The JSON header's bytes; None when the file has no well-formed length prefix."""
    prefix = os.pread(fd, 8, 0)
    if len(prefix) < 8:
        return None
    (n,) = struct.unpack("<Q", prefix)
    if n > MAX_HEADER or 8 + n > size:
        return None
    return os.pread(fd, n, 8)


def _has_text_tensor(header: bytes) -> bool:
    try:
        keys = json.loads(header)
    except ValueError:
        return True  # unreadable here: keep it in the identity rather than guess
    return not isinstance(keys, dict) or any(k != "__metadata__" and is_text_tensor(k) for k in keys)


def _sample_offsets(start: int, end: int) -> list[int]:
    """Fixed, evenly spaced block offsets over ``[start, end)``; the whole range when it is small."""
    span = end - start
    if span <= SAMPLE_BLOCKS * SAMPLE_BYTES:
        return list(range(start, end, SAMPLE_BYTES))
    last = end - SAMPLE_BYTES
    return [start + (last - start) * i // (SAMPLE_BLOCKS - 1) for i in range(SAMPLE_BLOCKS)]
