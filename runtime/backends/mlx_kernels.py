"""The seed's fused kernels for the MLX backend: Metal sources (``shaders/*.metal``) run through
``mx.fast.metal_kernel`` on Apple silicon, each with a pure-MLX-op formulation that is used
everywhere else (``mlx[cpu]`` on Linux, MLX's CUDA build) and that the Metal path is tested against.

:class:`MlxKernels` holds the MLX-op formulations; :class:`MetalKernels` overrides each with its
Metal kernel. ``load_kernels("auto")`` picks Metal when MLX runs on a Metal GPU. A shader file is the
kernel's documentation (inputs, outputs, launch), a ``// ---- body ----`` line, then the body that
``mx.fast.metal_kernel`` wraps in a generated signature.
"""

from __future__ import annotations

import importlib.resources
from typing import NamedTuple, Protocol, cast

import mlx.core as mx

from fmoe.errors import FmoeError

BODY_MARKER = "// ---- body ----"
SHADERS = ("qmatvec", "swiglu", "rms_norm", "add_rms_norm", "rope", "gated_delta_step", "moe_combine")
KERNEL_SETS = ("auto", "metal", "mlx")
QMATVEC_MAX_TOKENS = 8  # above this many rows a quantised matmul goes to MLX's own tiled kernels


class MlxQuant(NamedTuple):
    """An affine-quantised matrix (or a stack ``[..., out, in]``) as MLX arrays, in fmoe's packed
    format, which is MLX's: uint32 codes ``[..., out, in * bits / 32]``, bf16 scales and biases."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return int(self.weight.nbytes + self.scales.nbytes + self.biases.nbytes)


def shader_source(name: str) -> str:
    """The body of ``shaders/<name>.metal`` (the part after the marker line)."""
    text = importlib.resources.files("fmoe.shaders").joinpath(f"{name}.metal").read_text(encoding="utf-8")
    _, marker, body = text.partition(BODY_MARKER + "\n")
    if not marker:
        raise FmoeError(f"shaders/{name}.metal: no {BODY_MARKER!r} line")
    return body


def metal_available() -> bool:
    """Whether MLX runs on a Metal GPU here (Apple silicon with the Metal build of MLX)."""
    return bool(mx.metal.is_available())


class MlxKernels:
    """The fused ops as plain MLX ops: the fallback off Metal and the Metal kernels' reference."""

    name = "mlx"

    def qmatmul(self, x: mx.array, w: MlxQuant) -> mx.array:
        """``x [T, in] @ W.T`` for a quantised ``W [out, in]``: ``[T, out]`` float32."""
        return mx.quantized_matmul(
            x, w.weight, scales=w.scales, biases=w.biases, transpose=True, group_size=w.group_size, bits=w.bits
        )

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        """``silu(gate) * up``, elementwise."""
        return gate * mx.sigmoid(gate) * up

    def rms_norm(self, x: mx.array, w: mx.array, eps: float) -> mx.array:
        """RMSNorm over the last axis times ``w``."""
        return x * mx.rsqrt(mx.mean(mx.square(x), axis=-1, keepdims=True) + eps) * w

    def add_rms_norm(self, x: mx.array, y: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
        """``(x + y, rms_norm(x + y, w))``."""
        total = x + y
        return total, self.rms_norm(total, w, eps)

    def rope(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        """NeoX rotate-half of ``x [T, H, D]`` by the angles of ``cos, sin [T, half]`` (pairs
        ``(i, i + half)``); dims from ``2 * half`` on pass through."""
        half = cos.shape[-1]
        c, s = cos[:, None, :], sin[:, None, :]
        x1, x2 = x[..., :half], x[..., half : 2 * half]
        return mx.concatenate([x1 * c - x2 * s, x2 * c + x1 * s, x[..., 2 * half :]], axis=-1)

    def gated_delta(
        self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
    ) -> tuple[mx.array, mx.array]:
        """The gated delta rule token by token (runtime/backends/base.py states it); returns
        ``(o [T, Hv, Dv], the new state)``."""
        rep = v.shape[1] // k.shape[1]
        if rep > 1:  # value head j reads key head j // rep
            q, k = mx.repeat(q, rep, axis=1), mx.repeat(k, rep, axis=1)
        decay = mx.exp(g)
        s, outs = state, []
        for t in range(v.shape[0]):
            s = s * decay[t][:, None, None]
            kv = (k[t][:, None, :] @ s)[:, 0]  # [Hv, Dv]
            delta = (v[t] - kv) * beta[t][:, None]
            s = s + k[t][:, :, None] * delta[:, None, :]
            outs.append((q[t][:, None, :] @ s)[:, 0])
        return mx.stack(outs), s

    def moe_combine(self, y: mx.array, w: mx.array, shared: mx.array) -> mx.array:
        """``shared + sum_j w[:, j] * y[:, j]`` over the choices ``j`` in order: ``y [T, K, H]``."""
        out = shared
        for j in range(y.shape[1]):
            out = out + w[:, j : j + 1] * y[:, j]
        return out


class _MetalKernel(Protocol):
    """What ``mx.fast.metal_kernel`` returns (its stub says only ``object``)."""

    def __call__(
        self,
        *,
        inputs: list[mx.array],
        output_shapes: list[tuple[int, ...]],
        output_dtypes: list[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: list[tuple[str, int]] | None = None,
    ) -> list[mx.array]: ...


# inputs and outputs of each shader, in signature order
_SIGNATURES: dict[str, tuple[list[str], list[str]]] = {
    "qmatvec": (["x", "w", "scales", "biases"], ["out"]),
    "swiglu": (["gate", "up"], ["out"]),
    "rms_norm": (["x", "w", "eps"], ["out"]),
    "add_rms_norm": (["x", "y", "w", "eps"], ["total", "out"]),
    "rope": (["x", "cos_table", "sin_table"], ["out"]),
    "gated_delta_step": (["q", "k", "v", "g", "beta", "state"], ["o", "state_out"]),
    "moe_combine": (["y", "w", "shared"], ["out"]),
}


def build_kernel(name: str) -> _MetalKernel:
    """``shaders/<name>.metal`` as an ``mx.fast.metal_kernel`` (compiled on its first call)."""
    inputs, outputs = _SIGNATURES[name]
    kernel = mx.fast.metal_kernel(
        name=f"fmoe_{name}", input_names=inputs, output_names=outputs, source=shader_source(name)
    )
    return cast(_MetalKernel, kernel)


class MetalKernels(MlxKernels):
    """The seed's Metal kernels (shaders/), float32 activations; inputs must be float32 (and
    are made row-contiguous by MLX)."""

    name = "metal"

    def __init__(self) -> None:
        self._k = {name: build_kernel(name) for name in SHADERS}

    def qmatmul(self, x: mx.array, w: MlxQuant) -> mx.array:
        t, n = x.shape[0], w.weight.shape[0]
        if t > QMATVEC_MAX_TOKENS or w.weight.ndim != 2 or 32 % w.bits:
            return super().qmatmul(x, w)
        (out,) = self._k["qmatvec"](
            inputs=[x, w.weight, w.scales, w.biases],
            template=[("BITS", w.bits), ("GROUP", w.group_size)],
            grid=(32, n, t),
            threadgroup=(32, min(8, n), 1),
            output_shapes=[(t, n)],
            output_dtypes=[mx.float32],
        )
        return out

    def swiglu(self, gate: mx.array, up: mx.array) -> mx.array:
        n = gate.size
        (out,) = self._k["swiglu"](
            inputs=[gate.reshape(-1), up.reshape(-1)],
            grid=(n, 1, 1),
            threadgroup=(min(256, n), 1, 1),
            output_shapes=[(n,)],
            output_dtypes=[mx.float32],
        )
        return out.reshape(gate.shape)

    def rms_norm(self, x: mx.array, w: mx.array, eps: float) -> mx.array:
        rows = x.reshape(-1, x.shape[-1])
        (out,) = self._k["rms_norm"](
            inputs=[rows, w, mx.array(eps, dtype=mx.float32)],
            grid=(32, rows.shape[0], 1),
            threadgroup=(32, 1, 1),
            output_shapes=[rows.shape],
            output_dtypes=[mx.float32],
        )
        return out.reshape(x.shape)

    def add_rms_norm(self, x: mx.array, y: mx.array, w: mx.array, eps: float) -> tuple[mx.array, mx.array]:
        xr, yr = x.reshape(-1, x.shape[-1]), y.reshape(-1, y.shape[-1])
        total, out = self._k["add_rms_norm"](
            inputs=[xr, yr, w, mx.array(eps, dtype=mx.float32)],
            grid=(32, xr.shape[0], 1),
            threadgroup=(32, 1, 1),
            output_shapes=[xr.shape, xr.shape],
            output_dtypes=[mx.float32, mx.float32],
        )
        return total.reshape(x.shape), out.reshape(x.shape)

    def rope(self, x: mx.array, cos: mx.array, sin: mx.array) -> mx.array:
        t, h, d = x.shape
        (out,) = self._k["rope"](
            inputs=[x, cos, sin],
            grid=(d, h, t),
            threadgroup=(min(d, 256), 1, 1),
            output_shapes=[x.shape],
            output_dtypes=[mx.float32],
        )
        return out

    def gated_delta(
        self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
    ) -> tuple[mx.array, mx.array]:
        hv, dk, dv = state.shape
        o, new_state = self._k["gated_delta_step"](
            inputs=[q, k, v, g, beta, state],
            template=[("DK", dk)],
            grid=(32, dv, hv),
            threadgroup=(32, min(4, dv), 1),
            output_shapes=[v.shape, state.shape],
            output_dtypes=[mx.float32, mx.float32],
        )
        return o, new_state

    def moe_combine(self, y: mx.array, w: mx.array, shared: mx.array) -> mx.array:
        t, hidden = shared.shape
        (out,) = self._k["moe_combine"](
            inputs=[y, w, shared],
            grid=(hidden, t, 1),
            threadgroup=(min(256, hidden), 1, 1),
            output_shapes=[shared.shape],
            output_dtypes=[mx.float32],
        )
        return out


def load_kernels(which: str = "auto") -> MlxKernels:
    """The kernel set ``which``: "metal" (needs a Metal GPU), "mlx" (MLX ops) or "auto" (Metal
    when MLX runs on one, else MLX ops)."""
    if which not in KERNEL_SETS:
        raise FmoeError(f"kernels: unknown kernel set {which!r} ({', '.join(KERNEL_SETS)})")
    if which == "metal" and not metal_available():
        raise FmoeError("kernels: metal needs MLX on a Metal GPU (Apple silicon); this MLX has none")
    if which == "metal" or (which == "auto" and metal_available()):
        return MetalKernels()
    return MlxKernels()
