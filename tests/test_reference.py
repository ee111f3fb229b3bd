"""Live comparison against transformers' Qwen3_5MoeForCausalLM (the correctness bar of the runtime),
on every installed backend (tests/support.py BACKENDS).

1. The real pipeline: ``synth --on-grid`` (official layout) -> ``extract --dense-bits 16`` ->
   ``repack --bits 4`` -> ``fmoe.load``. The reference runs in float32 on the same bf16 values and
   the same (on-grid, hence lossless) experts. Prefill logits: relative error (per position,
   max|fmoe - ref| / max|ref|) below 1e-4 at every position; 64 greedy tokens identical, and the
   logits of every decode step within the same bound.
2. A second geometry through the in-memory adapter (tests/support.py): 3 query heads per kv head,
   3 value heads per key head, Dk != Dv, K=3 of 7 experts, random weights, reference on the same
   bf16/on-grid values.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from support import canonical_from_reference, load_options, logits, make_net  # noqa: E402

from fmoe.config import TextConfig  # noqa: E402
from fmoe.formats.quant import bf16_to_f32, f32_to_bf16  # noqa: E402
from fmoe.runtime.diagnostics import (  # noqa: E402
    build_packed,
    fmoe_greedy,
    reference_cache,
    reference_greedy,
    relative_error,
)

pytestmark = pytest.mark.reference

NEW_TOKENS = 64
BOUND = 1e-4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(source, packed, prompt, transformers' greedy run): made once, checked on every backend."""
    src, packed = build_packed(tmp_path_factory.mktemp("ref"), preset="tiny", seed=3, dense_bits=16, expert_bits=(4,))
    cfg = TextConfig.from_file(src / "config.json")
    assert cfg.num_experts_per_tok > 2
    assert sum(cfg.is_full_attention(i) for i in range(cfg.num_hidden_layers)) >= 2
    prompt = np.random.default_rng(77).integers(0, cfg.vocab_size, 16)
    return src, packed, prompt, reference_greedy(src, prompt, NEW_TOKENS)


def test_packed_pipeline_matches_transformers(backend_name, pipeline):
    import fmoe

    if backend_name == "torch-cpu-triton":  # the whole pipeline through Triton's interpreter takes ~8 min
        pytest.skip("the Triton kernels run it on a GPU (torch-cuda); here test_odd_geometry covers them")
    _, packed, prompt, ref = pipeline
    with fmoe.load(packed, bits=4, **load_options(backend_name)) as model:
        logits = model.logits(prompt)
        run = fmoe_greedy(model, prompt, NEW_TOKENS)

    rel = relative_error(logits, ref.prefill_logits)
    assert rel.max() < BOUND, f"prefill: max rel err {rel.max():.2e} at position {int(rel.argmax())}"
    first_diff = np.flatnonzero(run.tokens != ref.tokens)
    assert first_diff.size == 0, (
        f"greedy tokens differ from step {first_diff[0]} (reference top-2 margin there "
        f"{ref.margins[first_diff[0]]:.2e})"
    )
    assert len(run.tokens) == NEW_TOKENS
    step_rel = relative_error(run.step_logits, ref.step_logits)
    assert step_rel.max() < BOUND, f"decode: max rel err {step_rel.max():.2e}"


def _odd_reference_model(seed: int):
    from transformers import Qwen3_5MoeForCausalLM, Qwen3_5MoeTextConfig

    text = dict(
        vocab_size=257,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=3,
        num_key_value_heads=1,
        head_dim=32,
        linear_conv_kernel_dim=4,
        linear_key_head_dim=16,
        linear_value_head_dim=24,
        linear_num_key_heads=2,
        linear_num_value_heads=6,
        moe_intermediate_size=64,
        shared_expert_intermediate_size=96,
        num_experts=7,
        num_experts_per_tok=3,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        hidden_act="silu",
        layer_types=["linear_attention", "full_attention", "linear_attention", "full_attention"],
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.25,
            "mrope_section": [11, 11, 10],
            "mrope_interleaved": True,
        },
    )
    hf = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text)).eval()
    cfg = TextConfig.from_dict({"model_type": "qwen3_5_moe_text", **text})
    rng = np.random.default_rng(seed)
    state = {}
    for name, p in hf.state_dict().items():
        shape = tuple(p.shape)
        if name.endswith("A_log"):
            a = np.log(rng.uniform(1, 16, shape))
        elif name.endswith("dt_bias") or name.endswith("embed_tokens.weight"):
            a = rng.normal(0, 1, shape)
        elif len(shape) == 1:
            a = rng.normal(0, 0.2, shape)  # zero-centred norms: effective scale 1 + w
        else:
            a = rng.normal(0, 1, shape) / np.sqrt(shape[-1])
        state[name] = bf16_to_f32(f32_to_bf16(a.astype(np.float32)))  # bf16 values, held in float32
    return hf, cfg, state


@pytest.fixture(scope="module")
def odd_geometry():
    """The odd-geometry model's fmoe weights, and transformers' prefill and greedy steps on them."""
    hf, cfg, state = _odd_reference_model(seed=5)
    dense, experts, floats = canonical_from_reference(state, cfg, expert_bits=4)
    inter = cfg.moe_intermediate_size
    for layer in range(cfg.num_hidden_layers):  # put the reference on the quantised experts' values
        f = floats[layer]
        p = f"model.layers.{layer}.mlp.experts."
        state[p + "gate_up_proj"] = np.stack([np.vstack([f[e]["gate"], f[e]["up"]]) for e in range(cfg.num_experts)])
        state[p + "down_proj"] = np.stack([f[e]["down"] for e in range(cfg.num_experts)])
        assert state[p + "gate_up_proj"].shape[1] == 2 * inter
    hf.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state.items()})

    prompt = np.random.default_rng(9).integers(0, cfg.vocab_size, 11)
    with torch.no_grad():
        out = hf(input_ids=torch.from_numpy(prompt)[None], use_cache=True)
        ref_prefill = out.logits[0].numpy()
        ref_steps, tokens = [], []
        nxt = int(ref_prefill[-1].argmax())
        for _ in range(12):
            tokens.append(nxt)
            out = hf(input_ids=torch.tensor([[nxt]]), use_cache=True, **reference_cache(hf, out))
            ref_steps.append(out.logits[0, -1].numpy())
            nxt = int(ref_steps[-1].argmax())

    return cfg, (dense, experts), prompt, ref_prefill, tokens, np.stack(ref_steps)


def test_odd_geometry_matches_transformers(be, odd_geometry):
    cfg, weights, prompt, ref_prefill, tokens, ref_steps = odd_geometry
    net = make_net(cfg, weights, be)
    state = net.new_state()
    assert relative_error(logits(net, prompt, state), ref_prefill).max() < BOUND
    steps = np.vstack([logits(net, [t], state) for t in tokens])
    assert relative_error(steps, ref_steps).max() < BOUND
    # greedy identical: the reference's own choices, from fmoe's logits
    assert [int(np.argmax(row)) for row in (logits(net, prompt, net.new_state())[-1], *steps[:-1])] == tokens
