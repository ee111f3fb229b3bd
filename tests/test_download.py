"""`fmoe download` against tests/fakehub.py: selection, pinning, resume, verification, hub errors."""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save
from support import assert_cli_error
from typer.testing import CliRunner

import fmoe.convert.download as download_module
from fmoe.cli import app
from fmoe.convert.source import DOWNLOAD_RECORD as PIN_NAME
from fmoe.presets import repo_aliases


def _load_fakehub():
    """tests/ is not a package (pytest runs with --import-mode=importlib): load the sibling by path."""
    if "fakehub" not in sys.modules:
        spec = importlib.util.spec_from_file_location("fakehub", Path(__file__).with_name("fakehub.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules["fakehub"] = module  # dataclasses look their module up there
        spec.loader.exec_module(module)
    return sys.modules["fakehub"]


fake_hub = _load_fakehub().fake_hub

REPO = "org/tiny-moe"
# No token or endpoint from the environment leaks into a test.
CLEAN_ENV = {"HF_TOKEN": None, "HF_ENDPOINT": None, "HF_HUB_OFFLINE": None}
TEXT_SHARD, MIXED_SHARD, VISION_SHARD = (f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3))


def make_repo(rng: np.random.Generator, big: int = 0) -> dict[str, bytes]:
    """A tiny sharded release: shard 1 text, shard 2 text + MTP, shard 3 vision/MTP only, plus extras.

    ``big`` adds a float32 tensor of that many bytes to the text shard (for the resume test)."""

    def arr(*shape: int) -> np.ndarray:
        return rng.standard_normal(shape).astype(np.float32)

    lm = "model.language_model"
    shards = {
        TEXT_SHARD: {f"{lm}.embed_tokens.weight": arr(32, 16), f"{lm}.layers.0.mlp.gate.weight": arr(4, 16)},
        MIXED_SHARD: {f"{lm}.norm.weight": arr(16), "lm_head.weight": arr(32, 16), "mtp.fc.weight": arr(16, 32)},
        VISION_SHARD: {
            "model.visual.blocks.0.attn.qkv.weight": arr(48, 16),
            "mtp.norm.weight": arr(16),
            "vision_tower.patch_embed.weight": arr(8, 16),
        },
    }
    if big:
        shards[TEXT_SHARD][f"{lm}.layers.0.mlp.experts.gate_up_proj"] = arr(big // 4)
    files = {name: save(tensors) for name, tensors in shards.items()}
    weight_map = {t: name for name, tensors in shards.items() for t in tensors}
    files["model.safetensors.index.json"] = json.dumps({"metadata": {}, "weight_map": weight_map}).encode()
    files["config.json"] = json.dumps({"model_type": "qwen3_5_moe", "seed": int(rng.integers(1 << 30))}).encode()
    files["generation_config.json"] = b'{"eos_token_id": [248046, 248044]}'
    files["tokenizer.json"] = json.dumps({"model": {"vocab": {"a": 0}}}).encode()
    files["tokenizer_config.json"] = b'{"eos_token": "<|im_end|>"}'
    files["chat_template.jinja"] = b"{% for m in messages %}{{ m.content }}{% endfor %}"
    # Not needed by the engine: never fetched.
    files["README.md"] = b"# tiny\n"
    files["figures/arch.png"] = rng.bytes(3000)
    files["pytorch_model.bin"] = rng.bytes(5000)
    return files


NEEDED = {
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "model.safetensors.index.json",
    TEXT_SHARD,
    MIXED_SHARD,
}


def cli(*args: str, **kw: object):
    return CliRunner().invoke(app, ["download", *args], env=CLEAN_ENV, **kw)


def fetched_paths(hub) -> list[str]:
    """Repo paths of the file GETs the hub saw (resolve URLs)."""
    return [r.path.split("/resolve/", 1)[1].split("/", 1)[1] for r in hub.requests("GET", "resolve")]


def test_alias_default_dir_selection_and_pin(fake_hub, tmp_path, monkeypatch):
    alias, entry = next(iter(repo_aliases().items()))
    files = make_repo(np.random.default_rng(1))
    sha = fake_hub.add_repo(entry["repo"], files)
    monkeypatch.chdir(tmp_path)

    result = cli(alias, "--endpoint", fake_hub.url, "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    target = tmp_path / "models" / entry["repo"].split("/")[1]
    assert report["repo"] == entry["repo"] and report["sha"] == sha
    assert Path(report["dir"]) == Path("models") / target.name
    assert report["files"] == len(NEEDED) and report["bytes"] == sum(len(files[p]) for p in NEEDED)
    assert report["skipped"] == [VISION_SHARD]

    # Exactly the needed files, each fetched once, byte for byte; nothing else lands in DIR.
    assert sorted(fetched_paths(fake_hub)) == sorted(NEEDED)
    assert {p.name for p in target.iterdir()} == NEEDED | {PIN_NAME}
    for p in NEEDED:
        assert (target / p).read_bytes() == files[p], p

    pin = json.loads((target / PIN_NAME).read_text())
    assert pin["repo"] == entry["repo"] and pin["sha"] == sha and pin["revision_requested"] == "main"
    assert pin["endpoint"] == fake_hub.url and pin["complete"] is True
    assert {p: (f["size"], f["sha256"]) for p, f in pin["files"].items()} == {
        p: (len(files[p]), hashlib.sha256(files[p]).hexdigest()) for p in NEEDED
    }


def test_single_file_repo(fake_hub, tmp_path):
    rng = np.random.default_rng(2)
    weights = save({"model.language_model.norm.weight": rng.standard_normal(64).astype(np.float32)})
    fake_hub.add_repo(REPO, {"config.json": b"{}", "model.safetensors": weights, "README.md": b"x"})
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert (tmp_path / "d" / "model.safetensors").read_bytes() == weights
    assert sorted(fetched_paths(fake_hub)) == ["config.json", "model.safetensors"]


def test_rerun_pinned_no_requests_then_explicit_revision(fake_hub, tmp_path):
    rng = np.random.default_rng(3)
    old = make_repo(rng)
    old_sha = fake_hub.add_repo(REPO, old)
    target = tmp_path / "d"
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0

    # The branch moves on the hub: a re-run with the same revision stays on the pinned sha, offline.
    new = dict(old)
    new[TEXT_SHARD] = make_repo(rng)[TEXT_SHARD]
    new_sha = fake_hub.commit(REPO, new)
    fake_hub.log.clear()
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target), "--json")
    assert result.exit_code == 0, result.output
    assert fake_hub.log == []
    assert json.loads(result.stdout)["sha"] == old_sha
    assert (target / TEXT_SHARD).read_bytes() == old[TEXT_SHARD]

    # An explicit other revision re-resolves; only the changed file is fetched.
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target), "--revision", new_sha, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sha"] == new_sha
    assert fetched_paths(fake_hub) == [TEXT_SHARD]
    for p in NEEDED:
        assert (target / p).read_bytes() == new[p], p

    # --include-mtp adds the vision/MTP-only shard and nothing else.
    fake_hub.log.clear()
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target), "--revision", new_sha, "--include-mtp")
    assert result.exit_code == 0, result.output
    assert fetched_paths(fake_hub) == [VISION_SHARD]
    assert (target / VISION_SHARD).read_bytes() == new[VISION_SHARD]


def test_resume_after_killed_run(fake_hub, tmp_path):
    files = make_repo(np.random.default_rng(4), big=6 << 20)
    sha = fake_hub.add_repo(REPO, files)
    fake_hub.slow[TEXT_SHARD] = 0.02  # seconds per 64 KiB: about 2 s for the big shard
    target = tmp_path / "d"
    part = target / (TEXT_SHARD + ".part")
    env = {k: v for k, v in os.environ.items() if k not in CLEAN_ENV}
    env |= {"HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "hf")}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from fmoe.cli import main; main()",
            "download",
            REPO,
            "--endpoint",
            fake_hub.url,
            "--dir",
            str(target),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + 30
        while not (part.exists() and part.stat().st_size >= 512 << 10):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "download never started"
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    kept = part.stat().st_size
    assert 0 < kept < len(files[TEXT_SHARD]) and not (target / TEXT_SHARD).exists()

    # The branch moves meanwhile: the resumed run keeps the pinned sha and asks from byte `kept` on.
    fake_hub.slow.clear()
    changed = dict(files)
    changed[TEXT_SHARD] = make_repo(np.random.default_rng(5), big=6 << 20)[TEXT_SHARD]
    fake_hub.commit(REPO, changed)
    fake_hub.log.clear()
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["sha"] == sha
    assert not [r for r in fake_hub.log if "/revision/" in r.path]
    ranges = [r.range for r in fake_hub.requests("GET", "resolve") if r.path.endswith(TEXT_SHARD)]
    assert ranges == [f"bytes={kept}-"]
    assert (target / TEXT_SHARD).read_bytes() == files[TEXT_SHARD]
    assert not part.exists()


def test_broken_transfer_resumes_within_the_run(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(download_module, "RETRY_WAIT_S", 0.0)
    files = make_repo(np.random.default_rng(11), big=1 << 20)
    fake_hub.add_repo(REPO, files)
    fake_hub.drop_once[TEXT_SHARD] = 300_000
    target = tmp_path / "d"
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0
    ranges = [r.range for r in fake_hub.requests("GET", "resolve") if r.path.endswith(TEXT_SHARD)]
    assert len(ranges) == 2 and ranges[0] is None
    assert 0 < int(ranges[1].removeprefix("bytes=").rstrip("-")) <= 300_000
    assert (target / TEXT_SHARD).read_bytes() == files[TEXT_SHARD]


@pytest.mark.parametrize("bad", [TEXT_SHARD, "config.json"])
def test_hash_mismatch_keeps_no_file(fake_hub, tmp_path, bad):
    files = make_repo(np.random.default_rng(6))
    fake_hub.add_repo(REPO, files)
    fake_hub.corrupt.add(bad)
    target = tmp_path / "d"
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target), "--workers", "1")
    assert_cli_error(result, "sha256" if bad.endswith(".safetensors") else "git blob sha1")
    assert result.exit_code == 3
    assert not (target / bad).exists() and not (target / (bad + ".part")).exists()

    fake_hub.corrupt.clear()  # the next run recovers
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0
    assert (target / bad).read_bytes() == files[bad]


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    ("case", "fragment"),
    [
        ("missing repo", "repository not found"),
        ("bad revision", "revision 'no-such-branch' not found"),
        ("gated, no token (401)", "gated repository"),
        ("gated, token without access (403)", "gated repository"),
        ("invalid token (401)", "rejected the token"),
        ("unreachable", "hub unreachable"),
    ],
)
def test_hub_errors_are_one_line(fake_hub, tmp_path, case, fragment):
    files = make_repo(np.random.default_rng(7))
    fake_hub.add_repo(REPO, files)
    fake_hub.add_repo("org/gated", files, gated=True)
    fake_hub.tokens = {"good": {"org/gated"}, "other": set()}
    args = {
        "missing repo": ["org/nope"],
        "bad revision": [REPO, "--revision", "no-such-branch"],
        "gated, no token (401)": ["org/gated"],
        "gated, token without access (403)": ["org/gated", "--token", "other"],
        "invalid token (401)": [REPO, "--token", "wrong"],
        "unreachable": [REPO, "--endpoint", f"http://127.0.0.1:{_closed_port()}"],
    }[case]
    if "--endpoint" not in args:
        args += ["--endpoint", fake_hub.url]
    result = cli(*args, "--dir", str(tmp_path / "d"))
    assert_cli_error(result, fragment)
    assert not (tmp_path / "d" / TEXT_SHARD).exists()


def test_gated_with_access_token(fake_hub, tmp_path):
    files = make_repo(np.random.default_rng(8))
    fake_hub.add_repo("org/gated", files, gated=True)
    fake_hub.tokens = {"good": {"org/gated"}}
    result = cli("org/gated", "--endpoint", fake_hub.url, "--token", "good", "--dir", str(tmp_path / "d"))
    assert result.exit_code == 0, result.output
    assert {r.token for r in fake_hub.requests("GET", "resolve")} == {"good"}


Usage = collections.namedtuple("Usage", "total used free")


def test_disk_space_checked_counting_present_bytes(fake_hub, tmp_path, monkeypatch):
    files = make_repo(np.random.default_rng(9))
    fake_hub.add_repo(REPO, files)
    target = tmp_path / "d"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, 1000))
    result = cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target))
    assert_cli_error(result, "not enough free disk space")
    assert fetched_paths(fake_hub) == ["model.safetensors.index.json"]  # no shard was started

    monkeypatch.setattr(shutil, "disk_usage", real_usage)
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0
    (target / MIXED_SHARD).unlink()
    need = len(files[MIXED_SHARD])  # only the missing shard counts
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, need - 1))
    assert_cli_error(cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)), "not enough")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(1 << 40, 1 << 40, need))
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0
    assert (target / MIXED_SHARD).read_bytes() == files[MIXED_SHARD]


def test_dir_of_another_repo_and_bad_names(fake_hub, tmp_path):
    fake_hub.add_repo(REPO, make_repo(np.random.default_rng(10)))
    target = tmp_path / "d"
    target.mkdir()
    (target / "notes.txt").write_text("unrelated files are fine")
    assert cli(REPO, "--endpoint", fake_hub.url, "--dir", str(target)).exit_code == 0
    assert (target / "notes.txt").read_text() == "unrelated files are fine"
    assert_cli_error(cli("org/other", "--endpoint", fake_hub.url, "--dir", str(target)), f"holds a download of {REPO}")
    assert_cli_error(cli("not a repo", "--endpoint", fake_hub.url, "--dir", str(target)), "not a hub repo id")


def test_shard_selection_matches_what_the_converter_reads():
    """A shard is fetched exactly when the converter reads one of its tensors (one rule for both)."""
    from fmoe.convert.download import select_shards

    weight_map = {
        "model.language_model.norm.weight": "a",
        "mtp.fc.weight": "a",
        "model.language_model.mtp.layers.0.x": "b",
        "model.mtp.norm.weight": "b",
        "model.visual.blocks.0.w": "c",
        "vision_tower.patch.weight": "c",
        "lm_head.weight": "d",
    }
    assert select_shards(weight_map, include_unused=False) == (["a", "d"], ["b", "c"])
    assert select_shards(weight_map, include_unused=True) == (["a", "b", "c", "d"], [])
