"""The `fmoe` entry point: usage mistakes are one line naming the command and option, exit 2."""

from __future__ import annotations

import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fmoe", *args], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("run", "somewhere", "--prompt", "hi", "--bits", "abc"), "fmoe run: Invalid value for '--bits'"),
        (("run",), "fmoe run: Missing argument"),
        (("verify", "x", "--no-such-option"), "fmoe verify: No such option: --no-such-option"),
        (("no-such-command",), "No such command 'no-such-command'"),
    ],
)
def test_usage_mistakes_are_one_line(args: tuple[str, ...], expected: str) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and expected in lines[0], lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_download_workers_checked_before_any_request() -> None:
    result = run_cli("download", "org/name", "--workers", "0", "--endpoint", "http://127.0.0.1:9")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: --workers 0: must be at least 1"]


def test_help_and_user_errors_through_the_entry_point(tmp_path) -> None:
    helped = run_cli("--help")
    assert helped.returncode == 0 and "synth" in helped.stdout and "run" in helped.stdout
    missing = run_cli("verify", str(tmp_path / "nope"))
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [f"error: {tmp_path / 'nope'}: no such directory"]
