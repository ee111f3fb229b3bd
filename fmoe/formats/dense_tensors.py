"""The non-expert tensors a packed directory holds (model_weights.bin), with their shapes, derived
from the config.

The one list: the source mapping (convert/source.py), extract, verify and the runtime's dense loader
all use it, so a tensor cannot be written by one and unknown to another. Its independent check is
tests/test_synth.py, which writes the official names and shapes out from the reference notes and
compares a synthetic checkpoint.
"""

from __future__ import annotations

from fmoe.config import TextConfig

# Tensors that the format never stores below 8 bits (docs/FORMAT.md).
MIN_8BIT_SUFFIXES = ("mlp.gate.weight", "mlp.shared_expert_gate.weight")


def dense_tensor_shapes(cfg: TextConfig) -> dict[str, tuple[int, ...]]:
    """Canonical name -> shape of every tensor model_weights.bin must hold (lm_head only when untied)."""
    h = cfg.hidden_size
    out: dict[str, tuple[int, ...]] = {"embed_tokens.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (cfg.vocab_size, h)
    q_heads = cfg.num_attention_heads * cfg.head_dim
    kv_heads = cfg.num_key_value_heads * cfg.head_dim
    hv = cfg.linear_num_value_heads
    for layer in range(cfg.num_hidden_layers):
        p = f"layers.{layer}."
        t: dict[str, tuple[int, ...]] = {
            "input_layernorm.weight": (h,),
            "post_attention_layernorm.weight": (h,),
            "mlp.gate.weight": (cfg.num_experts, h),
            "mlp.shared_expert.gate_proj.weight": (cfg.shared_expert_intermediate_size, h),
            "mlp.shared_expert.up_proj.weight": (cfg.shared_expert_intermediate_size, h),
            "mlp.shared_expert.down_proj.weight": (h, cfg.shared_expert_intermediate_size),
            "mlp.shared_expert_gate.weight": (1, h),
        }
        if cfg.is_full_attention(layer):
            t |= {
                # q_proj yields [query | gate] per head, hence twice the query width.
                "self_attn.q_proj.weight": (2 * q_heads, h),
                "self_attn.k_proj.weight": (kv_heads, h),
                "self_attn.v_proj.weight": (kv_heads, h),
                "self_attn.o_proj.weight": (h, q_heads),
                "self_attn.q_norm.weight": (cfg.head_dim,),
                "self_attn.k_norm.weight": (cfg.head_dim,),
            }
        else:
            t |= {
                "linear_attn.in_proj_qkv.weight": (cfg.conv_dim, h),
                "linear_attn.in_proj_z.weight": (cfg.linear_value_dim, h),
                "linear_attn.in_proj_b.weight": (hv, h),
                "linear_attn.in_proj_a.weight": (hv, h),
                "linear_attn.conv1d.weight": (cfg.conv_dim, cfg.linear_conv_kernel_dim),
                "linear_attn.A_log": (hv,),
                "linear_attn.dt_bias": (hv,),
                "linear_attn.norm.weight": (cfg.linear_value_head_dim,),
                "linear_attn.out_proj.weight": (h, cfg.linear_value_dim),
            }
        out |= {p + k: v for k, v in t.items()}
    return out
