"""`fmoe repack`: expert files per docs/FORMAT.md, exactness, pass-through, 2-bit, resume, refusals."""

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
from fmoe.convert import repack as repack_mod
from fmoe.convert.extract import extract
from fmoe.convert.repack import repack
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.synth import synthesize
from fmoe.errors import CorruptionError
from fmoe.formats.packed import ExpertLayout, read_identity
from fmoe.formats.quant import quantize

TINY = {"preset": "tiny", "layers": 3, "experts": 5, "seed": 5}


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    variants = {**LAYOUT_VARIANTS, "grid": {"on_grid": True}, "sharded": {"shard_size": "100KB"}}
    return synth_sources(tmp_path_factory.mktemp("repack-src"), variants, **TINY)


@pytest.fixture(scope="module")
def packed4(sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed4") / "p"
    repack(sources["official"], out, bits=4, workers=2)
    return out


# ---- helpers ------------------------------------------------------------------------------------------
def tree_state(folder: Path) -> dict[str, tuple[str, int]]:
    return {
        str(p.relative_to(folder)): (xxhash.xxh3_128_hexdigest(p.read_bytes()), p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def manifest(packed: Path, bits: int) -> dict[str, Any]:
    return json.loads((packed / f"experts-q{bits}" / "manifest.json").read_text())


def check_files(packed: Path, bits: int) -> dict[str, Any]:
    """Every file listed, with its size and xxh3_128; layout per docs/FORMAT.md."""
    doc = manifest(packed, bits)
    _, cfg = read_identity(packed)
    layout = ExpertLayout.for_config(cfg, bits)
    assert doc["format"] == "fmoe-experts" and doc["version"] == 1 and doc["bits"] == bits
    assert doc["model_fingerprint"] == cfg.fingerprint() and doc["group_size"] == 64
    assert doc["file_size"] == layout.file_size and doc["file_size"] % 4096 == 0
    assert doc["components"] == layout.to_dict()["components"]
    assert all(c["offset"] % 4096 == 0 for c in doc["components"].values())
    assert len(doc["files"]) == cfg.num_hidden_layers * cfg.num_experts == doc["num_layers"] * doc["num_experts"]
    for rel, entry in doc["files"].items():
        data = (packed / f"experts-q{bits}" / rel).read_bytes()
        assert len(data) == entry["size"] == layout.file_size
        assert xxhash.xxh3_128_hexdigest(data) == entry["xxh3_128"]
    d = packed / f"experts-q{bits}"
    assert not (d / ".progress.jsonl").exists() and not list(d.rglob("*.tmp"))
    return doc


def read_packed(packed: Path, bits: int, layer: int, expert: int) -> dict[str, Any]:
    _, cfg = read_identity(packed)
    data = (packed / f"experts-q{bits}" / f"layer_{layer:03d}" / f"expert_{expert:04d}.bin").read_bytes()
    return ExpertLayout.for_config(cfg, bits).decode(data)


def run_cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


# ---- content ------------------------------------------------------------------------------------------
def test_repack4_from_bf16(sources: dict[str, Path], packed4: Path) -> None:
    doc = check_files(packed4, 4)
    q = doc["quantization"]
    assert (q["method"], q["from"]) == ("minmax", "bf16")
    assert 0 < q["error"]["clip-search"]["rel_rms"] <= q["error"]["minmax"]["rel_rms"] < 0.12
    with SourceCheckpoint.open(sources["official"]) as src:
        for layer, e in ((0, 0), (2, 4), (1, 3)):
            got = read_packed(packed4, 4, layer, e)
            source = src.read_expert(layer, e)
            assert set(source) == set(got) == {"gate_proj", "up_proj", "down_proj"}  # the loop sees all three
            for proj, w in source.items():
                want = quantize(w, 4)
                for part in ("weight", "scales", "biases"):
                    np.testing.assert_array_equal(getattr(got[proj], part), getattr(want, part))
                # independent bound: half a grid step per element (float64 reference)
                err = np.abs(got[proj].dequantize().astype(np.float64) - w)
                g = w.astype(np.float64).reshape(w.shape[0], -1, 64)
                step = (g.max(-1) - g.min(-1)) / 15
                slack = 2**-8 * (np.abs(g).max(-1))
                assert np.all(err.reshape(g.shape).max(-1) <= step / 2 + slack + 1e-7)


def test_layouts_give_identical_files(sources: dict[str, Path], packed4: Path, tmp_path: Path) -> None:
    want = {rel: e["xxh3_128"] for rel, e in manifest(packed4, 4)["files"].items()}
    for layout in ("official-per-expert", "sharded"):
        repack(sources[layout], tmp_path / layout, bits=4, workers=1)
        got = {rel: e["xxh3_128"] for rel, e in manifest(tmp_path / layout, 4)["files"].items()}
        assert got == want, layout


def test_on_grid_is_lossless(sources: dict[str, Path], tmp_path: Path) -> None:
    report = repack(sources["grid"], tmp_path / "p", bits=4)
    assert report["quantization"]["error"]["minmax"]["rel_rms"] == 0.0
    with SourceCheckpoint.open(sources["grid"]) as src:
        for layer, e in ((0, 1), (2, 3)):
            got = read_packed(tmp_path / "p", 4, layer, e)
            source = src.read_expert(layer, e)
            assert set(source) == set(got) == {"gate_proj", "up_proj", "down_proj"}
            for proj, w in source.items():
                np.testing.assert_array_equal(got[proj].dequantize(), w)


def test_mlx_passthrough_bit_exact(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["mlx"]
    before = tree_state(src)
    report = repack(src, tmp_path / "p", bits=4, workers=2)
    doc = check_files(tmp_path / "p", 4)
    assert (doc["quantization"]["method"], doc["quantization"]["from"]) == ("passthrough", "mlx-4bit")
    assert report["quantization"]["method"] == "passthrough"
    with safe_open(src / "model.safetensors", framework="numpy") as f:
        for layer, e in ((0, 0), (1, 4), (2, 2)):
            got = read_packed(tmp_path / "p", 4, layer, e)
            for proj in ("gate_proj", "up_proj", "down_proj"):
                base = f"language_model.model.layers.{layer}.mlp.switch_mlp.{proj}"
                for part in ("weight", "scales", "biases"):
                    raw = f.get_slice(f"{base}.{part}")[e : e + 1]
                    assert getattr(got[proj], part).tobytes() == raw.tobytes(), (layer, e, proj, part)
    assert tree_state(src) == before


def test_two_bit_from_bf16_and_from_mlx(sources: dict[str, Path], tmp_path: Path) -> None:
    report = repack(sources["official"], tmp_path / "a", bits=2, workers=2)
    doc = check_files(tmp_path / "a", 2)
    q = doc["quantization"]
    assert (q["method"], q["from"]) == ("clip-search", "bf16") and q == report["quantization"]
    assert 0 < q["error"]["clip-search"]["rel_rms"] < q["error"]["minmax"]["rel_rms"]
    with SourceCheckpoint.open(sources["official"]) as src:
        w = src.read_expert(1, 2)["down_proj"]
    got = read_packed(tmp_path / "a", 2, 1, 2)["down_proj"]
    want = quantize(w, 2, clip_search=True)
    np.testing.assert_array_equal(got.weight, want.weight)
    np.testing.assert_array_equal(got.scales, want.scales)

    report = repack(sources["mlx"], tmp_path / "b", bits=2, workers=2)
    q = check_files(tmp_path / "b", 2)["quantization"]
    assert (q["method"], q["from"]) == ("clip-search", "mlx-4bit")
    assert q["error"]["clip-search"]["rel_rms"] < q["error"]["minmax"]["rel_rms"]


def test_requantise_packed_to_2bit(sources: dict[str, Path], packed4: Path, tmp_path: Path) -> None:
    packed = tmp_path / "p"
    shutil.copytree(packed4, packed)
    q4_before = tree_state(packed / "experts-q4")
    result = run_cli("repack", packed, "--bits", "2", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["quantization"]["from"] == "packed-4bit" and Path(report["path"]) == packed
    doc = check_files(packed, 2)
    assert doc["quantization"]["method"] == "clip-search"
    four = read_packed(packed, 4, 2, 1)["up_proj"]
    two = read_packed(packed, 2, 2, 1)["up_proj"]
    want = quantize(four.dequantize(), 2, clip_search=True)
    np.testing.assert_array_equal(two.weight, want.weight)
    assert tree_state(packed / "experts-q4") == q4_before

    result = run_cli("repack", packed, "--bits", "4")
    assert result.exit_code != 0 and "--bits 4" in result.output
    assert_cli_error(result, "--bits 4")

    # a corrupt 4-bit file is detected, never requantised
    shutil.rmtree(packed / "experts-q2")
    victim = packed / "experts-q4" / "layer_001" / "expert_0003.bin"
    data = bytearray(victim.read_bytes())
    data[100] ^= 0xFF
    victim.write_bytes(data)
    with pytest.raises(CorruptionError):
        repack(packed, bits=2, workers=1)


# ---- resume -------------------------------------------------------------------------------------------
def test_resume_after_crash(
    sources: dict[str, Path], packed4: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "p"
    original = repack_mod._Repacker._write_expert
    calls = {"n": 0}

    def crashing(self, layer, expert, rel):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > 6:
            raise RuntimeError("killed")
        return original(self, layer, expert, rel)

    monkeypatch.setattr(repack_mod._Repacker, "_write_expert", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        repack(sources["official"], out, bits=4, workers=1)
    d = out / "experts-q4"
    assert not (d / "manifest.json").exists()
    assert len((d / ".progress.jsonl").read_text().splitlines()) == 6
    # what a kill -9 leaves: a temp file and a torn progress line
    (d / "layer_002").mkdir(exist_ok=True)
    (d / "layer_002" / ".expert_0001.bin.abc123.tmp").write_bytes(b"partial")
    with open(d / ".progress.jsonl", "a") as f:
        f.write('{"file": "layer_00')
    done = tree_state(d)

    monkeypatch.setattr(repack_mod._Repacker, "_write_expert", original)
    report = repack(sources["official"], out, bits=4, workers=2)
    assert report["written"] == 15 - 6
    after = tree_state(d)
    for rel, state in done.items():
        if rel.endswith(".bin") and not rel.endswith(".tmp"):
            assert after[rel] == state, rel  # finished files were not rewritten
    check_files(out, 4)
    assert manifest(out, 4)["files"] == manifest(packed4, 4)["files"]

    # delete some files: only those are redone; a complete manifest skips the step
    again = repack(sources["official"], out, bits=4)
    assert again["skipped"] and again["written"] == 0
    for rel in ("layer_000/expert_0002.bin", "layer_002/expert_0004.bin"):
        (d / rel).unlink()
    redo = repack(sources["official"], out, bits=4)
    assert redo["written"] == 2 and not redo["skipped"]
    check_files(out, 4)


def test_rerun_redoes_damaged_files_and_worse_inputs(
    sources: dict[str, Path], packed4: Path, tmp_path: Path, rng: np.random.Generator
) -> None:
    out = tmp_path / "p"
    shutil.copytree(packed4, out)
    # a flipped byte in a finished file (same size): the re-run redoes that file only
    victim = out / "experts-q4" / "layer_001" / "expert_0002.bin"
    data = bytearray(victim.read_bytes())
    data[int(rng.integers(len(data)))] ^= 0xFF
    victim.write_bytes(data)
    report = repack(sources["official"], out, bits=4, workers=1)
    assert not report["skipped"] and report["written"] == 1
    check_files(out, 4)
    assert manifest(out, 4)["files"] == manifest(packed4, 4)["files"]

    # 2-bit experts requantised from the packed 4-bit ones are redone from the bf16 source ...
    assert repack(out, bits=2, workers=1)["quantization"]["from"] == "packed-4bit"
    report = repack(sources["official"], out, bits=2, workers=1)
    assert report["quantization"]["from"] == "bf16" and report["written"] == 15
    check_files(out, 2)
    # ... and never replaced by requantising the packed 4-bit experts again
    before = tree_state(out / "experts-q2")
    report = repack(out, bits=2, workers=1)
    assert report["skipped"] and report["quantization"]["from"] == "bf16"
    assert tree_state(out / "experts-q2") == before
    (out / "experts-q2" / "layer_000" / "expert_0000.bin").unlink()
    result = run_cli("repack", out, "--bits", "2")
    assert result.exit_code != 0 and "on the source checkpoint" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "on the source checkpoint")


# ---- refusals -----------------------------------------------------------------------------------------
def test_refusals_are_one_line(sources: dict[str, Path], tmp_path: Path) -> None:
    src = sources["official"]
    for args, words in (
        (("repack", src, "--bits", "3", "--out", tmp_path / "a"), "--bits"),
        (("repack", tmp_path / "nowhere", "--bits", "4"), "not a directory"),
    ):
        result = run_cli(*args)
        assert result.exit_code != 0 and words in result.output, result.output
        assert len(result.output.strip().splitlines()) == 1
        assert_cli_error(result, words)

    other = tmp_path / "other"
    synthesize(tmp_path / "o", preset="tiny", layers=2, experts=4)
    extract(tmp_path / "o", other, dense_bits=4)
    result = run_cli("repack", src, "--bits", "4", "--out", other)
    assert result.exit_code != 0 and "another model" in result.output
    assert_cli_error(result, "another model")
    assert not (other / "experts-q4").exists()

    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["text_config"]["hidden_size"] = 256
    (bad / "config.json").write_text(json.dumps(cfg))
    result = run_cli("repack", bad, "--bits", "4")
    assert result.exit_code != 0 and "shape" in result.output
    assert_cli_error(result, "shape")
    assert not (tmp_path / "bad-packed").exists()
