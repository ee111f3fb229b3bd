"""`fmoe verify`: the happy path at 4 and 2 bits, every corruption case, and --deep against the source.

One tiny packed directory (synth -> extract -> repack 4 -> repack 2, through the real CLI) is built
per session; each corruption test damages its own copy.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import xxhash
from support import assert_cli_error, fresh_rng
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.config import TextConfig
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.synth import synthesize
from fmoe.formats.packed import EXPERT_PROJECTIONS, ExpertLayout, expert_relpath, record_manifest_digest
from fmoe.formats.quant import f32_to_bf16, quantize

runner = CliRunner()


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout


def verify_json(packed: Path, *args: str) -> tuple[int, dict]:
    code, out = cli("verify", packed, "--json", *args)
    report = json.loads(out)
    assert all("\n" not in b["problem"] for b in report["bad"] + report["warnings"])
    return code, report


def synth_and_pack(tmp: Path, name: str, **synth_args: object) -> tuple[Path, Path]:
    src, packed = tmp / f"{name}-src", tmp / f"{name}-packed"
    synthesize(src, preset="tiny", **synth_args)
    assert cli("extract", src, "--out", packed)[0] == 0
    for bits in (4, 2):
        assert cli("repack", src, "--out", packed, "--bits", bits)[0] == 0
    return src, packed


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    seed = int(fresh_rng("test_verify tiny").integers(1 << 16))
    return synth_and_pack(tmp_path_factory.mktemp("verify"), "tiny", seed=seed)


@pytest.fixture()
def copy(tiny: tuple[Path, Path], tmp_path: Path) -> Path:
    dst = tmp_path / "packed"
    shutil.copytree(tiny[1], dst)
    return dst


@pytest.fixture(scope="session")
def cfg(tiny: tuple[Path, Path]) -> TextConfig:
    return TextConfig.from_file(tiny[0] / "config.json")


def bad_files(report: dict) -> set[str]:
    return {b["file"] for b in report["bad"]}


def problems(report: dict, file: str) -> str:
    return " | ".join(b["problem"] for b in report["bad"] if b["file"] == file)


def random_expert(cfg: TextConfig, rng: np.random.Generator) -> str:
    return expert_relpath(int(rng.integers(cfg.num_hidden_layers)), int(rng.integers(cfg.num_experts)))


def flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x40]))


def rehash_expert(packed: Path, bits: int, rel: str) -> None:
    """Record a rewritten expert file's new hash, as a tamperer who knows the format would."""
    mpath = packed / f"experts-q{bits}/manifest.json"
    m = json.loads(mpath.read_text())
    data = (packed / f"experts-q{bits}" / rel).read_bytes()
    m["files"][rel] = {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}
    mpath.write_text(json.dumps(m))
    record_manifest_digest(packed, f"experts-q{bits}/manifest.json")  # and fmoe.json's record of it


# ---- happy path ----------------------------------------------------------------------------------
def test_good_artifact_passes_at_4_and_2_bits(tiny: tuple[Path, Path], cfg: TextConfig) -> None:
    code, report = verify_json(tiny[1])
    assert code == 0 and report["ok"] and report["bad"] == []
    assert report["expert_bits"] == [2, 4]
    experts = cfg.num_hidden_layers * cfg.num_experts
    assert report["checked_files"] == 1 + 2 * experts
    on_disk = sum(p.stat().st_size for p in tiny[1].rglob("*.bin"))
    assert report["checked_bytes"] == on_disk
    code, out = cli("verify", tiny[1])
    assert code == 0 and out.startswith("ok ")


def test_each_width_alone_passes(copy: Path, cfg: TextConfig) -> None:
    shutil.rmtree(copy / "experts-q4")
    code, report = verify_json(copy, "--workers", "3")
    assert code == 0 and report["expert_bits"] == [2]
    assert report["checked_files"] == 1 + cfg.num_hidden_layers * cfg.num_experts  # every 2-bit file was read
    assert report["checked_bytes"] == sum(p.stat().st_size for p in copy.rglob("*.bin"))


def test_unknown_file_is_a_warning_not_an_error(copy: Path) -> None:
    (copy / "experts-q4" / "layer_000" / "notes.txt").write_text("hello")
    (copy / "stray.bin").write_bytes(b"x")
    code, report = verify_json(copy)
    assert code == 0
    assert {w["file"] for w in report["warnings"]} >= {"experts-q4/layer_000/notes.txt", "stray.bin"}


# ---- corruption: each case caught, named, one line, exit 1 ---------------------------------------
def test_flipped_byte_in_expert_file(copy: Path, cfg: TextConfig, rng: np.random.Generator) -> None:
    rel = random_expert(cfg, rng)
    path = copy / "experts-q4" / rel
    flip_byte(path, int(rng.integers(path.stat().st_size)))
    code, report = verify_json(copy)
    assert code == 1 and not report["ok"]
    assert bad_files(report) == {f"experts-q4/{rel}"}
    assert "xxh3_128" in problems(report, f"experts-q4/{rel}")
    code, out = cli("verify", copy)  # the human form: one line per bad file
    assert code == 1 and f"experts-q4/{rel}: xxh3_128 mismatch" in out and "FAILED" in out


def test_flipped_byte_in_model_weights_bin(copy: Path, rng: np.random.Generator) -> None:
    tensors = json.loads((copy / "model_weights.json").read_text())["tensors"]
    name = sorted(tensors)[int(rng.integers(len(tensors)))]
    part = next(iter(tensors[name]["parts"].values()))
    flip_byte(copy / "model_weights.bin", part["offset"] + int(rng.integers(part["size"])))
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"model_weights.bin"}
    text = problems(report, "model_weights.bin")
    assert f"tensor {name}: xxh3_128 mismatch" in text and text.startswith("xxh3_128 mismatch")


def test_truncated_expert_file(copy: Path, cfg: TextConfig, rng: np.random.Generator) -> None:
    rel = random_expert(cfg, rng)
    path = copy / "experts-q2" / rel
    os.truncate(path, int(rng.integers(path.stat().st_size)))
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {f"experts-q2/{rel}"}
    assert "truncated" in problems(report, f"experts-q2/{rel}")


def test_missing_expert_file(copy: Path, cfg: TextConfig, rng: np.random.Generator) -> None:
    rel = random_expert(cfg, rng)
    (copy / "experts-q4" / rel).unlink()
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {f"experts-q4/{rel}"}
    assert problems(report, f"experts-q4/{rel}") == "missing"


def test_truncated_model_weights_bin(copy: Path, rng: np.random.Generator) -> None:
    path = copy / "model_weights.bin"
    os.truncate(path, int(rng.integers(path.stat().st_size)))
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"model_weights.bin"}
    assert "truncated" in problems(report, "model_weights.bin")


def test_missing_model_weights_bin(copy: Path) -> None:
    (copy / "model_weights.bin").unlink()
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"model_weights.bin"}
    assert problems(report, "model_weights.bin") == "missing"


def test_manifest_of_another_model(copy: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    synthesize(other, preset="tiny", layers=2, experts=4)
    assert cli("repack", other, "--out", tmp_path / "other-packed", "--bits", "4")[0] == 0
    shutil.copy(tmp_path / "other-packed/experts-q4/manifest.json", copy / "experts-q4/manifest.json")
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"experts-q4/manifest.json"}
    assert "another model" in problems(report, "experts-q4/manifest.json")


def test_manifest_with_another_fingerprint_same_geometry(copy: Path) -> None:
    path = copy / "experts-q2/manifest.json"
    m = json.loads(path.read_text())
    m["model_fingerprint"] = xxhash.xxh3_64_hexdigest(os.urandom(8))
    path.write_text(json.dumps(m))
    code, report = verify_json(copy)
    assert code == 1 and "another model" in problems(report, "experts-q2/manifest.json")


def test_manifest_layout_edited(copy: Path) -> None:
    path = copy / "experts-q4/manifest.json"
    m = json.loads(path.read_text())
    m["components"]["up_proj.scales"]["offset"] += 4096
    path.write_text(json.dumps(m))
    code, report = verify_json(copy)
    assert code == 1 and "component offsets" in problems(report, "experts-q4/manifest.json")


def test_manifest_not_json(copy: Path) -> None:
    (copy / "experts-q4/manifest.json").write_text('{"format": "fmoe-experts", ')
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"experts-q4/manifest.json"}
    assert "not valid JSON" in problems(report, "experts-q4/manifest.json")


def test_missing_expert_manifest_of_interrupted_repack(copy: Path) -> None:
    (copy / "experts-q2/manifest.json").unlink()
    (copy / "experts-q2/.progress.jsonl").write_text('{"file": "layer_000/expert_0000.bin"}\n')
    code, report = verify_json(copy)
    assert code == 1 and "did not finish" in problems(report, "experts-q2/manifest.json")


def test_dense_manifest_shape_and_missing_tensor(copy: Path, cfg: TextConfig) -> None:
    path = copy / "model_weights.json"
    m = json.loads(path.read_text())
    m["tensors"]["embed_tokens.weight"]["shape"] = [cfg.vocab_size + 1, cfg.hidden_size]
    gone = f"layers.{cfg.num_hidden_layers - 1}.mlp.gate.weight"
    del m["tensors"][gone]
    path.write_text(json.dumps(m))
    code, report = verify_json(copy)
    text = problems(report, "model_weights.json")
    assert code == 1 and "embed_tokens.weight: shape" in text and f"{gone}: missing" in text


def test_identity_problems_are_reported(copy: Path, tmp_path: Path) -> None:
    (copy / "fmoe.json").unlink()
    code, report = verify_json(copy)
    assert code == 1 and bad_files(report) == {"fmoe.json"}
    result = runner.invoke(app, ["verify", str(tmp_path / "nowhere")])
    assert result.exit_code == 1 and "no such directory" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "no such directory")


# ---- --deep ----------------------------------------------------------------------------------------
def test_deep_passes_on_a_good_artifact(tiny: tuple[Path, Path], cfg: TextConfig) -> None:
    code, report = verify_json(tiny[1], "--deep")
    assert code == 0, report["bad"]
    deep = report["deep"]
    assert deep["experts"] == 2 * 2 * cfg.num_hidden_layers and deep["tensors"] > 10
    q2 = deep["expert_sets"]["experts-q2"]
    assert q2["method"] == "clip-search" and 0 < q2["max_rel_rms"] < 1


@pytest.mark.parametrize("bits", [4, 2])
def test_deep_catches_requantised_and_rehashed_experts(
    copy: Path, tiny: tuple[Path, Path], cfg: TextConfig, bits: int
) -> None:
    """Layer 0's experts requantised from slightly wrong weights, manifest hashes updated: the
    checksums all pass, only the comparison with the source can tell."""
    layout = ExpertLayout.for_config(cfg, bits)
    with SourceCheckpoint.open(tiny[0]) as src:
        for e in range(cfg.num_experts):
            buf = bytearray(layout.file_size)
            w = src.read_expert(0, e)
            for proj in EXPERT_PROJECTIONS:
                qt = quantize(w[proj] * np.float32(1.25), bits, clip_search=bits == 2)
                for part in ("weight", "scales", "biases"):
                    c = layout.components[f"{proj}.{part}"]
                    buf[c.offset : c.offset + c.size] = np.ascontiguousarray(getattr(qt, part)).tobytes()
            rel = expert_relpath(0, e)
            (copy / f"experts-q{bits}" / rel).write_bytes(buf)
            rehash_expert(copy, bits, rel)
    assert verify_json(copy)[0] == 0  # checksums consistent
    code, report = verify_json(copy, "--deep")
    assert code == 1
    assert bad_files(report) and all(f.startswith(f"experts-q{bits}/layer_000/") for f in bad_files(report))
    assert all("deep:" in b["problem"] for b in report["bad"])


def test_deep_catches_a_rewritten_dense_tensor(copy: Path, tiny: tuple[Path, Path]) -> None:
    manifest = json.loads((copy / "model_weights.json").read_text())
    name = "layers.0.input_layernorm.weight"
    part = manifest["tensors"][name]["parts"]["data"]
    with SourceCheckpoint.open(tiny[0]) as src:
        value = src.read_dense(name) * np.float32(1.01)
    data = bytearray((copy / "model_weights.bin").read_bytes())
    data[part["offset"] : part["offset"] + part["size"]] = value.astype(np.float32).tobytes()
    (copy / "model_weights.bin").write_bytes(data)
    manifest["tensors"][name]["xxh3_128"] = xxhash.xxh3_128_hexdigest(value.astype(np.float32).tobytes())
    manifest["file_xxh3_128"] = xxhash.xxh3_128_hexdigest(bytes(data))
    (copy / "model_weights.json").write_text(json.dumps(manifest))
    record_manifest_digest(copy, "model_weights.json")
    assert verify_json(copy)[0] == 0
    code, report = verify_json(copy, "--deep")
    assert code == 1 and f"deep: tensor {name}" in problems(report, "model_weights.bin")


def test_deep_on_2bit_requantised_from_packed_4bit(copy: Path) -> None:
    shutil.rmtree(copy / "experts-q2")
    assert cli("repack", copy, "--bits", "2")[0] == 0
    code, report = verify_json(copy, "--deep")
    assert code == 0, report["bad"]
    assert report["deep"]["expert_sets"]["experts-q2"]["from"] == "packed-4bit"


def test_deep_without_source_is_a_clear_error(copy: Path, tmp_path: Path) -> None:
    result = runner.invoke(app, ["verify", str(copy), "--deep", "--source", str(tmp_path / "gone")])
    assert result.exit_code == 1 and "--deep" in result.output and "not found" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "--deep", "not found")
    identity = json.loads((copy / "fmoe.json").read_text())
    identity["source"]["path"] = str(tmp_path / "moved-away")
    (copy / "fmoe.json").write_text(json.dumps(identity))
    result = runner.invoke(app, ["verify", str(copy), "--deep"])
    assert result.exit_code == 1 and "moved-away" in result.output and "Traceback" not in result.output
    assert_cli_error(result, "moved-away")


def test_deep_mlx_passthrough_is_bit_exact(tmp_path: Path) -> None:
    src, packed = tmp_path / "mlx", tmp_path / "mlx-packed"
    synthesize(src, preset="tiny", layout="mlx", layers=4, experts=6)
    assert cli("extract", src, "--out", packed)[0] == 0
    for bits in (4, 2):
        assert cli("repack", src, "--out", packed, "--bits", bits)[0] == 0
    code, report = verify_json(packed, "--deep")
    assert code == 0, report["bad"]
    sets = report["deep"]["expert_sets"]
    assert sets["experts-q4"]["method"] == "passthrough" and sets["experts-q2"]["from"] == "mlx-4bit"
    # One code bit changed in every expert of layer 1 and the hashes redone: only --deep can tell.
    layout = ExpertLayout.for_config(TextConfig.from_file(src / "config.json"), 4)
    c = layout.components["down_proj.weight"]
    for e in range(6):
        path = packed / "experts-q4" / expert_relpath(1, e)
        data = bytearray(path.read_bytes())
        data[c.offset] ^= 1
        path.write_bytes(data)
        rehash_expert(packed, 4, expert_relpath(1, e))
    assert verify_json(packed)[0] == 0
    code, report = verify_json(packed, "--deep")
    assert code == 1 and "bit for bit" in report["bad"][0]["problem"]


def test_bf16_rounding_helper_consistency(rng: np.random.Generator) -> None:
    """The deep check's float tolerance relies on bf16 rounding moving a value by <= 2^-8 relative."""
    x = rng.standard_normal(10000).astype(np.float32)
    back = (f32_to_bf16(x).astype(np.uint32) << 16).view(np.float32)
    assert np.all(np.abs(back - x) <= np.abs(x) * 2.0**-8)


def test_packed_dir_without_experts_is_incomplete(copy: Path) -> None:
    for d in copy.glob("experts-q*"):
        shutil.rmtree(d)
    code, report = verify_json(copy)
    assert code == 1
    assert "fmoe repack" in problems(report, ".")
