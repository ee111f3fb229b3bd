"""Opening (or creating) the packed output directory of one model, shared by extract and repack.

A packed directory belongs to exactly one model made from one source: its fmoe.json names the
model's fingerprint and, under ``source.identity``, the source checkpoint (convert/source_identity.py).
We write into a directory only if it is new/empty (then fmoe.json is written first) or if its
fmoe.json names the same model; never into another model's artifacts or an unrelated folder. A
directory made from another source checkpoint of the same model (a fine-tune, a new revision) is
refused unless ``overwrite``: then this source takes it over, and the manifests of artifacts made
from any other source are removed first, so the directory never mixes two sources.

The directory is locked (fmoe/locking.py) from before its checks until the command is done.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from fmoe.config import TextConfig
from fmoe.convert.source_identity import digest_of, identity_difference, root_digest
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    DENSE_MANIFEST,
    EXPERT_MANIFEST,
    IDENTITY_FILE,
    PROGRESS_FILE,
    experts_dir_bits,
    forget_manifest_digest,
    identity_document,
    read_identity,
)
from fmoe.fsutil import read_json_or_none, write_json_atomic
from fmoe.locking import LOCK_FILE, directory_lock

PACKED_SUFFIX = "-packed"


def default_out(source: Path) -> Path:
    """``SOURCE-packed``, a sibling of the source directory."""
    source = Path(source).absolute()
    return source.with_name(source.name + PACKED_SUFFIX)


def resolve_out(out: Path | str | None, source: Path) -> Path:
    """The packed directory for a source checkpoint: ``out``, else ``SOURCE-packed``; never the
    source itself or a folder inside it (the source is never modified)."""
    out_dir = Path(out) if out is not None else default_out(source)
    src, resolved = Path(source).resolve(), out_dir.resolve()
    if resolved == src or src in resolved.parents:
        raise FmoeError(f"--out: {out_dir} is the source checkpoint or inside it; choose another directory")
    return out_dir


def is_packed_dir(path: Path) -> bool:
    return (Path(path) / IDENTITY_FILE).is_file()


@contextlib.contextmanager
def writing_packed_dir(
    out: Path, cfg: TextConfig, source: dict[str, Any], *, overwrite: bool, command: str
) -> Iterator[Path]:
    """Lock ``out`` for ``command`` and make it ready (:func:`open_packed_dir`) for the block."""
    out = Path(out)
    if not (out / LOCK_FILE).exists():  # else fmoe is (or was) writing it: the lock tells which
        _refuse_foreign(out)  # before the lock file is created in it
    out.mkdir(parents=True, exist_ok=True)
    with directory_lock(out, command):
        yield open_packed_dir(out, cfg, source, overwrite=overwrite)


def open_packed_dir(out: Path, cfg: TextConfig, source: dict[str, Any], *, overwrite: bool = False) -> Path:
    """Make ``out`` ready to receive artifacts of the model ``cfg`` made from ``source``; returns it.

    ``source`` is the fmoe.json ``source`` record (path, layout, repo, revision, identity)."""
    out = Path(out)
    _refuse_foreign(out)
    if (out / IDENTITY_FILE).is_file():
        doc, existing = read_identity(out)
        if existing.fingerprint() != cfg.fingerprint():
            raise FmoeError(
                f"{out}: holds artifacts of another model (fingerprint {doc.get('model_fingerprint')}, "
                f"this source is {cfg.fingerprint()}); choose another --out"
            )
        _claim(out, doc, source, overwrite)
        return out
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / IDENTITY_FILE, identity_document(cfg, source))
    return out


def _refuse_foreign(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise FmoeError(f"{out}: exists and is not a directory")
    if out.is_dir() and not (out / IDENTITY_FILE).is_file() and any(not _ours(p.name) for p in out.iterdir()):
        raise FmoeError(
            f"{out}: not empty and has no {IDENTITY_FILE} (not an fmoe packed directory); choose an empty or new --out"
        )


def _ours(name: str) -> bool:
    """The lock file, or a temp file of a killed first write of fmoe.json."""
    return name == LOCK_FILE or (name.startswith(f".{IDENTITY_FILE}.") and name.endswith(".tmp"))


# ---- the source a directory belongs to ---------------------------------------------------------
def _claim(out: Path, doc: dict[str, Any], source: dict[str, Any], overwrite: bool) -> None:
    """Check that ``source`` is the directory's source; with ``overwrite`` (or in a directory whose
    source is not recorded and that holds no artifact yet) make it so."""
    recorded = _recorded_source(doc).get("identity")
    new = source.get("identity")
    if digest_of(recorded) is not None and digest_of(recorded) == digest_of(new):
        if doc.get("source") != source:  # the same files moved or copied: keep the record current
            write_json_atomic(out / IDENTITY_FILE, {**doc, "source": source})
        return
    artifacts = _artifacts(out)
    if not overwrite and (digest_of(recorded) is not None or artifacts):
        raise FmoeError(_other_source_message(out, doc, recorded, source))
    _drop_foreign(out, artifacts, root_digest(new))
    write_json_atomic(out / IDENTITY_FILE, {**doc, "source": source})


def _recorded_source(doc: dict[str, Any]) -> dict[str, Any]:
    record = doc.get("source")
    return record if isinstance(record, dict) else {}


def _other_source_message(out: Path, doc: dict[str, Any], recorded: Any, source: dict[str, Any]) -> str:
    redo = f"choose a new --out, or pass --overwrite to redo its artifacts from {source.get('path')}"
    new = source.get("identity")
    if digest_of(recorded) is None:
        return f"{out}: its artifacts record no source identity (made by an older fmoe); {redo}"
    was = _recorded_source(doc).get("path")
    what = identity_difference(recorded, new) if isinstance(new, dict) else "this input records no identity"
    return f"{out}: made from another source checkpoint ({was}): {what}; {redo}"


def _artifacts(out: Path) -> dict[str, Path]:
    """The manifests (relative path -> file) and progress logs present in ``out``."""
    found = {DENSE_MANIFEST: out / DENSE_MANIFEST} if (out / DENSE_MANIFEST).is_file() else {}
    for d in sorted(out.iterdir()):
        if d.is_dir() and experts_dir_bits(d.name) is not None:
            for name in (EXPERT_MANIFEST, PROGRESS_FILE):
                if (d / name).is_file():
                    found[f"{d.name}/{name}"] = d / name
    return found


def _drop_foreign(out: Path, artifacts: dict[str, Path], root: str | None) -> None:
    """Remove the manifests of artifacts not made from the checkpoint ``root`` and every progress
    log (resuming is for one source), so nothing of the old source can be taken for finished."""
    for rel, path in artifacts.items():
        if rel.endswith(PROGRESS_FILE):
            path.unlink(missing_ok=True)
            continue
        doc = read_json_or_none(path) or {}
        if root is None or root_digest(doc.get("source_identity")) != root:
            forget_manifest_digest(out, rel)
            path.unlink(missing_ok=True)
