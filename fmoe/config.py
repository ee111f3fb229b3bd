"""The text model's geometry, read from a checkpoint's or an artifact's config (never hard-coded)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import xxhash

from fmoe.errors import FmoeError

SUPPORTED_MODEL_TYPES = ("qwen3_5_moe", "qwen3_5_moe_text")
LAYER_TYPES = ("linear_attention", "full_attention")


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
        """Parse a top-level ``config.json`` (nested ``text_config``) or a flat text config."""
        model_type = config.get("model_type")
        text = config.get("text_config", config)
        if not isinstance(text, dict):
            raise FmoeError(f"{where}: text_config is not an object")
        model_type = text.get("model_type", model_type)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise FmoeError(
                f"{where}: unsupported model_type {model_type!r} (fmoe runs the Qwen3.5-MoE family: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)})"
            )

        def need(key: str, kind: type = int) -> Any:
            if key not in text:
                raise FmoeError(f"{where}: text config has no {key!r}")
            value = text[key]
            try:
                return kind(value)
            except (TypeError, ValueError):
                raise FmoeError(f"{where}: {key!r} = {value!r} is not a {kind.__name__}") from None

        layers = need("num_hidden_layers")
        layer_types = text.get("layer_types")
        if layer_types is None:
            interval = int(text.get("full_attention_interval", 4))
            layer_types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(layers)]
        if len(layer_types) != layers or any(t not in LAYER_TYPES for t in layer_types):
            raise FmoeError(f"{where}: layer_types must list {layers} entries of {LAYER_TYPES}")
        rope = {**text, **(text.get("rope_parameters") or {})}  # rope_parameters win over top-level keys
        rope_theta = float(rope.get("rope_theta", 10000.0))
        partial = float(rope.get("partial_rotary_factor", 0.25))
        eos = text.get("eos_token_id", config.get("eos_token_id"))
        eos_ids = () if eos is None else tuple(int(e) for e in (eos if isinstance(eos, list) else [eos]))

        cfg = cls(
            vocab_size=need("vocab_size"),
            hidden_size=need("hidden_size"),
            num_hidden_layers=layers,
            num_attention_heads=need("num_attention_heads"),
            num_key_value_heads=need("num_key_value_heads"),
            head_dim=need("head_dim"),
            linear_conv_kernel_dim=need("linear_conv_kernel_dim"),
            linear_key_head_dim=need("linear_key_head_dim"),
            linear_value_head_dim=need("linear_value_head_dim"),
            linear_num_key_heads=need("linear_num_key_heads"),
            linear_num_value_heads=need("linear_num_value_heads"),
            moe_intermediate_size=need("moe_intermediate_size"),
            shared_expert_intermediate_size=need("shared_expert_intermediate_size"),
            num_experts=need("num_experts"),
            num_experts_per_tok=need("num_experts_per_tok"),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(text.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            partial_rotary_factor=partial,
            max_position_embeddings=int(text.get("max_position_embeddings", 262144)),
            eos_token_ids=eos_ids,
            tie_word_embeddings=bool(text.get("tie_word_embeddings", config.get("tie_word_embeddings", False))),
        )
        cfg._validate(where)
        return cfg

    @classmethod
    def from_file(cls, path: Path) -> TextConfig:
        from fmoe.fsutil import read_json

        return cls.from_dict(read_json(Path(path), "the model's config"), where=str(path))

    def _validate(self, where: str) -> None:
        for key, value in asdict(self).items():  # every count and size; a zero would fail much later
            if isinstance(value, int) and not isinstance(value, bool) and value < 1:
                raise FmoeError(f"{where}: {key!r} = {value} must be at least 1")
        if self.num_attention_heads % self.num_key_value_heads:
            raise FmoeError(f"{where}: num_attention_heads must be a multiple of num_key_value_heads")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise FmoeError(f"{where}: linear_num_value_heads must be a multiple of linear_num_key_heads")
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise FmoeError(f"{where}: num_experts_per_tok must be in 1..num_experts")
        if self.rotary_dim % 2:
            raise FmoeError(f"{where}: head_dim * partial_rotary_factor must be even")
