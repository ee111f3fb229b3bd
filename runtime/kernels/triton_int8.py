"""Decode matvecs on int8 activations and integer dot products (``--int8-dot`` on CUDA): the dense
matrices' batch-1 matvecs with the input row rounded to int8 per group, as llama.cpp's CUDA matvecs
(MMVQ on Q8_1 activations) and fmoe's CPU ``--int8-dot`` do.

Why: the float matvecs of runtime/kernels/triton_moe.py spend an AND and an FMA on every code, and
on an H200 they are bound by instructions and latency, not by HBM (docs/PERFORMANCE.md). Here a
step's codes stay packed: for each code position ``j`` of a byte, ``(word >> j * BITS) & mask`` is
four codes, one a byte, and one ``dp4a`` multiplies them by four int8 inputs and adds to an int32
sum: 4-bit codes take two instructions a word of eight, 2-bit four a word of sixteen. Per group
``y += scale * dx * sum(q * xq) + bias * sum(x)``: the bias term uses the input's exact float sum,
so only the rounding of ``x`` to ``dx * xq`` (``dx = max|x| / 127`` of its group) is an error.

The input (:func:`int8_input`, one small launch a row, cached on the tensor as long as it is
unchanged): an int32 row ``[8 / BITS, NW]`` of packed int8 lanes (entry ``[j, w]`` holds the inputs of
word w's codes ``b * 8 / BITS + j``, byte b in lane b), then the NG group factors ``dx`` and the NG
group sums of ``x`` (float32 bits), padded to 16 bytes.

Precision: the rounding of the input, about 0.3% of a group's largest value an element; a matvec's
result moves by about 1% of its norm on random inputs (the prototype on an H200), the size of the
CPU path's error. So an option, not the default: the float kernels stay the verified path. Tests
check the kernel against a float64 emulation of the same rounding (1e-5) and within the rounding's
bound of the exact product (tests/test_triton_int8.py).

On a GPU ``dp4a`` is one PTX instruction (inline assembly); under Triton's interpreter (CI, no GPU)
the same sum is computed from the bytes, so the tests run the kernel's logic everywhere.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import triton
import triton.language as tl

from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels.pdl import pdl, pdl_start
from fmoe.runtime.kernels.triton_steps import qdot_int8

if TYPE_CHECKING:
    from fmoe.runtime.backends.torch_backend import TorchQuant

_INPUT = "_fmoe_int8_input"  # attribute of a tensor that comes with its int8 input (int8_input)
# register cap of the matvec per bit width: at 2 bits the launch heuristic's 16-row blocks compiled to
# 129 registers (Triton 3.6, sm_90), so an H200 would run 3 programs an SM instead of 4; capped, 125
# and no spills. At 4 bits uncapped (80 registers; a cap of 128 gives 122)
_REGISTERS = {2: 128}


@triton.jit
def _qmatvec_int8_kernel(
    x, w, halves, out, w1, w2, w3, s1, s2, s3, b0, b1, b2, b3, o1, o2, o3,
    X_ROW: tl.constexpr, N_IN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, R0: tl.constexpr,
    R1: tl.constexpr, R2: tl.constexpr, R3: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr,
    WPG_P: tl.constexpr, ASM: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """:func:`triton_moe._qmatvec_kernel` (up to four matrices of one format, grid (tokens, row blocks
    of all matrices in turn)) on the int8 input rows ``x`` (int32 ``[T, X_ROW]``)."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    in1, in2, in3, n_out, rows = tm._matrix_block(tl.program_id(1), R0, R1, R2, R3, BLOCK_N)
    rmask = rows < n_out
    r = rows.to(tl.int64)[None, :]
    nw: tl.constexpr = N_IN * BITS // 32
    y = qdot_int8(w, halves, halves, x + t * X_ROW, tm._pick(in1, in2, in3, 0, w1, w2, w3) + r * nw,
                   tm._pick(in1, in2, in3, 0, s1, s2, s3) + r * (N_IN // GS),
                   tm._pick(in1, in2, in3, b0, b1, b2, b3) + r * (N_IN // GS), rmask[None, :], nw, BITS, GS,
                   BLOCK_G, WPG_P, ASM)  # fmt: skip
    o = tm._pick(in1, in2, in3, 0, o1, o2, o3) + t * n_out
    tl.store(out + o + rows, tl.sum(y, axis=0), mask=rmask)


@triton.jit
def _int8_input_kernel(x, xq, N: tl.constexpr, X_ROW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                       NG_P: tl.constexpr, WPG_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """Row r of ``x [R, N]`` as an int8 input row of ``xq [R, X_ROW]`` (int32; see the module's docstring)."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    J: tl.constexpr = 8 // BITS
    WPG: tl.constexpr = GS * BITS // 32
    NW: tl.constexpr = N * BITS // 32
    NG: tl.constexpr = N // GS
    g = tl.arange(0, NG_P)[:, None, None]
    word = g * WPG + tl.arange(0, WPG_P)[None, :, None]  # [NG_P, WPG_P, 1]
    j = tl.arange(0, J)[None, None, :]
    m = (g < NG) & (word - g * WPG < WPG) & (j < J)
    row = x + r * N + word * (4 * J) + j  # lane b of entry [j, word] is column word * 4J + b * J + j
    v0 = tl.load(row, mask=m, other=0.0)
    v1 = tl.load(row + J, mask=m, other=0.0)
    v2 = tl.load(row + 2 * J, mask=m, other=0.0)
    v3 = tl.load(row + 3 * J, mask=m, other=0.0)
    amax = tl.max(tl.max(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))),
                         axis=2), axis=1)  # fmt: skip
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)[:, None, None]  # all-zero groups: 0
    packed = _lane(v0, inv, 0) | _lane(v1, inv, 1) | _lane(v2, inv, 2) | _lane(v3, inv, 3)
    tl.store(xq + r * X_ROW + j * NW + word, packed, mask=m)
    gs = tl.arange(0, NG_P)
    sums = tl.sum(tl.sum(v0 + v1 + v2 + v3, axis=2), axis=1)
    # a product, not a quotient: Triton's float32 division on a GPU is not IEEE-rounded, and dx is the
    # one factor of the rounding that the tests (and the CPU kernels' int8 path) fix to the bit
    tl.store(xq + r * X_ROW + J * NW + gs, (amax * (1.0 / 127.0)).to(tl.int32, bitcast=True), mask=gs < NG)
    tl.store(xq + r * X_ROW + J * NW + NG + gs, sums.to(tl.int32, bitcast=True), mask=gs < NG)


@triton.jit
def _lane(v, inv, b: tl.constexpr):
    """``round(v * inv)`` (half away from zero; the cast truncates) as an int8 in byte ``b`` of an int32."""
    xr = v * inv
    return ((xr + tl.where(xr < 0, -0.5, 0.5)).to(tl.int32) & 0xFF) << (8 * b)


def int8_input(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The int8 input rows of ``x [T, N]`` (contiguous float32) for matrices of ``bits`` / ``group_size``:
    one launch, or none when ``x`` already came with them and was not changed in place since."""
    ready = getattr(x, _INPUT, None)
    key = (bits, group_size, x._version)
    if ready is not None and ready[0] == key:
        return ready[1]
    n = x.shape[1]
    xq = torch.empty((x.shape[0], input_row_words(n, group_size)), dtype=torch.int32, device=x.device)
    if x.shape[0]:
        warps = min(16, max(4, tm._pow2(n) // 1024))
        _int8_input_kernel[(x.shape[0],)](
            x, xq, n, xq.shape[1], bits, group_size, tm._pow2(n // group_size), tm._pow2(group_size * bits // 32),
            num_warps=warps, **pdl(x.device),
        )  # fmt: skip
    setattr(x, _INPUT, (key, xq))
    return xq


def input_row_words(n: int, group_size: int) -> int:
    """int32 words of an int8 input row of ``n`` columns: the lanes, two floats a group, 16-byte aligned."""
    return -(-(n // 4 + 2 * (n // group_size)) // 4) * 4


def qmatvecs_int8(x: torch.Tensor, ws: list[TorchQuant]) -> list[torch.Tensor]:
    """``x @ W.T`` for each of several dense quantised matrices of one input width and format, on int8
    activations: up to ``triton_moe._MATVEC_MAX_TOKENS`` tokens (decode; above, the float path's
    :func:`triton_moe.qmatvecs`). One input preparation; every four matrices one launch."""
    fn = "qmatvecs_int8"
    for i, w in enumerate(ws):
        tm._check_dense(w, fn, f"ws[{i}]")
    if len({(w.shape[1], w.bits, w.group_size, w.weight.device) for w in ws}) > 1:
        raise ValueError(f"{fn}: the matrices are not of one input width and format: {[(w.shape, w.bits) for w in ws]}")
    if not ws:
        return []
    x = tm._floats(x, (None, ws[0].shape[1]), fn, "x", ws[0].weight.device)
    if x.shape[0] > tm._MATVEC_MAX_TOKENS:
        return tm.qmatvecs(x, ws)
    outs = [torch.empty((x.shape[0], w.shape[0]), dtype=torch.float32, device=x.device) for w in ws]
    if x.shape[0]:
        xq = int8_input(x, ws[0].bits, ws[0].group_size)
        for i in range(0, len(ws), tm._MATVEC_MAX_MATRICES):
            _launch(xq, ws[i : i + tm._MATVEC_MAX_MATRICES], outs[i : i + tm._MATVEC_MAX_MATRICES])
    return outs


def qmatvec_int8(x: torch.Tensor, w: TorchQuant) -> torch.Tensor:
    """``x @ W.T`` for one dense quantised matrix on int8 activations (:func:`qmatvecs_int8`)."""
    return qmatvecs_int8(x, [w])[0]


def _launch(xq: torch.Tensor, ws: list[TorchQuant], outs: list[torch.Tensor]) -> None:
    w0, n_tok = ws[0], xq.shape[0]
    n_in, bits, gs = w0.shape[1], w0.bits, w0.group_size
    rows = [w.shape[0] for w in ws] + [0] * (tm._MATVEC_MAX_MATRICES - len(ws))
    blk = tm._matvec_blocks(sum(rows), n_in * bits // 32, n_tok)
    pad = lambda seq: [*seq, *[seq[0]] * (tm._MATVEC_MAX_MATRICES - len(seq))]  # noqa: E731
    ws, outs = pad(ws), pad(outs)
    _qmatvec_int8_kernel[(n_tok, sum(triton.cdiv(r, blk.rows) for r in rows))](
        xq, w0.weight, w0.scales.view(torch.int16), outs[0],
        *(tm._apart(w.weight, w0.weight) for w in ws[1:]), *(tm._apart(w.scales, w0.scales) for w in ws[1:]),
        *(tm._apart(w.biases, w0.scales) for w in ws), *(tm._apart(o, outs[0]) for o in outs[1:]),
        xq.shape[1], n_in, bits, gs, *rows, blk.rows, *tm._group_tile(blk, bits, gs), xq.device.type == "cuda",
        num_warps=blk.warps, maxnreg=_REGISTERS.get(bits), **pdl(xq.device),
    )  # fmt: skip
