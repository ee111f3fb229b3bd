"""File-system helpers: atomic writes, checksums, free-space checks."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO, Literal, TextIO, overload

import xxhash

from fmoe.errors import FmoeError

HASH_CHUNK = 16 << 20
_TEMP_SUFFIX = ".tmp"  # atomic_output's temp files are ".NAME.XXXXXXXX.tmp" beside their target


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# mkstemp creates files 0600; artifacts get the permissions a plain open() would give them.
_FILE_MODE = 0o666 & ~_current_umask()


@overload
def atomic_output(path: Path, mode: Literal["wb"] = "wb") -> contextlib.AbstractContextManager[BinaryIO]: ...
@overload
def atomic_output(path: Path, mode: Literal["w"]) -> contextlib.AbstractContextManager[TextIO]: ...
@contextlib.contextmanager
def atomic_output(path: Path, mode: Literal["wb", "w"] = "wb") -> Iterator[Any]:  # the overloads type the file
    """Write ``path`` through a temp file in the same folder, fsync'd and renamed on success.

    On any failure the temp file is removed, so a half-written file never takes the final name.
    A full disk becomes a one-line FmoeError naming the file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=_TEMP_SUFFIX, dir=path.parent)
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


def remove_stale_temps(folder: Path, *, recursive: bool = False) -> None:
    """Delete the temp files a killed run left behind (atomic_output never renamed them)."""
    folder = Path(folder)
    if folder.is_dir():
        for tmp in (folder.rglob if recursive else folder.glob)(f".*{_TEMP_SUFFIX}"):
            _remove_quietly(tmp)


def xxh3_128_file(
    path: Path, offset: int = 0, size: int | None = None, on_bytes: Callable[[int], None] | None = None
) -> str:
    """xxh3_128 hex digest of a file (or a byte range); equals the `xxh128sum` tool's output.

    ``on_bytes`` is called with the size of each chunk read (progress)."""
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
            if on_bytes is not None:
                on_bytes(len(chunk))
    return h.hexdigest()


def file_size(path: Path) -> int | None:
    """The size of a file, None when there is none."""
    try:
        return os.stat(path).st_size
    except (FileNotFoundError, NotADirectoryError):
        return None


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


def read_json_or_none(path: Path) -> dict[str, Any] | None:
    """A JSON object, or None when the file is missing or not a JSON object (state files that a
    killed or older run may have left: they are trusted only when they parse)."""
    try:
        return read_json(path)
    except FmoeError:
        return None


def require_free_space(folder: Path, needed: int, what: str) -> None:
    """Fail early, with a clear message, when ``folder``'s file system lacks ``needed`` bytes."""
    folder = Path(folder)
    probe = folder
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise FmoeError(
            f"{folder}: not enough free disk space for {what}: need {needed / 1e9:.2f} GB, have {free / 1e9:.2f} GB"
        )


def _remove_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
