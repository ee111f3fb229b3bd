"""Atomic writes: a failure (a full disk above all) leaves no file under the final name."""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path

import pytest
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe import fsutil
from fmoe.cli import app
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError


def _disk_full(fd: int) -> None:
    raise OSError(errno.ENOSPC, "No space left on device")


def test_atomic_output_renames_only_on_success(tmp_path: Path) -> None:
    target = tmp_path / "a" / "file.bin"
    with fsutil.atomic_output(target) as f:
        f.write(b"x" * 10)
        assert not target.exists()  # still under a temp name
    assert target.read_bytes() == b"x" * 10
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~_umask()  # not mkstemp's 0600

    with pytest.raises(RuntimeError), fsutil.atomic_output(target) as f:
        f.write(b"partial")
        raise RuntimeError("killed half way")
    assert target.read_bytes() == b"x" * 10  # the finished file is untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["file.bin"]  # no temp litter


def test_full_disk_is_a_one_line_error_and_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(fsutil.os, "fsync", _disk_full)
    target = tmp_path / "out.json"
    with pytest.raises(FmoeError, match=r"out\.json: disk full") as info:
        fsutil.write_json_atomic(target, {"a": 1})
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_extract_on_a_full_disk_fails_cleanly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "src"
    synthesize(src, preset="tiny")
    before = {p.name: p.stat().st_mtime_ns for p in src.iterdir()}
    monkeypatch.setattr(fsutil.os, "fsync", _disk_full)
    result = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "packed")])
    assert result.exit_code != 0
    assert "disk full" in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert_cli_error(result, "disk full")
    packed = tmp_path / "packed"
    leftovers = [p.name for p in packed.rglob("*")] if packed.exists() else []
    assert not [n for n in leftovers if n.endswith((".bin", ".json", ".jinja"))], leftovers
    assert {p.name: p.stat().st_mtime_ns for p in src.iterdir()} == before  # source untouched


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
