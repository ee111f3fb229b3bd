"""Numba kernels behind :func:`fmoe.formats.quant.quantize`: min/max and clip-search affine
quantisation, bit-identical to the numpy reference in :mod:`fmoe.formats.quant`.

Bit identity holds because every float32 operation is the reference's, in the reference's order:
no fastmath (so no reassociation and no FMA contraction), division kept as division, ``np.rint``
(round half to even), bf16 rounding by the same integer formula, and every sum in the fixed lane
order of ``quant._lane_sum``. Work is split over rows (``prange``); each row's groups are done in
sequence with the row's own scratch buffers, and its codes are packed into words at the end.
tests/test_quant.py compares both paths on fresh random inputs.
"""

from __future__ import annotations

import threading

import numpy as np
from llvmlite import ir
from numba import njit, parallel_chunksize, prange, types
from numba.extending import intrinsic

_LANES = 8  # must match quant._lane_sum
_ROWS_PER_CHUNK = 16  # rows per work item handed to a thread (see quantize_rows)
_TINY = np.float32(1e-12)  # smallest scale, as in quant._codes_for_range
# One kernel call at a time: each already uses every core, and numba's fallback threading layer
# (workqueue) aborts on concurrent launches from several Python threads.
_LOCK = threading.Lock()


# ---- float32 <-> uint32 bit casts ---------------------------------------------------------------
@intrinsic
def f32_bits(typingctx, x):
    if x != types.float32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

    return types.uint32(types.float32), codegen


@intrinsic
def bits_f32(typingctx, u):
    if u != types.uint32:
        return None

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.uint32), codegen


@njit(cache=True, inline="always")
def _bf16(x):
    """(bf16 bit pattern, its float32 value) of float32 ``x``: quant.f32_to_bf16's formula."""
    if x != x:
        bits = np.uint32(0x7FC0)
    else:
        u: np.uint32 = f32_bits(x)  # type: ignore[call-arg]  # numba's stub: jitted calls pass no typingctx
        bits = np.uint32(
            ((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16)) & np.uint32(0xFFFF)
        )
    return bits, bits_f32(np.uint32(bits << np.uint32(16)))  # type: ignore[call-arg]  # as above


# ---- one group ----------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _params(lo, hi, levels):
    """quant._codes_for_range's scale and bias for range [lo, hi]: bit patterns and float32 values."""
    scale = (hi - lo) / levels
    if scale < _TINY:  # np.maximum: NaN would stay NaN here too
        scale = _TINY
    sbits, s = _bf16(scale)
    bbits, b = _bf16(lo)
    return sbits, bbits, s, b


@njit(cache=True, inline="always")
def _code(x, s, b, levels):
    q = np.rint((x - b) / s)
    if q < np.float32(0.0):
        q = np.float32(0.0)
    elif q > levels:
        q = levels
    return q


@njit(cache=True, inline="always")
def _lane_sum(a):
    """Sum of ``a`` (length a multiple of 8, zero-padded) in quant._lane_sum's order. The lanes are
    eight scalars, not an array, so they stay in registers (LLVM packs them into one vector)."""
    a0, a1, a2, a3, a4, a5, a6, a7 = a[0], a[1], a[2], a[3], a[4], a[5], a[6], a[7]
    for k in range(1, a.shape[0] // _LANES):
        b = a[k * _LANES : (k + 1) * _LANES]
        a0 += b[0]
        a1 += b[1]
        a2 += b[2]
        a3 += b[3]
        a4 += b[4]
        a5 += b[5]
        a6 += b[6]
        a7 += b[7]
    return ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))


@njit(cache=True, inline="always")
def _sse(x, n, lo, hi, levels, d2):
    """quant._group_sse for group ``x[:n]``: squared error of coding it for [lo, hi]. The terms go
    through a buffer: that loop vectorises, and the lane sum runs in registers."""
    _, _, s, b = _params(lo, hi, levels)
    for i in range(n):
        d = _code(x[i], s, b, levels) * s + b - x[i]
        d2[i] = d * d
    return _lane_sum(d2)


@njit(cache=True, inline="always")
def _group_range(x, n):
    """min and max of ``x[:n]``; a -0.0 minimum becomes +0.0 (as in the reference)."""
    lo = x[0]
    hi = x[0]
    for i in range(1, n):
        v = x[i]
        if v < lo:
            lo = v
        if v > hi:
            hi = v
    return lo + np.float32(0.0), hi


@njit(cache=True, inline="always")
def _search_clip(x, n, lo, hi, levels, grid, refits, bufs):
    """quant._search_clip for one group: the grid of shrunken ranges, then least-squares refits;
    a candidate replaces the best only if its error is strictly lower."""
    d2, qf, qq, qx = bufs[0], bufs[1], bufs[2], bufs[3]
    best = _sse(x, n, lo, hi, levels, d2)
    best_lo, best_hi = lo, hi
    span = hi - lo
    for a in grid:
        for c in grid:
            if a != 0 or c != 0:
                cand_lo = lo + a * span
                cand_hi = hi - c * span
                err = _sse(x, n, cand_lo, cand_hi, levels, d2)
                if err < best:
                    best, best_lo, best_hi = err, cand_lo, cand_hi
    nf = np.float32(n)
    for _ in range(refits):
        _, _, s, b = _params(best_lo, best_hi, levels)
        for i in range(n):
            q = _code(x[i], s, b, levels)
            qf[i] = q
            qq[i] = q * q
            qx[i] = q * x[i]
        # quant._least_squares_affine
        sq = _lane_sum(qf)
        sx = _lane_sum(x)
        var = nf * _lane_sum(qq) - sq * sq
        cov = nf * _lane_sum(qx) - sq * sx
        scale = cov / var if var > 0 else np.float32(0.0)
        if scale < _TINY:
            scale = _TINY
        bias = (sx - scale * sq) / nf
        cand_hi = bias + scale * levels
        err = _sse(x, n, bias, cand_hi, levels, d2)
        if err < best:
            best, best_lo, best_hi = err, bias, cand_hi
    return best_lo, best_hi


# ---- whole rows ---------------------------------------------------------------------------------
@njit(cache=True, inline="always")
def _emit(x, n, lo, hi, levels, r, g, codes, scales, biases):
    """Store group ``g`` of row ``r`` coded for [lo, hi]: codes into the row's buffer, scale/bias bits."""
    sbits, bbits, s, b = _params(lo, hi, levels)
    scales[r, g] = np.uint16(sbits)
    biases[r, g] = np.uint16(bbits)
    base = g * n
    for i in range(n):
        codes[base + i] = np.uint32(_code(x[i], s, b, levels))


@njit(cache=True, inline="always")
def _pack_row(codes, bits, words, r):
    """quant.pack for one row: ``32 // bits`` codes per word, low bits first."""
    per_word = 32 // bits
    for k in range(words.shape[1]):
        word = np.uint32(0)
        for j in range(per_word):
            word |= codes[k * per_word + j] << np.uint32(j * bits)
        words[r, k] = word


@njit(parallel=True, cache=True, nogil=True)
def quantize_minmax_rows(w, bits, group_size, words, scales, biases):
    """Min/max quantisation of float32 rows ``w [R, n]`` into ``words``, ``scales``, ``biases``."""
    rows, n = w.shape
    levels = np.float32((1 << bits) - 1)
    for r in prange(rows):
        codes = np.empty(n, np.uint32)
        for g in range(n // group_size):
            x = w[r, g * group_size : (g + 1) * group_size]
            lo, hi = _group_range(x, group_size)
            _emit(x, group_size, lo, hi, levels, r, g, codes, scales, biases)
        _pack_row(codes, bits, words, r)


@njit(parallel=True, cache=True, nogil=True)
def quantize_clip_rows(w, bits, group_size, grid, refits, words, scales, biases):
    """Clip-search quantisation of float32 rows ``w [R, n]`` (see quant._search_clip)."""
    rows, n = w.shape
    levels = np.float32((1 << bits) - 1)
    padded = -(-group_size // _LANES) * _LANES
    for r in prange(rows):
        codes = np.empty(n, np.uint32)
        x = np.zeros(padded, np.float32)  # the group, zero-padded to whole lanes
        bufs = np.zeros((4, padded), np.float32)  # per-element terms of the sums; tails stay zero
        for g in range(n // group_size):
            for i in range(group_size):
                x[i] = w[r, g * group_size + i]
            lo, hi = _group_range(x, group_size)
            lo, hi = _search_clip(x, group_size, lo, hi, levels, grid, refits, bufs)
            _emit(x, group_size, lo, hi, levels, r, g, codes, scales, biases)
        _pack_row(codes, bits, words, r)


def quantize_rows(
    w: np.ndarray, bits: int, group_size: int, clip_grid: np.ndarray | None, refits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """float32 ``w [R, n]`` -> (uint32 words ``[R, n*bits/32]``, bf16 scales, bf16 biases ``[R, n/group]``).
    ``clip_grid`` (float32 shrink fractions) selects clip-search; None means min/max."""
    rows, n = w.shape
    words = np.empty((rows, n * bits // 32), np.uint32)
    scales = np.empty((rows, n // group_size), np.uint16)
    biases = np.empty_like(scales)
    w = _readonly(np.ascontiguousarray(w, dtype=np.float32))
    # rows are handed out in small chunks (not one half per thread): on a busy machine a thread that
    # is descheduled then delays only its chunk, not the whole call
    with _LOCK, parallel_chunksize(_ROWS_PER_CHUNK):
        if clip_grid is None:
            quantize_minmax_rows(w, bits, group_size, words, scales, biases)
        else:
            grid = _readonly(np.ascontiguousarray(clip_grid, dtype=np.float32))
            quantize_clip_rows(w, bits, group_size, grid, refits, words, scales, biases)
    return words, scales, biases


def _readonly(a: np.ndarray) -> np.ndarray:
    """Read-only view: numba compiles one version per writeability; always read-only means one."""
    v = a.view()
    v.flags.writeable = False
    return v
