"""Opening (or creating) the packed output directory of one model, shared by extract and repack.

A packed directory belongs to exactly one model: its fmoe.json names the model's fingerprint.
We write into a directory only if it is new/empty (then fmoe.json is written first) or if its
fmoe.json names the same model; never into another model's artifacts or an unrelated folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.packed import IDENTITY_FILE, identity_document, read_identity
from fmoe.fsutil import write_json_atomic

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


def open_packed_dir(out: Path, cfg: TextConfig, source: dict[str, Any]) -> Path:
    """Make ``out`` ready to receive artifacts of the model ``cfg``; returns it.

    ``source`` is the fmoe.json ``source`` record, written only when the directory is new.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FmoeError(f"{out}: exists and is not a directory")
    if (out / IDENTITY_FILE).is_file():
        doc, existing = read_identity(out)
        if existing.fingerprint() != cfg.fingerprint():
            raise FmoeError(
                f"{out}: holds artifacts of another model (fingerprint {doc.get('model_fingerprint')}, "
                f"this source is {cfg.fingerprint()}); choose another --out"
            )
        return out
    if out.is_dir() and any(out.iterdir()):
        raise FmoeError(
            f"{out}: not empty and has no {IDENTITY_FILE} (not an fmoe packed directory); choose an empty or new --out"
        )
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / IDENTITY_FILE, identity_document(cfg, source))
    return out
