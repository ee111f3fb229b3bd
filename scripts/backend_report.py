"""Each backend against transformers' Qwen3_5MoeForCausalLM on a synthetic model, through the real
pipeline (synth --on-grid -> extract --dense-bits 16 -> repack --bits 4 -> fmoe.load): prefill
relative error, greedy tokens identical, decode-step relative error. A correctness record for
docs/PERFORMANCE.md (the tests assert the same bounds); not a benchmark.

    python scripts/backend_report.py [--backends cpu torch-cpu torch-cuda] [--preset tiny] [--seed 3]
                                     [--prompt-tokens 16] [--tokens 64] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

OPTIONS = {
    "cpu": {"backend": "cpu"},
    "cpu-reference": {"backend": "cpu", "backend_options": {"kernels": "reference"}},
    "torch-cpu": {"backend": "torch", "device": "cpu"},
    "torch-cuda": {"backend": "torch", "device": "cuda"},
    "mlx": {"backend": "mlx"},
}


def report(workdir: Path, backends: list[str], preset: str, seed: int, prompt_tokens: int, tokens: int) -> dict:
    import fmoe
    from fmoe.config import TextConfig
    from fmoe.runtime.diagnostics import build_packed, fmoe_greedy, reference_greedy, relative_error

    src, packed = build_packed(workdir, preset=preset, seed=seed, dense_bits=16, expert_bits=(4,))
    cfg = TextConfig.from_file(src / "config.json")
    prompt = np.random.default_rng(seed + 74).integers(0, cfg.vocab_size, prompt_tokens)
    ref = reference_greedy(src, prompt, tokens)
    rows: list[dict[str, Any]] = []
    for name in backends:
        with fmoe.load(packed, bits=4, **OPTIONS[name]) as model:
            run = fmoe_greedy(model, prompt, tokens)
            device = model.device
        same = run.tokens == ref.tokens
        rows.append(
            {
                "backend": name,
                "device": device,
                "prefill_rel_err": float(relative_error(run.prefill_logits, ref.prefill_logits).max()),
                "decode_rel_err": float(relative_error(run.step_logits, ref.step_logits).max()),
                "greedy_identical": int(np.cumprod(same).sum()),
                "greedy_tokens": tokens,
            }
        )
    return {"preset": preset, "seed": seed, "prompt_tokens": prompt_tokens, "machine": platform.node(), "rows": rows}


def render(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"{doc['preset']} (seed {doc['seed']}), {doc['prompt_tokens']}-token prompt, against transformers",
        title_justify="left",
    )
    for col in ("backend", "device", "prefill max rel err", "decode max rel err", "greedy identical"):
        table.add_column(col, justify="left" if col in ("backend", "device") else "right")
    for r in doc["rows"]:
        table.add_row(
            r["backend"],
            r["device"],
            f"{r['prefill_rel_err']:.2e}",
            f"{r['decode_rel_err']:.2e}",
            f"{r['greedy_identical']}/{r['greedy_tokens']}",
        )
    Console().print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch-cpu"], choices=sorted(OPTIONS))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    from fmoe.errors import FmoeError

    try:
        with tempfile.TemporaryDirectory(prefix="fmoe-backends-") as tmp:
            doc = report(
                args.workdir or Path(tmp), args.backends, args.preset, args.seed, args.prompt_tokens, args.tokens
            )
    except FmoeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        render(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
