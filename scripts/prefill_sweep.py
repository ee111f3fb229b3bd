"""Sweep the prefill kernels (runtime/kernels/triton_moe.py) over a model's prefill shapes on a CUDA
device, beside the HBM read bandwidth measured in the same run.

    python scripts/prefill_sweep.py [PRESET] [--tokens 512] [--experts E] [--bits 4] [--k 10] [--int8] [--json]

Cases, each one call as a prefill of ``--tokens`` tokens makes it: the routed experts
(experts_grouped, uniform routing over every expert of a layer, all in one slab), the dense
projections (qmatvec) and the shared expert's gate+up (dense_gate_up), all through the grouped
tensor-core kernel or per-token matvecs. Variants: the heuristic's choice, per-token matvecs at any
length, the grouped kernel at any size, and its launch blocks (tokens per tile, output rows, columns
per step, warps, stages). Prints microseconds, TFLOP/s and the weights' GB/s (each matrix read once)
per variant, best first per case: the figures that set ``_grouped_blocks``, ``_GROUPED_MIN_ROWS``
and ``_MATVEC_MAX_TOKENS``. ``--int8``: the dense matrices and routed experts also as ``--int8-dot``
runs them (the routed experts' grouped kernel on int8 tensor cores, the input's rounding in the
call; above ``_DEQUANT_MIN_TOKENS`` tokens and ``_DEQUANT_MIN_PAIRS`` pairs an expert, weights
dequantised to bfloat16 for cuBLAS or ``torch._grouped_mm``): the heuristic, each of those two
paths, and the experts' caps on a tile's tokens; the float cases the heuristic only. ``--experts``:
routed experts a layer (fewer: more tokens each).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import torch

from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels.gpu_bandwidth import best_ms, hbm_read_bandwidth
from fmoe.runtime.synthetic import fill_random_experts, random_device_quant, synthetic_config

# (tokens per tile, rows, columns, warps, stages) tried besides the heuristic's own; columns 0: the heuristic's
_BLOCKS = [(16, 128, 0, 4, 3), (16, 128, 0, 8, 3), (32, 128, 0, 8, 3), (64, 128, 0, 8, 3), (128, 128, 0, 8, 2),
           (128, 128, 0, 8, 4)]  # fmt: skip


def _cases(
    preset: str, tokens: int, bits: int, k: int | None, device: torch.device, int8: bool, experts: int | None = None
) -> list[tuple]:
    """(name, flops, weight bytes, call) for each prefill shape of ``preset``; with ``int8`` the int8 twins
    of the dense matrices large enough for the GEMMs and of the routed experts (those on a fresh input
    each call, so its rounding is timed too). The shared expert's gate+up takes the float tiles with
    ``--int8-dot`` too: no twin."""
    cfg = synthetic_config(preset, 1, experts)
    hidden, k = cfg.hidden_size, k or cfg.num_experts_per_tok
    hv, dv, hk, dk = (cfg.linear_num_value_heads, cfg.linear_value_head_dim, cfg.linear_num_key_heads,
                      cfg.linear_key_head_dim)  # fmt: skip
    cases: list[tuple[str, float, int, Callable[[], Any]]] = []
    for name, (rows, cols, b) in {
        "in_proj_qkv": (2 * hk * dk + hv * dv, hidden, bits),
        "out_proj": (hidden, hv * dv, bits),
        "router (8-bit)": (cfg.num_experts, hidden, 8),
        "in_proj_b": (hv, hidden, bits),
        "shared_expert_gate (8-bit)": (1, hidden, 8),
    }.items():
        w = random_device_quant((rows, cols), b, device)
        x, out = torch.randn(tokens, cols, device=device), torch.empty(tokens, rows, device=device)
        cases.append((f"qmatvec {name} [{rows}x{cols}] x {tokens}", 2.0 * tokens * rows * cols, w.nbytes,
                      lambda x=x, w=w, o=out: tm.qmatvec(x, w, out=o)))  # fmt: skip
        if int8 and rows >= tm._GROUPED_MIN_ROWS:  # (smaller ones take the matvecs either way)
            cases.append((f"qmatvec {name} [{rows}x{cols}] x {tokens} int8", 2.0 * tokens * rows * cols, w.nbytes,
                          lambda x=x, w=w, o=out: tm.qmatvec(x, w, out=o, int8=True)))  # fmt: skip
    inter = cfg.shared_expert_intermediate_size
    g, u = (random_device_quant((inter, hidden), bits, device) for _ in range(2))
    x = torch.randn(tokens, hidden, device=device)
    cases.append((f"dense_gate_up shared [{inter}x{hidden}] x {tokens}", 4.0 * tokens * inter * hidden,
                  g.nbytes * 2, lambda: tm.dense_gate_up(x, g, u)))  # fmt: skip
    layout = ExpertLayout.for_config(cfg, bits)
    offsets = tm.ExpertOffsets.from_layout(layout)
    e = cfg.num_experts
    slab = torch.empty((e, layout.file_size), dtype=torch.uint8, device=device)
    fill_random_experts(slab, layout)
    slots = torch.rand(tokens, e, device=device).argsort(dim=1)[:, :k].contiguous()  # uniform, distinct
    w, shared = torch.full((tokens, k), 1.0 / k, device=device), torch.zeros(tokens, hidden, device=device)
    out = torch.empty(tokens, hidden, device=device)
    flops = 6.0 * tokens * k * hidden * cfg.moe_intermediate_size
    cases.append((f"experts_grouped {e} experts K={k} x {tokens}", flops, e * layout.file_size,
                  lambda: tm.experts_grouped(slab, offsets, slots, x, w, shared, out=out)))  # fmt: skip
    if int8:
        grouped_int8 = lambda: tm.experts_grouped(slab, offsets, slots, x.clone(), w, shared, out=out, int8=True)  # noqa: E731
        cases.append((f"experts_grouped {e} experts K={k} x {tokens} int8", flops, e * layout.file_size, grouped_int8))
    return cases


def _variants() -> list[tuple[str, dict[str, Any]]]:
    """(label, module settings) per variant: the heuristic, per-token matvecs at any length, the
    grouped kernel at any size, then the grouped kernel's blocks."""
    heuristic = tm._grouped_blocks
    out: list[tuple[str, dict[str, Any]]] = [
        ("heuristic", {}),
        ("matvecs", {"_MATVEC_MAX_TOKENS": 1 << 30}),
        ("grouped", {"_GROUPED_MIN_ROWS": 0}),
    ]
    for b in _BLOCKS:

        def blocks(
            pairs: int, tiles: int, n_out: int, gs: int, glu: bool, int8: bool = False, b: tuple = b
        ) -> tm._GemmBlocks:
            return tm._GemmBlocks(b[0], b[1], heuristic(pairs, tiles, n_out, gs, glu, int8).cols, b[3], b[4])

        out.append((f"grouped {b}", {"_GROUPED_MIN_ROWS": 0, "_grouped_blocks": blocks}))
    return out


def _int8_paths() -> list[tuple[str, dict[str, Any]]]:
    """An int8 case's two paths: the fused tiles, and the weights dequantised for a library GEMM."""
    never, always = 1 << 30, 0
    return [("heuristic", {}), ("fused tiles", {"_DEQUANT_MIN_TOKENS": never, "_DEQUANT_MIN_PAIRS": never}),
            ("dequantised + library GEMM", {"_DEQUANT_MIN_TOKENS": always, "_DEQUANT_MIN_PAIRS": always})]  # fmt: skip


def _token_caps() -> list[tuple[str, dict[str, Any]]]:
    """The heuristic with other caps on a tile's tokens (one accumulator / GLU's two)."""
    return [(f"tokens at most {t} / GLU {g}", {"_GROUPED_TOKENS": t, "_GROUPED_GLU_TOKENS": g})
            for t, g in ((32, 32), (64, 32), (64, 64), (128, 64), (128, 128))]  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--experts", type=int, default=None, help="routed experts a layer (default: the preset's)")
    ap.add_argument("--int8", action="store_true", help="the routed experts also on int8 inputs (--int8-dot)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("prefill_sweep: needs a CUDA device")
    device = torch.device("cuda")
    hbm = hbm_read_bandwidth(device)
    knobs = ("_MATVEC_MAX_TOKENS", "_GROUPED_MIN_ROWS", "_grouped_blocks", "_GROUPED_TOKENS", "_GROUPED_GLU_TOKENS",
             "_DEQUANT_MIN_TOKENS", "_DEQUANT_MIN_PAIRS")  # fmt: skip
    saved = {n: getattr(tm, n) for n in knobs}
    rows: list[dict[str, Any]] = []
    cases = _cases(args.preset, args.tokens, args.bits, args.k, device, args.int8, args.experts)
    for name, flops, nbytes, call in cases:
        if name.endswith("int8"):
            variants = _int8_paths()
        else:
            variants = _variants()[:1] if args.int8 else _variants()
        if name.startswith("experts_grouped"):
            variants = variants + _token_caps()
        for label, settings in variants:
            for n, v in {**saved, **settings}.items():
                setattr(tm, n, v)
            try:
                us = best_ms(call, 5) * 1e3
            except Exception as e:  # a block shape the kernel cannot take (registers, shared memory)
                us, note = float("nan"), type(e).__name__
            else:
                note = ""
            ok = us == us
            rows.append({"case": name, "variant": label, "us": us, "note": note,
                         "tflop_s": flops / (us * 1e-6) / 1e12 if ok else None,
                         "gb_per_s": nbytes / (us * 1e-6) / 1e9 if ok else None})  # fmt: skip
    for n, v in saved.items():
        setattr(tm, n, v)
    if args.json:
        print(json.dumps({"hbm_gb_per_s": hbm, "rows": rows}))
        return
    print(f"HBM read bandwidth (same run): {hbm:.0f} GB/s")
    for name in dict.fromkeys(r["case"] for r in rows):
        print(f"\n{name}")
        mine = sorted((r for r in rows if r["case"] == name), key=lambda r: r["us"] if r["us"] == r["us"] else 1e18)
        for r in mine:
            figures = f"{r['tflop_s']:6.1f} TFLOP/s {r['gb_per_s']:6.0f} GB/s" if r["tflop_s"] else r["note"]
            print(f"  {r['variant']:42s} {r['us']:10.1f} us  {figures}")


if __name__ == "__main__":
    main()
