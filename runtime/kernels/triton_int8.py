"""Int8 input rows for the decode kernels' integer dot products (``--int8-dot`` on CUDA): the
matvecs of runtime/kernels/triton_moe.py (``int8=True``: the dense matvec, the experts' gate+up and
down+combine, the dense SwiGLU) read the input row rounded to int8 per group, as llama.cpp's CUDA
matvecs (MMVQ on Q8_1 activations) and fmoe's CPU ``--int8-dot`` do.

Why: the float matvecs spend an AND and an FMA on every code, and on an H200 they are bound by
instructions and latency, not by HBM (docs/PERFORMANCE.md). On int8 inputs a step's codes stay
packed: for each code position ``j`` of a byte, ``(word >> j * BITS) & mask`` is four codes, one a
byte, and one ``dp4a`` multiplies them by four int8 inputs and adds to an int32 sum
(runtime/kernels/triton_steps.py ``qdot_int8``): 4-bit codes take two instructions a word of eight,
2-bit four a word of sixteen. Per group ``y += scale * dx * sum(q * xq) + bias * sum(x)``: the bias
term uses the input's exact float sum, so only the rounding of ``x`` to ``dx * xq`` is an error.

The row (:func:`int8_input`, one small launch a row, cached on the tensor while it is unchanged): an
int32 row ``[8 / BITS, NW]`` of packed int8 lanes (entry ``[j, w]`` holds the inputs of word w's
codes ``b * 8 / BITS + j``, byte b in lane b), then the NG group steps ``dx = max|x| * (1/127)`` and
the NG group sums of ``x`` (float32 bits), padded to 16 bytes.

Precision: the rounding of the input, at most half a step an element; on the trained reference model
the logits move by about 2.5% of their norm (KL 0.004 from the float path), as with the CPU's int8
path. So an option, not the default: the float kernels stay the verified path. Tests check every
kernel against a float64 emulation of this rounding (1e-5) and within the rounding's bound of the
exact product (tests/test_triton_int8.py). On a GPU ``dp4a`` is one PTX instruction (inline
assembly); under Triton's interpreter (CI, no GPU) the same sum is computed from the bytes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fmoe.runtime.kernels.pdl import pdl, pdl_start
from fmoe.runtime.kernels.triton_steps import row_tile_args, write_int8_row

_INPUT = "_fmoe_int8_input"  # attribute of a tensor that comes with its int8 input (int8_input)


@triton.jit
def _int8_input_kernel(x, xq, N: tl.constexpr, X_ROW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                       NG_P: tl.constexpr, WPG_P: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """Row r of ``x [R, N]`` as an int8 input row of ``xq [R, X_ROW]`` (int32; see the module's docstring)."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    write_int8_row(x + r * N, xq + r * X_ROW, N, BITS, GS, NG_P, WPG_P)


def int8_input(x: torch.Tensor, bits: int, group_size: int) -> torch.Tensor:
    """The int8 input rows of ``x [T, N]`` (contiguous float32) for matrices of ``bits`` / ``group_size``:
    one launch, or none when ``x`` already came with them and was not changed in place since. The rows
    made are kept with ``x`` beside those of other formats (:func:`hand_over`)."""
    ready = handed_over(x).get((bits, group_size))
    if ready is not None:
        return ready
    n = x.shape[1]
    xq = torch.empty((x.shape[0], input_row_words(n, group_size)), dtype=torch.int32, device=x.device)
    if x.shape[0]:
        consts, warps = row_tile_args(n, bits, group_size)
        _int8_input_kernel[(x.shape[0],)](x, xq, n, xq.shape[1], *consts, num_warps=warps, **pdl(x.device))
    hand_over(x, xq, bits, group_size)
    return xq


def handed_over(x: torch.Tensor) -> dict[tuple[int, int], torch.Tensor]:
    """The int8 input rows that came with ``x`` (:func:`hand_over`, :func:`int8_input`) since it last
    changed in place (its version counter), by the format ``(bits, group_size)`` they were made for."""
    held = getattr(x, _INPUT, None)
    return dict(held[1]) if held is not None and held[0] == x._version else {}


def hand_over(x: torch.Tensor, xq: torch.Tensor, bits: int, group_size: int) -> None:
    """Attach ``xq``, ``x``'s int8 input rows for ``bits`` / ``group_size``, to ``x``, beside its rows of
    other formats (a router's 8-bit rows do not replace the norm's 4-bit ones that the experts read):
    :func:`int8_input` returns them instead of making them again, unless ``x`` was changed in place
    since (its version)."""
    setattr(x, _INPUT, (x._version, {**handed_over(x), (bits, group_size): xq}))


def input_row_words(n: int, group_size: int) -> int:
    """int32 words of an int8 input row of ``n`` columns: the lanes, two floats a group, 16-byte aligned."""
    return -(-(n // 4 + 2 * (n // group_size)) // 4) * 4
