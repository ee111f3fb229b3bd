"""Fast CPU kernels (numba): quantised matvec/matmul, a fused quantised SwiGLU expert, the gated
delta rule. Same signatures as the numpy reference in :mod:`fmoe.runtime.kernels.reference`.

Quantised weights are read in their packed form (fmoe.formats.quant: uint32 words, low bits first;
bf16 scales/biases as uint16 bit patterns), viewed as bytes: at 4 bits a byte holds two columns, at
2 bits four, at 8 bits one. ``x`` is split by the column's position in its byte ("phase") so the
inner loop is one multiply-add stream per phase over contiguous memory, which LLVM vectorises. The
affine bias is applied once per group as ``bias * sum(x[group])``.

Every kernel is compiled with ``cache=True`` (the first process compiles, later ones load) and
``fastmath`` limited to reassociation/contraction: sums may be reordered (that is what lets the
reductions vectorise) but NaN/Inf still propagate. Work is split over output rows (matmuls) or
value heads (delta rule) on numba's threads: all cores unless ``NUMBA_NUM_THREADS`` says otherwise.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Sequence

import numpy as np
from numba import njit, prange

from fmoe.formats.packed import ExpertLayout
from fmoe.formats.quant import QuantTensor
from fmoe.runtime.kernels import int8dot
from fmoe.runtime.kernels.packed_numba import bf16_value, gate_up_matrices, silu_combine, slot_matrix

# Reassociate + FMA contraction only; no 'nnan'/'ninf' so bad values stay visible.
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}
_ROWS_PER_CHUNK = 16  # output rows per parallel work item (amortises its scratch); a multiple of _ROW_BLOCK

if sys.byteorder != "little":  # the byte view below assumes little-endian uint32 words
    raise ImportError("fmoe's CPU kernels need a little-endian machine")


# ---- quantised matvec / matmul ------------------------------------------------------------------
@njit(cache=True)
def _split_x(x, phases, group_size, fold):
    """x [T, in] -> (xs [T, phases, in/phases] with xs[t, p, j] = x[t, j*phases + p], group sums [T, G]).

    ``fold``: the form the row dots take (see _dot4): ``xs[p] = x_p - 2^bits * x_(p-1)`` for p > 0."""
    T, n = x.shape
    m = n // phases
    radix = np.float32(1 << (8 // phases))
    xs = np.empty((T, phases, m), np.float32)
    xsum = np.zeros((T, n // group_size), np.float32)
    for t in range(T):
        for j in range(m):
            for p in range(phases):
                xs[t, p, j] = x[t, j * phases + p]
            if fold:
                for p in range(phases - 1, 0, -1):
                    xs[t, p, j] -= radix * xs[t, p - 1, j]
        for i in range(n):
            xsum[t, i // group_size] += x[t, i]
    return xs, xsum


# Row dot products ``W[r] . x`` for one quantised row: per group ``scale * sum(x * q) + bias * sum(x)``,
# with ``sc``, ``bi`` the row's scales and biases (bf16 bits). They are inlined into the parallel
# kernels (and compiled with their flags); one helper per bit width, because a single helper branching
# on the width inside made LLVM's code 20% slower.
# - Codes are unpacked in float32, never as integers: numba widens integer arithmetic to 64 bits, so
#   ``b & 15`` vectorised as 8 lanes of int64 plus int64->float conversions. A byte converted to
#   float once and split with ``floor(b / 16)`` (exact: powers of two, integers < 2^24) keeps 16 lanes
#   throughout (measured 1.5x on the lm_head matvec, AVX-512).
# - The group's byte count is passed as a literal for the default group size (64 columns: 32 bytes
#   at 4 bits, 16 at 2, 64 at 8): LLVM's vector loop takes 64 bytes a turn, so with an unknown trip
#   count of 32 every group fell through to its scalar-ish remainder loop.
# - Slices with range(gb) (not range(lo, hi)) let LLVM prove the indices non-negative, which drops
#   numba's wraparound checks from the inner loop; without that it does not vectorise (5x slower).
# - Few accumulators: each is reduced across vector lanes at the end of every group, and those
#   horizontal sums cost more than the longer dependency chain.
_GROUP_BYTES4, _GROUP_BYTES2, _GROUP_BYTES8 = 32, 16, 64  # bytes of one 64-column group (numba globals are constants)


@njit(cache=True, inline="always")
def _dot4(wg, x0, x1, n):
    """``sum_j x0[j] * lo(wg[j]) + x1[j] * hi(wg[j])`` over ``n`` bytes of 4-bit codes, with ``x`` folded
    (``x1 - 16 x0`` in place of ``x1``): ``lo = b - 16 hi``, so the sum is ``x0 b + (x1 - 16 x0) hi``,
    one multiply-add fewer per code than unpacking ``lo``."""
    a = np.float32(0.0)
    for j in range(n):
        b = np.float32(wg[j])
        a += x0[j] * b + x1[j] * np.floor(b * np.float32(0.0625))
    return a


@njit(cache=True, inline="always")
def _dot2(wg, x0, x1, x2, x3, n):
    """The 2-bit analogue of :func:`_dot4` (codes lowest first): with ``f_k = floor(b / 4^k)`` the codes
    are ``f_k - 4 f_(k+1)``, so the sum is ``x0 b + sum_k (x_k - 4 x_(k-1)) f_k`` over folded ``x``."""
    a = np.float32(0.0)
    for j in range(n):
        b = np.float32(wg[j])
        f1 = np.floor(b * np.float32(0.25))
        f2 = np.floor(b * np.float32(0.0625))
        f3 = np.floor(b * np.float32(0.015625))
        a += x0[j] * b + x1[j] * f1 + x2[j] * f2 + x3[j] * f3
    return a


@njit(cache=True, inline="always")
def _dot8(wg, x0, n):
    a = np.float32(0.0)
    for j in range(n):
        a += x0[j] * np.float32(wg[j])
    return a


@njit(cache=True, inline="always")
def _row_dot4(w8, r, sc, bi, xs, xsum):
    G = sc.shape[1]
    gb = w8.shape[1] // G  # bytes per group
    x0, x1 = xs[0], xs[1]
    acc = np.float32(0.0)
    for g in range(G):
        lo, hi = g * gb, (g + 1) * gb
        wg, x0g, x1g = w8[r, lo:hi], x0[lo:hi], x1[lo:hi]
        a = _dot4(wg, x0g, x1g, _GROUP_BYTES4) if gb == _GROUP_BYTES4 else _dot4(wg, x0g, x1g, gb)
        acc += bf16_value(sc[r, g]) * a + bf16_value(bi[r, g]) * xsum[g]
    return acc


@njit(cache=True, inline="always")
def _row_dot2(w8, r, sc, bi, xs, xsum):
    G = sc.shape[1]
    gb = w8.shape[1] // G
    x0, x1, x2, x3 = xs[0], xs[1], xs[2], xs[3]
    acc = np.float32(0.0)
    for g in range(G):
        lo, hi = g * gb, (g + 1) * gb
        wg, x0g, x1g, x2g, x3g = w8[r, lo:hi], x0[lo:hi], x1[lo:hi], x2[lo:hi], x3[lo:hi]
        if gb == _GROUP_BYTES2:
            a = _dot2(wg, x0g, x1g, x2g, x3g, _GROUP_BYTES2)
        else:
            a = _dot2(wg, x0g, x1g, x2g, x3g, gb)
        acc += bf16_value(sc[r, g]) * a + bf16_value(bi[r, g]) * xsum[g]
    return acc


@njit(cache=True, inline="always")
def _row_dot8(w8, r, sc, bi, xs, xsum):
    G = sc.shape[1]
    gb = w8.shape[1] // G
    x0 = xs[0]
    acc = np.float32(0.0)
    for g in range(G):
        lo, hi = g * gb, (g + 1) * gb
        wg, x0g = w8[r, lo:hi], x0[lo:hi]
        a = _dot8(wg, x0g, _GROUP_BYTES8) if gb == _GROUP_BYTES8 else _dot8(wg, x0g, gb)
        acc += bf16_value(sc[r, g]) * a + bf16_value(bi[r, g]) * xsum[g]
    return acc


@njit(cache=True, inline="always")
def _row_dot(w8, r, sc, bi, xs, xsum, bits):
    """The row dot product for ``bits`` (2, 4 or 8)."""
    if bits == 4:
        return _row_dot4(w8, r, sc, bi, xs, xsum)
    if bits == 2:
        return _row_dot2(w8, r, sc, bi, xs, xsum)
    return _row_dot8(w8, r, sc, bi, xs, xsum)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matvec(w8, scales, biases, xs, xsum, bits, out):
    """One token: ``out[r] = W[r] . x``, output rows in parallel chunks."""
    n_out = w8.shape[0]
    n_chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for c in prange(n_chunks):
        r0, r1 = c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)
        for r in range(r0, r1):
            out[r] = _row_dot(w8, r, scales, biases, xs, xsum, bits)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _gate_up_matvec(gw, gscales, gbiases, uw, uscales, ubiases, xs, xsum, bits, h):
    """One token through an expert's first half: ``h[r] = silu(gate[r] . x) * (up[r] . x)``."""
    n_out = gw.shape[0]
    n_chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for c in prange(n_chunks):
        r0, r1 = c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)
        for r in range(r0, r1):
            gate = _row_dot(gw, r, gscales, gbiases, xs, xsum, bits)
            up = _row_dot(uw, r, uscales, ubiases, xs, xsum, bits)
            h[r] = gate / (np.float32(1.0) + np.exp(-gate)) * up


_ROW_BLOCK = 4  # rows dequantised together in the batched kernel, so each x load feeds 4 FMAs


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _matmul(w8, scales, biases, xs, bits, out):
    """Batched: every row is unpacked once into a float32 scratch row (phase-split order, matching
    ``xs``) and dotted with all T tokens, so the packed weights are streamed once per call whatever
    T is. Rows go in blocks of 4, tokens in blocks of 4, so each load feeds several multiply-adds."""
    n_out = w8.shape[0]
    T, phases, m = xs.shape
    x2 = xs.reshape(T, phases * m)
    ident = np.arange(T)
    n_chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for c in prange(n_chunks):
        c0 = c * _ROWS_PER_CHUNK
        w = np.zeros((_ROW_BLOCK, phases * m), np.float32)
        _matmul_block(w8, scales, biases, x2, 0, T, ident, ident, phases, bits, c0, min(n_out, c0 + _ROWS_PER_CHUNK), w,
                      out, 0, c0)  # fmt: skip


@njit(cache=True, inline="always")
def _matmul_block(w8, scales, biases, x2, t_lo, t_hi, tin, tout, phases, bits, c0, c1, w, out, o_t, o_r):
    """``out[o_t + tout[t], o_r + r - c0] = W[r] . x2[tin[t]]`` for rows ``[c0, c1)``, tokens ``[t_lo, t_hi)``
    (``x2`` phase-split, unfolded), each row unpacked once into ``w`` (scratch ``[_ROW_BLOCK, n]``);
    ``tin``/``tout`` index the token rows, so callers gather and scatter nothing."""
    n = x2.shape[1]
    m = n // phases
    G = scales.shape[1]
    gb = w8.shape[1] // G
    mask = np.uint8((1 << bits) - 1)
    w0, w1, w2, w3 = w[0], w[1], w[2], w[3]
    for r0 in range(c0, c1, _ROW_BLOCK):
        nr = min(c1 - r0, _ROW_BLOCK)
        ro = o_r + r0 - c0
        for rr in range(nr):
            r = r0 + rr
            for p in range(phases):
                shift = np.uint8(p * bits)
                for g in range(G):
                    s = bf16_value(scales[r, g])
                    bias = bf16_value(biases[r, g])
                    wg, dst = w8[r, g * gb : (g + 1) * gb], w[rr, p * m + g * gb : p * m + (g + 1) * gb]
                    for j in range(gb):
                        dst[j] = np.float32((wg[j] >> shift) & mask) * s + bias
        t = t_lo
        while t + 4 <= t_hi:  # 4 rows x 4 tokens: 8 loads feed 16 multiply-adds
            xa, xb, xc, xd = x2[tin[t]], x2[tin[t + 1]], x2[tin[t + 2]], x2[tin[t + 3]]
            a00 = a01 = a02 = a03 = np.float32(0.0)
            a10 = a11 = a12 = a13 = np.float32(0.0)
            a20 = a21 = a22 = a23 = np.float32(0.0)
            a30 = a31 = a32 = a33 = np.float32(0.0)
            for j in range(n):
                p0, p1, p2, p3 = xa[j], xb[j], xc[j], xd[j]
                v = w0[j]
                a00 += v * p0
                a01 += v * p1
                a02 += v * p2
                a03 += v * p3
                v = w1[j]
                a10 += v * p0
                a11 += v * p1
                a12 += v * p2
                a13 += v * p3
                v = w2[j]
                a20 += v * p0
                a21 += v * p1
                a22 += v * p2
                a23 += v * p3
                v = w3[j]
                a30 += v * p0
                a31 += v * p1
                a32 += v * p2
                a33 += v * p3
            _store4(out, o_t + tout[t], ro, nr, a00, a10, a20, a30)
            _store4(out, o_t + tout[t + 1], ro, nr, a01, a11, a21, a31)
            _store4(out, o_t + tout[t + 2], ro, nr, a02, a12, a22, a32)
            _store4(out, o_t + tout[t + 3], ro, nr, a03, a13, a23, a33)
            t += 4
        while t < t_hi:  # the last tokens, fewer than 4
            xt = x2[tin[t]]
            a0 = a1 = a2 = a3 = np.float32(0.0)
            for j in range(n):
                xj = xt[j]
                a0 += w0[j] * xj
                a1 += w1[j] * xj
                a2 += w2[j] * xj
                a3 += w3[j] * xj
            _store4(out, o_t + tout[t], ro, nr, a0, a1, a2, a3)
            t += 1


@njit(cache=True, inline="always")
def _store4(out, t, r0, nr, a0, a1, a2, a3):
    """out[t, r0 : r0 + nr] = (a0, a1, a2, a3)[:nr]."""
    out[t, r0] = a0
    if nr > 1:
        out[t, r0 + 1] = a1
    if nr > 2:
        out[t, r0 + 2] = a2
    if nr > 3:
        out[t, r0 + 3] = a3


_PHASES = {2: 4, 4: 2, 8: 1}  # columns per byte


_PARTS: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}  # id(QuantTensor) -> _weight_parts


def _weight_parts(qt: QuantTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a 2-D quantised matrix; return (weight bytes [out, in*bits/8], scales, biases), read-only
    views. Kept per matrix while it lives (a decode token calls this about 40 times; 7 us a call)."""
    parts = _PARTS.get(id(qt))
    if parts is None:
        parts = _PARTS[id(qt)] = _check_weight_parts(qt)
        weakref.finalize(qt, _PARTS.pop, id(qt), None)  # the id may be reused once qt is gone
    return parts


def _check_weight_parts(qt: QuantTensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    if qt.bits not in _PHASES:
        raise ValueError(f"qmatmul: unsupported bit width {qt.bits}")
    if qt.weight.ndim != 2:
        raise ValueError(f"qmatmul: expected a 2-D quantised matrix, got shape {qt.shape}")
    n_out, n_in = qt.shape
    gs = qt.group_size
    if n_in % gs or (gs * qt.bits) % 8 or qt.scales.shape != (n_out, n_in // gs) or qt.biases.shape != qt.scales.shape:
        raise ValueError(f"qmatmul: inconsistent quantised tensor {qt.shape}, group {gs}, scales {qt.scales.shape}")
    w8 = _readonly_view(np.ascontiguousarray(qt.weight, dtype=np.uint32).view(np.uint8))
    scales = _readonly_view(np.ascontiguousarray(qt.scales, dtype=np.uint16))
    biases = _readonly_view(np.ascontiguousarray(qt.biases, dtype=np.uint16))
    return w8, scales, biases


def _tokens(x: np.ndarray, n_in: int, what: tuple[int, ...]) -> np.ndarray:
    """x as a read-only float32 C-contiguous ``[T, in]``."""
    if x.ndim not in (1, 2) or x.shape[-1] != n_in:
        raise ValueError(f"qmatmul: x has shape {x.shape}, the matrix is {what}")
    return _readonly_view(np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in))


def _readonly_view(a: np.ndarray) -> np.ndarray:
    """A read-only view: numba compiles one specialisation per writeability, so passing inputs
    always read-only means weights from a read-only buffer (mmap, bytes) reuse the same machine code."""
    v = a.view()
    v.flags.writeable = False
    return v


# With an even number of groups per row the integer-dot GEMM (int8dot.gemm: register tiles of 1-2 rows
# by 4 tokens) takes any number of tokens: 2x the float batched matmul at 128 tokens, 2048 x 8192 and
# 4096 x 2048 (dev box). With an odd number, the row-by-row integer kernel takes up to this many
# tokens, where it beats the float batched matmul (2048 x 2048: 1.11x at 16 tokens, 0.72x at 128).
_INT8_MAX_TOKENS = 16


def _int8_ok(int8: bool, bits: int, group_size: int, rows_only: bool = False) -> bool:
    """Whether the integer-dot kernels (runtime/kernels/int8dot.py) take this call: asked for, 4 bits
    in 64-column groups, and a CPU with AVX512-VNNI or AVX2; ``rows_only``: one token's row dots,
    which take 2-bit rows too (the GEMM tiles do not)."""
    widths = (4, 2) if rows_only else (4,)
    return int8 and bits in widths and group_size == int8dot.GROUP_COLUMNS and int8dot.AVAILABLE


def qmatmul(x: np.ndarray, qt: QuantTensor, int8: bool = False) -> np.ndarray:
    """``x @ W.T`` for an affine-quantised ``W [out, in]`` (2, 4 or 8 bits; any group size that
    starts groups on byte boundaries). ``x`` float32 ``[in]`` or ``[T, in]``; returns float32
    ``[out]`` or ``[T, out]``. One token: a matvec reading the packed bytes directly; several: each
    row unpacked once and applied to all tokens. ``int8``: at 4 bits, integer dot products where the
    CPU has them (int8 activations: see int8dot's precision note)."""
    w8, scales, biases = _weight_parts(qt)
    x2 = _tokens(x, qt.shape[1], qt.shape)
    T = x2.shape[0]
    out = np.empty((T, w8.shape[0]), np.float32)
    if T == 0:
        return out
    even = scales.shape[1] % 2 == 0  # the GEMM's tiles take two groups at a time
    if _int8_ok(int8, qt.bits, qt.group_size) and (T == 1 or even or T <= _INT8_MAX_TOKENS):
        if T == 1:  # quantises its row itself
            (int8dot.gemv if even else int8dot.matvec)(w8, scales, biases, x2[0], out[0])
            return out[0] if x.ndim == 1 else out
        x0, x1, xscale, xsum = int8dot.quantize_activations(x2)
        if even:
            int8dot.gemm(w8, scales, biases, x0, x1, xscale, xsum, out)
        else:
            int8dot.matmul(w8, scales, biases, x0, x1, xscale, xsum, out)
        return out
    xs, xsum = _split_x(x2, _PHASES[qt.bits], qt.group_size, T == 1)
    if T == 1:
        _matvec(w8, scales, biases, xs[0], xsum[0], qt.bits, out[0])
    else:
        _matmul(w8, scales, biases, xs, qt.bits, out)
    return out[0] if x.ndim == 1 else out


def qmatvecs(x: np.ndarray, qts: Sequence[QuantTensor], int8: bool = False) -> list[np.ndarray]:
    """:func:`qmatmul` of one token ``x [in]`` through several matrices of one format and input width
    (a layer's projections of one normed input). On int8 inputs with an even number of groups a row,
    one parallel region (:func:`int8dot.gemvs`): x rounded once and the matrices' chunks of rows one
    work list, so 16 threads share all of them and a small matrix (a router's one-row gate, a
    DeltaNet's a and b) costs no region of its own: 1.26-1.63x one call a matrix on 16 threads, 0.96-
    1.21x on 2 (docs/PERFORMANCE.md). Each output is bitwise what :func:`qmatmul` gives it alone. The
    float kernels go a matrix at a time: their one-region version measured 0.85x on 2 threads."""
    if not qts:
        return []
    bits, gs, n_in = qts[0].bits, qts[0].group_size, qts[0].shape[1]
    for i, qt in enumerate(qts):
        if (qt.bits, qt.group_size, qt.shape[1]) != (bits, gs, n_in):
            raise ValueError(f"qmatvecs: matrix {i} {qt.shape} ({qt.bits} bits) is not of matrix 0's format and width")
    xs = _tokens(x, n_in, qts[0].shape)
    if xs.shape[0] != 1:
        raise ValueError(f"qmatvecs: one token, got x of shape {x.shape}")
    if not _int8_ok(int8, bits, gs) or (n_in // gs) % 2:  # gemv's tiles take two groups at a time
        return [qmatmul(xs[0], qt, int8) for qt in qts]
    outs = tuple(np.empty(qt.shape[0], np.float32) for qt in qts)
    w8s, scales, biases = zip(*(_weight_parts(qt) for qt in qts), strict=True)
    int8dot.gemvs(w8s, scales, biases, xs[0], outs)
    return list(outs)


def swiglu_expert(
    x: np.ndarray, gate: QuantTensor, up: QuantTensor, down: QuantTensor, int8: bool = False
) -> np.ndarray:
    """A quantised SwiGLU expert, ``down(silu(gate x) * up x)``; x float32 ``[hidden]`` or ``[T, hidden]``.

    For one token, gate and up run in one fused pass (no gate/up temporaries, one parallel region
    fewer); for several, three batched matmuls.
    """
    if gate.shape != up.shape or (gate.bits, gate.group_size) != (up.bits, up.group_size):
        raise ValueError(f"swiglu_expert: gate {gate.shape} and up {up.shape} differ in shape or format")
    if down.shape[-1] != gate.shape[0]:
        raise ValueError(f"swiglu_expert: down {down.shape} does not take gate's {gate.shape[0]} outputs")
    x2 = _tokens(x, gate.shape[1], gate.shape)
    if x2.shape[0] != 1 or _int8_ok(int8, gate.bits, gate.group_size):
        if x2.shape[0] == 1:  # one token on int8 inputs: gate and up in one region, x rounded once
            g, u = (y[None] for y in qmatvecs(x2[0], [gate, up], int8))
        else:
            g, u = qmatmul(x2, gate, int8), qmatmul(x2, up, int8)
        with np.errstate(over="ignore"):  # exp(-g) -> inf for very negative g gives silu = -0, as it should
            h = g / (np.float32(1.0) + np.exp(-g)) * u
        y = qmatmul(h, down, int8)
        return y if x.ndim == 2 else y[0]
    gparts, uparts = _weight_parts(gate), _weight_parts(up)
    xs, xsum = _split_x(x2, _PHASES[gate.bits], gate.group_size, True)
    h = np.empty(gate.shape[0], np.float32)
    _gate_up_matvec(*gparts, *uparts, xs[0], xsum[0], gate.bits, h)
    y = qmatmul(h, down)
    return y if x.ndim == 1 else y[None]


# ---- routed experts, grouped --------------------------------------------------------------------
# Decode runs K experts on one token each: as K separate calls, each small matrix is its own parallel
# region (K x 2 barriers per layer, too few rows per thread on many cores). Here all (expert, token)
# pairs of a part go through one region per stage, work split over pairs x row chunks, reading each
# expert straight from its slot of the store's slab (expert files side by side, components at the
# layout's offsets), so 16 threads have work and nothing is copied.
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _pairs_gate_up(slab, slots, gate, up, n_out, wbytes, groups, tin, tout, xs, xsum, bits, h):
    """``h[tout[p]] = silu(gate_p . x_t) * (up_p . x_t)`` for every pair p (slot ``slots[p]``, input
    ``xs[t]``, ``t = tin[p]``).
    ``gate``/``up``: the (weight, scales, biases) byte offsets of the projection in a slot."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        gw, gs, gb, uw, us, ub = gate_up_matrices(slab[slots[p]], gate, up, n_out, wbytes, groups)
        r0, r1 = c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)
        t, o = tin[p], tout[p]
        for r in range(r0, r1):
            g = _row_dot(gw, r, gs, gb, xs[t], xsum[t], bits)
            u = _row_dot(uw, r, us, ub, xs[t], xsum[t], bits)
            h[o, r] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _pairs_matvec(slab, slots, proj, n_out, wbytes, groups, tin, tout, xs, xsum, bits, out):
    """``out[tout[p]] = W_p . x[tin[p]]`` for every pair p, ``W_p`` the projection at ``proj`` offsets in
    slot ``slots[p]``."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        w8, sc, bi = slot_matrix(slab[slots[p]], proj[0], proj[1], proj[2], n_out, wbytes, groups)
        r0, r1 = c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)
        t, o = tin[p], tout[p]
        for r in range(r0, r1):
            out[o, r] = _row_dot(w8, r, sc, bi, xs[t], xsum[t], bits)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _experts_gate_up(slab, seg_slots, seg_start, gate, up, n_out, wbytes, groups, tin, tout, x2, phases, bits, h):
    """``h[tout[p]] = silu(gate . x2[tin[p]]) * (up . x2[tin[p]])`` for the pairs of each segment ``s``
    (pairs ``seg_start[s]`` to ``seg_start[s + 1]``, all of the expert in slot ``seg_slots[s]``): each
    row unpacked once for all the segment's tokens (_matmul_block), parallel over (segment, row chunk)."""
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    ident = np.arange(tin.shape[0])  # g and u below: the segment's rows from 0
    for item in prange(seg_slots.shape[0] * chunks):
        s, c = item // chunks, item % chunks
        gw, gs, gb, uw, us, ub = gate_up_matrices(slab[seg_slots[s]], gate, up, n_out, wbytes, groups)
        t_lo, t_hi, c0 = seg_start[s], seg_start[s + 1], c * _ROWS_PER_CHUNK
        c1 = min(n_out, c0 + _ROWS_PER_CHUNK)
        w = np.zeros((_ROW_BLOCK, x2.shape[1]), np.float32)
        g = np.empty((t_hi - t_lo, c1 - c0), np.float32)
        u = np.empty_like(g)
        _matmul_block(gw, gs, gb, x2, t_lo, t_hi, tin, ident, phases, bits, c0, c1, w, g, -t_lo, 0)
        _matmul_block(uw, us, ub, x2, t_lo, t_hi, tin, ident, phases, bits, c0, c1, w, u, -t_lo, 0)
        silu_combine(g, u, h, tout, t_lo, c0)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _experts_matmul(slab, seg_slots, seg_start, proj, n_out, wbytes, groups, tin, tout, x2, phases, bits, out):
    """``out[tout[p]] = W . x2[tin[p]]`` for the pairs of each segment (as _experts_gate_up), ``W`` the
    projection at ``proj`` offsets in the segment's slot."""
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(seg_slots.shape[0] * chunks):
        s, c = item // chunks, item % chunks
        w8, sc, bi = slot_matrix(slab[seg_slots[s]], proj[0], proj[1], proj[2], n_out, wbytes, groups)
        t_lo, c0 = seg_start[s], c * _ROWS_PER_CHUNK
        w = np.zeros((_ROW_BLOCK, x2.shape[1]), np.float32)
        c1 = min(n_out, c0 + _ROWS_PER_CHUNK)
        _matmul_block(w8, sc, bi, x2, t_lo, seg_start[s + 1], tin, tout, phases, bits, c0, c1, w, out, 0, c0)


def experts_swiglu(
    slab: np.ndarray,
    layout: ExpertLayout,
    slots: np.ndarray,
    x: np.ndarray,
    int8: bool = False,
    tokens: np.ndarray | None = None,
    out: np.ndarray | None = None,
    dest: np.ndarray | None = None,
) -> np.ndarray:
    """SwiGLU of pair p's expert (slot ``slots[p]`` of ``slab``, uint8 ``[S, file_size]`` laid out as
    ``layout``) on its input row: ``x[tokens[p]]`` (``x`` ``[T, hidden]``; ``tokens`` default: pair p
    reads row p), written to ``out[dest[p]]`` (``out`` float32 C-contiguous ``[N, hidden]``; default a
    new ``[P, hidden]``, ``dest`` the pairs in order); returns ``out``. The kernels index the rows
    themselves, so a prefill's (token, choice) pairs are never gathered or scattered in memory.
    Experts with several pairs (prefill): grouped, each row read once for all their tokens; with one
    (decode): row dots per pair, or on int8 inputs the grouped kernels' tiles as well; each kind in
    two parallel regions (gate and up fused, then down)."""
    comp = layout.components
    inter, hidden = comp["gate_proj.weight"].shape[0], comp["down_proj.weight"].shape[0]
    bits, gs = layout.bits, layout.group_size
    P = slots.shape[0]
    if slab.dtype != np.uint8 or not slab.flags.c_contiguous or slab.shape[1] != layout.file_size:
        raise ValueError(f"experts_swiglu: slab must be C-contiguous uint8 [slots, {layout.file_size}]")
    tok = np.arange(P) if tokens is None else np.ascontiguousarray(tokens, dtype=np.int64)
    if x.ndim != 2 or x.shape[1] != hidden or tok.shape != (P,) or (tokens is None and x.shape[0] != P):
        raise ValueError(f"experts_swiglu: x {x.shape} does not fit {P} pairs of hidden {hidden}")
    if P and (tok.min() < 0 or tok.max() >= x.shape[0]):
        raise ValueError("experts_swiglu: token row out of range")
    if out is None:
        out = np.empty((P, hidden), np.float32)
    if out.dtype != np.float32 or not out.flags.c_contiguous or out.ndim != 2 or out.shape[1] != hidden:
        raise ValueError(f"experts_swiglu: out must be C-contiguous float32 [N, {hidden}]")
    dst = np.arange(P) if dest is None else np.ascontiguousarray(dest, dtype=np.int64)
    if dst.shape != (P,) or (P and (dst.min() < 0 or dst.max() >= out.shape[0])):
        raise ValueError("experts_swiglu: dest does not fit out")
    if P and (slots.min() < 0 or slots.max() >= slab.shape[0]):
        raise ValueError("experts_swiglu: slot out of range")
    if not P:
        return out

    def offsets(proj: str) -> np.ndarray:
        return np.array([comp[f"{proj}.{part}"].offset for part in ("weight", "scales", "biases")], np.int64)

    ro_slab, ro_slots = _readonly_view(slab), _readonly_view(np.ascontiguousarray(slots, dtype=np.int64))
    up_shape, down_shape = (inter, hidden * bits // 8, hidden // gs), (hidden, inter * bits // 8, inter // gs)
    gate_up, down = (offsets("gate_proj"), offsets("up_proj")), offsets("down_proj")
    use_int8 = _int8_ok(int8, bits, gs)
    int8_rows = _int8_ok(int8, bits, gs, rows_only=True)  # (2-bit experts: one token's rows only)
    xt = _tokens(x, hidden, (hidden,))
    # The token rows are quantised or phase-split once each, not once per (token, choice): a row's
    # codes are the same whichever pair reads them, so this changes no bit.
    xq: tuple = int8dot.quantize_activations(xt, bits) if int8_rows else ()
    single = np.arange(P)
    # the int8 GEMM's tiles take two groups at a time
    if not use_int8 or ((hidden // gs) % 2 == 0 and (inter // gs) % 2 == 0):
        # Experts with several tokens (prefill) grouped: each expert's weights read once for all its
        # tokens, in one parallel region per stage. A pair's result does not depend on the other
        # experts in the call, so how the store cut its parts (whole experts each) changes nothing.
        order = np.argsort(ro_slots, kind="stable")
        first = np.flatnonzero(np.diff(ro_slots[order], prepend=-1))
        counts = np.diff(first, append=order.size)
        # on int8 inputs an expert with one token takes the GEMM's tiles too (decode: 1.2-1.3x the row
        # dots on 2 threads, and a token's result is then bitwise the same in decode and in prefill)
        tiled = counts > (0 if use_int8 else 1)
        if tiled.any():
            starts = np.concatenate([[0], np.cumsum(counts[tiled])])
            grouped = np.concatenate([order[f : f + n] for f, n in zip(first[tiled], counts[tiled], strict=True)])
            seg_slots = _readonly_view(ro_slots[order[first[tiled]]])
            t_in, t_out, ident = tok[grouped], dst[grouped], np.arange(grouped.size)
            h = np.empty((grouped.size, inter), np.float32)
            if use_int8:
                int8dot.experts_gate_up(ro_slab, seg_slots, starts, *gate_up, *up_shape, t_in, ident, *xq, h)
                hq = int8dot.quantize_activations(h)
                int8dot.experts_matmul(ro_slab, seg_slots, starts, down, *down_shape, ident, t_out, *hq, out)
            else:
                ph = _PHASES[bits]
                xs, _ = _split_x(xt, ph, gs, False)
                _experts_gate_up(ro_slab, seg_slots, starts, *gate_up, *up_shape, t_in, ident, xs.reshape(xt.shape), ph,
                                 bits, h)  # fmt: skip
                hs, _ = _split_x(h, ph, gs, False)
                _experts_matmul(ro_slab, seg_slots, starts, down, *down_shape, ident, t_out, hs.reshape(h.shape), ph,
                                bits, out)  # fmt: skip
            single = order[first[~tiled]]
    if single.size:  # one token per expert, float or odd groups (decode): row dots straight from the slab
        one_slots, t_in, t_out = _readonly_view(ro_slots[single]), tok[single], dst[single]
        ident = np.arange(single.size)
        h = np.empty((single.size, inter), np.float32)
        if int8_rows:
            int8dot.pairs_gate_up(ro_slab, one_slots, *gate_up, *up_shape, t_in, ident, *xq, h)
            hq = int8dot.quantize_activations(h, bits)
            int8dot.pairs_matvec(ro_slab, one_slots, down, *down_shape, ident, t_out, *hq, out)
        else:
            xs, xsum = _split_x(xt, _PHASES[bits], gs, True)
            _pairs_gate_up(ro_slab, one_slots, *gate_up, *up_shape, t_in, ident, xs, xsum, bits, h)
            hs, hsum = _split_x(h, _PHASES[bits], gs, True)
            _pairs_matvec(ro_slab, one_slots, down, *down_shape, ident, t_out, hs, hsum, bits, out)
    return out


# ---- gated delta rule ---------------------------------------------------------------------------
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _delta_rule(q, k, v, g, beta, state, out):
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    rep = Hv // Hk
    for h in prange(Hv):
        kh = h // rep
        S = state[h]
        kv = np.empty(Dv, np.float32)
        for t in range(T):
            decay = np.float32(np.exp(g[t, h]))
            # pass 1: decay the state and read it with k
            kv[:] = 0.0
            for i in range(Dk):
                ki = k[t, kh, i]
                for j in range(Dv):
                    s = S[i, j] * decay
                    S[i, j] = s
                    kv[j] += s * ki
            b = beta[t, h]
            for j in range(Dv):
                kv[j] = (v[t, h, j] - kv[j]) * b  # kv now holds delta
            # pass 2: rank-1 update, then read the new state with q
            o = out[t, h]
            o[:] = 0.0
            for i in range(Dk):
                ki = k[t, kh, i]
                qi = q[t, kh, i]
                for j in range(Dv):
                    s = S[i, j] + ki * kv[j]
                    S[i, j] = s
                    o[j] += s * qi


def gated_delta_rule(
    q: np.ndarray, k: np.ndarray, v: np.ndarray, g: np.ndarray, beta: np.ndarray, state: np.ndarray
) -> np.ndarray:
    """The gated delta rule over T tokens, parallel over value heads; fp32.

    q, k ``[T, Hk, Dk]`` (already l2-normalised, q already scaled), v ``[T, Hv, Dv]``, g (log
    decay, <= 0) and beta ``[T, Hv]``; ``state`` float32 C-contiguous ``[Hv, Dk, Dv]``, updated in
    place. Value head ``j`` reads key head ``j // (Hv // Hk)``. Per step:
    ``S *= exp(g); kv = S^T k; S += outer(k, (v - kv) * beta); o = S^T q``. Returns ``o [T, Hv, Dv]``.
    """
    T, Hk, Dk = k.shape
    Hv, Dv = v.shape[1], v.shape[2]
    if (
        q.shape != k.shape
        or v.shape[0] != T
        or g.shape != (T, Hv)
        or beta.shape != (T, Hv)
        or Hv % Hk
        or state.shape != (Hv, Dk, Dv)
    ):
        raise ValueError(
            f"gated_delta_rule: shapes q {q.shape} k {k.shape} v {v.shape} g {g.shape} "
            f"beta {beta.shape} state {state.shape} do not fit"
        )
    if state.dtype != np.float32 or not state.flags.c_contiguous or not state.flags.writeable:
        raise ValueError("gated_delta_rule: state must be a writeable C-contiguous float32 array (updated in place)")
    f32 = [_readonly_view(np.ascontiguousarray(a, dtype=np.float32)) for a in (q, k, v, g, beta)]
    out = np.empty((T, Hv, Dv), np.float32)
    qf, kf, vf, gf, bf = f32
    _delta_rule(qf, kf, vf, gf, bf, state, out)
    return out


# Not fast math: with it the result moved in its last bits from call to call (CI: one engine's answers
# differed between threads), likely as the reassociated l2 and rms sums were vectorised in loops LLVM
# versions on a run-time alias check (local rows against qkv), whose two versions add in other orders.
# In order, the sums are the same on every call.
@njit(parallel=True, cache=True, fastmath=False)
def _delta_net(qkv, a, b, a_log, dt_bias, norm, eps, hk, dk, state, out):
    """:func:`delta_net`'s work, parallel over value heads: per token the head's inputs (its key head's
    q and k l2-normalised, the decay and beta), the recurrence (as :func:`_delta_rule`), then the
    head's rms norm into ``out [T, Hv*Dv]`` (the gate's silu is numpy's: numba's exp is a call per
    element, which made the pass slower than the numpy glue it replaces)."""
    T = qkv.shape[0]
    Hv, Dv = state.shape[0], state.shape[2]
    rep = Hv // hk
    q_scale = np.float32(1.0 / np.sqrt(dk))
    for h in prange(Hv):
        kh = h // rep
        S = state[h]
        q, k = np.empty(dk, np.float32), np.empty(dk, np.float32)
        kv, o = np.empty(Dv, np.float32), np.empty(Dv, np.float32)
        neg_a = -np.exp(a_log[h])
        for t in range(T):
            sq, sk = np.float32(0.0), np.float32(0.0)
            for i in range(dk):
                q[i], k[i] = qkv[t, kh * dk + i], qkv[t, (hk + kh) * dk + i]
                sq += q[i] * q[i]
                sk += k[i] * k[i]
            rq = q_scale / np.sqrt(sq + np.float32(1e-6))
            rk = np.float32(1.0) / np.sqrt(sk + np.float32(1e-6))
            for i in range(dk):
                q[i] *= rq
                k[i] *= rk
            x = a[t, h] + dt_bias[h]
            decay = np.float32(np.exp(neg_a * (max(x, np.float32(0.0)) + np.log1p(np.exp(-abs(x))))))
            beta = np.float32(1.0) / (np.float32(1.0) + np.exp(-b[t, h]))
            v0 = 2 * hk * dk + h * Dv
            kv[:] = 0.0
            for i in range(dk):
                for j in range(Dv):
                    s = S[i, j] * decay
                    S[i, j] = s
                    kv[j] += s * k[i]
            for j in range(Dv):
                kv[j] = (qkv[t, v0 + j] - kv[j]) * beta
            o[:] = 0.0
            for i in range(dk):
                for j in range(Dv):
                    s = S[i, j] + k[i] * kv[j]
                    S[i, j] = s
                    o[j] += s * q[i]
            ss = np.float32(0.0)
            for j in range(Dv):
                ss += o[j] * o[j]
            inv = np.float32(1.0) / np.sqrt(ss / Dv + eps)
            for j in range(Dv):
                out[t, h * Dv + j] = o[j] * inv * norm[j]


def delta_net(
    qkv: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    z: np.ndarray,
    a_log: np.ndarray,
    dt_bias: np.ndarray,
    norm: np.ndarray,
    eps: float,
    heads: tuple[int, int, int, int],
    state: np.ndarray,
) -> np.ndarray:
    """The DeltaNet from its conv output ``qkv [T, 2*Hk*Dk + Hv*Dv]`` to its output projection's input
    ``[T, Hv*Dv]`` in one parallel pass (the backend's ``delta_net`` op: inputs, recurrence, gated
    norm; numpy's glue around :func:`gated_delta_rule` cost about a third of it at the 397B's heads).
    ``a``, ``b [T, Hv]``, ``z [T, Hv*Dv]``, ``a_log``, ``dt_bias [Hv]``, ``norm [Dv]``; ``state``
    float32 C-contiguous ``[Hv, Dk, Dv]``, updated in place."""
    hk, dk, hv, dv = heads
    T = qkv.shape[0]
    want = {"qkv": (T, 2 * hk * dk + hv * dv), "a": (T, hv), "b": (T, hv), "z": (T, hv * dv), "A_log": (hv,),
            "dt_bias": (hv,), "norm": (dv,), "state": (hv, dk, dv)}  # fmt: skip
    arrays = {"qkv": qkv, "a": a, "b": b, "z": z, "A_log": a_log, "dt_bias": dt_bias, "norm": norm, "state": state}
    for name, arr in arrays.items():
        if arr.shape != want[name]:
            raise ValueError(f"delta_net: {name} has shape {arr.shape}, expected {want[name]}")
    if hk == 0 or hv % hk:
        raise ValueError(f"delta_net: {hv} value heads are not a multiple of {hk} key heads")
    if state.dtype != np.float32 or not state.flags.c_contiguous or not state.flags.writeable:
        raise ValueError("delta_net: state must be a writeable C-contiguous float32 array (updated in place)")
    qf, af, bf, logf, biasf, normf = (
        _readonly_view(np.ascontiguousarray(x, dtype=np.float32)) for x in (qkv, a, b, a_log, dt_bias, norm)
    )
    out = np.empty((T, hv * dv), np.float32)
    _delta_net(qf, af, bf, logf, biasf, normf, np.float32(eps), hk, dk, state, out)
    zf = np.asarray(z, dtype=np.float32)
    out *= zf * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * zf))  # silu, as causal_conv1d_silu
    return out


# ---- causal depthwise convolution (DeltaNet's short conv) ---------------------------------------
_CONV_CHANNELS = 512  # channels per parallel work item


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def _conv(x, weight_t, state, out):
    """``out[t] = sum_j full[t + j] * weight_t[j]`` with ``full`` = state rows then x rows; one pass per
    token over a block of channels (numpy made a temporary per tap)."""
    T, C = x.shape
    W = weight_t.shape[0]
    for k in prange((C + _CONV_CHANNELS - 1) // _CONV_CHANNELS):
        c0, c1 = k * _CONV_CHANNELS, min(C, (k + 1) * _CONV_CHANNELS)
        for t in range(T):
            o = out[t, c0:c1]
            o[:] = 0.0
            for j in range(W):
                s = t + j - (W - 1)
                row = x[s, c0:c1] if s >= 0 else state[t + j, c0:c1]
                wj = weight_t[j, c0:c1]
                for c in range(c1 - c0):
                    o[c] += row[c] * wj[c]


def causal_conv1d_silu(x: np.ndarray, weight: np.ndarray, conv_state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``silu`` of the causal depthwise convolution of ``x [T, C]`` with ``weight [C, W]`` after the
    ``W - 1`` rows of ``conv_state``; returns (output ``[T, C]``, the new state: the last ``W - 1`` rows)."""
    t, c = x.shape
    w = weight.shape[1]
    if weight.shape[0] != c or conv_state.shape != (w - 1, c):
        raise ValueError(f"causal_conv1d_silu: x {x.shape}, weight {weight.shape}, state {conv_state.shape} do not fit")
    xf = _readonly_view(np.ascontiguousarray(x, dtype=np.float32))
    st = _readonly_view(np.ascontiguousarray(conv_state, dtype=np.float32))
    out = np.empty((t, c), np.float32)
    _conv(xf, _readonly_view(np.ascontiguousarray(weight.T, dtype=np.float32)), st, out)
    new_state = np.concatenate([st, xf], axis=0)[t:] if t < w - 1 else xf[t - (w - 1) :].copy()
    # SiLU in numpy, as the backend's silu: numpy's tanh is vectorised, numba's is a libm call per element
    return out * (np.float32(0.5) + np.float32(0.5) * np.tanh(np.float32(0.5) * out)), new_state


# ---- warm-up ------------------------------------------------------------------------------------
def warmup() -> None:
    """Compile (or load from the numba cache) every kernel on tiny inputs: the quantised matvec and
    batched matmul, the fused expert, the delta rule. Inputs are passed read-only, so one
    specialisation serves writeable and read-only weights alike."""
    from fmoe.formats.quant import quantize

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 64)).astype(np.float32)
    for bits in _PHASES:
        qt = quantize(w, bits)
        qmatmul(w[0], qt)
        qmatmul(w[:2], qt)
    down = quantize(w[:, :8].T.copy(), 4, 8)  # [64, 8] at group 8: takes the 8 outputs of gate/up
    swiglu_expert(w[0], qt, qt, down)
    q = rng.standard_normal((1, 1, 4)).astype(np.float32)
    g, beta = np.zeros((1, 1), np.float32), np.ones((1, 1), np.float32)
    gated_delta_rule(q, q, q, g, beta, np.zeros((1, 4, 4), np.float32))
    delta_net(np.zeros((1, 12), np.float32), g, beta, q[0], g[0], g[0], q[0, 0], 1e-6, (1, 4, 1, 4),
              np.zeros((1, 4, 4), np.float32))  # fmt: skip
    causal_conv1d_silu(w[:2, :8], w[:, :4], np.zeros((3, 8), np.float32))
