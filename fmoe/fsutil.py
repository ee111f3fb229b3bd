"""File-system helpers: atomic writes, checksums, free-space checks, and the confinement of names that
come from files or servers (shard indexes, hub listings) to their directory."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
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
        # text is UTF-8 whatever the locale (an ASCII locale refused the synthetic tokenizer's JSON)
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
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
    """Copy ``src`` (a regular file: a FIFO or device is refused, never read) to ``dst`` atomically."""
    with os.fdopen(open_regular(src), "rb") as fin, atomic_output(dst) as fout:
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


def regular_file_size(path: Path) -> int | None:
    """The size of a regular file (symlinks followed); None when it is missing or special (a FIFO,
    a directory, a device), so that callers never open such a file to hash or resume it."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size if stat.S_ISREG(st.st_mode) else None


MAX_JSON = 64 << 20  # configs and manifests; the largest (a 2.4T model's expert manifest) is about 5 MB


def read_json(path: Path, what: str = "") -> dict[str, Any]:
    """Read a JSON object, turning a missing, special, oversized or malformed file into a one-line
    FmoeError (the size is checked before anything is read)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FmoeError(f"{path}: missing ({what})" if what else f"{path}: no such file")
    with os.fdopen(open_regular(path, what), "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size > MAX_JSON:
            raise FmoeError(f"{path}: {size} bytes, more than the {MAX_JSON >> 20} MiB fmoe reads from a JSON file")
        raw = f.read(size + 1)
    try:
        data = json.loads(raw.decode("utf-8"))
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


# ---- names from files and servers, special files ------------------------------------------------------
def is_plain_name(name: object) -> bool:
    """Whether ``name`` is a plain relative path (``a/b.safetensors``) that cannot leave its folder.

    Not: non-strings, empty names, NUL bytes, ``.``/``..`` or empty segments (``/`` or ``\\``
    separated), and anything anchored under POSIX or Windows rules (``/x``, ``C:x``, ``\\\\host\\x``),
    so that ``folder / name`` stays in ``folder`` lexically, on either system.
    """
    if not isinstance(name, str) or not name or "\0" in name:
        return False
    if any(s in ("", ".", "..") for s in name.replace("\\", "/").split("/")):
        return False
    return not any(p.drive or p.root for p in (PurePosixPath(name), *map(PureWindowsPath, name.split("/"))))


def check_name(name: object, what: str) -> str:
    """``name`` if :func:`is_plain_name`, else a one-line FmoeError saying ``what`` named it."""
    if not is_plain_name(name):
        text = repr(name) if len(repr(name)) <= 120 else repr(name)[:117] + "..."
        raise FmoeError(f"{what}: {text} is not a plain relative file name inside the directory")
    assert isinstance(name, str)
    return name


def confined(root: Path, name: object, what: str = "") -> Path:
    """``root / name`` for a ``name`` read from a file or a server, refusing (one-line FmoeError) a name
    that is not a plain relative path or that resolves, through symlinks, outside ``root``.

    A symlink to a file inside ``root`` is fine. The one exception to "inside": a snapshot folder of
    the Hugging Face cache (``.../snapshots/<rev>``), whose files are symlinks into the repo's
    ``blobs/`` folder next to it.
    """
    root = Path(root)
    path = root / check_name(name, f"{root}: {what}" if what else str(root))
    try:
        real = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop (RuntimeError before Python 3.13)
        raise FmoeError(f"{path}: cannot be resolved ({exc})") from None
    if not any(real == base or base in real.parents for base in _trusted_roots(root)):
        named = f" (named by {what})" if what else ""
        raise FmoeError(f"{path}{named}: resolves to {real}, outside {root}")
    return path


def _trusted_roots(root: Path) -> list[Path]:
    """Where files under ``root`` may resolve: ``root`` itself, plus ``blobs/`` for a HF-cache snapshot."""
    real = root.resolve()
    bases = [real]
    if real.parent.name == "snapshots" and (real.parent.parent / "blobs").is_dir():
        bases.append(real.parent.parent / "blobs")
    return bases


def describe_kind(mode: int) -> str:
    """What a non-regular file is, in words (for errors)."""
    kinds = (
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
    )
    return next((words for test, words in kinds if test(mode)), "a special file")


def check_regular_file(path: Path, what: str = "") -> os.stat_result:
    """The ``os.stat`` of ``path`` (symlinks followed) if it is a regular file; otherwise a one-line
    FmoeError naming it: missing, a broken symlink, a directory, a FIFO, a device or a socket.

    Only ``stat`` is used, so a FIFO or a device is refused without ever being opened."""
    path = Path(path)
    suffix = f" ({what})" if what else ""
    try:
        st = os.stat(path)
    except (FileNotFoundError, NotADirectoryError):
        broken = os.path.islink(path)
        raise FmoeError(f"{path}: {'a symlink to a missing file' if broken else 'missing'}{suffix}") from None
    except OSError as exc:  # a symlink loop, no permission, a name too long
        raise FmoeError(f"{path}: cannot be read ({exc.strerror}){suffix}") from None
    if not stat.S_ISREG(st.st_mode):
        raise FmoeError(f"{path}: is {describe_kind(st.st_mode)}, not a regular file{suffix}")
    return st


def open_regular(path: Path, what: str = "") -> int:
    """A read-only descriptor of the regular file ``path`` (see :func:`check_regular_file`).

    Checked before opening (nothing special is opened) and again on the descriptor: opened with
    O_NONBLOCK, a FIFO swapped in between the two cannot block the open, and it is then refused."""
    check_regular_file(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise FmoeError(f"{path}: cannot be opened ({exc.strerror})" + (f" ({what})" if what else "")) from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FmoeError(f"{path}: is {describe_kind(mode)}, not a regular file" + (f" ({what})" if what else ""))
    return fd


def _remove_quietly(path: str | os.PathLike[str]) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
