"""Identity of the source: a packed directory never keeps, mixes or resumes artifacts of another
checkpoint of the same geometry (a fine-tune, a new revision in the same folder); a plain copy of
the same checkpoint is the same source; --overwrite hands the directory to the new source."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from support import assert_cli_error, fresh_seed
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert import repack as repack_mod
from fmoe.convert.extract import extract
from fmoe.convert.repack import repack
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.source_identity import SAMPLE_BYTES, identity_difference, packed_identity, source_identity
from fmoe.convert.synth import synthesize
from fmoe.convert.verify import verify
from fmoe.formats.packed import manifest_digest_problem

TINY = {"preset": "tiny", "layers": 2, "experts": 4}


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two checkpoints of one geometry with different weights (the 'fine-tune'), fresh seeds."""
    root = tmp_path_factory.mktemp("identity")
    seed = fresh_seed("test_source_identity pair")
    synthesize(root / "a", seed=seed, **TINY)
    synthesize(root / "b", seed=seed + 1, **TINY)
    return root / "a", root / "b"


@pytest.fixture(scope="module")
def packed_a(pair: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("packed-a") / "p"
    extract(pair[0], out)
    repack(pair[0], out, bits=4, workers=1)
    return out


def run_cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): xxhash.xxh3_128_hexdigest(p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != ".fmoe.lock"
    }


def files_of(packed: Path, bits: int) -> dict[str, str]:
    doc = json.loads((packed / f"experts-q{bits}" / "manifest.json").read_text())
    return {rel: e["xxh3_128"] for rel, e in doc["files"].items()}


def identity_of(path: Path) -> dict[str, Any]:
    with SourceCheckpoint.open(path) as src:
        return source_identity(src)


# ---- the identity itself ------------------------------------------------------------------------
def test_identity_same_for_a_copy_differs_for_other_weights(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a, b = pair
    copy = tmp_path / "copy"
    shutil.copytree(a, copy)
    for p in copy.iterdir():  # new mtimes and another path: still the same source
        os.utime(p, (1, 1))
    ida, idb, idc = identity_of(a), identity_of(b), identity_of(copy)
    assert ida["digest"] == idc["digest"] and ida["digest"] != idb["digest"]
    assert "other data" in identity_difference(ida, idb)
    assert identity_difference(None, ida).startswith("no source identity")


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_identity_sees_sampled_blocks(pair: tuple[Path, Path], tmp_path: Path, where: str) -> None:
    """One byte changed inside a sampled block of the data (first, a middle one, the last)."""
    copy = tmp_path / "copy"
    shutil.copytree(pair[0], copy)
    shard = copy / "model.safetensors"
    size = shard.stat().st_size
    data_start = 8 + int.from_bytes(shard.read_bytes()[:8], "little")
    rng = np.random.default_rng(fresh_seed(f"sampled {where}"))
    offset = {
        "first": data_start + int(rng.integers(SAMPLE_BYTES)),
        "middle": data_start + (size - SAMPLE_BYTES - data_start) * 3 // 7 + int(rng.integers(SAMPLE_BYTES)),
        "last": size - 1 - int(rng.integers(SAMPLE_BYTES)),
    }[where]
    with open(shard, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))
    assert identity_of(copy)["digest"] != identity_of(pair[0])["digest"]


def test_identity_sees_header_and_shard_changes(pair: tuple[Path, Path], tmp_path: Path) -> None:
    a = identity_of(pair[0])
    sharded = tmp_path / "sharded"
    synthesize(sharded, seed=fresh_seed("sharded"), shard_size="200KB", **TINY)
    ids = identity_of(sharded)
    assert len(ids["shards"]) > 1 and "other shard files" in identity_difference(a, ids)
    # another header, same size and data: the same entries in another order
    meta = tmp_path / "meta"
    shutil.copytree(pair[0], meta)
    shard = meta / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    entries = json.loads(raw[8 : 8 + n])
    header = json.dumps(dict(reversed(entries.items())), separators=(",", ":")).encode()
    assert len(header) <= n
    shard.write_bytes(raw[:8] + header.ljust(n, b" ") + raw[8 + n :])
    with SourceCheckpoint.open(meta) as src:  # still a valid checkpoint
        assert src.shards() == [("model.safetensors", len(raw))]
    assert "another safetensors header" in identity_difference(a, identity_of(meta))


def test_packed_identity_follows_the_manifest_bytes(packed_a: Path, tmp_path: Path) -> None:
    copy = tmp_path / "p"
    shutil.copytree(packed_a, copy)
    manifest = copy / "experts-q4" / "manifest.json"
    before = packed_identity(manifest, None)
    assert packed_identity(manifest, None)["digest"] == before["digest"]
    manifest.write_text(manifest.read_text().replace('"minmax"', '"minmax" '))
    assert packed_identity(manifest, None)["digest"] != before["digest"]


# ---- refusals and takeover ---------------------------------------------------------------------
def test_other_source_is_refused_and_nothing_changes(pair: tuple[Path, Path], packed_a: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    shutil.copytree(packed_a, out)
    before = tree(out)
    for args in (("extract", pair[1], "--out", out), ("repack", pair[1], "--out", out, "--bits", "4")):
        result = run_cli(*args)
        assert_cli_error(result, str(out), "another source checkpoint", "--overwrite", "other data")
    # a repack at a width the directory does not have yet would mix sources just as well
    assert_cli_error(run_cli("repack", pair[1], "--out", out, "--bits", "2"), "another source checkpoint")
    assert tree(out) == before
    assert verify(out)["ok"]


def test_a_copy_of_the_same_source_keeps_the_artifacts(pair: tuple[Path, Path], packed_a: Path, tmp_path: Path) -> None:
    out, copy = tmp_path / "p", tmp_path / "a-copy"
    shutil.copytree(packed_a, out)
    shutil.copytree(pair[0], copy)
    assert extract(copy, out)["skipped"]
    assert repack(copy, out, bits=4, workers=1)["skipped"]
    doc = json.loads((out / "fmoe.json").read_text())
    assert doc["source"]["path"] == str(copy.resolve())  # the record follows the files


def test_overwrite_hands_the_directory_to_the_new_source(
    pair: tuple[Path, Path], packed_a: Path, tmp_path: Path
) -> None:
    a, b = pair
    out = tmp_path / "p"
    shutil.copytree(packed_a, out)
    result = run_cli("extract", b, "--out", out, "--overwrite")
    assert result.exit_code == 0, result.output
    # the experts of the old source are not left to pair with the new dense weights
    assert not (out / "experts-q4" / "manifest.json").exists()
    report = verify(out)
    assert not report["ok"] and "experts-q4/manifest.json" in {x["file"] for x in report["bad"]}
    result = run_cli("repack", b, "--out", out, "--bits", "4")
    assert result.exit_code == 0, result.output
    assert verify(out)["ok"]
    fresh = tmp_path / "fresh"
    extract(b, fresh)
    repack(b, fresh, bits=4, workers=1)
    assert files_of(out, 4) == files_of(fresh, 4)
    dense = json.loads((out / "model_weights.json").read_text())
    assert dense["file_xxh3_128"] == json.loads((fresh / "model_weights.json").read_text())["file_xxh3_128"]
    assert dense["source_identity"]["digest"] == identity_of(b)["digest"]
    # and the old source is now the other one
    assert_cli_error(run_cli("repack", a, "--out", out, "--bits", "4"), "another source checkpoint")


def test_interrupted_repack_then_another_source_never_mixes(
    pair: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b = pair
    out = tmp_path / "p"
    original = repack_mod._Repacker._write_expert
    calls = {"n": 0}
    limit = int(np.random.default_rng(fresh_seed("interrupt mix")).integers(1, 7))

    def crashing(self, layer, expert, rel):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] > limit:
            raise RuntimeError("killed")
        return original(self, layer, expert, rel)

    monkeypatch.setattr(repack_mod._Repacker, "_write_expert", crashing)
    with pytest.raises(RuntimeError, match="killed"):
        repack(a, out, bits=4, workers=1)
    monkeypatch.setattr(repack_mod._Repacker, "_write_expert", original)
    log = out / "experts-q4" / ".progress.jsonl"
    assert len(log.read_text().splitlines()) == limit
    assert_cli_error(run_cli("repack", b, "--out", out, "--bits", "4"), "another source checkpoint")
    report = repack(b, out, bits=4, workers=1, overwrite=True)
    assert report["written"] == 2 * 4  # nothing of a's log was resumed
    fresh = tmp_path / "fresh"
    repack(b, fresh, bits=4, workers=1)
    assert files_of(out, 4) == files_of(fresh, 4)


def test_progress_log_of_another_source_is_not_resumed(pair: tuple[Path, Path], tmp_path: Path) -> None:
    """A log whose lines name another source (same directory, same files on disk) restarts."""
    a = pair[0]
    out = tmp_path / "p"
    extract(a, out)
    repack(a, out, bits=4, workers=1)
    d = out / "experts-q4"
    doc = json.loads((d / "manifest.json").read_text())
    lines = [
        json.dumps({"file": rel, **e, "from": "bf16", "source": "0" * 32}) for rel, e in sorted(doc["files"].items())
    ]
    (d / "manifest.json").unlink()
    (d / ".progress.jsonl").write_text("\n".join(lines) + "\n")
    assert repack(a, out, bits=4, workers=1)["written"] == 2 * 4
    assert verify(out)["ok"]


def test_directory_of_an_older_fmoe(pair: tuple[Path, Path], packed_a: Path, tmp_path: Path) -> None:
    """No identity recorded anywhere: refused (it cannot be shown to be this source) until --overwrite."""
    out = tmp_path / "p"
    shutil.copytree(packed_a, out)
    fj = json.loads((out / "fmoe.json").read_text())
    del fj["source"]["identity"], fj["manifests"]
    (out / "fmoe.json").write_text(json.dumps(fj))
    for rel in ("model_weights.json", "experts-q4/manifest.json"):
        doc = json.loads((out / rel).read_text())
        del doc["source_identity"]
        (out / rel).write_text(json.dumps(doc))
    assert "not recorded" in str(manifest_digest_problem(out, "model_weights.json", b"{}"))
    assert_cli_error(run_cli("extract", pair[0], "--out", out), "older fmoe", "--overwrite")
    result = run_cli("repack", pair[0], "--out", out, "--bits", "4", "--overwrite")
    assert result.exit_code == 0, result.output
    assert run_cli("extract", pair[0], "--out", out).exit_code == 0
    assert verify(out)["ok"]


def test_requantised_2bit_follows_its_4bit_input(pair: tuple[Path, Path], packed_a: Path, tmp_path: Path) -> None:
    """q2 made from the packed q4 records the q4 manifest's identity; an edited q4 manifest (with its
    digest in fmoe.json left alone) is refused as corrupt, never requantised."""
    out = tmp_path / "p"
    shutil.copytree(packed_a, out)
    report = repack(out, bits=2, workers=1)
    doc = json.loads((out / "experts-q2" / "manifest.json").read_text())
    assert doc["source_identity"]["kind"] == "packed-4bit" and report["quantization"]["from"] == "packed-4bit"
    assert doc["source_identity"]["checkpoint_digest"] == identity_of(pair[0])["digest"]
    m = out / "experts-q4" / "manifest.json"
    m.write_text(m.read_text() + " ")
    before = tree(out / "experts-q2")
    result = run_cli("repack", out, "--bits", "2", "--overwrite")
    assert_cli_error(result, "experts-q4/manifest.json", "fmoe.json records")
    assert tree(out / "experts-q2") == before
    report = verify(out)
    assert not report["ok"] and "experts-q4/manifest.json" in {x["file"] for x in report["bad"]}


def test_source_is_never_modified(pair: tuple[Path, Path], tmp_path: Path) -> None:
    before = tree(pair[1])
    out = tmp_path / "p"
    extract(pair[1], out)
    repack(pair[1], out, bits=2, workers=1)
    assert tree(pair[1]) == before
