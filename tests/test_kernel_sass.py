"""scripts/kernel_sass.py: the matvec kernel compiled for sm_90 with Triton's own ptxas (no GPU), its
machine code read back and counted. Run as a command: the test session interprets Triton kernels
(TRITON_INTERPRET=1 without a GPU), and the script needs them compiled."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("torch")
triton = pytest.importorskip("triton")
if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
    pytest.skip("this Triton has no bundled ptxas", allow_module_level=True)

SCRIPT = Path(__file__).parents[1] / "scripts" / "kernel_sass.py"


def run(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=300)


def test_every_code_costs_at_least_an_and_and_a_fused_multiply_add() -> None:
    """A real compile: each of a thread's codes needs its own LOP3 (isolating it) and FFMA, so both
    counts reach the thread's share of the tile, and the total per weight is at least 2."""
    done = run("--bits", "4", "--out", "64", "--in", "512", "--hidden", "0", "--json")
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)["rows"]
    assert {r["kernel"] for r in rows} == {"qmatvec"}
    assert rows and rows[0]["heuristic"] and sum(r["heuristic"] for r in rows) == 1
    for r in rows:
        per_thread = r["rows"] * r["words"] * 8 / (32 * r["warps"])  # 8 codes a word at 4 bits
        top = dict(r["top"])
        assert top["FFMA"] >= per_thread and top["LOP3"] >= per_thread
        assert r["per_weight"] >= 2 and r["instructions"] == pytest.approx(r["per_weight"] * per_thread)
        assert 16 <= r["registers"] <= 255 and r["stack"] >= 0  # what sm_90 allows a thread, as cuobjdump reads it


def test_the_expert_kernels_compile_with_their_cap() -> None:
    """gate+up over K pairs (two matrices a tile, the 4-bit register cap) and down+combine over K
    choices and the shared expert: every code of a program costs its thread an AND and an FMA."""
    k, hidden, inter = 3, 512, 128
    done = run("--bits", "4", "--out", "64", "--in", "512", "--hidden", str(hidden), "--inter", str(inter),
               "--k", str(k), "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["kernel"]: r for r in json.loads(done.stdout)["rows"] if r["kernel"] != "qmatvec"}
    assert set(rows) == {"experts_gate_up", "experts_down_combine"}
    codes = {"experts_gate_up": 2 * hidden, "experts_down_combine": (k + 1) * inter}  # a row's codes, all matrices
    for name, r in rows.items():
        per_thread = r["rows"] * codes[name] / (32 * r["warps"])
        top = dict(r["top"])
        assert top["FFMA"] >= per_thread and top["LOP3"] >= per_thread, name
        assert 16 <= r["registers"] <= 255 and r["stack"] >= 0
    assert rows["experts_gate_up"]["register_cap"] == 128 and rows["experts_gate_up"]["registers"] <= 128


def test_the_int8_kernels_take_a_dp4a_for_four_codes() -> None:
    """``--int8``: the int8-activation variants of the three kernels, each with one IDP (dp4a) for
    every four codes of a thread's tile and no FFMA per code (the float kernels' cost)."""
    k, hidden, inter = 3, 512, 128
    done = run("--bits", "2", "--out", "64", "--in", "512", "--hidden", str(hidden), "--inter", str(inter),
               "--k", str(k), "--int8", "--json")  # fmt: skip
    assert done.returncode == 0, done.stderr
    rows = {r["kernel"]: r for r in json.loads(done.stdout)["rows"] if r["kernel"].endswith(" int8")}
    assert set(rows) == {"qmatvec int8", "experts_gate_up int8", "experts_down_combine int8"}
    codes = {"qmatvec int8": 512, "experts_gate_up int8": 2 * hidden, "experts_down_combine int8": (k + 1) * inter}
    for name, r in rows.items():
        per_thread = r["rows"] * codes[name] / (32 * r["warps"])
        ops = r["opcodes"]
        assert ops.get("IDP", 0) >= per_thread / 4 and ops.get("FFMA", 0) < per_thread / 4, (name, ops)
        assert r["stack"] == 0, name
    assert rows["qmatvec int8"]["register_cap"] == 128 and rows["qmatvec int8"]["registers"] <= 128


def test_bad_options_get_a_one_line_error() -> None:
    for args, message in (
        (("--bits", "3"), "unsupported bit width 3"),
        (("--group-size", "12"), "group size 12"),
        (("--in", "100"), "--in 100 must be"),
        (("--out", "0"), "--out 0"),
        (("--hidden", "100"), "--hidden 100 / --inter 1024 must be positive multiples of 64"),
        (("--inter", "-64"), "--hidden 4096 / --inter -64 must be positive multiples of 64"),
        (("--k", "0"), "--k 0 must be at least 1"),
    ):
        done = run(*args)
        assert done.returncode != 0 and message in done.stderr and "Traceback" not in done.stderr
    done = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, env={**os.environ, "TRITON_INTERPRET": "1"}
    )
    assert done.returncode != 0 and "TRITON_INTERPRET" in done.stderr and "Traceback" not in done.stderr
