"""Numpy reference kernels: the plain formulation the fast kernels are checked and benchmarked against.

Same signatures as :mod:`fmoe.runtime.kernels.cpu` (which is checked against these in tests).
"""

from __future__ import annotations

import numpy as np

from fmoe.formats.packed import ExpertLayout
from fmoe.formats.quant import QuantTensor


def qmatmul(x: np.ndarray, qt: QuantTensor) -> np.ndarray:
    """``x @ W.T`` for an affine-quantised ``W [out, in]``: dequantise to float32, then a BLAS matmul.

    ``x`` float32 ``[in]`` or ``[T, in]``; returns float32 ``[out]`` or ``[T, out]``.
    """
    x = np.asarray(x, dtype=np.float32)
    return x @ qt.dequantize().T


def swiglu_expert(x: np.ndarray, gate: QuantTensor, up: QuantTensor, down: QuantTensor) -> np.ndarray:
    """A quantised SwiGLU expert, ``down(silu(gate x) * up x)``; x float32 ``[hidden]`` or ``[T, hidden]``."""
    g, u = qmatmul(x, gate), qmatmul(x, up)
    with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu = -0, as it should
        h = g / (np.float32(1.0) + np.exp(-g)) * u
    return qmatmul(h, down)


def experts_swiglu(slab: np.ndarray, layout: ExpertLayout, slots: np.ndarray, x: np.ndarray) -> np.ndarray:
    """SwiGLU of pair p's expert (slot ``slots[p]`` of the uint8 ``[S, file_size]`` slab) on ``x[p]``."""
    out = np.empty_like(x, dtype=np.float32)
    for p, slot in enumerate(slots):
        w = layout.decode(slab[slot])
        out[p] = swiglu_expert(x[p], w["gate_proj"], w["up_proj"], w["down_proj"])
    return out


def gated_delta_rule(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, state: np.ndarray
) -> np.ndarray:
    """The gated delta rule, token by token, all value heads at once (vectorised over heads).

    q, k ``[T, Hk, Dk]`` (already l2-normalised, q already scaled), v ``[T, Hv, Dv]``, g (log decay)
    and beta ``[T, Hv]``; ``state [Hv, Dk, Dv]`` is updated in place. Value head ``j`` reads key
    head ``j // (Hv // Hk)``. Computes in the state's dtype; returns ``o [T, Hv, Dv]``.
    """
    dt = state.dtype
    T, Hk, _ = k.shape
    Hv = v.shape[1]
    rep = Hv // Hk
    q = np.repeat(np.asarray(q, dtype=dt), rep, axis=1)
    k = np.repeat(np.asarray(k, dtype=dt), rep, axis=1)
    v, g, beta = (np.asarray(a, dtype=dt) for a in (v, g, beta))
    out = np.empty(v.shape, dtype=dt)
    for t in range(T):
        state *= np.exp(g[t])[:, None, None]
        kv = np.einsum("hij,hi->hj", state, k[t])
        delta = (v[t] - kv) * beta[t][:, None]
        state += k[t][:, :, None] * delta[:, None, :]
        out[t] = np.einsum("hij,hi->hj", state, q[t])
    return out


def warmup() -> None:
    """Nothing to compile (numpy)."""
