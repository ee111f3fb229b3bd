"""Saving a session to a file and resuming it in a later run (``fmoe chat --session FILE``).

The file holds the session's token ids, pending token and every layer's state (the KV caches of
the attention layers, the conv and recurrent state of the DeltaNet layers) as float32 arrays,
with the identity of the model that computed them. Layout::

    b"FMOESESS" | u32 version | u64 header length | 16-byte xxh3_128 of the header
    | header (JSON) | arrays, each at the offset the header gives, xxh3_128 of all of them in the header

A file from another model (fingerprint, expert bits or experts per token differ) or one whose
checksums fail is refused with one line; it is written atomically (never half a file).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.errors import FmoeError
from fmoe.fsutil import atomic_output
from fmoe.runtime.engine.session import Session
from fmoe.runtime.state import LinearState

MAGIC = b"FMOESESS"
VERSION = 1
_PREAMBLE = struct.Struct("<8sIQ16s")
_ALIGN = 64
MAX_HEADER = 256 << 20


def model_identity(engine: Any) -> dict[str, Any]:
    """What must match for a saved state to be resumed: the packed model (fmoe.json's fingerprint
    and manifest digests), the expert bits and the experts per token."""
    identity: dict[str, Any] = {"bits": int(engine.bits), "k": int(engine.k)}
    try:
        doc = json.loads((Path(engine.packed_dir) / "fmoe.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        doc = {}
    if isinstance(doc, dict):
        identity["fingerprint"] = doc.get("model_fingerprint")
        identity["manifests"] = doc.get("manifests")
    return identity


def save_session(path: Path | str, session: Session, engine: Any, meta: dict[str, Any] | None = None) -> int:
    """Write ``session`` (of ``engine``) to ``path``; returns the bytes written. ``meta``: JSON
    the caller wants back (the chat keeps its settings there)."""
    backend = engine.runner.backend
    arrays: list[np.ndarray] = []
    layers: list[dict[str, Any]] = []

    def add(x: np.ndarray) -> dict[str, Any]:
        x = np.ascontiguousarray(x, dtype=np.float32)
        arrays.append(x)
        return {"shape": list(x.shape), "index": len(arrays) - 1}

    for i, layer in enumerate(session.state.layers):
        if isinstance(layer, LinearState):
            conv, rec = backend.to_numpy(layer.conv), backend.to_numpy(layer.recurrent)
            layers.append({"kind": "linear", "conv": add(conv), "recurrent": add(rec)})
        else:
            k, v = _kv_arrays(layer, backend, i)
            layers.append({"kind": "kv", "keys": add(k), "values": add(v)})
    offsets, total = [], 0
    for a in arrays:
        offsets.append(total)
        total += -(-a.nbytes // _ALIGN) * _ALIGN
    digest = xxhash.xxh3_128()
    for a in arrays:
        digest.update(a.tobytes())
    header = {
        "model": model_identity(engine),
        "position": session.state.position,
        "token_ids": [int(t) for t in session.token_ids],
        "pending": [int(t) for t in session.pending],
        "layers": layers,
        "offsets": offsets,
        "payload_bytes": total,
        "payload_xxh3_128": digest.hexdigest(),
        "meta": meta or {},
    }
    raw = json.dumps(header).encode()
    raw += b" " * (-(len(raw) + _PREAMBLE.size) % _ALIGN)  # arrays start aligned
    with atomic_output(Path(path), "wb") as f:
        f.write(_PREAMBLE.pack(MAGIC, VERSION, len(raw), xxhash.xxh3_128_digest(raw)))
        f.write(raw)
        for a in arrays:
            f.write(a.tobytes())
            f.write(b"\0" * (-a.nbytes % _ALIGN))
    return _PREAMBLE.size + len(raw) + total


def load_session(path: Path | str, engine: Any) -> tuple[Session, dict[str, Any]]:
    """The session saved in ``path``, rebuilt for ``engine``, and the saved ``meta``."""
    path = Path(path)
    try:
        return _load(path, engine)
    except (KeyError, TypeError, ValueError, IndexError) as exc:  # a header that passed its checksum but not ours
        raise FmoeError(f"{path}: corrupt session file ({type(exc).__name__}: {exc})") from None


def _load(path: Path, engine: Any) -> tuple[Session, dict[str, Any]]:
    with open(path, "rb") as f:
        pre = f.read(_PREAMBLE.size)
        if len(pre) != _PREAMBLE.size or pre[:8] != MAGIC:
            raise FmoeError(f"{path}: not an fmoe session file")
        _, version, size, header_digest = _PREAMBLE.unpack(pre)
        if version != VERSION:
            raise FmoeError(f"{path}: session file version {version}; this fmoe reads version {VERSION}")
        if size > MAX_HEADER:
            raise FmoeError(f"{path}: corrupt session file (header of {size} bytes)")
        raw = f.read(size)
        if len(raw) != size or xxhash.xxh3_128_digest(raw) != header_digest:
            raise FmoeError(f"{path}: corrupt session file (header checksum mismatch)")
        header = json.loads(raw)
        payload = f.read(int(header["payload_bytes"]) + 1)
    if len(payload) != header["payload_bytes"]:
        raise FmoeError(
            f"{path}: corrupt session file (payload is {len(payload)} bytes, not {header['payload_bytes']})"
        )
    want = model_identity(engine)
    if header["model"] != want:
        diff = sorted(k for k in set(want) | set(header["model"]) if header["model"].get(k) != want.get(k))
        raise FmoeError(f"{path}: saved with another model or settings ({', '.join(diff)} differ); start a new session")
    shapes = [(ref["index"], ref["shape"]) for layer in header["layers"] for key, ref in layer.items() if key != "kind"]
    arrays: dict[int, np.ndarray] = {}
    digest = xxhash.xxh3_128()
    for index, shape in sorted(shapes):
        off = header["offsets"][index]
        n = int(np.prod(shape)) * 4
        arrays[index] = np.frombuffer(payload, dtype=np.float32, count=n // 4, offset=off).reshape(shape)
        digest.update(arrays[index].tobytes())
    if digest.hexdigest() != header["payload_xxh3_128"]:
        raise FmoeError(f"{path}: corrupt session file (state checksum mismatch)")
    backend = engine.runner.backend
    state = engine.runner.new_state()
    if len(state.layers) != len(header["layers"]):
        raise FmoeError(f"{path}: {len(header['layers'])} layers saved, the model has {len(state.layers)}")
    for i, (fresh, saved) in enumerate(zip(state.layers, header["layers"], strict=True)):
        if isinstance(fresh, LinearState) != (saved["kind"] == "linear"):
            raise FmoeError(f"{path}: layer {i} is of another kind than the model's")
        if saved["kind"] == "linear":
            conv, rec = arrays[saved["conv"]["index"]], arrays[saved["recurrent"]["index"]]
            if conv.shape != tuple(backend.to_numpy(fresh.conv).shape) or rec.shape != tuple(
                backend.to_numpy(fresh.recurrent).shape
            ):
                raise FmoeError(f"{path}: layer {i}'s state has another shape than the model's")
            state.layers[i] = LinearState(backend.asarray(conv.copy()), backend.asarray(rec.copy()))
        else:
            k, v = arrays[saved["keys"]["index"]], arrays[saved["values"]["index"]]
            cache = backend.new_kv_cache(k.shape[0], k.shape[2])
            if k.shape[1]:
                cache.append(backend.asarray(k.transpose(1, 0, 2).copy()), backend.asarray(v.transpose(1, 0, 2).copy()))
            state.layers[i] = cache
    state.position = int(header["position"])
    if len(header["token_ids"]) != state.position:
        raise FmoeError(
            f"{path}: corrupt session file ({len(header['token_ids'])} tokens for position {state.position})"
        )
    session = Session(state, list(header["token_ids"]), list(header["pending"]))
    engine.runner.check_tokens(session.conversation or [0])  # ids inside this model's vocabulary
    return session, dict(header.get("meta") or {})


def _kv_arrays(cache: Any, backend: Any, layer: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values ``[Hkv, length, D]`` of a backend's KV cache (the CPU one has ``keys`` and
    ``values``; the torch and MLX ones ``k`` and ``v`` with spare capacity, MLX's with a batch axis)."""
    length = int(getattr(cache, "length", -1))
    for k_name, v_name in (("keys", "values"), ("k", "v")):
        k, v = getattr(cache, k_name, None), getattr(cache, v_name, None)
        if k is None or v is None or callable(k):
            continue
        k, v = backend.to_numpy(k), backend.to_numpy(v)
        if k.ndim == 4 and k.shape[0] == 1:
            k, v = k[0], v[0]
        if k.ndim == 3 and length >= 0:
            return k[:, :length], v[:, :length]
    raise FmoeError(f"layer {layer}: the {backend.name} backend's KV cache cannot be saved to a session file")
