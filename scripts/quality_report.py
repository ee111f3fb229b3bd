"""docs/QUALITY.md's table: every quantisation and K variant of the reference model against its bf16
source (transformers, float32), with one reference pass shared by all (``fmoe eval --save-reference``).

    python scripts/quality_report.py [--workdir /tmp/fmoe-quality] [--tokens 32768] [--calls 100] [--threads 1] [--json]

Packed directories made under the workdir (each with `fmoe extract` / `fmoe repack`):

- ``d16``: dense bf16; 4-bit experts from the source; 2-bit requantised from the packed 4-bit ones
  (clip search: `fmoe repack PACKED --bits 2`, the documented flow);
- ``d16-src2``: dense bf16; 2-bit experts quantised from the bf16 source (clip search);
- ``d16-minmax2``: dense bf16; 2-bit from the packed 4-bit ones with plain min/max (the seed's
  method; fmoe's repack has no switch for it, so this script forces its method);
- ``d8``, ``d4``: dense 8- and 4-bit (`--dense-bits`; 4 is extract's default), 4-bit experts (d4 also 2-bit).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


@contextmanager
def minmax_2bit() -> Iterator[None]:
    """Make repack quantise 2-bit experts with min/max instead of its clip search."""
    from fmoe.convert import repack as R

    original = R._Options

    def forced(*args: Any, **kwargs: Any) -> Any:
        opt = original(*args, **kwargs)
        return dataclasses.replace(opt, method="minmax") if opt.method == "clip-search" else opt

    R._Options = forced  # type: ignore[misc,assignment]
    try:
        yield
    finally:
        R._Options = original  # type: ignore[misc]


def build(work: Path, source: Path) -> dict[str, Path]:
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack

    dirs = {name: work / name for name in ("d16", "d16-src2", "d16-minmax2", "d8", "d4")}
    for name, dense in (("d16", 16), ("d16-src2", 16), ("d16-minmax2", 16), ("d8", 8), ("d4", 4)):
        extract(source, dirs[name], dense_bits=dense)
    for name in ("d16", "d16-minmax2", "d8", "d4"):
        repack(source, dirs[name], bits=4)
    repack(dirs["d16"], dirs["d16"], bits=2)
    repack(dirs["d4"], dirs["d4"], bits=2)
    repack(source, dirs["d16-src2"], bits=2)
    with minmax_2bit():
        repack(dirs["d16-minmax2"], dirs["d16-minmax2"], bits=2)
    return dirs


PLAN: list[tuple[str, list[int], list[int | None]]] = [
    ("d16", [4, 2], [None, 3, 2, 1]),
    ("d16-src2", [2], [None]),
    ("d16-minmax2", [2], [None]),
    ("d8", [4], [None]),
    ("d4", [4, 2], [None]),
]
NAMES = {
    ("d16", 4): "experts 4-bit",
    ("d16", 2): "experts 2-bit clip search (from packed 4-bit)",
    ("d16-src2", 2): "experts 2-bit clip search (from bf16)",
    ("d16-minmax2", 2): "experts 2-bit min/max (from packed 4-bit; the seed's)",
    ("d8", 4): "dense 8-bit, experts 4-bit",
    ("d4", 4): "dense 4-bit, experts 4-bit (extract's default)",
    ("d4", 2): "dense 4-bit, experts 2-bit (the demo's 2-bit)",
}


def markdown(report: list[dict[str, Any]], ref: dict[str, Any]) -> str:
    lines = [
        "| variant | dense | K | PPL | ln(PPL/PPL_bf16) | KL mean | KL median | KL p99 | KL max | same top | Δp "
        "| calls well-formed | calls as bf16 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        f"| bf16 (transformers, float32) | bf16 | 4 | {ref['ppl']:.3f} | 0 | 0 | 0 | 0 | 0 | 100% | 0 | "
        f"{ref.get('calls', {}).get('well_formed', 0):.0%} | 100% |",
    ]
    for r in report:
        c = r.get("calls", {})
        lines.append(
            f"| {r['name']} | {r['dense_bits']} | {r['k']} | {r['ppl']:.3f} | {r['ln_ppl_ratio']:+.4f} "
            f"| {r['kl_mean']:.4f} ± {r['kl_mean_se']:.4f} | {r['kl_median']:.4f} | {r['kl_p99']:.3f} "
            f"| {r['kl_max']:.3f} | {r['same_top']:.1%} | {r['dp_mean']:+.2%} "
            f"| {c.get('well_formed', 0):.0%} | {c.get('as_reference', 0):.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fmoe-quality"))
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calls", type=int, default=100)
    ap.add_argument("--threads", type=int, default=1, help="compute threads of each engine")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)

    from fmoe.errors import FmoeError
    from fmoe.runtime.eval import evaluate, reference_model_dir

    source = reference_model_dir()
    try:
        dirs = build(args.workdir, source)
        saved = args.workdir / f"reference-{args.tokens}-{args.ctx}-{args.calls}.npz"
        rows: list[dict[str, Any]] = []
        ref_info: dict[str, Any] = {}
        for name, bits, ks in PLAN:
            reference = saved if saved.is_file() else source
            report = evaluate(
                dirs[name],
                reference=reference,
                bits=bits,
                ks=ks,
                tokens=args.tokens,
                ctx=args.ctx,
                calls=args.calls,
                save_reference=None if saved.is_file() else saved,
                load_options={"threads": args.threads},
            )
            ref_info = {**report["reference"], "positions": report["positions"], "text": report["text"]}
            for r in report["variants"]:
                label = NAMES[(name, r["bits"])] + ("" if r["k"] == 4 else f", K={r['k']}")
                rows.append({"name": label, "dir": name, **r})
            print(f"done: {name}", file=sys.stderr, flush=True)
    except FmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    doc = {"reference": ref_info, "tokens": args.tokens, "ctx": args.ctx, "variants": rows}
    (args.workdir / "quality.json").write_text(json.dumps(doc, indent=1))
    print(json.dumps(doc, indent=1) if args.json else markdown(rows, ref_info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
