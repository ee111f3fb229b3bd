"""scripts/host_reads_sweep.py: its slot lists and its one-line errors, before any GPU is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from support import load_script

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[1] / "scripts" / "host_reads_sweep.py"


@pytest.mark.parametrize("k", [1, 4, 7, 10])
def test_host_counts_run_from_none_to_all(k: int) -> None:
    counts = load_script("host_reads_sweep").host_counts(k)
    assert counts[0] == 0 and counts[-1] == k and counts == sorted(set(counts))


@pytest.mark.parametrize(("k", "n_host"), [(10, 0), (10, 4), (10, 10), (4, 1)])
def test_call_slots_put_n_host_rows_on_the_host_and_never_reuse_a_row_within_a_window(k: int, n_host: int) -> None:
    calls, n_dev, n_rows = 12, 3 * k, 5 * k
    slots = load_script("host_reads_sweep").call_slots(k, n_host, calls, n_dev, n_rows, seed=3)
    assert len(slots) == calls and all(len(s) == k for s in slots)
    assert all(sum(v <= -2 for v in s) == n_host for s in slots)
    assert all(0 <= v < n_dev or -2 - n_rows < v <= -2 for s in slots for v in s)
    for window, tier in ((n_dev // k, lambda v: v >= 0), (n_rows // k, lambda v: v <= -2)):
        for i in range(calls - window + 1):
            seen = [v for s in slots[i : i + window] for v in s if tier(v)]
            assert len(seen) == len(set(seen))
    if 0 < n_host < k:  # positions drawn, not always the first ones
        assert len({tuple(v <= -2 for v in s) for s in slots}) > 1


@pytest.mark.parametrize(
    ("args", "message"),
    [(["nope"], "unknown preset 'nope'"), (["--k", "0"], "must be at least 1"), (["--bits", "3"], "invalid choice")],
)
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("host_reads_sweep.py: error:")


def test_host_random_experts_repeat_a_block_of_random_files() -> None:
    """The scripts' host slab (runtime/synthetic.py): rows of random expert files, a block of 64
    repeated, in host memory (page-locked only beside a CUDA device)."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.synthetic import host_random_experts, synthetic_config

    layout = ExpertLayout.for_config(synthetic_config("tiny", 1), 4)
    host = host_random_experts(layout, 70, "cpu")
    assert tuple(host.shape) == (70, layout.file_size) and host.device.type == "cpu"
    assert (host[64:70] == host[:6]).all() and not (host[1] == host[0]).all()
