"""`fmoe info`: what a packed directory or a source checkpoint holds, from its own files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from support import assert_cli_error, fresh_rng
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.convert.info import describe
from fmoe.convert.synth import synthesize

runner = CliRunner()


def cli(*args: object) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    # CliRunner keeps an escaped exception (the real CLI's traceback) out of the output: check it
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result.exit_code, result.output


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("info")
    src, packed = tmp / "src", tmp / "packed"
    # A random slice of the tiny geometry: the expected numbers come from its config.json.
    rng = fresh_rng("test_info built")
    synthesize(src, preset="tiny", layers=int(rng.integers(4, 9)), experts=int(rng.integers(4, 12)))
    assert cli("extract", src, "--out", packed)[0] == 0
    for bits in (4, 2):
        assert cli("repack", src, "--out", packed, "--bits", bits)[0] == 0
    return src, packed


def test_packed_directory(built: tuple[Path, Path]) -> None:
    src, packed = built
    cfg = TextConfig.from_file(src / "config.json")
    raw = json.loads((src / "config.json").read_text())["text_config"]
    d = describe(packed)
    assert d["kind"] == "packed"
    assert d["model"]["fingerprint"] == cfg.fingerprint()
    assert d["model"]["source"]["layout"] == "official"
    assert Path(d["model"]["source"]["path"]) == src.resolve()
    g = d["geometry"]
    assert g["layers"] == raw["num_hidden_layers"] and g["hidden_size"] == raw["hidden_size"]
    assert g["full_attention_layers"] == raw["layer_types"].count("full_attention")
    assert (g["experts"], g["experts_per_token"], g["vocab_size"]) == (
        raw["num_experts"],
        raw["num_experts_per_tok"],
        raw["vocab_size"],
    )
    dense = json.loads((packed / "model_weights.json").read_text())
    assert d["dense"] == {
        "state": "complete",
        "bits": dense["dense_bits"],
        "bytes": (packed / "model_weights.bin").stat().st_size,
        "tensors": len(dense["tensors"]),
    }
    by_bits = {e["bits"]: e for e in d["experts"]}
    assert sorted(by_bits) == [2, 4]
    for bits, e in by_bits.items():
        files = list((packed / f"experts-q{bits}").glob("layer_*/expert_*.bin"))
        assert e["state"] == "complete" and e["files"] == len(files) == raw["num_hidden_layers"] * raw["num_experts"]
        assert e["bytes"] == sum(f.stat().st_size for f in files)
    assert by_bits[2]["method"] == "clip-search" and by_bits[4]["method"] == "minmax"
    assert "not verified" in d["checksums"]["state"]
    assert set(d["checksums"]["manifests"]) == {
        "fmoe.json",
        "model_weights.json",
        "experts-q4/manifest.json",
        "experts-q2/manifest.json",
    }


def test_cli_render_and_json(built: tuple[Path, Path]) -> None:
    packed = built[1]
    code, out = cli("info", packed)
    assert code == 0 and describe(packed)["model"]["fingerprint"] in out and "not verified" in out
    code, out = cli("info", packed, "--json")
    assert code == 0 and json.loads(out) == json.loads(json.dumps(describe(packed)))


def test_in_progress_and_missing_parts(built: tuple[Path, Path], tmp_path: Path) -> None:
    """An interrupted repack (no manifest yet, a progress log) and a directory without dense weights."""
    packed = tmp_path / "p"
    shutil.copytree(built[1], packed)
    q2 = packed / "experts-q2"
    manifest = json.loads((q2 / "manifest.json").read_text())
    (q2 / "manifest.json").unlink()
    kept = sorted(manifest["files"])[: len(manifest["files"]) // 3]
    for rel in sorted(manifest["files"])[len(kept) :]:
        (q2 / rel).unlink()
    (q2 / ".progress.jsonl").write_text("".join(json.dumps({"file": r, **manifest["files"][r]}) + "\n" for r in kept))
    (packed / "model_weights.json").unlink()
    (packed / "model_weights.bin").unlink()
    d = describe(packed)
    e = {x["bits"]: x for x in d["experts"]}[2]
    assert e["files"] == len(kept) and not e["manifest"]
    assert e["state"].startswith("in progress") and f"{len(kept)} of {e['expected']}" in e["state"]
    assert d["dense"]["state"].startswith("missing")
    assert cli("info", packed)[0] == 0


def test_source_checkpoints(built: tuple[Path, Path], tmp_path: Path) -> None:
    src = built[0]
    d = describe(src)
    shards = sorted(src.glob("*.safetensors"))
    assert d["kind"] == "source" and d["layout"] == "official"
    assert [s["file"] for s in d["shards"]] == [p.name for p in shards]
    assert d["bytes"] == sum(p.stat().st_size for p in shards)
    assert d["experts"] == {"dtype": "bf16", "bits": None}
    assert d["geometry"]["layers"] == json.loads((src / "config.json").read_text())["text_config"]["num_hidden_layers"]
    mlx = tmp_path / "mlx"
    synthesize(mlx, preset="tiny", layout="mlx", layers=2, experts=4)
    d = describe(mlx)
    assert d["layout"] == "mlx" and d["experts"] == {"dtype": "affine", "bits": 4}
    code, out = cli("info", mlx)
    assert code == 0 and "mlx" in out and "affine 4-bit" in out


def test_unknown_directory_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    for path in (tmp_path, tmp_path / "absent"):
        code, out = cli("info", path)
        assert code == 1 and len(out.strip().splitlines()) == 1 and "error" in out
        assert_cli_error(runner.invoke(app, ["info", str(path)]), str(path))
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "fmoe.json").write_text("{broken")
    code, out = cli("info", bad)
    assert code == 1 and "not valid JSON" in out and len(out.strip().splitlines()) == 1
    assert_cli_error(runner.invoke(app, ["info", str(bad)]), "fmoe.json", "not valid JSON")
