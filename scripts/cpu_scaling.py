"""How decode and prefill scale with the CPU threads: `fmoe bench model` at several thread counts,
alternating rounds, medians, and each count's speed-up over the first, its share of the decode
ceiling that count's measured memory bandwidth allows, and the decode's time by phase (the phases
that do not shrink with the threads are where the scaling goes).

    python scripts/cpu_scaling.py PACKED [--threads 2 4 8 16] [--rounds 2] [--tokens 32]
                                  [--prompt-tokens 64] [--bench-args "..."] [--json]
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any


def bench(packed: Path, threads: int, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [
        sys.executable, "-P", "-m", "fmoe", "bench", "model", str(packed.resolve()), "--threads", str(threads),
        "--tokens", str(args.tokens), "--prompt-tokens", str(args.prompt_tokens), "--json",
        *shlex.split(args.bench_args),
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir())
    if out.returncode != 0:
        raise SystemExit(f"error: {' '.join(cmd)}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", type=Path)
    ap.add_argument("--threads", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=64)
    ap.add_argument("--bench-args", default="", help="more `fmoe bench model` arguments, e.g. '--cache-gb 8'")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    runs: dict[int, list[dict[str, Any]]] = {t: [] for t in args.threads}
    for _ in range(args.rounds):
        for t in args.threads:
            runs[t].append(bench(args.packed, t, args))
    rows = []
    for t in args.threads:
        rs = runs[t]
        decode = statistics.median(r["decode"]["tokens_per_second"] for r in rs)
        rows.append(
            {
                "threads": t,
                "prefill_tok_s": statistics.median(r["prefill"]["tokens_per_second"] for r in rs),
                "decode_tok_s": decode,
                "decode_ms_per_token": 1e3 / decode,
                "memory_read_gb_per_s": statistics.median(r["memory_read_gb_per_s"] or 0.0 for r in rs),
                "decode_ceiling_tok_s": statistics.median(r["decode_ceiling_tok_s"] or 0.0 for r in rs),
                "phases_ms_per_token": {
                    p: statistics.median(r["decode"]["profile"]["phases"][p] for r in rs) * 1e3 / args.tokens
                    for p in rs[0]["decode"]["profile"]["phases"]
                },
            }
        )
    base = rows[0]
    for r in rows:
        r["decode_speedup"] = r["decode_tok_s"] / base["decode_tok_s"]
        r["prefill_speedup"] = r["prefill_tok_s"] / base["prefill_tok_s"]
    if args.json:
        print(
            json.dumps({"packed": str(args.packed), "rounds": args.rounds, "bench_args": args.bench_args, "rows": rows})
        )
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{args.packed}: threads, median of {args.rounds} alternating rounds {args.bench_args}")
    cols = ("threads", "prefill tok/s", "x", "decode tok/s", "x", "ms/token", "memory GB/s", "ceiling tok/s", "of it")
    for col in cols:
        table.add_column(col, justify="right")
    for r in rows:
        share = r["decode_tok_s"] / r["decode_ceiling_tok_s"] if r["decode_ceiling_tok_s"] else float("nan")
        table.add_row(
            str(r["threads"]), f"{r['prefill_tok_s']:.1f}", f"{r['prefill_speedup']:.2f}", f"{r['decode_tok_s']:.2f}",
            f"{r['decode_speedup']:.2f}", f"{r['decode_ms_per_token']:.1f}", f"{r['memory_read_gb_per_s']:.1f}",
            f"{r['decode_ceiling_tok_s']:.1f}", f"{share:.0%}",
        )  # fmt: skip
    # the phases that do not shrink with the threads are where the scaling goes
    phases = Table(title="decode ms a token by phase, by threads")
    phases.add_column("phase")
    for r in rows:
        phases.add_column(str(r["threads"]), justify="right")
    for name in sorted(base["phases_ms_per_token"], key=lambda p: -base["phases_ms_per_token"][p]):
        phases.add_row(name, *(f"{r['phases_ms_per_token'].get(name, 0.0):.2f}" for r in rows))
    Console().print(table, phases)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
