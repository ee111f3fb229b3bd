"""What the expert store did, per layer and per tier.

Counters only grow; a caller that wants the figures of one forward pass (or one request) takes a
snapshot before and subtracts it after (``after - before``), so statistics never need resetting and
concurrent requests cannot reset each other's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# The tiers an expert can come from, fastest first: device memory (runtime/experts/device.py), the
# in-process host cache, the expert files
# mapped (io="mmap": computed on in place, through the OS page cache), the files read into a slot
# (through the OS page cache or from the disk itself: the OS does not say which).
TIERS = ("device", "memory", "mapped", "disk")


@dataclass
class ExpertStats:
    """``requested[layer]``: experts asked for; per tier ``served`` (experts it provided), ``bytes``
    and ``seconds`` (time it was busy: reads from submission to completion, overlaps counted once);
    ``host_computed[layer]``: of the experts host tiers served to a device tier, those computed on the
    host instead of being copied over the link (runtime/experts/device.py)."""

    requested: np.ndarray  # int64 [layers]
    served: np.ndarray  # int64 [layers, tiers]
    bytes: np.ndarray  # int64 [layers, tiers]
    seconds: np.ndarray  # float64 [layers, tiers]
    host_computed: np.ndarray  # int64 [layers]

    @classmethod
    def zeros(cls, num_layers: int) -> ExpertStats:
        n = len(TIERS)
        return cls(
            np.zeros(num_layers, np.int64),
            np.zeros((num_layers, n), np.int64),
            np.zeros((num_layers, n), np.int64),
            np.zeros((num_layers, n), np.float64),
            np.zeros(num_layers, np.int64),
        )

    def record(self, layer: int, tier: str, experts: int, nbytes: int, seconds: float = 0.0) -> None:
        t = TIERS.index(tier)
        self.served[layer, t] += experts
        self.bytes[layer, t] += nbytes
        self.seconds[layer, t] += seconds

    def copy(self) -> ExpertStats:
        return ExpertStats(
            self.requested.copy(), self.served.copy(), self.bytes.copy(), self.seconds.copy(), self.host_computed.copy()
        )

    def __sub__(self, before: ExpertStats) -> ExpertStats:
        return ExpertStats(
            self.requested - before.requested,
            self.served - before.served,
            self.bytes - before.bytes,
            self.seconds - before.seconds,
            self.host_computed - before.host_computed,
        )

    def __iadd__(self, other: ExpertStats) -> ExpertStats:
        self.requested += other.requested
        self.served += other.served
        self.bytes += other.bytes
        self.seconds += other.seconds
        self.host_computed += other.host_computed
        return self

    def tier(self, name: str) -> dict[str, Any]:
        """Totals of one tier: experts served, share of the requested ones, bytes, seconds, GB/s."""
        t = TIERS.index(name)
        requested = int(self.requested.sum())
        served, nbytes, seconds = (
            int(self.served[:, t].sum()),
            int(self.bytes[:, t].sum()),
            float(self.seconds[:, t].sum()),
        )
        return {
            "served": served,
            "share": served / requested if requested else 0.0,
            "bytes": nbytes,
            "seconds": seconds,
            "gb_per_s": nbytes / seconds / 1e9 if seconds > 0 else 0.0,
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "requested": int(self.requested.sum()),
            "host_computed": int(self.host_computed.sum()),
            "tiers": {name: self.tier(name) for name in TIERS},
            "per_layer": [
                {
                    "requested": int(self.requested[i]),
                    **{f"{name}_served": int(self.served[i, t]) for t, name in enumerate(TIERS)},
                    **{f"{name}_bytes": int(self.bytes[i, t]) for t, name in enumerate(TIERS)},
                }
                for i in range(len(self.requested))
            ],
        }
