"""Integrity by default: `fmoe run` never computes on damaged, swapped or special files without
saying so. With the default ``--checks first-read``: the dense weights are hashed at load, each
expert file on its first read, and the manifests must be the ones whose xxh3_128 fmoe.json recorded;
``--checks off`` trusts the files (special files are refused whatever the setting). And a model whose
weights hold NaN/Inf stops with an error instead of printing garbage with exit 0."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import xxhash
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.formats.packed import expert_relpath
from fmoe.runtime.diagnostics import build_packed

runner = CliRunner()


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    return build_packed(tmp_path_factory.mktemp("integrity"), seed=4)


@pytest.fixture
def packed(built: tuple[Path, Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(built[1], tmp_path / "packed"))


def run(packed: Path, *extra: str, tokens: int = 3) -> object:
    return runner.invoke(app, ["run", str(packed), "-p", "Hello", "--raw", "--tokens", str(tokens), *extra])


def expert(packed: Path, layer: int, e: int) -> Path:
    return packed / "experts-q4" / expert_relpath(layer, e)


def flip(path: Path, at: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0x40
    path.write_bytes(bytes(data))


def test_intact_directory_runs_with_checks_by_default(packed: Path) -> None:
    r = run(packed)
    assert r.exit_code == 0, r.stderr


@pytest.mark.parametrize("layer", [0, 3, 7])
def test_flipped_byte_in_any_expert_is_caught(packed: Path, layer: int) -> None:
    for e in range(15):  # the prompt's experts are not known in advance: damage them all
        flip(expert(packed, layer, e), at=(e + 1) / 17)
    assert_cli_error(run(packed), f"layer_{layer:03d}/expert_", "xxh3_128 mismatch")
    assert run(packed, "--checks", "off").exit_code == 0  # the switch that trusts the files


def test_another_experts_file_in_its_place_is_caught(packed: Path) -> None:
    # every file of layer 2 replaced by its neighbour's: same size, valid content, wrong expert
    originals = [expert(packed, 2, e).read_bytes() for e in range(15)]
    for e in range(15):
        expert(packed, 2, e).write_bytes(originals[(e + 1) % 15])
    assert_cli_error(run(packed), "layer_002/expert_", "xxh3_128 mismatch")


def test_another_models_weights_file_is_caught(packed: Path, tmp_path: Path) -> None:
    """Same geometry (same fingerprint), other weights: per-tensor hashes at load catch the .bin."""
    _, other = build_packed(tmp_path / "other", seed=9)
    shutil.copy(other / "model_weights.bin", packed / "model_weights.bin")
    assert_cli_error(run(packed), "model_weights.bin", "fails its xxh3_128")
    # and the other model's manifest with it: fmoe.json recorded this directory's manifest
    shutil.copy(other / "model_weights.json", packed / "model_weights.json")
    assert_cli_error(run(packed), "model_weights.json", "differs from the one fmoe.json records")


def test_edited_manifest_entry_is_caught(packed: Path) -> None:
    """Damage an expert file and re-hash its manifest entry to match: fmoe.json's record of the
    manifest still tells."""
    path = expert(packed, 1, 4)
    flip(path)
    manifest = packed / "experts-q4" / "manifest.json"
    doc = json.loads(manifest.read_text())
    doc["files"][expert_relpath(1, 4)]["xxh3_128"] = xxhash.xxh3_128_hexdigest(path.read_bytes())
    manifest.write_text(json.dumps(doc))
    assert_cli_error(run(packed), "experts-q4/manifest.json", "differs from the one fmoe.json records")
    v = runner.invoke(app, ["verify", str(packed), "--json"])
    assert v.exit_code == 1 and any(b["file"] == "experts-q4/manifest.json" for b in json.loads(v.stdout)["bad"])


@pytest.mark.parametrize("checks", ["first-read", "off"])
def test_expert_file_linked_to_dev_zero_is_refused(packed: Path, checks: str) -> None:
    for e in range(15):
        path = expert(packed, 0, e)
        path.unlink()
        path.symlink_to("/dev/zero")
    assert_cli_error(run(packed, "--checks", checks), "layer_000/expert_", "is a character device, not a regular file")


def _run_with_timeout(args: list[str], seconds: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fmoe", *args], capture_output=True, text=True, timeout=seconds, check=False
    )


def test_fifo_in_place_of_a_file_is_refused_without_hanging(packed: Path) -> None:
    for e in range(15):
        path = expert(packed, 5, e)
        path.unlink()
        os.mkfifo(path)
    r = _run_with_timeout(["run", str(packed), "-p", "Hello", "--raw", "--tokens", "2"])
    assert r.returncode != 0 and "is a FIFO, not a regular file" in r.stderr and "Traceback" not in r.stderr
    (packed / "model_weights.bin").unlink()
    os.mkfifo(packed / "model_weights.bin")
    r = _run_with_timeout(["run", str(packed), "-p", "Hello", "--raw", "--tokens", "2", "--checks", "off"])
    assert r.returncode != 0 and "model_weights.bin: is a FIFO" in r.stderr


def test_directory_in_place_of_an_expert_file(packed: Path) -> None:
    for e in range(15):
        path = expert(packed, 6, e)
        path.unlink()
        path.mkdir()
    assert_cli_error(run(packed), "layer_006/expert_", "is a directory")


def test_manifest_digest_not_recorded_is_refused_unless_checks_are_off(packed: Path) -> None:
    identity = packed / "fmoe.json"
    doc = json.loads(identity.read_text())
    doc.pop("manifests")
    identity.write_text(json.dumps(doc))
    assert_cli_error(run(packed), "manifest.json", "not recorded")
    assert run(packed, "--checks", "off").exit_code == 0


# ---- non-finite weights ----------------------------------------------------------------------------
def test_nan_weights_stop_generation_with_an_error(tmp_path: Path) -> None:
    """A source whose weights hold NaN, converted with the explicit override: `run` refuses to print
    what it computes (the non-finite logits are caught), exit code non-zero."""
    from fmoe.convert.synth import synthesize

    src = tmp_path / "src"
    synthesize(src, preset="tiny", seed=2)
    shard = src / "model.safetensors"
    key = "model.language_model.layers.2.linear_attn.out_proj.weight"
    data = bytearray(shard.read_bytes())
    header_len = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + header_len])
    begin, end = header[key]["data_offsets"]
    assert header[key]["dtype"] == "BF16"
    nan = np.array([0x7FC0] * ((end - begin) // 2), dtype=np.uint16).tobytes()  # bf16 NaN everywhere
    data[8 + header_len + begin : 8 + header_len + end] = nan
    shard.write_bytes(bytes(data))
    out = tmp_path / "packed"
    refused = runner.invoke(app, ["extract", str(src), "--out", str(out)])  # by default
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit)
    last = refused.stderr.strip().splitlines()[-1]  # after the progress bar of the tensors before it
    assert last.startswith("error:") and "out_proj" in last and "NaN" in last and "--allow-nonfinite" in last
    r = runner.invoke(app, ["extract", str(src), "--out", str(out), "--allow-nonfinite"])
    assert r.exit_code == 0, r.stderr
    assert runner.invoke(app, ["repack", str(src), "--out", str(out), "--bits", "4"]).exit_code == 0
    assert_cli_error(run(out), "non-finite logits")
