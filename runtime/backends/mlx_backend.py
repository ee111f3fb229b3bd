"""MLX backend: the model's ops in MLX (extra ``fmoe[metal]``): Metal on Apple silicon, and the same
code on Linux with ``mlx[cpu]`` (where CI checks it).

fmoe's affine group-64 format is MLX's own (``mx.quantize``), so quantised weights load as they are:
dense ones go through ``mx.quantized_matmul`` (or the seed's FMA matvec kernel on Metal), the routed
experts through ``mx.gather_qmm``. The fused ops (SwiGLU, RMSNorm, RoPE, the delta rule, the MoE
combine) are runtime/backends/mlx_kernels.py's: Metal kernels from shaders/ on a Metal GPU, plain MLX
ops elsewhere. Host arrays become MLX arrays through DLPack, which shares their memory where MLX can
(Metal's unified memory and a page-aligned buffer) and copies otherwise. The state is MLX arrays,
updated functionally. MLX is lazy: a timer's marks are ``mx.eval`` fences over everything the ops
produced since the previous mark.
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor
from fmoe.runtime.backends.base import Backend, Rotary, SharedExpert, greedy_pick_host, sample_pick_host, shared_output
from fmoe.runtime.backends.mlx_kernels import MlxKernels, MlxQuant, load_kernels
from fmoe.runtime.experts.slots import ExpertPart
from fmoe.runtime.state import LinearState
from fmoe.runtime.timing import PhaseProfile, PhaseTimer
from fmoe.runtime.weights import ModelWeights

L2NORM_EPS = 1e-6  # the q/k l2norm epsilon of the reference DeltaNet
SORTED_GATHER_MIN = 64  # (token, choice) rows from which gather_qmm gets them grouped by expert


def host_array(a: np.ndarray) -> mx.array:
    """A host array as an MLX array without a copy where MLX can share it (DLPack: Metal's unified
    memory, page-aligned buffers), else copied. The array must not change while MLX uses it."""
    a = np.ascontiguousarray(a)
    try:
        return mx.from_dlpack(a)
    except (BufferError, TypeError, ValueError, RuntimeError):  # e.g. a read-only buffer
        return mx.array(a)


def quant(weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int) -> MlxQuant:
    """Packed host arrays (uint32 codes, bf16 bits as uint16) as an :class:`MlxQuant`."""
    return MlxQuant(
        host_array(weight).view(mx.uint32),
        host_array(scales).view(mx.bfloat16),
        host_array(biases).view(mx.bfloat16),
        bits,
        group_size,
    )


def dequantize_exact(q: MlxQuant) -> mx.array:
    """float32 ``scale * code + bias`` as two separately rounded operations, as the numpy reference
    evaluates it (bit-exact; MLX's fused dequantise may contract them into an FMA)."""
    per = 32 // q.bits
    shifts = mx.arange(0, 32, q.bits, dtype=mx.uint32)
    codes = (q.weight[..., None] >> shifts) & ((1 << q.bits) - 1)
    groups = codes.reshape(*q.weight.shape[:-1], -1, q.group_size).astype(mx.float32)
    scales = q.scales.astype(mx.float32)[..., None]
    biases = q.biases.astype(mx.float32)[..., None]
    out = groups * scales + biases
    return out.reshape(*q.weight.shape[:-1], q.weight.shape[-1] * per)


class MlxKVCache:
    """Keys and values of one attention layer, ``[1, Hkv, capacity, D]`` (the layout of MLX's
    attention), grown by doubling and written by functional slice updates."""

    def __init__(self, kv_heads: int, head_dim: int) -> None:
        self.length = 0
        self.k = mx.zeros((1, kv_heads, 0, head_dim), dtype=mx.float32)
        self.v = mx.zeros_like(self.k)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)

    def append(self, k: mx.array, v: mx.array) -> None:
        """Add ``T`` positions: ``k``, ``v`` float32 ``[T, Hkv, D]``."""
        need = self.length + k.shape[0]
        if need > self.k.shape[2]:
            _, heads, cap, dim = self.k.shape
            grow = mx.zeros((1, heads, max(need, 2 * cap, 16) - self.length, dim), dtype=mx.float32)
            self.k = mx.concatenate([self.k[:, :, : self.length], grow], axis=2)
            self.v = mx.concatenate([self.v[:, :, : self.length], grow], axis=2)
        at = mx.array([0, 0, self.length, 0])
        self.k = mx.slice_update(self.k, k.transpose(1, 0, 2)[None], at, (0, 1, 2, 3))
        self.v = mx.slice_update(self.v, v.transpose(1, 0, 2)[None], at, (0, 1, 2, 3))
        self.length = need


class MlxTimer:
    """A PhaseTimer over MLX's lazy graph: a mark evaluates (``mx.eval``) every array the backend's
    ops produced since the previous mark, then reads the wall clock, so each phase is booked the
    work it issued, finished."""

    def __init__(self, profile: PhaseProfile) -> None:
        self.profile = profile
        self.pending: list[mx.array] = []
        self.t = time.perf_counter()

    def mark(self, layer: int, phase: str) -> None:
        self._fence()
        now = time.perf_counter()
        self.profile.add(layer, phase, now - self.t)
        self.t = now

    def finish(self) -> None:
        self._fence()

    def _fence(self) -> None:
        if self.pending:
            mx.eval(*self.pending)
            self.pending.clear()


class MlxBackend:
    """The Backend contract in MLX (runtime/backends/base.py has the op contracts).

    ``device``: "gpu" or "cpu" (None: MLX's default device, the GPU on Apple silicon); MLX's default
    device is process-wide, so choosing one sets it for the process. ``kernels``: "auto" (the Metal
    kernels of shaders/ on a Metal GPU, else MLX ops), "metal" or "mlx". MLX schedules its own
    threads: ``threads`` (the CLI's ``--threads``) is refused rather than ignored."""

    name = "mlx"

    def __init__(self, device: str | None = None, kernels: str = "auto", threads: int | None = None) -> None:
        if threads is not None:
            raise FmoeError("--threads: the mlx backend has no thread setting (MLX schedules its own work)")
        if device not in (None, "gpu", "cpu"):
            raise FmoeError(f"--device {device}: the mlx backend runs on gpu or cpu")
        if device == "gpu" and not (mx.metal.is_available() or mx.cuda.is_available()):
            raise FmoeError("--device gpu: this MLX has no GPU (the mlx[cpu] build); use --device cpu")
        if device is not None and mx.default_device() != mx.Device(getattr(mx, device)):
            mx.set_default_device(mx.Device(getattr(mx, device)))
        self.device = "gpu" if mx.default_device() == mx.gpu else "cpu"
        if self.device == "cpu" and kernels == "auto":
            kernels = "mlx"  # the Metal kernels run on the GPU only
        self._k: MlxKernels = load_kernels(kernels)
        self.kernels = self._k.name
        self._timer: weakref.ref[MlxTimer] | None = None

    # ---- arrays, weights, state, time ---------------------------------------------------------
    def asarray(self, x: np.ndarray) -> mx.array:
        x = np.asarray(x)
        return mx.array(x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x)

    def to_numpy(self, x: mx.array) -> np.ndarray:
        return np.array(x, copy=True)

    def weight(self, tensor: Any) -> Any:
        """Float arrays as float32, bf16 bits as bf16, QuantTensor as MlxQuant (shared, not copied,
        where MLX can)."""
        if isinstance(tensor, QuantTensor):
            return quant(tensor.weight, tensor.scales, tensor.biases, tensor.bits, tensor.group_size)
        if tensor.dtype == np.uint16:  # bf16 bit patterns
            return host_array(tensor).view(mx.bfloat16)
        return host_array(np.asarray(tensor, dtype=np.float32))

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        return weights.map(self.weight)

    def new_linear_state(self, conv_shape: tuple[int, int], recurrent_shape: tuple[int, int, int]) -> LinearState:
        return LinearState(mx.zeros(conv_shape, dtype=mx.float32), mx.zeros(recurrent_shape, dtype=mx.float32))

    def new_kv_cache(self, kv_heads: int, head_dim: int) -> MlxKVCache:
        return MlxKVCache(kv_heads, head_dim)

    def timer(self, profile: PhaseProfile) -> PhaseTimer:
        timer = MlxTimer(profile)
        self._timer = weakref.ref(timer)  # the ops report to it while it lives
        return timer

    def warmup(self) -> None:
        """Compile the Metal kernels' common variants (nothing to do with MLX ops)."""
        if self.kernels != "metal":
            return
        x = mx.ones((1, 64), dtype=mx.float32)
        for bits in (4, 2, 8):
            w = mx.quantize(mx.ones((8, 64), dtype=mx.bfloat16), group_size=64, bits=bits)
            mx.eval(self._k.qmatmul(x, MlxQuant(w[0], w[1], w[2], bits, 64)))
        mx.eval(self._k.swiglu(x, x), *self._k.add_rms_norm(x, x, x[0], 1e-6), self._k.rms_norm(x, x[0], 1e-6))

    # ---- dense ops ----------------------------------------------------------------------------
    def embed(self, table: Any, ids: np.ndarray) -> mx.array:
        index = mx.array(np.asarray(ids, dtype=np.int64))
        if isinstance(table, MlxQuant):
            rows = MlxQuant(table.weight[index], table.scales[index], table.biases[index], table.bits, table.group_size)
            return self._out(dequantize_exact(rows))
        return self._out(table[index].astype(mx.float32))

    def linear(self, x: mx.array, w: Any) -> mx.array:
        if isinstance(w, MlxQuant):
            return self._out(self._k.qmatmul(x, w))
        return self._out(x @ w.T)

    def linears(self, x: mx.array, ws: Sequence[Any]) -> list[mx.array]:
        return [self.linear(x, w) for w in ws]

    def rms_norm(self, x: mx.array, weight: mx.array, eps: float) -> mx.array:
        return self._out(self._k.rms_norm(x, weight, eps))

    def add_rms_norm(self, x: mx.array, y: mx.array, weight: mx.array, eps: float) -> tuple[mx.array, mx.array]:
        total, normed = self._k.add_rms_norm(x, y, weight, eps)
        return self._out(total), self._out(normed)

    def swiglu(self, x: mx.array, gate: Any, up: Any, down: Any) -> mx.array:
        return self.linear(self._k.swiglu(self.linear(x, gate), self.linear(x, up)), down)

    def sigmoid_gate(self, x: mx.array, gate: mx.array) -> mx.array:
        return self._out(x * mx.sigmoid(gate))

    # ---- Gated DeltaNet -----------------------------------------------------------------------
    def causal_conv1d(self, x: mx.array, weight: mx.array, conv_state: mx.array) -> tuple[mx.array, mx.array]:
        t, width = x.shape[0], weight.shape[1]
        full = mx.concatenate([conv_state, x.astype(mx.float32)], axis=0)  # [K-1+T, C]
        out = full[0:t] * weight[:, 0]
        for j in range(1, width):
            out = out + full[j : j + t] * weight[:, j]
        return self._out(out * mx.sigmoid(out)), self._out(full[t:])

    def delta_rule_inputs(
        self,
        qkv: mx.array,
        a: mx.array,
        b: mx.array,
        A_log: mx.array,
        dt_bias: mx.array,
        heads: tuple[int, int, int, int],
    ) -> tuple[mx.array, mx.array, mx.array, mx.array, mx.array]:
        hk, dk, hv, dv = heads
        t, kd = qkv.shape[0], hk * dk
        q = _l2_normalize(qkv[:, :kd].reshape(t, hk, dk)) * (dk**-0.5)
        k = _l2_normalize(qkv[:, kd : 2 * kd].reshape(t, hk, dk))
        v = qkv[:, 2 * kd :].reshape(t, hv, dv)
        g = -mx.exp(A_log) * mx.logaddexp(mx.zeros_like(a), a + dt_bias)  # log decay <= 0
        return self._out(q), self._out(k), self._out(v), self._out(g), self._out(mx.sigmoid(b))

    def gated_delta_rule(
        self, q: mx.array, k: mx.array, v: mx.array, g: mx.array, beta: mx.array, state: mx.array
    ) -> tuple[mx.array, mx.array]:
        o, new_state = self._k.gated_delta(q, k, v, g, beta, state)
        return self._out(o), self._out(new_state)

    def delta_net(
        self,
        qkv: mx.array,
        a: mx.array,
        b: mx.array,
        z: mx.array,
        A_log: mx.array,
        dt_bias: mx.array,
        norm: mx.array,
        eps: float,
        heads: tuple[int, int, int, int],
        state: mx.array,
    ) -> tuple[mx.array, mx.array]:
        q, k, v, g, beta = self.delta_rule_inputs(qkv, a, b, A_log, dt_bias, heads)
        o, state = self.gated_delta_rule(q, k, v, g, beta, state)
        return self.gated_rms_norm(o, norm, z, eps), state

    def gated_rms_norm(self, x: mx.array, weight: mx.array, gate: mx.array, eps: float) -> mx.array:
        normed = self._k.rms_norm(x, weight, eps)
        return self._out(self._k.swiglu(gate.reshape(x.shape), normed).reshape(x.shape[0], -1))

    # ---- attention ----------------------------------------------------------------------------
    def attention_inputs(
        self,
        qg: mx.array,
        k: mx.array,
        q_norm: mx.array,
        k_norm: mx.array,
        start: int,
        rotary: Rotary,
        eps: float,
    ) -> tuple[mx.array, mx.array, mx.array]:
        t, d = qg.shape[0], q_norm.shape[0]
        qg = qg.reshape(t, -1, 2 * d)
        q = self._k.rms_norm(qg[..., :d], q_norm, eps)
        gate = qg[..., d:].reshape(t, -1)
        k = self._k.rms_norm(k.reshape(t, -1, d), k_norm, eps)
        cos, sin = (mx.array(a) for a in rotary.tables(start, t))
        return self._out(self._k.rope(q, cos, sin)), self._out(gate), self._out(self._k.rope(k, cos, sin))

    def attention(
        self, q: mx.array, k: mx.array, v: mx.array, cache: MlxKVCache, start: int, scale: float
    ) -> tuple[mx.array, MlxKVCache]:
        t, hq, d = q.shape
        cache.append(k, v.reshape(t, -1, d))
        keys, values = cache.k[:, :, : cache.length], cache.v[:, :, : cache.length]
        # q head h reads kv head h // (Hq // Hkv); "causal" aligns the T queries with the last T keys
        o = mx.fast.scaled_dot_product_attention(
            q.transpose(1, 0, 2)[None], keys, values, scale=scale, mask="causal" if t > 1 else None
        )  # [1, Hq, T, D]
        self._out(cache.k, cache.v)
        return self._out(o[0].transpose(1, 0, 2).reshape(t, hq * d)), cache

    # ---- mixture of experts -------------------------------------------------------------------
    def route(self, logits: mx.array, k: int) -> tuple[mx.array, mx.array]:
        probs = mx.softmax(logits.astype(mx.float32), axis=-1, precise=True)
        ids = mx.argpartition(-probs, kth=k - 1, axis=-1)[:, :k]
        w = mx.take_along_axis(probs, ids, axis=-1)
        return self._out(ids), self._out(w / w.sum(axis=-1, keepdims=True))

    def expert_ids(self, ids: mx.array) -> np.ndarray:
        return np.unique(np.array(ids)).astype(np.int64, copy=False)

    def greedy_pick(self, logits: mx.array) -> np.ndarray:
        return greedy_pick_host(np.array(logits))  # (unified memory: nothing crosses a link)

    def sample_pick(self, logits: mx.array, temperature: float, top_k: int, top_p: float, u: float) -> np.ndarray:
        return sample_pick_host(np.array(logits), temperature, top_k, top_p, u)

    def moe(
        self,
        x: mx.array,
        ids: mx.array,
        weights: mx.array,
        parts: Iterable[ExpertPart],
        shared: mx.array | SharedExpert,
    ) -> mx.array:
        """Each part: its experts' slots gathered into one stacked table, every (token, choice) routed
        to one of them through ``mx.gather_qmm`` with its row in that table as the rhs index, and
        evaluated before the next part is drawn (the part's host slots are only valid until then).
        The rows are then put back in (token, choice) order and combined in choice order."""
        flat = np.array(ids).astype(np.int64).reshape(-1)  # (token, choice) pairs, row-major
        t, k = ids.shape
        outputs: list[mx.array] = []
        order: list[np.ndarray] = []
        done = np.zeros(flat.size, dtype=bool)
        for part in parts:
            by_id = np.argsort(part.ids)
            pairs = np.flatnonzero(np.isin(flat, part.ids))
            if not pairs.size:
                continue
            rows = by_id[np.searchsorted(part.ids, flat[pairs], sorter=by_id)]  # each pair's expert in the part
            grouped = pairs.size >= SORTED_GATHER_MIN
            if grouped:  # rows of one expert next to each other: MLX's batched (sorted) kernels
                perm = np.argsort(rows, kind="stable")
                pairs, rows = pairs[perm], rows[perm]
            y = self._experts(x[mx.array(pairs // k)], _part_tables(part), mx.array(rows.astype(np.uint32)), grouped)
            mx.eval(y)
            outputs.append(y)
            order.append(pairs)
            done[pairs] = True
        if not done.all():
            missing = int(flat[np.flatnonzero(~done)[0]])
            raise FmoeError(f"expert store: expert {missing} was routed to but never made resident")
        where = np.empty(flat.size, dtype=np.int64)  # each (token, choice)'s row among the outputs
        where[np.concatenate(order)] = np.arange(flat.size)
        y_all = outputs[0] if len(outputs) == 1 else mx.concatenate(outputs)
        y_pairs = y_all[mx.array(where)].reshape(t, k, -1)
        return self._out(self._k.moe_combine(y_pairs, weights, shared_output(self, x, shared)))

    # ---- helpers ------------------------------------------------------------------------------
    def _experts(
        self, x: mx.array, table: tuple[MlxQuant, MlxQuant, MlxQuant], rows: mx.array, grouped: bool
    ) -> mx.array:
        """SwiGLU of each row of ``x [P, hidden]`` through the expert ``rows[p]`` of ``table``."""
        gate, up, down = table

        def qmm(h: mx.array, w: MlxQuant) -> mx.array:
            return mx.gather_qmm(
                h,
                w.weight,
                scales=w.scales,
                biases=w.biases,
                rhs_indices=rows,
                transpose=True,
                group_size=w.group_size,
                bits=w.bits,
                sorted_indices=grouped,
            )

        h = x[:, None, :]  # [P, 1, hidden]: one matrix row per (token, choice)
        return qmm(self._k.swiglu(qmm(h, gate), qmm(h, up)), down)[:, 0]

    def _out(self, *arrays: mx.array) -> mx.array:
        """Report the arrays to the live timer (its next mark evaluates them); the first back."""
        timer = self._timer() if self._timer is not None else None
        if timer is not None:
            timer.pending.extend(arrays)
        return arrays[0]


def _part_tables(part: ExpertPart) -> tuple[MlxQuant, MlxQuant, MlxQuant]:
    """The part's experts (slot rows of its host table) stacked in part order, as MLX arrays."""
    slots = part.slots
    gate, up, down = (
        quant(q.weight[slots], q.scales[slots], q.biases[slots], q.bits, q.group_size)
        for q in (part.table.gate, part.table.up, part.table.down)
    )
    return gate, up, down


def _l2_normalize(x: mx.array) -> mx.array:
    return x * mx.rsqrt(mx.sum(mx.square(x), axis=-1, keepdims=True) + L2NORM_EPS)


if TYPE_CHECKING:  # the type checker proves the class implements the whole contract
    _conforms: Backend = MlxBackend()
