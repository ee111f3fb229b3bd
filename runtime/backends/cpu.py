"""CPU backend: numpy for the float work, a kernel module for the quantised matmuls, the fused SwiGLU
expert and the delta rule.

``kernels="auto"`` uses the numba kernels (runtime/kernels/cpu.py) when they import, else the numpy
reference kernels (runtime/kernels/reference.py, also chosen by "reference" or its alias "numpy").
State updates happen in place underneath (the recurrent state, the KV cache's buffers); the ops
still return the state, as the contract asks.
"""

from __future__ import annotations

import importlib
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, bf16_to_f32
from fmoe.runtime.backends.base import Backend, Rotary, SharedExpert, greedy_pick_host, sample_pick_host, shared_output
from fmoe.runtime.experts.slots import ExpertPart
from fmoe.runtime.state import LinearState
from fmoe.runtime.timing import PhaseProfile, PhaseTimer, WallTimer
from fmoe.runtime.weights import ModelWeights

L2NORM_EPS = 1e-6  # the q/k l2norm epsilon of the reference DeltaNet (not the config's rms eps)
# Bound on the [heads, queries, keys] score block of one attention step (bytes), so a long
# prefill never materialises T x T scores for all heads at once.
_ATTN_BLOCK_BYTES = 64 << 20
_ATTN_PARALLEL_SCORES = 1 << 15  # (queries x keys) from which attention's blocks run on the thread pool


def sigmoid(x: np.ndarray) -> np.ndarray:
    # via tanh: no overflow warnings for large |x|
    return np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x)


def silu(x: np.ndarray) -> np.ndarray:
    return x * sigmoid(x)


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


class KVCache:
    """Keys and values of one attention layer, head-major ``[Hkv, capacity, D]`` so each head's first
    ``length`` rows are one contiguous block for the matmuls; grown by doubling (amortised O(1))."""

    def __init__(self, kv_heads: int, head_dim: int) -> None:
        self.length = 0
        self._k = np.zeros((kv_heads, 0, head_dim), dtype=np.float32)
        self._v = np.zeros_like(self._k)

    @property
    def keys(self) -> np.ndarray:
        return self._k[:, : self.length]

    @property
    def values(self) -> np.ndarray:
        return self._v[:, : self.length]

    @property
    def nbytes(self) -> int:
        return int(self._k.nbytes + self._v.nbytes)

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Add ``T`` positions: ``k``, ``v`` float32 ``[T, Hkv, D]``."""
        need = self.length + k.shape[0]
        if need > self._k.shape[1]:
            cap = max(need, 2 * self._k.shape[1], 16)
            for name in ("_k", "_v"):
                old = getattr(self, name)
                new = np.zeros((old.shape[0], cap, old.shape[2]), dtype=np.float32)
                new[:, : self.length] = old[:, : self.length]
                setattr(self, name, new)
        self._k[:, self.length : need] = k.transpose(1, 0, 2)
        self._v[:, self.length : need] = v.transpose(1, 0, 2)
        self.length = need


class CpuBackend:
    """The Backend contract on the CPU (runtime/backends/base.py has the op contracts)."""

    name = "cpu"
    device = "cpu"
    # the model computes the shared expert's output itself, before the first routed expert is drawn
    # from the store, and hands it to moe (which starts its sum from it): the profile books it as
    # dense work (it was booked as the experts' I/O, the time before the first part is drawn)
    shared_expert_apart = True

    def __init__(self, kernels: str = "auto", threads: int | None = None, int8: bool = False) -> None:
        self._kernels = _load_kernels(kernels)
        self.kernels = "numba" if self._kernels.__name__.endswith(".cpu") else "reference"
        # int8 activations on integer dot products for one-token 4-bit matvecs (runtime/kernels/int8dot.py)
        if int8 and self.kernels != "numba":
            raise FmoeError("--int8-dot: needs the numba kernels")
        self.int8 = int8
        self._int8 = {"int8": True} if int8 else {}
        self.threads = 1
        self._pool: ThreadPoolExecutor | None = None  # attention's blocks in prefill (numpy, no GIL)
        if self.kernels == "numba":
            from fmoe.runtime.kernels.threads import kernel_threads, single_threaded_blas

            self.threads = kernel_threads(threads)
            single_threaded_blas()

    # ---- arrays, weights, state, time ---------------------------------------------------------
    def asarray(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x)
        return x.astype(np.float32) if x.dtype.kind == "f" and x.dtype != np.float32 else x

    def to_numpy(self, x: Any) -> np.ndarray:
        return np.asarray(x)

    def weight(self, tensor: Any) -> Any:
        return tensor  # host tensors are this backend's form already

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        return weights

    def new_linear_state(self, conv_shape: tuple[int, int], recurrent_shape: tuple[int, int, int]) -> LinearState:
        return LinearState(np.zeros(conv_shape, np.float32), np.zeros(recurrent_shape, np.float32))

    def new_kv_cache(self, kv_heads: int, head_dim: int) -> KVCache:
        return KVCache(kv_heads, head_dim)

    def timer(self, profile: PhaseProfile) -> PhaseTimer:
        return WallTimer(profile)

    def use_threads(self) -> None:
        """numba's thread count is per calling thread: set it in whichever thread runs the model."""
        if self.kernels == "numba":
            import numba

            if numba.get_num_threads() != self.threads:
                numba.set_num_threads(self.threads)

    def warmup(self) -> None:
        self._kernels.warmup()

    # ---- dense ops ----------------------------------------------------------------------------
    def embed(self, table: Any, ids: np.ndarray) -> np.ndarray:
        self.use_threads()  # the first op of every forward pass, in the thread that runs it
        if isinstance(table, QuantTensor):
            rows = QuantTensor(table.weight[ids], table.scales[ids], table.biases[ids], table.bits, table.group_size)
            return rows.dequantize()
        rows = table[ids]
        return bf16_to_f32(rows) if rows.dtype == np.uint16 else rows.astype(np.float32, copy=False)

    def linear(self, x: np.ndarray, w: Any) -> np.ndarray:
        x = np.ascontiguousarray(x, dtype=np.float32)
        if isinstance(w, QuantTensor):
            return self._kernels.qmatmul(x, w, **self._int8)
        return x @ w.T

    def linears(self, x: np.ndarray, ws: Sequence[Any]) -> list[np.ndarray]:
        quant = [i for i, w in enumerate(ws) if isinstance(w, QuantTensor)]
        one_format = len({(ws[i].bits, ws[i].group_size) for i in quant}) == 1
        if self.kernels != "numba" or x.ndim != 2 or x.shape[0] != 1 or len(quant) < 2 or not one_format:
            return [self.linear(x, w) for w in ws]
        # one token (decode): its quantised matrices through kernels/cpu.py's qmatvecs (one region on int8 inputs)
        outs = dict(zip(quant, self._kernels.qmatvecs(x[0], [ws[i] for i in quant], **self._int8), strict=True))
        return [outs[i][None] if i in outs else self.linear(x, w) for i, w in enumerate(ws)]

    def rms_norm(self, x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
        ms = np.mean(np.square(x), axis=-1, keepdims=True)
        return (x / np.sqrt(ms + np.float32(eps))) * weight

    def add_rms_norm(
        self, x: np.ndarray, y: np.ndarray, weight: np.ndarray, eps: float
    ) -> tuple[np.ndarray, np.ndarray]:
        s = x + y
        return s, self.rms_norm(s, weight, eps)

    def swiglu(self, x: np.ndarray, gate: Any, up: Any, down: Any) -> np.ndarray:
        if (
            isinstance(gate, QuantTensor)
            and isinstance(up, QuantTensor)
            and isinstance(down, QuantTensor)
            and (gate.bits, gate.group_size) == (up.bits, up.group_size)
        ):
            # numba: one pass over gate and up for a single token, no temporaries between the matmuls
            return self._kernels.swiglu_expert(np.ascontiguousarray(x, dtype=np.float32), gate, up, down, **self._int8)
        h = silu(self.linear(x, gate)) * self.linear(x, up)
        return self.linear(h, down)

    def sigmoid_gate(self, x: np.ndarray, gate: np.ndarray) -> np.ndarray:
        return x * sigmoid(gate)

    # ---- Gated DeltaNet -----------------------------------------------------------------------
    def causal_conv1d(self, x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self._kernels, "causal_conv1d_silu"):  # numba: one pass, no temporaries
            return self._kernels.causal_conv1d_silu(x, weight, conv_state)
        t, width = x.shape[0], weight.shape[1]
        full = np.concatenate([conv_state, x.astype(np.float32, copy=False)], axis=0)  # [K-1+T, C]
        out = full[0:t] * weight[:, 0]
        for j in range(1, width):
            out += full[j : j + t] * weight[:, j]
        return silu(out), full[t:].copy()

    def delta_rule_inputs(
        self,
        qkv: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        A_log: np.ndarray,
        dt_bias: np.ndarray,
        heads: tuple[int, int, int, int],
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        hk, dk, hv, dv = heads
        t, kd = qkv.shape[0], hk * dk
        q = _l2_normalize(qkv[:, :kd].reshape(t, hk, dk)) * np.float32(dk**-0.5)
        k = _l2_normalize(qkv[:, kd : 2 * kd].reshape(t, hk, dk))
        v = np.ascontiguousarray(qkv[:, 2 * kd :].reshape(t, hv, dv))
        neg_a = -np.exp(A_log.astype(np.float32, copy=False))
        with np.errstate(invalid="ignore"):  # NaN weights propagate to the logits, where the runner stops them
            g = (neg_a * np.logaddexp(np.float32(0), a + dt_bias)).astype(np.float32, copy=False)  # log decay <= 0
        beta = sigmoid(b).astype(np.float32, copy=False)
        return np.ascontiguousarray(q), np.ascontiguousarray(k), v, np.ascontiguousarray(g), beta

    def gated_delta_rule(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, state: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        return self._kernels.gated_delta_rule(q, k, v, g, beta, state), state  # state updated in place

    def delta_net(
        self,
        qkv: np.ndarray,
        a: np.ndarray,
        b: np.ndarray,
        z: np.ndarray,
        A_log: np.ndarray,
        dt_bias: np.ndarray,
        norm: np.ndarray,
        eps: float,
        heads: tuple[int, int, int, int],
        state: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray]:
        if hasattr(self._kernels, "delta_net"):  # numba: one parallel pass, no numpy glue
            return self._kernels.delta_net(qkv, a, b, z, A_log, dt_bias, norm, eps, heads, state), state
        q, k, v, g, beta = self.delta_rule_inputs(qkv, a, b, A_log, dt_bias, heads)
        o, state = self.gated_delta_rule(q, k, v, g, beta, state)
        return self.gated_rms_norm(o, norm, z, eps), state

    def gated_rms_norm(self, x: np.ndarray, weight: np.ndarray, gate: np.ndarray, eps: float) -> np.ndarray:
        t = x.shape[0]
        return (self.rms_norm(x, weight, eps) * silu(gate.reshape(x.shape))).reshape(t, -1)

    # ---- attention ----------------------------------------------------------------------------
    def attention_inputs(
        self,
        qg: np.ndarray,
        k: np.ndarray,
        q_norm: np.ndarray,
        k_norm: np.ndarray,
        start: int,
        rotary: Rotary,
        eps: float,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        t, d = qg.shape[0], q_norm.shape[0]
        qg = qg.reshape(t, -1, 2 * d)
        q = self.rms_norm(qg[..., :d], q_norm, eps)
        gate = qg[..., d:].reshape(t, -1)
        k = self.rms_norm(k.reshape(t, -1, d), k_norm, eps)
        cos, sin = (a[:, None, :] for a in rotary.tables(start, t))
        return _rotate(q, cos, sin), gate, _rotate(k, cos, sin)

    def attention(
        self, q: np.ndarray, k: np.ndarray, v: np.ndarray, cache: KVCache, start: int, scale: float
    ) -> tuple[np.ndarray, KVCache]:
        t, hq, d = q.shape
        cache.append(k, v.reshape(t, -1, d))
        keys, values = cache.keys, cache.values
        hkv, length, _ = keys.shape
        groups = hq // hkv
        # [Hkv, G, T, D]: the G query heads sharing a kv head are stacked so each block is one matmul
        qh = q.reshape(t, hkv, groups, d).transpose(1, 2, 0, 3)
        out = np.empty((hkv, groups, t, d), dtype=np.float32)
        parallel = self.threads > 1 and t * length >= _ATTN_PARALLEL_SCORES
        budget = _ATTN_BLOCK_BYTES // (self.threads if parallel else 1)  # blocks in flight share the bound
        step = max(1, budget // max(1, 4 * groups * length))
        if parallel:  # two blocks a thread at least (the causal mask makes early blocks cheaper)
            blocks_per_head = -(-2 * self.threads // hkv)  # ceil
            step = min(step, -(-t // blocks_per_head))

        def block(head: int, lo: int) -> None:
            hi = min(t, lo + step)
            n, seen = hi - lo, start + hi  # keys past the block's last query are masked for all of it
            s = (qh[head, :, lo:hi].reshape(groups * n, d) @ keys[head, :seen].T) * np.float32(scale)
            s = s.reshape(groups, n, seen)
            visible = np.arange(seen)[None, :] <= (start + np.arange(lo, hi))[:, None]  # [n, seen]
            s = np.where(visible, s, -np.inf)
            s -= s.max(axis=-1, keepdims=True)
            p = np.exp(s)
            p /= p.sum(axis=-1, keepdims=True)
            out[head, :, lo:hi] = (p.reshape(groups * n, seen) @ values[head, :seen]).reshape(groups, n, d)

        tasks = [(head, lo) for head in range(hkv) for lo in range(0, t, step)]
        if parallel:
            # numpy releases the GIL in these ops: blocks run side by side on single-threaded BLAS
            list(self._attention_pool().map(lambda task: block(*task), tasks))
        else:
            for task in tasks:
                block(*task)
        return out.transpose(2, 0, 1, 3).reshape(t, hq * d), cache

    def _attention_pool(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self.threads, thread_name_prefix="fmoe-attention")
        return self._pool

    # ---- mixture of experts -------------------------------------------------------------------
    def route(self, logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        z = logits.astype(np.float32, copy=False)
        e = np.exp(z - z.max(axis=-1, keepdims=True))
        probs = e / e.sum(axis=-1, keepdims=True)
        if k < probs.shape[-1]:
            top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
        else:
            top = np.broadcast_to(np.arange(probs.shape[-1]), probs.shape).copy()
        w = np.take_along_axis(probs, top, axis=-1)
        return top.astype(np.int64, copy=False), (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)

    def expert_ids(self, ids: np.ndarray) -> np.ndarray:
        return np.unique(ids).astype(np.int64, copy=False)

    def greedy_pick(self, logits: np.ndarray) -> np.ndarray:
        return greedy_pick_host(logits)

    def sample_pick(self, logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> np.ndarray:
        return sample_pick_host(logits, temperature, top_k, top_p, u)

    def moe(
        self,
        x: np.ndarray,
        ids: np.ndarray,
        weights: np.ndarray,
        parts: Iterable[ExpertPart],
        shared: np.ndarray | SharedExpert,
    ) -> np.ndarray:
        shared = shared_output(self, x, shared)  # the model's already (shared_expert_apart), else computed here
        y, done = self._pair_outputs(x, ids, parts)
        if not done.all():
            t_missing, j_missing = np.argwhere(~done)[0]
            raise FmoeError(f"expert store: expert {ids[t_missing, j_missing]} was routed to but never made resident")
        out = shared.astype(np.float32, copy=True)
        for j in range(ids.shape[1]):
            out += weights[:, j, None] * y[:, j]
        return out

    def moe_partial(
        self, x: np.ndarray, ids: np.ndarray, weights: np.ndarray, parts: Iterable[ExpertPart]
    ) -> np.ndarray:
        """``sum_j weights[t, j] * expert_{ids[t, j]}(x[t])`` over the pairs whose expert is in
        ``parts`` only (float32 ``[T, hidden]``), in choice order: the host's share of a step whose
        other experts are computed elsewhere (a device, runtime/experts/device.py)."""
        y, done = self._pair_outputs(x, ids, parts)
        out = np.zeros((ids.shape[0], x.shape[1]), dtype=np.float32)
        for j in range(ids.shape[1]):
            rows = done[:, j]
            out[rows] += weights[rows, j, None] * y[rows, j]
        return out

    def _pair_outputs(
        self, x: np.ndarray, ids: np.ndarray, parts: Iterable[ExpertPart]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Each (token, choice) pair's expert output ``[T, K, hidden]`` for the experts in ``parts``,
        and which pairs those were (``[T, K]`` bool; the other rows are left unset)."""
        t, k = ids.shape
        # one output row per (token, choice): the caller sums them in choice order, so the result
        # does not depend on which part an expert came in
        y = np.empty((t, k, x.shape[1]), dtype=np.float32)
        pair_rows = y.reshape(t * k, x.shape[1])
        numba = self.kernels == "numba"
        xc = np.ascontiguousarray(x, dtype=np.float32) if numba else x
        done = np.zeros((t, k), dtype=bool)
        for part in parts:
            table = part.table
            if not len(part.ids):
                continue
            if table.slab is not None and table.layout is not None:
                # every (token, choice) pair of the part straight from the slab, in one call (the kernels
                # group a prefill's pairs by expert: each expert's weights read once for its tokens)
                order = np.argsort(part.ids)
                pos = np.minimum(np.searchsorted(part.ids, ids, sorter=order), len(order) - 1)
                hit = part.ids[order[pos]] == ids  # [t, k]: the pair's expert is in this part
                rows, choices = np.nonzero(hit)
                if rows.size:
                    slots = part.slots[order[pos[rows, choices]]].astype(np.int64, copy=False)
                    if numba:  # the kernels read token rows and write pair rows in place: no copies
                        self._kernels.experts_swiglu(
                            table.slab, table.layout, slots, xc, tokens=rows, out=pair_rows,
                            dest=rows * k + choices, **self._int8,
                        )  # fmt: skip
                    else:
                        y[rows, choices] = self._kernels.experts_swiglu(table.slab, table.layout, slots, x[rows])
                done |= hit
                continue
            for e, slot in zip(part.ids.tolist(), part.slots.tolist(), strict=True):
                rows, choices = np.nonzero(ids == e)
                if rows.size:  # no slab: a batched matmul per expert
                    expert = table.expert(slot)
                    y[rows, choices] = self.swiglu(x[rows], expert.gate, expert.up, expert.down)
                done[rows, choices] = True
        return y, done


def _l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True) + np.float32(L2NORM_EPS))


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """NeoX rotate-half on the first ``2 * half`` dims of ``x [T, H, D]``; the rest pass through."""
    half = cos.shape[-1]
    x1, x2 = x[..., :half], x[..., half : 2 * half]
    out = x.copy()
    out[..., :half] = x1 * cos - x2 * sin
    out[..., half : 2 * half] = x2 * cos + x1 * sin
    return out


if TYPE_CHECKING:  # the type checker proves the class implements the whole contract
    _conforms: Backend = CpuBackend()
