"""4-bit matvecs and few-token matmuls on integer dot products (AVX-512 VNNI ``vpdpbusd``): the
activation rows are quantised to int8 per 64-column group, as llama.cpp's Q8 activations are, and
each group's 64 codes x int8 products are summed by two instructions. numba does not emit
``vpdpbusd`` from a loop, so a row's dot is a numba intrinsic written in LLVM IR; it is compiled
only where the CPU has AVX512-VNNI and AVX512-VL (``AVAILABLE``), and callers fall back to the float
kernels elsewhere.

Precision: the int8 rounding of the activations, at most half a step (``amax_g / 254``) per element,
not float32 rounding: ``|y - y_exact| <= sum_g amax_g / 254 * sum_(j in g) |w_j|`` plus float32 sums
(tests/test_kernels.py checks exactly that bound). On the trained reference model (512 held-out
tokens, decode; scripts/int8_quality.py) the logits moved by 2.6% of their norm (median), KL 4.4e-3,
same top token 94.3%: about what 4-bit experts cost (docs/QUALITY.md). llama.cpp's CPU path rounds its activations the
same way; here it is an option (``int8=True`` of the CPU kernels, ``--int8-dot``), not the default.
"""

from __future__ import annotations

import numpy as np
from llvmlite import binding as llvm
from llvmlite import ir
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic

from fmoe.runtime.kernels.packed_numba import bf16_value, slot_matrix

_FEATURES = llvm.get_host_cpu_features()
AVAILABLE = bool(_FEATURES.get("avx512vnni")) and bool(_FEATURES.get("avx512vl"))
GROUP_COLUMNS = 64  # the quantisation group these kernels take (32 bytes at 4 bits)
_ROWS_PER_CHUNK = 16
_FASTMATH = {"reassoc", "contract", "nsz", "arcp"}


@intrinsic
def _row_dot(typingctx, w8, x0, x1, gscale, gbias, groups):
    """``sum_g gscale[g] * dot_g + gbias[g]`` over ``groups`` groups of 32 bytes (64 codes), ``dot_g``
    the group's ``lo(w) . x0 + hi(w) . x1`` (unsigned 4-bit codes times signed int8) by two
    ``vpdpbusd`` on 256-bit registers. The group's eight int32 lanes are converted and scaled into a
    float vector accumulator, reduced once at the row's end (a horizontal sum per group cost 15%)."""
    sig = types.float32(w8, x0, x1, gscale, gbias, groups)

    def codegen(context, builder, signature, args):
        gs_arr, gb_arr, n_groups = args[3:]
        i32 = ir.IntType(32)
        v32i8, v8i32, v8f = ir.VectorType(ir.IntType(8), 32), ir.VectorType(i32, 8), ir.VectorType(ir.FloatType(), 8)
        byte_ptr = ir.IntType(8).as_pointer()

        def data(value, ty):
            return context.make_array(ty)(context, builder, value).data

        w, x0, x1 = (builder.bitcast(data(v, t), byte_ptr) for v, t in zip(args[:3], signature.args[:3], strict=True))
        gs, gb = data(gs_arr, signature.args[3]), data(gb_arr, signature.args[4])
        module = builder.module
        name = "llvm.x86.avx512.vpdpbusd.256"
        dot = module.globals.get(name) or ir.Function(module, ir.FunctionType(v8i32, [v8i32] * 3), name)
        acc = cgutils.alloca_once_value(builder, ir.Constant(v8f, [0.0] * 8))
        bias = cgutils.alloca_once_value(builder, ir.Constant(ir.FloatType(), 0.0))
        with cgutils.for_range(builder, n_groups) as loop:
            g = loop.index
            at = builder.mul(g, ir.Constant(g.type, 32))

            def load(base):
                return builder.load(builder.bitcast(builder.gep(base, [at]), v32i8.as_pointer()), align=1)

            codes = load(w)
            lo = builder.bitcast(builder.and_(codes, ir.Constant(v32i8, [15] * 32)), v8i32)
            hi = builder.bitcast(builder.lshr(codes, ir.Constant(v32i8, [4] * 32)), v8i32)
            d = builder.call(dot, [ir.Constant(v8i32, [0] * 8), lo, builder.bitcast(load(x0), v8i32)])
            d = builder.call(dot, [d, hi, builder.bitcast(load(x1), v8i32)])
            scale = builder.insert_element(ir.Constant(v8f, ir.Undefined), builder.load(builder.gep(gs, [g])), i32(0))
            scale = builder.shuffle_vector(scale, ir.Constant(v8f, ir.Undefined), ir.Constant(v8i32, [0] * 8))
            builder.store(builder.fadd(builder.load(acc), builder.fmul(builder.sitofp(d, v8f), scale)), acc)
            builder.store(builder.fadd(builder.load(bias), builder.load(builder.gep(gb, [g]))), bias)
        name = "llvm.vector.reduce.fadd.v8f32"
        total = module.globals.get(name) or ir.Function(
            module, ir.FunctionType(ir.FloatType(), [ir.FloatType(), v8f]), name
        )
        lanes = builder.call(total, [ir.Constant(ir.FloatType(), 0.0), builder.load(acc)])
        return builder.fadd(lanes, builder.load(bias))

    return sig, codegen


@njit(cache=True)
def quantize_activations(x):
    """x float32 ``[T, n]`` -> (even columns int8 ``[T, n/2]``, odd columns, per-group scale and sum
    ``[T, n/64]``): each 64-column group scaled so its largest magnitude maps to 127."""
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
            s = np.float32(0.0)
            for i in range(GROUP_COLUMNS):
                v = x[t, lo + i]
                amax = max(amax, abs(v))
                s += v
            d = amax / np.float32(127.0)
            inv = np.float32(1.0) / d if d > 0 else np.float32(0.0)
            scale[t, g], total[t, g] = d, s
            for i in range(GROUP_COLUMNS // 2):
                x0[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 2 * i] * inv))
                x1[t, lo // 2 + i] = np.int8(np.rint(x[t, lo + 2 * i + 1] * inv))
    return x0, x1, scale, total


@njit(cache=True, inline="always")
def _row(w8, r, sc, bi, x0, x1, xscale, xsum, gscale, gbias):
    """``W[r] . x`` for one token: per group ``scale * xscale * int_dot + bias * sum(x)``; ``gscale``
    and ``gbias`` are scratch ``[G]`` for the group factors."""
    G = sc.shape[1]
    for g in range(G):
        gscale[g] = bf16_value(sc[r, g]) * xscale[g]
        gbias[g] = bf16_value(bi[r, g]) * xsum[g]
    return _row_dot(w8[r], x0, x1, gscale, gbias, G)  # type: ignore[call-arg]  # numba intrinsic


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def matvec(w8, scales, biases, x0, x1, xscale, xsum, out):
    """``out[r] = W[r] . x`` (one token), output rows in parallel chunks."""
    n_out = w8.shape[0]
    for c in prange((n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK):
        gscale, gbias = np.empty(scales.shape[1], np.float32), np.empty(scales.shape[1], np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            out[r] = _row(w8, r, scales, biases, x0, x1, xscale, xsum, gscale, gbias)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def matmul(w8, scales, biases, x0, x1, xscale, xsum, out):
    """``out[t, r] = W[r] . x_t`` for T tokens (``x0``/``x1`` ``[T, n/2]``, ``xscale``/``xsum`` ``[T, G]``):
    each row is read from memory once and applied to every token while it sits in L1."""
    n_out, T = w8.shape[0], x0.shape[0]
    for c in prange((n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK):
        gscale, gbias = np.empty(scales.shape[1], np.float32), np.empty(scales.shape[1], np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            for t in range(T):
                out[t, r] = _row(w8, r, scales, biases, x0[t], x1[t], xscale[t], xsum[t], gscale, gbias)


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def pairs_gate_up(slab, slots, gate, up, n_out, wbytes, groups, x0, x1, xscale, xsum, h):
    """``h[p] = silu(gate_p . x_p) * (up_p . x_p)`` for every pair p (slot ``slots[p]``)."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        row = slab[slots[p]]
        gw, gs, gb = slot_matrix(row, gate[0], gate[1], gate[2], n_out, wbytes, groups)
        uw, us, ub = slot_matrix(row, up[0], up[1], up[2], n_out, wbytes, groups)
        gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            g = _row(gw, r, gs, gb, x0[p], x1[p], xscale[p], xsum[p], gscale, gbias)
            u = _row(uw, r, us, ub, x0[p], x1[p], xscale[p], xsum[p], gscale, gbias)
            h[p, r] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(parallel=True, cache=True, fastmath=_FASTMATH)
def pairs_matvec(slab, slots, proj, n_out, wbytes, groups, x0, x1, xscale, xsum, out):
    """``out[p] = W_p . x_p`` for every pair p, ``W_p`` at ``proj`` offsets in slot ``slots[p]``."""
    n = slots.shape[0]
    chunks = (n_out + _ROWS_PER_CHUNK - 1) // _ROWS_PER_CHUNK
    for item in prange(n * chunks):
        p, c = item // chunks, item % chunks
        w8, sc, bi = slot_matrix(slab[slots[p]], proj[0], proj[1], proj[2], n_out, wbytes, groups)
        gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
        for r in range(c * _ROWS_PER_CHUNK, min(n_out, (c + 1) * _ROWS_PER_CHUNK)):
            out[p, r] = _row(w8, r, sc, bi, x0[p], x1[p], xscale[p], xsum[p], gscale, gbias)
