"""`fmoe synth`: layouts, config, tokenizer, chat template, determinism, on-grid exactness, errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import jinja2
import ml_dtypes  # also lets safetensors hand out bf16 numpy arrays
import numpy as np
import pytest
from safetensors import safe_open
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.convert.synth import load_reference_model, on_grid_block, synthesize
from fmoe.convert.synth_tokenizer import ADDED_TOKENS, build_tokenizer_json
from fmoe.errors import FmoeError
from fmoe.formats.quant import bf16_to_f32, dequantize, quantize
from fmoe.formats.safetensors_io import ShardedSafetensorsWriter, parse_size

QWEN_IDS = {"<|endoftext|>": 0, "<|im_start|>": 1, "<|im_end|>": 2, "<tool_call>": 14, "</tool_call>": 15,
            "<tool_response>": 22, "</tool_response>": 23, "<think>": 24, "</think>": 25}  # fmt: skip


# ---- helpers ------------------------------------------------------------------------------------
def read_all(folder: Path) -> dict[str, tuple[str, list[int], np.ndarray]]:
    """Every tensor of a checkpoint: name -> (dtype, shape, array), through its index when sharded."""
    index = folder / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [
        "model.safetensors"]  # fmt: skip
    out = {}
    for name in files:
        with safe_open(folder / name, "numpy") as f:
            for k in f.keys():  # noqa: SIM118 (safe_open has no __iter__)
                s = f.get_slice(k)
                out[k] = (s.get_dtype(), s.get_shape(), f.get_tensor(k))
    return out


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


def expected_text_shapes(tc: TextConfig, prefix: str = "model.language_model") -> dict[str, tuple[int, ...]]:
    """Official text tensor names and shapes, written out from the reference doc (section 3)."""
    H, E, I, S = tc.hidden_size, tc.num_experts, tc.moe_intermediate_size, tc.shared_expert_intermediate_size
    hv, conv = tc.linear_num_value_heads, 2 * tc.linear_num_key_heads * tc.linear_key_head_dim + tc.linear_value_dim
    shapes = {"lm_head.weight": (tc.vocab_size, H), f"{prefix}.embed_tokens.weight": (tc.vocab_size, H),
              f"{prefix}.norm.weight": (H,)}  # fmt: skip
    for L in range(tc.num_hidden_layers):
        p = f"{prefix}.layers.{L}"
        shapes |= {f"{p}.input_layernorm.weight": (H,), f"{p}.post_attention_layernorm.weight": (H,),
                   f"{p}.mlp.gate.weight": (E, H), f"{p}.mlp.experts.gate_up_proj": (E, 2 * I, H),
                   f"{p}.mlp.experts.down_proj": (E, H, I), f"{p}.mlp.shared_expert.gate_proj.weight": (S, H),
                   f"{p}.mlp.shared_expert.up_proj.weight": (S, H), f"{p}.mlp.shared_expert.down_proj.weight": (H, S),
                   f"{p}.mlp.shared_expert_gate.weight": (1, H)}  # fmt: skip
        if tc.layer_types[L] == "full_attention":
            nq, nkv, hd = tc.num_attention_heads, tc.num_key_value_heads, tc.head_dim
            shapes |= {f"{p}.self_attn.q_proj.weight": (2 * nq * hd, H), f"{p}.self_attn.k_proj.weight": (nkv * hd, H),
                       f"{p}.self_attn.v_proj.weight": (nkv * hd, H), f"{p}.self_attn.o_proj.weight": (H, nq * hd),
                       f"{p}.self_attn.q_norm.weight": (hd,), f"{p}.self_attn.k_norm.weight": (hd,)}  # fmt: skip
        else:
            a = f"{p}.linear_attn"
            shapes |= {f"{a}.in_proj_qkv.weight": (conv, H), f"{a}.in_proj_z.weight": (tc.linear_value_dim, H),
                       f"{a}.in_proj_b.weight": (hv, H), f"{a}.in_proj_a.weight": (hv, H),
                       f"{a}.conv1d.weight": (conv, 1, tc.linear_conv_kernel_dim), f"{a}.A_log": (hv,),
                       f"{a}.dt_bias": (hv,), f"{a}.norm.weight": (tc.linear_value_head_dim,),
                       f"{a}.out_proj.weight": (H, tc.linear_value_dim)}  # fmt: skip
    return shapes


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "tiny"
    synthesize(out, preset="tiny", seed=7)
    return out


@pytest.fixture(scope="module")
def tiny_tensors(tiny) -> dict:
    return read_all(tiny)


# ---- official layout ----------------------------------------------------------------------------
def test_official_layout_names_shapes_dtypes(tiny, tiny_tensors):
    tc = TextConfig.from_file(tiny / "config.json")
    assert (tc.num_hidden_layers, tc.num_experts, tc.vocab_size) == (8, 15, 1001)
    expected = expected_text_shapes(tc)
    text = {k: v for k, v in tiny_tensors.items() if not k.startswith(("model.visual.", "mtp."))}
    assert set(text) == set(expected)
    for name, (dtype, shape, _) in text.items():
        assert tuple(shape) == expected[name], name
        assert dtype == ("F32" if name.endswith("A_log") else "BF16"), name
    skipped = [k for k in tiny_tensors if k not in text]
    assert any(k.startswith("model.visual.") for k in skipped)
    assert any(re.fullmatch(r"mtp\.layers\.0\.mlp\.experts\.\d+\.gate_proj\.weight", k) for k in skipped)
    assert not (tiny / "model.safetensors.index.json").exists()
    with safe_open(tiny / "model.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "pt"}


def test_config_parses_with_fmoe_and_transformers(tiny):
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "qwen3_5_moe" and config["tie_word_embeddings"] is False
    assert config["architectures"] == ["Qwen3_5MoeForConditionalGeneration"]
    text = config["text_config"]
    tc = TextConfig.from_file(tiny / "config.json")
    endoftext = json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]["<|endoftext|>"]
    assert tc.eos_token_ids == (endoftext,)
    gen = json.loads((tiny / "generation_config.json").read_text())
    assert gen["eos_token_id"] == [endoftext + 2, endoftext]
    # the reference's own parser (optional: the fmoe checks above run without it)
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen3_5MoeTextConfig(**text)
    assert (hf.num_hidden_layers, hf.num_experts, hf.hidden_size) == (8, 15, 128)
    assert transformers.Qwen3_5MoeConfig(**config).vision_config.out_hidden_size == 128


def test_layers_experts_and_sharding(tmp_path):
    out = tmp_path / "cut"
    report = synthesize(out, preset="tiny", layers=5, experts=2, shard_size="64KB")
    tc = TextConfig.from_file(out / "config.json")
    assert (tc.num_hidden_layers, tc.num_experts, tc.num_experts_per_tok) == (5, 2, 2)
    assert tc.layer_types == ("linear_attention",) * 3 + ("full_attention", "linear_attention")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3 and all(re.fullmatch(rf"model-\d{{5}}-of-{len(shards):05d}\.safetensors", s) for s in shards)
    assert not (out / "model.safetensors").exists()
    tensors = {}
    for shard in shards:
        with safe_open(out / shard, "numpy") as f:
            assert f.metadata() == {"format": "pt"}
            names = list(f.keys())
            assert all(index["weight_map"][n] == shard for n in names)
            sizes = [f.get_tensor(n).nbytes for n in names]
            assert sum(sizes) <= 64_000 or len(names) == 1
            tensors |= dict(zip(names, sizes, strict=True))
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(tensors.values()) == report["tensor_bytes"]
    assert set(expected_text_shapes(tc)) <= set(tensors)
    assert report["bytes"] == sum(p.stat().st_size for p in out.iterdir())


def test_per_expert_layout_holds_the_fused_values(tmp_path, tiny_tensors):
    out = tmp_path / "pe"
    synthesize(out, preset="tiny", seed=7, layout="official-per-expert")
    per = read_all(out)
    I = 64
    for L in (0, 3):
        p = f"model.language_model.layers.{L}.mlp.experts"
        assert f"{p}.gate_up_proj" not in per
        gate_up, down = tiny_tensors[f"{p}.gate_up_proj"][2], tiny_tensors[f"{p}.down_proj"][2]
        for e in range(15):
            assert per[f"{p}.{e}.gate_proj.weight"][1] == [I, 128]
            assert per[f"{p}.{e}.down_proj.weight"][1] == [128, I]
            np.testing.assert_array_equal(f32(per[f"{p}.{e}.gate_proj.weight"][2]), f32(gate_up[e, :I]))
            np.testing.assert_array_equal(f32(per[f"{p}.{e}.up_proj.weight"][2]), f32(gate_up[e, I:]))
            np.testing.assert_array_equal(f32(per[f"{p}.{e}.down_proj.weight"][2]), f32(down[e]))
    # everything that is not an expert is the same tensor in both layouts
    for name, (_, _, a) in tiny_tensors.items():
        if ".mlp.experts." not in name:
            np.testing.assert_array_equal(f32(per[name][2]), f32(a))


def test_weight_statistics(tiny_tensors):
    t = {k: f32(v[2]) for k, v in tiny_tensors.items()}
    p = "model.language_model.layers.0"
    assert abs(t[f"{p}.linear_attn.in_proj_qkv.weight"].std() - 128**-0.5) < 0.01
    assert abs(t[f"{p}.input_layernorm.weight"].mean()) < 0.02  # zero-centred
    assert abs(t[f"{p}.linear_attn.norm.weight"].mean() - 1) < 0.05  # plain weight
    a = np.exp(t[f"{p}.linear_attn.A_log"])
    assert ((a >= 1) & (a <= 16)).all()
    assert abs(t[f"{p}.linear_attn.conv1d.weight"].std() - 0.3) < 0.05


# ---- MLX layout ---------------------------------------------------------------------------------
def test_mlx_layout_quantises_the_official_values(tmp_path, tiny_tensors):
    out = tmp_path / "mlx"
    synthesize(out, preset="tiny", seed=7, layout="mlx")
    mlx = read_all(out)
    assert not any("visual" in k or "mtp." in k or k.startswith("model.") for k in mlx)
    config = json.loads((out / "config.json").read_text())
    q = config["quantization"]
    assert (q["group_size"], q["bits"]) == (64, 4) and config["quantization_config"] == q
    assert q["language_model.model.layers.3.mlp.gate"] == {"group_size": 64, "bits": 8}
    assert q["language_model.model.layers.3.mlp.shared_expert_gate"] == {"group_size": 64, "bits": 8}
    with safe_open(out / "model.safetensors", "numpy") as f:
        assert f.metadata() == {"format": "mlx"}
    with pytest.raises(FmoeError, match="MLX"):
        load_reference_model(out)
    off = {k: f32(v[2]) for k, v in tiny_tensors.items()}

    def deq(module: str, bits: int) -> np.ndarray:
        w, s, b = (mlx[f"{module}.{part}"] for part in ("weight", "scales", "biases"))
        assert w[0] == "U32" and s[0] == b[0] == "BF16"
        return dequantize(w[2], s[2].view(np.uint16), b[2].view(np.uint16), bits, 64)

    def close(a: np.ndarray, ref: np.ndarray, bits: int) -> None:
        # within half a quantisation step of the official bf16 values (plus bf16 rounding of scale/bias)
        g = ref.reshape(*ref.shape[:-1], -1, 64)
        step = (g.max(-1) - g.min(-1)) / (2**bits - 1)
        err = np.abs(a - ref).reshape(g.shape)
        assert (err <= 0.51 * step[..., None] + 0.01 * np.abs(g).max(-1, keepdims=True)).all()

    m, o = "language_model.model.layers.0", "model.language_model.layers.0"
    close(deq("language_model.lm_head", 4), off["lm_head.weight"], 4)
    close(deq("language_model.model.embed_tokens", 4), off["model.language_model.embed_tokens.weight"], 4)
    close(deq(f"{m}.linear_attn.in_proj_qkv", 4), off[f"{o}.linear_attn.in_proj_qkv.weight"], 4)
    close(deq(f"{m}.mlp.gate", 8), off[f"{o}.mlp.gate.weight"], 8)
    assert mlx[f"{m}.mlp.gate.weight"][1] == [15, 128 * 8 // 32]
    gate_up = off[f"{o}.mlp.experts.gate_up_proj"]
    close(deq(f"{m}.mlp.switch_mlp.gate_proj", 4), gate_up[:, :64], 4)
    close(deq(f"{m}.mlp.switch_mlp.up_proj", 4), gate_up[:, 64:], 4)
    close(deq(f"{m}.mlp.switch_mlp.down_proj", 4), off[f"{o}.mlp.experts.down_proj"], 4)
    # norms: zero-centred ones carry +1, the DeltaNet norm does not; conv1d is [C, K, 1]
    np.testing.assert_allclose(f32(mlx[f"{m}.input_layernorm.weight"][2]), off[f"{o}.input_layernorm.weight"] + 1,
                               atol=2**-8)  # fmt: skip
    q_norm = "layers.3.self_attn.q_norm.weight"
    np.testing.assert_allclose(f32(mlx[f"language_model.model.{q_norm}"][2]), off[f"model.language_model.{q_norm}"] + 1,
                               atol=2**-8)  # fmt: skip
    np.testing.assert_array_equal(f32(mlx[f"{m}.linear_attn.norm.weight"][2]), off[f"{o}.linear_attn.norm.weight"])
    conv = mlx[f"{m}.linear_attn.conv1d.weight"]
    assert conv[1] == [256, 4, 1]
    np.testing.assert_array_equal(f32(conv[2])[:, :, 0], off[f"{o}.linear_attn.conv1d.weight"][:, 0, :])


# ---- on-grid experts ----------------------------------------------------------------------------
def test_on_grid_block_roundtrips_exactly(rng):
    for std in (0.02, 0.088, 1.0):
        w = on_grid_block(rng, (40, 256), std)
        assert np.array_equal(bf16_to_f32(np.asarray(w, dtype=ml_dtypes.bfloat16).view(np.uint16)), w)
        assert np.array_equal(quantize(w, 4, 64).dequantize(), w)
        assert 0.3 * std < w.std() < 3 * std


def test_on_grid_checkpoint_experts_are_exact(tmp_path):
    out = tmp_path / "grid"
    synthesize(out, preset="tiny", layers=2, on_grid=True)
    t = read_all(out)
    for L in range(2):
        for name in ("gate_up_proj", "down_proj"):
            w = f32(t[f"model.language_model.layers.{L}.mlp.experts.{name}"][2])
            assert np.array_equal(quantize(w, 4, 64).dequantize(), w), name
    # the MLX layout of the same model stores those experts losslessly
    synthesize(tmp_path / "grid-mlx", preset="tiny", layers=2, on_grid=True, layout="mlx")
    m = read_all(tmp_path / "grid-mlx")
    sw = "language_model.model.layers.1.mlp.switch_mlp"
    parts = [m[f"{sw}.gate_proj.{p}"][2] for p in ("weight", "scales", "biases")]
    gate = dequantize(parts[0], parts[1].view(np.uint16), parts[2].view(np.uint16), 4, 64)
    np.testing.assert_array_equal(gate, f32(t["model.language_model.layers.1.mlp.experts.gate_up_proj"][2])[:, :64])
    # the dense weights are not on a grid (only routed experts are)
    dense = f32(t["model.language_model.layers.0.mlp.shared_expert.up_proj.weight"][2])
    assert not np.array_equal(quantize(dense, 4, 64).dequantize(), dense)


# ---- determinism --------------------------------------------------------------------------------
def test_same_seed_same_bytes(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for out, seed in ((a, 3), (b, 3), (c, 4)):
        synthesize(out, preset="tiny", layers=2, experts=3, seed=seed, shard_size="200KB")
    names = sorted(p.name for p in a.iterdir())
    assert names == sorted(p.name for p in b.iterdir())
    for n in names:
        assert (a / n).read_bytes() == (b / n).read_bytes(), n
    shard = next(n for n in names if n.endswith(".safetensors"))
    assert (a / shard).read_bytes() != (c / shard).read_bytes()


# ---- tokenizer and chat template ----------------------------------------------------------------
def test_tokenizer_roundtrip_and_special_ids(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny / "tokenizer.json"))
    base = 1001 - len(ADDED_TOKENS)
    for text in ("Hello, world! def f(x): return x * 2\n", "Grüße ünïcödé 你好 🙂 \t tabs", "  leading spaces"):
        assert tok.decode(tok.encode(text).ids) == text
    for content, offset in QWEN_IDS.items():
        assert tok.encode(content).ids == [base + offset]
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>").ids
    assert ids[0] == base + 1 and ids[-1] == base + 2 and max(ids[1:-1]) < base
    assert max(tok.get_vocab().values()) == 1000
    config = json.loads((tiny / "tokenizer_config.json").read_text())
    assert config["eos_token"] == "<|im_end|>" and config["pad_token"] == "<|endoftext|>"
    assert "chat_template" not in config


def test_big_vocab_places_added_tokens_at_the_real_ids():
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(build_tokenizer_json(248044))
    for content, offset in QWEN_IDS.items():
        assert tok.encode(content).ids == [248044 + offset]
    assert tok.decode(tok.encode("<think>\nok\n</think>").ids, skip_special_tokens=True) == "<think>\nok\n</think>"
    assert max(tok.encode("plain english text and code()").ids) < 248044


def render(tiny: Path, messages: list, **kw) -> str:
    template = jinja2.Environment().from_string((tiny / "chat_template.jinja").read_text())
    return template.render(messages=messages, **kw)


def test_chat_template_thinking_and_tools(tiny):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    on = render(tiny, msgs, add_generation_prompt=True)
    assert on == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                  "<|im_start|>assistant\n<think>\n")  # fmt: skip
    off = render(tiny, msgs, add_generation_prompt=True, enable_thinking=False)
    assert off.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n")

    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
    convo = [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "22C"},
    ]  # fmt: skip
    text = render(tiny, convo, tools=[tool], add_generation_prompt=True)
    assert text.startswith("<|im_start|>system\n")
    assert "<tools>\n" + json.dumps(tool, sort_keys=True) + "\n</tools>" in text  # jinja's tojson sorts keys
    assert ("<|im_start|>assistant\n<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
            "<parameter=days>\n2\n</parameter>\n</function>\n</tool_call><|im_end|>\n") in text  # fmt: skip
    assert ("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n22C\n"
            "</tool_response><|im_end|>\n") in text  # fmt: skip
    assert text.endswith("<|im_start|>assistant\n<think>\n")
    # earlier turns' reasoning is dropped; the content is kept
    past = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhmm\n</think>\n\nb"},
            {"role": "user", "content": "c"}]  # fmt: skip
    assert "<|im_start|>assistant\nb<|im_end|>\n" in render(tiny, past)


# ---- reference model ----------------------------------------------------------------------------
@pytest.mark.reference
def test_reference_model_loads_the_checkpoint(tiny, tiny_tensors):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")

    model = load_reference_model(tiny)
    state = model.state_dict()
    text = {k for k in tiny_tensors if not k.startswith(("model.visual.", "mtp."))}
    assert len(state) == len(text)
    for name in text:
        key = name.replace("model.language_model.", "model.", 1)
        assert state[key].dtype == torch.float32
        assert np.array_equal(state[key].numpy(), f32(tiny_tensors[name][2])), name
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4, 5]])).logits
    assert logits.shape == (1, 5, 1001) and torch.isfinite(logits).all() and 0.2 < logits.std() < 10


@pytest.mark.reference
def test_transformers_tokenizer_and_chat_template(tiny):
    tok = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(tiny)
    base = 1001 - len(ADDED_TOKENS)
    assert (tok.eos_token_id, tok.pad_token_id) == (base + 2, base)
    msgs = [{"role": "user", "content": "hi"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


# ---- errors -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--preset", "nope"], "unknown preset"),
        (["--layers", "0"], "--layers"),
        (["--layers", "9"], "--layers"),
        (["--experts", "16"], "--experts"),
        (["--layout", "gguf"], "--layout"),
        (["--shard-size", "lots"], "--shard-size"),
        (["--shard-size", "0MB"], "--shard-size"),
    ],
)
def test_cli_errors_are_one_line(tmp_path, args, needle):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["synth", str(out), *args])
    assert result.exit_code != 0
    lines = [ln for ln in result.output.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and needle in lines[0] and "Traceback" not in result.output
    assert_cli_error(result, needle)
    assert not out.exists()


def test_cli_refuses_non_empty_out_and_writes_json(tmp_path):
    out = tmp_path / "o"
    result = CliRunner().invoke(app, ["synth", str(out), "--layers", "1", "--experts", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["path"] == str(out) and report["bytes"] > 0
    before = (out / "model.safetensors").read_bytes()
    again = CliRunner().invoke(app, ["synth", str(out)])
    assert again.exit_code != 0 and "not an empty directory" in again.output
    assert_cli_error(again, "not an empty directory")
    assert (out / "model.safetensors").read_bytes() == before
    with pytest.raises(FmoeError):
        synthesize(out / "config.json", preset="tiny")


# ---- the streaming writer -----------------------------------------------------------------------
def test_parse_size():
    assert parse_size("2GB") == 2_000_000_000 and parse_size("500MB") == 500_000_000
    assert parse_size("64KB") == 64_000 and parse_size("1.5GiB") == 1536 << 20 and parse_size("123") == 123
    for bad in ("", "GB", "-1MB", "2XB", "0"):
        with pytest.raises(FmoeError):
            parse_size(bad)


def test_writer_streams_chunks_and_checks_sizes(tmp_path, rng):
    a = rng.standard_normal((10, 7), dtype=np.float32)
    b = rng.integers(0, 2**32, size=(3, 5, 4), dtype=np.uint32)
    w = ShardedSafetensorsWriter(tmp_path, shard_size=300)
    w.add_array("a", a)
    w.add("b", "U32", b.shape, lambda: (b[i] for i in range(3)))  # one slice at a time
    w.add("c", "BF16", (2, 3), lambda: [np.arange(3, dtype=np.uint16).tobytes(), np.ones(3, np.uint16)])
    report = w.write()
    assert report["index"] == "model.safetensors.index.json" and len(report["files"]) == 2  # [a] [b c]
    t = read_all(tmp_path)
    np.testing.assert_array_equal(t["a"][2], a)
    np.testing.assert_array_equal(t["b"][2], b)
    assert t["c"][0] == "BF16" and t["c"][2].view(np.uint16).tolist() == [[0, 1, 2], [1, 1, 1]]
    bad = ShardedSafetensorsWriter(tmp_path / "bad", shard_size=1000)
    bad.add("x", "F32", (4,), lambda: [np.zeros(3, np.float32)])
    with pytest.raises(ValueError, match="expected 16"):
        bad.write()
    assert not any((tmp_path / "bad").glob("*.safetensors"))


def test_text_files_are_utf8_under_an_ascii_locale(tmp_path: Path) -> None:
    """The tokenizer's JSON holds non-ASCII byte-level symbols: written (and read back by the loader's
    tokenizer and chat template) as UTF-8 whatever the locale; under LC_ALL=C the locale's encoding
    refused it before (seen on a GPU machine's shell)."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}
    code = (
        "import sys, locale; from pathlib import Path; assert locale.getpreferredencoding() != 'UTF-8'\n"
        "from fmoe.convert.synth_tokenizer import write_tokenizer_files\n"
        "from fmoe.runtime.text.chat import ChatTemplate\n"
        "from fmoe.runtime.text.tokenizer import Tokenizer\n"
        f"d = Path({str(tmp_path)!r}); write_tokenizer_files(d, vocab_size=1000, eos_token_id=None, max_length=64)\n"
        "print(len(Tokenizer(d / 'tokenizer.json').encode('h\\u00e9llo')), ChatTemplate.from_dir(d) is not None)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[1] == "True"
    assert "\u0120" in (tmp_path / "tokenizer.json").read_text(encoding="utf-8")  # (a non-ASCII symbol: Ġ)
