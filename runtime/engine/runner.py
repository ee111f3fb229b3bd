"""The runner: a network ready to run (backend, prepared weights, expert store) and the one place
where token ids and the context limit are checked.

Thread-safe by a lock: ``forward`` runs one pass at a time, so the expert store (whose slots a pass
uses) and the backend are never shared between two passes, and each pass's statistics are taken
inside the lock (deltas of the store's counters). Several threads may each drive their own
sequence through one runner; their passes interleave and every answer equals the serial one.

A prompt runs in chunks of at most ``prefill_chunk`` tokens (a long prompt's activations, the
dequantised weights' scratch and attention's keys stay bounded), each chunk one pass.

With ``cuda_graph``, one-token passes (decode) replay CUDA graphs (runtime/engine/cuda_graph.py)
captured for the sequence state they run on (up to ``GRAPHED_STATES`` states' kept at once), and
captured again when the state's buffers moved (a KV cache outgrew its room) or past the
``GRAPH_SPAN`` positions they cover. A fresh
sequence's first chunk replays one too (runtime/engine/prefill_graph.py) once a first chunk of its
length has been seen before (every prompt longer than a chunk has one of ``prefill_chunk`` tokens),
when every expert is resident; one such graph is kept, for the latest length.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.experts.stats import ExpertStats
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.state import SequenceState
from fmoe.runtime.text.sampling import GREEDY, Pick
from fmoe.runtime.timing import NULL_TIMER, PhaseProfile


@dataclass
class Step:
    """One forward pass: host logits (None for a pass given a pick: its ``token`` was picked where
    the logits are), its wall time (until they, or the token, were on the host), where that time went
    (with ``profile``), what the expert store did for it, and whether it (or its first chunk)
    replayed a captured CUDA graph."""

    logits: np.ndarray | None  # float32 [T, vocab] or [1, vocab]
    tokens: int
    seconds: float
    profile: PhaseProfile | None
    experts: ExpertStats
    replayed: bool = False
    token: int | None = None  # a pass given a pick: the token it picked from the last row


@dataclass
class Launched:
    """A decode step queued by :meth:`Runner.launch`: the decode that runs it, the slot its
    pick is read into, the position it fed, when it was launched, and the number of its forward
    pass where the expert provider counts them (its statistics come with the pick)."""

    decoder: Any
    slot: int
    position: int
    started: float
    pass_number: int | None = None


GRAPH_SPAN = 4096  # positions a captured decode covers past the state's position (KV room reserved for them)
GRAPHED_STATES = 4  # captured decodes kept, one a sequence state
PREFILL_CHUNK = 2048  # prompt tokens a pass (at 512 experts and K=10, 40 pairs an expert: the GEMM path's side)


class Runner:
    def __init__(
        self,
        network: Qwen35MoeNetwork,
        max_context: int,
        *,
        cuda_graph: bool = False,
        capture: Any = None,
        prefill_chunk: int | None = None,
    ) -> None:
        """The network's expert provider must count what it serves (``stats``, an ExpertStats).
        ``cuda_graph``: decode (and first chunks seen before) replayed from CUDA graphs; ``capture``
        (tests): how they are recorded. ``prefill_chunk``: the most prompt tokens a pass (None: PREFILL_CHUNK)."""
        prefill_chunk = PREFILL_CHUNK if prefill_chunk is None else prefill_chunk
        if prefill_chunk < 1:
            raise FmoeError(f"prefill chunk: {prefill_chunk} tokens, must be at least 1")
        self.network = network
        self.max_context = max_context
        self.cuda_graph = cuda_graph
        self.prefill_chunk = prefill_chunk
        self._capture = capture
        # captured decodes by sequence state (id), least recently used first: (the state, the decoder,
        # where the state's buffers were when it was captured)
        self._graphed: OrderedDict[int, tuple[weakref.ref[SequenceState], Any, tuple[int, ...]]] = OrderedDict()
        self._prefill_graph: Any = None  # a CudaGraphPrefill, for one first-chunk length
        self._first_chunks: set[int] = set()  # first-chunk lengths seen (a second sighting captures)
        self._prefill_graphs = True  # False after a capture ran out of device memory
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
        pick: Pick | None = None,
    ) -> Step:
        """Run ``token_ids`` from ``state.position`` on (``state`` is updated; if this raises, it may
        be partly updated and must not be reused). ``pick``: the step's ``token`` is picked from the
        last row (greedy, or drawn) where the logits are, and they stay there (``logits`` None): a GPU
        sends 16 bytes back instead of the vocabulary's logits."""
        ids = self.check_tokens(token_ids, state.position)
        cfg = self.network.config
        with self._lock:
            t0 = time.perf_counter()
            decoder = self._decoder(state) if self.cuda_graph and ids.size == 1 else None  # (may capture)
            before = self.store.stats.copy()
            prof = PhaseProfile(cfg.num_hidden_layers) if profile and decoder is None else None  # replays: no phases
            timer = self.backend.timer(prof) if prof is not None else NULL_TIMER
            replayed = decoder is not None
            if decoder is not None:
                logits = decoder.step(int(ids[0]))
                if pick is not None:  # (greedy: the pick the graph made)
                    logits = decoder.pick if pick.greedy else self._picked(logits, pick)
                out = self._graph_output(logits)
            else:
                out, replayed = self._prefill(ids, state, timer, last_only or pick is not None, pick)
                prof = None if replayed else prof  # a replayed graph has no phase marks
            self.network.after_pass()
            timer.finish()
            seconds = time.perf_counter() - t0
            experts = self.store.stats - before
        finite = bool(out[1]) if pick is not None else bool(np.isfinite(out).all())
        if not finite:  # never sample from garbage
            raise _non_finite(f"positions {state.position - len(ids)}..{state.position - 1}")
        if pick is not None:
            return Step(None, len(ids), seconds, prof, experts, replayed, token=int(out[0]))
        return Step(out, len(ids), seconds, prof, experts, replayed)

    def launch(
        self, state: SequenceState, token: int | None, pick: Callable[[], Pick] = lambda: GREEDY
    ) -> Launched | None:
        """Queue a decode step of ``token`` on ``state`` and its pick (``pick()``, asked for only when
        the step is queued: a sampler draws its number then) without waiting for them (``token``
        None: what the step launched before it picks, copied on the device, so that this step is
        queued before that one is read): where the state's decode replays as one captured graph
        (every expert on the device, or placed over the device and host memory; may capture it).
        None where it cannot (no CUDA graphs, a decode cut
        around streamed experts, the capture's span or the context used up; the state's kept decode
        gone, for a step of the last pick): then :meth:`forward` it. ``state`` holds the token fed
        once this returns; :meth:`collect` reads the step's pick."""
        if not self.cuda_graph or state.position >= self.max_context:
            return None
        with self._lock:
            if token is None:  # the kept decode, as it was for the step before
                kept = self._graphed.get(id(state))
                decoder = kept[1] if kept is not None and kept[0]() is state else None
            else:
                self.check_tokens([token], state.position)
                decoder = self._decoder(state)  # (may capture)
            if decoder is None or decoder.cuts or state.position >= decoder.capacity:
                return None
            if token is None and not decoder.can_follow:
                return None
            t0 = time.perf_counter()
            slot = decoder.launch(token, pick())
            self.network.after_pass()
        return Launched(decoder, slot, state.position - 1, t0, getattr(self.store, "passes", None))

    def collect(self, launched: Launched) -> Step:
        """The step :meth:`launch` queued: its pick, once on the host (a non-finite logit is a one-line
        error, as in :meth:`forward`). Its ``seconds``: since its launch, or since the step before
        it was collected if that came later (steps in flight overlap)."""
        token, finite = launched.decoder.collect(launched.slot)
        now = time.perf_counter()
        seconds = now - max(launched.started, launched.decoder.collected_at)
        launched.decoder.collected_at = now
        if not finite:
            raise _non_finite(f"position {launched.position}")
        if launched.pass_number is not None:  # experts placed over the device and the host (runtime/experts/placed.py)
            experts = self.store.pass_stats(launched.pass_number)
        else:  # every expert resident: the store serves nothing a step, routing never leaves the device
            experts = ExpertStats.zeros(self.network.config.num_hidden_layers)
        return Step(None, 1, seconds, None, experts, replayed=True, token=token)

    def _prefill(
        self, ids: np.ndarray, state: SequenceState, timer: Any, last_only: bool, pick: Pick | None
    ) -> tuple[np.ndarray, bool]:
        """``ids`` through the network in chunks of ``prefill_chunk``: host logits of every token, or of
        the last with ``last_only`` (only the last chunk's are read back), or with ``pick`` the
        backend's pick from the last; and whether a chunk was replayed from a graph."""
        out, replayed = [], False
        for lo in range(0, ids.size, self.prefill_chunk):
            chunk = ids[lo : lo + self.prefill_chunk]
            last = lo + chunk.size == ids.size
            graph = self._first_chunk_graph(chunk, state) if last_only else None
            if graph is not None:  # (last_only: only the last chunk's logits are read)
                logits, replayed = graph.run(chunk, state), True
                if last:
                    out.append(self._graph_output(logits if pick is None else self._picked(logits, pick)))
            else:
                logits = self.network.forward(chunk, state, timer=timer, last_only=last_only)
                if last or not last_only:
                    out.append(self.backend.to_numpy(logits if pick is None else self._picked(logits, pick)))
        return (out[0] if len(out) == 1 else np.concatenate(out)), replayed

    def _picked(self, logits: Any, pick: Pick) -> Any:
        """The backend's pick from ``logits`` (int64 ``[token, finite]``, where they are)."""
        if pick.greedy:
            return self.backend.greedy_pick(logits)
        p = pick.params
        return self.backend.sample_pick(logits, p.temperature, p.top_k, p.top_p, pick.u)

    def _graph_output(self, x: Any) -> np.ndarray:
        """A replayed graph's output (or what is computed from it; rewritten by its next replay) on the
        host: off a GPU ``to_numpy`` copies it; on the CPU (the tests' stand-in capture) the array would
        alias the buffer, so it is cloned first."""
        return self.backend.to_numpy(x if x.device.type == "cuda" else x.clone())

    def _first_chunk_graph(self, chunk: np.ndarray, state: SequenceState) -> Any:
        """The captured first chunk for ``chunk`` (None: run it eagerly): with ``cuda_graph``, at
        position 0, more than one token, a length seen before, and a network whose pass can be
        captured (every expert resident). A capture that runs out of device memory is not retried."""
        if not self.cuda_graph or not self._prefill_graphs or state.position != 0 or chunk.size < 2:
            return None
        from fmoe.runtime.engine.prefill_graph import CudaGraphPrefill, prefill_graph_blocker

        if prefill_graph_blocker(self.network, self._capture is None) is not None:  # (also for a kept graph:
            return None  # routing may be replaced on the host since it was captured)
        graph = self._prefill_graph
        if graph is not None and graph.tokens == chunk.size:
            return graph
        if chunk.size not in self._first_chunks:
            self._first_chunks.add(int(chunk.size))
            return None
        import torch

        self._prefill_graph = None  # the previous length's graph and its memory go first
        try:
            self._prefill_graph = CudaGraphPrefill(self.network, int(chunk.size), capture=self._capture)
        except torch.cuda.OutOfMemoryError:
            self._prefill_graphs = False  # no room for a graph's own memory: first chunks stay eager
            torch.cuda.empty_cache()
        return self._prefill_graph

    def drop_graphs(self) -> None:
        """Forget every captured graph (they are captured again as needed): for a network whose
        backend was swapped (routing replaced on the host, runtime/routing_trace.py)."""
        with self._lock:
            self._graphed.clear()
            self._prefill_graph = None
            self._first_chunks.clear()

    def graph_capacity(self, state: SequenceState) -> int:
        """Positions a decode captured now covers (its KV room): ``GRAPH_SPAN`` past the state's, within
        the context limit."""
        return min(self.max_context, state.position + GRAPH_SPAN)

    def _decoder(self, state: SequenceState) -> Any:
        """The captured decode of ``state``: the one kept if it still fits, else captured now. Up to
        ``GRAPHED_STATES`` are kept, one a state, so that sequences whose passes interleave (a
        server's requests) replay their own instead of capturing again at every switch (seconds on the
        397B); the least recently used goes first, and all go if a capture runs out of device memory."""
        kept = self._graphed.pop(id(state), None)
        if kept is not None:
            ref, decoder, buffers = kept
            fits = state.position < decoder.capacity and _buffers(state) == buffers
            if fits and ref() is state:
                self._graphed[id(state)] = kept  # now the most recently used
                return decoder
            del kept, decoder  # its graphs and their memory go before new ones are captured
        for key in [key for key, (ref, _, _) in self._graphed.items() if ref() is None]:
            del self._graphed[key]  # sequences that are gone
        while len(self._graphed) >= GRAPHED_STATES:
            self._graphed.popitem(last=False)
        import torch

        from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder

        try:
            decoder = CudaGraphDecoder(self.network, state, self.graph_capacity(state), capture=self._capture)
        except torch.cuda.OutOfMemoryError:
            if not self._graphed:
                raise
            self._graphed.clear()  # the other sequences' graphs make room; theirs are captured again later
            torch.cuda.empty_cache()
            decoder = CudaGraphDecoder(self.network, state, self.graph_capacity(state), capture=self._capture)
        self._graphed[id(state)] = (weakref.ref(state), decoder, _buffers(state))
        return decoder

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


def _non_finite(where: str) -> FmoeError:
    return FmoeError(
        f"the model computed non-finite logits (NaN or Inf) at {where}: its weights hold NaN/Inf or overflow; "
        "check them with `fmoe verify --deep`"
    )


def _buffers(state: SequenceState) -> tuple[int, ...]:
    """Where the state's device buffers are: a captured decode reads and writes exactly these."""
    ptrs: list[int] = []
    for layer in state.layers:
        for name in ("k", "v", "conv", "recurrent"):
            t = getattr(layer, name, None)
            if t is not None and hasattr(t, "data_ptr"):
                ptrs.append(int(t.data_ptr()))
    return tuple(ptrs)
