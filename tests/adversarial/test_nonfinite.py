"""Non-finite weights: NaN/Inf anywhere in a source (dense tensors, experts, quantised scales) is
refused by name with a one-line error, leaving no artifact; --allow-nonfinite converts it and the
manifest records where; a later run without the switch never keeps those artifacts silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import assert_cli_error, fresh_seed
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert.extract import extract
from fmoe.convert.nonfinite import count_nonfinite, describe_nonfinite
from fmoe.convert.repack import repack
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, f32_to_bf16
from fmoe.formats.safetensors_io import SafetensorsFile

TINY = {"preset": "tiny", "layers": 2, "experts": 4}
PREFIX = "model.language_model."
BAD_VALUES = {"nan": np.float32(np.nan), "inf": np.float32(np.inf), "-inf": np.float32(-np.inf)}


@pytest.fixture(scope="module")
def clean(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("nonfinite")
    seed = fresh_seed("test_nonfinite clean")
    synthesize(root / "official", seed=seed, **TINY)
    synthesize(root / "mlx", seed=seed, layout="mlx", **TINY)
    return {"official": root / "official", "mlx": root / "mlx"}


def run_cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def poke(checkpoint: Path, key: str, index: tuple[int, ...], value: np.float32) -> None:
    """Write ``value`` into element ``index`` of tensor ``key`` of a (copied) checkpoint, in place."""
    shard = checkpoint / "model.safetensors"
    info = SafetensorsFile(shard).tensors[key]
    flat = int(np.ravel_multi_index(index, info.shape))
    if info.dtype == "BF16":
        raw = f32_to_bf16(np.array([value], np.float32)).tobytes()
    else:
        assert info.dtype == "F32", info.dtype
        raw = np.array([value], np.float32).tobytes()
    with open(shard, "r+b") as f:
        f.seek(info.start + flat * len(raw))
        f.write(raw)


def damaged(clean: Path, tmp_path: Path, key: str, index: tuple[int, ...], value: np.float32) -> Path:
    src = tmp_path / "src"
    shutil.copytree(clean, src)
    poke(src, key, index, value)
    return src


def no_leftovers(out: Path) -> None:
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))


# ---- the counting helpers ------------------------------------------------------------------------
def test_count_and_describe(rng: np.random.Generator) -> None:
    w = rng.normal(size=(8, 64)).astype(np.float32)
    assert count_nonfinite(w) == 0
    spots = rng.choice(w.size, 5, replace=False)
    w.flat[spots[:3]] = np.nan
    w.flat[spots[3:]] = [np.inf, -np.inf]
    assert count_nonfinite(w) == 5 and describe_nonfinite(w) == "3 NaN and 2 infinite values"
    scales = f32_to_bf16(np.abs(rng.normal(size=(8, 1))).astype(np.float32))
    qt = QuantTensor(np.zeros((8, 8), np.uint32), scales.copy(), scales.copy(), 4, 64)
    assert count_nonfinite(qt) == 0
    qt.scales[2, 0] = 0x7FC0  # bf16 NaN
    qt.biases[5, 0] = 0xFF80  # bf16 -inf
    assert count_nonfinite(qt) == 2 and "in its scales/biases" in describe_nonfinite(qt)


# ---- extract -----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("key", "shape", "canonical"),
    [
        ("layers.1.linear_attn.in_proj_qkv.weight", (256, 128), "layers.1.linear_attn.in_proj_qkv.weight"),
        ("layers.0.linear_attn.A_log", (4,), "layers.0.linear_attn.A_log"),  # F32, a 1-D tensor
        ("embed_tokens.weight", (1001, 128), "embed_tokens.weight"),
    ],
)
def test_extract_refuses_naming_the_tensor(
    clean: dict[str, Path], tmp_path: Path, rng: np.random.Generator, key: str, shape: tuple[int, ...], canonical: str
) -> None:
    index = tuple(int(rng.integers(n)) for n in shape)
    value = BAD_VALUES[str(rng.choice(list(BAD_VALUES)))]
    src = damaged(clean["official"], tmp_path, PREFIX + key, index, value)
    out = tmp_path / "p"
    result = run_cli("extract", src, "--out", out)
    assert_cli_error(result, canonical, "--allow-nonfinite", str(src))
    assert not (out / "model_weights.json").exists() and not (out / "model_weights.bin").exists()
    no_leftovers(out)

    result = run_cli("extract", src, "--out", out, "--allow-nonfinite", "--json")
    assert result.exit_code == 0, result.output
    assert "NaN/Inf" in result.stderr and json.loads(result.stdout)["nonfinite"] == {canonical: 1}
    doc = json.loads((out / "model_weights.json").read_text())
    assert doc["nonfinite"] == {"allowed": True, "found": {canonical: 1}}

    # a re-run without the switch does not keep them silently
    result = run_cli("extract", src, "--out", out)
    assert_cli_error(result, canonical)
    assert not (out / "model_weights.json").exists()


def test_clean_extract_records_nothing_and_skips(clean: dict[str, Path], tmp_path: Path) -> None:
    out = tmp_path / "p"
    extract(clean["official"], out)
    doc = json.loads((out / "model_weights.json").read_text())
    assert doc["nonfinite"] == {"allowed": False, "found": {}}
    assert extract(clean["official"], out)["skipped"]
    assert extract(clean["official"], out, allow_nonfinite=True)["skipped"]  # nothing to allow: still whole


def test_extract_quantising_huge_weights_is_refused(clean: dict[str, Path], tmp_path: Path) -> None:
    """Finite but huge weights overflow the group's scale (max - min beyond float32): named too."""
    src = tmp_path / "src"
    shutil.copytree(clean["official"], src)
    key = PREFIX + "layers.1.linear_attn.out_proj.weight"
    poke(src, key, (3, 0), np.float32(3e38))
    poke(src, key, (3, 1), np.float32(-3e38))
    with pytest.raises(FmoeError, match=r"out_proj\.weight.*beyond the bf16 range"):
        extract(src, tmp_path / "p", dense_bits=4)
    no_leftovers(tmp_path / "p")


# ---- repack ------------------------------------------------------------------------------------
def test_repack_refuses_naming_layer_expert_projection(
    clean: dict[str, Path], tmp_path: Path, rng: np.random.Generator
) -> None:
    layer, expert = int(rng.integers(2)), int(rng.integers(4))
    fused = str(rng.choice(["gate_up_proj", "down_proj"]))
    rows, cols = (128, 128) if fused == "gate_up_proj" else (128, 64)
    row, col = int(rng.integers(rows)), int(rng.integers(cols))
    proj = "down_proj" if fused == "down_proj" else ("gate_proj" if row < 64 else "up_proj")
    key = f"{PREFIX}layers.{layer}.mlp.experts.{fused}"
    src = damaged(clean["official"], tmp_path, key, (expert, row, col), BAD_VALUES["nan"])
    out = tmp_path / "p"
    for bits in ("4", "2"):
        result = run_cli("repack", src, "--out", out, "--bits", bits, "--workers", "2")
        assert_cli_error(result, f"layer {layer} expert {expert} {proj}", "1 NaN", "--allow-nonfinite")
        assert not (out / f"experts-q{bits}" / "manifest.json").exists()
        no_leftovers(out)

    result = run_cli("repack", src, "--out", out, "--bits", "4", "--allow-nonfinite", "--json")
    assert result.exit_code == 0, result.output
    rel = f"layer_{layer:03d}/expert_{expert:04d}.bin"
    doc = json.loads((out / "experts-q4" / "manifest.json").read_text())
    assert doc["nonfinite"] == {"allowed": True, "found": {rel: {proj: 1}}}
    assert json.loads(result.stdout)["nonfinite"] == {rel: {proj: 1}}
    json.loads((out / "experts-q4" / "manifest.json").read_text(), parse_constant=pytest.fail)  # no NaN in JSON

    # without the switch: neither kept as finished nor requantised to 2 bits
    assert_cli_error(run_cli("repack", src, "--out", out, "--bits", "4"), f"layer {layer} expert {expert}")
    result = run_cli("repack", src, "--out", out, "--bits", "4", "--allow-nonfinite")
    assert result.exit_code == 0, result.output
    assert_cli_error(run_cli("repack", out, "--bits", "2"), f"layer {layer} expert {expert} {proj}", "scales/biases")


def test_resumed_log_keeps_the_nonfinite_record(clean: dict[str, Path], tmp_path: Path) -> None:
    """Allowed files finished before an interruption are still listed once the run completes."""
    src = damaged(clean["official"], tmp_path, PREFIX + "layers.0.mlp.experts.down_proj", (0, 5, 7), np.float32(np.inf))
    out = tmp_path / "p"
    repack(src, out, bits=4, workers=1, allow_nonfinite=True)
    d = out / "experts-q4"
    doc = json.loads((d / "manifest.json").read_text())
    assert doc["nonfinite"]["found"] == {"layer_000/expert_0000.bin": {"down_proj": 1}}
    # turn the finished set back into an interrupted one: manifest gone, log of every file kept
    report = repack(src, out, bits=4, workers=1, allow_nonfinite=True, overwrite=True)
    assert report["written"] == 8
    (d / "manifest.json").unlink()
    with open(d / ".progress.jsonl", "w") as f:
        for rel, e in sorted(doc["files"].items()):
            extra = {"nonfinite": doc["nonfinite"]["found"][rel]} if rel in doc["nonfinite"]["found"] else {}
            source = doc["source_identity"]["digest"]
            f.write(json.dumps({"file": rel, **e, **extra, "from": "bf16", "source": source}) + "\n")
    report = repack(src, out, bits=4, workers=1, allow_nonfinite=True)
    assert report["written"] == 0
    assert json.loads((d / "manifest.json").read_text())["nonfinite"] == doc["nonfinite"]


def test_mlx_scales_nan_is_refused(clean: dict[str, Path], tmp_path: Path, rng: np.random.Generator) -> None:
    """Quantised inputs: their bf16 scales are checked (the pass-through copy and the requantisation)."""
    layer, expert = int(rng.integers(2)), int(rng.integers(4))
    key = f"language_model.model.layers.{layer}.mlp.switch_mlp.up_proj.scales"
    src = damaged(
        clean["mlx"], tmp_path, key, (expert, int(rng.integers(64)), int(rng.integers(2))), np.float32(np.nan)
    )
    for bits in ("4", "2"):
        result = run_cli("repack", src, "--out", tmp_path / "p", "--bits", bits)
        assert_cli_error(result, f"layer {layer} expert {expert} up_proj", "scales/biases")
    dense_key = "language_model.model.layers.1.linear_attn.out_proj.biases"
    src2 = damaged(clean["mlx"], tmp_path / "d", dense_key, (7, 1), np.float32(-np.inf))
    assert_cli_error(run_cli("extract", src2, "--out", tmp_path / "p2"), "layers.1.linear_attn.out_proj.weight")
