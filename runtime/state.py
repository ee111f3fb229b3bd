"""Per-sequence inference state: DeltaNet conv + recurrent states, attention KV caches, position."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np

from fmoe.config import TextConfig


@dataclass
class LinearState:
    """State of one Gated DeltaNet layer."""

    conv: np.ndarray  # float32 [kernel - 1, conv_dim]: the last kernel-1 inputs of the causal conv
    delta: np.ndarray  # float32 [Hv, Dk, Dv]: the recurrent state S

    @classmethod
    def zeros(cls, cfg: TextConfig) -> LinearState:
        return cls(
            conv=np.zeros((cfg.linear_conv_kernel_dim - 1, cfg.conv_dim), dtype=np.float32),
            delta=np.zeros(
                (cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim), dtype=np.float32
            ),
        )

    @property
    def nbytes(self) -> int:
        return self.conv.nbytes + self.delta.nbytes


@dataclass
class KVCache:
    """Keys and values of one full-attention layer, grown by doubling (amortised O(1) per token).

    Stored head-major ``[Hkv, capacity, head_dim]`` so each head's first ``length`` rows are one
    contiguous block for the attention matmuls.
    """

    num_heads: int
    head_dim: int
    length: int = 0
    _k: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]
    _v: np.ndarray = field(default=None, repr=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self._k is None:
            self._k = np.zeros((self.num_heads, 0, self.head_dim), dtype=np.float32)
            self._v = np.zeros_like(self._k)

    @property
    def capacity(self) -> int:
        return self._k.shape[1]

    @property
    def keys(self) -> np.ndarray:
        """float32 [Hkv, length, head_dim] (a view)."""
        return self._k[:, : self.length]

    @property
    def values(self) -> np.ndarray:
        return self._v[:, : self.length]

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Add ``T`` positions: ``k``, ``v`` float32 [T, Hkv, head_dim]."""
        t = k.shape[0]
        need = self.length + t
        if need > self.capacity:
            cap = max(need, 2 * self.capacity, 16)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = np.zeros((self.num_heads, cap, self.head_dim), dtype=np.float32)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self._k[:, self.length : need] = k.transpose(1, 0, 2)
        self._v[:, self.length : need] = v.transpose(1, 0, 2)
        self.length = need

    @property
    def nbytes(self) -> int:
        return self._k.nbytes + self._v.nbytes


@dataclass
class InferenceState:
    """Everything carried from one forward call to the next for one sequence."""

    layers: list[LinearState | KVCache]
    position: int = 0  # tokens seen so far (= the position of the next token)

    @classmethod
    def new(cls, cfg: TextConfig) -> InferenceState:
        layers: list[LinearState | KVCache] = []
        for i in range(cfg.num_hidden_layers):
            if cfg.is_full_attention(i):
                layers.append(KVCache(cfg.num_key_value_heads, cfg.head_dim))
            else:
                layers.append(LinearState.zeros(cfg))
        return cls(layers=layers)

    def copy(self) -> InferenceState:
        """An independent copy (e.g. to branch a conversation or to compare two continuations)."""
        return copy.deepcopy(self)

    @property
    def nbytes(self) -> int:
        return sum(layer.nbytes for layer in self.layers)
