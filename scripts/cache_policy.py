"""The expert caches' replacement policies side by side: hit rates of "lru" and "slru" (runtime/
experts/cache.py's SlotIndex) on the same request streams, decode-style (one token at a time, every
layer asks for its K experts, a miss evicts a slot not used by the same layer's request); and the
fixed homes of ``--host-reads direct`` (runtime/experts/homes.py: device slots split over the layers,
rebalanced from routing counts), at each of ``--swap-rates`` (swaps a rebalance may make per routed
choice a layer; 0: homes never move), with the swaps a token that costs.

Streams: uniform and Zipf routing (runtime/routing_trace.py's RandomRouting) on a model geometry
(default: the 397B's 60 layers x 512 experts, K=10), and a recorded trace of real routing (default:
the trained reference model's, 4 layers x 32 experts, K=4). The first ``--warmup`` tokens fill the
cache and are not counted.

    python scripts/cache_policy.py [--layers 60 --experts 512 --k 10] [--tokens 3000] [--warmup 500]
        [--capacity 0.25 0.5 0.64] [--zipf 1.2] [--trace models/reference/routing-trace.npz]
        [--swap-rates 0 0.2 1] [--json]
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fmoe.runtime.experts.cache import POLICIES, SlotIndex
from fmoe.runtime.experts.homes import REBALANCE_CHOICES, initial_homes, plan_swaps
from fmoe.runtime.routing_trace import RandomRouting, RoutingTrace

Stream = Callable[[int, int], np.ndarray]  # (token, layer) -> expert ids


def hit_rate(
    stream: Stream, layers: int, experts: int, tokens: int, warmup: int, capacity: float, policy: str
) -> float:
    index = SlotIndex(max(1, int(capacity * layers * experts)), policy)
    hits = requests = 0
    for t in range(tokens):
        for layer in range(layers):
            pinned: set[int] = set()
            for e in stream(t, layer).tolist():
                slot = index.lookup(layer, e)
                if slot is None:
                    slot = index.claim(pinned)
                    assert slot is not None
                    index.insert(layer, e, slot)
                elif t >= warmup:
                    hits += 1
                pinned.add(slot)
                requests += t >= warmup
    return hits / max(requests, 1)


def homes_hit_rate(
    stream: Stream, layers: int, experts: int, tokens: int, warmup: int, capacity: float, swap_rate: float
) -> tuple[float, float]:
    """(hit rate, swaps a token) of fixed homes rebalanced as PlacedExperts does, after ``warmup`` tokens."""
    home = initial_homes(layers, experts, int(capacity * layers * experts), layers * experts)
    window, freq = np.zeros((layers, experts)), np.zeros((layers, experts))
    hits = requests = swaps = 0
    for t in range(tokens):
        for layer in range(layers):
            ids = stream(t, layer)
            window[layer, ids] += 1
            if t >= warmup:
                hits += int((home[layer, ids] >= 0).sum())
                requests += len(ids)
        choices = window.sum() / layers
        if choices >= REBALANCE_CHOICES:
            freq = freq / 2 + window
            window[:] = 0
            for layer, a, b in plan_swaps(home, freq, int(choices * swap_rate)):
                home[layer, a], home[layer, b] = home[layer, b], home[layer, a]
                swaps += t >= warmup
    return hits / max(requests, 1), swaps / max(tokens - warmup, 1)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=60)
    ap.add_argument("--experts", type=int, default=512)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--tokens", type=int, default=3000)
    ap.add_argument("--warmup", type=int, default=500)
    ap.add_argument("--capacity", type=float, nargs="+", default=[0.25, 0.5, 0.64])
    ap.add_argument("--zipf", type=float, default=1.2)
    ap.add_argument("--trace", type=Path, default=Path(__file__).parent.parent / "models/reference/routing-trace.npz")
    ap.add_argument("--swap-rates", type=float, nargs="+", default=[0.0, 0.2, 1.0])
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    rows = []
    streams: list[tuple[str, Stream, int, int, int, int]] = []
    for name, s in (("uniform", 0.0), (f"zipf:{args.zipf:g}", args.zipf)):
        src = RandomRouting(args.layers, args.experts, zipf_s=s)
        picks = np.stack([src.pick(layer, np.arange(args.tokens), args.k) for layer in range(args.layers)], axis=1)
        pick: Stream = lambda t, layer, p=picks: p[t, layer]  # noqa: E731
        streams.append((name, pick, args.layers, args.experts, args.tokens, args.warmup))
    trace = RoutingTrace.load(args.trace)
    warm = min(args.warmup, trace.tokens // 5)
    streams.append(
        (f"trace:{args.trace.name}", lambda t, layer: trace.experts[t, layer].astype(np.int64), trace.num_layers,
         trace.num_experts, trace.tokens, warm)
    )  # fmt: skip
    for name, stream, layers, experts, tokens, warmup in streams:
        for cap in args.capacity:
            rates = {p: hit_rate(stream, layers, experts, tokens, warmup, cap, p) for p in POLICIES}
            homes = {
                f"homes@{r:g}": homes_hit_rate(stream, layers, experts, tokens, warmup, cap, r) for r in args.swap_rates
            }
            rows.append({"routing": name, "geometry": f"{layers}x{experts}", "capacity": cap, **rates, **homes})
    if args.json:
        print(json.dumps(rows))
        return 0
    homes = [f"homes@{r:g}" for r in args.swap_rates]
    head = [f"{p} hit rate" for p in POLICIES] + [
        f"homes, swap rate {r:g}: hit rate (swaps a token)" for r in args.swap_rates
    ]
    print("| routing | layers x experts | cache holds | " + " | ".join(head) + " |")
    print("|---|---|---|" + "---|" * len(head))
    for r in rows:
        rates = [f"{100 * r[p]:.1f}%" for p in POLICIES] + [f"{100 * r[h][0]:.1f}% ({r[h][1]:.2f})" for h in homes]
        print(f"| {r['routing']} | {r['geometry']} | {100 * r['capacity']:.0f}% | {' | '.join(rates)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
