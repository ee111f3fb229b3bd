"""One definition of the Qwen3.5-MoE text model, for every size (all from TextConfig).

Layer ``L`` is ``x += mixer(rms(x)); x += moe(rms(x))`` where the mixer is a Gated DeltaNet
(linear attention with a causal conv and a recurrent state) or gated full attention (partial
NeoX RoPE, GQA, KV cache), and the MoE is softmax routing over the experts, top-K renormalised,
SwiGLU experts streamed from an ExpertSource, plus a sigmoid-gated shared expert.

The model only calls Backend ops (runtime/backends/base.py) and small numpy glue. Weight names
and conventions are docs/FORMAT.md's: zero-centred norms stored as the effective scale ``1 + w``,
the DeltaNet norm plain, ``conv1d`` as ``[channels, kernel]``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, bf16_to_f32
from fmoe.runtime.backends.base import Backend, ExpertSource, Weight
from fmoe.runtime.profile import HEAD, PhaseProfile
from fmoe.runtime.state import InferenceState, KVCache, LinearState

L2NORM_EPS = 1e-6  # the q/k l2norm epsilon of the reference DeltaNet (not the config's rms eps)


# ---- numpy glue ---------------------------------------------------------------------------------
def sigmoid(x: np.ndarray) -> np.ndarray:
    return np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * x)


def softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def l2_normalize(x: np.ndarray, eps: float = L2NORM_EPS) -> np.ndarray:
    return x / np.sqrt(np.sum(np.square(x), axis=-1, keepdims=True) + np.float32(eps))


def route(logits: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Softmax in fp32, top-``k``, renormalised: returns (expert ids [T, k], weights [T, k])."""
    probs = softmax(logits.astype(np.float32, copy=False))
    if k < probs.shape[-1]:
        top = np.argpartition(-probs, k - 1, axis=-1)[:, :k]
    else:
        top = np.broadcast_to(np.arange(probs.shape[-1]), probs.shape).copy()
    w = np.take_along_axis(probs, top, axis=-1)
    return top, (w / w.sum(axis=-1, keepdims=True)).astype(np.float32)


def check_k(cfg: TextConfig, k: int | None) -> int:
    """Experts per token: the model's own when ``k`` is None, else ``k`` if the model has that many."""
    if k is None:
        return cfg.num_experts_per_tok
    if not 1 <= k <= cfg.num_experts:
        raise FmoeError(
            f"--k {k}: must be between 1 and {cfg.num_experts} (the model's experts per layer; "
            f"its default is {cfg.num_experts_per_tok})"
        )
    return int(k)


def check_token_ids(token_ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
    """The ids as int64 ``[T]``; a one-line error for an id outside the vocabulary."""
    ids = np.asarray(token_ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        bad = int(ids[(ids < 0) | (ids >= vocab_size)][0])
        raise FmoeError(f"tokens: id {bad} is outside the vocabulary (0..{vocab_size - 1})")
    return ids


def embedding_rows(table: Any, ids: np.ndarray) -> np.ndarray:
    """float32 ``[T, hidden]`` rows ``ids`` of an embedding table (float array, bf16 bit patterns as
    uint16, or QuantTensor): only those rows are widened or dequantised."""
    if isinstance(table, QuantTensor):
        return QuantTensor(
            table.weight[ids], table.scales[ids], table.biases[ids], table.bits, table.group_size
        ).dequantize()
    rows = table[ids]
    return bf16_to_f32(rows) if rows.dtype == np.uint16 else np.asarray(rows, dtype=np.float32)


class _Timer:
    """Books elapsed time to (layer, phase) of a PhaseProfile; free when there is no profile."""

    __slots__ = ("profile", "t")

    def __init__(self, profile: PhaseProfile | None) -> None:
        self.profile = profile
        self.t = time.perf_counter() if profile is not None else 0.0

    def lap(self, layer: int, phase: str) -> None:
        if self.profile is not None:
            now = time.perf_counter()
            self.profile.add(layer, phase, now - self.t)
            self.t = now


# ---- the network --------------------------------------------------------------------------------
class Qwen35MoeNetwork:
    """The text model over resident dense weights and streamed experts."""

    def __init__(
        self,
        config: TextConfig,
        dense: Mapping[str, Any],
        experts: ExpertSource,
        backend: Backend,
        k: int | None = None,
        fetch_chunk: int | None = None,
    ) -> None:
        """``fetch_chunk`` caps the experts per fetch call (a long prefill on a big model may route
        to every expert of a layer; the store's buffers grow to the largest fetch). Each needed
        expert is still read exactly once per layer; None fetches the whole union at once."""
        self.config = config
        self.dense = dense
        self.experts = experts
        self.backend = backend
        self.k = check_k(config, k)
        if fetch_chunk is not None and fetch_chunk < 1:
            raise FmoeError(f"fetch_chunk: {fetch_chunk} must be >= 1")
        self.fetch_chunk = fetch_chunk
        self._check_weights()
        cfg = config
        self._eps = float(cfg.rms_norm_eps)
        half = cfg.rotary_dim // 2
        # inv_freq_i = theta^(-2i / rotary_dim), computed in float64
        self._inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(half, dtype=np.float64) * 2.0 / cfg.rotary_dim))
        # -exp(A_log) per linear layer, precomputed once (the decay rate of each value head)
        self._neg_a = {
            i: -np.exp(np.asarray(dense[f"layers.{i}.linear_attn.A_log"], dtype=np.float32))
            for i in range(cfg.num_hidden_layers)
            if not cfg.is_full_attention(i)
        }
        self._lm_head_name = "lm_head.weight" if "lm_head.weight" in dense else "embed_tokens.weight"

    # ---- public --------------------------------------------------------------------------------
    def new_state(self) -> InferenceState:
        return InferenceState.new(self.config)

    def forward(
        self,
        token_ids: Sequence[int],
        state: InferenceState,
        *,
        profile: PhaseProfile | None = None,
        last_only: bool = False,
    ) -> np.ndarray:
        """Run ``token_ids`` as one batch from ``state.position`` on; float32 logits [T, vocab]
        (``[1, vocab]`` for the last token only with ``last_only``: generation needs no more, and
        the lm_head over every prompt token is the costliest matmul of a long prefill).

        ``state`` is updated (conv/delta states, KV caches, position). If this raises, ``state``
        may be partly updated and must not be reused.
        """
        cfg = self.config
        ids = self._check_tokens(token_ids, state)
        t_count = ids.shape[0]
        kind = "prefill" if t_count > 1 or state.position == 0 else "decode"
        start_wall = time.perf_counter()
        timer = _Timer(profile)

        x = embedding_rows(self.dense["embed_tokens.weight"], ids)
        timer.lap(HEAD, "dense")
        positions = np.arange(state.position, state.position + t_count)
        for layer in range(cfg.num_hidden_layers):
            prefix = f"layers.{layer}."
            h = self.backend.rms_norm(x, self.dense[prefix + "input_layernorm.weight"], self._eps)
            layer_state = state.layers[layer]
            if isinstance(layer_state, KVCache):
                x = x + self._attention(layer, h, layer_state, positions, timer)
            else:
                x = x + self._delta_net(layer, h, layer_state, timer)
            h = self.backend.rms_norm(x, self.dense[prefix + "post_attention_layernorm.weight"], self._eps)
            x = x + self._moe(layer, h, timer)
        if last_only:
            x = x[-1:]
        x = self.backend.rms_norm(x, self.dense["norm.weight"], self._eps)
        logits = self.backend.matmul(x, self.dense[self._lm_head_name])
        timer.lap(HEAD, "dense")
        state.position += t_count
        if profile is not None:
            profile.add_tokens(kind, t_count, time.perf_counter() - start_wall)
        return logits

    # ---- mixers --------------------------------------------------------------------------------
    def _delta_net(self, layer: int, h: np.ndarray, st: LinearState, timer: _Timer) -> np.ndarray:
        cfg, be, w = self.config, self.backend, self.dense
        p = f"layers.{layer}.linear_attn."
        t = h.shape[0]
        hk, hv, dk, dv = (
            cfg.linear_num_key_heads,
            cfg.linear_num_value_heads,
            cfg.linear_key_head_dim,
            cfg.linear_value_head_dim,
        )
        timer.lap(layer, "dense")  # the input norm above is booked with the projections
        qkv = be.matmul(h, w[p + "in_proj_qkv.weight"])  # [T, 2*Hk*Dk + Hv*Dv], no interleave
        z = be.matmul(h, w[p + "in_proj_z.weight"]).reshape(t, hv, dv)
        b = be.matmul(h, w[p + "in_proj_b.weight"])  # [T, Hv]
        a = be.matmul(h, w[p + "in_proj_a.weight"])  # [T, Hv]
        timer.lap(layer, "dense")

        qkv = be.causal_conv1d(qkv, w[p + "conv1d.weight"], st.conv)
        kd = cfg.linear_key_dim
        q = l2_normalize(qkv[:, :kd].reshape(t, hk, dk)) * np.float32(dk**-0.5)
        k = l2_normalize(qkv[:, kd : 2 * kd].reshape(t, hk, dk))
        v = np.ascontiguousarray(qkv[:, 2 * kd :].reshape(t, hv, dv))
        beta = sigmoid(b)
        g = (self._neg_a[layer] * softplus(a + w[p + "dt_bias"])).astype(np.float32, copy=False)  # log decay <= 0
        o = be.gated_delta_rule(
            np.ascontiguousarray(q, dtype=np.float32),
            np.ascontiguousarray(k, dtype=np.float32),
            v,
            np.ascontiguousarray(g),
            np.ascontiguousarray(beta, dtype=np.float32),
            st.delta,
        )
        o = be.gated_rms_norm(o, w[p + "norm.weight"], z, self._eps)
        timer.lap(layer, "mixer")
        out = be.matmul(o.reshape(t, hv * dv), w[p + "out_proj.weight"])
        timer.lap(layer, "dense")
        return out

    def _attention(self, layer: int, h: np.ndarray, cache: KVCache, positions: np.ndarray, timer: _Timer) -> np.ndarray:
        cfg, be, w = self.config, self.backend, self.dense
        p = f"layers.{layer}.self_attn."
        t = h.shape[0]
        hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        timer.lap(layer, "dense")
        qg = be.matmul(h, w[p + "q_proj.weight"]).reshape(t, hq, 2 * d)  # per head [query | gate]
        k = be.matmul(h, w[p + "k_proj.weight"]).reshape(t, hkv, d)
        v = be.matmul(h, w[p + "v_proj.weight"]).reshape(t, hkv, d)
        timer.lap(layer, "dense")

        q = be.rms_norm(qg[..., :d], w[p + "q_norm.weight"], self._eps)
        gate = qg[..., d:].reshape(t, hq * d)
        k = be.rms_norm(k, w[p + "k_norm.weight"], self._eps)
        q = be.rotary(q, positions, self._inv_freq)
        k = be.rotary(k, positions, self._inv_freq)
        cache.append(k, v)
        o = be.attention(q, cache.keys, cache.values, int(positions[0]), d**-0.5)
        o = o.reshape(t, hq * d) * sigmoid(gate)
        timer.lap(layer, "mixer")
        out = be.matmul(o, w[p + "o_proj.weight"])
        timer.lap(layer, "dense")
        return out

    # ---- mixture of experts --------------------------------------------------------------------
    def _moe(self, layer: int, h: np.ndarray, timer: _Timer) -> np.ndarray:
        be, w = self.backend, self.dense
        p = f"layers.{layer}.mlp."
        timer.lap(layer, "dense")
        router_logits = be.matmul(h, w[p + "gate.weight"])  # [T, E]
        shared = be.mlp(
            h,
            w[p + "shared_expert.gate_proj.weight"],
            w[p + "shared_expert.up_proj.weight"],
            w[p + "shared_expert.down_proj.weight"],
        )
        shared *= sigmoid(be.matmul(h, w[p + "shared_expert_gate.weight"]))  # [T, 1] broadcast
        timer.lap(layer, "dense")

        top, weights = route(router_logits, self.k)
        needed = np.unique(top)  # sorted: experts are applied in id order, like the reference
        timer.lap(layer, "routing")

        out = np.zeros_like(h)
        step = self.fetch_chunk or len(needed)
        for lo in range(0, len(needed), step):
            group = [int(e) for e in needed[lo : lo + step]]
            fetched = self.experts.fetch(layer, group)  # views valid until the next fetch: use them now
            timer.lap(layer, "expert_io")
            for e in group:
                expert = fetched.get(e)
                if expert is None:
                    raise FmoeError(f"expert store: layer {layer} did not return expert {e}")
                rows, slots = np.nonzero(top == e)
                y = be.expert_mlp(h[rows], expert)
                out[rows] += y * weights[rows, slots][:, None]
            timer.lap(layer, "expert_compute")
        return out + shared

    # ---- helpers -------------------------------------------------------------------------------
    def _check_tokens(self, token_ids: Sequence[int], state: InferenceState) -> np.ndarray:
        cfg = self.config
        ids = check_token_ids(token_ids, cfg.vocab_size)
        if ids.size == 0:
            raise FmoeError("tokens: nothing to run (empty token list)")
        if state.position + ids.size > cfg.max_position_embeddings:
            raise FmoeError(
                f"prompt: {state.position + ids.size} tokens exceed the context limit of "
                f"{cfg.max_position_embeddings} (max_position_embeddings)"
            )
        if len(state.layers) != cfg.num_hidden_layers:
            raise FmoeError("state: made for another model (layer count differs)")
        return ids

    def _check_weights(self) -> None:
        """Every tensor the model reads is present with the config's shape (a clear error, not a crash later)."""
        for name, shape in expected_dense_shapes(self.config, "lm_head.weight" in self.dense).items():
            if name not in self.dense:
                raise FmoeError(f"dense weights: missing tensor {name}")
            tensor: Weight = self.dense[name]
            if tuple(tensor.shape) != shape:
                raise FmoeError(f"dense weights: {name} has shape {tuple(tensor.shape)}, the config says {shape}")


def expected_dense_shapes(cfg: TextConfig, with_lm_head: bool = True) -> dict[str, tuple[int, ...]]:
    """The shape of every dense tensor the model reads, by canonical name (docs/FORMAT.md).
    ``lm_head.weight`` is listed unless the embeddings are tied and ``with_lm_head`` is False."""
    hid, inter = cfg.hidden_size, cfg.shared_expert_intermediate_size
    shapes: dict[str, tuple[int, ...]] = {
        "embed_tokens.weight": (cfg.vocab_size, hid),
        "norm.weight": (hid,),
    }
    if not cfg.tie_word_embeddings or with_lm_head:
        shapes["lm_head.weight"] = (cfg.vocab_size, hid)
    hv, dv = cfg.linear_num_value_heads, cfg.linear_value_head_dim
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    for i in range(cfg.num_hidden_layers):
        p = f"layers.{i}."
        shapes[p + "input_layernorm.weight"] = (hid,)
        shapes[p + "post_attention_layernorm.weight"] = (hid,)
        if cfg.is_full_attention(i):
            a = p + "self_attn."
            shapes[a + "q_proj.weight"] = (2 * hq * d, hid)  # per head: [query | gate]
            shapes[a + "k_proj.weight"] = (hkv * d, hid)
            shapes[a + "v_proj.weight"] = (hkv * d, hid)
            shapes[a + "o_proj.weight"] = (hid, hq * d)
            shapes[a + "q_norm.weight"] = (d,)
            shapes[a + "k_norm.weight"] = (d,)
        else:
            a = p + "linear_attn."
            shapes[a + "in_proj_qkv.weight"] = (cfg.conv_dim, hid)
            shapes[a + "in_proj_z.weight"] = (hv * dv, hid)
            shapes[a + "in_proj_b.weight"] = (hv, hid)
            shapes[a + "in_proj_a.weight"] = (hv, hid)
            shapes[a + "conv1d.weight"] = (cfg.conv_dim, cfg.linear_conv_kernel_dim)
            shapes[a + "A_log"] = (hv,)
            shapes[a + "dt_bias"] = (hv,)
            shapes[a + "norm.weight"] = (dv,)
            shapes[a + "out_proj.weight"] = (hid, hv * dv)
        m = p + "mlp."
        shapes[m + "gate.weight"] = (cfg.num_experts, hid)
        shapes[m + "shared_expert.gate_proj.weight"] = (inter, hid)
        shapes[m + "shared_expert.up_proj.weight"] = (inter, hid)
        shapes[m + "shared_expert.down_proj.weight"] = (hid, inter)
        shapes[m + "shared_expert_gate.weight"] = (1, hid)
    return shapes
