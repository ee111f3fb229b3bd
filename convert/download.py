"""`fmoe download`: fetch what the engine needs from a hub repo, pinned to a commit, resumable across
runs, every file verified against the hash the hub lists.

Flow: resolve the revision to a sha (or reuse the sha pinned in DIR/.fmoe-download.json), list the
tree, fetch the shard index, keep only shards holding text tensors, check free space, then fetch each
file into ``<file>.part`` with ``Range: bytes=N-`` (N = bytes already there), check its sha256 (git
blob sha1 for small non-LFS files) and rename it into place.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, BinaryIO

from fmoe.convert.hub import Hub, HubUnreachable, RemoteFile, resolve_endpoint, resolve_repo
from fmoe.convert.source import DOWNLOAD_RECORD, is_text_tensor
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import GENERATION_CONFIG, TOKENIZER_FILES
from fmoe.formats.safetensors_io import INDEX_FILE, MAX_INDEX, SINGLE_FILE
from fmoe.fsutil import (
    HASH_CHUNK,
    check_name,
    check_regular_file,
    confined,
    describe_kind,
    is_plain_name,
    open_regular,
    read_json,
    read_json_or_none,
    regular_file_size,
    require_free_space,
    write_json_atomic,
)
from fmoe.progress import byte_progress

# Besides the weights, the files the engine reads (config.json is required, the others if present).
ENGINE_FILES = ("config.json", GENERATION_CONFIG, *TOKENIZER_FILES)
CHUNK = 1 << 20
RETRIES = 5  # per file, on a broken transfer; each retry resumes where the last one stopped
RETRY_WAIT_S = 1.0  # doubled after each failure, at most 10 s
_SHA = re.compile(r"^[0-9a-f]{40}$")


class _Cancelled(Exception):
    """Another file failed (or Ctrl-C): stop this transfer, keep its .part for the next run."""


def select_shards(weight_map: dict[str, str], include_unused: bool) -> tuple[list[str], list[str]]:
    """(needed, skipped) shard names: a shard is needed when it holds at least one tensor the text
    model reads (shards of vision/MTP tensors only are skipped unless ``include_unused``)."""
    text: dict[str, bool] = {}
    for name, shard in weight_map.items():
        text[shard] = text.get(shard, False) or is_text_tensor(name)
    needed = sorted(s for s, has_text in text.items() if has_text or include_unused)
    return needed, sorted(set(text) - set(needed))


def download(
    repo: str,
    *,
    revision: str = "main",
    target: Path | None = None,
    endpoint: str | None = None,
    token: str | None = None,
    include_unused: bool = False,
    workers: int = 4,
) -> dict[str, Any]:
    """Download ``repo`` (id or alias) at ``revision`` into ``target``; returns a summary.

    Keys: repo, sha, files (count), bytes (their total), dir, fetched_files, fetched_bytes, skipped.
    """
    if workers < 1:
        raise FmoeError(f"--workers {workers}: must be at least 1")
    repo_id = resolve_repo(repo)
    endpoint = resolve_endpoint(endpoint)
    target = Path(target) if target is not None else Path("models") / repo_id.split("/")[-1]
    if target.exists() and not target.is_dir():
        raise FmoeError(f"{target}: exists and is not a directory")
    pin = Pin.load(target, repo_id)

    # the record of an earlier run at this revision (by the name asked for or its sha), if any
    same = pin if pin is not None and revision in (pin.data["revision_requested"], pin.data["sha"]) else None
    if (
        same is not None
        and same.data.get("complete")
        and include_unused <= same.data.get("include_unused", False)
        and same.all_present()
    ):
        return _report(same, target, fetched=(0, 0))  # finished before: no request at all

    hub = Hub(repo_id, endpoint, token)
    sha = same.data["sha"] if same is not None else hub.resolve(revision)
    # What the last run planned or verified, per path; entries are only trusted where the oid still matches.
    previous: dict[str, dict[str, Any]] = dict(pin.data["files"]) if pin is not None else {}
    pin = Pin(
        target,
        {
            "repo": repo_id,
            "revision_requested": revision,
            "sha": sha,
            "endpoint": endpoint,
            "include_unused": include_unused,
            "complete": False,
            "files": dict(previous),
            "skipped": [],
        },
    )
    pin.save()  # a run killed from here on resumes at this sha, even if the branch moves

    listing = hub.list_files(sha)
    if "config.json" not in listing:
        raise FmoeError(f"{repo_id}@{sha}: no config.json; not a model repo")
    fetcher = Fetcher(hub, sha, target, pin, previous)
    with byte_progress() as progress:
        fetcher.progress = progress
        weights, skipped = _plan_weights(listing, fetcher, include_unused)
        plan = [listing[p] for p in ENGINE_FILES if p in listing] + weights
        pin.set_plan(plan, skipped)
        require_free_space(target, sum(fetcher.missing_bytes(f) for f in plan), f"{repo_id} ({len(plan)} files)")
        fetcher.fetch_all(plan, workers)
    pin.data["complete"] = True
    pin.save()
    return _report(pin, target, fetched=(fetcher.fetched_files, fetcher.fetched_bytes))


def _plan_weights(
    listing: dict[str, RemoteFile], fetcher: Fetcher, include_unused: bool
) -> tuple[list[RemoteFile], list[str]]:
    """The weight files to fetch (the index first fetched, to choose shards) and the shards skipped."""
    if INDEX_FILE not in listing:
        if SINGLE_FILE in listing:
            return [listing[SINGLE_FILE]], []
        raise FmoeError(
            f"{fetcher.hub.repo}@{fetcher.sha}: no {INDEX_FILE} nor {SINGLE_FILE}; not a safetensors checkpoint"
        )
    index = listing[INDEX_FILE]
    if index.size > MAX_INDEX:  # it is parsed in memory: refuse a hostile size before fetching it
        raise FmoeError(
            f"{fetcher.hub.repo}@{fetcher.sha}: {INDEX_FILE} is listed at {index.size} bytes, "
            f"over the {MAX_INDEX >> 20} MiB a shard index may have"
        )
    fetcher.fetch_all([index], 1)
    path = fetcher.target / INDEX_FILE
    weight_map = read_json(path, "safetensors index").get("weight_map")
    if not isinstance(weight_map, dict):
        raise FmoeError(f"{path}: not a safetensors index (no weight_map)")
    for tensor, shard in weight_map.items():  # names from a downloaded file: confined to --dir
        check_name(shard, f"{path}: weight_map[{tensor!r}]")
    needed, skipped = select_shards(weight_map, include_unused)
    missing = [s for s in needed if s not in listing]
    if missing:
        raise FmoeError(f"{path}: names shard {missing[0]}, which {fetcher.hub.repo}@{fetcher.sha} lacks")
    return [index] + [listing[s] for s in needed], skipped


def _report(pin: Pin, target: Path, fetched: tuple[int, int]) -> dict[str, Any]:
    files = pin.data["files"]
    return {
        "repo": pin.data["repo"],
        "sha": pin.data["sha"],
        "files": len(files),
        "bytes": sum(f["size"] for f in files.values()),
        "dir": str(target),
        "fetched_files": fetched[0],
        "fetched_bytes": fetched[1],
        "skipped": pin.data.get("skipped", []),
    }


class Pin:
    """DIR/.fmoe-download.json: repo, requested revision, resolved sha, and each planned file's size,
    sha256, git oid and whether it was verified in place; rewritten atomically as files complete."""

    def __init__(self, target: Path, data: dict[str, Any]) -> None:
        self.target, self.data = target, data
        self.path = target / DOWNLOAD_RECORD
        self._lock = threading.Lock()

    @classmethod
    def load(cls, target: Path, repo: str) -> Pin | None:
        path = target / DOWNLOAD_RECORD
        if not path.exists():
            return None
        data = read_json_or_none(path)
        if (
            data is None
            or not isinstance(data.get("files"), dict)
            or not all(isinstance(data.get(k), str) for k in ("repo", "revision_requested", "sha"))
            or not all(_valid_entry(p, f) for p, f in data["files"].items())
        ):
            raise FmoeError(f"{path}: not a valid fmoe download record; delete it to start over")
        if data["repo"] != repo:
            raise FmoeError(f"{target}: holds a download of {data['repo']}, not {repo}; choose another --dir")
        return cls(target, data)

    def save(self) -> None:
        with self._lock:
            write_json_atomic(self.path, self.data)

    def all_present(self) -> bool:
        files = self.data["files"]
        return bool(files) and all(
            f.get("verified") and regular_file_size(self.target / p) == f["size"] for p, f in files.items()
        )

    def set_plan(self, plan: Iterable[RemoteFile], skipped: list[str]) -> None:
        with self._lock:
            old = self.data["files"]
            self.data["files"] = {
                f.path: old[f.path]
                if old.get(f.path, {}).get("oid") == f.oid
                else {"size": f.size, "sha256": f.sha256, "oid": f.oid, "verified": False}
                for f in plan
            }
            self.data["skipped"] = skipped
        self.save()

    def mark_verified(self, f: RemoteFile, sha256: str) -> None:
        with self._lock:
            self.data["files"][f.path] = {"size": f.size, "sha256": sha256, "oid": f.oid, "verified": True}
        self.save()


class Fetcher:
    """Fetches files of one commit into ``target``: resumable, verified, in parallel."""

    def __init__(self, hub: Hub, sha: str, target: Path, pin: Pin, previous: dict[str, dict[str, Any]]) -> None:
        self.hub, self.sha, self.target, self.pin, self.previous = hub, sha, target, pin, previous
        self.progress: Any = None
        self.fetched_files = self.fetched_bytes = 0
        self._stop = threading.Event()
        self._count_lock = threading.Lock()

    def missing_bytes(self, f: RemoteFile) -> int:
        """Bytes still to write for ``f``: counts a finished file or a partial ``.part`` as present."""
        dest = self.target / f.path
        if regular_file_size(dest) == f.size and self._was_verified(f):
            return 0
        part = regular_file_size(_part(dest))
        return f.size - part if part is not None and part <= f.size else f.size

    def fetch_all(self, files: list[RemoteFile], workers: int) -> None:
        """Fetch ``files``; on the first failure the others stop (their .part files stay) and it is raised."""
        total = sum(f.size for f in files)
        task = self.progress.add_task(
            f"{self.hub.repo}", total=total, completed=sum(f.size - self.missing_bytes(f) for f in files)
        )
        self._stop.clear()
        with ThreadPoolExecutor(max_workers=max(1, min(workers, len(files) or 1))) as pool:
            futures = [pool.submit(self.fetch, f, task) for f in files]
            try:
                done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            except BaseException:  # Ctrl-C: let the workers stop at their next chunk
                self._stop.set()
                raise
            errors = [fut.exception() for fut in done if fut.exception() is not None]
            if errors:
                self._stop.set()
        self.progress.remove_task(task)
        real = [e for fut in futures if (e := fut.exception()) is not None and not isinstance(e, _Cancelled)]
        if real:
            raise real[0]

    def _destination(self, f: RemoteFile) -> Path:
        """Where ``f`` goes: inside ``target`` (its name and any symlinked folder on the way checked
        before a folder is made) and, if something is there already, a regular file to replace."""
        dest = confined(self.target, f.path, f"{self.hub.repo}@{self.sha}'s file listing")
        dest.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(dest) and regular_file_size(dest) is None:
            check_regular_file(dest, f"where {f.path} of {self.hub.repo} goes; remove it and re-run")
        return dest

    def fetch(self, f: RemoteFile, task: Any) -> None:
        dest = self._destination(f)
        if self._in_place(f, dest):
            return
        part = _part(dest)
        check = _Check(f)
        have = regular_file_size(part) or 0
        if have > f.size or self.previous.get(f.path, {}).get("oid", f.oid) != f.oid:
            have = 0  # longer than the file, or left from other content (the pinned sha changed)
        with _open_part(part) as out:
            if have:
                check.update_from(part, have)
            out.truncate(have)
            out.seek(have)
            file_task = self.progress.add_task(f.path, total=f.size, completed=have) if f.size > CHUNK else None
            try:
                have = self._transfer(f, out, check, have, lambda n: self._advance(n, task, file_task))
                out.flush()
                os.fsync(out.fileno())
            finally:
                if file_task is not None:
                    self.progress.remove_task(file_task)
        got = check.mismatch()
        if got:
            part.unlink()
            raise CorruptionError(
                f"{dest}: {got} does not match the hub's listing; deleted the download, re-run to fetch it again"
            )
        os.replace(part, dest)
        self.pin.mark_verified(f, check.sha256.hexdigest())
        with self._count_lock:
            self.fetched_files += 1

    def _was_verified(self, f: RemoteFile) -> bool:
        old = self.previous.get(f.path, {})
        return bool(old.get("verified")) and old.get("oid") == f.oid and old.get("size") == f.size

    def _advance(self, n: int, task: Any, file_task: Any) -> None:
        self.progress.advance(task, n)
        if file_task is not None:
            self.progress.advance(file_task, n)
        with self._count_lock:
            self.fetched_bytes += n

    def _in_place(self, f: RemoteFile, dest: Path) -> bool:
        """A final file already there: trusted when the pin says it was verified, else re-hashed."""
        if regular_file_size(dest) != f.size:
            return False
        if self._was_verified(f):
            self.pin.mark_verified(f, self.previous[f.path].get("sha256") or f.sha256 or "")
            return True
        check = _Check(f)
        check.update_from(dest, f.size)
        if check.mismatch():
            return False  # someone else's file of the same size: fetch ours and replace it
        self.pin.mark_verified(f, check.sha256.hexdigest())
        return True

    def _transfer(self, f: RemoteFile, out: Any, check: _Check, have: int, advance: Callable[[int], None]) -> int:
        """Stream the rest of ``f`` into ``out`` (positioned at ``have``); retries a broken transfer."""
        failures = 0
        while have < f.size:
            try:
                with self.hub.stream(self.sha, f.path, have) as response:
                    if have and (response.status_code != 206 or not _range_starts_at(response, have)):
                        advance(-have)  # the server sent the whole file: start over
                        have = 0
                        out.seek(0)
                        out.truncate()
                        check.reset()
                    for chunk in response.iter_bytes():
                        if self._stop.is_set():
                            raise _Cancelled
                        if have + len(chunk) > f.size:
                            raise CorruptionError(
                                f"{self.target / f.path}: the hub sent more than the {f.size} bytes it lists"
                            )
                        out.write(chunk)
                        check.update(chunk)
                        have += len(chunk)
                        advance(len(chunk))
                if have < f.size:
                    raise HubUnreachable(f"{self.hub.endpoint}: transfer of {f.path} ended early at {have} bytes")
            except HubUnreachable:
                failures += 1
                if failures > RETRIES or self._stop.is_set():
                    raise
                time.sleep(min(RETRY_WAIT_S * 2 ** (failures - 1), 10.0))
        return have


class _Check:
    """Running hashes of a file's bytes: sha256 always, git blob sha1 for non-LFS files."""

    def __init__(self, f: RemoteFile) -> None:
        self.f = f
        self.reset()

    def reset(self) -> None:
        self.sha256 = hashlib.sha256()
        self.blob = (
            None
            if self.f.is_lfs or not _SHA.match(self.f.oid)
            else hashlib.sha1(f"blob {self.f.size}\0".encode(), usedforsecurity=False)
        )

    def update(self, data: bytes) -> None:
        self.sha256.update(data)
        if self.blob is not None:
            self.blob.update(data)

    def update_from(self, path: Path, size: int) -> None:
        with os.fdopen(open_regular(path), "rb") as fin:
            remaining = size
            while remaining > 0 and (chunk := fin.read(min(HASH_CHUNK, remaining))):
                self.update(chunk)
                remaining -= len(chunk)

    def mismatch(self) -> str | None:
        """None when the bytes match the listing, else what failed."""
        if self.f.sha256 is not None and self.sha256.hexdigest() != self.f.sha256:
            return "sha256"
        if self.blob is not None and self.blob.hexdigest() != self.f.oid:
            return "git blob sha1"
        return None


def _range_starts_at(response: Any, start: int) -> bool:
    m = re.match(r"bytes (\d+)-", response.headers.get("Content-Range", ""))
    return m is not None and int(m.group(1)) == start


def _valid_entry(path: Any, entry: Any) -> bool:
    """A file entry of the record: a plain name inside DIR (the record could have been edited) and a size."""
    return is_plain_name(path) and isinstance(entry, dict) and type(entry.get("size")) is int


def _open_part(part: Path) -> BinaryIO:
    """The ``.part`` file for reading and writing, created if missing; never through a symlink and
    never a special file (O_NOFOLLOW, O_NONBLOCK, then checked on the descriptor)."""
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(part, flags, 0o666)
    except OSError as exc:  # ELOOP: a symlink; EISDIR: a directory
        raise FmoeError(f"{part}: cannot be written ({exc.strerror}); remove it and re-run") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise FmoeError(f"{part}: is {describe_kind(mode)}, not a regular file; remove it and re-run")
    return os.fdopen(fd, "r+b")


def _part(dest: Path) -> Path:
    return dest.with_name(dest.name + ".part")
