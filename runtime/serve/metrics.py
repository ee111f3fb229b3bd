"""``GET /metrics``: the server's counters in Prometheus' text format (written by hand: a dozen
lines do not need a client library)."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any


class Metrics:
    """Counters the handlers update (from the event loop); gauges are read when scraped."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests: Counter[tuple[str, int]] = Counter()  # (api, status) -> count
        self.active: Counter[str] = Counter()
        self.rejected = 0  # 503: the queue was full
        self.cancelled = 0  # the client went away before the answer ended
        self.malformed_calls = 0

    def response(self, api: str, status: int) -> None:
        with self._lock:
            self.requests[(api, status)] += 1

    def started(self, api: str) -> None:
        with self._lock:
            self.active[api] += 1

    def finished(self, api: str) -> None:
        with self._lock:
            self.active[api] -= 1

    def render(self, state: Any) -> str:
        """The exposition text for ``state`` (a ServerState)."""
        lines: list[str] = []

        def metric(name: str, kind: str, help: str, samples: Sequence[tuple[str, float]]) -> None:
            lines.append(f"# HELP fmoe_{name} {help}")
            lines.append(f"# TYPE fmoe_{name} {kind}")
            lines.extend(f"fmoe_{name}{labels} {_number(v)}" for labels, v in samples)

        with self._lock:
            requests = sorted(self.requests.items())
            active = sum(self.active.values())
        metric("up", "gauge", "1 once the model is loaded", [("", 1.0 if state.ready else 0.0)])
        metric(
            "requests_total",
            "counter",
            "HTTP requests answered, by API and status",
            [(f'{{api="{api}",status="{status}"}}', n) for (api, status), n in requests],
        )
        metric("requests_rejected_total", "counter", "requests refused with 503 (queue full)", [("", self.rejected)])
        metric("requests_cancelled_total", "counter", "answers stopped because the client left", [("", self.cancelled)])
        metric("requests_active", "gauge", "answers being generated or waiting", [("", active)])
        metric("tool_calls_malformed_total", "counter", "tool calls returned as text", [("", self.malformed_calls)])
        worker = state.worker
        if worker is not None:
            metric("queue_depth", "gauge", "requests waiting for the engine", [("", worker.depth)])
            metric("queue_capacity", "gauge", "requests that may wait", [("", state.max_queue)])
            metric("prompt_tokens_total", "counter", "prompt tokens of finished requests", [("", worker.prompt_tokens)])
            metric(
                "prompt_tokens_cached_total",
                "counter",
                "prompt tokens resumed from the prefix cache",
                [("", worker.cached_tokens)],
            )
            metric("generated_tokens_total", "counter", "tokens generated", [("", worker.generated_tokens)])
            metric(
                "decode_tokens_per_second",
                "gauge",
                "decode speed of the last request",
                [("", worker.last_tokens_per_second)],
            )
            cache = worker.prefix_cache
            if cache is not None:
                metric("prefix_cache_bytes", "gauge", "bytes of saved states", [("", cache.nbytes)])
                metric("prefix_cache_budget_bytes", "gauge", "the byte budget", [("", cache.budget_bytes)])
                metric("prefix_cache_entries", "gauge", "saved states", [("", len(cache))])
                metric("prefix_cache_hits_total", "counter", "requests that resumed a state", [("", cache.stats.hits)])
                metric("prefix_cache_lookups_total", "counter", "lookups", [("", cache.stats.lookups)])
                metric("prefix_cache_evictions_total", "counter", "states dropped", [("", cache.stats.evicted)])
        stats = _expert_stats(state.engine)
        if stats is not None:
            from fmoe.runtime.experts.stats import TIERS

            requested = int(stats.requested.sum())
            metric("experts_requested_total", "counter", "experts the router asked for", [("", requested)])
            served = [(f'{{tier="{t}"}}', int(stats.served[:, i].sum())) for i, t in enumerate(TIERS)]
            metric("experts_served_total", "counter", "experts served, by tier", served)
            metric(
                "experts_hit_rate",
                "gauge",
                "share of requested experts each tier served",
                [(labels, n / requested if requested else 0.0) for labels, n in served],
            )
            nbytes = [(f'{{tier="{t}"}}', int(stats.bytes[:, i].sum())) for i, t in enumerate(TIERS)]
            metric("experts_bytes_total", "counter", "expert bytes served, by tier", nbytes)
        return "\n".join(lines) + "\n"


def _expert_stats(engine: Any) -> Any:
    store = getattr(getattr(engine, "runner", None), "store", None)
    stats = getattr(store, "stats", None)
    return stats.copy() if stats is not None and hasattr(stats, "copy") else None


def _number(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else repr(float(v))
