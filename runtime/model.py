"""One definition of the Qwen3.5-MoE text model, for every size (all from TextConfig) and every backend.

Layer ``L`` is ``x += mixer(rms(x)); x += moe(rms(x))`` where the mixer is a Gated DeltaNet
(linear attention with a causal conv and a recurrent state) or gated full attention (partial
NeoX RoPE, GQA, KV cache), and the MoE is softmax routing over the experts, top-K renormalised,
SwiGLU experts made resident by an expert provider (the store), plus a sigmoid-gated shared expert.

Every computation is a Backend op (runtime/backends/base.py); this file holds no array code, only
the order of the ops, which weights they take and which state they carry. Weights are the typed
tree of runtime/weights.py, already in the backend's form; conventions are docs/FORMAT.md's
(zero-centred norms stored as ``1 + w``, the DeltaNet norm plain, ``conv1d`` as ``[channels, kernel]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any, Protocol

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.runtime.backends.base import Backend, Rotary, SharedExpert, shared_output
from fmoe.runtime.experts.slots import ExpertPart
from fmoe.runtime.state import LinearState, SequenceState
from fmoe.runtime.timing import HEAD, NULL_TIMER, PhaseTimer
from fmoe.runtime.weights import AttentionWeights, DeltaNetWeights, ModelWeights


class ExpertProvider(Protocol):
    """Where routed experts come from (runtime/experts/store.py's ExpertStore, runtime/experts/
    device.py's DeviceExpertStore, or a test double). A provider may also have
    ``all_resident(layer) -> ExpertPart | None``: a part covering every expert of the layer when
    all are resident on the backend's device, so the MoE step needs no host read-back."""

    def resident(self, layer: int, experts: np.ndarray) -> Iterable[ExpertPart]:
        """``experts`` (sorted distinct host ids) of ``layer``, in parts, each expert in exactly one."""
        ...


def whole_number(name: str, value: object, lo: int, hi: int, note: str = "") -> int:
    """``value`` if it is an integer (not a bool, not 2.5) in ``lo..hi``; else a one-line error naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not lo <= value <= hi:
        raise FmoeError(f"{name} {value!r}: must be a whole number between {lo} and {hi}{note}")
    return int(value)


def check_k(cfg: TextConfig, k: int | None) -> int:
    """Experts per token: the model's own when ``k`` is None, else ``k`` if the model has that many."""
    if k is None:
        return cfg.num_experts_per_tok
    note = f" (the model's experts per layer; its default is {cfg.num_experts_per_tok})"
    return whole_number("--k", k, 1, cfg.num_experts, note)


class Qwen35MoeNetwork:
    """The text model over prepared dense weights and an expert provider, computed by ``backend``.

    ``k`` (experts per token) must already be valid (``check_k``). Holds no per-sequence data: the
    state of a sequence is the caller's (``new_state``)."""

    def __init__(
        self, config: TextConfig, weights: ModelWeights, experts: ExpertProvider, backend: Backend, k: int
    ) -> None:
        self.config = config
        self.weights = weights
        self.experts = experts
        self.backend = backend
        self.top_k = k  # experts per token
        cfg = config
        self._eps = float(cfg.rms_norm_eps)
        self._rotary = Rotary(cfg.rotary_dim, float(cfg.rope_theta))
        self._delta_heads = (
            cfg.linear_num_key_heads,
            cfg.linear_key_head_dim,
            cfg.linear_num_value_heads,
            cfg.linear_value_head_dim,
        )

    def new_state(self) -> SequenceState:
        """Empty state for one sequence: a KV cache per attention layer, conv + recurrent state per
        DeltaNet layer, in the backend's arrays."""
        cfg, be = self.config, self.backend
        layers: list[Any] = []
        for i in range(cfg.num_hidden_layers):
            if cfg.is_full_attention(i):
                layers.append(be.new_kv_cache(cfg.num_key_value_heads, cfg.head_dim))
            else:
                _, dk, hv, dv = self._delta_heads
                layers.append(be.new_linear_state((cfg.linear_conv_kernel_dim - 1, cfg.conv_dim), (hv, dk, dv)))
        return SequenceState(layers)

    def after_pass(self) -> None:
        """Let the expert provider take in the routing of the forward pass just finished (a provider
        that follows routing kept on the device, runtime/experts/placed.py, queues its counters' read here)."""
        maintain = getattr(self.experts, "maintain", None)
        if maintain is not None:
            maintain()

    def forward(
        self, ids: np.ndarray, state: SequenceState, *, timer: PhaseTimer = NULL_TIMER, last_only: bool = False
    ) -> Any:
        """Run the token ids (host int64 ``[T]``, checked by the caller) from ``state.position`` on:
        logits ``[T, vocab]`` in the backend's array (``[1, vocab]`` with ``last_only``: generation
        needs no more, and the lm_head over every prompt token is a long prefill's costliest matmul).

        ``state`` is updated. If this raises, ``state`` may be partly updated and must not be reused.
        """
        start, count = state.position, len(ids)
        x, h = self.begin(ids, timer)
        for i in range(self.config.num_hidden_layers):
            x, h, router_logits, shared_gate = self.layer_front(i, x, h, state, start, timer)
            y = self.layer_experts(i, h, router_logits, shared_gate, timer)
            x, h = self.layer_back(i, x, y, last_only)
        logits = self.head(h, timer)
        state.position = start + count
        return logits

    # ---- the stages of a forward pass ------------------------------------------------------------
    # forward() is begin, then per layer front -> experts -> back, then head. Only the experts stage
    # may read back to the host (which experts to make resident), so a CUDA graph can hold the rest
    # (runtime/engine/cuda_graph.py captures the stages between experts stages).
    def begin(self, ids: Any, timer: PhaseTimer = NULL_TIMER) -> tuple[Any, Any]:
        """The embedded tokens ``x`` and the first layer's normed input ``h``."""
        x = self.backend.embed(self.weights.embed, ids)
        h = self.backend.rms_norm(x, self.weights.layers[0].input_norm, self._eps)
        timer.mark(HEAD, "dense")
        return x, h

    def layer_front(
        self, layer: int, x: Any, h: Any, state: SequenceState, start: int, timer: PhaseTimer = NULL_TIMER
    ) -> tuple[Any, Any, Any, Any]:
        """Layer ``layer`` up to its experts: the mixer and its residual, then on the normed result
        ``h`` the router's logits and the shared expert's gate logit: ``(x, h, router_logits,
        shared_gate)``. The shared expert itself is computed with the routed ones (:meth:`routed_experts`)."""
        be, lw = self.backend, self.weights.layers[layer]
        if isinstance(lw.mixer, AttentionWeights):
            y = self._attention(layer, h, lw.mixer, state, start, timer)
        else:
            y = self._delta_net(layer, h, lw.mixer, state.layers[layer], timer)
        x, h = be.add_rms_norm(x, y, lw.post_norm, self._eps)
        moe = lw.moe
        router_logits, shared_gate = be.linears(h, (moe.router, moe.shared_expert_gate))  # [T, E], [T, 1]
        timer.mark(layer, "dense")
        return x, h, router_logits, shared_gate

    def shared_expert(self, layer: int, gate_logit: Any) -> SharedExpert:
        """Layer ``layer``'s shared expert on the tokens whose gate logits ``[T, 1]`` are given."""
        moe = self.weights.layers[layer].moe
        return SharedExpert(moe.shared_gate, moe.shared_up, moe.shared_down, gate_logit)

    def layer_back(self, layer: int, x: Any, y: Any, last_only: bool) -> tuple[Any, Any]:
        """The MoE's residual add and the next layer's input norm (the final norm after the last)."""
        w = self.weights
        last = len(w.layers) - 1
        if layer == last and last_only:
            x, y = x[-1:], y[-1:]
        return self.backend.add_rms_norm(x, y, w.norm if layer == last else w.layers[layer + 1].input_norm, self._eps)

    def head(self, h: Any, timer: PhaseTimer = NULL_TIMER) -> Any:
        logits = self.backend.linear(h, self.weights.lm_head)
        timer.mark(HEAD, "dense")
        return logits

    # ---- mixers --------------------------------------------------------------------------------
    def _delta_net(self, layer: int, h: Any, w: DeltaNetWeights, st: LinearState, timer: PhaseTimer) -> Any:
        be = self.backend
        # qkv [T, 2*Hk*Dk + Hv*Dv] (q | k | v, no interleave), z [T, Hv*Dv], b and a [T, Hv]
        qkv, z, b, a = be.linears(h, (w.in_proj_qkv, w.in_proj_z, w.in_proj_b, w.in_proj_a))
        timer.mark(layer, "dense")  # with the residual add and input norm before it
        qkv, st.conv = be.causal_conv1d(qkv, w.conv1d, st.conv)
        o, st.recurrent = be.delta_net(
            qkv, a, b, z, w.A_log, w.dt_bias, w.norm, self._eps, self._delta_heads, st.recurrent
        )  # [T, Hv*Dv]
        timer.mark(layer, "mixer")
        out = be.linear(o, w.out_proj)
        timer.mark(layer, "dense")
        return out

    def _attention(
        self, layer: int, h: Any, w: AttentionWeights, state: SequenceState, start: int, timer: PhaseTimer
    ) -> Any:
        be = self.backend
        qg, k, v = be.linears(h, (w.q_proj, w.k_proj, w.v_proj))  # [T, Hq*2D] (per head query | gate), [T, Hkv*D]
        timer.mark(layer, "dense")
        q, gate, k = be.attention_inputs(qg, k, w.q_norm, w.k_norm, start, self._rotary, self._eps)
        o, state.layers[layer] = be.attention(q, k, v, state.layers[layer], start, self.config.head_dim**-0.5)
        o = be.sigmoid_gate(o, gate)
        timer.mark(layer, "mixer")
        out = be.linear(o, w.o_proj)
        timer.mark(layer, "dense")
        return out

    # ---- mixture of experts --------------------------------------------------------------------
    def layer_experts(
        self, layer: int, h: Any, router_logits: Any, shared_gate: Any, timer: PhaseTimer = NULL_TIMER
    ) -> Any:
        """The experts of ``layer`` on ``h``: routing, then the experts made resident by the provider
        (the only host read-back of a layer, unless every expert of the layer is on the device), then
        their compute, weighted, with the shared expert gated by ``shared_gate`` (its logits)."""
        ids, weights = self.backend.route(router_logits, self.top_k)
        return self.routed_experts(layer, h, ids, weights, shared_gate, timer)

    def routed_experts(
        self,
        layer: int,
        h: Any,
        ids: Any,
        weights: Any,
        shared_gate: Any,
        timer: PhaseTimer = NULL_TIMER,
        moe: Callable[..., Any] | None = None,
    ) -> Any:
        """:meth:`layer_experts` after routing (``ids``, ``weights`` as ``route`` gives them). ``moe``:
        what computes the experts from their parts, with the backend's ``moe`` op's arguments (default
        that op; the CUDA-graph decoder replays a captured one)."""
        be = self.backend
        moe = moe or be.moe
        shared = self.shared_expert(layer, shared_gate)
        whole = getattr(self.experts, "all_resident", None)
        part = whole(layer) if whole is not None else None
        if part is not None:  # every expert of the layer on the device: routing never leaves it
            timer.mark(layer, "routing")
            out = moe(h, ids, weights, (part,), shared)
            timer.mark(layer, "expert_compute")
            return out
        needed = be.expert_ids(ids)  # the one host read-back of the layer
        timer.mark(layer, "routing")
        ticket = self.experts.resident(layer, needed)
        try:
            if getattr(be, "shared_expert_apart", False):  # dense work: booked so, not as the experts' I/O
                shared = shared_output(be, h, shared)
                timer.mark(layer, "dense")
            out = moe(h, ids, weights, _timed(ticket, timer, layer), shared)
        finally:  # the store gets its slots back now, even when the op failed half-way
            close = getattr(ticket, "close", None)
            if close is not None:
                close()
        timer.mark(layer, "expert_compute")  # the last part and the combine
        return out


def _timed(parts: Iterable[ExpertPart], timer: PhaseTimer, layer: int) -> Iterator[ExpertPart]:
    """Book waiting for a part to expert I/O and the work on it (until the next is asked for) to
    expert compute."""
    for part in parts:
        timer.mark(layer, "expert_io")
        yield part
        timer.mark(layer, "expert_compute")
