"""Sweep the Triton matvec kernels' launch blocks (runtime/kernels/triton_moe.py) over a
model's decode shapes on a CUDA device, beside the HBM read bandwidth measured in the same run.

    python scripts/matvec_sweep.py [PRESET] [--bits 4] [--k 10] [--caps 64,96,128] [--heuristic-only] [--json]

Each case is one batch-1 call as decode makes it: qmatvec over the dense projections and the
lm_head, the experts' gate+up over K pairs and down+combine for one token. Calls are captured in a
CUDA graph and replayed (as decode runs them); each call reads its own copy of the weights, enough
copies to overflow the L2, so the bandwidth is HBM's. Prints GB/s of packed weights per case and
blocks, best first per case: the figures that set ``_matvec_blocks``. ``--caps``: each blocks also
with these register caps (Triton's ``maxnreg``) on the three matvec kernels (``_GATE_UP_REGISTERS``
came from such a sweep). ``--heuristic-only``: the launch configuration as shipped, one line a case
(for two builds side by side). ``--int8``: each case also on int8 activations (``--int8-dot``,
runtime/kernels/triton_int8.py), its input prepared in every call as the float path's is.
``--cuda-c``: with ``--int8``, each case's shipped configuration also with the CUDA C kernels
(runtime/kernels/cuda_kernels.py) against Triton's (``FMOE_CUDA_C=0``), side by side in the run.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.kernels import triton_int8 as ti
from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels.gpu_bandwidth import graph_us, hbm_read_bandwidth
from fmoe.runtime.synthetic import fill_random_experts, random_device_quant, synthetic_config

_L2_OVERFLOW = 256 << 20  # bytes of weight copies cycled through: several times an H200's 50 MB L2
_CALLS = 40  # calls per captured graph
# (rows, words, warps) tried besides the heuristic's own
_BLOCKS = [(4, 512, 4), (8, 512, 4), (8, 256, 4), (4, 256, 4), (16, 128, 4), (2, 512, 4), (8, 512, 8), (16, 512, 8)]


def _caps(text: str) -> list[int]:
    """``--caps``: comma-separated register counts a thread, each 16 to 255 (what sm_90 allows)."""
    try:
        caps = [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of whole numbers") from None
    if any(not 16 <= c <= 255 for c in caps):
        raise argparse.ArgumentTypeError(f"{text!r}: each cap must lie between 16 and 255 registers")
    return caps


def _with_cap(kernels: list[Any], cap: int | None) -> None:
    """Launch ``kernels`` with at most ``cap`` registers a thread (None: as their wrappers ask)."""
    for kernel in kernels:
        run = kernel.__dict__.setdefault("_sweep_run", kernel.run)
        kernel.run = run if cap is None else (lambda *a, _run=run, **kw: _run(*a, **{**kw, "maxnreg": cap}))


def _fresh(x: torch.Tensor) -> torch.Tensor:
    """``x`` without the int8 input cached on it, so that a call prepares it as decode does."""
    x.__dict__.pop(ti._INPUT, None)
    return x


def _cases(
    preset: str, bits: int, k: int | None, device: torch.device, int8: bool = False
) -> list[tuple[str, int, Callable[[], Any]]]:
    """(name, packed bytes per call, a maker of the calls) for each decode shape of ``preset``;
    ``int8``: the same calls on int8 activations."""
    cfg = synthetic_config(preset, 1)
    hidden, k = cfg.hidden_size, k or cfg.num_experts_per_tok
    hv, dv, hk, dk = (cfg.linear_num_value_heads, cfg.linear_value_head_dim, cfg.linear_num_key_heads,
                      cfg.linear_key_head_dim)  # fmt: skip
    dense = {
        "in_proj_qkv": (2 * hk * dk + hv * dv, hidden),
        "in_proj_z": (hv * dv, hidden),
        "out_proj": (hidden, hv * dv),
        "lm_head": (cfg.vocab_size, hidden),
    }
    x_of = {n: torch.randn(1, c, device=device) for n, (_, c) in dense.items()}
    cases: list[tuple[str, int, Callable[[], Any]]] = []
    for name, (rows, cols) in dense.items():
        w0 = random_device_quant((rows, cols), 4, device)
        copies = [w0] + [random_device_quant(w0.shape, 4, device) for _ in range(max(0, _L2_OVERFLOW // w0.nbytes - 1))]
        out = torch.empty(1, rows, device=device)
        make = lambda c=copies, x=x_of[name], o=out: [  # noqa: E731
            (lambda w=c[i % len(c)], x=x, o=o: tm.qmatvec(_fresh(x), w, out=o, int8=int8)) for i in range(_CALLS)
        ]
        cases.append((f"qmatvec {name} [{rows}x{cols}] 4-bit{' int8' * int8}", w0.nbytes, make))
    layout = ExpertLayout.for_config(cfg, bits)
    offsets = tm.ExpertOffsets.from_layout(layout)
    n_slots = max(2 * k, _L2_OVERFLOW // layout.file_size)
    slab = torch.empty((n_slots, layout.file_size), dtype=torch.uint8, device=device)
    fill_random_experts(slab, layout)
    x = torch.randn(1, hidden, device=device)
    h = torch.randn(k, cfg.moe_intermediate_size, device=device)
    w, shared = torch.full((1, k), 1.0 / k, device=device), torch.zeros(1, hidden, device=device)
    slots = [torch.arange(i * k, (i + 1) * k, device=device) % n_slots for i in range(_CALLS)]
    tag = " int8" * int8
    cases.append((f"experts_gate_up K={k} {bits}-bit{tag}", k * layout.file_size * 2 // 3, lambda: [
        (lambda s=s: tm.experts_gate_up(slab, offsets, s, _fresh(x), k, out=h, int8=int8)) for s in slots
    ]))  # fmt: skip
    out = torch.empty(1, hidden, device=device)
    cases.append((f"experts_down_combine K={k} {bits}-bit{tag}", k * layout.file_size // 3, lambda: [
        (lambda s=s: tm.experts_down_combine(slab, offsets, s.view(1, k), _fresh(h), w, shared, out=out, int8=int8))
        for s in slots
    ]))  # fmt: skip
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--bits", type=int, default=4, help="the experts' bit width")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--caps", type=_caps, default=[], help="register caps to try with every blocks, comma-separated")
    ap.add_argument("--heuristic-only", action="store_true", help="only the shipped launch configuration")
    ap.add_argument("--int8", action="store_true", help="each case also on int8 activations (--int8-dot)")
    ap.add_argument("--cuda-c", action="store_true", help="with --int8: each case also on the CUDA C kernels")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("matvec_sweep: needs a CUDA device")
    device = torch.device("cuda")
    hbm = hbm_read_bandwidth(device)
    heuristic = tm._matvec_blocks
    kernels = [tm._qmatvec_kernel, tm._gate_up_kernel, tm._down_combine_kernel]
    caps = [None, *args.caps]
    rows: list[dict[str, Any]] = []
    cases = _cases(args.preset, args.bits, args.k, device)
    if args.int8:  # side by side: each float case, then its int8 twin
        twins = _cases(args.preset, args.bits, args.k, device, int8=True)
        cases = [c for pair in zip(cases, twins, strict=True) for c in pair]
    if not args.json:  # each case as it finishes: a sweep cut short by a time limit keeps its cases
        print(f"HBM read bandwidth (same run): {hbm:.0f} GB/s", flush=True)
    os.environ["FMOE_CUDA_C"] = "0"  # Triton's kernels for the sweep; the CUDA C ones only as their own row
    for name, nbytes, make in cases:
        mine: list[dict[str, Any]] = []
        if args.cuda_c and "int8" in name:
            os.environ["FMOE_CUDA_C"] = "1"
            us = graph_us(make())
            os.environ["FMOE_CUDA_C"] = "0"
            gbs = nbytes / (us * 1e-6) / 1e9
            mine.append({"case": name, "blocks": "cuda-c", "us": us, "gb_per_s": gbs, "note": ""})
        for blocks in [None] if args.heuristic_only else [None, *_BLOCKS]:
            tm._matvec_blocks = heuristic if blocks is None else (lambda *a, b=blocks, **kw: tm._MatvecBlocks(*b))
            for cap in [None] if args.heuristic_only else caps:
                _with_cap(kernels, cap)
                try:
                    us = graph_us(make())
                except Exception as e:  # a block shape the kernel cannot take (registers, shared memory)
                    us, note = float("nan"), type(e).__name__
                else:
                    note = ""
                label = f"{blocks or 'heuristic'}" + ("" if cap is None else f" cap {cap}")
                mine.append({"case": name, "blocks": label, "us": us,
                             "gb_per_s": nbytes / (us * 1e-6) / 1e9 if us == us else None, "note": note})  # fmt: skip
        rows += mine
        if not args.json:
            _print_case(name, mine, hbm)
    _with_cap(kernels, None)
    tm._matvec_blocks = heuristic
    if args.json:
        print(json.dumps({"hbm_gb_per_s": hbm, "rows": rows}))


def _print_case(name: str, mine: list[dict[str, Any]], hbm: float) -> None:
    """A case's six fastest blocks and the heuristic's, best first, beside the HBM rate."""
    print(f"\n{name}")
    mine = sorted(mine, key=lambda r: np.nan_to_num(r["us"], nan=1e9))
    for r in mine[:6] + [r for r in mine[6:] if r["blocks"] in ("heuristic", "cuda-c")]:
        gbs = f"{r['gb_per_s']:7.0f} GB/s ({r['gb_per_s'] / hbm:4.0%})" if r["gb_per_s"] else r["note"]
        print(f"  {r['blocks']!s:24s} {r['us']:8.2f} us  {gbs}", flush=True)


if __name__ == "__main__":
    main()
