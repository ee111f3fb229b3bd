"""Where experts live when each has a fixed home (``--host-reads direct``, runtime/experts/placed.py),
and how homes move: the policy alone, in numpy, so that scripts/cache_policy.py replays routing
through exactly what the runtime does.

A home is a device slot (>= 0) or a host row ``r``, written as the slot value ``-2 - r`` (the expert
kernels' encoding, runtime/kernels/triton_moe.py). Homes start with the device slots split evenly
over the layers; a rebalance swaps the host-homed experts routed to most with the device-homed ones
routed to least, on per-expert frequencies the caller keeps (halved at each rebalance).
"""

from __future__ import annotations

from typing import Any

import numpy as np

# A rebalance follows every REBALANCE_CHOICES routed choices a layer (16 decode steps at K=10, or one
# prefill that long) and makes at most SWAPS_PER_CHOICE swaps per choice a layer since the last (two a
# decode step at K=10: each moves two experts over the link, about 0.3 ms for the 397B's 7 MB ones on
# an H200, so under 2% of a 40 ms step; a 512-token prefill may swap about a thousand).
REBALANCE_CHOICES = 160
SWAPS_PER_CHOICE = 0.2


def host_row_slot(row: int | np.ndarray) -> Any:
    """The slot value that names row ``row`` of the host slab (the kernels' encoding: ``-2 - row``;
    its own inverse, so also the row that a slot value names)."""
    return -2 - row


def initial_homes(num_layers: int, num_experts: int, capacity: int, host_rows: int) -> np.ndarray:
    """Device slots split evenly over the layers (each layer's first experts), the rest in host rows
    in order (in turn when there are fewer rows than experts left)."""
    per_layer = np.full(num_layers, capacity // num_layers)
    per_layer[: capacity % num_layers] += 1
    per_layer = np.minimum(per_layer, num_experts)
    home = np.empty((num_layers, num_experts), dtype=np.int64)
    slot = row = 0
    for layer in range(num_layers):
        n = int(per_layer[layer])
        home[layer, :n] = np.arange(slot, slot + n)
        slot += n
        rest = num_experts - n
        home[layer, n:] = host_row_slot((row + np.arange(rest)) % max(host_rows, 1))
        row += rest
    return home


def plan_swaps(home: np.ndarray, freq: np.ndarray, max_swaps: int) -> list[tuple[int, int, int]]:
    """Up to ``max_swaps`` (layer, host-homed expert, device-homed expert) pairs to swap, largest
    frequency gain first, each layer's most routed host experts against its least routed device ones
    while the first is routed to more; in layer order. ``home`` and ``freq``: ``[layers, experts]``."""
    gains: list[tuple[float, int, int, int]] = []
    for layer in range(home.shape[0]):
        f = freq[layer]
        on_host, on_device = np.flatnonzero(home[layer] < -1), np.flatnonzero(home[layer] >= 0)
        hot = on_host[np.argsort(-f[on_host], kind="stable")][:max_swaps]
        cold = on_device[np.argsort(f[on_device], kind="stable")][:max_swaps]
        for a, b in zip(hot.tolist(), cold.tolist(), strict=False):
            if f[a] <= f[b]:
                break
            gains.append((f[a] - f[b], layer, a, b))
    gains.sort(reverse=True)
    return sorted(((layer, a, b) for _, layer, a, b in gains[:max_swaps]), key=lambda m: m[0])
