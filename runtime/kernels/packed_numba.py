"""numba readers of the packed format, shared by the CPU kernels (cpu.py, int8dot.py): a bf16 bit
pattern's value, and one projection's arrays inside an expert file's bytes (a slot of a slab)."""

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
