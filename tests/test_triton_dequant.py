"""``--int8-dot``'s long prefills on library GEMMs (runtime/kernels/triton_dequant.py and its callers in
runtime/kernels/triton_moe.py): weights dequantised to bfloat16, then cuBLAS or ``torch._grouped_mm``
(on the GPU where torch sees one, else Triton's interpreter and torch's CPU GEMMs).

Bounds. The dequantisation is exact up to its one rounding to bfloat16: compared bit for bit with
numpy's. The GEMMs against a float64 emulation of the path's roundings (bfloat16 inputs; with
``_grouped_mm`` also its bfloat16 results and the SwiGLU's), which they meet to float32's
accumulation, 1e-5 relative, where no bfloat16 rounding follows the sum; a result rounded to
bfloat16 may land one step (2**-8 relative) on the other side of a tie, and that step can carry
through the SwiGLU and down, so the experts' bound is 2**-6 of the largest output. Against the exact
float64 product each input's rounding (2**-9 relative) bounds the error by 2**-8 of the sum of the
products' magnitudes. A wrong row, column, group or slot moves results by their own size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("triton")  # without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 already

from test_triton_kernels import DEVICE, Experts, dev, host, host_slab, poisoned, torch_quant

from fmoe.formats.quant import quantize
from fmoe.runtime.kernels import triton_dequant as td
from fmoe.runtime.kernels import triton_moe as tm

FORMATS = [(4, 37, 192, 64), (2, 50, 192, 48), (8, 30, 128, 32), (4, 20, 320, 64), (2, 9, 64, 64)]


def to_bf16(a: np.ndarray) -> np.ndarray:
    """float32 values of ``a`` rounded to bfloat16 (to nearest, ties to even), as float64."""
    bits = np.asarray(a, np.float32).view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return rounded.astype(np.uint32).view(np.float32).astype(np.float64)


def silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


class Spy:
    """Counts the calls of triton_dequant.dequantize (the path taken), passing them through."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.calls, self._real = 0, td.dequantize
        monkeypatch.setattr(td, "dequantize", self)

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self._real(*args, **kwargs)


# ---- dequantisation -------------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "n_out", "n_in", "gs"), FORMATS)
def test_dequantize_a_dense_matrix_is_its_bf16_rounding(
    bits: int, n_out: int, n_in: int, gs: int, rng: np.random.Generator
) -> None:
    """Every element is numpy's float32 ``scale * q + bias`` rounded to bfloat16, written below the rows
    asked for (``row0``) and nowhere else."""
    qt = quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), bits, gs)
    w = torch_quant(qt)
    out = torch.full((1, n_out + 3, n_in), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    words, halves = w.weight.reshape(1, -1), w.scales.view(torch.int16).reshape(1, -1)
    parts = (0, 0, tm._apart(w.biases, w.scales))
    slot = torch.zeros(1, dtype=torch.int64, device=DEVICE)
    td.dequantize(words, halves, slot, parts, (n_out, n_in), (bits, gs), out, row0=2)
    got = host(out.float())[0]
    np.testing.assert_array_equal(got[2 : 2 + n_out], to_bf16(qt.dequantize()))
    assert np.isnan(got[:2]).all() and np.isnan(got[2 + n_out :]).all()


def test_dequantize_experts_from_both_slabs(rng: np.random.Generator) -> None:
    """Slots of the device slab, of a host slab (<= -2: row ``-2 - slot``) and -1 (zeros), each
    projection at its offsets in the expert file."""
    hidden, inter = 128, 96
    ex = Experts(rng, 5, hidden, inter, 4, gs=32)
    device_slab, host_rows = ex.slab[:3], host_slab(ex.slab[3:])
    words, halves = device_slab.view(torch.int32), device_slab.view(torch.int16)
    host_views = (host_rows.view(torch.int32), host_rows.view(torch.int16))
    slots, experts = [2, -1, -3, 0, -2], [2, None, 4, 0, 3]
    for proj, name, shape in ((ex.offsets.gate, "gate_proj", (inter, hidden)), (ex.offsets.down, "down_proj",
                                                                               (hidden, inter))):  # fmt: skip
        out = torch.empty((len(slots), *shape), dtype=torch.bfloat16, device=DEVICE)
        td.dequantize(words, halves, dev(np.array(slots)), tm._units(proj), shape, (4, 32), out, host=host_views)
        for g, e in enumerate(experts):
            want = np.zeros(shape) if e is None else to_bf16(ex.f64[e][name])
            np.testing.assert_array_equal(host(out[g].float()), want)


def test_dequantize_rejects_bad_outputs() -> None:
    words, halves = torch.zeros((1, 8), dtype=torch.int32), torch.zeros((1, 4), dtype=torch.int16)
    slot, bf16 = torch.zeros(1, dtype=torch.int64), torch.empty((1, 4, 64), dtype=torch.bfloat16)
    call = lambda w, out, row0=0: td.dequantize(w, halves, slot, (0, 0, 2), (4, 64), (4, 64), out, row0)  # noqa: E731
    with pytest.raises(ValueError, match="dequantize: out must be a contiguous bfloat16"):
        call(words, bf16.float())
    with pytest.raises(ValueError, match=r"dequantize: out \(1, 4, 64\) has no room for 1 x 4 rows at row 2"):
        call(words, bf16, 2)
    with pytest.raises(ValueError, match="dequantize: words and halves must be 2-D"):
        call(words[0], bf16)


def test_swiglu_of_bf16_rows_into_a_column_block(rng: np.random.Generator) -> None:
    """``silu(gate) * up`` from bfloat16 ``[gate | up]`` rows, rounded once, into columns 5 : 5 + N of a
    wider bfloat16 tensor, the other columns untouched: numpy's rounding of the float64 value, or
    its neighbour where float32's arithmetic (a GPU's exp is approximate) lands across a tie; bad
    shapes get a one-line error."""
    rows, n = 19, 40
    gu = to_bf16(rng.standard_normal((rows, 2 * n)) * 3)
    h = torch.full((rows, n + 9), 7.0, dtype=torch.bfloat16, device=DEVICE)
    td.swiglu(dev(gu.astype(np.float32)).to(torch.bfloat16), h[:, 5 : 5 + n])
    got = host(h.float())
    want = to_bf16(silu(gu[:, :n]) * gu[:, n:])
    assert (np.abs(got[:, 5 : 5 + n] - want) <= 2**-8 * np.abs(want)).all()
    assert (got[:, 5 : 5 + n] == want).mean() > 0.95
    assert (got[:, :5] == 7).all() and (got[:, 5 + n :] == 7).all()
    with pytest.raises(ValueError, match="swiglu: gu must be contiguous bfloat16"):
        td.swiglu(dev(gu.astype(np.float32)), h[:, :n])


# ---- dense GEMMs ------------------------------------------------------------------------------------
def _near_emulation(got: np.ndarray, want: np.ndarray, rtol: float) -> None:
    assert got.dtype == np.float32 and np.isfinite(got).all()
    assert np.abs(got - want).max() <= rtol * np.abs(want).max(), np.abs(got - want).max() / np.abs(want).max()


@pytest.mark.parametrize(("bits", "n_out", "n_in", "gs"), [(4, 300, 192, 64), (2, 260, 128, 32), (8, 256, 64, 32)])
def test_long_int8_prefill_multiplies_dense_matrices_in_bf16(
    bits: int, n_out: int, n_in: int, gs: int, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``_DEQUANT_MIN_TOKENS`` tokens on, ``int8`` qmatvec dequantises and takes one bfloat16 GEMM
    into float32: the emulation's result to 1e-5, the exact one within the inputs' rounding; below
    the threshold, or on a torch without the library GEMMs, the tiled kernel (float inputs) as before."""
    monkeypatch.setattr(tm, "_DEQUANT_MIN_TOKENS", 7)
    spy = Spy(monkeypatch)
    qts = [quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), bits, gs) for _ in range(2)]
    ws = [torch_quant(q) for q in qts]
    exact = [q.dequantize().astype(np.float64) for q in qts]
    x = (rng.standard_normal((9, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)
    got = host(tm.qmatvec(dev(x), ws[0], out=poisoned(9, n_out), int8=True))
    assert spy.calls == 1
    np.testing.assert_array_equal(host(tm.qmatvec(dev(x), ws[0], int8=True)), got)  # no out: the GEMM's own
    assert spy.calls == 2
    _near_emulation(got, to_bf16(x) @ to_bf16(exact[0]).T, 1e-5)
    assert (np.abs(got - x @ exact[0].T) <= 2**-8 * (np.abs(x) @ np.abs(exact[0]).T) + 1e-6).all()
    # the shared expert's gate+up (measured no faster dequantised): the float tiles
    xs = dev(x / 10)  # (silu's exp in range)
    np.testing.assert_array_equal(host(tm.dense_gate_up(xs, *ws, int8=True)), host(tm.dense_gate_up(xs, *ws)))
    assert spy.calls == 2
    below = dev(x[:6])
    np.testing.assert_array_equal(host(tm.qmatvec(below, ws[0], int8=True)), host(tm.qmatvec(below, ws[0])))
    monkeypatch.setattr(td, "AVAILABLE", False)  # a torch without the library GEMMs: the tiles at any length
    np.testing.assert_array_equal(host(tm.qmatvec(dev(x), ws[0], int8=True)), host(tm.qmatvec(dev(x), ws[0])))
    assert spy.calls == 2


# ---- routed experts -------------------------------------------------------------------------------
def _emulate(ex: Experts, slots: np.ndarray, x: np.ndarray, weights: np.ndarray, shared: np.ndarray) -> np.ndarray:
    """float64 with the bf16 path's roundings: inputs, gate/up results, h and down's results."""
    out = shared.astype(np.float64).copy()
    for t, j in np.ndindex(*slots.shape):
        if slots[t, j] is None:
            continue
        m = {p: to_bf16(w) for p, w in ex.f64[slots[t, j]].items()}
        xb = to_bf16(x[t])
        h = to_bf16(silu(to_bf16(m["gate_proj"] @ xb)) * to_bf16(m["up_proj"] @ xb))
        out[t] += weights[t, j] * to_bf16(m["down_proj"] @ h)
    return out


@pytest.mark.parametrize("bits", [4, 2, 8])
def test_long_int8_prefill_multiplies_experts_on_grouped_gemms(
    bits: int, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """From ``_DEQUANT_MIN_PAIRS`` pairs an expert on, ``int8`` experts_grouped sorts the pairs, dequantises
    each distinct slot's matrices (device slab, host slab, -1: adds nothing) and multiplies them on
    ``torch._grouped_mm``: the emulation within a bf16 step carried through, the exact float64
    within the inputs' rounding; in blocks of output rows (``_DEQUANT_SCRATCH`` bytes) the same result."""
    hidden, inter, k, tokens = 128, 192, 3, 12
    ex = Experts(rng, 6, hidden, inter, bits, gs=32)
    device_slab, host_rows = ex.slab[:4], host_slab(ex.slab[4:])
    slot_of = np.array([0, 1, 2, 3, -2, -3, -1])  # expert 6 is elsewhere
    ids = np.stack([rng.choice(7, k, replace=False) for _ in range(tokens)])
    ids[0] = [6, 4, 1]
    x = (rng.standard_normal((tokens, hidden)) * rng.uniform(0.5, 2, hidden)).astype(np.float32)
    weights = rng.uniform(0.1, 1, (tokens, k)).astype(np.float32)
    shared = rng.standard_normal((tokens, hidden)).astype(np.float32)
    args = (device_slab, ex.offsets, dev(slot_of[ids]), dev(x), dev(weights), dev(shared))
    monkeypatch.setattr(tm, "_DEQUANT_MIN_PAIRS", 1)
    spy = Spy(monkeypatch)
    got = host(tm.experts_grouped(*args, out=poisoned(tokens, hidden), host=host_rows, int8=True))
    assert spy.calls == 3  # all rows at once: gate, up, down
    home = np.array([0, 1, 2, 3, 4, 5, None], dtype=object)[ids]
    want = _emulate(ex, home, x, weights, shared)
    moe = want - shared
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 2**-6 * np.abs(moe).max()
    exact = ex.moe(np.where(ids == 6, 0, ids), x.astype(np.float64), np.where(ids == 6, 0, weights), shared)
    assert np.abs(got - exact).max() <= 2**-5 * np.abs(moe).max()
    monkeypatch.setattr(tm, "_DEQUANT_SCRATCH", 1)  # blocks of 64 rows: gate+up in 3, down in 2
    chunked = host(tm.experts_grouped(*args, host=host_rows, int8=True))
    assert spy.calls == 3 + 3 * 2 + 2
    np.testing.assert_allclose(chunked, got, rtol=0, atol=1e-6 * np.abs(got).max())


def test_the_threshold_picks_the_path(rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grouped GEMMs need ``int8``, ``_DEQUANT_MIN_PAIRS`` pairs for each slot the pairs may name
    (``experts``, else the slabs' rows and -1) and a torch that has ``_grouped_mm``."""
    hidden, inter, k, tokens = 64, 32, 2, 8
    ex = Experts(rng, 4, hidden, inter, 4, gs=32)
    slots = dev(np.stack([rng.choice(4, k, replace=False) for _ in range(tokens)]))
    x, w, s = dev(rng.standard_normal((tokens, hidden)).astype(np.float32)), dev(np.full((tokens, k), 0.5)), None
    w, s = w.float(), dev(np.zeros((tokens, hidden), np.float32))
    monkeypatch.setattr(tm, "_DEQUANT_MIN_PAIRS", 4)  # 16 pairs
    spy = Spy(monkeypatch)
    tm.experts_grouped(ex.slab, ex.offsets, slots, x, w, s, int8=True)  # 4 slab rows and -1: 3.2 pairs each
    assert spy.calls == 0
    tm.experts_grouped(ex.slab, ex.offsets, slots, x, w, s, int8=True, experts=4)  # 4 each
    assert spy.calls == 3
    tm.experts_grouped(ex.slab, ex.offsets, slots, x, w, s, experts=4)  # float inputs: the tiled kernel
    assert spy.calls == 3
    monkeypatch.setattr(td, "AVAILABLE", False)  # a torch without _grouped_mm: the tiles
    tm.experts_grouped(ex.slab, ex.offsets, slots, x, w, s, int8=True, experts=4)
    assert spy.calls == 3


@pytest.mark.skipif(DEVICE.type != "cuda", reason="minutes under Triton's interpreter; the kernels' tests run there")
def test_a_long_int8_prefill_on_the_torch_backend(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole model's prefill with ``int8`` on the library GEMMs (thresholds lowered to this small
    model's 24 tokens): the logits move from the float kernels' by what rounding activations does to
    this random model, which amplifies it: under Triton's interpreter 26% of their norm on this path
    and 34% on the int8 tiles' (``_DEQUANT_*`` out of reach), while uncorrelated logits of one norm
    differ by about 141%; so under 60%: the wiring's check (the kernels' arithmetic is checked above)."""
    import fmoe
    from fmoe.runtime.diagnostics import build_packed

    packed = build_packed(tmp_path, seed=5)[1]
    monkeypatch.setattr(tm, "_DEQUANT_MIN_TOKENS", 8)
    monkeypatch.setattr(tm, "_DEQUANT_MIN_PAIRS", 1)
    spy = Spy(monkeypatch)
    logits = {}
    for int8 in (False, True):
        options = {"kernels": "triton", "int8": int8}
        with fmoe.load(packed, backend="torch", device=DEVICE.type, backend_options=options,
                       device_cache_bytes=1 << 40) as engine:  # fmt: skip
            ids = engine.tokenizer.encode("a prompt long enough for the dequantised GEMMs " * 3)[:24]
            assert len(ids) == 24
            logits[int8] = engine.logits(ids)
    assert spy.calls > 0
    rel = np.linalg.norm(logits[True] - logits[False]) / np.linalg.norm(logits[False])
    assert 1e-6 < rel < 0.6, rel
