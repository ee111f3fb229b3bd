"""CPU kernels (numba) and their numpy reference against float64 computations on fresh random inputs
(the ``rng`` fixture of tests/conftest.py: a new seed each run, printed on failure)."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from support import assert_cli_error, exact_terms, expert_config

from fmoe.formats.quant import QuantTensor, bf16_to_f32, quantize, unpack
from fmoe.runtime.kernels import cpu, reference

EPS32 = float(np.finfo(np.float32).eps)
_NEEDS_INT8 = pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")


@pytest.fixture(scope="module", autouse=True)
def _compiled() -> None:
    cpu.warmup()  # JIT (or cache load) once, outside the individual tests


def check_against_float64(y: np.ndarray, x: np.ndarray, qt: QuantTensor) -> None:
    """Every output within a float32-accumulation bound of the float64 result: the rounding error of
    a blocked float32 sum of n products grows like eps * sqrt(n) times the sum of the terms'
    magnitudes. The CPU row dots sum folded terms (``x0 b + (x1 - 16 x0) floor(b / 16)``, cpu._dot4)
    up to 2^bits times larger than the codes' own, so their error is larger: measured below
    0.22 eps * sqrt(n) at 2 bits, 0.07 at 4, 0.02 at 8; the bound is 4 eps * sqrt(n). One wrong code
    in a row of n is off by about 1/n of that sum, a wrong phase, scale or bias by O(1)."""
    w64, mag = exact_terms(qt)
    x64 = np.atleast_2d(x).astype(np.float64)
    y64 = x64 @ w64.T
    scale = np.abs(x64) @ mag.T
    y2 = np.atleast_2d(y)
    assert y.dtype == np.float32 and y2.shape == y64.shape
    rel = np.abs(y2 - y64) / scale
    assert rel.max() < 4 * EPS32 * np.sqrt(x64.shape[1]), rel.max()


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("n_out", "n_in"), [(37, 128), (1001, 256), (66, 1024)])
@pytest.mark.parametrize("tokens", [1, 3, 17])
def test_qmatmul_matches_float64(bits: int, n_out: int, n_in: int, tokens: int, rng: np.random.Generator) -> None:
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.1, 3, (n_out, 1)).astype(np.float32)
    qt = quantize(w, bits)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    xin = x[0] if tokens == 1 else x
    y = cpu.qmatmul(xin, qt)
    assert y.shape == ((n_out,) if tokens == 1 else (tokens, n_out))
    check_against_float64(y, xin, qt)
    check_against_float64(reference.qmatmul(xin, qt), xin, qt)


@pytest.mark.parametrize(("bits", "group_size"), [(4, 32), (4, 128), (2, 32), (2, 128), (8, 32)])
def test_qmatmul_other_group_sizes(bits: int, group_size: int, rng: np.random.Generator) -> None:
    qt = quantize(rng.standard_normal((45, 512)).astype(np.float32), bits, group_size)
    for tokens in (1, 5):
        x = rng.standard_normal((tokens, 512)).astype(np.float32)
        check_against_float64(cpu.qmatmul(x, qt), x, qt)


def test_qmatmul_batched_equals_per_token_and_accepts_readonly(rng: np.random.Generator) -> None:
    qt = quantize(rng.standard_normal((99, 192)).astype(np.float32), 4)
    x = rng.standard_normal((6, 192)).astype(np.float32)
    frozen = [a.copy() for a in (qt.weight, qt.scales, qt.biases)]
    for a in frozen:
        a.flags.writeable = False
    ro = QuantTensor(*frozen, bits=4, group_size=qt.group_size)
    batched = cpu.qmatmul(x, ro)
    np.testing.assert_array_equal(batched, cpu.qmatmul(x, qt))
    per_token = np.stack([cpu.qmatmul(x[t], qt) for t in range(6)])
    np.testing.assert_allclose(batched, per_token, rtol=1e-5, atol=1e-5 * np.abs(per_token).max())
    # non-contiguous and float64 x are accepted (converted), empty batches too
    np.testing.assert_allclose(cpu.qmatmul(x.astype(np.float64)[::2], qt), batched[::2], rtol=1e-6, atol=1e-5)
    assert cpu.qmatmul(np.zeros((0, 192), np.float32), qt).shape == (0, 99)


def test_qmatmul_propagates_nan(rng: np.random.Generator) -> None:
    qt = quantize(rng.standard_normal((20, 128)).astype(np.float32), 4)
    x = rng.standard_normal((2, 128)).astype(np.float32)
    x[1, 77] = np.nan
    y = cpu.qmatmul(x, qt)
    assert np.isfinite(y[0]).all() and np.isnan(y[1]).all()
    assert np.isnan(cpu.qmatmul(x[1], qt)).all()


def test_qmatmul_rejects_bad_shapes(rng: np.random.Generator) -> None:
    qt = quantize(rng.standard_normal((8, 128)).astype(np.float32), 4)
    with pytest.raises(ValueError, match="x has shape"):
        cpu.qmatmul(np.zeros(64, np.float32), qt)
    stacked = QuantTensor(qt.weight[None], qt.scales[None], qt.biases[None], 4)
    with pytest.raises(ValueError, match="2-D"):
        cpu.qmatmul(np.zeros(128, np.float32), stacked)


@pytest.mark.parametrize("impl", [cpu.swiglu_expert, reference.swiglu_expert], ids=["numba", "numpy"])
@pytest.mark.parametrize("bits", [4, 2])
@pytest.mark.parametrize("tokens", [1, 3])
def test_swiglu_expert_matches_float64(impl, bits: int, tokens: int, rng: np.random.Generator) -> None:
    hidden, inter = 256, 192
    gate, up = (quantize(rng.standard_normal((inter, hidden)).astype(np.float32), bits) for _ in range(2))
    down = quantize(rng.standard_normal((hidden, inter)).astype(np.float32) * 0.1, bits)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    xin = x[0] if tokens == 1 else x
    y = impl(xin, gate, up, down)
    assert y.dtype == np.float32 and y.shape == xin.shape
    x64 = x.astype(np.float64)
    g64, u64 = x64 @ exact_terms(gate)[0].T, x64 @ exact_terms(up)[0].T
    y64 = (g64 / (1 + np.exp(-g64)) * u64) @ exact_terms(down)[0].T
    # three chained fp32 matmuls of length <= 256. The one-token path adds scale * (codes . x) and
    # bias * sum(x) per group, two large float32 terms that nearly cancel: worst over 3000 random
    # draws 1.9e-5 of the largest output at 2 bits, 6.5e-6 at 4 (3e-7 on the several-token path)
    np.testing.assert_allclose(np.atleast_2d(y), y64, rtol=0, atol=5e-5 * np.abs(y64).max())


# ---- gated delta rule ---------------------------------------------------------------------------
def delta_rule_float64(q, k, v, g, beta, state):
    """The recurrence, one value head and one step at a time, in float64 (state copied, not touched)."""
    T, Hk, _ = k.shape
    Hv = v.shape[1]
    S = state.astype(np.float64)
    o = np.zeros(v.shape, np.float64)
    for h in range(Hv):
        kh = h // (Hv // Hk)
        for t in range(T):
            qt, kt, vt = (a[t, idx].astype(np.float64) for a, idx in ((q, kh), (k, kh), (v, h)))
            S[h] *= np.exp(np.float64(g[t, h]))
            kv = S[h].T @ kt
            S[h] += np.outer(kt, (vt - kv) * np.float64(beta[t, h]))
            o[t, h] = S[h].T @ qt
    return o, S


def delta_inputs(rng, T, Hv, Hk, Dk=16, Dv=24):
    """Normalised q/k (q scaled), random v, log-decays g <= 0, beta in (0, 1), a non-zero state."""
    q = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    k = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    q = (q / np.linalg.norm(q, axis=-1, keepdims=True) * Dk**-0.5).astype(np.float32)
    k = (k / np.linalg.norm(k, axis=-1, keepdims=True)).astype(np.float32)
    v = rng.standard_normal((T, Hv, Dv)).astype(np.float32)
    g = -rng.uniform(0, 2, (T, Hv)).astype(np.float32)
    beta = rng.uniform(0, 1, (T, Hv)).astype(np.float32)
    state = rng.standard_normal((Hv, Dk, Dv)).astype(np.float32) * 0.5
    return q, k, v, g, beta, state


@pytest.mark.parametrize("impl", [cpu.gated_delta_rule, reference.gated_delta_rule], ids=["numba", "numpy"])
@pytest.mark.parametrize(("Hv", "Hk"), [(3, 3), (8, 2)])
@pytest.mark.parametrize("T", [1, 5])
def test_delta_rule_matches_float64(impl, Hv: int, Hk: int, T: int, rng: np.random.Generator) -> None:
    q, k, v, g, beta, state = delta_inputs(rng, T, Hv, Hk)
    o64, s64 = delta_rule_float64(q, k, v, g, beta, state)
    s = state.copy()
    o = impl(q, k, v, g, beta, s)
    assert o.dtype == np.float32 and o.shape == v.shape
    # fp32 steps of length-16/24 dot products on O(1) values (decays <= 1 keep it stable): measured
    # about 1 eps of the largest value; a wrong head mapping, decay or order of updates is O(1) off.
    np.testing.assert_allclose(o, o64, rtol=0, atol=16 * EPS32 * np.abs(o64).max())
    np.testing.assert_allclose(s, s64, rtol=0, atol=16 * EPS32 * np.abs(s64).max())


def test_delta_rule_state_carry(rng: np.random.Generator) -> None:
    """T steps in one call == the same steps one call at a time, the state carried in place."""
    q, k, v, g, beta, state = delta_inputs(rng, 5, 8, 2)
    s_all, s_one = state.copy(), state.copy()
    o_all = cpu.gated_delta_rule(q, k, v, g, beta, s_all)
    o_one = np.concatenate(
        [
            cpu.gated_delta_rule(q[t : t + 1], k[t : t + 1], v[t : t + 1], g[t : t + 1], beta[t : t + 1], s_one)
            for t in range(5)
        ]
    )
    np.testing.assert_allclose(o_all, o_one, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(s_all, s_one, rtol=1e-6, atol=1e-7)
    assert not np.allclose(s_all, state)  # the state did move


def test_delta_rule_rejects_bad_state(rng: np.random.Generator) -> None:
    q, k, v, g, beta, state = delta_inputs(rng, 2, 4, 2)
    with pytest.raises(ValueError, match="state"):
        cpu.gated_delta_rule(q, k, v, g, beta, state.astype(np.float64))
    with pytest.raises(ValueError, match="do not fit"):
        cpu.gated_delta_rule(q, k, v, g, beta, state[:, :, :-1].copy())


def test_delta_net_names_the_array_that_does_not_fit(rng: np.random.Generator) -> None:
    """The fused pass (checked against float64 in tests/test_backend_ops.py) refuses what it cannot take."""
    hk, dk, hv, dv = 1, 4, 2, 4
    qkv, ab, z = (
        np.zeros((1, 2 * hk * dk + hv * dv), np.float32),
        np.zeros((1, hv), np.float32),
        np.zeros((1, 8), np.float32),
    )
    vec, norm, state = np.zeros(hv, np.float32), np.ones(dv, np.float32), np.zeros((hv, dk, dv), np.float32)
    with pytest.raises(ValueError, match="norm has shape"):
        cpu.delta_net(qkv, ab, ab, z, vec, vec, norm[:-1], 1e-6, (hk, dk, hv, dv), state)
    with pytest.raises(ValueError, match="state must be"):
        cpu.delta_net(qkv, ab, ab, z, vec, vec, norm, 1e-6, (hk, dk, hv, dv), state.astype(np.float64))
    out = cpu.delta_net(qkv, ab, ab, z, vec, vec, norm, 1e-6, (hk, dk, hv, dv), state)
    assert out.shape == (1, hv * dv) and not out.any()  # a zero input gives zero, and the state stays zero
    assert not state.any()


@pytest.mark.reference
def test_delta_rule_matches_transformers(rng: np.random.Generator) -> None:
    """Same semantics as transformers' recurrent delta rule (which l2-normalises and scales q itself)."""
    torch = pytest.importorskip("torch")
    mod = pytest.importorskip("transformers.models.qwen3_5_moe.modeling_qwen3_5_moe")
    T, Hv, Hk, Dk, Dv = 4, 8, 2, 16, 24
    q_raw = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    k_raw = rng.standard_normal((T, Hk, Dk)).astype(np.float32)
    _, _, v, g, beta, state = delta_inputs(rng, T, Hv, Hk, Dk, Dv)
    t = [torch.from_numpy(a)[None] for a in (q_raw, k_raw, v, g, beta, state)]
    o_ref, s_ref = mod.torch_recurrent_gated_delta_rule(
        *t[:5], initial_state=t[5], output_final_state=True, use_qk_l2norm_in_kernel=True
    )

    def l2norm(a):  # the same formula as the model's (eps inside the rsqrt)
        return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)

    s = state.copy()
    o = cpu.gated_delta_rule(l2norm(q_raw) * np.float32(Dk**-0.5), l2norm(k_raw), v, g, beta, s)
    np.testing.assert_allclose(o, o_ref[0].numpy(), rtol=0, atol=1e-5 * float(o_ref.abs().max()))
    np.testing.assert_allclose(s, s_ref[0].numpy(), rtol=0, atol=1e-5 * float(s_ref.abs().max()))


# ---- benchmark command --------------------------------------------------------------------------
def test_bench_kernels_command() -> None:
    from typer.testing import CliRunner

    from fmoe.cli import app

    result = CliRunner().invoke(app, ["bench", "kernels", "--preset", "tiny", "--repeat", "1", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    kinds = {(r["kernel"], r["bits"], r["tokens"]) for r in data["rows"]}
    assert {("qmatmul", b, 1) for b in ("2", "4", "8")} <= kinds
    assert ("qmatmul", "4", 16) in kinds and ("gated_delta_rule", "fp32", 1) in kinds
    assert all(r["numba_ms"] > 0 and r["numpy_ms"] > 0 for r in data["rows"])
    # the integer-dot kernels are timed beside the float ones exactly where they apply
    int8_rows = {(r["kernel"], r["bits"], r["tokens"]) for r in data["rows"] if r["int8_ms"] is not None}
    # (4 bits, and the routed experts' 2-bit rows)
    want = {k for k in kinds if k[1] == "4" or k[:2] == ("experts_swiglu", "2")} if cpu._int8_ok(True, 4, 64) else set()
    assert int8_rows == want and data["int8_isa"] == cpu.int8dot.ISA
    assert all(r["int8_gbps"] > 0 for r in data["rows"] if r["int8_ms"] is not None)

    table = CliRunner().invoke(app, ["bench", "kernels", "--preset", "tiny", "--repeat", "1", "--threads", "1"])
    assert table.exit_code == 0 and "numba" in table.stdout

    bad = CliRunner().invoke(app, ["bench", "kernels", "--repeat", "0"])
    assert bad.exit_code == 1 and "--repeat" in bad.output and "Traceback" not in bad.output
    assert_cli_error(bad, "--repeat")


@pytest.mark.parametrize("impl", [cpu, reference], ids=["numba", "numpy"])
@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("pairs", [7, 41])  # 41 over 5 experts: groups of 4 tokens and leftovers (prefill)
def test_experts_swiglu_over_a_slab_matches_float64(impl, bits: int, pairs: int, rng: np.random.Generator) -> None:
    """Every (expert, token) pair in one call, each expert read from its slot of a slab of expert
    files; equal to the float64 SwiGLU of that expert, and to the one-expert kernel within float32
    rounding (the same sums, but LLVM may vectorise the two kernels' loops differently)."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab

    hid, inter, n = 256, 128, 5
    shapes = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    experts = [
        {p: quantize((rng.standard_normal(sh) / np.sqrt(sh[1])).astype(np.float32), bits) for p, sh in shapes.items()}
        for _ in range(n)
    ]

    cfg = expert_config(hid, inter, n)
    layout = ExpertLayout.for_config(cfg, bits)
    slab = HostSlab(layout, n)
    for s, w in enumerate(experts):
        slab.data[s] = np.frombuffer(layout.encode(w), np.uint8)
    slots = rng.integers(0, n, pairs)  # repeats allowed: two tokens of one expert are two pairs
    x = rng.standard_normal((pairs, hid)).astype(np.float32)
    y = impl.experts_swiglu(slab.data, layout, slots, x)
    for p, s in enumerate(slots):
        w = experts[s]
        g64, _ = exact_terms(w["gate_proj"])
        u64, _ = exact_terms(w["up_proj"])
        d64, dmag = exact_terms(w["down_proj"])
        a, b = g64 @ x[p].astype(np.float64), u64 @ x[p].astype(np.float64)
        h = a / (1 + np.exp(-a)) * b
        want = d64 @ h
        scale = dmag @ np.abs(h) + np.abs(want)
        assert (np.abs(y[p] - want) / scale).max() < 1e-5
        one = impl.swiglu_expert(x[p], w["gate_proj"], w["up_proj"], w["down_proj"])
        # the same sums in another order: each within check_against_float64's 4 eps sqrt(n) of the
        # exact one, so at most twice that apart (seen: up to 9 eps at 2 bits, folded terms)
        assert (np.abs(y[p] - one) / scale).max() < 8 * EPS32 * np.sqrt(hid)
    first = np.isin(slots, [0, 2])  # the experts in two calls, as two parts of the store: the same bits
    for sel in (np.flatnonzero(first), np.flatnonzero(~first)):
        assert np.array_equal(impl.experts_swiglu(slab.data, layout, slots[sel], x[sel]), y[sel])
    with pytest.raises(ValueError, match="slot out of range"):
        cpu.experts_swiglu(slab.data, layout, np.array([n]), x[:1])


def test_bandwidth_probe_reads_every_word(rng: np.random.Generator) -> None:
    """The probe's sum covers the whole buffer (a probe that skipped data would report too high a ceiling)."""
    from fmoe.runtime.kernels.membw import _read_sum

    for n in (1, 255, 257, 100_003):
        words = rng.integers(0, 2**40, n, dtype=np.uint64)
        assert int(_read_sum(words)) == sum(int(w) for w in words)


# ---- integer dot products (int8 activations, AVX512-VNNI or AVX2) --------------------------------------------
def _int8_emulation(x: np.ndarray, qt: QuantTensor) -> np.ndarray:
    """What the int8 kernels compute, in float64, from the kernels' own int8 rounding of ``x``
    (checked on its own by :func:`_check_int8_rounding`): per 64-column group ``scale * d * sum(q *
    xq) + bias * sum(x)``. Their rounding, not numpy's: an activation within float32 rounding of
    halfway between two steps may go either way within the rounding's contract (the kernels round
    ``x * (1 / d)``; in CI one went 70.5 -> 71, when the step itself still depended on compile order)."""
    n = x.shape[0]
    x0, x1, d, _ = cpu.int8dot.quantize_activations(np.ascontiguousarray(x, dtype=np.float32).reshape(1, -1), qt.bits)
    _check_int8_rounding(x, x0[0], x1[0], d[0], qt.bits)
    xq = _interleaved(x0[0], x1[0], qt.bits).reshape(-1, 64)
    xg = x.reshape(-1, 64).astype(np.float64)
    q = unpack(qt.weight, qt.bits).astype(np.float64).reshape(qt.shape[0], -1, 64)
    s, b = bf16_to_f32(qt.scales).astype(np.float64), bf16_to_f32(qt.biases).astype(np.float64)
    dots = np.einsum("rgj,gj->rg", q, xq)
    return (s * d[0].astype(np.float64)[None, :] * dots + b * xg.sum(1)[None, :]).sum(1).reshape(-1)[: qt.shape[0]] * (
        n > 0
    )


def _interleaved(x0: np.ndarray, x1: np.ndarray, bits: int = 4) -> np.ndarray:
    """The int8 activations in column order, float64, from the kernels' halves: even and odd columns
    (4 bits), or a group's columns 4i, 4i+1 and 4i+2, 4i+3 (2 bits)."""
    xq = np.empty(2 * x0.shape[0], np.float64)
    if bits == 4:
        xq[0::2], xq[1::2] = x0, x1
        return xq
    g = xq.reshape(-1, 16, 4)  # [group, i, phase]
    for half, (a, b) in ((x0, (0, 1)), (x1, (2, 3))):
        h = half.reshape(-1, 2, 16)
        g[:, :, a], g[:, :, b] = h[:, 0], h[:, 1]
    return xq


def _check_int8_rounding(x: np.ndarray, x0: np.ndarray, x1: np.ndarray, d: np.ndarray, bits: int = 4) -> None:
    """The int8 rounding's contract per 64-column group: step ``d = amax * float32(1 / 127)`` exactly, every
    activation within half a step of ``xq * d`` (a tie either way), ``|xq| <= 127``; plus a few
    float32 ulps of ``x``, as the kernel rounds the float32 product ``x * (1 / d)``, not ``x / d``."""
    xg = x.reshape(-1, 64).astype(np.float32)
    want = (np.abs(xg).max(1) * np.float32(1.0 / 127.0)).astype(np.float32)
    assert np.array_equal(d, want)
    xq = _interleaved(x0, x1, bits).reshape(-1, 64)
    assert np.abs(xq).max(initial=0) <= 127
    step = d.astype(np.float64)[:, None]
    assert (np.abs(xq * step - xg) <= step * 0.5 + np.abs(xg) * 2.0**-20).all()


def test_int8_rounding_is_the_same_whichever_kernel_compiles_it_first(rng: np.random.Generator) -> None:
    """numba compiles a function that leaves fastmath unset with its first caller's flags, once per array
    type; under fast math ``1 / (amax / 127)`` became ``127 / amax``, and a few activations in a million
    rounded the other way (CI: a GEMM 0.77 off its emulation). Here a fast-math caller compiles the
    rounding first for a strided array type no other call takes; it must round as the contiguous
    version does, bit for bit. Ten million activations: the old code differed in about 15."""
    from numba import njit

    @njit(fastmath=True)
    def through_fast_math(x: np.ndarray) -> tuple:
        return cpu.int8dot.quantize_activations(x)

    rows = 16_384
    x = (rng.standard_normal((rows, 640)) * rng.uniform(0.1, 10, (rows, 1))).astype(np.float32)
    strided = np.empty((2 * rows, 640), np.float32)
    strided[::2] = x
    for got, want in zip(through_fast_math(strided[::2]), cpu.int8dot.quantize_activations(x), strict=True):
        assert np.array_equal(got, want)
    x0, x1, d, _ = cpu.int8dot.quantize_activations(x[:64])
    for row in range(64):
        _check_int8_rounding(x[row], x0[row], x1[row], d[row])


@pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
@pytest.mark.parametrize(("n_out", "n_in"), [(37, 128), (1001, 512), (51, 192), (18, 640)])  # 192: odd groups
@pytest.mark.parametrize("tokens", [1, 5, 34])  # the GEMM's tiles: 4 tokens, then a tail of 1 or 2
def test_int8_matmul_computes_its_rounding_exactly_and_stays_in_its_bound(
    n_out: int, n_in: int, tokens: int, rng: np.random.Generator
) -> None:
    """Two checks per token: against a float64 emulation of the int8 rounding (so the integer path
    computes exactly that: float32 sums only, relative 1e-5), and against the exact product within
    the bound of that rounding: half a step, ``amax_g / 254``, per activation, times ``sum |w|`` of
    the group."""
    qt = quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), 4)
    xs = (rng.standard_normal((tokens, n_in)) * rng.uniform(0.1, 10, n_in)).astype(np.float32)  # unlike groups
    ys = np.atleast_2d(cpu.qmatmul(xs[0] if tokens == 1 else xs, qt, int8=True))
    if (n_in // 64) % 2 and tokens > cpu._INT8_MAX_TOKENS:  # no GEMM tiles for odd groups: the float path
        assert np.array_equal(ys, cpu.qmatmul(xs, qt))
        return
    for x, y in zip(xs, ys, strict=True):
        _check_int8_row_dots(y, x, qt)


def _check_int8_row_dots(y: np.ndarray, x: np.ndarray, qt: QuantTensor) -> None:
    """``y = W x`` on int8 activations: against the float64 emulation of its own rounding (float32
    sums only, relative 1e-5), within that rounding's bound of the exact product (half a step,
    ``amax_g / 254``, per activation, times ``sum |w|`` of the group, plus float32 sums), and not the
    float path's result."""
    emulated = _int8_emulation(x, qt)
    assert np.abs(y - emulated).max() <= 1e-5 * np.abs(emulated).max()
    w64, mag = exact_terms(qt)
    exact = w64 @ x.astype(np.float64)
    amax = np.abs(x.reshape(-1, 64)).max(1).astype(np.float64)
    bound = (np.abs(w64).reshape(qt.shape[0], -1, 64).sum(2) * amax[None, :] / 254).sum(1)
    bound += 4 * EPS32 * np.sqrt(x.shape[0]) * (mag @ np.abs(x.astype(np.float64)))
    assert (np.abs(y - exact) <= bound).all()
    assert not np.allclose(y, cpu.qmatmul(x, qt), rtol=1e-6)  # it is the int8 path, not the float one


def _h_rounding_slack(x: np.ndarray, w: dict[str, QuantTensor]) -> np.ndarray:
    """How far two int8 paths of one expert may honestly differ, per output: their ``h = silu(g) * u``
    may differ in its last bits (the order of the sums, numba's exp against numpy's), and
    an ``h`` within that of a half step of its group's int8 grid rounds differently in each (seen in
    CI: 0.9% of the output). Each such element may move the output by one step times its column of
    down's scaled codes (``scale * q``: the bias term takes the exact sum of ``h``); elsewhere the
    paths agree to float32 sums. The window, 1e-3 of a step, is about ten times the float32 error of
    ``h / step`` here; a wrong slot, row or group moves every output by far more."""
    g, u = (_int8_emulation(x, w[k]) for k in ("gate_proj", "up_proj"))
    h = (g / (1 + np.exp(-g)) * u).reshape(-1, 64)
    step = np.abs(h).max(1, keepdims=True) / 127
    near = (np.abs(np.abs(h / step) % 1 - 0.5) < 1e-3).reshape(-1)
    down = w["down_proj"]
    scaled = bf16_to_f32(down.scales).astype(np.float64).repeat(64, axis=1) * unpack(down.weight, 4)
    return np.abs(scaled[:, near]) @ np.broadcast_to(step, h.shape).reshape(-1)[near]


@pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
@pytest.mark.parametrize("n_in", [128, 192, 640])
def test_int8_two_bit_rows_compute_their_rounding_exactly(n_in: int, rng: np.random.Generator) -> None:
    """2-bit rows on int8 activations (a group's 16 code bytes split into the codes of columns 4i,
    4i+1 and 4i+2, 4i+3 against the activations quantised in that order): each pair's row dots
    against the float64 emulation of their own int8 rounding (float32 sums only), within that
    rounding's bound of the exact product, and not the float path's result; the experts' decode
    through them within the experts' int8 bound of float64."""
    inter = n_in
    slab, layout, experts = _expert_slab(rng, 64, inter, 3, 2)
    # the down projection's rows (64 x inter) on random inputs of width inter
    comp = layout.components
    down = np.array([comp[f"down_proj.{part}"].offset for part in ("weight", "scales", "biases")], np.int64)
    slots = np.array([0, 2, 1, 2])
    x = (rng.standard_normal((4, inter)) * rng.uniform(0.1, 10, inter)).astype(np.float32)
    xq = cpu.int8dot.quantize_activations(x, 2)
    out = np.zeros((4, 64), np.float32)
    ident = np.arange(4)
    cpu.int8dot.pairs_matvec(slab.data, slots, down, 64, inter // 4, inter // 64, ident, ident, *xq, out)
    for p, s in enumerate(slots):
        _check_int8_row_dots(out[p], x[p], experts[s]["down_proj"])
    # the experts' decode (one token each) takes these rows with --int8-dot
    tokens = rng.standard_normal((4, 64)).astype(np.float32)
    y = cpu.experts_swiglu(slab.data, layout, slots, tokens, int8=True)
    assert not np.allclose(y, cpu.experts_swiglu(slab.data, layout, slots, tokens), rtol=1e-6)
    for p, s in enumerate(slots):
        _check_int8_expert(y[p], tokens[p], experts[s])


def _expert_slab(
    rng: np.random.Generator, hid: int, inter: int, n: int, bits: int
) -> tuple[Any, Any, list[dict[str, QuantTensor]]]:
    """``n`` random experts (weights scaled by 1/sqrt(fan-in)) in a slab of expert files: (slab, layout,
    each expert's matrices)."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab

    shapes = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    layout = ExpertLayout.for_config(expert_config(hid, inter, n), bits)
    slab = HostSlab(layout, n)
    experts = []
    for s in range(n):
        w = {
            p: quantize((rng.standard_normal(sh) / np.sqrt(sh[1])).astype(np.float32), bits) for p, sh in shapes.items()
        }
        slab.data[s] = np.frombuffer(layout.encode(w), np.uint8)
        experts.append(w)
    return slab, layout, experts


def _check_int8_expert(y: np.ndarray, x: np.ndarray, w: dict[str, QuantTensor]) -> None:
    """An expert's output on int8 activations against float64: x and h each rounded to int8 per group,
    measured against the terms' magnitude |down| @ |h| (the output itself may cancel): over 3000 draws
    of the 4-bit test's geometry median 0.6%, p99 1.7%, max 2.5%; a wrong group, scale or sign moves it
    to tens of percent."""
    x64 = x.astype(np.float64)
    g, u = (exact_terms(w[k])[0] @ x64 for k in ("gate_proj", "up_proj"))
    h = g / (1 + np.exp(-g)) * u
    down = exact_terms(w["down_proj"])[0]
    assert np.linalg.norm(y - down @ h) < 0.05 * np.linalg.norm(np.abs(down) @ np.abs(h))


@pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
def test_int8_experts_match_the_one_expert_int8_kernel(rng: np.random.Generator) -> None:
    hid = 256
    slab, layout, experts = _expert_slab(rng, hid, 128, 3, 4)
    slots = rng.integers(0, 3, 5)
    x = rng.standard_normal((5, hid)).astype(np.float32)
    y = cpu.experts_swiglu(slab.data, layout, slots, x, int8=True)
    for p, s in enumerate(slots):
        w = experts[s]
        one = cpu.swiglu_expert(x[p], w["gate_proj"], w["up_proj"], w["down_proj"], int8=True)
        assert (np.abs(y[p] - one) <= 1e-5 * np.abs(one).max() + _h_rounding_slack(x[p], w)).all()
        _check_int8_expert(y[p], x[p], w)


def test_int8_dot_option_is_refused_off_the_cpu_and_torch_backends(tmp_path) -> None:
    from typer.testing import CliRunner

    from fmoe.cli import app

    bad = CliRunner().invoke(app, ["bench", "model", str(tmp_path), "--int8-dot", "--backend", "mlx"])
    assert_cli_error(bad, "--int8-dot", "cpu and torch backends")


@pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
def test_int8_gemm_row_results_do_not_depend_on_the_other_tokens(rng: np.random.Generator) -> None:
    """Each (row, token) dot of the GEMM is one fixed instruction sequence whatever tile it sits in:
    a token's outputs are bitwise the same alone (in a 2-token call, or a decode's one-token call), in
    any batch, at any position."""
    qt = quantize(rng.standard_normal((67, 384)).astype(np.float32), 4)
    x = rng.standard_normal((23, 384)).astype(np.float32)
    y = cpu.qmatmul(x, qt, int8=True)
    perm = rng.permutation(23)
    assert np.array_equal(cpu.qmatmul(x[perm], qt, int8=True), y[perm])
    for t in (0, 11, 22):
        assert np.array_equal(cpu.qmatmul(x[[t, t]], qt, int8=True)[0], y[t])
        assert np.array_equal(cpu.qmatmul(x[t], qt, int8=True), y[t])  # one token (decode): int8dot.gemv


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("n_in", [256, 320])  # 320: five groups a row (int8: the row-by-row kernel, not gemv's tiles)
@pytest.mark.parametrize("int8", [False, pytest.param(True, marks=_NEEDS_INT8)])
def test_qmatvecs_give_each_matrix_what_it_gives_alone(
    bits: int, n_in: int, int8: bool, rng: np.random.Generator
) -> None:
    """A layer's projections of one token in one parallel region, rows from 1 to a few chunks' worth:
    each output within the float64 bound; on int8 inputs bitwise the matrix's own one-token qmatmul
    (gemv: so decode agrees with prefill's GEMM bit for bit). The backend's ``linears`` takes the
    quantised matrices together and the others one by one."""
    from fmoe.runtime.backends.cpu import CpuBackend

    qts = [quantize(rng.standard_normal((n, n_in)).astype(np.float32), bits) for n in (1, 300, 17, 64)]
    x = rng.standard_normal(n_in).astype(np.float32)
    got = cpu.qmatvecs(x, qts, int8=int8)
    for y, qt in zip(got, qts, strict=True):
        assert y.shape == (qt.shape[0],)
        if cpu._int8_ok(int8, bits, qt.group_size):  # 4 bits (the other widths stay on float inputs)
            np.testing.assert_array_equal(y, cpu.qmatmul(x, qt, int8=True))
        else:
            check_against_float64(y, x, qt)
    dense = rng.standard_normal((5, n_in)).astype(np.float32)
    ys = CpuBackend(int8=int8).linears(x[None], [qts[1], dense, qts[0]])
    np.testing.assert_array_equal(ys[1], x[None] @ dense.T)
    two = cpu.qmatvecs(x, [qts[1], qts[0]], int8=int8)
    for y, want in zip((ys[0], ys[2]), two, strict=True):
        np.testing.assert_array_equal(y, want[None])
    with pytest.raises(ValueError, match=r"matrix 1 .* not of matrix 0's format"):
        cpu.qmatvecs(x, [qts[0], quantize(rng.standard_normal((4, n_in)).astype(np.float32), 4 if bits != 4 else 8)])


@pytest.mark.skipif(not cpu.int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
@pytest.mark.parametrize("hid", [256, 320])  # 320: five groups a row, the GEMM's tiles need an even count
def test_int8_experts_grouped_by_expert(hid: int, rng: np.random.Generator) -> None:
    """Prefill-shaped calls (several tokens per expert, one expert with one token). The grouped
    kernels stage by stage against the float64 emulation of their rounding (x rounded, then the
    kernel's own h rounded: comparing with another kernel's h would flip an int8 step of h now and
    then, 1e-7 apart); end to end near the exact SwiGLU, and bitwise the same when the experts come in
    two calls (as the store's parts may cut them)."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab

    inter, n, pairs = 128, 6, 45
    shapes = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    layout = ExpertLayout.for_config(expert_config(hid, inter, n), 4)
    slab = HostSlab(layout, n)
    experts = []
    for s in range(n):
        w = {p: quantize((rng.standard_normal(sh) / np.sqrt(sh[1])).astype(np.float32), 4) for p, sh in shapes.items()}
        slab.data[s] = np.frombuffer(layout.encode(w), np.uint8)
        experts.append(w)
    slots = np.concatenate([rng.integers(0, n - 1, pairs - 1), [n - 1]])  # expert n-1 has one token
    rng.shuffle(slots)
    x = rng.standard_normal((pairs, hid)).astype(np.float32)
    y = cpu.experts_swiglu(slab.data, layout, slots, x, int8=True)
    exact = np.stack([reference.swiglu_expert(x[p], *experts[s].values()) for p, s in enumerate(slots)])
    # x and h rounded to int8 (int8dot's precision note); over 40 draws of this test: all pairs together
    # 3.6% of the norm (median), 4.2% at most; the worst single pair 7% (median), 11% at most
    assert np.linalg.norm(y - exact) < 0.06 * np.linalg.norm(exact)
    assert (np.linalg.norm(y - exact, axis=1) < 0.2 * np.linalg.norm(exact, axis=1)).all()
    first = np.isin(slots, rng.permutation(n)[: n // 2])  # parts hold whole experts: each in exactly one
    a, b = np.flatnonzero(first), np.flatnonzero(~first)
    assert np.array_equal(cpu.experts_swiglu(slab.data, layout, slots[a], x[a], int8=True), y[a])
    assert np.array_equal(cpu.experts_swiglu(slab.data, layout, slots[b], x[b], int8=True), y[b])
    # decode (each expert one token: the grouped kernels' tiles too, with an even number of groups a
    # row) gives each token bitwise its prefill result, as the one-token gemv does for a dense matrix;
    # with an odd number the row dots take decode, within the rounding bound of the test above
    for t in rng.choice(pairs, 5, replace=False):
        one = cpu.experts_swiglu(slab.data, layout, slots[t : t + 1], x[t : t + 1], int8=True)
        if hid % 128 == 0:
            np.testing.assert_array_equal(one[0], y[t])
        else:
            assert np.linalg.norm(one[0] - exact[t]) < 0.2 * np.linalg.norm(exact[t])
    if hid % 128:
        return
    # the grouped kernels themselves: pairs sorted by expert, segments of several tokens
    order = np.argsort(slots, kind="stable")
    seg_slots, counts = np.unique(slots, return_counts=True)
    starts = np.concatenate([[0], np.cumsum(counts)])
    comp = layout.components

    def offsets(proj: str) -> np.ndarray:
        return np.array([comp[f"{proj}.{part}"].offset for part in ("weight", "scales", "biases")], np.int64)

    # the kernels index the rows themselves: x in pair order read through ``order``, h written in
    # segment order, the outputs written back to pair order
    h = np.empty((pairs, inter), np.float32)
    xq = cpu.int8dot.quantize_activations(x)
    ident = np.arange(pairs)
    gate_up = (offsets("gate_proj"), offsets("up_proj"), inter, hid // 2, hid // 64)
    cpu.int8dot.experts_gate_up(slab.data, seg_slots, starts, *gate_up, order, ident, *xq, h)
    out = np.full((pairs, hid), np.nan, np.float32)
    down = (offsets("down_proj"), hid, inter // 2, inter // 64)
    hq = cpu.int8dot.quantize_activations(h)
    cpu.int8dot.experts_matmul(slab.data, seg_slots, starts, *down, ident, order, *hq, out)
    for i, p in enumerate(order):
        w = experts[slots[p]]
        g, u = _int8_emulation(x[p], w["gate_proj"]), _int8_emulation(x[p], w["up_proj"])
        want = g / (1 + np.exp(-g)) * u
        assert np.abs(h[i] - want).max() <= 1e-5 * np.abs(want).max()
        want = _int8_emulation(h[i], w["down_proj"])
        assert np.abs(out[p] - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize(
    ("bits", "int8", "hid"), [(4, False, 256), (2, False, 192), (4, True, 256), (4, True, 320), (2, True, 192)]
)
def test_experts_swiglu_indexes_token_rows_in_place(bits: int, int8: bool, hid: int, rng: np.random.Generator) -> None:
    """The backend's form of the call: x one row per token, each pair reading ``x[tokens[p]]`` and
    writing ``out[dest[p]]`` (no gathered copies). Bitwise the same as the gathered call, whose
    results the tests above check against float64 and the int8 emulation; rows of ``out`` no pair
    names stay as they were. Odd sizes: 13 tokens, 3 choices, 7 experts, prefill and decode shapes."""
    if int8 and not cpu.int8dot.AVAILABLE:
        pytest.skip("needs a CPU with AVX512-VNNI or AVX2")
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab

    inter, n = 128, 7
    shapes = {"gate_proj": (inter, hid), "up_proj": (inter, hid), "down_proj": (hid, inter)}
    layout = ExpertLayout.for_config(expert_config(hid, inter, n), bits)
    slab = HostSlab(layout, n)
    for s in range(n):
        w = {p: quantize(rng.standard_normal(sh).astype(np.float32), bits) for p, sh in shapes.items()}
        slab.data[s] = np.frombuffer(layout.encode(w), np.uint8)
    for t, k in ((13, 3), (1, 3)):
        x = rng.standard_normal((t, hid)).astype(np.float32)
        ids = np.stack([rng.permutation(n)[:k] for _ in range(t)])
        rows, choices = np.nonzero(ids < n - 1)  # leave some pairs out: their rows stay untouched
        slots = ids[rows, choices]
        want = cpu.experts_swiglu(slab.data, layout, slots, x[rows], int8=int8)
        out = np.full((t * k, hid), 7.0, np.float32)
        dest = rows * k + choices
        got = cpu.experts_swiglu(slab.data, layout, slots, x, int8=int8, tokens=rows, out=out, dest=dest)
        assert got is out
        assert np.array_equal(out[dest], want)
        assert (np.delete(out, dest, axis=0) == 7.0).all()
    with pytest.raises(ValueError, match="token row"):
        cpu.experts_swiglu(slab.data, layout, slots, x, tokens=np.full(slots.shape, t))
    with pytest.raises(ValueError, match="dest"):
        cpu.experts_swiglu(slab.data, layout, slots, x, tokens=rows, out=out[:1], dest=dest)


@pytest.mark.parametrize(("tokens", "channels"), [(1, 7), (2, 1031), (37, 1031)])  # fewer tokens than taps too
def test_causal_conv1d_silu_matches_float64(tokens: int, channels: int, rng: np.random.Generator) -> None:
    """The numba convolution (channel blocks of 512, the state's rows before x's) against float64."""
    w = rng.standard_normal((channels, 4)).astype(np.float32)
    x = rng.standard_normal((tokens, channels)).astype(np.float32)
    state = rng.standard_normal((3, channels)).astype(np.float32)
    y, new_state = cpu.causal_conv1d_silu(x, w, state)
    full = np.vstack([state, x]).astype(np.float64)
    pre = np.stack([(full[t : t + 4] * w.T.astype(np.float64)).sum(0) for t in range(tokens)])
    want = pre / (1 + np.exp(-pre))
    # four float32 products summed, then the SiLU in float32: a few eps of the terms' size
    np.testing.assert_allclose(
        y, want, rtol=0, atol=16 * EPS32 * (np.abs(full[:, None]).max() * np.abs(w).sum(1).max())
    )
    np.testing.assert_array_equal(new_state, np.vstack([state, x])[-3:])


def test_the_cpu_backend_leaves_blas_one_thread() -> None:
    """numpy's BLAS must not start a thread per core beside the numba kernels' pool: its idle threads
    spin on the cores the kernels need (runtime/kernels/threads.py)."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    from fmoe.runtime.backends.cpu import CpuBackend

    CpuBackend(threads=1)
    blas = [p for p in threadpoolctl.threadpool_info() if p["user_api"] == "blas"]
    assert blas and all(p["num_threads"] == 1 for p in blas)


def test_qmatmul_keeps_a_matrix_s_checked_views_only_while_it_lives(rng: np.random.Generator) -> None:
    """The validated views of a matrix are kept per matrix (by id) and dropped when it is collected, so a
    later matrix that reuses the id is never computed with the old one's bytes."""
    import gc

    x = rng.standard_normal(128).astype(np.float32)
    for _ in range(20):  # ids of collected objects are reused quickly: some rounds meet an old id
        w = rng.standard_normal((32, 128)).astype(np.float32)
        qt = quantize(w, 4)
        got = cpu.qmatmul(x, qt)
        assert id(qt) in cpu._PARTS
        want = qt.dequantize().astype(np.float64) @ x
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        key = id(qt)
        del qt
        gc.collect()
        assert key not in cpu._PARTS
