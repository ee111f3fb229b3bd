"""The backend contract: every computation of the model (runtime/model.py) is one of these ops.

A backend owns its arrays (numpy, torch on CPU or CUDA, later MLX): it prepares the dense weights
once (``prepare``), creates the per-sequence state (``new_linear_state``, ``new_kv_cache``) and
provides every op, including the small glue between the big ones (routing, the DeltaNet's
pre-processing, gates), so the model never touches an array library and a new device is one new
class, not a second model. The model only passes a backend's arrays from op to op; of an array it
uses ``.shape`` and slicing the first (token) axis, which numpy, torch and MLX share.

Conventions:
- ``T`` is the number of tokens in the call, all of one sequence: stateful ops (conv, delta rule,
  attention) take one sequence's state. Token-parallel ops (linear, norms, routing, MoE) would take
  the tokens of several sequences concatenated along ``T`` when batching arrives; state stays per
  sequence (docs/ARCHITECTURE.md says why).
- Activations are float32. Weights are whatever ``prepare`` made of the host tensors (float32
  arrays, bf16 bit patterns as uint16 for the embedding, QuantTensor for affine-quantised ones).
- Ops that carry state return the new state (a backend may update in place underneath and return
  the same object); the caller stores what is returned.
- Token ids come in as host integer arrays; ``route`` returns device arrays; ``expert_ids`` is the
  one host read-back the model needs per layer (which experts to make resident).
"""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np

from fmoe.runtime.experts.slots import ExpertPart
from fmoe.runtime.state import LinearState
from fmoe.runtime.text.sampling import draw
from fmoe.runtime.timing import PhaseProfile, PhaseTimer
from fmoe.runtime.weights import ModelWeights

Array = Any  # a backend's array type (numpy.ndarray, torch.Tensor, ...)


@dataclass(frozen=True)
class Rotary:
    """Partial NeoX (rotate-half) RoPE: the first ``dim`` dims of each head rotate, pair
    ``(i, i + dim/2)`` by ``position * theta^(-2i/dim)``; the rest pass through."""

    dim: int
    theta: float

    @functools.cached_property
    def inv_freq(self) -> np.ndarray:
        """float64 ``theta^(-2i/dim)`` for ``i < dim/2`` (computed once per Rotary)."""
        return 1.0 / (self.theta ** (np.arange(self.dim // 2) * 2.0 / self.dim))

    def tables(self, start: int, t: int) -> tuple[np.ndarray, np.ndarray]:
        """Host float32 ``(cos, sin)`` ``[t, dim/2]`` for positions ``start .. start+t-1``, computed in
        float64 as the reference does; each backend moves them to its arrays."""
        freqs = np.arange(start, start + t, dtype=np.float64)[:, None] * self.inv_freq[None, :]
        return np.cos(freqs).astype(np.float32), np.sin(freqs).astype(np.float32)


@dataclass(frozen=True)
class SharedExpert:
    """The MoE block's shared expert on a call's tokens, handed to :meth:`Backend.moe` to compute:
    ``sigmoid(gate_logit) * down(silu(gate x) * up x)``, so that a backend may compute it inside
    the routed experts' own kernels (the torch backend's Triton decode path does)."""

    gate: Any  # [shared_inter, hidden], as the backend prepared it
    up: Any  # [shared_inter, hidden]
    down: Any  # [hidden, shared_inter]
    gate_logit: Array  # [T, 1]


def shared_output(be: Backend, x: Array, shared: Array | SharedExpert) -> Array:
    """The shared expert's gated output ``[T, hidden]`` from the backend's ops (``shared`` itself
    when it is one already): what a backend's ``moe`` starts its sum from when it does not fuse it."""
    if isinstance(shared, SharedExpert):
        return be.sigmoid_gate(be.swiglu(x, shared.gate, shared.up, shared.down), shared.gate_logit)
    return shared


def greedy_pick_host(logits: np.ndarray) -> np.ndarray:
    """:meth:`Backend.greedy_pick` of host logits."""
    return np.array([np.argmax(logits[-1]), np.isfinite(logits).all()], dtype=np.int64)


def sample_pick_host(logits: np.ndarray, temperature: float, top_k: int, top_p: float, u: float) -> np.ndarray:
    """:meth:`Backend.sample_pick` of host logits: the sampler's own draw (runtime/text/sampling.py)."""
    if not np.isfinite(logits).all():
        return np.zeros(2, dtype=np.int64)
    return np.array([draw(logits[-1], temperature, top_k, top_p, u), 1], dtype=np.int64)


@runtime_checkable
class Backend(Protocol):
    name: str  # "cpu", "torch"
    device: str  # "cpu", "cuda", ...

    # ---- arrays, weights, state, time ---------------------------------------------------------
    def asarray(self, x: np.ndarray) -> Array:
        """A host array as this backend's array (float32 stays float32, integers stay integers)."""
        ...

    def to_numpy(self, x: Array) -> np.ndarray:
        """Back to the host (waits for the device)."""
        ...

    def weight(self, tensor: Any) -> Any:
        """One host tensor of the weights tree (float32 array, bf16 bits as uint16, QuantTensor) in
        this backend's form (uploaded, repacked)."""
        ...

    def prepare(self, weights: ModelWeights) -> ModelWeights:
        """The dense weights in this backend's form, once at load (``weights.map(self.weight)``)."""
        ...

    def new_linear_state(self, conv_shape: tuple[int, int], recurrent_shape: tuple[int, int, int]) -> LinearState:
        """Zeros: conv ``[kernel - 1, conv_dim]``, recurrent ``[Hv, Dk, Dv]``."""
        ...

    def new_kv_cache(self, kv_heads: int, head_dim: int) -> Any:
        """An empty KV cache for one attention layer (its layout is the backend's; it has ``nbytes``)."""
        ...

    def timer(self, profile: PhaseProfile) -> PhaseTimer:
        """A timer booking into ``profile``, its marks ordered with this backend's work (CUDA events
        on a GPU)."""
        ...

    def warmup(self) -> None:
        """Compile or load whatever the first token would otherwise wait for."""
        ...

    # ---- dense ops ----------------------------------------------------------------------------
    def embed(self, table: Any, ids: np.ndarray) -> Array:
        """Rows ``ids`` (host int64 ``[T]``) of the embedding table as float32 ``[T, hidden]``."""
        ...

    def linear(self, x: Array, w: Any) -> Array:
        """``x [T, in]`` times ``w [out, in]`` transposed: ``[T, out]``."""
        ...

    def linears(self, x: Array, ws: Sequence[Any]) -> list[Array]:
        """:meth:`linear` of one input by each of ``ws`` (a layer's projections of one normed input):
        a backend may prepare the input once and compute them in one launch."""
        ...

    def rms_norm(self, x: Array, weight: Array, eps: float) -> Array:
        """RMSNorm over the last axis times ``weight`` (the effective scale; any leading shape)."""
        ...

    def add_rms_norm(self, x: Array, y: Array, weight: Array, eps: float) -> tuple[Array, Array]:
        """The residual step: ``s = x + y`` and ``rms_norm(s, weight)``; returns ``(s, normed)``."""
        ...

    def swiglu(self, x: Array, gate: Any, up: Any, down: Any) -> Array:
        """``down(silu(gate x) * up x)``: ``[T, hidden] -> [T, hidden]`` (the shared expert)."""
        ...

    def sigmoid_gate(self, x: Array, gate: Array) -> Array:
        """``x * sigmoid(gate)``; ``gate`` has ``x``'s shape or ``[T, 1]`` (broadcast)."""
        ...

    # ---- Gated DeltaNet -----------------------------------------------------------------------
    def causal_conv1d(self, x: Array, weight: Array, conv_state: Array) -> tuple[Array, Array]:
        """Depthwise causal conv over time, then SiLU. ``x [T, C]``, ``weight [C, K]``, ``conv_state``
        ``[K-1, C]`` (the previous inputs). Returns ``(y [T, C], the last K-1 inputs)``."""
        ...

    def delta_rule_inputs(
        self, qkv: Array, a: Array, b: Array, A_log: Array, dt_bias: Array, heads: tuple[int, int, int, int]
    ) -> tuple[Array, Array, Array, Array, Array]:
        """Split the conv output ``qkv [T, 2*Hk*Dk + Hv*Dv]`` (``heads = (Hk, Dk, Hv, Dv)``) into
        ``q, k [T, Hk, Dk]`` (l2-normalised with eps 1e-6; q also times ``Dk**-0.5``) and
        ``v [T, Hv, Dv]``, and compute the log decay ``g = -exp(A_log) * softplus(a + dt_bias)``
        and ``beta = sigmoid(b)``, both ``[T, Hv]``."""
        ...

    def gated_delta_rule(
        self, q: Array, k: Array, v: Array, g: Array, beta: Array, state: Array
    ) -> tuple[Array, Array]:
        """The recurrence over T tokens, value head ``j`` reading key head ``j // (Hv // Hk)``; per
        step ``S *= exp(g); kv = S^T k; S += outer(k, (v - kv) * beta); o = S^T q``.
        ``state [Hv, Dk, Dv]``. Returns ``(o [T, Hv, Dv], new state)``."""
        ...

    def delta_net(
        self,
        qkv: Array,
        a: Array,
        b: Array,
        z: Array,
        A_log: Array,
        dt_bias: Array,
        norm: Array,
        eps: float,
        heads: tuple[int, int, int, int],
        state: Array,
    ) -> tuple[Array, Array]:
        """The DeltaNet from its conv output to its output projection's input: :meth:`delta_rule_inputs`,
        :meth:`gated_delta_rule`, then :meth:`gated_rms_norm` of ``o`` by ``norm`` gated by ``z``; one
        op, what the model calls, so that a backend may fuse them (the Triton path: one launch with
        ``--int8-dot``, else two). Returns ``([T, Hv*Dv], new state)``."""
        ...

    def gated_rms_norm(self, x: Array, weight: Array, gate: Array, eps: float) -> Array:
        """``rms_norm(x, weight) * silu(gate)`` per head: ``x [T, H, D]``, ``gate [T, H*D]``;
        returns ``[T, H*D]``."""
        ...

    # ---- attention ----------------------------------------------------------------------------
    def attention_inputs(
        self, qg: Array, k: Array, q_norm: Array, k_norm: Array, start: int, rotary: Rotary, eps: float
    ) -> tuple[Array, Array, Array]:
        """From ``q_proj``'s output ``qg [T, Hq*2D]`` (per head ``[query | gate]``) and ``k_proj``'s
        ``[T, Hkv*D]``: the normed, rotated queries ``[T, Hq, D]``, the gate ``[T, Hq*D]`` and the
        normed, rotated keys ``[T, Hkv, D]``, at positions ``start .. start+T-1``."""
        ...

    def attention(self, q: Array, k: Array, v: Array, cache: Any, start: int, scale: float) -> tuple[Array, Any]:
        """Append ``k [T, Hkv, D]`` and ``v [T, Hkv*D]`` at positions ``start ..`` to ``cache``, then
        causal GQA of ``q [T, Hq, D]`` over everything cached (q head ``h`` uses kv head
        ``h // (Hq // Hkv)``). Returns ``(o [T, Hq*D], cache)``."""
        ...

    # ---- mixture of experts -------------------------------------------------------------------
    def route(self, logits: Array, k: int) -> tuple[Array, Array]:
        """Softmax over experts in float32, top-``k``, weights renormalised to sum 1:
        ``(ids [T, k] int, weights [T, k] float32)``."""
        ...

    def expert_ids(self, ids: Array) -> np.ndarray:
        """The distinct experts in ``ids``, sorted, as a host int64 array."""
        ...

    # ---- the next token -----------------------------------------------------------------------
    def greedy_pick(self, logits: Array) -> Array:
        """Int64 ``[2]``, computed where ``logits [T, vocab]`` are: the id of the last row's largest
        logit (the first on ties, as ``np.argmax``), and 1 if every logit is finite, else 0. A
        greedy step reads these 16 bytes instead of the logits (runtime/engine/runner.py)."""
        ...

    def sample_pick(self, logits: Array, temperature: float, top_k: int, top_p: float, u: float) -> Array:
        """As :meth:`greedy_pick`, with the id the uniform number ``u`` draws from the last row's
        distribution filtered as runtime/text/sampling.py's ``draw`` does (softmax at
        ``temperature`` > 0, top-k with ties kept, the nucleus most likely first and ties in id order,
        the cumulative sums in id order): the host sampler's token, but for float rounding in sums
        whose order differs, computed where the logits are."""
        ...

    def moe(
        self, x: Array, ids: Array, weights: Array, parts: Iterable[ExpertPart], shared: Array | SharedExpert
    ) -> Array:
        """The routed experts plus the shared expert: ``s[t] + sum_j weights[t, j] *
        expert_{ids[t, j]}(x[t])``, each expert a SwiGLU, ``s`` the shared expert's output:
        ``shared`` itself, or that of a :class:`SharedExpert` (the model passes one, so a backend
        may fuse it with the routed experts; :func:`shared_output` computes it from the other ops).
        The experts arrive in ``parts`` (slot tables of the expert store), each needed expert in
        exactly one part, each part valid until the next is drawn: compute a part as soon as it
        arrives. The sum runs over ``j`` in order whatever the parts were, so the result does not
        depend on what was cached."""
        ...
