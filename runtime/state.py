"""Per-sequence inference state: what one forward call hands to the next for one sequence.

The model declares it (which layer holds what: runtime/model.py ``new_state``); the backend creates
and updates the arrays (its own kind: numpy, torch, ...). Ops that carry state return the new state
instead of mutating their input (a backend may still update in place underneath), and the model
stores what they return here.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any


@dataclass
class LinearState:
    """One Gated DeltaNet layer: the causal conv's last ``kernel - 1`` inputs ``[kernel - 1, conv_dim]``
    and the recurrent state ``[Hv, Dk, Dv]`` (float32 in the backend's arrays)."""

    conv: Any
    recurrent: Any

    @property
    def nbytes(self) -> int:
        return int(self.conv.nbytes + self.recurrent.nbytes)


@dataclass
class SequenceState:
    """Every layer's state (a LinearState or the backend's KV cache) and the position of the next token."""

    layers: list[Any]
    position: int = 0  # tokens seen so far

    def copy(self) -> SequenceState:
        """An independent copy (to branch a conversation, or to keep a prefix for reuse)."""
        return copy.deepcopy(self)

    @property
    def nbytes(self) -> int:
        return sum(int(layer.nbytes) for layer in self.layers)
