"""CPU backend: numpy for the float work, a kernel module for quantised matmuls, the fused SwiGLU
expert and the delta rule.

``kernels="auto"`` uses the numba kernels (runtime/kernels/cpu.py) when they import, else the numpy
reference kernels (runtime/kernels/reference.py, also chosen by "reference" or its alias "numpy").
"""

from __future__ import annotations

import importlib
from types import ModuleType

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor
from fmoe.runtime.backends.base import ExpertLike, Weight

# Bound on the [heads, queries, keys] score block of one attention step (bytes), so a long
# prefill never materialises T x T scores for all heads at once.
_ATTN_BLOCK_BYTES = 64 << 20


def silu(x: np.ndarray) -> np.ndarray:
    # x * sigmoid(x) with sigmoid via tanh: no overflow warnings for large |x|
    return x * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x))


def _load_kernels(which: str) -> ModuleType:
    if which in ("reference", "numpy"):
        return importlib.import_module("fmoe.runtime.kernels.reference")
    if which not in ("auto", "numba"):
        raise FmoeError(f"kernels: unknown kernel set {which!r} (auto, numba, reference, numpy)")
    try:
        return importlib.import_module("fmoe.runtime.kernels.cpu")
    except ImportError:
        if which == "numba":
            raise
        return importlib.import_module("fmoe.runtime.kernels.reference")


class CpuBackend:
    """The Backend protocol on the CPU (see runtime/backends/base.py for the op contracts)."""

    name = "cpu"

    def __init__(self, kernels: str = "auto") -> None:
        self._kernels = _load_kernels(kernels)
        self.kernels = "numba" if self._kernels.__name__.endswith(".cpu") else "reference"

    # ---- linear algebra ------------------------------------------------------------------------
    def matmul(self, x: np.ndarray, w: Weight) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(w, QuantTensor):
            return self._kernels.qmatmul(x, w)
        return x @ w.T

    def mlp(self, x: np.ndarray, gate: Weight, up: Weight, down: Weight) -> np.ndarray:
        if (
            isinstance(gate, QuantTensor)
            and isinstance(up, QuantTensor)
            and isinstance(down, QuantTensor)
            and (gate.bits, gate.group_size) == (up.bits, up.group_size)
        ):
            # numba: one pass over gate and up for a single token, no temporaries between the matmuls
            return self._kernels.swiglu_expert(np.ascontiguousarray(x, dtype=np.float32), gate, up, down)
        h = silu(self.matmul(x, gate)) * self.matmul(x, up)
        return self.matmul(h, down)

    def expert_mlp(self, x: np.ndarray, expert: ExpertLike) -> np.ndarray:
        return self.mlp(x, expert.gate, expert.up, expert.down)

    # ---- norms ---------------------------------------------------------------------------------
    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x / np.sqrt(ms + np.float32(eps))) * weight

    def gated_rms_norm(self, x: np.ndarray, weight: np.ndarray, gate: np.ndarray, eps: float) -> np.ndarray:
        return self.rms_norm(x, weight, eps) * silu(gate)

    # ---- Gated DeltaNet ------------------------------------------------------------------------
    def causal_conv1d(self, x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray) -> np.ndarray:
        t = x.shape[0]
        width = weight.shape[1]
        full = np.concatenate([conv_state, x.astype(np.float32, copy=False)], axis=0)  # [K-1+T, C]
        out = full[0:t] * weight[:, 0]
        for j in range(1, width):
            out += full[j : j + t] * weight[:, j]
        conv_state[:] = full[t:]
        return silu(out)

    def gated_delta_rule(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, state: np.ndarray
    ) -> np.ndarray:
        return self._kernels.gated_delta_rule(q, k, v, g, beta, state)

    # ---- attention -----------------------------------------------------------------------------
    def rotary(self, x: np.ndarray, positions: np.ndarray, inv_freq: np.ndarray) -> np.ndarray:
        half = inv_freq.shape[0]
        freqs = positions.astype(np.float64)[:, None] * inv_freq.astype(np.float64)[None, :]  # [T, half]
        cos = np.cos(freqs).astype(np.float32)[:, None, :]
        sin = np.sin(freqs).astype(np.float32)[:, None, :]
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        out = x.copy()
        out[..., :half] = x1 * cos - x2 * sin
        out[..., half : 2 * half] = x2 * cos + x1 * sin
        return out

    def attention(self, q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int, scale: float) -> np.ndarray:
        t, hq, d = q.shape
        hkv, length, _ = keys.shape
        groups = hq // hkv
        # [Hkv, G*T, D]: the G query heads sharing a kv head are stacked so each kv head is one matmul
        qh = q.reshape(t, hkv, groups, d).transpose(1, 2, 0, 3).reshape(hkv, groups * t, d)
        out = np.empty((hkv, groups, t, d), dtype=np.float32)
        step = max(1, _ATTN_BLOCK_BYTES // max(1, 4 * hq * length))
        kt = keys.transpose(0, 2, 1)
        pos_k = np.arange(length)
        for lo in range(0, t, step):
            hi = min(t, lo + step)
            n = hi - lo
            qb = qh.reshape(hkv, groups, t, d)[:, :, lo:hi].reshape(hkv, groups * n, d)
            s = (qb @ kt) * np.float32(scale)  # [Hkv, G*n, L]
            s = s.reshape(hkv, groups, n, length)
            visible = pos_k[None, :] <= (start + np.arange(lo, hi))[:, None]  # [n, L]
            s = np.where(visible, s, -np.inf)
            s -= s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[:, :, lo:hi] = (p.reshape(hkv, groups * n, length) @ values).reshape(hkv, groups, n, d)
        return out.transpose(2, 0, 1, 3).reshape(t, hq, d)

    # ---- misc ----------------------------------------------------------------------------------
    def warmup(self) -> None:
        self._kernels.warmup()
