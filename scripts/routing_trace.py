"""Record a model's routing over a text and report how real it is: per-layer expert popularity,
token-to-token reuse and the hit rate of a per-layer LRU cache, each beside uniform random routing.

    python scripts/routing_trace.py PACKED --out trace.npz [--text FILE] [--tokens 8192] [--ctx 512]
                                    [--bits 4] [--k K] [--json]
    python scripts/routing_trace.py --read trace.npz [--json]     # the report of a recorded trace

The trace format (for the benchmarks' ``--routing trace:FILE``) is documented in
runtime/routing_trace.py and docs/QUALITY.md. Default text: the reference model's held-out files.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def render(trace: Any, rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    caps = list(rows[0]["lru"])
    title = (
        f"routing of {trace.tokens} tokens ({len(trace.starts)} sequences), {trace.num_layers} layers, "
        f"{trace.num_experts} experts, top-{trace.k}; uniform routing beside each figure"
    )
    table = Table(title=title)
    heads = ["layer", "top expert share", "effective experts", "max / min load", "reuse (uniform)"]
    heads += [f"LRU {c} hit (uniform)" for c in caps]
    for h in heads:
        table.add_column(h, justify="right")
    for r in rows:
        cells = [
            str(r["layer"]),
            f"{r['top_share']:.1%}",
            f"{r['effective_experts']:.1f} / {trace.num_experts}",
            f"{r['max_load']:.2f} / {r['min_load']:.2f}",
            f"{r['reuse']:.1%} ({r['reuse_uniform']:.1%})",
        ]
        cells += [f"{r['lru'][c]['trace']:.1%} ({r['lru'][c]['uniform']:.1%})" for c in caps]
        table.add_row(*cells)
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("packed", type=Path, nargs="?", help="packed model directory")
    ap.add_argument("--out", type=Path, help="write the trace here (.npz)")
    ap.add_argument("--read", type=Path, help="report on a recorded trace instead")
    ap.add_argument("--text", type=Path, default=None, help="UTF-8 text (default: held-out files)")
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512, help="tokens per sequence (each from a fresh state)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=None, help="experts per token (default: the model's)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    import numpy as np

    from fmoe.errors import FmoeError
    from fmoe.runtime.routing_trace import RoutingTrace, record

    try:
        if args.read is not None:
            trace = RoutingTrace.load(args.read)
        else:
            if args.packed is None or args.out is None:
                raise FmoeError("give PACKED and --out FILE.npz (or --read FILE.npz)")
            if args.tokens < 2 or args.ctx < 2:
                raise FmoeError("--tokens and --ctx: must be at least 2")
            import fmoe
            from fmoe.runtime.eval import read_text

            body, label = read_text(args.text)
            with fmoe.load(args.packed, bits=args.bits, k=args.k) as engine:
                ids = np.asarray(engine.tokenizer.encode(body)[: args.tokens], dtype=np.int64)
                trace = record(engine, ids, args.ctx, text=label)
            trace.save(args.out)
        rows = trace.summary()
    except FmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"meta": trace.meta, "tokens": trace.tokens, "layers": rows}, indent=1))
    else:
        render(trace, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
