"""scripts/cocompute_probe.py's options: bad ones get argparse's one-line error before any GPU is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[1] / "scripts" / "cocompute_probe.py"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown preset 'nope'"),
        (["--k", "0"], "argument --k: must be at least 1"),
        (["--k", "4", "--host", "5"], "argument --host: must lie between 0 and --k (4)"),
        (["--cpu", "1", "-1"], "argument --cpu: counts must not be negative"),
        (["--layers", "0"], "argument --layers: must be at least 1"),
    ],
)
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("cocompute_probe.py: error:")
