"""The text model's geometry, read from a checkpoint's or an artifact's config (never hard-coded)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import msgspec
import xxhash

from fmoe.errors import FmoeError
from fmoe.formats.schemas import TokenId

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


class _TopLevelEos(msgspec.Struct):
    eos_token_id: TokenId | list[TokenId]


@dataclass(frozen=True)
class TextConfig:
    """Every size the engine needs, from ``text_config`` of a Qwen3.5-MoE ``config.json``."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    linear_conv_kernel_dim: int
    linear_key_head_dim: int
    linear_value_head_dim: int
    linear_num_key_heads: int
    linear_num_value_heads: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float
    rope_theta: float
    partial_rotary_factor: float
    max_position_embeddings: int
    eos_token_ids: tuple[int, ...]
    tie_word_embeddings: bool = False

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def linear_key_dim(self) -> int:
        return self.linear_num_key_heads * self.linear_key_head_dim

    @property
    def linear_value_dim(self) -> int:
        return self.linear_num_value_heads * self.linear_value_head_dim

    @property
    def conv_dim(self) -> int:
        return 2 * self.linear_key_dim + self.linear_value_dim

    def is_full_attention(self, layer: int) -> bool:
        return self.layer_types[layer] == "full_attention"

    def fingerprint(self) -> str:
        """A short id of the geometry: artifacts of one model share it, another model's differ."""
        text = json.dumps(asdict(self), sort_keys=True)
        return xxhash.xxh3_64_hexdigest(text.encode())

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layer_types"] = list(self.layer_types)
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    # ---- parsing -------------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, config: dict[str, Any], *, where: str = "config") -> TextConfig:
        """Parse a top-level ``config.json`` (nested ``text_config``) or a flat text config; every
        field is checked against fmoe/formats/schemas.py's ``TextConfigSchema`` first."""
        from fmoe.formats.schemas import TextConfigSchema, validated

        if not isinstance(config, dict):
            raise FmoeError(f"{where}: not a JSON object")
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise FmoeError(f"{where}: text_config is not an object")
        model_type = text.get("model_type", config.get("model_type"))
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FmoeError(
                f"{where}: unsupported model_type {model_type!r} (fmoe runs the Qwen3.5-MoE family: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        t = validated(text, TextConfigSchema, where)
        _refuse_other_computation(text, where)
        layer_types = t.layer_types
        if layer_types is None:
            interval = t.full_attention_interval or 4
            layer_types = [
                "full_attention" if (i + 1) % interval == 0 else "linear_attention" for i in range(t.num_hidden_layers)
            ]
        if len(layer_types) != t.num_hidden_layers:
            raise FmoeError(
                f"{where}: layer_types lists {len(layer_types)} layers, num_hidden_layers is {t.num_hidden_layers}"
            )
        rope = t.rope_parameters
        rope_theta = (rope and rope.rope_theta) or t.rope_theta or 10000.0  # rope_parameters win
        partial = (rope and rope.partial_rotary_factor) or t.partial_rotary_factor or 0.25
        eos = t.eos_token_id if t.eos_token_id is not None else config.get("eos_token_id")
        if eos is not None and t.eos_token_id is None:  # the top level's, outside the text config
            eos = validated({"eos_token_id": eos}, _TopLevelEos, where).eos_token_id
        eos_ids = () if eos is None else tuple(eos if isinstance(eos, list) else [eos])
        tie = t.tie_word_embeddings
        if tie is None:
            tie = validated(config.get("tie_word_embeddings", False), bool, f"{where}: tie_word_embeddings")
        cfg = cls(
            vocab_size=t.vocab_size,
            hidden_size=t.hidden_size,
            num_hidden_layers=t.num_hidden_layers,
            num_attention_heads=t.num_attention_heads,
            num_key_value_heads=t.num_key_value_heads,
            head_dim=t.head_dim,
            linear_conv_kernel_dim=t.linear_conv_kernel_dim,
            linear_key_head_dim=t.linear_key_head_dim,
            linear_value_head_dim=t.linear_value_head_dim,
            linear_num_key_heads=t.linear_num_key_heads,
            linear_num_value_heads=t.linear_num_value_heads,
            moe_intermediate_size=t.moe_intermediate_size,
            shared_expert_intermediate_size=t.shared_expert_intermediate_size,
            num_experts=t.num_experts,
            num_experts_per_tok=t.num_experts_per_tok,
            layer_types=tuple(layer_types),
            rms_norm_eps=float(t.rms_norm_eps),
            rope_theta=float(rope_theta),
            partial_rotary_factor=float(partial),
            max_position_embeddings=t.max_position_embeddings,
            eos_token_ids=eos_ids,
            tie_word_embeddings=tie,
        )
        cfg._validate(where)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> TextConfig:
        from fmoe.fsutil import read_json

        return cls.from_dict(read_json(Path(path), "the model's config"), where=str(path))

    def _validate(self, where: str) -> None:
        """Relations between fields (each field's own type and range: the schema, or the caller)."""
        for key, value in asdict(self).items():  # every count and size; a zero would fail much later
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise FmoeError(f"{where}: {key!r} = {value} must be at least 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FmoeError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise FmoeError(f"{where}: linear_num_value_heads must be a multiple of linear_num_key_heads")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise FmoeError(f"{where}: num_experts_per_tok must be in 1..num_experts")
        exact = self.head_dim * self.partial_rotary_factor
        if exact != self.rotary_dim or self.rotary_dim % 2 or self.rotary_dim < 2:
            raise FmoeError(f"{where}: head_dim * partial_rotary_factor = {exact:g} must be a whole, even number >= 2")
        if any(t not in LAYER_TYPES for t in self.layer_types):
            raise FmoeError(f"{where}: layer_types must each be one of {LAYER_TYPES}")
        if any(not 0 <= e < self.vocab_size for e in self.eos_token_ids):
            raise FmoeError(
                f"{where}: eos_token_id {list(self.eos_token_ids)} outside the vocabulary (0..{self.vocab_size - 1})"
            )


# Fields that would change what the network computes. transformers' qwen3_5_moe (the reference) computes
# one thing for each; a config asking for anything else is refused, never run as if it had not asked.
def _refuse_other_computation(text: dict[str, Any], where: str) -> None:
    """One-line errors for config fields whose value fmoe (like the reference) does not compute."""
    act = text.get("hidden_act", "silu")
    if act != "silu":
        raise FmoeError(
            f"{where}: hidden_act = {act!r}: fmoe computes the family's silu (SwiGLU experts, SiLU after the "
            "DeltaNet conv) and nothing else"
        )
    gate = text.get("output_gate_type")
    if gate is not None and gate != "silu":
        # qwen4_exp's field (the DeltaNet output gate's activation); transformers' qwen3_5_moe has no such
        # field and always gates with silu (Qwen3_5MoeRMSNormGated), so it would run this checkpoint wrongly.
        raise FmoeError(
            f"{where}: output_gate_type = {gate!r}: the Qwen3.5-MoE DeltaNet output gate is silu (transformers' "
            "qwen3_5_moe has no such field and always uses silu); fmoe refuses another activation rather than "
            "run it as silu"
        )
    if text.get("attention_bias", False) is not False:
        raise FmoeError(
            f"{where}: attention_bias = {text.get('attention_bias')!r}: fmoe computes attention projections "
            "without bias (as every release is)"
        )
    norm_topk = text.get("norm_topk_prob", True)
    if norm_topk is not True:
        raise FmoeError(
            f"{where}: norm_topk_prob = {norm_topk!r}: the Qwen3.5-MoE router always renormalises its top-k "
            "weights (transformers' qwen3_5_moe has no such switch); fmoe refuses another routing"
        )
    for field in ("rope_parameters", "rope_scaling"):
        rope = text.get(field)
        if not isinstance(rope, dict):
            continue  # absent, or malformed: the schema names it
        kind = rope.get("rope_type") or rope.get("type")
        if kind not in (None, "default"):
            raise FmoeError(
                f"{where}: {field} asks for rope type {kind!r}: fmoe computes the default (unscaled) rotary "
                "embedding only"
            )
