"""Two fmoe builds, or two settings, side by side: `fmoe bench model --json` on one packed model,
alternating A and B for several rounds, then the median of each and the ratio B / A. For "not
slower" claims across a change (build A from the old commit, B from the new one), or for the cost of
an option (``--a-args "--checks off"``), on one machine in one run.

A build is a directory that `python -c 'import fmoe'` finds it in (``--a-path DIR`` puts DIR first
on PYTHONPATH, e.g. a ``pip install --no-deps --target DIR`` of the old commit; "installed" uses
what is installed). Each run is its own process, started from a neutral working directory.

    python scripts/bench_ab.py PACKED --a-path /tmp/old-site --b-path installed [--rounds 3]
                               [--tokens 32] [--prompt-tokens 128] [--a-args "..."] [--b-args "..."] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def run_bench(packed: Path, path: str, args: list[str]) -> dict[str, Any]:
    env = dict(os.environ)
    if path != "installed":
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(Path(path).resolve()), env.get("PYTHONPATH")) if p)
    cmd = [sys.executable, "-P", "-m", "fmoe", "bench", "model", str(packed.resolve()), "--json", *args]
    with tempfile.TemporaryDirectory() as cwd:
        out = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def summarise(runs: list[dict[str, Any]]) -> dict[str, float]:
    def med(kind: str, key: str) -> float:
        return statistics.median(r[kind][key] for r in runs)

    return {
        "prefill_tok_s": med("prefill", "tokens_per_second"),
        "decode_tok_s": med("decode", "tokens_per_second"),
        "decode_ms_per_token": 1e3 / med("decode", "tokens_per_second"),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", type=Path)
    ap.add_argument("--a-path", default="installed", help="build A: a directory for PYTHONPATH, or 'installed'")
    ap.add_argument("--b-path", default="installed", help="build B: likewise")
    ap.add_argument("--a-args", default="", help="more `fmoe bench model` arguments for A only")
    ap.add_argument("--b-args", default="", help="more `fmoe bench model` arguments for B only")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    bench_args = ["--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens)]
    a_args, b_args = [*bench_args, *shlex.split(args.a_args)], [*bench_args, *shlex.split(args.b_args)]
    runs: dict[str, list[dict[str, Any]]] = {"A": [], "B": []}
    for _ in range(args.rounds):  # alternating, so drifting machine load hits both alike
        runs["A"].append(run_bench(args.packed, args.a_path, a_args))
        runs["B"].append(run_bench(args.packed, args.b_path, b_args))
    a, b = summarise(runs["A"]), summarise(runs["B"])
    doc = {
        "packed": str(args.packed),
        "rounds": args.rounds,
        "args": bench_args,
        "A": {"path": args.a_path, "args": args.a_args, **a, "runs": [summarise([r]) for r in runs["A"]]},
        "B": {"path": args.b_path, "args": args.b_args, **b, "runs": [summarise([r]) for r in runs["B"]]},
        "ratio_b_over_a": {k: b[k] / a[k] for k in ("prefill_tok_s", "decode_tok_s")},
    }
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.packed}: median of {args.rounds} alternating rounds", title_justify="left")
    for col in ("build", "prefill tok/s", "decode tok/s", "decode ms/token", "decode tok/s per round"):
        table.add_column(col, justify="left" if col == "build" else "right")
    for name, s in (
        ("A " + f"{args.a_path} {args.a_args}".strip(), doc["A"]),
        ("B " + f"{args.b_path} {args.b_args}".strip(), doc["B"]),
    ):
        rounds = " ".join(f"{r['decode_tok_s']:.1f}" for r in s["runs"])
        table.add_row(
            name, f"{s['prefill_tok_s']:.1f}", f"{s['decode_tok_s']:.2f}", f"{s['decode_ms_per_token']:.1f}", rounds
        )
    r = doc["ratio_b_over_a"]
    table.add_row("B / A", f"{r['prefill_tok_s']:.3f}", f"{r['decode_tok_s']:.3f}", "", "", style="bold")
    Console().print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
