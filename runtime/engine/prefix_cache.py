"""Prefix reuse: saved session states keyed by the prompt tokens they hold, in an LRU with a byte
budget, so a request that shares a start with an earlier one (a system prompt and tools, or a
whole earlier conversation) resumes that state instead of prefilling it again.

States are saved only at *cuts*: ends of chat messages chosen from the prompt alone
(:func:`message_cuts`), and every prompt is prefilled segment by segment at its cuts whether or
not a saved state is found. A state resumed from the cache was therefore computed exactly as the
request would compute it (the same forward passes from the same state), so reuse never changes
an answer, bitwise. (Generated tokens are not saved: a decode is one token per pass, which a
later prefill of the same text would not reproduce bitwise.)
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import xxhash

from fmoe.runtime.engine.session import Session

MIN_SEGMENT = 16  # messages shorter than this are prefilled together with the next one


def message_cuts(ids: Sequence[int], end_ids: Sequence[int], *, min_segment: int = MIN_SEGMENT) -> list[int]:
    """Where to cut a chat prompt's prefill: after each message's end (``end_ids``: ``<|im_end|>``
    then ``\\n`` in ChatML), skipping a cut until at least ``min_segment`` tokens followed the
    previous one. Decided left to right, so a conversation and its continuation are cut alike in
    the part they share. Offsets are strictly inside the prompt (the last segment is never empty)."""
    n = len(end_ids)
    if n == 0:
        return []
    arr = np.asarray(ids, dtype=np.int64)
    if arr.size <= n:
        return []
    hits = np.ones(arr.size - n + 1, dtype=bool)
    for j, t in enumerate(end_ids):
        hits &= arr[j : arr.size - n + 1 + j] == t
    cuts: list[int] = []
    last = 0
    for start in np.flatnonzero(hits):
        end = int(start) + n
        if end < arr.size and end - last >= min_segment:
            cuts.append(end)
            last = end
    return cuts


@dataclass
class _Entry:
    ids: np.ndarray  # int64: the prompt tokens the state holds
    session: Session
    nbytes: int


@dataclass
class CacheStats:
    lookups: int = 0
    hits: int = 0
    reused_tokens: int = 0
    stored: int = 0
    evicted: int = 0


class PrefixCache:
    """An LRU of session states keyed by their tokens, holding at most ``budget_bytes`` of state
    (a state larger than the whole budget is not kept). Thread-safe; sessions go in and come out
    as copies, so a caller may continue what it gets."""

    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, int(budget_bytes))
        self._entries: OrderedDict[bytes, _Entry] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()
        self.stats = CacheStats()

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def lookup(self, ids: Sequence[int], cuts: Sequence[int]) -> tuple[int, Session | None]:
        """The longest saved state among ``ids[:cut]`` for ``cuts``: (its length, a copy of it), or
        (0, None)."""
        arr = np.asarray(ids, dtype=np.int64)
        keys = _prefix_keys(arr, cuts)
        with self._lock:
            self.stats.lookups += 1
            for cut, key in sorted(keys.items(), reverse=True):
                entry = self._entries.get(key)
                if entry is not None and np.array_equal(entry.ids, arr[:cut]):  # a hash is not proof
                    self._entries.move_to_end(key)
                    self.stats.hits += 1
                    self.stats.reused_tokens += cut
                    found = entry.session
                    break
            else:
                return 0, None
        return cut, found.copy()

    def contains(self, ids: Sequence[int]) -> bool:
        arr = np.asarray(ids, dtype=np.int64)
        with self._lock:
            entry = self._entries.get(_key(arr))
            return entry is not None and np.array_equal(entry.ids, arr)

    def store(self, session: Session) -> bool:
        """Keep a copy of ``session`` (fully fed: no pending token) under its tokens; False when it
        is larger than the budget or nothing to keep."""
        if session.pending or not session.token_ids:
            return False
        size = int(session.nbytes) + 8 * len(session.token_ids)
        if size > self.budget_bytes:
            return False
        arr = np.asarray(session.token_ids, dtype=np.int64)
        key = _key(arr)
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return True
        saved = Session(session.state.copy(), list(session.token_ids))  # copy outside the lock
        with self._lock:
            if key in self._entries:
                return True
            while self._entries and self._bytes + size > self.budget_bytes:
                _, old = self._entries.popitem(last=False)
                self._bytes -= old.nbytes
                self.stats.evicted += 1
            self._entries[key] = _Entry(arr, saved, size)
            self._bytes += size
            self.stats.stored += 1
        return True

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self._bytes = 0


def _key(arr: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(np.ascontiguousarray(arr, dtype="<i8").tobytes())


def _prefix_keys(arr: np.ndarray, cuts: Sequence[int]) -> dict[int, bytes]:
    """The key of ``arr[:cut]`` for every cut, hashing the tokens once (a streaming hash)."""
    h = xxhash.xxh3_128()
    raw = np.ascontiguousarray(arr, dtype="<i8")
    out: dict[int, bytes] = {}
    done = 0
    for cut in sorted(set(cuts)):
        if not 0 < cut <= raw.size:
            continue
        h.update(raw[done:cut].tobytes())
        done = cut
        out[cut] = h.digest()
    return out
