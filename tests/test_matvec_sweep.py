"""scripts/matvec_sweep.py's options: bad ones get argparse's one-line error before any GPU is needed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")

SCRIPT = Path(__file__).parents[1] / "scripts" / "matvec_sweep.py"


@pytest.mark.parametrize(
    ("caps", "message"),
    [("x,1", "not a comma-separated list of whole numbers"), ("64,300", "between 16 and 255 registers")],
)
def test_bad_register_caps_get_a_one_line_error(caps: str, message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), "--caps", caps], capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("matvec_sweep.py: error: argument --caps")
