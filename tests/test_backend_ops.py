"""The backend conformance suite, op by op: every installed backend (tests/support.py BACKENDS: cpu,
cpu with the numpy kernels, torch on the CPU, torch on CUDA when there is a GPU) against float64
numpy formulations of the contract (runtime/backends/base.py), on fresh random inputs.

Bounds: float32 arithmetic against float64 truth. Elementwise ops within 1e-5 relative; sums of n
products within 1e-5 of the sum of the terms' magnitudes (|x| @ |W|), which a wrong code, scale,
bias, head mapping or rotation exceeds by orders of magnitude.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from support import causal_gqa64, expert_config, make_backend

from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, bf16_to_f32, f32_to_bf16, quantize
from fmoe.runtime.backends.base import Backend, Rotary
from fmoe.runtime.experts.slots import ExpertPart, ExpertSlots, ExpertWeights
from fmoe.runtime.timing import PHASES, PhaseProfile

f32 = np.float32


def host(be: Backend, x: object) -> np.ndarray:
    return np.asarray(be.to_numpy(x), dtype=np.float64)


def dense(w: object) -> np.ndarray:
    """float64 values of a host weight (QuantTensor dequantised exactly, bf16 bits widened)."""
    if isinstance(w, QuantTensor):
        return w.dequantize().astype(np.float64)
    w = np.asarray(w)
    return (bf16_to_f32(w) if w.dtype == np.uint16 else w).astype(np.float64)


def assert_sum_close(got: np.ndarray, want: np.ndarray, magnitude: np.ndarray, bound: float = 1e-5) -> None:
    """``got`` within ``bound`` of ``magnitude`` (the sum of the absolute terms) of ``want``."""
    assert got.shape == want.shape, (got.shape, want.shape)
    err = np.abs(got - want) / np.maximum(magnitude, 1e-30)
    assert err.max() < bound, err.max()


def rms64(x: np.ndarray, w: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps) * w


def silu64(x: np.ndarray) -> np.ndarray:
    return x / (1 + np.exp(-x))


def sig64(x: np.ndarray) -> np.ndarray:
    return 1 / (1 + np.exp(-x))


def swiglu64(x: np.ndarray, g: object, u: object, d: object) -> tuple[np.ndarray, np.ndarray]:
    """SwiGLU in float64 and the magnitude of its output sums."""
    a, b = x @ dense(g).T, x @ dense(u).T
    h = silu64(a) * b
    return h @ dense(d).T, np.abs(h) @ np.abs(dense(d)).T + 1e-3 * np.abs(h).sum(-1, keepdims=True)


# ---- the contract -------------------------------------------------------------------------------
def test_backend_implements_the_protocol(be: Backend) -> None:
    assert isinstance(be, Backend)
    assert isinstance(be.name, str) and isinstance(be.device, str)
    st = be.new_linear_state((3, 10), (4, 5, 6))
    np.testing.assert_array_equal(host(be, st.conv), np.zeros((3, 10)))
    np.testing.assert_array_equal(host(be, st.recurrent), np.zeros((4, 5, 6)))
    assert st.nbytes == 4 * (30 + 120)
    assert be.new_kv_cache(2, 8).nbytes >= 0
    x = np.arange(6, dtype=np.float64).reshape(2, 3)
    np.testing.assert_array_equal(be.to_numpy(be.asarray(x)), x.astype(f32))
    assert be.to_numpy(be.asarray(x)).dtype == np.float32


def test_timer_books_every_mark(be: Backend) -> None:
    prof = PhaseProfile(3)
    timer = be.timer(prof)
    y = be.asarray(np.ones((64, 64), f32))
    for layer, phase in itertools.product(range(3), PHASES):
        y = be.linear(y, be.weight(np.eye(64, dtype=f32)))
        timer.mark(layer, phase)
    timer.mark(-1, "dense")
    timer.finish()
    assert (prof.seconds > 0).sum() >= 10 and (prof.seconds >= 0).all()  # each mark booked, none negative


# ---- dense ops ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["float32", "bf16", "q4", "q8"])
def test_embed_rows(be: Backend, kind: str, rng: np.random.Generator) -> None:
    table = rng.normal(size=(37, 64)).astype(f32)
    stored = {"float32": table, "bf16": f32_to_bf16(table), "q4": quantize(table, 4), "q8": quantize(table, 8)}[kind]
    ids = rng.integers(0, 37, 9)
    ids[3] = ids[5]  # a repeated id
    got = host(be, be.embed(be.weight(stored), ids))
    np.testing.assert_array_equal(got, dense(stored)[ids].astype(f32))  # rows are exact: widening only


@pytest.mark.parametrize("kind", ["float32", "q2", "q4", "q8"])
@pytest.mark.parametrize("tokens", [1, 5])
def test_linear(be: Backend, kind: str, tokens: int, rng: np.random.Generator) -> None:
    w = rng.normal(size=(67, 128)).astype(f32)
    stored = w if kind == "float32" else quantize(w, int(kind[1]))
    x = rng.normal(size=(tokens, 128)).astype(f32)
    got = host(be, be.linear(be.asarray(x), be.weight(stored)))
    x64 = x.astype(np.float64)
    assert_sum_close(got, x64 @ dense(stored).T, np.abs(x64) @ np.abs(dense(stored)).T)


@pytest.mark.parametrize("kinds", [("q4", "q4", "q4", "q4"), ("q8", "q8"), ("q4", "float32", "q8")])
@pytest.mark.parametrize("tokens", [1, 5])
def test_linears(be: Backend, kinds: tuple[str, ...], tokens: int, rng: np.random.Generator) -> None:
    """One input by several matrices (one format: the Triton backend's single launch; mixed: one by
    one), rows from one to a few hundred, as a layer's projections are."""
    shapes = [(300, 128), (67, 128), (1, 128), (16, 128)][: len(kinds)]
    stored = [
        w if kind == "float32" else quantize(w, int(kind[1]))
        for kind, w in zip(kinds, (rng.normal(size=s).astype(f32) for s in shapes), strict=True)
    ]
    x = rng.normal(size=(tokens, 128)).astype(f32)
    got = be.linears(be.asarray(x), [be.weight(w) for w in stored])
    x64 = x.astype(np.float64)
    assert len(got) == len(stored)
    for y, w in zip(got, stored, strict=True):
        assert_sum_close(host(be, y), x64 @ dense(w).T, np.abs(x64) @ np.abs(dense(w)).T)


def test_rms_norm_and_residual_add(be: Backend, rng: np.random.Generator) -> None:
    x = rng.normal(size=(5, 3, 24)).astype(f32)
    y = rng.normal(size=(5, 3, 24)).astype(f32)
    w = rng.normal(1, 0.2, 24).astype(f32)
    wb = be.weight(w)
    x64, y64 = x.astype(np.float64), y.astype(np.float64)
    np.testing.assert_allclose(host(be, be.rms_norm(be.asarray(x), wb, 1e-6)), rms64(x64, w), rtol=1e-5, atol=1e-6)
    s, normed = be.add_rms_norm(be.asarray(x), be.asarray(y), wb, 1e-6)
    np.testing.assert_allclose(host(be, s), x64 + y64, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(host(be, normed), rms64(x64 + y64, w), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["float32", "q4", "mixed"])
@pytest.mark.parametrize("tokens", [1, 4])
def test_swiglu(be: Backend, kind: str, tokens: int, rng: np.random.Generator) -> None:
    hid, inter = 128, 64
    mats = {
        "g": rng.normal(size=(inter, hid)) / np.sqrt(hid),
        "u": rng.normal(size=(inter, hid)) / np.sqrt(hid),
        "d": rng.normal(size=(hid, inter)) / np.sqrt(inter),
    }
    ws = {n: m.astype(f32) for n, m in mats.items()}
    if kind != "float32":
        ws = {n: quantize(m, 4) for n, m in ws.items()}
    if kind == "mixed":  # quantised gate and down, float up: not the fused kernel's case
        ws["u"] = ws["u"].dequantize()
    x = rng.normal(size=(tokens, hid)).astype(f32)
    got = host(be, be.swiglu(be.asarray(x), *(be.weight(ws[n]) for n in "gud")))
    want, mag = swiglu64(x.astype(np.float64), ws["g"], ws["u"], ws["d"])
    assert_sum_close(got, want, mag)
    big = np.array([[-200.0, 200.0] * (hid // 2)], f32)  # huge gate pre-activations: finite, no overflow
    assert np.isfinite(host(be, be.swiglu(be.asarray(big), *(be.weight(mats[n].astype(f32)) for n in "gud")))).all()


def test_sigmoid_gate(be: Backend, rng: np.random.Generator) -> None:
    x = rng.normal(size=(4, 12)).astype(f32)
    g = rng.normal(scale=3, size=(4, 12)).astype(f32)
    g1 = rng.normal(size=(4, 1)).astype(f32)
    x64 = x.astype(np.float64)
    want = x64 * sig64(g.astype(np.float64))
    np.testing.assert_allclose(host(be, be.sigmoid_gate(be.asarray(x), be.asarray(g))), want, rtol=1e-5, atol=1e-6)
    want1 = x64 * sig64(g1.astype(np.float64))
    np.testing.assert_allclose(host(be, be.sigmoid_gate(be.asarray(x), be.asarray(g1))), want1, rtol=1e-5, atol=1e-6)


# ---- Gated DeltaNet -----------------------------------------------------------------------------
def test_causal_conv1d_direct_and_split(be: Backend, rng: np.random.Generator) -> None:
    c, kw, t = 10, 4, 9
    xs = rng.normal(size=(t, c)).astype(f32)
    wc = rng.normal(size=(c, kw)).astype(f32)
    pad = np.vstack([np.zeros((kw - 1, c)), xs.astype(np.float64)])
    pre = np.stack([(pad[i : i + kw] * wc.T).sum(0) for i in range(t)])
    direct = silu64(pre)
    w = be.weight(wc)
    y, st = be.causal_conv1d(be.asarray(xs), w, be.asarray(np.zeros((kw - 1, c), f32)))
    np.testing.assert_allclose(host(be, y), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(host(be, st), xs[-(kw - 1) :])
    st = be.asarray(np.zeros((kw - 1, c), f32))
    parts = []
    for a, b in ((0, 2), (2, 3), (3, 9)):  # any split of the time axis, state carried
        y, st = be.causal_conv1d(be.asarray(xs[a:b]), w, st)
        parts.append(host(be, y))
    np.testing.assert_allclose(np.vstack(parts), direct, rtol=1e-5, atol=1e-6)


def test_delta_rule_inputs(be: Backend, rng: np.random.Generator) -> None:
    t, hk, dk, hv, dv = 3, 2, 12, 6, 5  # head sizes that round to different powers of two
    qkv = rng.normal(size=(t, 2 * hk * dk + hv * dv)).astype(f32)
    a, b = rng.normal(size=(t, hv)).astype(f32), rng.normal(size=(t, hv)).astype(f32)
    a_log = np.log(rng.uniform(1, 16, hv)).astype(f32)
    dt_bias = rng.normal(size=hv).astype(f32)
    q, k, v, g, beta = (
        host(be, r)
        for r in be.delta_rule_inputs(
            be.asarray(qkv), be.asarray(a), be.asarray(b), be.weight(a_log), be.weight(dt_bias), (hk, dk, hv, dv)
        )
    )
    z = qkv.astype(np.float64)
    kd = hk * dk

    def l2(x: np.ndarray) -> np.ndarray:
        return x / np.sqrt((x**2).sum(-1, keepdims=True) + 1e-6)

    np.testing.assert_allclose(q, l2(z[:, :kd].reshape(t, hk, dk)) / np.sqrt(dk), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(k, l2(z[:, kd : 2 * kd].reshape(t, hk, dk)), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(v, z[:, 2 * kd :].reshape(t, hv, dv))
    g64 = -np.exp(a_log.astype(np.float64)) * np.log1p(np.exp(a.astype(np.float64) + dt_bias))
    np.testing.assert_allclose(g, g64, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(beta, sig64(b.astype(np.float64)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("split", [(4,), (1, 3)])
def test_gated_delta_rule(be: Backend, split: tuple[int, ...], rng: np.random.Generator) -> None:
    """Value head j reads key head j // 3; the state carries over any split of the tokens."""
    t, hk, hv, dk, dv = 4, 2, 6, 8, 5
    q = rng.normal(size=(t, hk, dk)).astype(f32)
    k = (rng.normal(size=(t, hk, dk)) / 3).astype(f32)
    v = rng.normal(size=(t, hv, dv)).astype(f32)
    g = -rng.uniform(0, 2, (t, hv)).astype(f32)
    beta = rng.uniform(0, 1, (t, hv)).astype(f32)
    s0 = rng.normal(size=(hv, dk, dv)).astype(f32)
    s64 = s0.astype(np.float64)
    ref = np.zeros((t, hv, dv))
    for i in range(t):
        for j in range(hv):
            kh = j // 3
            s64[j] *= np.exp(g[i, j])
            s64[j] += np.outer(k[i, kh], (v[i, j] - s64[j].T @ k[i, kh]) * beta[i, j])
            ref[i, j] = s64[j].T @ q[i, kh]
    state, outs, lo = be.asarray(s0), [], 0
    for n in split:
        sl = slice(lo, lo + n)
        o, state = be.gated_delta_rule(*(be.asarray(a[sl]) for a in (q, k, v, g, beta)), state)
        outs.append(host(be, o))
        lo += n
    np.testing.assert_allclose(np.vstack(outs), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(host(be, state), s64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("split", [(3,), (1, 2)])
def test_delta_net_is_its_inputs_the_recurrence_and_the_gated_norm(
    be: Backend, split: tuple[int, ...], rng: np.random.Generator
) -> None:
    """The model's op (on the Triton path the inputs made inside the recurrence's launch) against
    float64, the state carried over any split of the tokens; head sizes that round to other powers
    of two."""
    t, hk, dk, hv, dv = sum(split), 2, 12, 6, 5
    qkv = rng.normal(size=(t, 2 * hk * dk + hv * dv)).astype(f32)
    a, b = rng.normal(size=(t, hv)).astype(f32), rng.normal(size=(t, hv)).astype(f32)
    z = rng.normal(size=(t, hv * dv)).astype(f32)
    a_log = np.log(rng.uniform(1, 16, hv)).astype(f32)
    dt_bias = rng.normal(size=hv).astype(f32)
    norm = rng.uniform(0.5, 1.5, dv).astype(f32)
    s0 = rng.normal(size=(hv, dk, dv)).astype(f32)
    ref, s64 = _delta_net64(qkv, a, b, z, a_log, dt_bias, norm, s0, (hk, dk, hv, dv))
    state, outs, lo = be.asarray(s0), [], 0
    w_log, w_bias, w_norm = be.weight(a_log), be.weight(dt_bias), be.weight(norm)
    for n in split:
        sl = slice(lo, lo + n)
        o, state = be.delta_net(
            *(be.asarray(arr[sl]) for arr in (qkv, a, b, z)), w_log, w_bias, w_norm, 1e-6, (hk, dk, hv, dv), state
        )
        outs.append(host(be, o))
        lo += n
    np.testing.assert_allclose(np.vstack(outs), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(host(be, state), s64, rtol=1e-4, atol=1e-5)


def _delta_net64(
    qkv: np.ndarray,
    a: np.ndarray,
    b: np.ndarray,
    z: np.ndarray,
    a_log: np.ndarray,
    dt_bias: np.ndarray,
    norm: np.ndarray,
    s0: np.ndarray,
    heads: tuple[int, int, int, int],
) -> tuple[np.ndarray, np.ndarray]:
    """``delta_net`` in float64: (its output ``[T, Hv*Dv]``, the new state)."""
    hk, dk, hv, dv = heads
    t, kd = qkv.shape[0], hk * dk
    qk = qkv[:, : 2 * kd].astype(np.float64).reshape(t, 2, hk, dk)
    qk = qk / np.sqrt((qk**2).sum(-1, keepdims=True) + 1e-6)
    q, k, v = qk[:, 0] / np.sqrt(dk), qk[:, 1], qkv[:, 2 * kd :].astype(np.float64).reshape(t, hv, dv)
    g = -np.exp(a_log.astype(np.float64)) * np.log1p(np.exp(a.astype(np.float64) + dt_bias))
    beta = sig64(b.astype(np.float64))
    s64, o = s0.astype(np.float64), np.zeros((t, hv, dv))
    for i in range(t):
        for j in range(hv):
            kh = j // (hv // hk)
            s64[j] *= np.exp(g[i, j])
            s64[j] += np.outer(k[i, kh], (v[i, j] - s64[j].T @ k[i, kh]) * beta[i, j])
            o[i, j] = s64[j].T @ q[i, kh]
    zz = z.astype(np.float64).reshape(t, hv, dv)
    out = o / np.sqrt((o**2).mean(-1, keepdims=True) + 1e-6) * norm * silu64(zz)
    return out.reshape(t, hv * dv), s64


def test_gated_rms_norm(be: Backend, rng: np.random.Generator) -> None:
    x = rng.normal(size=(5, 3, 24)).astype(f32)
    z = rng.normal(size=(5, 72)).astype(f32)
    w = rng.normal(1, 0.2, 24).astype(f32)
    got = host(be, be.gated_rms_norm(be.asarray(x), be.weight(w), be.asarray(z), 1e-6))
    want = (rms64(x.astype(np.float64), w) * silu64(z.astype(np.float64)).reshape(5, 3, 24)).reshape(5, 72)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ---- attention ----------------------------------------------------------------------------------
def rope64(x: np.ndarray, positions: np.ndarray, rotary: Rotary) -> np.ndarray:
    """Pairs (i, i + half) rotate as one complex number by position * theta^(-2i/dim); x [T, H, D]."""
    half = rotary.dim // 2
    inv = rotary.theta ** (-np.arange(half) * 2.0 / rotary.dim)
    c = (x[..., :half] + 1j * x[..., half : 2 * half]) * np.exp(1j * positions[:, None, None] * inv)
    y = x.copy()
    y[..., :half], y[..., half : 2 * half] = c.real, c.imag
    return y


@pytest.mark.parametrize(("hq", "hkv", "d", "rot"), [(3, 1, 16, 8), (2, 2, 12, 12)])  # partial / whole-head RoPE
def test_attention_inputs(be: Backend, hq: int, hkv: int, d: int, rot: int, rng: np.random.Generator) -> None:
    t, start = 6, 7
    rotary = Rotary(rot, 10000.0)
    qg = rng.normal(size=(t, hq * 2 * d)).astype(f32)
    k = rng.normal(size=(t, hkv * d)).astype(f32)
    qn, kn = rng.normal(1, 0.2, d).astype(f32), rng.normal(1, 0.2, d).astype(f32)
    q, gate, kr = (
        host(be, r)
        for r in be.attention_inputs(be.asarray(qg), be.asarray(k), be.weight(qn), be.weight(kn), start, rotary, 1e-6)
    )
    pos = np.arange(start, start + t)
    split = qg.astype(np.float64).reshape(t, hq, 2 * d)
    np.testing.assert_allclose(q, rope64(rms64(split[..., :d], qn), pos, rotary), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(gate, split[..., d:].reshape(t, hq * d))
    want_k = rope64(rms64(k.astype(np.float64).reshape(t, hkv, d), kn), pos, rotary)
    np.testing.assert_allclose(kr, want_k, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    "calls",  # (start, tokens) of each call; the long one takes the CPU backend's blocked, threaded path
    [((0, 4), (4, 5), (9, 1)), ((0, 150), (150, 230), (380, 1))],
    ids=["short", "long"],
)
def test_attention_with_cache(be: Backend, calls: tuple[tuple[int, int], ...], rng: np.random.Generator) -> None:
    """Causal GQA (q head h reads kv head h // 3) over a cache filled by several calls."""
    hq, hkv, d = 6, 2, 8
    cache = be.new_kv_cache(hkv, d)
    keys, vals, outs = [], [], []
    for start, t in calls:
        q = rng.normal(size=(t, hq, d)).astype(f32)
        k = rng.normal(size=(t, hkv, d)).astype(f32)
        v = rng.normal(size=(t, hkv * d)).astype(f32)
        o, cache = be.attention(be.asarray(q), be.asarray(k), be.asarray(v), cache, start, d**-0.5)
        keys.append(k.astype(np.float64))
        vals.append(v.astype(np.float64).reshape(t, hkv, d))
        outs.append((host(be, o), causal_gqa64(q, np.vstack(keys), np.vstack(vals), start)))
    for got, want in outs:
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    length = sum(t for _, t in calls)
    assert cache.nbytes >= 2 * length * hkv * d * 4


def test_a_later_chunks_attention_in_query_blocks(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    """The torch backend takes a prompt's later chunk in blocks of query rows whose scores fit its
    budget (a long prompt's would fill a GPU): with a budget of a few rows, the same causal attention."""
    pytest.importorskip("torch")
    from fmoe.runtime.backends import torch_backend

    be = make_backend("torch-cpu")
    hq, hkv, d, first, t = 6, 2, 8, 40, 23
    monkeypatch.setattr(torch_backend, "_SCORES_BYTES", 4 * hq * (first + t) * 5)  # blocks of 5 rows
    k0, v0 = (rng.normal(size=(first, hkv, d)).astype(f32) for _ in range(2))
    q, k, v = (rng.normal(size=(t, h, d)).astype(f32) for h in (hq, hkv, hkv))
    cache = be.new_kv_cache(hkv, d)
    q0 = rng.normal(size=(first, hq, d)).astype(f32)
    be.attention(
        be.asarray(q0), be.asarray(k0), be.asarray(v0.reshape(first, -1)), cache, 0, d**-0.5
    )  # the first chunk
    o, _ = be.attention(be.asarray(q), be.asarray(k), be.asarray(v.reshape(t, -1)), cache, first, d**-0.5)
    want = causal_gqa64(q, np.vstack([k0, k]).astype(np.float64), np.vstack([v0, v]).astype(np.float64), first)
    np.testing.assert_allclose(host(be, o), want, rtol=1e-4, atol=1e-5)


# ---- mixture of experts -------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 3, 9])
def test_route(be: Backend, k: int, rng: np.random.Generator) -> None:
    logits = rng.normal(size=(6, 9)).astype(f32)
    ids, w = be.route(be.asarray(logits), k)
    ids, w = be.to_numpy(ids), host(be, w)
    p = np.exp(logits.astype(np.float64))
    p /= p.sum(-1, keepdims=True)
    for t in range(6):
        assert set(ids[t].tolist()) == set(np.argsort(-p[t])[:k].tolist())
        np.testing.assert_allclose(w[t], p[t, ids[t]] / p[t, ids[t]].sum(), rtol=1e-5)
    np.testing.assert_array_equal(be.expert_ids(be.asarray(ids)), np.unique(ids))
    assert be.expert_ids(be.asarray(ids)).dtype == np.int64


@pytest.mark.parametrize("rows", [1, 3])
def test_greedy_pick(be: Backend, rows: int, rng: np.random.Generator) -> None:
    """The last row's argmax (the first of equal maxima, as numpy's) and whether every logit is
    finite, on a vocabulary of odd size."""
    vocab = int(rng.integers(1000, 5000)) | 1
    z = rng.normal(size=(rows, vocab)).astype(f32)
    first, second = sorted(rng.choice(vocab, 2, replace=False).tolist())
    z[-1, [first, second]] = z.max() + 1  # a tie at the top
    z[:-1] += 10  # earlier rows (a prefill's) larger: only the last is picked from

    def pick(z: np.ndarray) -> list[int]:
        return be.to_numpy(be.greedy_pick(be.asarray(z))).tolist()

    assert pick(z) == [first, 1]
    for bad in (np.nan, np.inf, -np.inf):
        poisoned = z.copy()
        poisoned[int(rng.integers(rows)), int(rng.integers(vocab))] = bad  # in any row
        assert pick(poisoned)[1] == 0


@pytest.mark.parametrize(
    ("temperature", "top_k", "top_p"), [(1.0, 0, 1.0), (0.7, 20, 0.95), (0.6, 0, 0.95), (1.3, 7, 1.0), (0.3, 0, 0.5)]
)
def test_sample_pick_draws_the_host_samplers_token(
    be: Backend, temperature: float, top_k: int, top_p: float, rng: np.random.Generator
) -> None:
    """The token a uniform number draws from the filtered distribution, computed where the logits
    are: the host sampler's (runtime/text/sampling.py ``draw``) for every draw, on rows with ties
    at the top-k boundary and inside the nucleus; non-finite logits flagged."""
    from fmoe.runtime.text.sampling import draw

    vocab = int(rng.integers(2000, 9000)) | 1
    z = (3 * rng.normal(size=(2, vocab))).astype(f32)
    order = np.argsort(-z[-1])
    z[-1, order[top_k or 5]] = z[-1, order[(top_k or 5) - 1]]  # a tie at the k-th value
    z[-1, order[2]] = z[-1, order[1]]  # a tie among the most likely
    logits = be.asarray(z)
    for u in (*rng.random(40), 0.0, 1 - 2**-53):  # (the last: the top of the cumulative sums)
        got = be.to_numpy(be.sample_pick(logits, temperature, top_k, top_p, float(u))).tolist()
        assert got == [draw(z[-1], temperature, top_k, top_p, float(u)), 1], u
    z[0, int(rng.integers(vocab))] = np.nan
    assert be.to_numpy(be.sample_pick(be.asarray(z), temperature, top_k, top_p, 0.5))[1] == 0


def test_sample_pick_in_torch_ops_on_the_cpu(rng: np.random.Generator) -> None:
    """The torch ops a GPU draws with (the torch backend on the CPU draws on the host), run on the
    CPU: the host sampler's tokens, as above."""
    torch = pytest.importorskip("torch")
    from fmoe.runtime.backends.torch_backend import sample_pick_tensors
    from fmoe.runtime.text.sampling import draw

    z = (3 * rng.normal(size=(2, 4099))).astype(f32)
    z[-1, np.argsort(-z[-1])[[3, 20]]] = z[-1].max() - 0.5  # ties in the nucleus and at a top-k boundary
    for temperature, top_k, top_p in [(1.0, 0, 1.0), (0.7, 20, 0.95), (0.6, 0, 0.95), (1.3, 4, 1.0), (0.3, 0, 0.5)]:
        for u in (*rng.random(25), 0.0, 1 - 2**-53):
            got = sample_pick_tensors(torch.from_numpy(z), temperature, top_k, top_p, float(u)).tolist()
            assert got == [draw(z[-1], temperature, top_k, top_p, float(u)), 1], (temperature, top_k, top_p, u)
    z[0, 7] = np.inf
    assert sample_pick_tensors(torch.from_numpy(z), 1.0, 0, 0.9, 0.5).tolist()[1] == 0


def test_sample_pick_from_the_top_k_read_back(rng: np.random.Generator) -> None:
    """With top-k, a GPU reads back the k + margin largest logits and draws on the host from them:
    exactly the host sampler's token (its draw depends on the top-k values alone); ties at the k-th
    value that run past the margin are left to the whole-vocabulary draw."""
    torch = pytest.importorskip("torch")
    from fmoe.runtime.backends.torch_backend import TOP_K_MARGIN, sample_pick_top_k
    from fmoe.runtime.text.sampling import draw

    def host(t: object) -> np.ndarray:
        return t.numpy()  # type: ignore[attr-defined]

    z = (3 * rng.normal(size=(2, 5003))).astype(f32)
    order = np.argsort(-z[-1])
    z[-1, order[6]] = z[-1, order[5]]  # a tie at the 6th value
    for temperature, top_k, top_p in [(0.7, 20, 0.95), (1.3, 6, 1.0), (0.6, 1000, 0.9), (1.0, 5, 0.5)]:
        for u in (*rng.random(25), 0.0, 1 - 2**-53):
            got = sample_pick_top_k(torch.from_numpy(z), temperature, top_k, top_p, float(u), host)
            assert got is not None and got.tolist() == [draw(z[-1], temperature, top_k, top_p, float(u)), 1]
    flat = z.copy()
    flat[-1, order[: 6 + TOP_K_MARGIN + 1]] = z[-1].max()  # more ties than the margin holds
    assert sample_pick_top_k(torch.from_numpy(flat), 1.0, 6, 1.0, 0.5, host) is None
    z[0, 3] = np.nan
    assert sample_pick_top_k(torch.from_numpy(z), 1.0, 6, 1.0, 0.5, host).tolist() == [0, 0]  # type: ignore[union-attr]


def _experts(rng: np.random.Generator, n: int, hid: int, inter: int) -> list[ExpertWeights]:
    def mat(out: int, inp: int) -> QuantTensor:
        return quantize((rng.normal(size=(out, inp)) / np.sqrt(inp)).astype(f32), 4)

    return [ExpertWeights(mat(inter, hid), mat(inter, hid), mat(hid, inter)) for _ in range(n)]


def _parts(table: ExpertSlots, ids: list[int], sizes: list[int]) -> list[ExpertPart]:
    out, lo = [], 0
    for n in sizes:
        chunk = np.array(ids[lo : lo + n], dtype=np.int64)
        out.append(ExpertPart(table, chunk, chunk.copy()))  # slot = id
        lo += n
    return out


def test_moe_matches_float64_whatever_the_parts(be: Backend, rng: np.random.Generator) -> None:
    t, k, n_exp, hid, inter = 7, 3, 8, 64, 64
    experts = _experts(rng, n_exp, hid, inter)
    table = ExpertSlots.stack(experts)
    x = rng.normal(size=(t, hid)).astype(f32)
    ids = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(t)])
    w = rng.dirichlet(np.ones(k), t).astype(f32)
    shared = rng.normal(size=(t, hid)).astype(f32)
    needed = sorted(set(ids.ravel().tolist()))
    x64 = x.astype(np.float64)
    want, mag = shared.astype(np.float64), np.abs(shared.astype(np.float64))
    for i in range(t):
        for j in range(k):
            e = experts[ids[i, j]]
            y, m = swiglu64(x64[i : i + 1], e.gate, e.up, e.down)
            want[i] += w[i, j] * y[0]
            mag[i] += w[i, j] * m[0]
    results = []
    for sizes in ([len(needed)], [1] * len(needed), [2, len(needed) - 2]):
        order = needed if sizes[0] != 1 else needed[::-1]  # parts in any order
        parts = _parts(table, order, sizes)
        got = be.moe(be.asarray(x), be.asarray(ids), be.asarray(w), iter(parts), be.asarray(shared))
        results.append(host(be, got))
        assert_sum_close(results[-1], want, mag)
    for r in results[1:]:
        np.testing.assert_array_equal(r, results[0])  # the combine's order does not depend on the parts
    missing = _parts(table, needed[1:], [len(needed) - 1])
    with pytest.raises(FmoeError, match="never made resident"):
        be.moe(be.asarray(x), be.asarray(ids), be.asarray(w), iter(missing), be.asarray(shared))


def test_moe_over_a_slab_of_expert_files(be: Backend, rng: np.random.Generator) -> None:
    """The store's tables: expert files side by side in a slab (decode: every expert one token, the
    grouped path; prefill-like: several tokens per expert), equal to the float64 sum."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab

    hid, inter, n_exp = 128, 64, 6
    cfg = expert_config(hid, inter, n_exp)
    layout = ExpertLayout.for_config(cfg, 4)
    slab = HostSlab(layout, n_exp + 2)
    experts = _experts(rng, n_exp, hid, inter)
    slot_of = rng.permutation(n_exp + 2)[:n_exp]  # experts in scattered slots
    for e, w in enumerate(experts):
        slab.data[slot_of[e]] = np.frombuffer(
            layout.encode({"gate_proj": w.gate, "up_proj": w.up, "down_proj": w.down}), np.uint8
        )
    for t, k in ((1, 3), (9, 2)):
        x = rng.normal(size=(t, hid)).astype(f32)
        ids = np.stack([rng.choice(n_exp, k, replace=False) for _ in range(t)])
        w = rng.dirichlet(np.ones(k), t).astype(f32)
        shared = np.zeros((t, hid), f32)
        want, mag = np.zeros((t, hid)), np.zeros((t, hid))
        for i in range(t):
            for j in range(k):
                e = experts[ids[i, j]]
                yy, m = swiglu64(x[i : i + 1].astype(np.float64), e.gate, e.up, e.down)
                want[i] += w[i, j] * yy[0]
                mag[i] += w[i, j] * m[0]
        needed = np.unique(ids)
        part = ExpertPart(slab.table, needed, slot_of[needed].astype(np.int64))
        got = host(be, be.moe(be.asarray(x), be.asarray(ids), be.asarray(w), iter([part]), be.asarray(shared)))
        assert_sum_close(got, want, mag)
