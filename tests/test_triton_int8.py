"""The matvec kernels on int8 activations (``int8=True`` in runtime/kernels/triton_moe.py, on the input
rows of runtime/kernels/triton_int8.py; ``--int8-dot`` on CUDA): on the GPU where torch sees one,
else through Triton's interpreter (``TRITON_INTERPRET=1``, where ``dp4a`` is computed from the bytes).

Two checks, as for the CPU's int8 kernels (tests/test_kernels.py): the input's rounding against its
contract, read back from the kernels' own input rows; and the matvecs against a float64 emulation of
that rounding (so they compute exactly it: integer sums are exact, the float part is one product
and one FMA a group, 1e-5 relative) and against the exact product within the rounding's bound (half
a step, ``dx / 2``, per activation, times ``sum |scale * code|`` of its group).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("triton")  # without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 already

from test_triton_kernels import DEVICE, dev, expert_layout, host, torch_quant

from fmoe.formats.quant import QuantTensor, bf16_to_f32, quantize, unpack
from fmoe.runtime.kernels import triton_int8 as ti
from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels import triton_steps

# (bits, n_out, n_in, group size): odd row counts, groups of 3 to 16 words, one group a row
FORMATS = [(4, 37, 192, 64), (2, 50, 192, 48), (8, 30, 128, 32), (4, 130, 48, 16), (2, 9, 64, 64)]


def unit_rows(rng: np.random.Generator, tokens: int, n: int) -> np.ndarray:
    """Rows whose groups have unlike scales (as hidden states have), and one all-zero group."""
    x = (rng.standard_normal((tokens, n)) * rng.uniform(0.05, 20, n)).astype(np.float32)
    x[:, :16] = 0.0
    return x


def read_input(xq: torch.Tensor, n: int, bits: int, gs: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An int8 input row as its kernels read it: (the int8 activations in column order, the groups'
    steps dx, the groups' sums), decoded from the layout the module's docstring gives."""
    j, nw, ng = 8 // bits, n * bits // 32, n // gs
    row = host(xq)
    lanes = row[: j * nw].astype("<i4").view(np.int8).reshape(j, nw, 4)  # [j, word, byte]
    xq8 = lanes.transpose(1, 2, 0).reshape(-1)  # column w * 4j + b * j + j'
    floats = row[j * nw : j * nw + 2 * ng].view(np.float32)
    return xq8.astype(np.float64), floats[:ng], floats[ng:]


def check_rounding(x: np.ndarray, xq: np.ndarray, dx: np.ndarray, sums: np.ndarray, gs: int) -> None:
    """The rounding's contract per group: ``dx = max|x| * float32(1 / 127)`` exactly, ``|xq| <= 127``,
    every activation within half a step of ``xq * dx`` (a tie either way) plus a few float32 ulps of
    ``x`` (the kernel rounds the float32 product ``x * (127 / max|x|)``, the quotient itself not
    IEEE-rounded on a GPU); the sums are float32 sums of x."""
    xg = x.reshape(-1, gs)
    amax = np.abs(xg).max(1)
    assert np.array_equal(dx, (amax * np.float32(1 / 127)).astype(np.float32))
    q = xq.reshape(-1, gs)
    assert np.abs(q).max() <= 127
    step = dx.astype(np.float64)[:, None]
    assert (np.abs(q * step - xg) <= step * 0.5 + np.abs(xg) * 2.0**-20).all()
    assert np.allclose(sums, xg.astype(np.float64).sum(1), rtol=1e-5, atol=1e-5 * np.abs(xg).sum(1).max())


def emulation(qt: QuantTensor, xq: np.ndarray, dx: np.ndarray, sums: np.ndarray) -> np.ndarray:
    """float64 of what the kernel computes: per group ``scale * dx * sum(q * xq) + bias * sum(x)``."""
    gs = qt.group_size
    q = unpack(qt.weight, qt.bits).astype(np.float64).reshape(qt.shape[0], -1, gs)
    s, b = bf16_to_f32(qt.scales).astype(np.float64), bf16_to_f32(qt.biases).astype(np.float64)
    dots = np.einsum("rgc,gc->rg", q, xq.reshape(-1, gs))
    return (s * dx.astype(np.float64)[None, :] * dots + b * sums.astype(np.float64)[None, :]).sum(1)


@pytest.mark.parametrize(("bits", "n_out", "n_in", "gs"), FORMATS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_int8_matvec_computes_its_rounding_and_stays_in_its_bound(
    bits: int, n_out: int, n_in: int, gs: int, tokens: int, rng: np.random.Generator
) -> None:
    qt = quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), bits, gs)
    xs = unit_rows(rng, tokens, n_in)
    x = dev(xs)
    y = host(tm.qmatvec(x, torch_quant(qt), int8=True))
    assert y.dtype == np.float32 and y.shape == (tokens, n_out) and np.isfinite(y).all()
    rows = ti.int8_input(x, bits, gs)  # cached on x: the very rows the matvec read
    w64 = qt.dequantize().astype(np.float64)
    for t in range(tokens):
        xq, dx, sums = read_input(rows[t], n_in, bits, gs)
        check_rounding(xs[t], xq, dx, sums, gs)
        want = emulation(qt, xq, dx, sums)
        assert np.abs(y[t] - want).max() <= 1e-5 * np.abs(want).max()
        exact = w64 @ xs[t].astype(np.float64)
        # the bias term takes the exact sum of x, so only the scaled codes meet the rounding
        codes = unpack(qt.weight, bits).astype(np.float64).reshape(n_out, -1, gs)
        scaled = np.abs(codes * bf16_to_f32(qt.scales).astype(np.float64)[:, :, None]).sum(2)
        bound = (scaled * dx.astype(np.float64)[None, :] / 2).sum(1)
        bound += 1e-5 * np.abs(w64) @ np.abs(xs[t].astype(np.float64))
        assert (np.abs(y[t] - exact) <= bound).all()
    assert not np.allclose(y, host(tm.qmatvec(x, torch_quant(qt))), rtol=1e-6)  # the int8 path, not the float one


@pytest.mark.parametrize(("tokens", "count"), [(1, 6), (2, 3)])  # 6 matrices: two launches
def test_int8_matvecs_of_several_matrices_match_one_at_a_time(
    tokens: int, count: int, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Several matrices in one launch, row blocks ending part-way (rows of 1 to 300), equal to each
    matrix on its own; also with blocks of 128 rows and 4-word steps (steps shorter than a group)."""
    rows = [300, 1, 37, 64, 5, 130][:count]
    qts = [torch_quant(quantize(rng.standard_normal((r, 192)).astype(np.float32), 4, 64)) for r in rows]
    x = dev(unit_rows(rng, tokens, 192))
    one_by_one = [host(tm.qmatvec(x, w, int8=True)) for w in qts]
    for blocks in (None, tm._MatvecBlocks(128, 4, 4)):
        if blocks is not None:
            monkeypatch.setattr(tm, "_matvec_blocks", lambda *a, b=blocks, **k: b)
        got = tm.qmatvecs(x, qts, int8=True)
        assert [tuple(y.shape) for y in got] == [(tokens, r) for r in rows]
        for y, want in zip(got, one_by_one, strict=True):
            np.testing.assert_allclose(host(y), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_int8_matvecs_above_decode_take_the_float_gemm(rng: np.random.Generator) -> None:
    """Past ``_MATVEC_MAX_TOKENS`` rows (prefill) a large dense matrix takes the float path's tiled
    GEMM (int8 tensor cores measured slower there), the shared expert's pair too."""
    qt = torch_quant(quantize(rng.standard_normal((tm._GROUPED_MIN_ROWS, 128)).astype(np.float32), 4, 64))
    x = dev(unit_rows(rng, tm._MATVEC_MAX_TOKENS + 1, 128))
    np.testing.assert_array_equal(host(tm.qmatvec(x, qt, int8=True)), host(tm.qmatvec(x, qt)))
    np.testing.assert_array_equal(host(tm.dense_gate_up(x, qt, qt, int8=True)), host(tm.dense_gate_up(x, qt, qt)))
    assert not np.allclose(host(tm.qmatvec(x[:1], qt, int8=True)), host(tm.qmatvec(x[:1], qt)), rtol=1e-6)


def test_int8_input_follows_the_tensor_it_came_with(rng: np.random.Generator) -> None:
    """The input rows are cached on the tensor, a format beside another, and made again once it changes
    in place."""
    x = dev(unit_rows(rng, 1, 128))
    first = ti.int8_input(x, 4, 64)
    assert ti.int8_input(x, 4, 64) is first
    x.mul_(2.0)
    again = ti.int8_input(x, 4, 64)
    assert again is not first
    _, dx0, _ = read_input(first[0], 128, 4, 64)
    _, dx1, _ = read_input(again[0], 128, 4, 64)
    np.testing.assert_allclose(dx1, 2 * dx0, rtol=1e-6)
    two = ti.int8_input(x, 2, 64)
    assert two is not again  # another bit width lays the lanes out otherwise
    # ... and is kept beside the first: neither is made again (a router's 8-bit rows had replaced a
    # norm's 4-bit ones, so the experts after it made theirs again)
    assert ti.int8_input(x, 4, 64) is again and ti.int8_input(x, 2, 64) is two
    assert ti.handed_over(x) == {(4, 64): again, (2, 64): two}
    x.add_(1.0)
    assert ti.handed_over(x) == {} and ti.int8_input(x, 2, 64) is not two


def test_dp4a_on_the_device_is_the_interpreters_sum() -> None:
    """The kernels' ``dp4a`` (one PTX instruction on a GPU, a sum of bytes in the interpreter) on
    bytes at their extremes: unsigned a (0..255), signed b (-128..127)."""
    import triton
    import triton.language as tl

    @triton.jit
    def kernel(a, b, c, out, ASM: tl.constexpr):
        i = tl.arange(0, 256)
        tl.store(out + i, triton_steps.dp4a(tl.load(a + i), tl.load(b + i), tl.load(c + i), ASM))

    rng = np.random.default_rng(7)
    ab = rng.integers(0, 256, (256, 4), dtype=np.uint8)
    ab[:4] = [[0, 255, 128, 127]] * 4
    bb = rng.integers(-128, 128, (256, 4), dtype=np.int8)
    bb[:4] = [[-128, 127, -1, 0], [127, -128, 0, -1], [-128, -128, -128, -128], [127, 127, 127, 127]]
    c = rng.integers(-(2**20), 2**20, 256, dtype=np.int32)
    out = torch.empty(256, dtype=torch.int32, device=DEVICE)
    kernel[(1,)](dev(ab.view(np.int32).reshape(-1)), dev(bb.view(np.int32).reshape(-1)), dev(c), out,
                 DEVICE.type == "cuda")  # fmt: skip
    want = c.astype(np.int64) + (ab.astype(np.int64) * bb.astype(np.int64)).sum(1)
    np.testing.assert_array_equal(host(out), want)


def _experts(rng: np.random.Generator, n: int, hidden: int, inter: int, bits: int, gs: int) -> tuple[Any, list, Any]:
    """``n`` random experts: their layout's kernel offsets, their matrices, and a device slab of them."""
    layout = expert_layout(hidden, inter, bits, gs)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    mats = [
        {p: quantize(rng.standard_normal(sh).astype(np.float32), bits, gs) for p, sh in shapes.items()}
        for _ in range(n)
    ]
    slab = dev(np.stack([np.frombuffer(layout.encode(e), np.uint8) for e in mats]))
    return tm.ExpertOffsets.from_layout(layout), mats, slab


def _near(got: np.ndarray, want: np.ndarray) -> None:
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(("bits", "gs"), [(4, 64), (2, 32), (8, 32)])
def test_int8_expert_kernels_compute_their_rounding(bits: int, gs: int, rng: np.random.Generator) -> None:
    """gate+up (SwiGLU fused) and down+combine on int8 inputs, with the shared expert as one more pair
    and an expert computed elsewhere (slot -1), against float64 emulations of the inputs' rounding."""
    hidden, inter, k, tokens = 192, 128, 3, 2
    offsets, mats, slab = _experts(rng, 4, hidden, inter, bits, gs)
    shared = {p: quantize(rng.standard_normal(sh).astype(np.float32), bits, gs)
              for p, sh in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}  # fmt: skip
    slots = np.array([[2, -1, 0], [3, 1, 2]])
    x = dev(unit_rows(rng, tokens, hidden))
    pair = (torch_quant(shared["gate"]), torch_quant(shared["up"]))
    h = host(tm.experts_gate_up(slab, offsets, dev(slots.reshape(-1)), x, k, shared=pair, int8=True))
    rows = ti.int8_input(x, bits, gs)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    for p in range(tokens * k + tokens):
        t = p // k if p < tokens * k else p - tokens * k
        xq = read_input(rows[t], hidden, bits, gs)
        gate, up = (
            (mats[slots.flat[p]]["gate_proj"], mats[slots.flat[p]]["up_proj"]) if p < tokens * k
            else (shared["gate"], shared["up"])
        )  # fmt: skip
        if p < tokens * k and slots.flat[p] < 0:
            assert (h[p] == 0).all()  # computed elsewhere: adds nothing
            continue
        _near(h[p], silu(emulation(gate, *xq)) * emulation(up, *xq))

    hin = dev(unit_rows(rng, tokens * k + tokens, inter))
    weights, logits = rng.uniform(0.1, 1, (tokens, k)).astype(np.float32), rng.standard_normal((tokens, 1))
    y = host(tm.experts_down_combine(slab, offsets, dev(slots), hin, dev(weights), dev(logits.astype(np.float32)),
                                     shared_down=torch_quant(shared["down"]), int8=True))  # fmt: skip
    hrows = ti.int8_input(hin, bits, gs)
    for t in range(tokens):
        want = emulation(shared["down"], *read_input(hrows[tokens * k + t], inter, bits, gs)) / (1 + np.exp(-logits[t]))
        for j in range(k):
            if slots[t, j] >= 0:
                want += weights[t, j] * emulation(
                    mats[slots[t, j]]["down_proj"], *read_input(hrows[t * k + j], inter, bits, gs)
                )
        _near(y[t], want)


def test_the_torch_backend_with_int8_runs_the_int8_kernels(rng: np.random.Generator) -> None:
    """``TorchBackend(int8=True)``: decode-sized linears, a layer's projections and the dense SwiGLU on
    the int8 kernels; without the Triton kernels a one-line error."""
    from fmoe.errors import FmoeError
    from fmoe.runtime.backends.torch_backend import TorchBackend

    be = TorchBackend(DEVICE.type, kernels="triton", int8=True)
    ws = [torch_quant(quantize(rng.standard_normal((r, 128)).astype(np.float32), 4, 64)) for r in (40, 64, 64)]
    x = dev(unit_rows(rng, 1, 128))
    np.testing.assert_array_equal(host(be.linear(x, ws[0])), host(tm.qmatvec(x, ws[0], int8=True)))
    for got, want in zip(be.linears(x, ws), tm.qmatvecs(x, ws, int8=True), strict=True):
        np.testing.assert_array_equal(host(got), host(want))
    gate, up, down = ws[1], ws[2], torch_quant(quantize(rng.standard_normal((128, 64)).astype(np.float32), 4, 64))
    h = tm.dense_gate_up(x, gate, up, int8=True)
    np.testing.assert_array_equal(host(be.swiglu(x, gate, up, down)), host(tm.qmatvec(h, down, int8=True)))
    assert not np.allclose(host(h), host(tm.dense_gate_up(x, gate, up)), rtol=1e-6)
    with pytest.raises(FmoeError, match=r"--int8-dot: .*Triton kernels"):
        TorchBackend("cpu", kernels="torch", int8=True)


@pytest.mark.skipif(DEVICE.type != "cuda", reason="minutes under Triton's interpreter; the kernels' tests run there")
def test_int8_decode_on_the_torch_backend_moves_logits_by_the_rounding_only(tmp_path: Path) -> None:
    """The whole model with ``int8`` on the torch backend's Triton kernels, every expert resident, a
    prompt of three tokens (decode-sized, so every matvec takes the int8 kernels): the logits differ
    from the float kernels' (the int8 path ran) by what rounding activations to int8 does to this
    random model: about 10% of their norm (the cpu backend's int8 path moves them 9.4%, the torch
    one 11.2%, measured under the interpreter); a wrong lane, group or slot moves them by their size."""
    import fmoe
    from fmoe.runtime.diagnostics import build_packed

    packed = build_packed(tmp_path, seed=5)[1]
    logits = {}
    for int8 in (False, True):
        options = {"kernels": "triton", "int8": int8}
        with fmoe.load(packed, backend="torch", device=DEVICE.type, backend_options=options,
                       device_cache_bytes=1 << 40) as engine:  # fmt: skip
            logits[int8] = engine.logits(engine.tokenizer.encode("int8 dot products")[:3])
    rel = np.linalg.norm(logits[True] - logits[False]) / np.linalg.norm(logits[False])
    assert 1e-6 < rel < 0.25, rel


@pytest.mark.parametrize(("bits", "gs"), [(4, 64), (2, 32)])
def test_the_norms_hand_over_the_int8_rows(bits: int, gs: int, rng: np.random.Generator) -> None:
    """``int8=True`` on the three ops that hand their result over as the matvecs' input (the residual
    norm, the attention's output gate, the DeltaNet's gated norm): the launch writes the int8 rows,
    bit for bit what :func:`triton_int8.int8_input` makes of the result, and the int8 matvecs take
    them without a launch of their own; the result itself is the float path's."""
    t, heads, d = 2, 3, 64
    n = heads * d
    x, res, gate = (dev(unit_rows(rng, t, n)) for _ in range(3))
    w, wd = dev(rng.uniform(0.5, 1.5, n).astype(np.float32)), dev(rng.uniform(0.5, 1.5, d).astype(np.float32))
    made = {
        "rms_norm": lambda int8: tm.rms_norm_prepared(x, w, 1e-6, bits, gs, residual=res, int8=int8)[1],
        "sigmoid_gate": lambda int8: tm.sigmoid_gate_prepared(x, gate, bits, gs, int8=int8),
        "gated_rms_norm": lambda int8: tm.gated_rms_norm_prepared(x.view(t, heads, d), wd, gate, 1e-6, bits, gs, int8),
    }
    for name, op in made.items():
        out = op(True)
        np.testing.assert_array_equal(host(out), host(op(False)), err_msg=name)
        handed = ti.int8_input(out, bits, gs)  # the attached rows: no launch
        used = n // 4 + 2 * (n // gs)  # the lanes, steps and sums; the rest pads the row to 16 bytes
        want = ti.int8_input(out.clone(), bits, gs)
        np.testing.assert_array_equal(host(handed)[:, :used], host(want)[:, :used], err_msg=name)
        assert ti.int8_input(out, bits, gs) is handed


@pytest.mark.parametrize(("bits", "gs", "tokens"), [(4, 64, 1), (2, 32, 3), (4, 64, 5)])
def test_delta_rule_int8_is_the_recurrence_then_the_gated_norm_handing_over(
    bits: int, gs: int, tokens: int, rng: np.random.Generator
) -> None:
    """The DeltaNet's recurrence, gated norm and the output projection's int8 rows in one launch (a
    program a head, writing its head's one or two groups of the row): the result and the state are
    the two launches' (``delta_rule``, then ``gated_rms_norm_prepared``), the handed rows bit for bit
    what :func:`triton_int8.int8_input` makes of the result. 5 tokens, above the matvecs' 4: the two
    launches themselves."""
    hk, dk, hv, dv = 2, 16, 4, 64
    heads = (hk, dk, hv, dv)
    shapes = ((tokens, 2 * hk * dk + hv * dv), (tokens, hv), (tokens, hv), (tokens, hv * dv))
    qkv, a, b, z = (dev(rng.standard_normal(shape).astype(np.float32)) for shape in shapes)
    a_log, dt_bias = (
        dev(np.log(rng.uniform(1, 16, hv)).astype(np.float32)),
        dev(rng.standard_normal(hv).astype(np.float32)),
    )
    w = dev(rng.uniform(0.5, 1.5, dv).astype(np.float32))
    s0 = rng.standard_normal((hv, dk, dv)).astype(np.float32)
    fused_state, two_state = dev(s0.copy()), dev(s0.copy())
    fused = tm.delta_rule_int8(qkv, a, b, a_log, dt_bias, heads, fused_state, z, w, 1e-6, bits, gs)
    o = tm.triton_ops.delta_rule(qkv, a, b, a_log, dt_bias, heads, two_state)
    two = tm.gated_rms_norm_prepared(o, w, z, 1e-6, bits, gs, int8=True)
    np.testing.assert_allclose(host(fused), host(two), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(host(fused_state), host(two_state), rtol=1e-5, atol=1e-6)
    handed = ti.int8_input(fused, bits, gs)
    if tokens <= 4:
        used = hv * dv // 4 + 2 * (hv * dv // gs)
        np.testing.assert_array_equal(host(handed)[:, :used], host(ti.int8_input(fused.clone(), bits, gs))[:, :used])
        assert ti.int8_input(fused, bits, gs) is handed


@pytest.mark.parametrize(("bits", "gs"), [(4, 64), (2, 32)])
def test_int8_experts_grouped_matches_the_int8_decode_kernels(bits: int, gs: int, rng: np.random.Generator) -> None:
    """The routed experts of a prefill on int8 tensor cores (skewed routing: a slot with several tiles,
    one pair computed elsewhere) against the decode kernels' int8 path, itself checked against
    float64 above: the two round x alike (checked: the GEMM's rows in column order against the
    matvecs' lanes), while h, computed in another order, can land on the other side of a rounding
    tie, so two steps of one h activation are allowed beside 1e-5. 8-bit codes do not fit an int8:
    the float GEMM."""
    hidden, inter, k, tokens = 128, 64, 3, 6
    offsets, mats, slab = _experts(rng, 4, hidden, inter, bits, gs)
    slots = rng.choice(4, (tokens, k), p=[0.6, 0.2, 0.2, 0.0])
    slots[0, 1] = -1  # computed elsewhere: adds nothing
    x = dev(unit_rows(rng, tokens, hidden))
    rows = ti.int8_input(x, bits, gs)
    xq8, xf = (host(a) for a in tm._grouped_input(x, gs, gs, int8=True))
    for t in range(tokens):
        xq, dx, sums = read_input(rows[t], hidden, bits, gs)
        np.testing.assert_array_equal(xq8[t], xq)  # one rounding for both
        np.testing.assert_array_equal(xf[t, : hidden // gs], dx)
        np.testing.assert_allclose(xf[t, hidden // gs :], sums, rtol=1e-5, atol=1e-5 * np.abs(sums).max())
    weights, shared = rng.uniform(0.1, 1, (tokens, k)).astype(np.float32), rng.standard_normal((tokens, hidden))
    wd, sd = dev(weights), dev(shared.astype(np.float32))
    got = host(tm.experts_grouped(slab, offsets, dev(slots), x, wd, sd, int8=True))
    h = tm.experts_gate_up(slab, offsets, dev(slots.reshape(-1)), x, k, int8=True)
    want = host(tm.experts_down_combine(slab, offsets, dev(slots), h, wd, sd, int8=True))
    hrows = ti.int8_input(h, bits, gs)
    dx_h = max(read_input(hrows[p], inter, bits, gs)[1].max() for p in range(tokens * k))  # h's largest step
    step = max(np.abs(unpack(m["down_proj"].weight, bits) * bf16_to_f32(m["down_proj"].scales).repeat(gs, 1)).max()
               for m in mats) * dx_h * weights.max()  # fmt: skip
    assert np.isfinite(got).all()
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max() + 2 * step
    assert not np.allclose(got, host(tm.experts_grouped(slab, offsets, dev(slots), x, wd, sd)), rtol=1e-6)
    assert not tm._grouped_int8(True, 8, gs)  # 8-bit codes: the float GEMM
