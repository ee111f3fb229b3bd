"""File-system helpers: atomic writes, checksums, free-space checks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import xxhash

from fmoe.errors import FmoeError

HASH_CHUNK = 16 << 20


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; artifacts get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


@contextlib.contextmanager
def atomic_output(path: Path, mode: str = "wb") -> Iterator[BinaryIO]:
    """Write ``path`` through a temp file in the same folder, fsync'd and renamed on success.

    On any failure the temp file is removed, so a half-written file never takes the final name.
    A full disk becomes a one-line FmoeError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, _FILE_MODE)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        _remove_quietly(tmp)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise FmoeError(f"{path}: disk full while writing ({exc.strerror})") from None
        raise
    except BaseException:
        _remove_quietly(tmp)
        raise


def write_json_atomic(path: Path, data: Any) -> None:
    with atomic_output(path, "w") as f:
        json.dump(data, f, indent=1)
        f.write("\n")


def copy_atomic(src: Path, dst: Path) -> None:
    with open(src, "rb") as fin, atomic_output(dst) as fout:
        shutil.copyfileobj(fin, fout, HASH_CHUNK)


def xxh3_128_file(path: Path, offset: int = 0, size: int | None = None) -> str:
    """xxh3_128 hex digest of a file (or a byte range); equals the `xxh128sum` tool's output."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        f.seek(offset)
        remaining = size
        while remaining is None or remaining > 0:
            chunk = f.read(HASH_CHUNK if remaining is None else min(HASH_CHUNK, remaining))
            if not chunk:
                break
            h.update(chunk)
            if remaining is not None:
                remaining -= len(chunk)
    return h.hexdigest()


def read_json(path: Path, what: str = "") -> dict[str, Any]:
    """Read a JSON object, turning a missing or malformed file into a one-line FmoeError."""
    if not path.is_file():
        raise FmoeError(f"{path}: missing ({what})" if what else f"{path}: no such file")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FmoeError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise FmoeError(f"{path}: expected a JSON object" + (f" ({what})" if what else ""))
    return data


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Fail early, with a clear message, when ``folder``'s file system lacks ``needed`` bytes."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise FmoeError(
            f"{folder}: not enough free disk space for {what}: need {needed / 1e9:.2f} GB, "
            f"have {free / 1e9:.2f} GB"
        )


def _remove_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
