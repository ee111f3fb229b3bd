"""Device-side pieces of a quantised row's dot product, shared by the matvec kernels' float and int8
dot products (runtime/kernels/triton_moe.py; the int8 input rows: runtime/kernels/triton_int8.py):
a step's word indices, words, scales and biases, the int8 dot product on ``dp4a``, and the rounding
of an input to int8 (one definition for the matvecs' rows and the prefill GEMM's).

Format as triton_moe's docstring gives it: int32 words of ``32 / BITS`` codes (low bits first), bf16
scales and biases one a group of ``GS`` columns; a step is ``BLOCK_G`` groups, each group's words
one tile row of ``WPG_P`` (its word count up to a power of two).
"""

from __future__ import annotations

import triton
import triton.language as tl


def row_tile_args(n: int, bits: int, group_size: int) -> tuple[tuple[int, int, int, int], int]:
    """(BITS, GS, NG_P, WPG_P) of a row of ``n`` columns as a [groups, a group's words, ...] tile (the
    norms' and the int8 input's), and its launch's warps (at most 32 of the row's values a thread)."""
    pow2 = triton.next_power_of_2
    warps = min(16, max(4, pow2(n) // 1024))
    return (bits, group_size, pow2(n // group_size), pow2(group_size * bits // 32)), warps


@triton.jit
def bf16(bits):
    """float32 of bf16 bit patterns loaded as int16: they are the float32's high half."""
    return (bits.to(tl.int32) << 16).to(tl.float32, bitcast=True)


@triton.jit
def step_index(g0, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, BLOCK_G: tl.constexpr,
                WPG_P: tl.constexpr):  # fmt: skip
    """A step's groups ``g`` [BLOCK_G] from ``g0``, their words' indices in a row ``w`` [BLOCK_G, WPG_P]
    (a group's words one tile row) and the words' mask ``wm``."""
    WPG: tl.constexpr = GS * BITS // 32  # words per group
    NG: tl.constexpr = NW // WPG
    g = g0 + tl.arange(0, BLOCK_G)
    w = g[:, None] * WPG + tl.arange(0, WPG_P)[None, :]
    # masks constant along a group's words where possible, so that its loads are vectors
    wm = (g[:, None] < NG) & (tl.arange(0, WPG_P)[None, :] < WPG if WPG < WPG_P else True)
    return g, w, wm


@triton.jit
def step_words(w_ptr, w_row, mask, g0, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                BLOCK_G: tl.constexpr, WPG_P: tl.constexpr):  # fmt: skip
    """The words of one step (:func:`step_index`) of rows ``w_row`` [M, N]: int32 [M, N, BLOCK_G, WPG_P]."""
    NG: tl.constexpr = NW // (GS * BITS // 32)
    g, w, wm = step_index(g0, NW, BITS, GS, BLOCK_G, WPG_P)
    gm = mask[:, :, None] & (g < NG)[None, None, :]
    return tl.load(w_ptr + w_row[:, :, None, None] + w[None, None], mask=gm[:, :, :, None] & wm[None, None], other=0)


@triton.jit
def step_factors(s_ptr, b_ptr, s_row, b_row, mask, g0, NW: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                  BLOCK_G: tl.constexpr):  # fmt: skip
    """The scales and biases (float32 [M, N, BLOCK_G]) of one step's groups."""
    NG: tl.constexpr = NW // (GS * BITS // 32)
    g = g0 + tl.arange(0, BLOCK_G)
    gm = mask[:, :, None] & (g < NG)[None, None, :]
    scale = bf16(tl.load(s_ptr + s_row[:, :, None] + g[None, None, :], mask=gm, other=0))
    bias = bf16(tl.load(b_ptr + b_row[:, :, None] + g[None, None, :], mask=gm, other=0))
    return scale, bias


@triton.jit
def dp4a(a, b, c, ASM: tl.constexpr):
    """``c + sum over bytes i of a_i * b_i``, a's bytes unsigned, b's signed (int32 tensors of one shape)."""
    if ASM:
        acc = tl.inline_asm_elementwise(
            "dp4a.u32.s32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, c], dtype=tl.int32, is_pure=True, pack=1
        )
    else:  # the interpreter's version: b's byte sign-extended by an arithmetic shift
        acc = c
        for i in tl.static_range(4):
            acc += ((a >> (8 * i)) & 0xFF) * ((b << (24 - 8 * i)) >> 24)
    return acc


@triton.jit
def code_lanes(words, j: tl.constexpr, BITS: tl.constexpr):
    """Codes ``b * 8 / BITS + j`` of each word (b = 0..3), one a byte: what one dp4a multiplies."""
    if BITS == 8:  # an if/else: after an early return Triton would still build the 8-bit mask, 2**32 - 1
        lanes = words
    else:
        lanes = (words >> (j * BITS)) & (((1 << BITS) - 1) * 0x01010101)
    return lanes


@triton.jit
def qdot_int8(w_ptr, s_ptr, b_ptr, x_ptr, w_row, s_row, b_row, mask, NW: tl.constexpr, BITS: tl.constexpr,
               GS: tl.constexpr, BLOCK_G: tl.constexpr, WPG_P: tl.constexpr, ASM: tl.constexpr):  # fmt: skip
    """Row dot products ``W[r] . x`` for an [M, N] block of rows (addressed as triton_moe's ``_qdot``)
    on the int8 input row at ``x_ptr`` (triton_int8's ``int8_input``). Returns float32 [M, N]; masked
    rows give 0."""
    J: tl.constexpr = 8 // BITS
    NG: tl.constexpr = NW // (GS * BITS // 32)
    acc = tl.zeros((w_row.shape[0], w_row.shape[1], BLOCK_G), dtype=tl.float32)
    for g0 in range(0, NG, BLOCK_G):
        g, w, wm = step_index(g0, NW, BITS, GS, BLOCK_G, WPG_P)
        words = step_words(w_ptr, w_row, mask, g0, NW, BITS, GS, BLOCK_G, WPG_P)
        isum = tl.zeros(words.shape, dtype=tl.int32)
        for j in tl.static_range(J):
            xj = tl.load(x_ptr + j * NW + w, mask=wm, other=0)
            isum = dp4a(code_lanes(words, j, BITS), tl.broadcast_to(xj[None, None], words.shape), isum, ASM)
        scale, bias = step_factors(s_ptr, b_ptr, s_row, b_row, mask, g0, NW, BITS, GS, BLOCK_G)
        dx = tl.load(x_ptr + J * NW + g, mask=g < NG, other=0).to(tl.float32, bitcast=True)
        xsum = tl.load(x_ptr + J * NW + NG + g, mask=g < NG, other=0).to(tl.float32, bitcast=True)
        acc += tl.sum(isum, axis=3).to(tl.float32) * (scale * dx[None, None, :]) + bias * xsum[None, None, :]
    return tl.sum(acc, axis=2)


@triton.jit
def write_int8_row(src, dst, N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr, NG_P: tl.constexpr,
                   WPG_P: tl.constexpr):  # fmt: skip
    """The float row of N columns at ``src`` as an int8 input row at ``dst`` (int32; the layout of
    runtime/kernels/triton_int8.py's docstring): lanes for ``dp4a``, then the groups' steps and sums.
    NG_P, WPG_P: the groups and a group's words up to powers of two."""
    write_int8_groups(src, dst, 0, N // GS, N, BITS, GS, NG_P, WPG_P)


@triton.jit
def write_int8_groups(src, dst, g0, NGB: tl.constexpr, N: tl.constexpr, BITS: tl.constexpr, GS: tl.constexpr,
                      NG_P: tl.constexpr, WPG_P: tl.constexpr):  # fmt: skip
    """:func:`write_int8_row` of the NGB groups from group ``g0`` of the row only (``src`` and ``dst``
    the row's starts; NG_P: NGB up to a power of two): a program that made only those columns
    (a DeltaNet head) writes their part of the row."""
    J: tl.constexpr = 8 // BITS
    WPG: tl.constexpr = GS * BITS // 32
    NW: tl.constexpr = N * BITS // 32
    NG: tl.constexpr = N // GS
    gl = tl.arange(0, NG_P)
    g = g0 + gl[:, None, None]
    word = g * WPG + tl.arange(0, WPG_P)[None, :, None]  # [NG_P, WPG_P, 1]
    j = tl.arange(0, J)[None, None, :]
    m = (gl[:, None, None] < NGB) & (word - g * WPG < WPG) & (j < J)
    row = src + word * (4 * J) + j  # lane b of entry [j, word] is column word * 4J + b * J + j
    v0 = tl.load(row, mask=m, other=0.0)
    v1 = tl.load(row + J, mask=m, other=0.0)
    v2 = tl.load(row + 2 * J, mask=m, other=0.0)
    v3 = tl.load(row + 3 * J, mask=m, other=0.0)
    amax = tl.max(tl.max(tl.maximum(tl.maximum(tl.abs(v0), tl.abs(v1)), tl.maximum(tl.abs(v2), tl.abs(v3))),
                         axis=2), axis=1)  # fmt: skip
    inv, dx = int8_factors(amax)
    inv = inv[:, None, None]
    packed = int8_lane(v0, inv, 0) | int8_lane(v1, inv, 1) | int8_lane(v2, inv, 2) | int8_lane(v3, inv, 3)
    tl.store(dst + j * NW + word, packed, mask=m)
    sums = tl.sum(tl.sum(v0 + v1 + v2 + v3, axis=2), axis=1)
    gs = g0 + gl
    tl.store(dst + J * NW + gs, dx.to(tl.int32, bitcast=True), mask=gl < NGB)
    tl.store(dst + J * NW + NG + gs, sums.to(tl.int32, bitcast=True), mask=gl < NGB)


@triton.jit
def int8_factors(amax):
    """A group's rounding to int8 from its largest magnitude: the factor that scales it to [-127, 127]
    (0 for an all-zero group) and its step ``dx = amax * (1/127)``: a product, not a quotient, as
    Triton's float32 division on a GPU is not IEEE-rounded and dx is the one factor of the rounding
    that the tests (and the CPU kernels' int8 path) fix to the bit."""
    inv = tl.where(amax > 0, 127.0 / tl.where(amax > 0, amax, 1.0), 0.0)
    return inv, amax * (1.0 / 127.0)


@triton.jit
def int8_lane(v, inv, b: tl.constexpr):
    """:func:`int8_round` as an int8 in byte ``b`` of an int32."""
    return (int8_round(v, inv) & 0xFF) << (8 * b)


@triton.jit
def int8_round(v, inv):
    """``round(v * inv)`` (half away from zero; the cast truncates), int32."""
    xr = v * inv
    return (xr + tl.where(xr < 0, -0.5, 0.5)).to(tl.int32)


@triton.jit
def bf16_bits(x):
    """float32 ``x`` rounded to bfloat16 (to nearest, ties to even) as int16 bits: by hand, since
    Triton's interpreter truncates in ``.to(tl.bfloat16)`` and the tests compare both bit for bit."""
    bits = x.to(tl.int32, bitcast=True)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).to(tl.int16)


@triton.jit
def home(slot, slab_w, slab_h, host_w, host_h, HOST: tl.constexpr):
    """Where the expert of ``slot`` lives: (its words' base, its halves' base, its row there, whether
    it is anywhere here). Slot >= 0: row ``slot`` of the device slab; with HOST, slot <= -2: row
    ``-2 - slot`` of the host slab (page-locked host memory the kernel reads over the link in place);
    -1 (or any negative slot without HOST): not here, computed elsewhere."""
    if HOST:
        on_host = slot <= -2
        row = tl.where(on_host, -2 - slot, slot)
        return tl.where(on_host, host_w, slab_w), tl.where(on_host, host_h, slab_h), row, slot != -1
    return slab_w, slab_h, slot, slot >= 0
