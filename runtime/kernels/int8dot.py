"""4-bit matvecs and matmuls on integer dot products: the activation rows are quantised to int8 per
64-column group, as llama.cpp's Q8 activations are, and each group's 64 codes x int8 products are
summed in integer lanes, by two ``vpdpbusd`` on AVX-512 VNNI or, on AVX2, by ``vpmaddubsw`` (byte pairs
into int16) and ``vpmaddwd`` (int16 pairs into int32), which give the same four-byte lane sums. numba
emits neither from a loop, so a row's dot (decode) and a GEMM's register tile (prefill: 1-2 rows by
a few tokens, ``gemm`` and the routed experts grouped by expert) are numba intrinsics written in LLVM
IR; they are compiled only where the CPU has one of the two (``AVAILABLE``, ``ISA``), and callers
fall back to the float kernels elsewhere.

Precision: the int8 rounding of the activations, at most half a step (``amax_g / 254``) per element,
not float32 rounding: ``|y - y_exact| <= sum_g amax_g / 254 * sum_(j in g) |w_j|`` plus float32 sums
(tests/test_kernels.py checks exactly that bound). Both instruction sets compute the same integers.
The tests check the rounding by its bound, not against numpy's: the kernels round ``x * (1 / d)``,
which can land on the other side of a half step than ``x / d``.
On the trained reference model (512 held-out tokens, decode; scripts/int8_quality.py) the logits
moved by 2.6% of their norm (median), KL 4.4e-3, same top token 94.3%: about what 4-bit experts cost
(docs/QUALITY.md). llama.cpp's CPU path rounds its activations the same way; here it is an option
(``int8=True`` of the CPU kernels, ``--int8-dot``), not the default.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fmoe.runtime.kernels.packed_numba import bf16_value, gate_up_matrices, silu_combine, slot_matrix

_FEATURES = llvm.get_host_cpu_features()
_VNNI = bool(_FEATURES.get("avx512vnni")) and bool(_FEATURES.get("avx512vl"))
ISA = "avx512-vnni" if _VNNI else "avx2" if _FEATURES.get("avx2") else None
AVAILABLE = ISA is not None
GROUP_COLUMNS = 64  # the quantisation group these kernels take (32 bytes at 4 bits)
# numba compiles a function that leaves fastmath unset with the flags of whatever first calls it, once per
# array type (its option inheritance), and under fast math LLVM rewrites ``1 / (amax * (1 / 127))`` as
# ``127 / amax``, another float32, which rounds a few activations in a million the other way: the GEMM
# then disagreed with a rounding compiled for another array type (CI saw it). So the rounding sets
# fastmath=False itself. The step is amax times this, not amax / 127, and the group sums go through
# float64: what the GPU kernels and the tests compute too.
_INV_127 = np.float32(1.0 / 127.0)
_ROWS_PER_CHUNK = 16
_GEMM_ROWS = 16  # rows per parallel work item of the GEMMs: 16 rows of 1-2 KiB stay in L1 with a tile of x
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


def _declare(module: ir.Module, name: str, ret: ir.Type, params: list[ir.Type]) -> ir.Function:
    return module.globals.get(name) or ir.Function(module, ir.FunctionType(ret, params), name)


def _lane_dots(builder: ir.IRBuilder, lo: ir.Value, hi: ir.Value, xa: ir.Value, xb: ir.Value) -> ir.Value:
    """int32 lanes of ``lo . xa + hi . xb``, four bytes per lane (``lo``/``hi`` unsigned 4-bit codes,
    ``xa``/``xb`` int8; byte vectors of 32 or 64 lanes -> 8 or 16 int32 lanes): two ``vpdpbusd`` with
    VNNI; on AVX2, per 32 bytes ``vpmaddubsw`` twice, summed, then ``vpmaddwd`` by ones. No int16
    saturates: a pair of products is at most 2 * 15 * 127, the lo + hi sum 7620 < 32767."""
    i8, i16, i32 = ir.IntType(8), ir.IntType(16), ir.IntType(32)
    n = lo.type.count
    module = builder.module
    if _VNNI:
        vi = ir.VectorType(i32, n // 4)
        dot = _declare(module, f"llvm.x86.avx512.vpdpbusd.{n * 8}", vi, [vi] * 3)
        d = builder.call(dot, [ir.Constant(vi, [0] * (n // 4)), builder.bitcast(lo, vi), builder.bitcast(xa, vi)])
        return builder.call(dot, [d, builder.bitcast(hi, vi), builder.bitcast(xb, vi)])
    v32i8, v16i16, v8i32 = ir.VectorType(i8, 32), ir.VectorType(i16, 16), ir.VectorType(i32, 8)
    madd_bytes = _declare(module, "llvm.x86.avx2.pmadd.ub.sw", v16i16, [v32i8, v32i8])
    madd_words = _declare(module, "llvm.x86.avx2.pmadd.wd", v8i32, [v16i16, v16i16])
    parts = []
    for h in range(n // 32):
        pick = ir.Constant(ir.VectorType(i32, 32), list(range(32 * h, 32 * h + 32)))

        def half(v: ir.Value, pick: ir.Constant = pick) -> ir.Value:
            return v if n == 32 else builder.shuffle_vector(v, v, pick)

        pairs = builder.add(
            builder.call(madd_bytes, [half(lo), half(xa)]), builder.call(madd_bytes, [half(hi), half(xb)])
        )
        parts.append(builder.call(madd_words, [pairs, ir.Constant(v16i16, [1] * 16)]))
    if len(parts) == 1:
        return parts[0]
    return builder.shuffle_vector(parts[0], parts[1], ir.Constant(ir.VectorType(i32, 16), list(range(16))))


def _make_row_dot(bits: int) -> Any:
    """The row dot intrinsic for ``bits``-bit codes (4 or 2): the same int8 activations' halves ``x0``,
    ``x1`` (32 bytes a group each), the codes unpacked into two 32-byte vectors that pair with them."""

    def row_dot(typingctx, w8, x0, x1, gscale, gbias, groups):
        return types.float32(w8, x0, x1, gscale, gbias, groups), _row_dot_codegen(bits)

    row_dot.__doc__ = f"The {bits}-bit row dot (:func:`_row_dot_codegen`)."
    return intrinsic(row_dot)


def _row_dot_codegen(bits: int) -> Callable[..., Any]:
    """``sum_g gscale[g] * dot_g + gbias[g]`` over ``groups`` groups of 64 codes, ``dot_g`` the group's
    ``lo(w) . x0 + hi(w) . x1`` (unsigned codes times signed int8, _lane_dots) on 256-bit registers.
    4 bits: a group's 32 code bytes, ``lo``/``hi`` their low and high nibbles, ``x0``/``x1`` the even
    and odd columns. 2 bits: its 16 code bytes, ``lo`` the codes of columns 4i and 4i+1 side by side,
    ``hi`` those of 4i+2 and 4i+3, and ``x0``/``x1`` those columns in that order
    (:func:`quantize_activations` with ``bits=2``). The group's eight int32 lanes are converted and
    scaled into a float vector accumulator, reduced once at the row's end (a horizontal sum per group
    cost 15%)."""

    def codegen(context, builder, signature, args):
        gs_arr, gb_arr, n_groups = args[3:]
        i32 = ir.IntType(32)
        v16i8, v32i8 = ir.VectorType(ir.IntType(8), 16), ir.VectorType(ir.IntType(8), 32)
        v8i32, v8f = ir.VectorType(i32, 8), ir.VectorType(ir.FloatType(), 8)
        byte_ptr = ir.IntType(8).as_pointer()

        def data(value, ty):
            return context.make_array(ty)(context, builder, value).data

        w, x0, x1 = (builder.bitcast(data(v, t), byte_ptr) for v, t in zip(args[:3], signature.args[:3], strict=True))
        gs, gb = data(gs_arr, signature.args[3]), data(gb_arr, signature.args[4])
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        bias = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        with cgutils.for_range(builder, n_groups) as loop:
            g = loop.index
            at = builder.mul(g, ir.Constant(g.type, 32))

            def load(base, offset, ty):
                return builder.load(builder.bitcast(builder.gep(base, [offset]), ty.as_pointer()), align=1)

            if bits == 4:
                codes = load(w, at, v32i8)
                lo = builder.and_(codes, ir.Constant(v32i8, [15] * 32))
                hi = builder.lshr(codes, ir.Constant(v32i8, [4] * 32))
            else:
                codes = load(w, builder.mul(g, ir.Constant(g.type, 16)), v16i8)
                c = [builder.and_(builder.lshr(codes, ir.Constant(v16i8, [2 * p] * 16)), ir.Constant(v16i8, [3] * 16))
                     for p in range(4)]  # fmt: skip
                both = ir.Constant(ir.VectorType(i32, 32), list(range(32)))
                lo, hi = builder.shuffle_vector(c[0], c[1], both), builder.shuffle_vector(c[2], c[3], both)
            d = _lane_dots(builder, lo, hi, load(x0, at, v32i8), load(x1, at, v32i8))
            scale = builder.insert_element(ir.Constant(v8f, ir.Undefined), builder.load(builder.gep(gs, [g])), i32(0))
            scale = builder.shuffle_vector(scale, ir.Constant(v8f, ir.Undefined), ir.Constant(v8i32, [0] * 8))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(d, v8f), scale)), acc)
            builder.store(builder.fadd(builder.load(bias), builder.load(builder.gep(gb, [g]))), bias)
        total = _declare(builder.module, "llvm.vector.reduce.fadd.v8f32", ir.FloatType(), [ir.FloatType(), v8f])
        lanes = builder.call(total, [ir.Constant(ir.FloatType(), 0.0), builder.load(acc)])
        return builder.fadd(lanes, builder.load(bias))

    return codegen


_row_dot, _row_dot2 = _make_row_dot(4), _make_row_dot(2)


# The GEMM's register tile, weight rows by tokens. AVX-512 (32 registers): 2 x 4 (Zen 4, 2048-wide rows
# at 128 tokens: 2x4 and 4x2 alike at 530-580 GFLOP/s, 4x4 and 2x6 spill, 10-20% slower). AVX2 (16
# registers, each 512-bit value two of them): 1 x 4 (AVX2 EPYC, 2 threads, 128 tokens: 2048 x 2048 96
# GFLOP/s against 80-82 for 2x4 and 2x2; 2048 x 512 99 against 59-61).
_TILE_ROWS, _TILE_TOKENS = (2, 4) if _VNNI else (1, 4)
_PREFETCH_BYTES = 8192  # software prefetch distance: routed experts' GEMMs 1.3x (dev box)


def _make_tile(nt: int) -> Any:
    """The tile intrinsic for ``nt`` tokens (one machine code per width, so a partial token tile does
    no wasted work); every (row, token) dot is the same instruction sequence whatever the tile."""

    @intrinsic
    def tile(typingctx, w8, scales, biases, x0, x1, xscale, xsum, rows, toks, res):
        """``res[i * 4 + j] = W[rows[i]] . x[toks[j]]`` for ``_TILE_ROWS`` rows by ``nt`` tokens."""
        return types.void(w8, scales, biases, x0, x1, xscale, xsum, rows, toks, res), _tile_codegen(nt)

    return tile


def _tile_codegen(nt: int) -> Callable[..., Any]:
    """IR of a GEMM's inner block, ``_TILE_ROWS`` weight rows by ``nt`` tokens: each 64-byte load of a
    row's codes (two groups) is unpacked once and dotted with every token of the tile (_lane_dots on
    512-bit values: int32 lanes 0-7 the first group, 8-15 the second), each token's activations loaded
    once for every row; per lane ``acc += float(d) * (wscale * xscale) + wbias * xsum / 8`` (the group
    sum spread over its eight lanes; /8 is exact), reduced once per (row, token) at the end. Needs an
    even number of groups; ``scales`` ``[n_out, G]`` bf16 bits; ``xscale`` and ``xsum`` as ``_spread``
    leaves them, ``[T, 8 G]``, so a tile loads them as vectors."""
    nr = _TILE_ROWS

    def codegen(context, builder, signature, args):
        i8, i16, i32, i64, f32 = ir.IntType(8), ir.IntType(16), ir.IntType(32), ir.IntType(64), ir.FloatType()
        v64i8, v16f = ir.VectorType(i8, 64), ir.VectorType(f32, 16)
        module = builder.module

        def fn(name, ret, params):
            return _declare(module, name, ret, params)

        fma = fn("llvm.fma.v16f32", v16f, [v16f] * 3)
        reduce = fn("llvm.vector.reduce.fadd.v16f32", f32, [f32, v16f])
        arrays = [context.make_array(t)(context, builder, v) for t, v in zip(signature.args, args, strict=True)]

        def row_ptr(k, index):
            """Byte pointer to row ``index`` of the 2-D array argument ``k``."""
            a = arrays[k]
            stride = cgutils.unpack_tuple(builder, a.strides, 2)[0]
            base = builder.bitcast(a.data, i8.as_pointer())
            return builder.gep(base, [builder.mul(index, stride)])

        def index(k, i):
            return builder.load(builder.gep(arrays[k].data, [ir.Constant(i64, i)]))

        prefetch = fn("llvm.prefetch.p0i8", ir.VoidType(), [i8.as_pointer(), i32, i32, i32])
        rws = [index(7, i) for i in range(nr)]
        tks = [index(8, j) for j in range(nt)]
        wp = [row_ptr(0, r) for r in rws]
        sp = [builder.bitcast(row_ptr(1, r), i16.as_pointer()) for r in rws]
        bp = [builder.bitcast(row_ptr(2, r), i16.as_pointer()) for r in rws]
        x0p, x1p = [row_ptr(3, t) for t in tks], [row_ptr(4, t) for t in tks]
        xsp = [builder.bitcast(row_ptr(5, t), f32.as_pointer()) for t in tks]
        xbp = [builder.bitcast(row_ptr(6, t), f32.as_pointer()) for t in tks]
        n_groups = cgutils.unpack_tuple(builder, arrays[1].shape, 2)[1]
        zero = ir.Constant(v16f, [0.0] * 16)
        accs = [[cgutils.alloca_once_value(builder, zero) for _ in range(nt)] for _ in range(nr)]

        v16i32 = ir.VectorType(i32, 16)
        upper_lanes = ir.Constant(ir.VectorType(ir.IntType(1), 16), [0] * 8 + [1] * 8)

        def pair(ptr, g):
            """The 16-lane float vector of two consecutive bf16 values: lanes 0-7 ``ptr[g]``, 8-15
            ``ptr[g+1]``, from one 4-byte load broadcast to every lane (the low half shifted up, the
            high half masked: a bf16 is a float32's upper 16 bits), not two loads and inserts."""
            both = builder.load(builder.bitcast(builder.gep(ptr, [g]), i32.as_pointer()), align=2)
            v = builder.insert_element(ir.Constant(v16i32, ir.Undefined), both, i32(0))
            v = builder.shuffle_vector(v, v, ir.Constant(v16i32, [0] * 16))
            first = builder.shl(v, ir.Constant(v16i32, [16] * 16))
            second = builder.and_(v, ir.Constant(v16i32, [0xFFFF0000 - 2**32] * 16))
            return builder.bitcast(builder.select(upper_lanes, second, first), v16f)

        with cgutils.for_range(builder, builder.sdiv(n_groups, ir.Constant(n_groups.type, 2))) as loop:
            g = builder.mul(loop.index, ir.Constant(loop.index.type, 2))
            at = builder.mul(loop.index, ir.Constant(loop.index.type, 64))

            def load64(ptr):
                return builder.load(builder.bitcast(builder.gep(ptr, [at]), v64i8.as_pointer()), align=1)

            lo, hi, ws, wb = [], [], [], []
            for r in range(nr):
                codes = load64(wp[r])
                # _PREFETCH_BYTES on in the matrix (rows are contiguous): the rows a later tile takes,
                # fetched from memory while this one computes (an expert's rows serve a few tokens, once)
                ahead = builder.gep(wp[r], [builder.add(at, ir.Constant(at.type, _PREFETCH_BYTES))])
                builder.call(prefetch, [ahead, i32(0), i32(3), i32(1)])
                lo.append(builder.and_(codes, ir.Constant(v64i8, [15] * 64)))
                hi.append(builder.lshr(codes, ir.Constant(v64i8, [4] * 64)))
                ws.append(pair(sp[r], g))
                wb.append(pair(bp[r], g))
            spread = builder.mul(loop.index, ir.Constant(loop.index.type, 16))  # two groups' eight lanes
            for t in range(nt):
                xa, xb = load64(x0p[t]), load64(x1p[t])
                xs, xsum = (builder.load(builder.bitcast(builder.gep(p, [spread]), v16f.as_pointer()), align=4)
                            for p in (xsp[t], xbp[t]))  # fmt: skip
                for r in range(nr):
                    d = _lane_dots(builder, lo[r], hi[r], xa, xb)
                    acc = builder.call(
                        fma, [builder.sitofp(d, v16f), builder.fmul(ws[r], xs), builder.load(accs[r][t])]
                    )
                    builder.store(builder.call(fma, [wb[r], xsum, acc]), accs[r][t])
        out = builder.bitcast(arrays[9].data, f32.as_pointer())
        for r in range(nr):
            for t in range(nt):
                total = builder.call(reduce, [ir.Constant(f32, 0.0), builder.load(accs[r][t])])
                builder.store(total, builder.gep(out, [ir.Constant(i64, r * _TILE_TOKENS + t)]))
        return context.get_dummy_value()

    return codegen


_tile1, _tile2, _tile3, _tile4 = (_make_tile(nt) for nt in range(1, 5))


@njit(cache=True, fastmath=False)  # explicit: never the caller's flags (see _INV_127)
def quantize_activations(x, bits=4):
    """x float32 ``[T, n]`` -> (even columns int8 ``[T, n/2]``, odd columns, per-group scale and sum
    ``[T, n/64]``): each 64-column group scaled so its largest magnitude maps to 127. For rows of
    2-bit codes (``bits=2``) the halves hold, a group at a time, columns 4i then 4i+1, and 4i+2 then
    4i+3 (what :func:`_row_dot_codegen` pairs with the codes); the rounding is the same."""
    T, n = x.shape
    m, G = n // 2, n // GROUP_COLUMNS
    x0 = np.empty((T, m), np.int8)
    x1 = np.empty((T, m), np.int8)
    scale = np.empty((T, G), np.float32)
    total = np.empty((T, G), np.float32)
    for t in range(T):
        for g in range(G):
            lo = g * GROUP_COLUMNS
            amax = np.float32(0.0)
            s = 0.0
            for i in range(GROUP_COLUMNS):
                v = x[t, lo + i]
                amax = max(amax, abs(v))
                s += v
            d = amax * _INV_127
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            scale[t, g], total[t, g] = d, np.float32(s)
            if bits == 2:
                q = GROUP_COLUMNS // 4
                for i in range(q):
                    x0[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 4 * i] * inv))
                    x0[t, lo // 2 + q + i] = np.int8(np.rint(x[t, lo + 4 * i + 1] * inv))
                    x1[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 4 * i + 2] * inv))
                    x1[t, lo // 2 + q + i] = np.int8(np.rint(x[t, lo + 4 * i + 3] * inv))
            else:
                for i in range(GROUP_COLUMNS // 2):
                    x0[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 2 * i] * inv))
                    x1[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 2 * i + 1] * inv))
    return x0, x1, scale, total


@njit(cache=True)
def quantize_row(x, bits=4):
    """:func:`quantize_activations` of one row ``x [n]``: ``(x0, x1, scale, sum)`` of that row."""
    x0, x1, scale, total = quantize_activations(x.reshape(1, x.shape[0]), bits)
    return x0[0], x1[0], scale[0], total[0]


@njit(cache=True)
def _spread(xscale, xsum):
    """Each token's group scales and group sums / 8, each repeated over the group's eight int32 lanes
    (``[T, 8 G]``): what the GEMM tiles multiply lane by lane, loaded as vectors instead of assembled
    from scalars in every tile."""
    T, G = xscale.shape
    xs, xb = np.empty((T, 8 * G), np.float32), np.empty((T, 8 * G), np.float32)
    for t in range(T):
        for g in range(G):
            for lane in range(8):
                xs[t, 8 * g + lane] = xscale[t, g]
                xb[t, 8 * g + lane] = xsum[t, g] * np.float32(0.125)
    return xs, xb


@njit(cache=True, inline="always")
def row(w8, r, sc, bi, x0, x1, xscale, xsum, gscale, gbias):
    """``W[r] . x`` for one token: per group ``scale * xscale * int_dot + bias * sum(x)``; ``gscale``
    and ``gbias`` are scratch ``[G]`` for the group factors. 4-bit rows have as many bytes as ``x0``
    has columns, 2-bit rows half as many (``x`` then quantised with ``bits=2``)."""
    G = sc.shape[1]
    for g in range(G):
        gscale[g] = bf16_value(sc[r, g]) * xscale[g]
        gbias[g] = bf16_value(bi[r, g]) * xsum[g]
    if w8.shape[1] == x0.shape[0]:
        return _row_dot(w8[r], x0, x1, gscale, gbias, G)
    return _row_dot2(w8[r], x0, x1, gscale, gbias, G)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def matvec(w8, scales, biases, x, out):
    """``out[r] = W[r] . x`` for one float32 token ``x [n]``, quantised here (serially, before the
    parallel part): one call from Python instead of two, and no quantised arrays handed back to it
    (a decode token makes about 40 of these calls; 64 x 2048 on the dev box: 17 -> 10 us a call);
    then output rows in parallel chunks."""
    x0, x1, xscale, xsum = quantize_row(x)
    n_out = w8.shape[0]
    for c in prange((n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK):
        gscale, gbias = np.empty(scales.shape[1], np.float32), np.empty(scales.shape[1], np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            out[r] = row(w8, r, scales, biases, x0, x1, xscale, xsum, gscale, gbias)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def matmul(w8, scales, biases, x0, x1, xscale, xsum, out):
    """``out[t, r] = W[r] . x_t`` for T tokens (``x0``/``x1`` ``[T, n/2]``, ``xscale``/``xsum`` ``[T, G]``):
    each row is read from memory once and applied to every token while it sits in L1."""
    n_out, T = w8.shape[0], x0.shape[0]
    for c in prange((n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK):
        gscale, gbias = np.empty(scales.shape[1], np.float32), np.empty(scales.shape[1], np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            for t in range(T):
                out[t, r] = row(w8, r, scales, biases, x0[t], x1[t], xscale[t], xsum[t], gscale, gbias)


@njit(cache=True, inline="always")
def _gemm_block(w8, sc, bi, x0, x1, xs8, xb8, r_lo, r_hi, t_lo, t_hi, tin, tout, rows, toks, res, out, o_t, o_r):
    """``out[o_t + tout[t], o_r + r - r_lo] = W[r] . x[tin[t]]`` over rows ``[r_lo, r_hi)`` and tokens
    ``[t_lo, t_hi)`` in register tiles; an odd last row is computed twice, stored once. ``tin`` and
    ``tout`` index the token rows, so callers gather and scatter nothing. ``xs8``/``xb8``: the
    activations' factors as ``_spread`` leaves them."""
    for t0 in range(t_lo, t_hi, _TILE_TOKENS):
        nt = min(_TILE_TOKENS, t_hi - t0)
        for j in range(_TILE_TOKENS):
            toks[j] = tin[t0 + min(j, nt - 1)]
        for r0 in range(r_lo, r_hi, _TILE_ROWS):
            nr = min(_TILE_ROWS, r_hi - r0)
            for i in range(_TILE_ROWS):
                rows[i] = r0 + min(i, nr - 1)
            if nt == 4:
                _tile4(w8, sc, bi, x0, x1, xs8, xb8, rows, toks, res)
            elif nt == 3:
                _tile3(w8, sc, bi, x0, x1, xs8, xb8, rows, toks, res)
            elif nt == 2:
                _tile2(w8, sc, bi, x0, x1, xs8, xb8, rows, toks, res)
            else:
                _tile1(w8, sc, bi, x0, x1, xs8, xb8, rows, toks, res)
            for j in range(nt):
                o = o_t + tout[t0 + j]
                for i in range(nr):
                    out[o, o_r + r0 - r_lo + i] = res[i * _TILE_TOKENS + j]


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemm(w8, scales, biases, x0, x1, xscale, xsum, out):
    """``out[t, r] = W[r] . x_t`` for any number of tokens, in register tiles (see _tile): parallel
    over chunks of ``_GEMM_ROWS`` rows, within a chunk tokens outer, so a tile's activations and the
    chunk's rows both stay in L1. Needs an even number of groups per row."""
    n_out, T = w8.shape[0], x0.shape[0]
    ident = np.arange(T)
    xs8, xb8 = _spread(xscale, xsum)
    for c in prange((n_out + _GEMM_ROWS - 1) // _GEMM_ROWS):
        rows, toks = np.empty(_TILE_ROWS, np.int64), np.empty(_TILE_TOKENS, np.int64)
        res = np.empty(_TILE_ROWS * _TILE_TOKENS, np.float32)
        r_lo = c * _GEMM_ROWS
        _gemm_block(w8, scales, biases, x0, x1, xs8, xb8, r_lo, min(n_out, r_lo + _GEMM_ROWS), 0, T, ident, ident,
                    rows, toks, res, out, 0, r_lo)  # fmt: skip


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemv(w8, scales, biases, x, out):
    """``out[r] = W[r] . x`` for one float32 token ``x [n]`` on the GEMM's tiles (even group counts),
    quantised here as :func:`matvec` does: so a token's outputs are bitwise what :func:`gemm` gives it
    in any batch (decode and prefill agree), and rows stream faster from memory than by row dots (two
    rows a tile, a software prefetch ahead: 1.1-1.3x, most on large matrices;
    docs/PERFORMANCE.md)."""
    x0, x1, xscale, xsum = quantize_activations(x.reshape(1, x.shape[0]))
    xs8, xb8 = _spread(xscale, xsum)
    n_out = w8.shape[0]
    token = np.zeros(1, np.int64)
    out2 = out.reshape(1, n_out)
    for c in prange((n_out + _GEMM_ROWS - 1) // _GEMM_ROWS):
        rows, toks = np.empty(_TILE_ROWS, np.int64), np.empty(_TILE_TOKENS, np.int64)
        res = np.empty(_TILE_ROWS * _TILE_TOKENS, np.float32)
        r_lo = c * _GEMM_ROWS
        _gemm_block(w8, scales, biases, x0, x1, xs8, xb8, r_lo, min(n_out, r_lo + _GEMM_ROWS), 0, 1, token, token,
                    rows, toks, res, out2, 0, r_lo)  # fmt: skip


@njit(cache=True)
def _chunk_starts(mats, rows):
    """Each matrix's first work item in a list of chunks of ``rows`` rows over the tuple ``mats``, then
    the total (``[M + 1]``)."""
    first = np.zeros(len(mats) + 1, np.int64)
    for m in range(len(mats)):
        first[m + 1] = first[m] + (mats[m].shape[0] + rows - 1) // rows
    return first


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def gemvs(w8s, scales, biases, x, outs):
    """:func:`gemv` of one token through several matrices of its width (tuples of each matrix's parts
    and outputs; a layer's projections of one normed input) in one parallel region: the token is
    quantised once and the matrices' chunks of rows are one work list, so a small matrix (a DeltaNet's
    a and b: one chunk) costs no region and no barrier of its own. Each output is bitwise :func:`gemv`'s."""
    first = _chunk_starts(w8s, _GEMM_ROWS)
    x0, x1, xscale, xsum = quantize_activations(x.reshape(1, x.shape[0]))
    xs8, xb8 = _spread(xscale, xsum)
    token = np.zeros(1, np.int64)
    for c in prange(first[-1]):
        m = np.searchsorted(first, c, side="right") - 1
        w8, out = w8s[m], outs[m]
        n_out = w8.shape[0]
        rows, toks = np.empty(_TILE_ROWS, np.int64), np.empty(_TILE_TOKENS, np.int64)
        res = np.empty(_TILE_ROWS * _TILE_TOKENS, np.float32)
        r_lo = (c - first[m]) * _GEMM_ROWS
        _gemm_block(w8, scales[m], biases[m], x0, x1, xs8, xb8, r_lo, min(n_out, r_lo + _GEMM_ROWS), 0, 1, token,
                    token, rows, toks, res, out.reshape(1, n_out), 0, r_lo)  # fmt: skip


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def pairs_gate_up(slab, slots, gate, up, n_out, wbytes, groups, tin, tout, x0, x1, xscale, xsum, h):
    """``h[tout[p]] = silu(gate_p . x[tin[p]]) * (up_p . x[tin[p]])`` for every pair p (slot ``slots[p]``)."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        gw, gs, gb, uw, us, ub = gate_up_matrices(slab[slots[p]], gate, up, n_out, wbytes, groups)
        gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
        t, o = tin[p], tout[p]
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            g = row(gw, r, gs, gb, x0[t], x1[t], xscale[t], xsum[t], gscale, gbias)
            u = row(uw, r, us, ub, x0[t], x1[t], xscale[t], xsum[t], gscale, gbias)
            h[o, r] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def pairs_matvec(slab, slots, proj, n_out, wbytes, groups, tin, tout, x0, x1, xscale, xsum, out):
    """``out[tout[p]] = W_p . x[tin[p]]`` for every pair p, ``W_p`` at ``proj`` offsets in slot ``slots[p]``."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        w8, sc, bi = slot_matrix(slab[slots[p]], proj[0], proj[1], proj[2], n_out, wbytes, groups)
        gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
        t, o = tin[p], tout[p]
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            out[o, r] = row(w8, r, sc, bi, x0[t], x1[t], xscale[t], xsum[t], gscale, gbias)


# ---- routed experts grouped by expert (prefill): each expert's weights read once for all its tokens ----
@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def experts_gate_up(slab, seg_slots, seg_start, gate, up, n_out, wbytes, groups, tin, tout, x0, x1, xscale, xsum, h):
    """``h[tout[p]] = silu(gate . x[tin[p]]) * (up . x[tin[p]])`` for the pairs ``p`` of each segment ``s``
    (pairs ``seg_start[s]`` to ``seg_start[s + 1]``, all of the expert in slot ``seg_slots[s]``): the
    GEMM's tiles over the segment's tokens, parallel over (segment, chunk of rows)."""
    chunks = (n_out + _GEMM_ROWS - 1) // _GEMM_ROWS
    ident = np.arange(tin.shape[0])  # g and u below: the segment's rows from 0
    xs8, xb8 = _spread(xscale, xsum)
    for item in prange(seg_slots.shape[0] * chunks):
        s, c = item // chunks, item % chunks
        gw, gs, gb, uw, us, ub = gate_up_matrices(slab[seg_slots[s]], gate, up, n_out, wbytes, groups)
        t_lo, t_hi, r_lo = seg_start[s], seg_start[s + 1], c * _GEMM_ROWS
        r_hi = min(n_out, r_lo + _GEMM_ROWS)
        rows, toks = np.empty(_TILE_ROWS, np.int64), np.empty(_TILE_TOKENS, np.int64)
        res = np.empty(_TILE_ROWS * _TILE_TOKENS, np.float32)
        g = np.empty((t_hi - t_lo, r_hi - r_lo), np.float32)
        u = np.empty_like(g)
        _gemm_block(gw, gs, gb, x0, x1, xs8, xb8, r_lo, r_hi, t_lo, t_hi, tin, ident, rows, toks, res, g, -t_lo, 0)
        _gemm_block(uw, us, ub, x0, x1, xs8, xb8, r_lo, r_hi, t_lo, t_hi, tin, ident, rows, toks, res, u, -t_lo, 0)
        silu_combine(g, u, h, tout, t_lo, r_lo)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def experts_matmul(slab, seg_slots, seg_start, proj, n_out, wbytes, groups, tin, tout, x0, x1, xscale, xsum, out):
    """``out[tout[p]] = W . x[tin[p]]`` for the pairs of each segment (as experts_gate_up), ``W`` the
    projection at ``proj`` offsets in the segment's slot."""
    chunks = (n_out + _GEMM_ROWS - 1) // _GEMM_ROWS
    xs8, xb8 = _spread(xscale, xsum)
    for item in prange(seg_slots.shape[0] * chunks):
        s, c = item // chunks, item % chunks
        w8, sc, bi = slot_matrix(slab[seg_slots[s]], proj[0], proj[1], proj[2], n_out, wbytes, groups)
        r_lo = c * _GEMM_ROWS
        rows, toks = np.empty(_TILE_ROWS, np.int64), np.empty(_TILE_TOKENS, np.int64)
        res = np.empty(_TILE_ROWS * _TILE_TOKENS, np.float32)
        _gemm_block(w8, sc, bi, x0, x1, xs8, xb8, r_lo, min(n_out, r_lo + _GEMM_ROWS), seg_start[s],
                    seg_start[s + 1], tin, tout, rows, toks, res, out, 0, r_lo)  # fmt: skip
