"""scripts/prefill_wall.py: its timing loop on fake events, and its one-line errors, before any GPU is needed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from support import load_script

SCRIPT = Path(__file__).parents[1] / "scripts" / "prefill_wall.py"


class FakeEvent:
    """A timing event on the host clock (elapsed_time in ms, as CUDA events give it)."""

    def record(self) -> None:
        self.t = time.perf_counter()

    def elapsed_time(self, other: FakeEvent) -> float:
        return 1e3 * (other.t - self.t)


def test_each_run_times_the_wall_the_host_issue_and_the_gpu() -> None:
    """A pass whose host part takes 20 ms and whose "device" finishes 30 ms later (the sync): the wall
    covers both, the issue time only the host part, the events what lies between them."""
    waits: list[str] = []
    forward = lambda: (time.sleep(0.02), waits.append("forward"))  # noqa: E731
    sync = lambda: (time.sleep(0.03 if waits and waits[-1] == "forward" else 0), waits.append("sync"))  # noqa: E731
    rows = load_script("prefill_wall").timed_runs(forward, 3, FakeEvent, sync)
    assert len(rows) == 3 and waits == ["sync", "forward", "sync"] * 3
    for wall, issue, gpu in rows:
        assert 19 < issue < wall and 19 < gpu <= issue + 1 and wall > issue + 25


@pytest.mark.parametrize(
    ("args", "message"),
    [(["nope"], "unknown preset 'nope'"), (["--runs", "0"], "--runs: must be at least 1"),
     (["--prompt", "0"], "--prompt: must be at least 1")],
)  # fmt: skip
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("prefill_wall.py: error:")
