"""The ops a backend provides. The model (runtime/model.py) calls only these plus small numpy glue
(softmax, top-K, sigmoid), so a CUDA or MLX backend is one new class, not a second model.

Shapes use T for tokens in the current call. Activations are float32.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from fmoe.formats.quant import QuantTensor

# A weight matrix [out, in]: float32 (bf16 values widened at load) or affine-quantised.
Weight = np.ndarray | QuantTensor


class ExpertLike(Protocol):
    """One routed expert's three matrices (runtime.experts.ExpertWeights has this shape)."""

    gate: Weight  # [moe_inter, hidden]
    up: Weight  # [moe_inter, hidden]
    down: Weight  # [hidden, moe_inter]


class ExpertSource(Protocol):
    """Where the model gets routed experts from (runtime.experts.ExpertStore, or a test double)."""

    def fetch(self, layer: int, experts: Sequence[int]) -> Mapping[int, ExpertLike]: ...


class Backend(Protocol):
    name: str

    def matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        """``x`` [T, in] times ``w``^T -> [T, out]."""
        ...

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        """RMSNorm over the last axis; ``weight`` is the effective scale (1+w already applied by extract)."""
        ...

    def gated_rms_norm(self, x: np.ndarray, weight: np.ndarray, gate: np.ndarray, eps: float) -> np.ndarray:
        """``rms_norm(x, weight) * silu(gate)`` over the last axis (the DeltaNet output norm)."""
        ...

    def causal_conv1d(self, x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray) -> np.ndarray:
        """Depthwise causal conv over time then SiLU. ``x`` [T, C], ``weight`` [C, K],
        ``conv_state`` [K-1, C] (the previous inputs) is updated in place to the last K-1 inputs."""
        ...

    def gated_delta_rule(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, state: np.ndarray
    ) -> np.ndarray:
        """q, k [T, Hk, Dk] (normalised, q scaled), v [T, Hv, Dv], g, beta [T, Hv]; ``state``
        [Hv, Dk, Dv] updated in place; value head j uses key head j // (Hv // Hk). Returns [T, Hv, Dv]."""
        ...

    def rotary(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        """NeoX (rotate-half) RoPE on the first ``2 * len(inv_freq)`` dims of ``x`` [T, H, D]; the rest pass."""
        ...

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: float) -> np.ndarray:
        """Causal GQA. ``q`` [T, Hq, D] at positions start..start+T-1; ``keys``/``values`` [Hkv, L, D]
        at positions 0..L-1 (L = start + T); q head h uses kv head h // (Hq // Hkv). Returns [T, Hq, D]."""
        ...

    def mlp(self, x: np.ndarray, gate: Weight, up: Weight, down: Weight) -> np.ndarray:
        """SwiGLU: ``down(silu(gate x) * up x)``, x [T, hidden] -> [T, hidden]."""
        ...

    def expert_mlp(self, x: np.ndarray, expert: ExpertLike) -> np.ndarray:
        """A routed expert's SwiGLU on its tokens ``x`` [T_e, hidden]."""
        ...

    def warmup(self) -> None:
        """Compile/prepare whatever the first token would otherwise wait for."""
        ...
