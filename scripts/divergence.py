"""How far the quantised paths drift from the exact one: KL(exact || variant) and top-1 agreement
over every position of a prompt.

The exact path is bf16 dense weights (``--dense-bits 16``) with 4-bit experts of a checkpoint whose
experts lie on the 4-bit grid (so it equals the bf16 model; see tests/test_reference.py). Variants:
4-bit dense weights, 2-bit experts, both, and fewer experts per token (K).

    python scripts/divergence.py [--preset tiny] [--seed 0] [--tokens 64] [--k 1 2] [--workdir DIR] [--json]

Random synthetic weights make the absolute numbers meaningless for a real model; the script is the
same for a real checkpoint's packed directories (``--packed-exact``, ``--packed-dense4``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np


def measure(
    exact_dir: Path,
    dense4_dir: Path | None,
    prompt: np.ndarray,
    ks: list[int],
) -> list[dict[str, Any]]:
    """One row per variant: mean/max KL (nats) and top-1 agreement against the exact path."""
    import fmoe
    from fmoe.runtime.diagnostics import kl_divergence, top1_agreement
    from fmoe.runtime.loader import available_bits

    exact_model = fmoe.load(exact_dir, bits=4)
    exact = exact_model.logits(prompt)
    default_k = exact_model.k
    exact_model.close()

    variants: list[tuple[str, Path, int, int | None]] = []
    if dense4_dir is not None:
        variants.append(("dense 4-bit", dense4_dir, 4, None))
    if 2 in available_bits(exact_dir):
        variants.append(("experts 2-bit", exact_dir, 2, None))
    if dense4_dir is not None and 2 in available_bits(dense4_dir):
        variants.append(("dense 4-bit + experts 2-bit", dense4_dir, 2, None))
    for k in ks:
        if k != default_k:
            variants.append((f"K={k} (default {default_k})", exact_dir, 4, k))

    rows = []
    for name, path, bits, k in variants:
        with fmoe.load(path, bits=bits, k=k) as model:
            approx = model.logits(prompt)
        kl = kl_divergence(exact, approx)
        rows.append(
            {
                "variant": name,
                "positions": len(prompt),
                "kl_mean": float(kl.mean()),
                "kl_max": float(kl.max()),
                "top1": top1_agreement(exact, approx),
            }
        )
    return rows


def measure_synthetic(
    workdir: Path, preset: str = "tiny", seed: int = 0, tokens: int = 64, ks: tuple[int, ...] = (1, 2)
) -> list[dict[str, Any]]:
    """Build the synthetic model's packed directories under ``workdir`` and measure."""
    from fmoe.config import TextConfig
    from fmoe.runtime.diagnostics import build_packed

    src, exact_dir = build_packed(workdir, preset=preset, seed=seed, dense_bits=16, expert_bits=(4, 2))
    _, dense4_dir = build_packed(workdir, preset=preset, seed=seed, dense_bits=4, expert_bits=(4, 2))
    cfg = TextConfig.from_file(src / "config.json")
    prompt = np.random.default_rng(seed + 1).integers(0, cfg.vocab_size, tokens)
    return measure(exact_dir, dense4_dir, prompt, list(ks))


def render(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="divergence from the exact path (bf16 dense, 4-bit on-grid experts)")
    for col in ("variant", "positions", "KL mean (nats)", "KL max", "top-1 agreement"):
        table.add_column(col, justify="left" if col == "variant" else "right")
    for r in rows:
        cells = (str(r["positions"]), f"{r['kl_mean']:.4g}", f"{r['kl_max']:.4g}", f"{r['top1']:.1%}")
        table.add_row(r["variant"], *cells)
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokens", type=int, default=64, help="prompt length (random token ids)")
    ap.add_argument("--k", type=int, nargs="*", default=[1, 2], help="reduced K values to try")
    ap.add_argument("--workdir", type=Path, default=None, help="keep the synthetic artifacts here")
    ap.add_argument("--packed-exact", type=Path, default=None, help="a real model: bf16-dense packed dir")
    ap.add_argument("--packed-dense4", type=Path, default=None, help="a real model: 4-bit-dense packed dir")
    ap.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = ap.parse_args(argv)

    from fmoe.errors import FmoeError

    try:
        if args.packed_exact is not None:
            from fmoe.runtime.loader import load_model

            with load_model(args.packed_exact, warmup=False) as m:
                vocab = m.config.vocab_size
            prompt = np.random.default_rng(args.seed + 1).integers(0, vocab, args.tokens)
            rows = measure(args.packed_exact, args.packed_dense4, prompt, args.k)
        else:
            with tempfile.TemporaryDirectory(prefix="fmoe-divergence-") as tmp:
                rows = measure_synthetic(args.workdir or Path(tmp), args.preset, args.seed, args.tokens, tuple(args.k))
    except FmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        render(rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
