"""Concurrency and signals: one writer per packed directory (a second is refused at once, naming the
holder), and Ctrl-C during a conversion stops it within moments, exit 130, no temp files, nothing a
later run could take for finished, and the next run resumes and verifies. Everything that could
hang runs under a timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xxhash
from support import assert_cli_error, fresh_seed
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert.extract import extract
from fmoe.convert.repack import repack
from fmoe.convert.synth import synthesize
from fmoe.convert.verify import verify
from fmoe.locking import LOCK_FILE, Interrupted, Stop, directory_lock, run_bounded, sigint_stops

EXIT_WITHIN_S = 5.0  # after SIGINT
FILES = 8 * 15  # the tiny preset: layers x experts


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The whole tiny model (8 layers x 15 experts): a 2-bit repack takes a second or two here."""
    path = tmp_path_factory.mktemp("concurrency") / "src"
    synthesize(path, preset="tiny", seed=fresh_seed("test_concurrency source"))
    return path


def run_cli(*args: object) -> Any:
    return CliRunner().invoke(app, [str(a) for a in args])


def fmoe(*args: object) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "fmoe", *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


def lock_holder(out: Path) -> int | None:
    try:
        return int(json.loads((out / LOCK_FILE).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def wait_for_lock(out: Path, proc: subprocess.Popen[bytes], timeout: float = 20.0) -> bool:
    """Until ``proc`` holds ``out``'s lock (True) or has exited (False)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if lock_holder(out) == proc.pid:
            return True
        if proc.poll() is not None:
            return False
        time.sleep(0.005)
    proc.kill()
    pytest.fail(f"{out}: the process never took the lock")


def check_consistent(out: Path) -> None:
    """What an interrupted run leaves: no temp file; every progress-log line and every manifest
    names files that exist with the recorded hash (nothing a later step could take for good)."""
    assert not list(out.rglob("*.tmp")), list(out.rglob("*.tmp"))
    for d in out.glob("experts-q*"):
        log = d / ".progress.jsonl"
        lines = log.read_text().splitlines() if log.exists() else []
        for line in lines:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            assert xxhash.xxh3_128_hexdigest((d / entry["file"]).read_bytes()) == entry["xxh3_128"]
        if (d / "manifest.json").exists():
            files = json.loads((d / "manifest.json").read_text())["files"]
            for rel, e in files.items():
                assert xxhash.xxh3_128_hexdigest((d / rel).read_bytes()) == e["xxh3_128"], rel
    if (out / "model_weights.json").exists():
        doc = json.loads((out / "model_weights.json").read_text())
        assert xxhash.xxh3_128_hexdigest((out / "model_weights.bin").read_bytes()) == doc["file_xxh3_128"]


# ---- the lock ----------------------------------------------------------------------------------
def test_second_writer_is_refused_naming_the_holder(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    extract(source, out)
    with directory_lock(out, "fmoe repack --bits 4"):
        for args in (("repack", source, "--out", out, "--bits", "4"), ("extract", source, "--out", out)):
            result = run_cli(*args)
            assert_cli_error(result, str(out), f"pid {os.getpid()}", "`fmoe repack --bits 4`", "wait for it")
        # a reader of the directory (requantising its 4-bit experts elsewhere) waits for no writer either
        assert_cli_error(run_cli("repack", out, "--bits", "2", "--out", tmp_path / "q"), str(out), "is writing")
    assert not (out / "experts-q4").exists()
    assert run_cli("repack", source, "--out", out, "--bits", "4").exit_code == 0  # released
    with directory_lock(out, "reader", shared=True):  # readers share; a writer is refused
        with directory_lock(out, "another reader", shared=True):
            pass
        assert_cli_error(run_cli("repack", out, "--bits", "2"), str(out), "is using")
    assert verify(out)["ok"]


def test_new_directory_race_is_refused_not_mistaken(source: Path, tmp_path: Path) -> None:
    """A directory another fmoe is just creating is 'busy', never 'not an fmoe packed directory'."""
    out = tmp_path / "fresh"
    out.mkdir()
    with directory_lock(out, "fmoe extract"):
        (out / ".fmoe.json.abc.tmp").write_text("{")  # its fmoe.json being written
        assert_cli_error(run_cli("extract", source, "--out", out), "pid", "wait for it")
    (out / ".fmoe.json.abc.tmp").unlink()
    assert run_cli("extract", source, "--out", out).exit_code == 0


def test_two_processes_race(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "p"
    first = fmoe("repack", source, "--out", out, "--bits", "2", "--workers", "1")
    try:
        held = wait_for_lock(out, first)
        second = fmoe("repack", source, "--out", out, "--bits", "2")
        _, err2 = second.communicate(timeout=30)
        still_running = first.poll() is None
        _, err1 = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0, err1.decode()
    if held and still_running:  # the second came while the first held the lock
        lines = [x for x in err2.decode().splitlines() if x.strip()]
        assert second.returncode == 1 and len(lines) == 1, err2.decode()
        assert f"pid {first.pid}" in lines[0] and str(out) in lines[0]
    assert "Traceback" not in err2.decode()
    check_consistent(out)
    assert json.loads((out / "experts-q2" / "manifest.json").read_text())["files"]


# ---- stopping, in process ----------------------------------------------------------------------
def test_run_bounded_error_cancels_the_rest_promptly() -> None:
    stop = Stop()
    started: list[int] = []

    def work(i: int) -> None:
        started.append(i)
        if i == 3:
            raise ValueError("bad item")
        for _ in range(50):  # a long item that checks the flag
            stop.check()
            time.sleep(0.01)

    t0 = time.monotonic()
    with pytest.raises(ValueError, match="bad item"):
        run_bounded(work, [(i,) for i in range(200)], workers=2, stop=stop, name="fmoe-test")
    assert time.monotonic() - t0 < 3 and len(started) < 20 and stop.is_set()
    assert not [t for t in threading.enumerate() if t.name.startswith("fmoe-test")]


def test_sigint_sets_the_flag_and_leaves_through_interrupted() -> None:
    """A real SIGINT to this process while its main thread waits on a pool: no KeyboardInterrupt in
    a random place, the pool stops within one item, the handler is restored."""
    stop = Stop()
    done: list[int] = []

    def work(i: int) -> None:
        for _ in range(20):
            stop.check()
            time.sleep(0.01)
        done.append(i)

    before = signal.getsignal(signal.SIGINT)
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
    timer.start()
    t0 = time.monotonic()
    with pytest.raises(Interrupted), sigint_stops(stop):
        run_bounded(work, [(i,) for i in range(500)], workers=2, stop=stop, name="fmoe-sig")
    timer.join()
    assert time.monotonic() - t0 < 3 and 0 < len(done) < 100
    assert signal.getsignal(signal.SIGINT) is before
    assert not [t for t in threading.enumerate() if t.name.startswith("fmoe-sig")]


# ---- Ctrl-C on the real CLI, many times --------------------------------------------------------
def test_sigint_at_random_points_then_resume(source: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(fresh_seed("test_sigint_at_random_points"))
    out = tmp_path / "p"
    commands = [
        ("repack", source, "--out", out, "--bits", "2", "--workers", "2"),
        ("repack", source, "--out", out, "--bits", "4", "--workers", "2"),
        ("extract", source, "--out", out, "--dense-bits", "8"),
    ]
    outcomes: list[str] = []
    deadline = time.monotonic() + 40
    for _ in range(14):
        if time.monotonic() > deadline:
            break
        # mostly the long 2-bit repack; resuming an interrupted run, or redoing a finished one
        k = int(rng.choice(3, p=[0.6, 0.2, 0.2]))
        finished = out / ("model_weights.json" if k == 2 else f"experts-q{4 if k else 2}/manifest.json")
        redo = finished.exists() or (k == 0 and rng.random() < 0.5)
        proc = fmoe(*commands[k], *(["--overwrite"] if redo else []))
        args = commands[k]
        try:
            wait_for_lock(out, proc)
            time.sleep(float(rng.uniform(0.0, 0.5)))
            proc.send_signal(signal.SIGINT)
            sent = time.monotonic()
            stdout, stderr = proc.communicate(timeout=EXIT_WITHIN_S + 5)
            took = time.monotonic() - sent
        finally:
            proc.kill()
        err = stderr.decode()
        lines = [x for x in err.splitlines() if x.strip()]
        assert "Traceback" not in err, err
        assert took < EXIT_WITHIN_S, (args, took)
        if proc.returncode == 130:  # one error line (after the bar of a phase that did finish, if any)
            assert lines[-1].startswith("error:") and "interrupted" in lines[-1], err
            assert all("━" in x for x in lines[:-1]), err
            outcomes.append("interrupted")
        else:  # the signal came after the work was done: a finished run (or Python's own exit)
            assert proc.returncode in (0, -signal.SIGINT), (proc.returncode, err)
            assert stdout.strip(), err
            outcomes.append("finished")
        check_consistent(out)
    assert outcomes.count("interrupted") >= max(3, len(outcomes) // 3), outcomes

    # every run from here resumes what the interrupted ones finished and completes
    log = out / "experts-q2" / ".progress.jsonl"
    logged = len({json.loads(x)["file"] for x in log.read_text().splitlines()}) if log.exists() else 0
    report = repack(source, out, bits=2, workers=2)
    assert report["written"] == (0 if report["skipped"] else FILES - logged)
    repack(source, out, bits=4, workers=2)
    extract(source, out, dense_bits=8)
    report = verify(out)
    assert report["ok"], report["bad"]
    assert report["expert_bits"] == [2, 4]
