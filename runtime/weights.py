"""The dense (non-expert) weights as one typed tree: per layer, the mixer's, the MoE block's and the
norms' tensors, built once from the canonical names of model_weights.bin (docs/FORMAT.md).

The tree is generic over what a tensor is. Loaded from a packed directory it holds *host* tensors:
float32 arrays, bf16 bit patterns as uint16 arrays (the embedding table only, kept as stored) or
QuantTensor. A backend's ``prepare`` maps it (``ModelWeights.map``) to its own arrays once.
Which names and shapes exist is fmoe/formats/dense_tensors.py's table; this module only says which
attribute each one becomes.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.quant import bf16_to_f32

EMBED = "embed_tokens.weight"
LM_HEAD = "lm_head.weight"


@dataclass
class DeltaNetWeights:
    """A Gated DeltaNet mixer (``layers.L.linear_attn.*``)."""

    in_proj_qkv: Any  # [2*Hk*Dk + Hv*Dv, hidden]
    in_proj_z: Any  # [Hv*Dv, hidden]
    in_proj_b: Any  # [Hv, hidden]
    in_proj_a: Any  # [Hv, hidden]
    conv1d: Any  # [conv_dim, kernel]
    A_log: Any  # [Hv]
    dt_bias: Any  # [Hv]
    norm: Any  # [Dv], the plain weight
    out_proj: Any  # [hidden, Hv*Dv]

    PREFIX: ClassVar[str] = "linear_attn."
    NAMES: ClassVar[dict[str, str]] = {
        "in_proj_qkv": "in_proj_qkv.weight",
        "in_proj_z": "in_proj_z.weight",
        "in_proj_b": "in_proj_b.weight",
        "in_proj_a": "in_proj_a.weight",
        "conv1d": "conv1d.weight",
        "A_log": "A_log",
        "dt_bias": "dt_bias",
        "norm": "norm.weight",
        "out_proj": "out_proj.weight",
    }


@dataclass
class AttentionWeights:
    """Gated full attention (``layers.L.self_attn.*``); norms are effective scales ``1 + w``."""

    q_proj: Any  # [Hq * 2D, hidden]: per head [query | gate]
    k_proj: Any  # [Hkv * D, hidden]
    v_proj: Any  # [Hkv * D, hidden]
    o_proj: Any  # [hidden, Hq * D]
    q_norm: Any  # [D]
    k_norm: Any  # [D]

    PREFIX: ClassVar[str] = "self_attn."
    NAMES: ClassVar[dict[str, str]] = {
        "q_proj": "q_proj.weight",
        "k_proj": "k_proj.weight",
        "v_proj": "v_proj.weight",
        "o_proj": "o_proj.weight",
        "q_norm": "q_norm.weight",
        "k_norm": "k_norm.weight",
    }


@dataclass
class MoeWeights:
    """The MoE block's resident part (``layers.L.mlp.*``): router and shared expert. The routed
    experts live in the expert store."""

    router: Any  # [num_experts, hidden]
    shared_gate: Any  # [shared_inter, hidden]
    shared_up: Any  # [shared_inter, hidden]
    shared_down: Any  # [hidden, shared_inter]
    shared_expert_gate: Any  # [1, hidden]

    PREFIX: ClassVar[str] = "mlp."
    NAMES: ClassVar[dict[str, str]] = {
        "router": "gate.weight",
        "shared_gate": "shared_expert.gate_proj.weight",
        "shared_up": "shared_expert.up_proj.weight",
        "shared_down": "shared_expert.down_proj.weight",
        "shared_expert_gate": "shared_expert_gate.weight",
    }


@dataclass
class LayerWeights:
    input_norm: Any  # [hidden], 1 + w
    post_norm: Any  # [hidden], 1 + w
    mixer: DeltaNetWeights | AttentionWeights
    moe: MoeWeights


@dataclass
class ModelWeights:
    embed: Any  # [vocab, hidden]
    layers: list[LayerWeights]
    norm: Any  # [hidden], 1 + w
    lm_head: Any  # [vocab, hidden] (the embedding's values when tied)

    @classmethod
    def from_tensors(cls, cfg: TextConfig, tensors: Mapping[str, Any]) -> ModelWeights:
        """The tree from host tensors by canonical name, after checking every name the format lists
        for ``cfg`` is there with its shape. A tied lm_head reuses the embedding (widened to float32
        when it is stored as bf16, since it is then a matmul operand)."""
        for name, shape in dense_tensor_shapes(cfg).items():
            if name not in tensors:
                raise FmoeError(f"dense weights: missing tensor {name}")
            if tuple(tensors[name].shape) != shape:
                raise FmoeError(
                    f"dense weights: {name} has shape {tuple(tensors[name].shape)}, the config says {shape}"
                )
        layers = []
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            kind = AttentionWeights if cfg.is_full_attention(i) else DeltaNetWeights
            layers.append(
                LayerWeights(
                    input_norm=tensors[p + "input_layernorm.weight"],
                    post_norm=tensors[p + "post_attention_layernorm.weight"],
                    mixer=_group(kind, tensors, p),
                    moe=_group(MoeWeights, tensors, p),
                )
            )
        embed = tensors[EMBED]
        lm_head = tensors.get(LM_HEAD)
        if lm_head is None:  # tied (the table lists lm_head whenever it is not)
            lm_head = bf16_to_f32(embed) if isinstance(embed, np.ndarray) and embed.dtype == np.uint16 else embed
        return cls(embed=embed, layers=layers, norm=tensors["norm.weight"], lm_head=lm_head)

    def map(self, fn: Callable[[Any], Any]) -> ModelWeights:
        """The same tree with every tensor replaced by ``fn(tensor)`` (one call per distinct object,
        so a tied lm_head stays the embedding's twin)."""
        done: dict[int, Any] = {}

        def convert(t: Any) -> Any:
            if id(t) not in done:
                done[id(t)] = fn(t)
            return done[id(t)]

        return _map_tree(self, convert)

    def tensors(self) -> Iterator[Any]:
        """Every tensor of the tree (a shared one once)."""
        seen: set[int] = set()
        for t in _leaves(self):
            if id(t) not in seen:
                seen.add(id(t))
                yield t

    @property
    def nbytes(self) -> int:
        return sum(int(t.nbytes) for t in self.tensors())

    def bytes_per_token(self) -> int:
        """Bytes a decode step reads: every tensor once, but of the embedding table one row (unless
        it is the lm_head too)."""
        others = sum(int(t.nbytes) for t in self.tensors() if t is not self.embed)
        if self.lm_head is self.embed:
            return others + int(self.embed.nbytes)
        return others + int(self.embed.nbytes) // int(self.embed.shape[0])


def _group(kind: Any, tensors: Mapping[str, Any], layer_prefix: str) -> Any:
    p = layer_prefix + kind.PREFIX
    return kind(**{field: tensors[p + name] for field, name in kind.NAMES.items()})


def _is_node(x: Any) -> bool:
    """The tree's own groups; anything else (arrays, QuantTensor, a backend's TorchQuant) is a leaf."""
    return isinstance(x, (ModelWeights, LayerWeights, DeltaNetWeights, AttentionWeights, MoeWeights))


def _map_tree(node: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(node, list):
        return [_map_tree(x, fn) for x in node]
    if _is_node(node):
        return dataclasses.replace(
            node, **{f.name: _map_tree(getattr(node, f.name), fn) for f in dataclasses.fields(node)}
        )
    return fn(node)


def _leaves(node: Any) -> Iterator[Any]:
    if isinstance(node, list):
        for x in node:
            yield from _leaves(x)
    elif _is_node(node):
        for f in dataclasses.fields(node):
            yield from _leaves(getattr(node, f.name))
    else:
        yield node
