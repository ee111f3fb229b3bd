"""MLX-compatible affine quantisation: group-wise ``W = scale * q + bias``.

Format (identical to MLX's ``mx.quantize`` output, so an MLX checkpoint passes through bit-exact):

- ``weight``: uint32 ``[..., out, in * bits / 32]``; values packed low bits first (at 4 bits the
  first input column is bits 0..3 of word 0).
- ``scales``, ``biases``: bf16 (stored here as their uint16 bit patterns) ``[..., out, in / group]``.
- ``W[o, i] = scales[o, i // group] * q[o, i] + biases[o, i // group]``.

This module is the numpy reference: exact, vectorised, used by the tests; the runtime's fast kernels
are checked against it. :func:`quantize` hands large inputs to the numba kernels of
:mod:`fmoe.formats.quant_numba`, which give bit-identical results (same float32 operations, same
order; sums in the fixed order of :func:`_lane_sum`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

SUPPORTED_BITS = (2, 4, 8)
DEFAULT_GROUP_SIZE = 64
QUANT_BACKENDS = ("auto", "numpy", "numba")
_NUMBA_MIN_SIZE = 1 << 16  # "auto" below this many weights stays in numpy (no kernel load for tiny models)
_CLIP_GRID = np.linspace(0.0, 0.4, 6, dtype=np.float32)  # clip-search: fractions of the range cut off either end
_CLIP_REFITS = 3  # clip-search: least-squares refinements after the grid


# ---- bf16 <-> float32 (bit patterns in uint16) -------------------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Exact widening of bf16 bit patterns (uint16) to float32."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 (ties to even); returns uint16 bit patterns. NaN stays NaN."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


# ---- packing ------------------------------------------------------------------------------------
def pack(q: np.ndarray, bits: int) -> np.ndarray:
    """Pack integer codes ``[..., n]`` (each < 2**bits) into uint32 ``[..., n * bits / 32]``, low bits first."""
    _check_bits(bits)
    per_word = 32 // bits
    q = np.asarray(q, dtype=np.uint32)
    if q.shape[-1] % per_word:
        raise ValueError(f"last dimension {q.shape[-1]} is not a multiple of {per_word}")
    q = q.reshape(*q.shape[:-1], q.shape[-1] // per_word, per_word)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    return np.bitwise_or.reduce(q << shifts, axis=-1).astype(np.uint32)


def unpack(words: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of :func:`pack`: uint32 ``[..., w]`` -> uint8 codes ``[..., w * 32 / bits]``."""
    _check_bits(bits)
    per_word = 32 // bits
    words = np.asarray(words, dtype=np.uint32)
    shifts = (np.arange(per_word, dtype=np.uint32) * bits).astype(np.uint32)
    q = (words[..., None] >> shifts) & np.uint32((1 << bits) - 1)
    return q.reshape(*words.shape[:-1], words.shape[-1] * per_word).astype(np.uint8)


# ---- quantised tensors --------------------------------------------------------------------------
@dataclass(frozen=True)
class QuantTensor:
    """One affine-quantised matrix ``[out, in]`` (or a stack ``[..., out, in]``)."""

    weight: np.ndarray  # uint32 [..., out, in * bits / 32]
    scales: np.ndarray  # uint16 (bf16 bits) [..., out, in / group_size]
    biases: np.ndarray  # uint16 (bf16 bits) [..., out, in / group_size]
    bits: int
    group_size: int = DEFAULT_GROUP_SIZE

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.weight.shape[:-1], self.weight.shape[-1] * 32 // self.bits)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.scales.nbytes + self.biases.nbytes

    def dequantize(self) -> np.ndarray:
        """float32 weights (exact: ``scale * q + bias`` evaluated in float32)."""
        return dequantize(self.weight, self.scales, self.biases, self.bits, self.group_size)


def dequantize(
    weight: np.ndarray, scales: np.ndarray, biases: np.ndarray, bits: int, group_size: int = DEFAULT_GROUP_SIZE
) -> np.ndarray:
    q = unpack(weight, bits).astype(np.float32)
    n = q.shape[-1]
    if n % group_size or scales.shape[-1] * group_size != n or biases.shape != scales.shape:
        raise ValueError(f"inconsistent quantised tensor: {n} columns, scales {scales.shape}, group {group_size}")
    g = q.reshape(*q.shape[:-1], n // group_size, group_size)
    s = bf16_to_f32(scales)[..., None]
    b = bf16_to_f32(biases)[..., None]
    return (g * s + b).reshape(q.shape)


def quantize(
    w: np.ndarray,
    bits: int,
    group_size: int = DEFAULT_GROUP_SIZE,
    *,
    clip_search: bool = False,
    backend: str = "auto",
) -> QuantTensor:
    """Quantise float weights ``[..., out, in]`` group-wise.

    Plain min/max by default. With ``clip_search`` every group also tries shrunken ranges
    ``[lo, hi]`` inside ``[min, max]`` and keeps the one with the least squared error (what makes
    2-bit usable; at 4 bits it gains little). ``backend``: "numpy" (the reference below), "numba"
    (same bits, many times faster) or "auto" (numba from ``_NUMBA_MIN_SIZE`` weights up).
    """
    _check_bits(bits)
    if backend not in QUANT_BACKENDS:
        raise ValueError(f"unknown quantisation backend {backend!r}; choose one of {QUANT_BACKENDS}")
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[-1]
    if n % group_size:
        raise ValueError(f"input dimension {n} is not a multiple of the group size {group_size}")
    if n % (32 // bits):
        raise ValueError(f"last dimension {n} is not a multiple of {32 // bits}")
    if backend == "numba" or (backend == "auto" and w.size >= _NUMBA_MIN_SIZE):
        from fmoe.formats.quant_numba import quantize_rows  # deferred: loading numba costs ~0.5 s

        words, scales, biases = quantize_rows(
            w.reshape(-1, n), bits, group_size, _CLIP_GRID if clip_search else None, _CLIP_REFITS
        )
        lead = w.shape[:-1]
        return QuantTensor(
            words.reshape(*lead, -1), scales.reshape(*lead, -1), biases.reshape(*lead, -1), bits, group_size
        )
    return quantize_reference(w, bits, group_size, clip_search=clip_search)


def quantize_reference(
    w: np.ndarray, bits: int, group_size: int = DEFAULT_GROUP_SIZE, *, clip_search: bool = False
) -> QuantTensor:
    """The numpy statement of :func:`quantize` (what the numba kernels must reproduce bit for bit)."""
    _check_bits(bits)
    w = np.asarray(w, dtype=np.float32)
    n = w.shape[-1]
    if n % group_size:
        raise ValueError(f"input dimension {n} is not a multiple of the group size {group_size}")
    g = w.reshape(*w.shape[:-1], n // group_size, group_size)
    # + 0: a -0.0 minimum becomes +0.0, so which zero min() picks cannot change the stored bias
    lo = g.min(axis=-1) + np.float32(0.0)
    hi = g.max(axis=-1)
    if clip_search:
        lo, hi = _search_clip(g, lo, hi, bits)
    q, scales, biases = _codes_for_range(g, lo, hi, bits)
    return QuantTensor(pack(q.reshape(w.shape), bits), scales, biases, bits, group_size)


# ---- internals ----------------------------------------------------------------------------------
def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits}; supported: {SUPPORTED_BITS}")


def _codes_for_range(
    g: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes for groups ``g`` [..., G, group] given each group's range; scale and bias rounded to
    bf16 first so the codes are chosen for the values the reader will actually use."""
    levels = (1 << bits) - 1
    scale = np.maximum((hi - lo) / levels, np.float32(1e-12)).astype(np.float32)
    scales = f32_to_bf16(scale)
    biases = f32_to_bf16(lo)
    s = bf16_to_f32(scales)[..., None]
    b = bf16_to_f32(biases)[..., None]
    q = np.clip(np.rint((g - b) / s), 0, levels).astype(np.uint8)
    return q, scales, biases


def _group_sse(g: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> np.ndarray:
    q, scales, biases = _codes_for_range(g, lo, hi, bits)
    deq = q * bf16_to_f32(scales)[..., None] + bf16_to_f32(biases)[..., None]
    return _lane_sum((deq - g) ** 2)


def _lane_sum(x: np.ndarray) -> np.ndarray:
    """float32 sum over the last axis in a fixed order: element ``i`` goes to lane ``i % 8`` (lanes
    summed in sequence; the axis zero-padded to whole lanes), then the 8 lanes pairwise. For up to
    128 elements this is numpy's own order, spelled out so the numba kernels can match it exactly
    (which range wins the clip search depends on the last bit of these sums)."""
    pad = -x.shape[-1] % 8
    if pad:
        x = np.concatenate([x, np.zeros((*x.shape[:-1], pad), x.dtype)], axis=-1)
    lanes = x.reshape(*x.shape[:-1], -1, 8)
    acc = lanes[..., 0, :].copy()
    for k in range(1, lanes.shape[-2]):
        acc += lanes[..., k, :]
    while acc.shape[-1] > 1:
        acc = acc[..., 0::2] + acc[..., 1::2]
    return acc[..., 0]


def _search_clip(g: np.ndarray, lo: np.ndarray, hi: np.ndarray, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """Per group, the range ``[lo', hi']`` with the least squared error.

    First a grid of ranges shrunk from either end, then a few alternating refinements (codes fixed,
    scale and bias refitted by least squares; then codes re-chosen), keeping a change only where it
    lowers the group's error.
    """
    best_lo, best_hi = lo.copy(), hi.copy()
    best = _group_sse(g, lo, hi, bits)

    def consider(cand_lo: np.ndarray, cand_hi: np.ndarray) -> None:
        nonlocal best, best_lo, best_hi
        err = _group_sse(g, cand_lo, cand_hi, bits)
        better = err < best
        best = np.where(better, err, best)
        best_lo = np.where(better, cand_lo, best_lo)
        best_hi = np.where(better, cand_hi, best_hi)

    span = hi - lo
    for a in _CLIP_GRID:
        for b in _CLIP_GRID:
            if a or b:
                consider(lo + a * span, hi - b * span)
    levels = (1 << bits) - 1
    for _ in range(_CLIP_REFITS):
        q, _, _ = _codes_for_range(g, best_lo, best_hi, bits)
        scale, bias = _least_squares_affine(q.astype(np.float32), g)
        consider(bias, bias + scale * levels)
    return best_lo.astype(np.float32), best_hi.astype(np.float32)


def _least_squares_affine(q: np.ndarray, g: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per group, ``(s, b)`` minimising ``sum((s * q + b - g)**2)`` for fixed codes ``q``."""
    n = q.shape[-1]
    sq, sg = _lane_sum(q), _lane_sum(g)
    var = n * _lane_sum(q * q) - sq * sq
    cov = n * _lane_sum(q * g) - sq * sg
    safe = var > 0
    scale = np.where(safe, cov / np.where(safe, var, 1), 0).astype(np.float32)
    scale = np.maximum(scale, np.float32(1e-12))
    bias = ((sg - scale * sq) / n).astype(np.float32)
    return scale, bias
