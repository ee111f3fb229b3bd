"""A decode layer's own time: `fmoe bench synthetic` at two depths, alternating, and the slope.

A slice's "ms a layer" (its token's time over its layers) carries the head (the 248k-vocabulary
lm_head, the embedding, the final norm) and each step's fixed costs, spread over the few layers of
the slice. The time one more layer adds is the difference of two depths over their difference in
layers: what a layer costs at any depth, comparable with a per-layer figure that leaves the head out
(issue 9's llama.cpp figures). Both depths should hold the model's layer pattern whole (multiples
of its full-attention interval: 4 and 8 for the Qwen3.5 presets), so that the extra layers have
the mix of the rest. Each run is its own process; the medians of the rounds are compared.

    python scripts/layer_slope.py [PRESET] [--layers 4 8] [--rounds 2] [--json] -- BENCH ARGS...

e.g. ``python scripts/layer_slope.py qwen3.5-397b-a17b -- --bits 4 --k 10 --prompt-tokens 128
--tokens 64 --cuda-graph --int8-dot``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from typing import Any


def bench(preset: str, layers: int, extra: list[str]) -> dict[str, Any]:
    """One `fmoe bench synthetic --json` run in its own process: its JSON result."""
    cmd = [sys.executable, "-P", "-m", "fmoe", "bench", "synthetic", preset, "--layers", str(layers), "--json", *extra]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {(out.stderr.strip().splitlines() or [''])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def ms_a_token(result: dict[str, Any]) -> float:
    decode = result["decode"]
    if not decode["tokens"]:
        raise SystemExit("error: a run decoded no tokens (--tokens must be at least 1)")
    return 1e3 * decode["seconds"] / decode["tokens"]


def slope(shallow: tuple[int, float], deep: tuple[int, float]) -> tuple[float, float]:
    """(ms a layer, ms a token at no layers: the head and fixed costs) of the line through two
    (layers, ms a token) points."""
    (l0, t0), (l1, t1) = shallow, deep
    per_layer = (t1 - t0) / (l1 - l0)
    return per_layer, t0 - l0 * per_layer


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1 :]
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, nargs=2, default=[4, 8], metavar=("SHALLOW", "DEEP"))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    shallow, deep = args.layers
    if not 1 <= shallow < deep:
        ap.error(f"argument --layers: {shallow} {deep}: need 1 <= SHALLOW < DEEP")
    if args.rounds < 1:
        ap.error(f"argument --rounds: {args.rounds}: must be at least 1")
    if "--layers" in extra or "--json" in extra:
        ap.error("the bench arguments after -- must not set --layers or --json (this script does)")

    times: dict[int, list[float]] = {shallow: [], deep: []}
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        by_depth = {layers: ms_a_token(bench(args.preset, layers, extra)) for layers in (shallow, deep)}
        for layers, ms in by_depth.items():
            times[layers].append(ms)
        per_layer, fixed = slope((shallow, by_depth[shallow]), (deep, by_depth[deep]))
        rounds.append({"round": r + 1, "ms_a_token": by_depth, "ms_a_layer": per_layer, "ms_fixed": fixed})
    med = {layers: statistics.median(ts) for layers, ts in times.items()}
    per_layer, fixed = slope((shallow, med[shallow]), (deep, med[deep]))
    if args.json:
        print(json.dumps({"preset": args.preset, "bench_args": extra, "rounds": rounds, "median": {
            "ms_a_token": med, "ms_a_layer": per_layer, "ms_fixed": fixed}}))  # fmt: skip
        return 0
    print(f"{args.preset}, `fmoe bench synthetic {' '.join(extra)}`, {args.rounds} round(s)")
    cells = ("round", f"{shallow} layers ms", f"{deep} layers ms", "ms a layer", "head+fixed ms")
    print(" ".join(f"{c:>14}" for c in cells))
    for row in [*rounds, {"round": "median", "ms_a_token": med, "ms_a_layer": per_layer, "ms_fixed": fixed}]:
        ms = row["ms_a_token"]
        figures = (ms[shallow], ms[deep], row["ms_a_layer"], row["ms_fixed"])
        print(f"{row['round']:>14} " + " ".join(f"{x:>14.4f}" for x in figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
