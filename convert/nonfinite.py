"""Non-finite weights (NaN, ±Inf): found while converting, on the arrays already in memory.

A source tensor holding them (a damaged download, a broken fine-tune) is refused by name unless the
user passes ``--allow-nonfinite``; the counts are then recorded in the manifest. Checked: float
inputs, the bf16 scales and biases of quantised inputs, and the scales and biases fmoe's quantiser
writes (huge finite weights can overflow them).
"""

from __future__ import annotations

import numpy as np

from fmoe.formats.quant import QuantTensor

ADVICE = "re-download or fix the checkpoint, or pass --allow-nonfinite to convert it anyway"
_BF16_EXPONENT = np.uint16(0x7F80)
_BF16_MANTISSA = np.uint16(0x007F)


def count_nonfinite(t: np.ndarray | QuantTensor) -> int:
    """How many values of ``t`` are NaN or infinite (a QuantTensor: its scales and biases)."""
    if isinstance(t, QuantTensor):
        return _count_bf16(t.scales) + _count_bf16(t.biases)
    finite = np.isfinite(t)
    return 0 if finite.all() else int(finite.size - np.count_nonzero(finite))


def describe_nonfinite(t: np.ndarray | QuantTensor) -> str:
    """``"3 NaN and 1 infinite values"`` (in the scales/biases for a QuantTensor); for errors only."""
    if isinstance(t, QuantTensor):
        nan = _bf16_nan(t.scales) + _bf16_nan(t.biases)
        inf = count_nonfinite(t) - nan
        where = " in its scales/biases"
    else:
        nan = int(np.count_nonzero(np.isnan(t)))
        inf = int(np.count_nonzero(np.isinf(t)))
        where = ""
    return f"{nan} NaN and {inf} infinite values{where}"


def _count_bf16(bits: np.ndarray) -> int:
    """Non-finite bf16 values (kept as their uint16 bit patterns): exponent all ones."""
    return int(np.count_nonzero((bits & _BF16_EXPONENT) == _BF16_EXPONENT))


def _bf16_nan(bits: np.ndarray) -> int:
    return int(np.count_nonzero(((bits & _BF16_EXPONENT) == _BF16_EXPONENT) & ((bits & _BF16_MANTISSA) != 0)))
