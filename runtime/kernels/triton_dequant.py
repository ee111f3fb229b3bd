"""Dequantise fmoe's packed matrices to bfloat16 on the device, for GEMMs on a library's tensor-core
kernels (cuBLAS, ``torch._grouped_mm``'s CUTLASS kernels on sm_90).

A long prefill multiplies each weight by many tokens: then writing the weights out once as bfloat16
and multiplying them on a library GEMM beats the fused kernels of runtime/kernels/triton_moe.py,
which unpack 4-bit codes in every tile (those run at 40-90 TFLOP/s on an H200, bound by the
unpacking; docs/PERFORMANCE.md). The format is triton_moe's: int32 words of ``32 / BITS`` codes, low
bits first, bf16 scales and biases a group of ``GS`` columns; ``W[o, i] = scale * q + bias``, computed
in float32 and rounded once to bfloat16 (relative error at most 2**-9 of each weight).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fmoe.runtime.kernels.pdl import pdl, pdl_start
from fmoe.runtime.kernels.triton_steps import bf16, bf16_bits, home


def _library_gemms() -> bool:
    """Whether this torch has the GEMMs used here: ``torch._grouped_mm`` and ``mm`` with ``out_dtype``."""
    try:
        mm = {s.overload_name for s in torch._C._jit_get_schemas_for_operator("aten::mm")}
    except (AttributeError, RuntimeError):  # a private API: if it moves, assume the GEMMs are missing
        return False
    return hasattr(torch, "_grouped_mm") and "dtype" in mm


AVAILABLE = _library_gemms()  # without them (older torch) the fused tiles of triton_moe.py take every prefill

# 8 x 512 columns, 4 warps: 3.45 TB/s moved on an H200, 9 other blocks 2.7-3.4 (docs/PERFORMANCE.md)
_ROWS = 8  # output rows per program
_COLS = 512  # columns per program
_WARPS = 4


@triton.jit
def _dequant_kernel(
    w_ptr, h_ptr, host_w, host_h, slots, out, row_words, row_halves, w_off, s_off, b_off, out_group, out_row0,
    N_OUT, N_IN: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, HOST: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Rows ``pid1`` block, columns ``pid2`` block of the matrix at (``w_off``, ``s_off``, ``b_off``) of
    slot ``slots[pid0]`` (a slab row, a host slab's with HOST: ``home``) as bfloat16 bits into ``out +
    pid0 * out_group + (out_row0 + row) * N_IN``; a slot that is not here writes zeros. Each word and
    each group's scale and bias is loaded once and spread by a reshape (groups of a power-of-two
    size that divides BLOCK_C; others load a group's factors per column)."""
    pdl_start(PDL)
    g = tl.program_id(0)
    slot = tl.load(slots + g)
    w_base, h_base, row, here = home(slot, w_ptr, h_ptr, host_w, host_h, HOST)
    rows = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    r = rows.to(tl.int64)[:, None]
    rmask = (rows < N_OUT)[:, None]
    P: tl.constexpr = 32 // BITS
    NW: tl.constexpr = BLOCK_C // P
    kw = tl.program_id(2) * NW + tl.arange(0, NW)
    wm = rmask & (kw < N_IN // P)[None, :] & here
    word = tl.load(w_base + row * row_words + w_off + r * (N_IN // P) + kw[None, :], mask=wm, other=0)
    q = (word[:, :, None] >> (tl.arange(0, P) * BITS)[None, None, :]) & ((1 << BITS) - 1)
    q = tl.reshape(q, (BLOCK_R, BLOCK_C)).to(tl.float32)
    cols = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    m = rmask & (cols < N_IN)[None, :]
    at = row * row_halves + r * (N_IN // GS)
    if (GS & (GS - 1)) == 0 and BLOCK_C % GS == 0:  # a block's groups, each factor spread over its columns
        NG: tl.constexpr = BLOCK_C // GS
        kg = tl.program_id(2) * NG + tl.arange(0, NG)
        gm = rmask & (kg < N_IN // GS)[None, :] & here
        scale = bf16(tl.load(h_base + at + s_off + kg[None, :], mask=gm, other=0))
        bias = bf16(tl.load(h_base + at + b_off + kg[None, :], mask=gm, other=0))
        scale = tl.reshape(tl.broadcast_to(scale[:, :, None], (BLOCK_R, NG, GS)), (BLOCK_R, BLOCK_C))
        bias = tl.reshape(tl.broadcast_to(bias[:, :, None], (BLOCK_R, NG, GS)), (BLOCK_R, BLOCK_C))
    else:
        scale = bf16(tl.load(h_base + at + s_off + cols[None, :] // GS, mask=m & here, other=0))
        bias = bf16(tl.load(h_base + at + b_off + cols[None, :] // GS, mask=m & here, other=0))
    dst = out + g.to(tl.int64) * out_group + (out_row0 + r) * N_IN + cols[None, :]
    tl.store(dst, bf16_bits(scale * q + bias), mask=m)


@triton.jit
def _swiglu_kernel(gu, h, R, N: tl.constexpr, H_STRIDE, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                   PDL: tl.constexpr = False):  # fmt: skip
    """``h[r, c] = silu(gu[r, c]) * gu[r, N + c]`` of bfloat16 bits (int16) rows, in float32, rounded
    once to bfloat16; ``h``'s rows ``H_STRIDE`` apart."""
    pdl_start(PDL)
    r = (tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)).to(tl.int64)[:, None]
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)[None, :]
    m = (r < R) & (c < N)
    g = bf16(tl.load(gu + r * (2 * N) + c, mask=m, other=0))
    u = bf16(tl.load(gu + r * (2 * N) + N + c, mask=m, other=0))
    tl.store(h + r * H_STRIDE + c, bf16_bits(g / (1.0 + tl.exp(-g)) * u), mask=m)


def swiglu(gu: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``h = silu(gate) * up`` for bfloat16 rows ``gu = [gate | up]`` ``[R, 2N]`` into bfloat16 ``h [R,
    N]`` (a view whose rows may be longer: a block of columns of a wider tensor), in one launch."""
    rows, n = gu.shape[0], gu.shape[1] // 2
    if gu.dtype != torch.bfloat16 or not gu.is_contiguous() or h.dtype != torch.bfloat16 or h.shape != (rows, n):
        raise ValueError(f"swiglu: gu must be contiguous bfloat16 [R, 2N] and h bfloat16 [R, N], got {h.shape}")
    if h.stride(1) != 1:
        raise ValueError("swiglu: h's rows must be contiguous")
    if rows and n:
        grid = (triton.cdiv(rows, 16), triton.cdiv(n, 256))
        _swiglu_kernel[grid](gu.view(torch.int16), h.view(torch.int16), rows, n, h.stride(0), 16, 256,
                             **pdl(h.device))  # fmt: skip
    return h


def dequantize(
    words: torch.Tensor,
    halves: torch.Tensor,
    slots: torch.Tensor,
    parts: tuple[int, int, int],
    shape: tuple[int, int],
    fmt: tuple[int, int],
    out: torch.Tensor,
    row0: int = 0,
    host: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> torch.Tensor:
    """``out[g, row0 : row0 + n_out] = W_g`` as bfloat16 for ``g`` over ``slots`` (int64 ``[G]``, on the
    device): ``W_g [n_out, n_in]`` (``shape``) at ``bits``, ``group_size`` (``fmt``) is the matrix whose
    words, scales and biases start ``parts`` elements into slot ``g``'s row of ``words`` (int32) and
    ``halves`` (int16, the same memory); rows ``words.shape[1]`` elements apart (a dense matrix: one
    row, slot 0). ``host``: slots <= -2 are rows of these (int32, int16) host views instead; slot -1
    (not here) gives zeros. ``out`` bfloat16 ``[G, rows, n_in]``, contiguous."""
    n_out, n_in = shape
    bits, group_size = fmt
    if out.dtype != torch.bfloat16 or out.dim() != 3 or not out.is_contiguous() or out.shape[2] != n_in:
        raise ValueError(f"dequantize: out must be a contiguous bfloat16 [G, rows, {n_in}] tensor")
    if words.dim() != 2 or halves.dim() != 2:
        raise ValueError("dequantize: words and halves must be 2-D (slab rows; a dense matrix as one row)")
    if out.shape[0] != slots.shape[0] or row0 + n_out > out.shape[1]:
        room = f"{slots.shape[0]} x {n_out} rows at row {row0}"
        raise ValueError(f"dequantize: out {tuple(out.shape)} has no room for {room}")
    if slots.shape[0] and n_out:
        hw, hh = host if host is not None else (words, halves)
        grid = (slots.shape[0], triton.cdiv(n_out, _ROWS), triton.cdiv(n_in, _COLS))
        _dequant_kernel[grid](
            words, halves, hw, hh, slots, out.view(torch.int16), words.shape[1], halves.shape[1], *parts,
            out.shape[1] * n_in, row0, n_out, n_in, bits, group_size, host is not None, _ROWS, _COLS,
            num_warps=_WARPS, **pdl(out.device),
        )  # fmt: skip
    return out


def matmul_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 matrices with a float32 result: on CUDA one cuBLAS GEMM accumulating and
    writing float32 (``out_dtype``); elsewhere (tests on the CPU) in float32 from the same values."""
    if a.device.type == "cuda":
        return torch.mm(a, b, out_dtype=torch.float32)
    return a.float() @ b.float()
