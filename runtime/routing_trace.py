"""Routing traces: which experts a real model's router picks, token by token, for replay by the
benchmarks (``--routing trace:FILE``) and for judging cache policies on realistic routing.

File format (version 1): a NumPy ``.npz`` written with ``np.savez_compressed``, holding

- ``experts``: uint16 ``[tokens, layers, k]``: for each token (in text order) and layer, the experts
  the router chose, by decreasing routing weight (so ``experts[:, :, :k']`` is the top-``k'`` choice);
- ``weights``: float16 ``[tokens, layers, k]``: their routing weights, renormalised to sum 1 (top-k);
- ``starts``: int64 ``[sequences]``: the first token of each sequence (each ran from a fresh state;
  ``starts[0] == 0``, increasing); reuse across a start is not a decode step of one sequence;
- ``meta``: a JSON string: ``{"format": "fmoe-routing-trace", "version": 1, "num_layers",
  "num_experts", "k", "bits", "model_fingerprint", "text", "ctx"}``.

``fmoe bench model --routing trace:FILE`` replays token ``t`` of a model with the trace's ``num_layers``
and ``num_experts`` (:meth:`RoutingTrace.check`) as ``experts[t % tokens, layer, :K]``, ``K <= k``
(:func:`routing_source`, :func:`replaying`; also ``uniform`` and ``zipf:S`` routing for comparison).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.npz import read_npz

TRACE_FORMAT = "fmoe-routing-trace"
TRACE_VERSION = 1


@dataclass
class RoutingTrace:
    experts: np.ndarray  # uint16 [T, L, K], by decreasing weight
    weights: np.ndarray  # float16 [T, L, K]
    starts: np.ndarray  # int64 [S]
    num_experts: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return int(self.experts.shape[0])

    @property
    def num_layers(self) -> int:
        return int(self.experts.shape[1])

    @property
    def k(self) -> int:
        return int(self.experts.shape[2])

    # ---- the file ---------------------------------------------------------------------------------
    def save(self, path: Path) -> None:
        from fmoe.fsutil import atomic_output

        meta = {**self.meta, "format": TRACE_FORMAT, "version": TRACE_VERSION, "num_layers": self.num_layers,
                "num_experts": self.num_experts, "k": self.k}  # fmt: skip
        with atomic_output(Path(path)) as f:
            np.savez_compressed(
                f,
                experts=self.experts.astype(np.uint16),
                weights=self.weights.astype(np.float16),
                starts=self.starts.astype(np.int64),
                meta=json.dumps(meta),
            )

    @classmethod
    def load(cls, path: Path | str) -> RoutingTrace:
        """Read and check a trace; a one-line error naming the file for anything wrong."""
        path = Path(path)
        where = f"routing trace {path}"
        meta, z = read_npz(path, where, "an fmoe routing trace", TRACE_FORMAT, ("experts", "weights", "starts"))
        experts, weights, starts = z["experts"], z["weights"], z["starts"]
        if meta.get("version") != TRACE_VERSION:
            raise FmoeError(f"{where}: not an {TRACE_FORMAT} version {TRACE_VERSION}")
        e = meta.get("num_experts")
        if experts.dtype != np.uint16 or experts.ndim != 3 or 0 in experts.shape:
            raise FmoeError(f"{where}: experts must be a non-empty uint16 [tokens, layers, k], got {experts.dtype} "
                            f"{experts.shape}")  # fmt: skip
        if weights.shape != experts.shape or weights.dtype != np.float16:
            raise FmoeError(f"{where}: weights must be float16 {experts.shape}, got {weights.dtype} {weights.shape}")
        if not isinstance(e, int) or isinstance(e, bool) or not experts.shape[2] <= e <= 65536 or experts.max() >= e:
            raise FmoeError(f"{where}: num_experts {e!r} does not cover the expert ids (max {int(experts.max())})")
        if (np.sort(experts, axis=2)[:, :, 1:] == np.sort(experts, axis=2)[:, :, :-1]).any():
            raise FmoeError(f"{where}: a token chose the same expert twice in one layer")
        if starts.dtype != np.int64 or starts.ndim != 1 or len(starts) == 0 or starts[0] != 0:
            raise FmoeError(f"{where}: starts must be int64 [sequences] beginning with 0")
        if (np.diff(starts) <= 0).any() or starts[-1] >= len(experts):
            raise FmoeError(f"{where}: starts must increase and lie within the {len(experts)} tokens")
        return cls(experts, weights, starts, e, meta)

    def check(self, num_layers: int, num_experts: int, k: int) -> None:
        """A one-line error unless the trace can drive a model of this geometry at ``k`` experts per token."""
        if (num_layers, num_experts) != (self.num_layers, self.num_experts):
            raise FmoeError(
                f"routing trace: recorded on {self.num_layers} layers x {self.num_experts} experts; the model has "
                f"{num_layers} x {num_experts}"
            )
        if not 1 <= k <= self.k:
            raise FmoeError(f"routing trace: holds {self.k} experts per token; K={k} cannot be replayed")

    # ---- statistics -------------------------------------------------------------------------------
    def popularity(self) -> np.ndarray:
        """int64 ``[layers, experts]``: how often each expert was chosen."""
        out = np.zeros((self.num_layers, self.num_experts), dtype=np.int64)
        for layer in range(self.num_layers):
            out[layer] = np.bincount(self.experts[:, layer].ravel(), minlength=self.num_experts)
        return out

    def _pairs(self) -> np.ndarray:
        """bool ``[T]``: token ``t`` follows token ``t - 1`` in the same sequence."""
        follows = np.ones(self.tokens, dtype=bool)
        follows[self.starts] = False
        return follows

    def reuse(self) -> np.ndarray:
        """float ``[layers]``: the mean share of a token's experts that the previous token of its
        sequence also used (uniform random routing: k / num_experts)."""
        follows = self._pairs()
        cur, prev = self.experts[1:], self.experts[:-1]
        same = (cur[:, :, :, None] == prev[:, :, None, :]).any(axis=3).sum(axis=2)  # [T-1, L]
        return same[follows[1:]].mean(axis=0) / self.k

    def lru_hit_rate(self, capacity: int) -> np.ndarray:
        """float ``[layers]``: the hit rate of a per-layer LRU cache of ``capacity`` experts driven by the
        trace in token order (each token's experts are looked up, then become the most recent)."""
        rates = np.zeros(self.num_layers)
        for layer in range(self.num_layers):
            cache: OrderedDict[int, None] = OrderedDict()
            hits = 0
            for row in self.experts[:, layer].tolist():
                for e in row:
                    if e in cache:
                        hits += 1
                        cache.move_to_end(e)
                    else:
                        cache[e] = None
                        if len(cache) > capacity:
                            cache.popitem(last=False)
            rates[layer] = hits / (self.tokens * self.k)
        return rates

    def uniform(self, seed: int = 0) -> RoutingTrace:
        """The same shape with uniform random routing (k distinct experts per token and layer): the baseline."""
        rng = np.random.default_rng(seed)
        keys = rng.random((self.tokens, self.num_layers, self.num_experts))
        experts = np.argsort(keys, axis=2)[:, :, : self.k].astype(np.uint16)
        weights = np.full(experts.shape, 1.0 / self.k, dtype=np.float16)
        return RoutingTrace(experts, weights, self.starts.copy(), self.num_experts, {"text": "uniform"})

    def summary(self, capacities: tuple[int, ...] = ()) -> list[dict[str, Any]]:
        """Per layer: popularity (top expert's share, effective experts exp(entropy), max/mean and
        min/mean load), reuse against uniform, LRU hit rates against uniform."""
        pop = self.popularity().astype(np.float64)
        uni = self.uniform()
        reuse, reuse_u = self.reuse(), uni.reuse()
        caps = capacities or tuple(c for c in (self.k, 2 * self.k, self.num_experts // 4, self.num_experts // 2)
                                   if self.k <= c < self.num_experts)  # fmt: skip
        lru = {c: (self.lru_hit_rate(c), uni.lru_hit_rate(c)) for c in caps}
        rows = []
        for layer in range(self.num_layers):
            share = pop[layer] / pop[layer].sum()
            nz = share[share > 0]
            rows.append(
                {
                    "layer": layer,
                    "top_share": float(share.max()),
                    "effective_experts": float(np.exp(-(nz * np.log(nz)).sum())),
                    "max_load": float(share.max() * self.num_experts),
                    "min_load": float(share.min() * self.num_experts),
                    "reuse": float(reuse[layer]),
                    "reuse_uniform": float(reuse_u[layer]),
                    "lru": {
                        str(c): {"trace": float(t[layer]), "uniform": float(u[layer])} for c, (t, u) in lru.items()
                    },
                }
            )
        return rows


# ---- recording ----------------------------------------------------------------------------------------
class _RouteRecorder:
    """A backend that records what its ``route`` op returns (everything else passes through)."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend
        self.calls: list[tuple[np.ndarray, np.ndarray]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def route(self, logits: Any, k: int) -> tuple[Any, Any]:
        ids, weights = self._backend.route(logits, k)
        self.calls.append((np.asarray(self._backend.to_numpy(ids)), np.asarray(self._backend.to_numpy(weights))))
        return ids, weights


@contextmanager
def recording(engine: Any) -> Iterator[_RouteRecorder]:
    """Record every routing decision of ``engine``'s forward passes inside the block."""
    network = engine.runner.network
    backend = network.backend
    recorder = _RouteRecorder(backend)
    network.backend = recorder
    try:
        yield recorder
    finally:
        network.backend = backend


def record(
    engine: Any, ids: np.ndarray, ctx: int, *, text: str = "", progress: Callable[[], None] | None = None
) -> RoutingTrace:
    """Run ``ids`` in windows of ``ctx`` tokens (each from a fresh state) and record the routing."""
    cfg = engine.config
    layers, experts, weights, starts = cfg.num_hidden_layers, [], [], []
    for s in range(0, len(ids), ctx):
        window = [int(t) for t in ids[s : s + ctx]]
        with recording(engine) as rec:
            engine.logits(window)
        if len(rec.calls) != layers:
            raise FmoeError(f"routing trace: {len(rec.calls)} routing calls for {layers} layers")
        e = np.stack([c[0] for c in rec.calls], axis=1)  # [T, L, K]
        w = np.stack([c[1] for c in rec.calls], axis=1)
        order = np.argsort(-w, axis=2, kind="stable")  # by decreasing weight
        experts.append(np.take_along_axis(e, order, axis=2))
        weights.append(np.take_along_axis(w, order, axis=2))
        starts.append(s)
        if progress:
            progress()
    meta = {"bits": engine.bits, "model_fingerprint": cfg.fingerprint(), "text": text, "ctx": ctx}
    return RoutingTrace(
        np.concatenate(experts).astype(np.uint16),
        np.concatenate(weights).astype(np.float16),
        np.asarray(starts, dtype=np.int64),
        cfg.num_experts,
        meta,
    )


# ---- replay: benchmarks on chosen routing ----------------------------------------------------------
class RoutingSource:
    """Which experts each token uses in each layer, in place of the router's choice: ``pick(layer,
    tokens, k)`` gives int64 ``[len(tokens), k]`` distinct expert ids (token ``t``: the ``t``-th token the
    model has run since the replay began)."""

    name: str

    def pick(self, layer: int, tokens: np.ndarray, k: int) -> np.ndarray:
        raise NotImplementedError

    def pick_token(self, token: int, k: int) -> np.ndarray:
        """Token ``token``'s experts in every layer at once: int64 ``[layers, k]`` (a decode step's)."""
        raise NotImplementedError


class RandomRouting(RoutingSource):
    """Independent draws per token and layer: uniform over the experts, or Zipf-distributed (expert of
    popularity rank ``r`` drawn with weight ``r ** -s``; each layer ranks its experts in its own random
    order). Seeded: the same token and layer always draw the same experts.

    A token's draws for every layer come at once (the k smallest of ``Exp(1) / p``: an exponential
    race, k draws without replacement in proportion to ``p``) and are kept for the layers still to
    ask: a decode step pays one draw, not one per layer, so the replay costs the benchmark it serves
    next to nothing."""

    _KEEP = 1 << 13  # tokens whose draws are kept

    def __init__(self, num_layers: int, num_experts: int, zipf_s: float = 0.0, seed: int = 0) -> None:
        self.name = f"zipf:{zipf_s:g}" if zipf_s else "uniform"
        self.num_experts, self.seed = num_experts, seed
        rng = np.random.default_rng(seed)
        weight = np.arange(1, num_experts + 1, dtype=np.float64) ** -zipf_s
        probs = np.stack([weight[rng.permutation(num_experts)] for _ in range(num_layers)])
        self.probs = probs / probs.sum(axis=1, keepdims=True)
        self._inv_probs = 1.0 / self.probs
        self._drawn: OrderedDict[tuple[int, int, int], np.ndarray] = OrderedDict()  # (seed, token, k) -> [layers, k]

    def pick(self, layer: int, tokens: np.ndarray, k: int) -> np.ndarray:
        if len(tokens) == 1:  # decode
            return self._draws(int(tokens[0]), k)[layer : layer + 1]
        return np.stack([self._draws(int(t), k)[layer] for t in tokens.tolist()])

    def pick_token(self, token: int, k: int) -> np.ndarray:
        return self._draws(token, k)

    def _draws(self, token: int, k: int) -> np.ndarray:
        """The token's k experts in every layer, in draw order."""
        key = (self.seed, token, k)
        drawn = self._drawn.get(key)
        if drawn is None:
            race = np.random.default_rng((self.seed, token)).standard_exponential(self.probs.shape) * self._inv_probs
            first = np.argpartition(race, k - 1, axis=1)[:, :k] if k < self.num_experts else np.indices(race.shape)[1]
            order = np.argsort(np.take_along_axis(race, first, axis=1), axis=1, kind="stable")
            drawn = np.take_along_axis(first, order, axis=1).astype(np.int64)
            self._drawn[key] = drawn
            if len(self._drawn) > self._KEEP:
                self._drawn.popitem(last=False)
        return drawn


class TraceRouting(RoutingSource):
    """A recorded trace replayed in order: token ``t`` uses ``experts[t % tokens, layer, :k]``."""

    def __init__(self, trace: RoutingTrace, path: str) -> None:
        self.name, self.trace = f"trace:{path}", trace

    def pick(self, layer: int, tokens: np.ndarray, k: int) -> np.ndarray:
        return self.trace.experts[tokens % self.trace.tokens, layer, :k].astype(np.int64)

    def pick_token(self, token: int, k: int) -> np.ndarray:
        return self.trace.experts[token % self.trace.tokens, :, :k].astype(np.int64)


def routing_source(spec: str, num_layers: int, num_experts: int, k: int) -> RoutingSource | None:
    """``model`` (the router's own choice: None), ``uniform``, ``zipf`` / ``zipf:S`` (default S=1) or
    ``trace:FILE``, checked against the model's geometry; a one-line error for anything else."""
    kind, _, arg = spec.partition(":")
    if spec == "model":
        return None
    if spec == "uniform":
        return RandomRouting(num_layers, num_experts)
    if kind == "zipf":
        try:
            s = float(arg) if arg else 1.0
        except ValueError:
            s = -1.0
        if not 0.0 < s <= 10.0:
            raise FmoeError(f"--routing {spec}: the Zipf exponent must be a number in (0, 10]")
        return RandomRouting(num_layers, num_experts, zipf_s=s)
    if kind == "trace" and arg:
        trace = RoutingTrace.load(Path(arg))
        trace.check(num_layers, num_experts, k)
        return TraceRouting(trace, arg)
    raise FmoeError(f"--routing {spec!r}: expected model, uniform, zipf, zipf:S or trace:FILE")


class _RouteReplayer:
    """A backend whose ``route`` op returns ``source``'s experts with the router's own weights (so each
    token's weights still sum to 1); everything else passes through. Counts tokens across forward passes:
    each pass calls ``route`` once per layer, in layer order.

    A captured decode (runtime/engine/cuda_graph.py) takes its routing from a device table it writes
    before every replay (:meth:`next_token_routing`, with the step's other inputs, one copy): inside
    :meth:`routing_from` a one-token pass's ``route`` gives its layer's row of that table and counts no
    token, so that a graph captured then reads whatever the table holds when it is replayed. Routing
    replaced so costs a decode step no host round trip, as the router's own does not."""

    replaces_routing = True  # routing made on the host: a prefill that holds it is not captured

    def __init__(self, backend: Any, source: RoutingSource, num_layers: int) -> None:
        self._backend, self._source, self._layers = backend, source, num_layers
        self._calls = 0
        self._next_token = 0
        self._table: Any = None  # inside routing_from: the device table [layers, k] a decode reads

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def route(self, logits: Any, k: int) -> tuple[Any, Any]:
        _, weights = self._backend.route(logits, k)
        layer = self._calls % self._layers
        rows = int(logits.shape[0])
        self._calls += 1
        if rows == 1 and self._table is not None:
            return self._table[layer : layer + 1], weights
        tokens = np.arange(self._next_token, self._next_token + rows, dtype=np.int64)
        ids = self._source.pick(layer, tokens, k)
        if layer == self._layers - 1:
            self._next_token += rows
        return self._backend.asarray(ids), weights

    @contextmanager
    def routing_from(self, table: Any) -> Iterator[None]:
        """Inside the block, one-token passes route to the rows of ``table`` (the backend's int64
        array ``[layers, k]``) and count no token: the caller fills it by :meth:`next_token_routing`."""
        self._table = table
        try:
            yield
        finally:
            self._table = None

    def next_token_routing(self, k: int) -> np.ndarray:
        """The next token's experts in every layer (int64 ``[layers, k]``), the token counted."""
        ids = self._source.pick_token(self._next_token, k)
        self._next_token += 1
        return ids


@contextmanager
def replaying(engine: Any, source: RoutingSource | None) -> Iterator[None]:
    """Inside the block, ``engine``'s forward passes use ``source``'s routing (None: the router's own)."""
    if source is None:
        yield
        return
    network = engine.runner.network
    backend = network.backend
    engine.runner.drop_graphs()  # graphs captured over the other backend's routing (and after, this one's)
    network.backend = _RouteReplayer(backend, source, engine.config.num_hidden_layers)
    try:
        yield
    finally:
        network.backend = backend
        engine.runner.drop_graphs()
