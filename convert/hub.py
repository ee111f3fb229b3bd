"""Talking to a Hugging Face hub: alias -> repo id, revision -> commit sha, the file listing, and
streamed (ranged) file GETs, with the hub's typed errors turned into one-line FmoeErrors.

huggingface_hub makes the API calls; the file GETs are our own (through its shared HTTP client, which
strips the token on a redirect to another origin) because its downloader does not resume across runs.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from huggingface_hub import HfApi, RepoFolder
from huggingface_hub.errors import (
    DisabledRepoError,
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    OfflineModeIsEnabled,
    RemoteEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

try:  # huggingface_hub 2.x ships its HTTP client as httpx2, 1.x used httpx
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

from fmoe import __version__
from fmoe.errors import FmoeError
from fmoe.fsutil import check_name
from fmoe.presets import repo_aliases

DEFAULT_ENDPOINT = "https://huggingface.co"
# Connect / read timeout of a file GET: a stalled stream fails (and is retried) instead of hanging.
GET_TIMEOUT_S = 30.0
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


class HubUnreachable(FmoeError):
    """The endpoint could not be reached, a transfer broke off, or the hub is busy (429, 5xx):
    worth a retry for file GETs."""


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo at a commit, as the hub lists it."""

    path: str
    size: int
    oid: str  # git blob id: of the content, or of the LFS pointer (so it names the content either way)
    sha256: str | None  # LFS files only

    @property
    def is_lfs(self) -> bool:
        return self.sha256 is not None


def resolve_repo(name: str) -> str:
    """A hub repo id from an alias in manifests/repos.json or an ``org/name`` id."""
    aliases = repo_aliases()
    if name in aliases:
        return aliases[name]["repo"]
    if not _REPO_ID.match(name):
        raise FmoeError(f"{name!r}: not a hub repo id (org/name) nor an alias; aliases: {', '.join(aliases)}")
    return name


def resolve_endpoint(endpoint: str | None) -> str:
    """The endpoint given, else HF_ENDPOINT, else the public hub (huggingface_hub reads its env at import)."""
    return (endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


class Hub:
    """One repo on one endpoint, with the token to use."""

    def __init__(self, repo: str, endpoint: str, token: str | None) -> None:
        self.repo, self.endpoint, self.token = repo, endpoint, token or None
        self.api = HfApi(endpoint=endpoint, token=self.token, library_name="fmoe", library_version=__version__)

    def resolve(self, revision: str) -> str:
        """The commit sha that ``revision`` (branch, tag or sha) names now."""
        with self.errors(revision):
            info = self.api.model_info(self.repo, revision=revision)
        if not info.sha:
            raise FmoeError(f"{self.repo}: the hub gave no commit sha for revision {revision!r}")
        return info.sha

    def list_files(self, sha: str) -> dict[str, RemoteFile]:
        """Every file of the repo at ``sha`` with its size, git oid and (LFS files) sha256."""
        files: dict[str, RemoteFile] = {}
        with self.errors(sha):
            try:
                for entry in self.api.list_repo_tree(self.repo, revision=sha, recursive=True, expand=False):
                    if not isinstance(entry, RepoFolder):
                        files[entry.path] = self._remote_file(sha, entry)
            except (KeyError, TypeError, AttributeError) as exc:  # huggingface_hub parsing a malformed entry
                raise FmoeError(f"{self.repo}@{sha}: the hub's file listing is malformed ({_one_line(exc)})") from None
        return files

    def _remote_file(self, sha: str, entry: Any) -> RemoteFile:
        """One listed file, checked: the hub is trusted for nothing that could leave ``--dir`` or
        defeat the size and hash checks (a path with ``..`` or anchored, a negative size, no oid)."""
        where = f"{self.repo}@{sha}: the hub's file listing"
        check_name(entry.path, where)
        size, oid, lfs = entry.size, entry.blob_id, entry.lfs
        sha256 = lfs.sha256 if lfs is not None else None
        if type(size) is not int or size < 0:
            raise FmoeError(f"{where}: {entry.path!r} has size {size!r}, not a byte count")
        if not isinstance(oid, str) or (sha256 is not None and not _SHA256.match(str(sha256))):
            raise FmoeError(f"{where}: {entry.path!r} has no valid git oid or sha256")
        return RemoteFile(entry.path, size, oid, sha256)

    @contextlib.contextmanager
    def stream(self, sha: str, path: str, start: int = 0) -> Iterator[Any]:
        """GET ``path`` at ``sha`` from byte ``start`` on; yields the streaming response (200 or 206).

        Transport failures, also while the caller reads the body, become HubUnreachable.
        """
        url = f"{self.endpoint}/{self.repo}/resolve/{sha}/{quote(path, safe='/')}"
        headers = build_hf_headers(token=self.token, library_name="fmoe", library_version=__version__)
        headers["Accept-Encoding"] = "identity"  # byte offsets must be offsets into the file itself
        if start:
            headers["Range"] = f"bytes={start}-"
        with (
            self.errors(sha, path),
            get_session().stream("GET", url, headers=headers, follow_redirects=True, timeout=GET_TIMEOUT_S) as response,
        ):
            hf_raise_for_status(response)
            yield response

    @contextlib.contextmanager
    def errors(self, revision: str, path: str | None = None) -> Iterator[None]:
        """Turn the hub's typed errors (and transport errors) into one-line FmoeErrors."""
        try:
            yield
        except (HfHubHTTPError, HFValidationError, OfflineModeIsEnabled, httpx.TransportError) as exc:
            raise self._translate(exc, revision, path) from None

    def _translate(self, exc: Exception, revision: str, path: str | None) -> FmoeError:
        repo, endpoint = self.repo, self.endpoint
        where = f"{repo}: {path}" if path else repo
        if isinstance(exc, GatedRepoError):
            return FmoeError(
                f"{repo}: gated repository: accept its terms at {endpoint}/{repo} and pass --token (or set HF_TOKEN)"
            )
        if isinstance(exc, RepositoryNotFoundError):
            return FmoeError(f"{repo}: repository not found on {endpoint} (a private repo needs --token)")
        if isinstance(exc, RevisionNotFoundError):
            return FmoeError(f"{repo}: revision {revision!r} not found")
        if isinstance(exc, RemoteEntryNotFoundError):
            return FmoeError(f"{where}: file not found at revision {revision}")
        if isinstance(exc, DisabledRepoError):
            return FmoeError(f"{repo}: repository disabled on {endpoint}")
        if isinstance(exc, HFValidationError):
            return FmoeError(f"{repo}: {_one_line(exc)}")
        if isinstance(exc, OfflineModeIsEnabled):
            return FmoeError(f"{endpoint}: HF_HUB_OFFLINE is set; unset it to download")
        if isinstance(exc, HfHubHTTPError):
            status = exc.response.status_code if exc.response is not None else None
            if status == 401:
                return FmoeError(f"{repo}: the hub rejected the token (401 Unauthorized); check --token / HF_TOKEN")
            if status == 403:
                return FmoeError(f"{where}: access denied (403 Forbidden); check the token's permissions")
            if status is not None and (status == 429 or status >= 500):  # transient: file GETs retry these
                return HubUnreachable(f"{where}: the hub answered HTTP {status}; try again later")
            return FmoeError(f"{where}: the hub answered HTTP {status}")
        return HubUnreachable(
            f"{endpoint}: hub unreachable ({type(exc).__name__}: {_one_line(exc)}); check the network or --endpoint"
        )


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__
