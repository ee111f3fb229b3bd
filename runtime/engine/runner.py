"""The runner: a network ready to run (backend, prepared weights, expert store) and the one place
where token ids and the context limit are checked.

Thread-safe by a lock: ``forward`` runs one pass at a time, so the expert store (whose slots a pass
uses) and the backend are never shared between two passes, and each pass's statistics are taken
inside the lock (deltas of the store's counters). Several threads may each drive their own
sequence through one runner; their passes interleave and every answer equals the serial one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.experts.stats import ExpertStats
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.state import SequenceState
from fmoe.runtime.timing import NULL_TIMER, PhaseProfile


@dataclass
class Step:
    """One forward pass: host logits, its wall time (until the logits were on the host), where that
    time went (with ``profile``) and what the expert store did for it."""

    logits: np.ndarray  # float32 [T, vocab] or [1, vocab]
    tokens: int
    seconds: float
    profile: PhaseProfile | None
    experts: ExpertStats


class Runner:
    def __init__(self, network: Qwen35MoeNetwork, max_context: int) -> None:
        """The network's expert provider must count what it serves (``stats``, an ExpertStats)."""
        self.network = network
        self.max_context = max_context
        self._lock = threading.Lock()

    @property
    def store(self) -> Any:
        """The network's expert provider (the ExpertStore when loaded from a packed directory)."""
        return self.network.experts

    @property
    def config(self) -> Any:
        return self.network.config

    @property
    def backend(self) -> Any:
        return self.network.backend

    def new_state(self) -> SequenceState:
        return self.network.new_state()

    def forward(
        self,
        token_ids: Sequence[int] | np.ndarray,
        state: SequenceState,
        *,
        last_only: bool = False,
        profile: bool = False,
    ) -> Step:
        """Run ``token_ids`` from ``state.position`` on (``state`` is updated; if this raises, it may
        be partly updated and must not be reused)."""
        ids = self.check_tokens(token_ids, state.position)
        cfg = self.network.config
        with self._lock:
            before = self.store.stats.copy()
            prof = PhaseProfile(cfg.num_hidden_layers) if profile else None
            timer = self.backend.timer(prof) if prof is not None else NULL_TIMER
            t0 = time.perf_counter()
            logits = self.network.forward(ids, state, timer=timer, last_only=last_only)
            host = self.backend.to_numpy(logits)  # waits for the device
            timer.finish()
            seconds = time.perf_counter() - t0
            experts = self.store.stats - before
        if not np.isfinite(host).all():  # never sample from garbage
            raise FmoeError(
                f"the model computed non-finite logits (NaN or Inf) at positions {state.position - len(ids)}.."
                f"{state.position - 1}: its weights hold NaN/Inf or overflow; check them with `fmoe verify --deep`"
            )
        return Step(host, len(ids), seconds, prof, experts)

    def check_tokens(self, token_ids: Sequence[int] | np.ndarray, position: int = 0) -> np.ndarray:
        """The ids as host int64 ``[T]``; a one-line error for anything else, an id outside the
        vocabulary, an empty list, or more tokens than the context limit allows after ``position``."""
        ids = np.asarray(token_ids)
        if ids.size == 0:
            raise FmoeError("prompt: empty (no tokens)")
        if ids.dtype.kind not in "iu" or ids.ndim != 1:
            raise FmoeError(f"tokens: expected a flat sequence of integer token ids, got {ids.dtype} {ids.shape}")
        vocab = self.network.config.vocab_size
        bad = (ids < 0) | (ids >= vocab)
        if bad.any():
            raise FmoeError(f"tokens: id {int(ids[bad][0])} is outside the vocabulary (0..{vocab - 1})")
        if position + ids.size > self.max_context:
            raise FmoeError(
                f"prompt: {position + ids.size} tokens exceed the context limit of {self.max_context} tokens"
            )
        return ids.astype(np.int64, copy=False)
