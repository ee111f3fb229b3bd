"""Instruction mix of the Triton matvec kernels as compiled for an NVIDIA GPU, without one: Triton
compiles for the target (default sm_90, an H100/H200) with the ptxas it ships, and its cuobjdump
lists the machine code (SASS). Prints, per kernel and launch block, the instructions of the whole
program (a loop's body counted once), per weight of the tile, its registers and spills, and the
most frequent opcodes: the dense matvec (several blocks), then the routed experts' gate+up and
down+combine for one token (``--hidden``, ``--inter``, ``--k``; the heuristic's blocks).

    python scripts/kernel_sass.py [--arch 90] [--bits 4] [--out 8192] [--in 4096] [--group-size 64]
                                  [--hidden 4096] [--inter 1024] [--k 10] [--json]

Registers decide occupancy: at 128 or fewer an H200 runs four of these 4-warp programs an SM, at
129-168 three (a 4% slower matvec when a refactor added two). They depend on the Triton version:
count them with the GPU machine's (3.6 there: ``pip install --target DIR triton==3.6.0`` and run
with ``PYTHONPATH=DIR``).

Batch-1 decode matvecs at the 397B's width are one pass over a row (no loop), so instructions per
weight is what a thread issues per code: the figure the kernels' docstring quotes. Pointer and
offset arguments are compiled as 16-byte aligned, as Triton specialises them at a real launch (so
loads are vectors where the kernel allows). Needs Triton's bundled ptxas and cuobjdump (the
``triton`` wheel for Linux has them); no GPU, no CUDA driver.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from fmoe.runtime.kernels import triton_int8 as ti
from fmoe.runtime.kernels import triton_moe as tm

_TOOLS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
_REG, _STACK = re.compile(r"REG:(\d+)"), re.compile(r"STACK:(\d+)")
_OPCODE = re.compile(r"^\s+/\*[0-9a-f]{4}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)", re.M)
# (rows, words) per program tried besides the launch heuristic's own
_BLOCKS = [(4, 512), (8, 512), (8, 256)]


def compiled_sass(
    fn: Any, signature: dict[str, str], constants: dict[str, Any], arch: int, warps: int, maxnreg: int | None = None
) -> tuple[Counter[str], int, int]:
    """Opcode counts of ``fn`` compiled for sm_``arch`` with ``constants`` as its constexprs (None
    for arguments passed as None), its registers a thread and its stack bytes a thread (spills);
    runtime arguments typed by ``signature`` and, where pointers or integers, marked 16-byte aligned."""
    names = fn.arg_names
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n, t in signature.items() if t[0] in "*i"}
    sig = {**signature, **dict.fromkeys(constants, "constexpr")}
    src = ASTSource(fn=fn, signature=sig, constexprs={(names.index(n),): v for n, v in constants.items()}, attrs=attrs)
    options = {"num_warps": warps} | ({} if maxnreg is None else {"maxnreg": maxnreg})
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass, usage = (
            subprocess.run([str(_TOOLS / "cuobjdump"), flag, str(cubin)], capture_output=True, text=True, check=True)
            for flag in ("-sass", "-res-usage")
        )
    regs, stack = (int(m.group(1)) if m else -1 for m in (_REG.search(usage.stdout), _STACK.search(usage.stdout)))
    return Counter(_OPCODE.findall(sass.stdout)), regs, stack


def qmatvec_mix(bits: int, n_out: int, n_in: int, group_size: int, arch: int) -> list[dict[str, Any]]:
    """The dense matvec kernel (one ``[n_out, n_in]`` matrix, one token) for the launch heuristic's
    block and a few others: instructions per program and per weight of its tile."""
    tm._check_format(bits, group_size, "kernel_sass")
    if n_out < 1 or n_in < 1 or n_in % group_size:
        raise ValueError(f"kernel_sass: --out {n_out} / --in {n_in} must be positive, --in a multiple of {group_size}")
    n_words = n_in * bits // 32
    heuristic = tm._matvec_blocks(n_out, n_words, 1)
    blocks = dict.fromkeys([(heuristic.rows, heuristic.words), *((r, min(w, n_words)) for r, w in _BLOCKS)])
    rows: list[dict[str, Any]] = []
    for rows_, words in blocks:
        blk = tm._MatvecBlocks(rows_, words, heuristic.warps)
        groups, wpg = tm._group_tile(blk, bits, group_size)
        args = _matvec_args(bits, n_out, n_in, group_size, blk, False)
        counts, regs, stack = compiled_sass(tm._qmatvec_kernel, *args, arch, blk.warps)
        weights = blk.rows * groups * wpg * (32 // bits)  # one step of the tile
        total = sum(counts.values())
        rows.append({
            "kernel": "qmatvec", "rows": blk.rows, "words": groups * wpg, "warps": blk.warps,
            "heuristic": len(rows) == 0, "loop": groups * wpg < n_words, "instructions": total,
            "per_weight": total / (weights / (32 * blk.warps)), "top": counts.most_common(6),
            "opcodes": dict(counts), "registers": regs, "stack": stack,
        })  # fmt: skip
    return rows


def _mix(
    kernel: str, counts: Counter[str], regs: int, stack: int, blk: Any, weights: int, **extra: Any
) -> dict[str, Any]:
    """One row of the table: a kernel compiled with the heuristic's blocks ``blk``, ``weights`` codes a program."""
    total = sum(counts.values())
    return {"kernel": kernel, "rows": blk.rows, "words": blk.words, "warps": blk.warps, "heuristic": True,
            "loop": False, "instructions": total, "per_weight": total / (weights / (32 * blk.warps)),
            "top": counts.most_common(6), "opcodes": dict(counts), "registers": regs, "stack": stack,
            **extra}  # fmt: skip


def qmatvec_int8_mix(bits: int, n_out: int, n_in: int, group_size: int, arch: int) -> list[dict[str, Any]]:
    """The int8-activation matvec (``--int8-dot``) with the launch heuristic's blocks and register cap."""
    blk = tm._matvec_blocks(n_out, n_in * bits // 32, 1)
    cap = tm._INT8_MATVEC_REGISTERS.get(bits)
    args = _matvec_args(bits, n_out, n_in, group_size, blk, True)
    mix = compiled_sass(tm._qmatvec_kernel, *args, arch, blk.warps, cap)
    return [_mix("qmatvec int8", *mix, blk, blk.rows * n_in, register_cap=cap)]


def _input_row(n: int, group_size: int, int8: bool) -> int:
    """A prepared input row's floats (or int8 rows' words), as the kernels' wrappers allocate it."""
    if int8:
        return ti.input_row_words(n, group_size)
    return tm._input_buffer(torch.empty((0, n)), group_size).shape[1]


def _matvec_args(
    bits: int, n_out: int, n_in: int, group_size: int, blk: Any, int8: bool
) -> tuple[dict[str, str], dict[str, Any]]:
    """The dense matvec kernel's signature and constexprs for one ``[n_out, n_in]`` matrix in blocks ``blk``."""
    signature = {"x": "*i32" if int8 else "*fp32", "w": "*i32", "halves": "*i16", "out": "*fp32"}
    signature |= dict.fromkeys(["w1", "w2", "w3", "s1", "s2", "s3", "b0", "b1", "b2", "b3", "o1", "o2", "o3"], "i64")
    groups, wpg = tm._group_tile(blk, bits, group_size)
    constants = dict(X_ROW=_input_row(n_in, group_size, int8), N_IN=n_in, BITS=bits, GS=group_size, R0=n_out,
                     R1=0, R2=0, R3=0, BLOCK_N=blk.rows, BLOCK_G=groups, WPG_P=wpg, PDL=False, INT8=int8,
                     ASM=int8)  # constexprs with defaults are passed too: Triton 3.8 wants them all  # fmt: skip
    return signature, constants


def experts_mix(
    bits: int, hidden: int, inter: int, group_size: int, k: int, arch: int, int8: bool = False
) -> list[dict[str, Any]]:
    """The routed experts' decode kernels for one token and ``k`` choices with the launch heuristic's
    blocks (and register cap): gate+up over the k pairs, down+combine with the shared expert fused;
    ``int8``: their int8-activation variants (``--int8-dot``)."""
    if hidden <= 0 or inter <= 0 or hidden % group_size or inter % group_size:
        raise ValueError(f"kernel_sass: --hidden {hidden} / --inter {inter} must be positive multiples of {group_size}")
    if k < 1:
        raise ValueError(f"kernel_sass: --k {k} must be at least 1")

    x_type, tag = ("*i32", " int8") if int8 else ("*fp32", "")
    variant = {"INT8": int8, "ASM": int8}  # constexprs with defaults are passed too: Triton 3.8 wants them all

    x_row = lambda n: _input_row(n, group_size, int8)  # noqa: E731
    offsets = ["gate_w", "gate_s", "gate_b", "up_w", "up_s", "up_b", "sg_w", "sg_s", "sg_b", "su_w", "su_s", "su_b"]
    signature = {"slab_w": "*i32", "slab_h": "*i16", "slots": "*i32", "x": x_type, "h": "*fp32", "row_words": "i64",
                 "row_halves": "i64", **dict.fromkeys(offsets, "i64"), "n_routed": "i32"}  # fmt: skip
    blk = tm._matvec_blocks(inter, hidden * bits // 32, k + 1, matrices=2)
    groups, wpg = tm._group_tile(blk, bits, group_size)
    constants = dict(token=None, slot_map=None, host_w=None, host_h=None, X_ROW=x_row(hidden), INTER=inter,
                     HIDDEN=hidden, BITS=bits, GS=group_size, SLOTS=1, HOST=False, TOKEN_DIV=k, BLOCK_N=blk.rows,
                     BLOCK_G=groups, WPG_P=wpg, PDL=False, **variant)  # fmt: skip
    cap = tm._GATE_UP_REGISTERS.get(bits)
    mix = compiled_sass(tm._gate_up_kernel, signature, constants, arch, blk.warps, cap)
    rows = [_mix(f"experts_gate_up{tag}", *mix, blk, 2 * blk.rows * hidden, register_cap=cap)]
    signature = {"slab_w": "*i32", "slab_h": "*i16", "slots": "*i32", "h": x_type, "weights": "*fp32",
                 "shared": "*fp32", "out": "*fp32", "row_words": "i64", "row_halves": "i64",
                 **dict.fromkeys(["down_w", "down_s", "down_b", "sd_w", "sd_s", "sd_b"], "i64")}  # fmt: skip
    blk = tm._matvec_blocks(hidden, inter * bits // 32, 1)
    groups, wpg = tm._group_tile(blk, bits, group_size)
    constants = dict(slot_map=None, host_w=None, host_h=None, X_ROW=x_row(inter), K=k, INTER=inter, HIDDEN=hidden,
                     BITS=bits, GS=group_size, MAPPED=False, HOST=False, SHARED=True, BLOCK_N=blk.rows,
                     BLOCK_G=groups, WPG_P=wpg, K_P=tm._pow2(k), PDL=False, **variant)  # fmt: skip
    mix = compiled_sass(tm._down_combine_kernel, signature, constants, arch, blk.warps)
    return [*rows, _mix(f"experts_down_combine{tag}", *mix, blk, (k + 1) * blk.rows * inter)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, default=90, help="compute capability, as 90 for sm_90")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--out", dest="n_out", type=int, default=8192, help="the matrix's rows")
    ap.add_argument("--in", dest="n_in", type=int, default=4096, help="the matrix's input width")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=4096, help="the experts' input width (0: no expert kernels)")
    ap.add_argument("--inter", type=int, default=1024, help="the experts' intermediate width")
    ap.add_argument("--k", type=int, default=10, help="routed experts a token")
    ap.add_argument("--int8", action="store_true", help="also the int8-activation kernels (--int8-dot)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not (_TOOLS / "ptxas").exists():
        raise SystemExit(f"kernel_sass: Triton's ptxas is not in {_TOOLS}")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit(
            "kernel_sass: TRITON_INTERPRET is set, so Triton interprets the kernels; unset it to compile them"
        )
    try:
        rows = qmatvec_mix(args.bits, args.n_out, args.n_in, args.group_size, args.arch)
        if args.int8:
            rows += qmatvec_int8_mix(args.bits, args.n_out, args.n_in, args.group_size, args.arch)
        for int8 in (False, True) if args.int8 else (False,):
            if args.hidden != 0:
                rows += experts_mix(args.bits, args.hidden, args.inter, args.group_size, args.k, args.arch, int8)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    if args.json:
        print(json.dumps({"arch": args.arch, "bits": args.bits, "out": args.n_out, "in": args.n_in, "rows": rows}))
        return
    shape = f"[{args.n_out}x{args.n_in}]"
    print(f"sm_{args.arch}, {args.bits}-bit {shape}, groups of {args.group_size}: a program's instructions")
    for r in rows:
        tag = " (heuristic)" if r["heuristic"] else ""
        loop = ", loop body once" if r["loop"] else ""
        top = " ".join(f"{op} {n}" for op, n in r["top"])
        print(f"  {r['kernel']} {r['rows']} rows x {r['words']} words{tag}: {r['instructions']} "
              f"({r['per_weight']:.2f} a weight{loop}), {r['registers']} registers, stack {r['stack']} B"
              f"  {top}")  # fmt: skip


if __name__ == "__main__":
    main()
