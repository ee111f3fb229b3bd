"""SourceCheckpoint: layouts, canonical conventions, bounded expert reads, and clear errors."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import ml_dtypes  # noqa: F401  (lets safetensors' numpy reader return bf16)
import numpy as np
import pytest
from safetensors import safe_open
from safetensors.numpy import save_file

from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.quant import QuantTensor, quantize
from fmoe.formats.safetensors_io import SafetensorsFile

LAYOUTS = ("official", "official-per-expert", "mlx")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sources")
    out = {}
    for layout in LAYOUTS:
        synthesize(root / layout, preset="tiny", layers=4, experts=6, seed=3, layout=layout)
        out[layout] = root / layout
    synthesize(root / "sharded", preset="tiny", layers=4, experts=6, seed=3, shard_size="200KB")
    out["sharded"] = root / "sharded"
    return out


def raw_tensor(folder: Path, key: str) -> np.ndarray:
    """A source tensor read with the safetensors library (the independent reference)."""
    index = folder / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
    with safe_open(folder / fname, framework="numpy") as f:
        return f.get_tensor(key)


def f32(a: np.ndarray) -> np.ndarray:
    return a.astype(np.float32)


@pytest.mark.parametrize("name", [*LAYOUTS, "sharded"])
def test_open_each_layout(sources: dict[str, Path], name: str) -> None:
    with SourceCheckpoint.open(sources[name]) as src:
        assert src.layout == ("official" if name == "sharded" else name)
        assert src.dense_names() == list(dense_tensor_shapes(src.config))
        assert (src.config.num_hidden_layers, src.config.num_experts) == (4, 6)
        assert src.expert_bits() == (4 if name == "mlx" else None)
        files = [p for p in sources[name].glob("*.safetensors")]
        assert src.total_bytes() == sum(p.stat().st_size for p in files)
        d = src.describe()
        assert d["layout"] == src.layout and d["model_fingerprint"] == src.config.fingerprint()
        assert d["bytes"] == src.total_bytes() and len(d["shards"]) == len(files)
        if name == "sharded":
            assert len(files) > 2


def test_dense_conventions_official(sources: dict[str, Path]) -> None:
    folder = sources["official"]
    with SourceCheckpoint.open(folder) as src:
        p = "model.language_model."
        # zero-centred norms come out as the effective scale 1 + w, the DeltaNet norm as is
        for name in ("norm.weight", "layers.0.input_layernorm.weight", "layers.3.self_attn.q_norm.weight"):
            np.testing.assert_array_equal(src.read_dense(name), f32(raw_tensor(folder, p + name)) + 1)
        np.testing.assert_array_equal(
            src.read_dense("layers.0.linear_attn.norm.weight"),
            f32(raw_tensor(folder, p + "layers.0.linear_attn.norm.weight")),
        )
        conv = src.read_dense("layers.0.linear_attn.conv1d.weight")
        raw = f32(raw_tensor(folder, p + "layers.0.linear_attn.conv1d.weight"))
        assert raw.shape[1] == 1 and conv.shape == (raw.shape[0], raw.shape[2])
        np.testing.assert_array_equal(conv, raw[:, 0, :])
        a_log = src.read_dense("layers.0.linear_attn.A_log")
        assert a_log.dtype == np.float32
        np.testing.assert_array_equal(a_log, raw_tensor(folder, p + "layers.0.linear_attn.A_log"))
        lm = src.read_dense("lm_head.weight", rows=(5, 9))
        np.testing.assert_array_equal(lm, f32(raw_tensor(folder, "lm_head.weight")[5:9]))


def test_dense_conventions_mlx(sources: dict[str, Path]) -> None:
    folder = sources["mlx"]
    with SourceCheckpoint.open(folder) as mlx, SourceCheckpoint.open(sources["official"]) as off:
        p = "language_model.model."
        # MLX already stores 1 + w: read as is, equal to the official 1 + w up to bf16 rounding
        norm = mlx.read_dense("layers.1.post_attention_layernorm.weight")
        np.testing.assert_array_equal(norm, f32(raw_tensor(folder, p + "layers.1.post_attention_layernorm.weight")))
        np.testing.assert_allclose(norm, off.read_dense("layers.1.post_attention_layernorm.weight"), rtol=2**-8)
        conv = mlx.read_dense("layers.0.linear_attn.conv1d.weight")
        np.testing.assert_array_equal(conv, off.read_dense("layers.0.linear_attn.conv1d.weight"))
        q = mlx.read_dense("layers.0.linear_attn.in_proj_qkv.weight")
        assert isinstance(q, QuantTensor) and q.bits == 4
        assert mlx.dense_bits("layers.0.mlp.gate.weight") == 8
        np.testing.assert_array_equal(q.weight, raw_tensor(folder, p + "layers.0.linear_attn.in_proj_qkv.weight"))


def test_experts_agree_across_layouts(sources: dict[str, Path]) -> None:
    with (
        SourceCheckpoint.open(sources["official"]) as fused,
        SourceCheckpoint.open(sources["official-per-expert"]) as per,
        SourceCheckpoint.open(sources["mlx"]) as mlx,
    ):
        cfg = fused.config
        I, H = cfg.moe_intermediate_size, cfg.hidden_size
        raw_gu = raw_tensor(sources["official"], "model.language_model.layers.2.mlp.experts.gate_up_proj")
        for layer, e in ((0, 0), (2, 5), (3, 1)):
            a, b, m = fused.read_expert(layer, e), per.read_expert(layer, e), mlx.read_expert(layer, e)
            assert a["gate_proj"].shape == (I, H) and a["down_proj"].shape == (H, I)
            for proj in a:
                np.testing.assert_array_equal(a[proj], b[proj])
                ref = quantize(a[proj], 4)  # synth's MLX layout quantises exactly these bf16 values
                for part in ("weight", "scales", "biases"):
                    np.testing.assert_array_equal(getattr(m[proj], part), getattr(ref, part))
            if layer == 2:
                np.testing.assert_array_equal(a["gate_proj"], f32(raw_gu[e, :I]))
                np.testing.assert_array_equal(a["up_proj"], f32(raw_gu[e, I:]))


def test_read_expert_reads_only_its_slice(sources: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    read: list[int] = []
    original = SafetensorsFile._read

    def counting(self, info, offset, nbytes, shape):  # type: ignore[no-untyped-def]
        read.append(nbytes)
        return original(self, info, offset, nbytes, shape)

    monkeypatch.setattr(SafetensorsFile, "_read", counting)
    for layout in ("official", "mlx"):
        with SourceCheckpoint.open(sources[layout]) as src:
            read.clear()
            src.read_expert(1, 4)
            assert sum(read) == src.expert_nbytes()
            assert src.expert_nbytes() * src.config.num_experts < src.total_bytes()


# ---- errors -----------------------------------------------------------------------------------------
def copy_source(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "src"
    shutil.copytree(src, dst)
    return dst


def expect_error(path: Path, *words: str) -> str:
    with pytest.raises(FmoeError) as err:
        SourceCheckpoint.open(path)
    msg = str(err.value)
    assert "\n" not in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_error_not_a_directory_or_no_config(tmp_path: Path) -> None:
    expect_error(tmp_path / "missing", "not a directory")
    (tmp_path / "empty").mkdir()
    expect_error(tmp_path / "empty", "no config.json")


def test_error_unknown_model_type(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["official"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"] = cfg["text_config"]["model_type"] = "llama"
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, "unsupported model_type", "llama")


def test_error_missing_shard(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["sharded"], tmp_path)
    weight_map = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    shard = weight_map["model.language_model.layers.1.mlp.experts.down_proj"]
    (src / shard).unlink()
    expect_error(src, "missing shard", shard)


def test_error_bad_and_truncated_header(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["official"], tmp_path)
    st = src / "model.safetensors"
    data = bytearray(st.read_bytes())
    st.write_bytes(struct.pack("<Q", 1 << 40) + data[8:])
    expect_error(src, "not a valid safetensors file")
    data[8] = ord("X")  # the header's opening brace
    st.write_bytes(data)
    expect_error(src, "header is not JSON")
    data[8] = ord("{")
    st.write_bytes(bytes(data[: len(data) - 1000]))  # cut the data short
    expect_error(src, "truncated")


def test_error_shape_mismatch(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["official"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["moe_intermediate_size"] *= 2
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, "experts.gate_up_proj", "has shape")


def test_error_no_experts_and_fp8(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["official"], tmp_path)
    with safe_open(src / "model.safetensors", framework="numpy") as f:
        kept = {k: f.get_tensor(k) for k in f.keys() if ".experts." not in k}  # noqa: SIM118
    save_file(kept, str(src / "model.safetensors"))
    expect_error(src, "no routed-expert tensors")
    src = copy_source(sources["official"], tmp_path / "scaled")
    with safe_open(src / "model.safetensors", framework="numpy") as f:
        kept = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    kept["model.language_model.layers.0.linear_attn.in_proj_qkv.weight_scale_inv"] = np.ones((1, 1), np.float32)
    save_file(kept, str(src / "model.safetensors"))  # a scale on a bf16 weight (tests/test_fp8.py: the FP8 reader)
    expect_error(src, "in_proj_qkv.weight", "is BF16 but has an FP8 block scale")


def test_error_mlx_quantization_disagrees_with_config(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["mlx"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization"]["language_model.model.layers.0.mlp.gate"] = {"group_size": 64, "bits": 4}
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, "layers.0.mlp.gate", "8 bits", "config.json quantization says 4")


def test_error_zero_size_in_config(sources: dict[str, Path], tmp_path: Path) -> None:
    src = copy_source(sources["official"], tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["num_key_value_heads"] = 0  # was a ZeroDivisionError traceback
    (src / "config.json").write_text(json.dumps(cfg))
    expect_error(src, "num_key_value_heads = 0", ">= 1")
