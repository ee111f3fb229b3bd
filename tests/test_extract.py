"""`fmoe extract`: model_weights.bin/.json per docs/FORMAT.md, conventions, quantisation error,
MLX pass-through, re-runs and refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import ml_dtypes  # noqa: F401  (lets safetensors' numpy reader return bf16)
import numpy as np
import pytest
import xxhash
from safetensors import safe_open
from support import LAYOUT_VARIANTS, assert_cli_error, synth_sources
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert.extract import extract
from fmoe.convert.synth import synthesize
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.packed import read_identity
from fmoe.formats.quant import bf16_to_f32, dequantize

TINY = {"preset": "tiny", "layers": 4, "experts": 4, "seed": 11}
NORM1P = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    variants = {**LAYOUT_VARIANTS, "sharded": {"shard_size": "150KB"}}
    return synth_sources(tmp_path_factory.mktemp("extract-src"), variants, **TINY)


# ---- helpers ------------------------------------------------------------------------------------------
def tree_hashes(folder: Path) -> dict[str, tuple[str, float]]:
    return {
        str(p.relative_to(folder)): (xxhash.xxh3_128_hexdigest(p.read_bytes()), p.stat().st_mtime)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def source_tensor(folder: Path, key: str) -> np.ndarray:
    index = folder / "model.safetensors.index.json"
    fname = json.loads(index.read_text())["weight_map"][key] if index.exists() else "model.safetensors"
    with safe_open(folder / fname, framework="numpy") as f:
        return f.get_tensor(key)


def load_packed(packed: Path) -> tuple[dict[str, Any], bytes]:
    return json.loads((packed / "model_weights.json").read_text()), (packed / "model_weights.bin").read_bytes()


def part(blob: bytes, p: dict[str, Any]) -> np.ndarray:
    dtype = {"bf16": np.uint16, "float32": np.float32, "uint32": np.uint32}[p["dtype"]]
    return np.frombuffer(blob, dtype, count=int(np.prod(p["shape"])), offset=p["offset"]).reshape(p["shape"])


def decode(entry: dict[str, Any], blob: bytes) -> np.ndarray:
    parts = {k: part(blob, v) for k, v in entry["parts"].items()}
    if entry["kind"] == "affine":
        return dequantize(parts["weight"], parts["scales"], parts["biases"], entry["bits"], entry["group_size"])
    data = parts["data"]
    return bf16_to_f32(data) if entry["parts"]["data"]["dtype"] == "bf16" else data


def run_cli(*args: str) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def check_structure(packed: Path, doc: dict[str, Any], blob: bytes) -> None:
    """Manifest and file agree with docs/FORMAT.md: names, alignment, hashes, identity."""
    ident, cfg = read_identity(packed)
    assert doc["format"] == "fmoe-dense" and doc["version"] == 1
    assert doc["model_fingerprint"] == ident["model_fingerprint"] == cfg.fingerprint()
    assert doc["file_size"] == len(blob) and doc["file_xxh3_128"] == xxhash.xxh3_128_hexdigest(blob)
    expected = dense_tensor_shapes(cfg)
    assert set(doc["tensors"]) == set(expected)
    for name, entry in doc["tensors"].items():
        assert tuple(entry["shape"]) == expected[name]
        h = xxhash.xxh3_128()
        for p in entry["parts"].values():
            assert p["offset"] % 64 == 0 and p["offset"] + p["size"] <= len(blob)
            h.update(blob[p["offset"] : p["offset"] + p["size"]])
        assert h.hexdigest() == entry["xxh3_128"], name


# ---- content -------------------------------------------------------------------------------------------
def test_extract_bf16_exact_and_conventions(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["official"]
    before = tree_hashes(src)
    report = extract(src, tmp_path / "p", dense_bits=16)
    packed = tmp_path / "p"
    doc, blob = load_packed(packed)
    check_structure(packed, doc, blob)
    assert report["tensors"] == len(doc["tensors"]) and report["bytes"] == len(blob) and not report["skipped"]
    for name, entry in doc["tensors"].items():
        key = name if name == "lm_head.weight" else "model.language_model." + name
        raw = source_tensor(src, key)
        if name.endswith("conv1d.weight"):
            assert entry["parts"]["data"]["dtype"] == "float32" and len(entry["shape"]) == 2
            np.testing.assert_array_equal(decode(entry, blob), raw.astype(np.float32)[:, 0, :])
        elif len(entry["shape"]) == 1:
            assert entry["parts"]["data"]["dtype"] == "float32"
            want = raw.astype(np.float32) + (1 if name.endswith(NORM1P) or name == "norm.weight" else 0)
            np.testing.assert_array_equal(decode(entry, blob), want)
        else:  # matrices: the source's bf16 bit patterns, untouched
            assert entry["kind"] == "float" and entry["parts"]["data"]["dtype"] == "bf16"
            np.testing.assert_array_equal(part(blob, entry["parts"]["data"]), raw.view(np.uint16))
    # tokenizer, template, generation config: byte for byte; the source is untouched
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        assert (packed / f).read_bytes() == (src / f).read_bytes()
    assert tree_hashes(src) == before


@pytest.mark.parametrize(("bits", "bound"), [(8, 0.01), (4, 0.12)])
def test_extract_quantised_error(sources: dict[str, Path], tmp_path: Path, bits: int, bound: float) -> None:
    src = sources["official"]
    extract(src, tmp_path / "p", dense_bits=bits)
    doc, blob = load_packed(tmp_path / "p")
    check_structure(tmp_path / "p", doc, blob)
    assert doc["dense_bits"] == bits
    n_affine = 0
    for name, entry in doc["tensors"].items():
        if len(entry["shape"]) != 2 or name.endswith("conv1d.weight"):
            continue
        assert entry["kind"] == "affine" and entry["group_size"] == 64
        router = name.endswith(("mlp.gate.weight", "mlp.shared_expert_gate.weight"))
        assert entry["bits"] == (max(bits, 8) if router else bits)
        key = name if name == "lm_head.weight" else "model.language_model." + name
        w = source_tensor(src, key).astype(np.float64)
        got = decode(entry, blob).astype(np.float64)
        rel = np.sqrt(np.mean((got - w) ** 2) / np.mean(w**2))
        assert rel < (0.01 if router else bound), (name, rel)
        # per element: at most half a step of the group's grid (plus bf16 rounding of scale and bias)
        g = w.reshape(w.shape[0], -1, 64)
        lo, hi = g.min(-1, keepdims=True), g.max(-1, keepdims=True)
        step = (hi - lo) / (2 ** entry["bits"] - 1)
        slack = 2**-8 * (np.abs(lo) + np.abs(hi)) + 1e-7
        assert np.all(np.abs(got.reshape(g.shape) - g) <= step / 2 + slack), name
        n_affine += 1
    assert n_affine > 10


def test_extract_layouts_agree(sources: dict[str, Path], tmp_path: Path) -> None:
    """Fused, per-expert and sharded copies of one model give the same bytes (experts do not matter)."""
    digests = set()
    for layout in ("official", "official-per-expert", "sharded"):
        report = extract(sources[layout], tmp_path / layout, dense_bits=4)
        doc, _ = load_packed(tmp_path / layout)
        digests.add(doc["file_xxh3_128"])
        assert report["tensors"] == len(doc["tensors"])
    assert len(digests) == 1


def test_extract_mlx_passthrough(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mlx"]
    before = tree_hashes(src)
    extract(src, tmp_path / "p", dense_bits=4)
    doc, blob = load_packed(tmp_path / "p")
    check_structure(tmp_path / "p", doc, blob)
    copied = 0
    for name, entry in doc["tensors"].items():
        key = "language_model.lm_head.weight" if name == "lm_head.weight" else "language_model.model." + name
        if entry["kind"] == "affine":  # weight, scales, biases: the source's bytes
            base = key.removesuffix(".weight")
            for p, suffix in (("weight", ".weight"), ("scales", ".scales"), ("biases", ".biases")):
                raw = source_tensor(src, base + suffix)
                assert part(blob, entry["parts"][p]).tobytes() == raw.tobytes(), (name, p)
            copied += 1
        elif name.endswith("conv1d.weight"):
            np.testing.assert_array_equal(decode(entry, blob), source_tensor(src, key).astype(np.float32)[..., 0])
        else:  # norms already hold 1 + w in MLX: stored as read
            np.testing.assert_array_equal(decode(entry, blob), source_tensor(src, key).astype(np.float32))
    assert copied == sum(1 for s in doc["tensors"].values() if len(s["shape"]) == 2) - sum(
        1 for n in doc["tensors"] if n.endswith("conv1d.weight")
    )
    assert tree_hashes(src) == before


def test_extract_mlx_requantise_and_refuse_16(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mlx"]
    extract(src, tmp_path / "p", dense_bits=8)
    doc, blob = load_packed(tmp_path / "p")
    entry = doc["tensors"]["layers.0.linear_attn.in_proj_qkv.weight"]
    assert entry["bits"] == 8
    base = "language_model.model.layers.0.linear_attn.in_proj_qkv"
    w4 = dequantize(
        *(
            source_tensor(src, base + s).view(np.uint32 if s == ".weight" else np.uint16)
            for s in (".weight", ".scales", ".biases")
        ),
        4,
    )
    err = decode(entry, blob) - w4
    assert np.sqrt(np.mean(err**2) / np.mean(w4**2)) < 0.01
    router = doc["tensors"]["layers.0.mlp.gate.weight"]  # 8-bit in the source: copied
    raw = source_tensor(src, "language_model.model.layers.0.mlp.gate.weight")
    assert part(blob, router["parts"]["weight"]).tobytes() == raw.tobytes()

    result = run_cli("extract", src, "--out", tmp_path / "q", "--dense-bits", "16")
    assert result.exit_code != 0
    assert "cannot be recovered" in result.output and len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "cannot be recovered")


# ---- re-runs and output rules -------------------------------------------------------------------------
def test_rerun_skips_then_rewrites_on_new_bits(sources: dict[str, Path], tmp_path: Path) -> None:
    src, out = sources["official"], tmp_path / "p"
    extract(src, out, dense_bits=4)
    first = tree_hashes(out)
    again = extract(src, out, dense_bits=4)
    assert again["skipped"]
    assert tree_hashes(out)["model_weights.bin"] == first["model_weights.bin"]  # not rewritten (same mtime)
    third = extract(src, out, dense_bits=8)
    assert not third["skipped"]
    doc, blob = load_packed(out)
    assert doc["dense_bits"] == 8 and doc["file_size"] == len(blob)
    # a manifest whose .bin was swapped underneath it (size differs) is not trusted
    (out / "model_weights.bin").write_bytes(b"x" * 10)
    assert not extract(src, out, dense_bits=8)["skipped"]


def test_rerun_rewrites_a_damaged_bin_and_clears_temp_files(
    sources: dict[str, Path], tmp_path: Path, rng: np.random.Generator
) -> None:
    src, out = sources["official"], tmp_path / "p"
    extract(src, out, dense_bits=4)
    _, blob = load_packed(out)
    data = bytearray(blob)
    data[int(rng.integers(len(data)))] ^= 0x10  # same size, one bit off
    (out / "model_weights.bin").write_bytes(data)
    (out / ".model_weights.bin.k3j2h1.tmp").write_bytes(b"half")  # what a killed run leaves
    assert not extract(src, out, dense_bits=4)["skipped"]
    assert (out / "model_weights.bin").read_bytes() == blob
    assert not list(out.glob(".*.tmp"))


def test_refuses_out_inside_the_source(sources: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sources["official"], src)
    before = tree_hashes(src)
    for args in (("extract", src), ("repack", src, "--bits", "4")):
        result = run_cli(*args, "--out", src / "packed")
        assert result.exit_code != 0 and "inside it" in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert_cli_error(result, "inside it")
    assert tree_hashes(src) == before


def test_chat_template_from_tokenizer_config(sources: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sources["official"], src)
    template = (src / "chat_template.jinja").read_text()
    (src / "chat_template.jinja").unlink()
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    cfg["chat_template"] = template
    (src / "tokenizer_config.json").write_text(json.dumps(cfg))
    extract(src, tmp_path / "p", dense_bits=4)
    assert (tmp_path / "p" / "chat_template.jinja").read_text() == template


def test_default_out_and_cli(sources: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "model"
    shutil.copytree(sources["official"], src)
    result = run_cli("extract", src, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert Path(report["path"]) == tmp_path / "model-packed"
    assert (tmp_path / "model-packed" / "model_weights.json").is_file()


def test_refuses_foreign_output(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["official"]
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    result = run_cli("extract", src, "--out", other)
    assert result.exit_code != 0 and "not empty" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "not empty")
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]

    synthesize(tmp_path / "small", preset="tiny", layers=2, experts=4)  # another geometry
    extract(tmp_path / "small", tmp_path / "packed-small", dense_bits=4)
    result = run_cli("extract", src, "--out", tmp_path / "packed-small")
    assert result.exit_code != 0 and "another model" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "another model")

    result = run_cli("extract", src, "--out", tmp_path / "x", "--dense-bits", "5")
    assert result.exit_code != 0 and "--dense-bits" in result.output
    assert_cli_error(result, "--dense-bits")
    assert not (tmp_path / "x").exists()


def test_bad_source_is_one_line(sources: dict[str, Path], tmp_path: Path) -> None:
    src = tmp_path / "src"
    shutil.copytree(sources["official"], src)
    data = bytearray((src / "model.safetensors").read_bytes())
    data[8] = ord("#")
    (src / "model.safetensors").write_bytes(data)
    result = run_cli("extract", src, "--out", tmp_path / "p")
    assert result.exit_code != 0 and "safetensors" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "safetensors")
    assert not (tmp_path / "p").exists()


def test_unwritable_out_is_one_line(sources: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    result = run_cli("extract", sources["official"], "--out", tmp_path / "a-file" / "p")
    assert result.exit_code == 1 and "Not a directory" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "Not a directory")
