"""Each backend and kernel path against an independent float64 reference and against transformers'
Qwen3_5MoeForCausalLM on a synthetic model, through the real pipeline (synth --on-grid -> extract
--dense-bits 16 -> repack --bits 4 -> fmoe.load): prefill and decode-step relative error, greedy
tokens identical. A correctness record for docs/PERFORMANCE.md; not a benchmark.

The float64 reference (fmoe.runtime.diagnostics.float64_reference) runs on the packed model's own
weights (bf16 dense values, 4-bit experts, dequantised to float64), so it measures the kernels'
arithmetic alone. It is evaluated on each backend's own sequence (the prompt, then the tokens that
backend chose), so every logit is compared on the ids the backend saw; a greedy token agrees when it
is the reference's argmax there, and the leading agreements are the length of the common prefix of
the backend's greedy run and the reference's. The process exits 1 when a row is above ``--bound`` or
its greedy tokens are not all the reference's. Transformers (float32) is the second, informational
reference; its columns are n/a where it is not installed.

Paths: ``torch-cuda`` every expert resident on the device; ``-graph`` decode replayed from CUDA
graphs; ``-streamed`` a device tier of one and a half layers' experts (misses copied in from the
host); ``-host-share`` half of the misses computed on the host; ``-direct`` as many device slots,
every other expert read by the kernels from page-locked host memory in place (``--host-reads
direct``); ``-direct-cocompute`` half of each decode layer's host-homed experts computed by host
workers from that memory meanwhile (``--host-compute 0.5``). ``torch-cpu-streamed``,
``torch-cpu-host-share`` and ``torch-cpu-direct`` are the same tiers on the CPU (no CUDA graphs
there), for machines without a GPU. ``torch-cuda-int8`` and ``cpu-int8``: ``--int8-dot`` (activations
rounded to int8: an error of its own, above the bound).

    python scripts/backend_report.py [--backends cpu torch-cpu torch-cuda ...] [--preset tiny] [--seed 3]
                                     [--prompt-tokens 16] [--tokens 64] [--bound 1e-3] [--workdir DIR] [--json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

_STREAMED = {"device_cache_bytes": "streamed"}  # replaced by one and a half layers' expert files at load
OPTIONS: dict[str, dict[str, Any]] = {
    "cpu": {"backend": "cpu"},
    "cpu-reference": {"backend": "cpu", "backend_options": {"kernels": "reference"}},
    "torch-cpu": {"backend": "torch", "device": "cpu"},
    "torch-cpu-streamed": {"backend": "torch", "device": "cpu", **_STREAMED},
    "torch-cpu-host-share": {"backend": "torch", "device": "cpu", **_STREAMED, "host_compute": 0.5},
    "torch-cuda": {"backend": "torch", "device": "cuda"},
    "torch-cuda-graph": {"backend": "torch", "device": "cuda", "cuda_graph": True},
    "torch-cuda-streamed": {"backend": "torch", "device": "cuda", "cuda_graph": True, **_STREAMED},
    "torch-cuda-host-share": {
        "backend": "torch",
        "device": "cuda",
        "cuda_graph": True,
        **_STREAMED,
        "host_compute": 0.5,
    },
    "torch-cpu-direct": {"backend": "torch", "device": "cpu", **_STREAMED, "host_reads": "direct"},
    "torch-cuda-direct": {
        "backend": "torch",
        "device": "cuda",
        "cuda_graph": True,
        **_STREAMED,
        "host_reads": "direct",
    },
    "torch-cuda-direct-cocompute": {
        "backend": "torch",
        "device": "cuda",
        "cuda_graph": True,
        **_STREAMED,
        "host_reads": "direct",
        "host_compute": 0.5,
    },
    "torch-cuda-int8": {"backend": "torch", "device": "cuda", "cuda_graph": True, "backend_options": {"int8": True}},
    "cpu-int8": {"backend": "cpu", "backend_options": {"int8": True}},
    "mlx": {"backend": "mlx"},
}
BITS = 4


def load_options(name: str, file_size: int, num_experts: int) -> dict[str, Any]:
    """fmoe.load's keywords for the row ``name``, the streamed tier sized from the expert files."""
    options = dict(OPTIONS[name])
    if options.get("device_cache_bytes") == "streamed":
        options["device_cache_bytes"] = file_size * (num_experts + num_experts // 2)
    return options


def transformers_available() -> bool:
    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers"))


def report(workdir: Path, backends: list[str], preset: str, seed: int, prompt_tokens: int, tokens: int) -> dict:
    import fmoe
    from fmoe.formats.expert_manifest import ExpertManifest
    from fmoe.runtime.diagnostics import (
        build_packed,
        float64_reference,
        fmoe_greedy,
        packed_weights,
        reference_greedy,
        relative_error,
    )

    src, packed = build_packed(workdir, preset=preset, seed=seed, dense_bits=16, expert_bits=(BITS,))
    cfg, dense, experts = packed_weights(packed, BITS)
    file_size = ExpertManifest.read(packed, cfg, BITS).layout.file_size
    prompt = np.random.default_rng(seed + 74).integers(0, cfg.vocab_size, prompt_tokens)
    ref = reference_greedy(src, prompt, tokens) if transformers_available() else None
    f64_runs: dict[tuple[int, ...], np.ndarray] = {}  # by sequence: backends that agree share one run
    rows: list[dict[str, Any]] = []
    for name in backends:
        options = load_options(name, file_size, cfg.num_experts)
        with fmoe.load(packed, bits=BITS, **options) as model:
            run = fmoe_greedy(model, prompt, tokens)
            device = model.device
            stats = model.runner.store.stats.to_dict()
        seen = tuple(int(t) for t in (*prompt, *run.tokens[:-1]))  # the ids the backend was fed
        if seen not in f64_runs:
            f64_runs[seen] = float64_reference(cfg, dense, experts, seen, model.k)[0]
        exact = f64_runs[seen]
        f64_steps = exact[prompt_tokens - 1 :]
        row: dict[str, Any] = {
            "backend": name,
            "device": device,
            "options": options,
            "f64_prefill_rel_err": float(relative_error(run.prefill_logits, exact[:prompt_tokens]).max()),
            "f64_decode_rel_err": float(relative_error(run.step_logits, f64_steps).max()),
            "f64_greedy_identical": int(np.cumprod(run.tokens == np.argmax(f64_steps, axis=-1)).sum()),
            "prefill_rel_err": None,
            "decode_rel_err": None,
            "greedy_identical": None,
            "greedy_tokens": tokens,
            "experts_requested": stats["requested"],
            "experts_served": {tier: t["served"] for tier, t in stats["tiers"].items()},
            "experts_host_computed": stats["host_computed"],
        }
        if ref is not None:
            row["prefill_rel_err"] = float(relative_error(run.prefill_logits, ref.prefill_logits).max())
            row["decode_rel_err"] = float(relative_error(run.step_logits, ref.step_logits).max())
            row["greedy_identical"] = int(np.cumprod(run.tokens == ref.tokens).sum())
        rows.append(row)
    return {
        "preset": preset,
        "seed": seed,
        "prompt_tokens": prompt_tokens,
        "machine": platform.node(),
        "transformers": ref is not None,
        "rows": rows,
    }


def failures(doc: dict, bound: float) -> list[str]:
    """One line per row above ``bound`` against the float64 reference or off its greedy tokens."""
    out = []
    for r in doc["rows"]:
        worst = max(r["f64_prefill_rel_err"], r["f64_decode_rel_err"])
        if not worst <= bound:  # NaN fails too
            out.append(f"{r['backend']}: max relative error {worst:.2e} against float64, above {bound:.0e}")
        if r["f64_greedy_identical"] != r["greedy_tokens"]:
            out.append(
                f"{r['backend']}: greedy tokens differ from the float64 reference's from token "
                f"{r['f64_greedy_identical']} of {r['greedy_tokens']}"
            )
    return out


def render(doc: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    def err(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.2e}"

    def agree(n: int | None, of: int) -> str:
        return "n/a" if n is None else f"{n}/{of}"

    table = Table(
        title=f"{doc['preset']} (seed {doc['seed']}), {doc['prompt_tokens']}-token prompt: max relative error and "
        "leading greedy tokens identical against float64 (f64) and transformers (tf); experts by tier (host: computed "
        "there)",
        title_justify="left",
    )
    columns = ["backend", "device", "f64 prefill", "f64 decode", "f64 greedy", "tf prefill", "tf decode", "tf greedy"]
    for col in (*columns, "experts dev/mem/disk/host"):
        table.add_column(col, justify="left" if col in ("backend", "device") else "right")
    for r in doc["rows"]:
        served = r["experts_served"]
        table.add_row(
            r["backend"],
            r["device"],
            err(r["f64_prefill_rel_err"]),
            err(r["f64_decode_rel_err"]),
            agree(r["f64_greedy_identical"], r["greedy_tokens"]),
            err(r["prefill_rel_err"]),
            err(r["decode_rel_err"]),
            agree(r["greedy_identical"], r["greedy_tokens"]),
            f"{served['device']}/{served['memory']}/{served['disk']}/{r['experts_host_computed']}",
        )
    console = Console()
    (console if console.is_terminal else Console(width=160)).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backends", nargs="+", default=["cpu", "torch-cpu"], choices=sorted(OPTIONS))
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--bound", type=float, default=1e-3, help="largest relative error against float64 accepted")
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
    doc["bound"] = args.bound
    doc["failures"] = failures(doc, args.bound)
    if args.json:
        print(json.dumps(doc, indent=1))
    else:
        render(doc)
    for line in doc["failures"]:
        print(f"FAIL {line}", file=sys.stderr)
    return 1 if doc["failures"] else 0


if __name__ == "__main__":
    raise SystemExit(main())
