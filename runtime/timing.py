"""Where the time goes: seconds per (layer, phase), bounded by the backend's own timeline.

The model marks phase boundaries on a :class:`PhaseTimer` the backend makes: on the CPU a mark reads
the wall clock; on an asynchronous device it records an event in the device's stream, so a phase is
the device time between two marks, not the time the host took to enqueue it. ``finish`` waits for
the device and books the seconds into a :class:`PhaseProfile`.

Phases of one layer, in report order:
    dense           projections, norms, the shared expert and the router matmul (the embedding,
                    final norm and lm_head are booked on the "head" row)
    mixer           the conv + delta rule, or attention's core (norms, RoPE, softmax(QK^T)V)
    routing         softmax and top-K over the router logits, the host read-back of the expert ids
    expert_io       waiting for the expert store to make the experts resident
    expert_compute  the routed experts' SwiGLU and the weighted combine
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

PHASES = ("dense", "mixer", "routing", "expert_io", "expert_compute")
HEAD = -1  # the layer index of the work outside the layers


@dataclass
class PhaseProfile:
    """Seconds per (layer, phase): ``seconds[layer, PHASES.index(phase)]``, the last row the head."""

    num_layers: int
    seconds: np.ndarray = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.seconds = np.zeros((self.num_layers + 1, len(PHASES)), dtype=np.float64)

    def add(self, layer: int, phase: str, seconds: float) -> None:
        self.seconds[layer, PHASES.index(phase)] += seconds

    def merge(self, other: PhaseProfile) -> None:
        self.seconds += other.seconds

    @property
    def total(self) -> float:
        return float(self.seconds.sum())

    def phase_totals(self) -> dict[str, float]:
        """Seconds per phase, summed over the layers and the head."""
        return {p: float(self.seconds[:, i].sum()) for i, p in enumerate(PHASES)}

    def layer(self, layer: int) -> dict[str, float]:
        """Seconds per phase of one layer (``HEAD`` for the head row)."""
        return {p: float(self.seconds[layer, i]) for i, p in enumerate(PHASES)}

    def to_dict(self) -> dict[str, Any]:
        return {
            "phases": self.phase_totals(),
            "layers": [self.layer(i) for i in range(self.num_layers)],
            "head": self.layer(HEAD),
        }


class PhaseTimer(Protocol):
    def mark(self, layer: int, phase: str) -> None:
        """Book everything since the previous mark (or the timer's start) to ``(layer, phase)``."""
        ...

    def finish(self) -> None:
        """Wait for the work marked so far and add its seconds to the profile."""
        ...


class WallTimer:
    """A PhaseTimer for synchronous backends: the wall clock between marks."""

    __slots__ = ("profile", "t")

    def __init__(self, profile: PhaseProfile) -> None:
        self.profile = profile
        self.t = time.perf_counter()

    def mark(self, layer: int, phase: str) -> None:
        now = time.perf_counter()
        self.profile.add(layer, phase, now - self.t)
        self.t = now

    def finish(self) -> None:
        pass


class NullTimer:
    """No profiling: marks cost nothing."""

    def mark(self, layer: int, phase: str) -> None:
        pass

    def finish(self) -> None:
        pass


NULL_TIMER = NullTimer()
