"""Where the time goes: seconds per (layer, phase) and token throughput for prefill and decode."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

# The phases of one layer, in the order a report lists them:
#   dense          projections (incl. the shared expert and the router matmul; embedding and lm_head
#                  are booked on the "head" row)
#   mixer          the delta rule / attention core (conv, recurrence, softmax(QK^T)V)
#   routing        softmax and top-K over the router logits
#   expert_io      ExpertSource.fetch
#   expert_compute the routed experts' SwiGLU
PHASES = ("dense", "mixer", "routing", "expert_io", "expert_compute")
HEAD = -1  # the layer index of work outside the layers (embedding, final norm, lm_head)


@dataclass
class PhaseProfile:
    """Accumulates seconds per (layer, phase) and token counts; cheap enough to leave on."""

    num_layers: int
    seconds: np.ndarray = field(init=False)  # [num_layers + 1, len(PHASES)]; last row = HEAD
    tokens: dict[str, int] = field(default_factory=lambda: {"prefill": 0, "decode": 0})
    wall: dict[str, float] = field(default_factory=lambda: {"prefill": 0.0, "decode": 0.0})

    def __post_init__(self) -> None:
        self.seconds = np.zeros((self.num_layers + 1, len(PHASES)), dtype=np.float64)

    # ---- recording -------------------------------------------------------------------------
    def add(self, layer: int, phase: str, seconds: float) -> None:
        self.seconds[layer, PHASES.index(phase)] += seconds

    def add_tokens(self, kind: str, count: int, seconds: float) -> None:
        """One forward call of ``count`` tokens, ``kind`` "prefill" or "decode"."""
        self.tokens[kind] += count
        self.wall[kind] += seconds

    def reset(self) -> None:
        self.seconds[:] = 0.0
        for kind in self.tokens:
            self.tokens[kind] = 0
            self.wall[kind] = 0.0

    # ---- reading ---------------------------------------------------------------------------
    def tokens_per_second(self, kind: str) -> float:
        return self.tokens[kind] / self.wall[kind] if self.wall[kind] > 0 else 0.0

    def phase_totals(self) -> dict[str, float]:
        """Seconds per phase summed over layers (the HEAD row included)."""
        return {p: float(self.seconds[:, i].sum()) for i, p in enumerate(PHASES)}

    def per_layer(self) -> list[dict[str, float]]:
        """One dict of seconds per phase for each layer (HEAD excluded)."""
        return [{p: float(self.seconds[layer, i]) for i, p in enumerate(PHASES)} for layer in range(self.num_layers)]

    def summary(self) -> dict[str, Any]:
        """A JSON-ready summary: totals per phase, per layer, head, token counts and tok/s."""
        return {
            "phases": self.phase_totals(),
            "layers": self.per_layer(),
            "head": {p: float(self.seconds[HEAD, i]) for i, p in enumerate(PHASES)},
            "tokens": dict(self.tokens),
            "seconds": dict(self.wall),
            "tokens_per_second": {k: self.tokens_per_second(k) for k in self.tokens},
        }
