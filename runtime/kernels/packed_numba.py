"""numba pieces shared by the CPU kernels (cpu.py, int8dot.py): readers of the packed format (a bf16
bit pattern's value, one projection's arrays inside an expert file's bytes, a slot of a slab) and
the SwiGLU combine of the grouped expert kernels."""

from __future__ import annotations

import numpy as np
from numba import njit

from fmoe.formats.quant_numba import bits_f32


@njit(cache=True, inline="always")
def bf16_value(bits):
    """The float32 value of a bf16 bit pattern (uint16): its bits are the float32's high half."""
    return bits_f32(np.uint32(np.uint32(bits) << np.uint32(16)))  # type: ignore[call-arg]  # numba's intrinsic stub


@njit(cache=True, inline="always")
def slot_matrix(row, w_off, s_off, b_off, n_out, wbytes, groups):
    """(weight bytes [n_out, wbytes], scales, biases [n_out, groups]) of one projection in a slot's bytes."""
    w8 = row[w_off : w_off + n_out * wbytes].reshape((n_out, wbytes))
    sc = row[s_off : s_off + 2 * n_out * groups].view(np.uint16).reshape((n_out, groups))
    bi = row[b_off : b_off + 2 * n_out * groups].view(np.uint16).reshape((n_out, groups))
    return w8, sc, bi


@njit(cache=True, inline="always")
def gate_up_matrices(row, gate, up, n_out, wbytes, groups):
    """The gate's and the up projection's (weight bytes, scales, biases) in a slot's bytes: six arrays,
    ``gate`` and ``up`` each the (weight, scales, biases) byte offsets."""
    gw, gs, gb = slot_matrix(row, gate[0], gate[1], gate[2], n_out, wbytes, groups)
    uw, us, ub = slot_matrix(row, up[0], up[1], up[2], n_out, wbytes, groups)
    return gw, gs, gb, uw, us, ub


@njit(cache=True, inline="always")
def silu_combine(g, u, h, tout, t_lo, r_lo):
    """``h[tout[t_lo + t], r_lo + r] = silu(g[t, r]) * u[t, r]``: a block of an expert's gate and up
    results (its tokens from ``t_lo``, rows from ``r_lo``) into the rows of ``h`` its pairs own."""
    for t in range(g.shape[0]):
        o = tout[t_lo + t]
        for r in range(g.shape[1]):
            a = g[t, r]
            h[o, r_lo + r] = a / (np.float32(1.0) + np.exp(-a)) * u[t, r]
