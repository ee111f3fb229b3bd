"""A session: one conversation's token ids and model state, which a caller continues, copies or
drops. The engine never keeps one; whoever holds it decides its lifetime.

A session is used by one caller at a time (an engine may serve many sessions from many threads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fmoe.runtime.state import SequenceState

if TYPE_CHECKING:
    from fmoe.runtime.engine.results import GenerationResult


@dataclass
class Session:
    state: SequenceState
    token_ids: list[int] = field(default_factory=list)  # every token the state has seen, in order
    pending: list[int] = field(default_factory=list)  # generated but not fed yet: the next call feeds them first
    results: list[GenerationResult] = field(default_factory=list, repr=False)  # one per request, in order

    @property
    def position(self) -> int:
        """Tokens the state holds."""
        return self.state.position

    @property
    def conversation(self) -> list[int]:
        """Every token of the conversation: those fed, then those pending."""
        return self.token_ids + self.pending

    def copy(self) -> Session:
        """An independent copy (branch a conversation; keep a prefix for reuse)."""
        return Session(self.state.copy(), list(self.token_ids), list(self.pending), list(self.results))

    @property
    def nbytes(self) -> int:
        return self.state.nbytes
