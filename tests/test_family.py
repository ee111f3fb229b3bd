"""The family in 2026-11: Qwen3.6-35B-A3B (an alias and a preset), Qwen3.8-2.4T-A95B (a text-only
release: flat config, ``model.layers.*``; its preset, aliases, synth layout and a full-width slice
checked without writing gigabytes), and the config fields that would change the computation (handled
or refused, never ignored)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import assert_cli_error
from typer.testing import CliRunner

import fmoe
from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.convert.extract import extract
from fmoe.convert.hub import resolve_repo
from fmoe.convert.repack import repack
from fmoe.convert.source import LAYOUTS, SourceCheckpoint
from fmoe.convert.synth import Declared, declare, synthesize
from fmoe.convert.verify import verify
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.packed import ExpertLayout
from fmoe.presets import load_preset, preset_for_alias, preset_names, repo_aliases

BIG = "qwen3.8-2.4t-a95b"
TINY = {"preset": "tiny", "layers": 4, "experts": 6}


# ---- presets and aliases -----------------------------------------------------------------------------
def test_qwen36_is_qwen35_35b_geometry() -> None:
    q36, q35 = load_preset("qwen3.6-35b-a3b"), load_preset("qwen3.5-35b-a3b")
    assert q36["text_config"] == q35["text_config"] and q36["repo"] == "Qwen/Qwen3.6-35B-A3B"
    assert (
        TextConfig.from_dict(q36["text_config"]).fingerprint() == TextConfig.from_dict(q35["text_config"]).fingerprint()
    )


def test_qwen38_preset_is_the_release_geometry() -> None:
    doc = load_preset(BIG)
    assert doc["text_only"] is True and doc["repo"] == "Qwen/Qwen3.8-2.4T-A95B"
    c = TextConfig.from_dict(doc["text_config"], where=BIG)
    full = [L for L in range(c.num_hidden_layers) if c.is_full_attention(L)]
    assert full == list(range(3, 92, 4))  # 23 full attention layers, (i + 1) % 4 == 0
    assert (c.num_hidden_layers, c.hidden_size, c.num_experts, c.num_experts_per_tok) == (92, 8192, 512, 10)
    assert (c.moe_intermediate_size, c.shared_expert_intermediate_size, c.vocab_size) == (2048, 2048, 248320)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim) == (64, 4, 256)
    assert (c.linear_num_key_heads, c.linear_num_value_heads, c.linear_key_head_dim) == (16, 128, 128)


def test_aliases_and_their_presets() -> None:
    aliases = repo_aliases()
    assert resolve_repo("qwen3.6-35b") == "Qwen/Qwen3.6-35B-A3B"
    assert resolve_repo("qwen3.8-2.4t") == "Qwen/Qwen3.8-2.4T-A95B"
    assert resolve_repo("qwen3.8-2.4t-fp8") == "Qwen/Qwen3.8-2.4T-A95B-FP8"
    assert resolve_repo("qwen3.5-397b-fp8") == "Qwen/Qwen3.5-397B-A17B-FP8"
    for alias in aliases:  # every alias names a model a preset describes
        assert preset_for_alias(alias) in preset_names(), alias
    assert preset_for_alias("qwen3.8-2.4t-fp8") == BIG and preset_for_alias("qwen3.6-35b-fp8") == "qwen3.6-35b-a3b"
    assert {a["layout"] for a in aliases.values()} == {"official-bf16", "official-fp8", "mlx"}


def test_qwen38_sizes_by_hand() -> None:
    """The issue's figures: 28.3 MB per 4-bit expert, 1.33 TB of experts, 26 GB read per token at K=10."""
    c = TextConfig.from_dict(load_preset(BIG)["text_config"])
    # gate, up: [2048, 8192]; down: [8192, 2048]. 4 bits: 2048 x 8192 / 2 = 8,388,608 B of codes;
    # scales and biases: 2048 x 8192 / 64 x 2 B = 524,288 B each; every part 4 KiB aligned already.
    per_projection = 8_388_608 + 2 * 524_288
    assert ExpertLayout.for_config(c, 4).file_size == 3 * per_projection == 28_311_552
    assert ExpertLayout.for_config(c, 2).file_size == 3 * (4_194_304 + 2 * 524_288) == 15_728_640
    assert 92 * 512 * 28_311_552 == 1_333_587_345_408  # 1.33 TB
    assert 10 * 92 * 28_311_552 == 26_046_627_840  # 26.0 GB per token


# ---- the text-only layout at full width, declared (nothing written) -------------------------------------
def _canonical(name: str) -> str:
    return name if name == "lm_head.weight" else name.removeprefix("model.")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qwen38_full_width_slice_declared(tmp_path: Path, layout: str) -> None:
    out = tmp_path / "slice"
    d = declare(out, preset=BIG, layers=4, experts=4, layout=layout)
    assert not out.exists()  # declared only
    cfg = d.config
    assert "text_config" not in cfg and "vision_config" not in cfg
    assert cfg["architectures"] == ["Qwen3_5MoeForCausalLM"] and cfg["model_type"] == "qwen3_5_moe_text"
    assert cfg["hidden_size"] == 8192 and cfg["num_hidden_layers"] == 4 and cfg["num_experts"] == 4
    t = d.tensors()
    tc = d.text_config
    assert not any(k.startswith(("model.language_model.", "model.visual.", "language_model.model.visual")) for k in t)
    # embeddings and lm_head alone: 2 x 248320 x 8192 values (bf16, or 4-bit in the MLX layout)
    assert d.writer.total_size > (2e9 if layout == "mlx" else 8e9)
    if layout == "mlx":
        assert t["language_model.model.layers.0.mlp.switch_mlp.gate_proj.weight"] == ("U32", (4, 2048, 1024))
        assert t["language_model.model.layers.3.self_attn.q_proj.weight"] == ("U32", (32768, 1024))
        return
    shapes = dense_tensor_shapes(tc)
    found = {_canonical(k): v for k, v in t.items() if k.startswith("model.") or k == "lm_head.weight"}
    found = {k: v for k, v in found.items() if ".experts." not in k and not k.endswith("_scale_inv")}
    assert set(found) == set(shapes)
    for name, (_, shape) in found.items():
        want = shapes[name]
        assert shape == (want if not name.endswith("conv1d.weight") else (want[0], 1, want[1])), name
    assert t["mtp.fc.weight"][1] == (8192, 16384)
    if layout == "official":
        assert t["model.layers.0.mlp.experts.gate_up_proj"] == ("BF16", (4, 4096, 8192))
        assert t["model.layers.0.mlp.experts.down_proj"] == ("BF16", (4, 8192, 2048))
    elif layout == "fp8":
        assert t["model.layers.0.mlp.experts.3.down_proj.weight"] == ("F8_E4M3", (8192, 2048))
        assert t["model.layers.0.mlp.experts.3.down_proj.weight_scale_inv"] == ("F32", (64, 16))
        assert t["model.layers.3.self_attn.q_proj.weight_scale_inv"] == ("F32", (256, 64))
        assert t["model.layers.0.linear_attn.in_proj_b.weight"] == ("BF16", (128, 8192))
        assert cfg["quantization_config"]["weight_block_size"] == [128, 128]
    elif layout == "fp8-fused":
        assert t["model.layers.0.mlp.experts.gate_up_proj_scale_inv"] == ("F32", (4, 32, 64))
    else:
        assert t["model.layers.1.mlp.experts.2.up_proj.weight"] == ("BF16", (2048, 8192))


def write_sparse(folder: Path, declared: Declared) -> None:
    """The declared checkpoint with real headers and no data written: a sparse file whose weights
    read as zeros (a full-width slice of the 2.4T without gigabytes on disk)."""
    folder.mkdir()
    sizes = {"BF16": 2, "F32": 4, "F8_E4M3": 1, "U32": 4}
    header: dict[str, Any] = {}
    offset = 0
    for name, (dtype, shape) in declared.tensors().items():
        n = int(np.prod(shape)) * sizes[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        f.truncate(8 + len(blob) + offset)
    (folder / "config.json").write_text(json.dumps(declared.config))


@pytest.mark.parametrize("layout", ["official", "fp8"])
def test_qwen38_full_width_slice_opens(tmp_path: Path, layout: str) -> None:
    src = tmp_path / "src"
    write_sparse(src, declare(src, preset=BIG, layers=4, experts=4, layout=layout))
    assert os.stat(src / "model.safetensors").st_blocks * 512 < 1 << 20  # nothing was written
    with SourceCheckpoint.open(src) as s:
        assert s.layout == layout and s.config.hidden_size == 8192
        assert s.expert_origin() == ("fp8" if layout == "fp8" else "bf16")
        per_expert = 3 * 2048 * 8192
        assert s.expert_nbytes() == (2 * per_expert if layout == "official" else per_expert + 3 * 16 * 64 * 4)
        rows = s.read_dense("layers.0.linear_attn.in_proj_qkv.weight", rows=(1000, 1100))
        assert rows.shape == (100, 8192) and not rows.any()
        assert s.read_dense("layers.3.self_attn.k_norm.weight").shape == (256,)
    result = CliRunner().invoke(app, ["info", str(src), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["geometry"]["hidden_size"] == 8192 and info["layout"] == layout
    result = CliRunner().invoke(app, ["plan", str(src), "--gpu-mem", "0", "--ram", "64", "--disk-bw", "5", "--json"])
    assert result.exit_code == 0, result.output
    plan = json.loads(result.output)
    assert plan["bytes"]["expert_file"] == 28_311_552 and plan["bytes"]["experts"] == 4 * 4 * 28_311_552


# ---- the text-only layout, converted and run ---------------------------------------------------------------
def test_text_only_converts_and_runs_like_the_multimodal_release(tmp_path: Path, rng: np.random.Generator) -> None:
    seed = int(rng.integers(0, 2**31))
    packed = {}
    for name, text_only in (("text", True), ("multimodal", False)):
        synthesize(tmp_path / name, seed=seed, text_only=text_only, **TINY)
        packed[name] = tmp_path / f"{name}-packed"
        extract(tmp_path / name, packed[name], dense_bits=16)
        repack(tmp_path / name, packed[name], bits=4)
    cfg = json.loads((tmp_path / "text" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3_5MoeForCausalLM"] and "text_config" not in cfg
    with SourceCheckpoint.open(tmp_path / "text") as s:
        assert s.layout == "official" and not any(n.startswith("model.visual") for n, _ in s.shards())
    a, b = packed["text"], packed["multimodal"]
    assert (a / "model_weights.bin").read_bytes() == (b / "model_weights.bin").read_bytes()
    ma, mb = (json.loads((p / "experts-q4" / "manifest.json").read_text()) for p in (a, b))
    assert ma["files"] == mb["files"]
    assert verify(a, deep=True)["ok"]
    ids = [int(i) for i in rng.integers(0, 1000, size=5)]
    with fmoe.load(a) as ea, fmoe.load(b) as eb:
        assert np.array_equal(ea.logits(ids), eb.logits(ids))


def test_text_only_reference_model_loads(tmp_path: Path) -> None:
    """transformers reads the text-only layout with Qwen3_5MoeForCausalLM (flat config, model.layers.*)."""
    pytest.importorskip("transformers")
    from fmoe.convert.synth import load_reference_model

    synthesize(tmp_path / "t", text_only=True, **TINY)
    model = load_reference_model(tmp_path / "t")
    assert type(model).__name__ == "Qwen3_5MoeForCausalLM" and model.config.num_hidden_layers == 4


# ---- config fields that change the computation ------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("family") / "tiny"
    synthesize(out, **TINY)
    return out


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("output_gate_type", "silu", None),
        ("output_gate_type", None, None),
        ("output_gate_type", "sigmoid", ("output_gate_type = 'sigmoid'", "silu")),
        ("hidden_act", "gelu", ("hidden_act = 'gelu'",)),
        ("attention_bias", True, ("attention_bias = True",)),
        ("norm_topk_prob", True, None),
        ("norm_topk_prob", False, ("norm_topk_prob = False",)),
        ("rope_scaling", None, None),
        ("rope_scaling", {"rope_type": "yarn", "factor": 4.0}, ("rope_scaling", "'yarn'")),
        ("rope_parameters", {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e7}, ("rope_parameters", "'linear'")),
    ],
)
def test_config_fields_handled_or_refused(
    tiny_source: Path, tmp_path: Path, field: str, value: Any, words: tuple[str, ...] | None
) -> None:
    src = tmp_path / "src"
    shutil.copytree(tiny_source, src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"][field] = value
    (src / "config.json").write_text(json.dumps(cfg))
    if words is None:
        with SourceCheckpoint.open(src) as s:
            assert s.config.fingerprint() == TextConfig.from_file(tiny_source / "config.json").fingerprint()
        return
    with pytest.raises(FmoeError) as err:
        SourceCheckpoint.open(src)
    msg = str(err.value)
    assert "\n" not in msg and "config.json" in msg and all(w in msg for w in words), msg
    assert_cli_error(CliRunner().invoke(app, ["info", str(src)]), field)


def test_transformers_has_no_output_gate_type() -> None:
    """Why fmoe refuses a non-silu output_gate_type: transformers' qwen3_5_moe has no such field and
    always gates the DeltaNet output with silu, whatever the config says (the field is qwen4_exp's).
    If a later transformers reads the field, this fails and fmoe must follow it."""
    pytest.importorskip("torch")
    modeling = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    from transformers import Qwen3_5MoeTextConfig

    assert "output_gate_type" not in Qwen3_5MoeTextConfig.__dataclass_fields__
    config = Qwen3_5MoeTextConfig(
        hidden_size=64, num_hidden_layers=1, linear_num_key_heads=2, linear_num_value_heads=4,
        linear_key_head_dim=16, linear_value_head_dim=16, output_gate_type="sigmoid",
    )  # fmt: skip
    layer = modeling.Qwen3_5MoeGatedDeltaNet(config, 0)
    assert layer.norm.activation == "silu"
