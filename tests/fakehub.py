"""A fake Hugging Face hub for offline tests: a stdlib ThreadingHTTPServer on 127.0.0.1 (port 0).

It speaks the part of the hub protocol that huggingface_hub and `fmoe download` use:
  GET  /api/models/{org}/{name}/revision/{rev}          -> {"id", "sha"}
  GET  /api/models/{org}/{name}/tree/{rev}?recursive=.. -> [{type, path, size, oid[, lfs]}]
  HEAD/GET /{org}/{name}/resolve/{rev}/{path}           -> the bytes (LFS files via a same-origin
                                                           302 to /_lfs/{sha256}, like the CDN hop)
with `Range: bytes=N-` (206), X-Repo-Commit / ETag headers, and the hub's errors (404 + X-Error-Code
RepoNotFound / RevisionNotFound / EntryNotFound, gated 401/403 GatedRepo, 401 for an unknown token).
Every request is logged (method, path, Range, token) so tests can count GETs.

In pytest: use the ``fake_hub`` fixture. From a shell: ``python tests/fakehub.py ORG/NAME FOLDER``
serves FOLDER's files as ORG/NAME and prints the endpoint URL.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest

LFS_SUFFIXES = (".safetensors", ".bin", ".gguf", ".png", ".pt")
CHUNK = 64 << 10


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def is_lfs(path: str, data: bytes) -> bool:
    return path.endswith(LFS_SUFFIXES) or path == "tokenizer.json" or len(data) > (10 << 20)


@dataclass
class FakeRepo:
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    gated: bool = False


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    token: str | None


class FakeHub:
    """Repos in memory; ``slow`` (path -> seconds per 64 KiB chunk), ``corrupt`` (paths served with one
    byte flipped) and ``drop_once`` shape the file GETs; ``tokens`` maps a valid token to the gated
    repos it may read; ``listing_hook`` (entries -> entries) rewrites every tree listing, to play a
    hostile or broken hub."""

    def __init__(self) -> None:
        self.repos: dict[str, FakeRepo] = {}
        self.log: list[Request] = []
        self.slow: dict[str, float] = {}
        self.corrupt: set[str] = set()
        self.drop_once: dict[str, int] = {}  # path -> close the connection after this many bytes, once
        self.tokens: dict[str, set[str]] = {}
        self.listing_hook: Callable[[list[dict[str, Any]]], list[dict[str, Any]]] | None = None
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._counter = 0

    # ---- content
    def add_repo(self, repo: str, files: dict[str, bytes], *, gated: bool = False, branch: str = "main") -> str:
        self.repos[repo] = FakeRepo(gated=gated)
        return self.commit(repo, files, branch=branch)

    def commit(self, repo: str, files: dict[str, bytes], *, branch: str = "main") -> str:
        """A new commit holding ``files``; ``branch`` moves to it. Returns its sha."""
        self._counter += 1
        h = hashlib.sha1(f"{repo}:{self._counter}".encode())
        for path in sorted(files):
            h.update(path.encode() + b"\0" + hashlib.sha256(files[path]).digest())
        sha = h.hexdigest()
        self.repos[repo].commits[sha] = dict(files)
        self.repos[repo].refs[branch] = sha
        return sha

    def requests(self, method: str | None = None, kind: str | None = None) -> list[Request]:
        """Logged requests, optionally of one method and one kind: 'api', 'resolve' or 'lfs'."""
        prefix = {"api": "/api/", "lfs": "/_lfs/"}.get(kind or "", "")
        with self._lock:
            out = list(self.log)
        return [
            r
            for r in out
            if (method is None or r.method == method)
            and (kind is None or (r.path.startswith(prefix) if prefix else "/resolve/" in r.path))
        ]

    # ---- server
    @property
    def url(self) -> str:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_Handler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class _Handler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, *args: Any) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._route(head=True)

    def do_GET(self) -> None:
        self._route(head=False)

    # ---- routing
    def _route(self, head: bool) -> None:
        path = urlsplit(self.path).path
        auth = self.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None
        with self.fake._lock:
            self.fake.log.append(Request(self.command, path, self.headers.get("Range"), token))
        try:
            if token is not None and token not in self.fake.tokens:
                return self._error(401, None, "Invalid credentials in Authorization header")
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", path):
                return self._revision(m.group(1), unquote(m.group(2)))
            if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)(/.*)?", path):
                return self._tree(m.group(1), unquote(m.group(2)))
            if m := re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._resolve(m.group(1), unquote(m.group(2)), unquote(m.group(3)), token, head)
            if m := re.fullmatch(r"/_lfs/([0-9a-f]{64})", path):
                return self._lfs(m.group(1), head)
            return self._error(404, None, "Not found")
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (a killed download): nothing to answer

    def _snapshot(self, repo_id: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", "Repository not found")
            return None
        sha = repo.refs.get(rev, rev)
        if sha not in repo.commits:
            self._error(404, "RevisionNotFound", "Invalid rev id: " + rev)
            return None
        return sha, repo.commits[sha]

    def _revision(self, repo_id: str, rev: str) -> None:
        if (snap := self._snapshot(repo_id, rev)) is not None:
            sha, files = snap
            self._json(
                {
                    "id": repo_id,
                    "modelId": repo_id,
                    "sha": sha,
                    "private": False,
                    "gated": "manual" if self.fake.repos[repo_id].gated else False,
                    "siblings": [{"rfilename": p} for p in sorted(files)],
                }
            )

    def _tree(self, repo_id: str, rev: str) -> None:
        if (snap := self._snapshot(repo_id, rev)) is None:
            return
        entries: list[dict[str, Any]] = []
        folders = sorted({p.rsplit("/", 1)[0] for p in snap[1] if "/" in p})
        entries += [
            {"type": "directory", "oid": hashlib.sha1(d.encode()).hexdigest(), "size": 0, "path": d} for d in folders
        ]
        for path, data in sorted(snap[1].items()):
            entry: dict[str, Any] = {"type": "file", "path": path, "size": len(data)}
            if is_lfs(path, data):
                sha256 = hashlib.sha256(data).hexdigest()
                pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {len(data)}\n"
                entry["oid"] = git_blob_sha1(pointer.encode())
                entry["lfs"] = {"oid": sha256, "size": len(data), "pointerSize": len(pointer)}
            else:
                entry["oid"] = git_blob_sha1(data)
            entries.append(entry)
        if self.fake.listing_hook is not None:
            entries = self.fake.listing_hook(entries)
        self._json(entries)

    def _resolve(self, repo_id: str, rev: str, path: str, token: str | None, head: bool) -> None:
        repo = self.fake.repos.get(repo_id)
        if repo is not None and repo.gated and repo_id not in self.fake.tokens.get(token or "", set()):
            msg = f"Access to model {repo_id} is restricted and you are not in the authorized list."
            return self._error(403 if token else 401, "GatedRepo", msg)
        if (snap := self._snapshot(repo_id, rev)) is None:
            return
        sha, files = snap
        if path not in files:
            return self._error(404, "EntryNotFound", f"{path} does not exist on {rev}")
        data = files[path]
        extra = {"X-Repo-Commit": sha}
        if is_lfs(path, data):
            sha256 = hashlib.sha256(data).hexdigest()
            extra |= {
                "ETag": f'"{sha256}"',
                "X-Linked-Etag": f'"{sha256}"',
                "X-Linked-Size": str(len(data)),
                "Location": f"/_lfs/{sha256}",
            }
            self.send_response(302)
            for k, v in extra.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        extra["ETag"] = f'"{git_blob_sha1(data)}"'
        self._serve(path, data, extra, head)

    def _lfs(self, sha256: str, head: bool) -> None:
        for repo in self.fake.repos.values():
            for files in repo.commits.values():
                for path, data in files.items():
                    if hashlib.sha256(data).hexdigest() == sha256:
                        return self._serve(path, data, {"ETag": f'"{sha256}"'}, head)
        self._error(404, None, "Not found")

    def _serve(self, path: str, data: bytes, extra: dict[str, str], head: bool) -> None:
        if path in self.fake.corrupt:
            mid = len(data) // 2
            data = data[:mid] + bytes([data[mid] ^ 0xFF]) + data[mid + 1 :]
        start, status = 0, 200
        if rng := self.headers.get("Range"):
            m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng.strip())
            if m is None or int(m.group(1)) >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            start, status = int(m.group(1)), 206
            end = int(m.group(2)) + 1 if m.group(2) else len(data)
            data_end = min(end, len(data))
        else:
            data_end = len(data)
        self.send_response(status)
        for k, v in extra.items():
            self.send_header(k, v)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(data_end - start))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{data_end - 1}/{len(data)}")
        self.end_headers()
        if head:
            return
        delay = self.fake.slow.get(path, 0.0)
        with self.fake._lock:
            drop = self.fake.drop_once.pop(path, None)
        if drop is not None:  # a broken transfer: part of the body, then the connection closes
            data_end = min(data_end, start + drop)
            self.close_connection = True
        for pos in range(start, data_end, CHUNK):
            self.wfile.write(data[pos : min(pos + CHUNK, data_end)])
            if delay:
                self.wfile.flush()
                time.sleep(delay)

    def _json(self, obj: Any) -> None:
        body = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _error(self, status: int, code: str | None, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        if code:
            self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


@pytest.fixture
def fake_hub():
    """A started FakeHub, stopped after the test."""
    with FakeHub() as hub:
        yield hub


def main(argv: list[str]) -> None:
    """Serve a folder's files as one repo until interrupted: ``fakehub.py ORG/NAME FOLDER``."""
    repo, folder = argv
    root = Path(folder)
    files = {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}
    with FakeHub() as hub:
        sha = hub.add_repo(repo, files)
        print(f"{hub.url} {repo}@{sha}", flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main(sys.argv[1:])
