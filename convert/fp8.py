"""Block FP8 (float8 e4m3 with per-block ``weight_scale_inv``): the official Qwen FP8 releases.

What the releases hold (checked against transformers' fine-grained FP8 support,
``integrations/finegrained_fp8.py`` and ``utils/quantization_config.py`` ``FineGrainedFP8Config``):

- ``config.json["quantization_config"]``: ``quant_method: "fp8"``, ``fmt: "e4m3"``,
  ``activation_scheme: "dynamic"``, ``weight_block_size: [128, 128]`` (transformers' default when
  absent), ``modules_to_not_convert`` (embeddings, lm_head, norms, routers, the DeltaNet's small
  projections and vectors stay bf16);
- a quantised Linear ``X.weight`` is ``F8_E4M3`` ``[out, in]`` with ``X.weight_scale_inv``
  ``[ceil(out / 128), ceil(in / 128)]``; fused experts ``X`` ``[E, out, in]`` have ``X_scale_inv``
  ``[E, ...]``. The official releases store experts per expert (``mlp.experts.{e}.gate_proj.weight``).

Dequantisation is transformers' ``Fp8Dequantize``: ``W = float32(q) * float32(scale_inv)`` per block,
in float32, then cast to the model's dtype (bf16 in every release config): so each weight here is
the bf16 value transformers' loader gives, held in float32.

Partial blocks (a dimension over the block size that is not a multiple of it) are read differently
by transformers' dequantising loader (block = dimension / grid) and its matmul (ceil blocks), so
they are refused rather than guessed; the releases have none. Everything else a reader could
meet (e5m2 weights, per-tensor or ue8m0 scales, static activation scales, FP4 experts, FP8
embeddings) is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.quant import bf16_to_f32, f32_to_bf16

FP8_WEIGHT_DTYPE = "F8_E4M3"  # safetensors' name of torch.float8_e4m3fn
SCALE_DTYPES = ("F32", "BF16", "F16")  # transformers reads any float scale as float32
DEFAULT_BLOCK = (128, 128)  # FineGrainedFP8Config's default weight_block_size
E4M3_MAX = 448.0
SCALE_SUFFIX = "_scale_inv"
# Companions of other FP8 schemes that this reader does not apply: refused by name.
FOREIGN_SCALE_SUFFIXES = (".activation_scale", ".input_scale", ".weight_scale", ".qscale_weight", ".scale")


def _e4m3_table() -> np.ndarray:
    """float32 value of each float8 e4m3fn byte (sign, 4 exponent bits with bias 7, 3 mantissa bits;
    no infinities; 0x7F and 0xFF are NaN). Built from the bit layout, not from a library."""
    codes = np.arange(256)
    sign = np.where(codes & 0x80, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    man = codes & 0x7
    normal = (1.0 + man / 8.0) * np.exp2(exp - 7.0)
    subnormal = (man / 8.0) * 2.0**-6
    values = sign * np.where(exp == 0, subnormal, normal)
    values[(codes & 0x7F) == 0x7F] = np.nan
    return values.astype(np.float32)


E4M3_VALUES = _e4m3_table()


def scale_key(weight_key: str) -> str:
    """The scale tensor of a weight: ``X.weight`` -> ``X.weight_scale_inv``; a fused ``X`` -> ``X_scale_inv``
    (transformers' naming, ``Fp8Quantize`` and ``FP8Experts``)."""
    return weight_key + SCALE_SUFFIX


@dataclass(frozen=True)
class Fp8Config:
    """The parts of ``quantization_config`` that decide how the weights are read."""

    block: tuple[int, int]

    @classmethod
    def parse(cls, q: Any, where: str) -> Fp8Config:
        """Check a ``quantization_config`` with ``quant_method: "fp8"``: every field that would change
        the weights is one this reader applies, else a one-line error naming it."""
        if not isinstance(q, dict):
            raise FmoeError(f"{where}: quantization_config is not an object")
        fields = {
            "fmt": ("e4m3", "float8 e4m3 weights"),
            "activation_scheme": ("dynamic", "dynamic activation scaling (no activation_scale tensors)"),
            "scale_fmt": ("float", "float block scales (not ue8m0 exponents)"),
            "expert_dtype": ("fp8", "FP8 experts (not FP4)"),
        }
        for name, (wanted, what) in fields.items():
            value = q.get(name)
            if value is not None and (not isinstance(value, str) or value.lower() != wanted):
                raise FmoeError(
                    f"{where}: quantization_config.{name} = {value!r} is an FP8 variant fmoe does not read "
                    f"(it reads the official releases: {what})"
                )
        if q.get("modules_to_convert"):
            raise FmoeError(
                f"{where}: quantization_config.modules_to_convert = {q['modules_to_convert']!r}: FP8 embeddings "
                "(per-tensor scales) are an FP8 variant fmoe does not read"
            )
        block = q.get("weight_block_size", list(DEFAULT_BLOCK))
        if block is None:
            raise FmoeError(
                f"{where}: quantization_config.weight_block_size is null (per-tensor FP8 scales): an FP8 variant "
                "fmoe does not read (the official releases use 128 x 128 blocks)"
            )
        if (
            not isinstance(block, list | tuple)
            or len(block) != 2
            or not all(type(b) is int and 1 <= b <= 1 << 16 for b in block)
        ):
            raise FmoeError(f"{where}: quantization_config.weight_block_size = {block!r} must be two positive integers")
        return cls((int(block[0]), int(block[1])))


def expected_grid(rows: int, cols: int, block: tuple[int, int]) -> tuple[int, int]:
    return -(-rows // block[0]), -(-cols // block[1])


def partial_block(rows: int, cols: int, block: tuple[int, int]) -> str | None:
    """Why a ``rows x cols`` matrix is ambiguous in ``block`` tiles, or None when every dimension is a
    multiple of the block or fits in one (transformers' dequantising loader and its matmul agree)."""
    for dim, b, what in ((rows, block[0], "rows"), (cols, block[1], "columns")):
        if dim > b and dim % b:
            return f"{dim} {what} do not tile into blocks of {b}"
    return None


def dequantize(raw: np.ndarray, scales: np.ndarray, block: tuple[int, int], row0: int = 0) -> np.ndarray:
    """float32 weights (on the bf16 grid) of FP8 codes ``raw`` (uint8 ``[..., r, c]``) whose first row
    is row ``row0`` of the matrix, with ``scales`` float32 ``[..., grid rows covering them, grid cols]``
    (the scale rows from ``row0 // block[0]`` on)."""
    rows, cols = raw.shape[-2:]
    bm, bn = block
    first = row0 - (row0 // bm) * bm  # offset of row0 inside its block
    s = np.repeat(scales.astype(np.float32, copy=False), bm, axis=-2)[..., first : first + rows, :]
    s = np.repeat(s, bn, axis=-1)[..., :cols]
    w = E4M3_VALUES[raw] * s  # float32 product, rounded once, as torch multiplies
    return bf16_to_f32(f32_to_bf16(w))  # .to(bfloat16): round to nearest even


# ---- quantising (fmoe synth writes the release layout) --------------------------------------------
def quantize(w: np.ndarray, block: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(e4m3 codes as uint8, float32 scale_inv grid) of float32 ``w`` ``[..., rows, cols]``, bit for bit
    as transformers' ``Fp8Quantize`` computes them: per block ``scale = 448 / amax`` (1 for an all-zero
    block), ``scale_inv = 1 / scale``, codes ``e4m3(clamp(w * scale))`` rounded to nearest even;
    partial blocks at the ends."""
    import ml_dtypes  # the writer only: a rounding float32 -> e4m3 cast

    *lead, rows, cols = w.shape
    bm, bn = block
    gr, gc = expected_grid(rows, cols, block)
    padded = np.zeros((*lead, gr * bm, gc * bn), np.float32)
    padded[..., :rows, :cols] = w
    tiles = padded.reshape(*lead, gr, bm, gc, bn)
    amax = np.abs(tiles).max(axis=(-3, -1))
    ok = amax > 0
    # torch evaluates ``448.0 / amax`` (a number over a tensor) as reciprocal(amax) * 448, and
    # ``1.0 / scale`` as reciprocal(scale): the same float32 steps here, so the bits agree
    recip = (np.float32(1) / np.where(ok, amax, np.float32(1))).astype(np.float32)
    scale = np.where(ok, recip * np.float32(E4M3_MAX), np.float32(1)).astype(np.float32)
    inv = (np.float32(1) / scale).astype(np.float32)
    scaled = tiles * scale[..., :, None, :, None]
    codes = np.clip(scaled, -E4M3_MAX, E4M3_MAX).astype(ml_dtypes.float8_e4m3fn).view(np.uint8)
    codes = codes.reshape(*lead, gr * bm, gc * bn)[..., :rows, :cols]
    return np.ascontiguousarray(codes), inv
