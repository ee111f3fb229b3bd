"""`fmoe info`: what a directory holds, a packed fmoe directory or a source checkpoint.

Reads only manifests, headers and file sizes: it never hashes (that is `fmoe verify`'s job), so
it answers at once even for a 200 GB artifact.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    DENSE_BIN,
    DENSE_MANIFEST,
    EXPERT_MANIFEST,
    IDENTITY_FILE,
    TOKENIZER_FILES,
    experts_dir_bits,
    progress_entries,
    read_identity,
)
from fmoe.fsutil import read_json


def describe(path: Path) -> dict[str, Any]:
    """A JSON-ready description of ``path`` (``kind`` is ``packed`` or ``source``)."""
    path = Path(path)
    if not path.is_dir():
        raise FmoeError(f"{path}: no such directory")
    if (path / IDENTITY_FILE).is_file():
        return _describe_packed(path)
    if (path / "config.json").is_file():
        return _describe_source(path)
    raise FmoeError(
        f"{path}: neither a packed fmoe directory (no {IDENTITY_FILE}) nor a source checkpoint (no config.json)"
    )


def geometry(cfg: TextConfig) -> dict[str, Any]:
    return {
        "layers": cfg.num_hidden_layers,
        "full_attention_layers": sum(cfg.is_full_attention(L) for L in range(cfg.num_hidden_layers)),
        "hidden_size": cfg.hidden_size,
        "experts": cfg.num_experts,
        "experts_per_token": cfg.num_experts_per_tok,
        "moe_intermediate_size": cfg.moe_intermediate_size,
        "vocab_size": cfg.vocab_size,
    }


# ---- packed ------------------------------------------------------------------------------------
def _describe_packed(path: Path) -> dict[str, Any]:
    identity, cfg = read_identity(path)
    source = identity.get("source") or {}
    experts = [
        _describe_experts(d, bits, cfg)
        for d in sorted(path.iterdir())
        if d.is_dir() and (bits := experts_dir_bits(d.name)) is not None
    ]
    manifests = [IDENTITY_FILE] + [DENSE_MANIFEST] * (path / DENSE_MANIFEST).is_file()
    manifests += [f"{d['dir']}/{EXPERT_MANIFEST}" for d in experts if d["manifest"]]
    return {
        "kind": "packed",
        "path": str(path),
        "model": {
            "fingerprint": identity["model_fingerprint"],
            "source": {k: source.get(k) for k in ("layout", "repo", "revision", "path")},
        },
        "geometry": geometry(cfg),
        "dense": _describe_dense(path),
        "experts": experts,
        "tokenizer": {name: (path / name).is_file() for name in TOKENIZER_FILES},
        "checksums": {"manifests": manifests, "state": "not verified (run `fmoe verify`)"},
    }


def _describe_dense(path: Path) -> dict[str, Any]:
    bin_path, manifest_path = path / DENSE_BIN, path / DENSE_MANIFEST
    size = bin_path.stat().st_size if bin_path.is_file() else None
    if not manifest_path.exists():
        state = "missing (run `fmoe extract`)" if size is None else "incomplete (no manifest: rerun `fmoe extract`)"
        return {"state": state, "bits": None, "bytes": size, "tensors": None}
    try:
        m = read_json(manifest_path, "dense manifest")
    except FmoeError as exc:
        return {"state": f"manifest unreadable: {exc}", "bits": None, "bytes": size, "tensors": None}
    tensors = m.get("tensors")
    n = len(tensors) if isinstance(tensors, dict) else None
    if size is None:
        state = f"{DENSE_BIN} missing"
    elif size != m.get("file_size"):
        state = f"size {size} differs from the manifest's {m.get('file_size')}"
    else:
        state = "complete"
    return {"state": state, "bits": m.get("dense_bits"), "bytes": size, "tensors": n}


def _describe_experts(folder: Path, bits: int, cfg: TextConfig) -> dict[str, Any]:
    expected = cfg.num_hidden_layers * cfg.num_experts
    files, nbytes = _count_expert_files(folder)
    out: dict[str, Any] = {
        "dir": folder.name,
        "bits": bits,
        "files": files,
        "expected": expected,
        "bytes": nbytes,
        "manifest": False,
        "method": None,
        "from": None,
        "rel_rms": None,
    }
    manifest_path = folder / EXPERT_MANIFEST
    progress = progress_entries(folder)
    if manifest_path.exists():
        try:
            m = read_json(manifest_path, "expert manifest")
        except FmoeError as exc:
            return out | {"state": f"manifest unreadable: {exc}"}
        out["manifest"] = True
        quant = _dict(m.get("quantization"))
        method = quant.get("method") if isinstance(quant.get("method"), str) else None
        out |= {
            "method": method,
            "from": quant.get("from"),
            "rel_rms": None if method is None else _dict(_dict(quant.get("error")).get(method)).get("rel_rms"),
        }
        if m.get("model_fingerprint") != cfg.fingerprint():
            out["state"] = "manifest of another model"
        elif files == expected:
            out["state"] = "complete"
        else:
            out["state"] = f"manifest present but {files} of {expected} files on disk"
    elif progress:
        out["state"] = f"in progress or interrupted ({len(progress)} of {expected} files recorded)"
    else:
        out["state"] = "incomplete (no manifest)"
    return out


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _count_expert_files(folder: Path) -> tuple[int, int]:
    """Finished expert files and their bytes (temp files of an unfinished write are not counted)."""
    files = nbytes = 0
    for layer in os.scandir(folder):
        if not (layer.is_dir() and layer.name.startswith("layer_")):
            continue
        for entry in os.scandir(layer.path):
            if entry.name.startswith("expert_") and entry.name.endswith(".bin") and entry.is_file():
                files += 1
                nbytes += entry.stat().st_size
    return files, nbytes


# ---- source ------------------------------------------------------------------------------------
def _describe_source(path: Path) -> dict[str, Any]:
    from fmoe.convert.source import SourceCheckpoint

    with SourceCheckpoint.open(path) as src:
        d = src.describe()
        return {
            "kind": "source",
            "path": str(path),
            "layout": src.layout,
            "model_fingerprint": d["model_fingerprint"],
            "repo": d.get("repo"),
            "revision": d.get("revision"),
            "shards": [{"file": name, "bytes": size} for name, size in src.shards()],
            "bytes": src.total_bytes(),
            "geometry": geometry(src.config),
            "experts": {"dtype": d["expert_dtype"], "bits": d["expert_bits"]},
            "dense_tensors": d.get("dense_tensors"),
            "dense_quantized": d.get("dense_quantized"),
        }
