"""scripts/projections_bench.py measures the matrices a model has: its sets are the preset's own
projections of one input, shape for shape (from the config, as the weights file is laid out)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.runtime.synthetic import synthetic_config

SCRIPT = Path(__file__).parents[1] / "scripts" / "projections_bench.py"


@pytest.mark.parametrize("preset", ["tiny", "qwen3.5-397b-a17b"])
def test_sets_are_the_models_projections(preset: str) -> None:
    spec = importlib.util.spec_from_file_location("fmoe_projections_bench", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    cfg = synthetic_config(preset, 4)
    shapes = dense_tensor_shapes(cfg)
    linear = next(i for i in range(4) if not cfg.is_full_attention(i))
    full = next(i for i in range(4) if cfg.is_full_attention(i))
    want = {
        "DeltaNet in_proj (qkv, z, b, a)": [f"layers.{linear}.linear_attn.in_proj_{p}" for p in ("qkv", "z", "b", "a")],
        "attention (q + gate, k, v)": [f"layers.{full}.self_attn.{p}_proj" for p in ("q", "k", "v")],
        "router + shared expert gate": [f"layers.{linear}.mlp.{p}" for p in ("gate", "shared_expert_gate")],
    }
    sets = mod.projection_sets(preset)
    assert sets.keys() == want.keys()
    for name, (n_in, rows) in sets.items():
        assert [shapes[f"{t}.weight"] for t in want[name]] == [(r, n_in) for r in rows], name


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["nope"], "unknown preset 'nope'"),
        (["tiny", "--rounds", "0"], "argument --rounds: '0': must be at least 1"),
        (["tiny", "--threads", "x"], "argument --threads: 'x' is not a whole number"),
        (["tiny", "--threads", "100000"], "argument --threads: 100000 is more than numba's"),
    ],
)
def test_bad_options_get_a_one_line_error(args: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert message in done.stderr.strip().splitlines()[-1]
