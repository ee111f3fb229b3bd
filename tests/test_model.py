"""The Qwen3.5-MoE model definition (runtime/model.py) and the CPU backend's ops, without torch.

- ops against float64 numpy formulations on fresh random inputs (seeds: tests/conftest.py);
- the whole network against an independent float64 token-by-token reference written here;
- decode with state == prefill of the longer sequence; batch == token by token; one fetch per layer;
- the real artifacts (synth -> extract -> repack -> fmoe.load) against the checked-in golden
  outputs of transformers (tests/golden, made by scripts/make_goldens.py);
- scripts/divergence.py on tiny: finite, in range.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
from support import CountingSource, DictExperts, fresh_seed, random_canonical

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, quantize
from fmoe.runtime.backends.cpu import CpuBackend
from fmoe.runtime.diagnostics import fmoe_greedy, relative_error
from fmoe.runtime.experts import ExpertWeights
from fmoe.runtime.model import Qwen35MoeNetwork, expected_dense_shapes, route
from fmoe.runtime.profile import PHASES, PhaseProfile

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = ROOT / "tests" / "golden"

# Odd geometry: 3 query heads on 1 kv head, value heads = 3 x key heads, Dk != Dv, rotary 8 of 32.
CFG = TextConfig(
    vocab_size=301,
    hidden_size=128,
    num_hidden_layers=4,
    num_attention_heads=3,
    num_key_value_heads=1,
    head_dim=32,
    linear_conv_kernel_dim=4,
    linear_key_head_dim=16,
    linear_value_head_dim=24,
    linear_num_key_heads=2,
    linear_num_value_heads=6,
    moe_intermediate_size=64,
    shared_expert_intermediate_size=96,
    num_experts=7,
    num_experts_per_tok=3,
    layer_types=("linear_attention", "full_attention", "linear_attention", "full_attention"),
    rms_norm_eps=1e-6,
    rope_theta=10000.0,
    partial_rotary_factor=0.25,
    max_position_embeddings=40,
    eos_token_ids=(),
)


@pytest.fixture(scope="module")
def weights():
    return random_canonical(CFG, seed=fresh_seed("test_model weights"))


def make_net(weights, k=None, backend=None):
    dense, experts = weights
    return Qwen35MoeNetwork(CFG, dense, DictExperts(experts), backend or CpuBackend(), k=k)


def prompt(n: int, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, CFG.vocab_size, n)


# ---- an independent float64 reference, one token at a time ---------------------------------------
def f64_reference(cfg: TextConfig, dense, experts, ids, k):
    """Returns (logits [T, vocab], routed expert sets per layer)."""
    w = {
        n: (v.dequantize() if isinstance(v, QuantTensor) else np.asarray(v)).astype(np.float64)
        for n, v in dense.items()
    }
    ex = {
        (layer, e): {p: getattr(x, p).dequantize().astype(np.float64) for p in ("gate", "up", "down")}
        for layer, d in experts.items()
        for e, x in d.items()
    }
    eps = cfg.rms_norm_eps

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    half = cfg.rotary_dim // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half) * 2.0 / cfg.rotary_dim)
    hist = {i: np.zeros((cfg.linear_conv_kernel_dim - 1, cfg.conv_dim)) for i in range(cfg.num_hidden_layers)}
    S = {i: np.zeros((hv, dk, dv)) for i in range(cfg.num_hidden_layers)}
    K = {i: [] for i in range(cfg.num_hidden_layers)}
    V = {i: [] for i in range(cfg.num_hidden_layers)}
    routed = {i: set() for i in range(cfg.num_hidden_layers)}
    out = []

    def rope(x, pos):  # x [H, D]; the pair (i, i + half) rotates as one complex number
        c = (x[:, :half] + 1j * x[:, half : 2 * half]) * np.exp(1j * pos * inv_freq)
        y = x.copy()
        y[:, :half], y[:, half : 2 * half] = c.real, c.imag
        return y

    for pos, tok in enumerate(ids):
        x = w["embed_tokens.weight"][tok]
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            if cfg.is_full_attention(i):
                a = p + "self_attn."
                qg = (w[a + "q_proj.weight"] @ h).reshape(hq, 2 * d)
                q = rope(rms(qg[:, :d], w[a + "q_norm.weight"]), pos)
                kk = rope(rms((w[a + "k_proj.weight"] @ h).reshape(hkv, d), w[a + "k_norm.weight"]), pos)
                K[i].append(kk)
                V[i].append((w[a + "v_proj.weight"] @ h).reshape(hkv, d))
                keys, vals = np.stack(K[i]), np.stack(V[i])  # [L, Hkv, D]
                o = np.zeros((hq, d))
                for head in range(hq):
                    g = head // (hq // hkv)
                    s = keys[:, g] @ q[head] / np.sqrt(d)
                    pr = np.exp(s - s.max())
                    o[head] = (pr / pr.sum()) @ vals[:, g]
                x = x + w[a + "o_proj.weight"] @ (o.reshape(-1) * sig(qg[:, d:].reshape(-1)))
            else:
                a = p + "linear_attn."
                qkv = w[a + "in_proj_qkv.weight"] @ h
                window = np.vstack([hist[i], qkv])  # [K, C]: oldest first
                hist[i] = window[1:]
                conv = silu((window * w[a + "conv1d.weight"].T).sum(axis=0))
                kd = hk * dk
                q = conv[:kd].reshape(hk, dk)
                kk = conv[kd : 2 * kd].reshape(hk, dk)
                v = conv[2 * kd :].reshape(hv, dv)
                q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(dk)
                kk = kk / np.sqrt((kk * kk).sum(-1, keepdims=True) + 1e-6)
                beta = sig(w[a + "in_proj_b.weight"] @ h)
                gdec = -np.exp(w[a + "A_log"]) * np.log1p(np.exp(w[a + "in_proj_a.weight"] @ h + w[a + "dt_bias"]))
                z = (w[a + "in_proj_z.weight"] @ h).reshape(hv, dv)
                o = np.zeros((hv, dv))
                for j in range(hv):
                    kh = j // (hv // hk)
                    S[i][j] *= np.exp(gdec[j])
                    delta = (v[j] - S[i][j].T @ kk[kh]) * beta[j]
                    S[i][j] += np.outer(kk[kh], delta)
                    o[j] = rms(S[i][j].T @ q[kh], w[a + "norm.weight"]) * silu(z[j])
                x = x + w[a + "out_proj.weight"] @ o.reshape(-1)
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            m = p + "mlp."
            logits = w[m + "gate.weight"] @ h
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:k]
            routed[i].update(int(e) for e in top)
            y = np.zeros_like(x)
            for e, pe in zip(top, probs[top] / probs[top].sum(), strict=True):
                f = ex[(i, int(e))]
                y += pe * (f["down"] @ (silu(f["gate"] @ h) * (f["up"] @ h)))
            shared = w[m + "shared_expert.down_proj.weight"] @ (
                silu(w[m + "shared_expert.gate_proj.weight"] @ h) * (w[m + "shared_expert.up_proj.weight"] @ h)
            )
            x = x + y + sig(w[m + "shared_expert_gate.weight"] @ h) * shared
        out.append(w["lm_head.weight"] @ rms(x, w["norm.weight"]))
    return np.stack(out), routed


# ---- ops ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kernels", ["auto", "numpy"])
def test_ops_match_float64(kernels, rng):
    be = CpuBackend(kernels)
    f32 = np.float32

    # rms_norm / gated_rms_norm
    x = rng.normal(size=(5, 3, 24)).astype(f32)
    wt = rng.normal(1, 0.2, 24).astype(f32)
    z = rng.normal(size=(5, 3, 24)).astype(f32)
    x64 = x.astype(np.float64)
    ref = x64 / np.sqrt((x64**2).mean(-1, keepdims=True) + 1e-6) * wt
    np.testing.assert_allclose(be.rms_norm(x, wt, 1e-6), ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(
        be.gated_rms_norm(x, wt, z, 1e-6), ref * z / (1 + np.exp(-z.astype(np.float64))), rtol=1e-5, atol=1e-6
    )

    # causal conv: one call == any split, == direct float64 convolution from a zero history
    c, kw, t = 10, 4, 9
    xs = rng.normal(size=(t, c)).astype(f32)
    wc = rng.normal(size=(c, kw)).astype(f32)
    pad = np.vstack([np.zeros((kw - 1, c)), xs.astype(np.float64)])
    pre = np.stack([(pad[i : i + kw] * wc.T).sum(0) for i in range(t)])
    direct = pre / (1 + np.exp(-pre))
    st = np.zeros((kw - 1, c), f32)
    np.testing.assert_allclose(be.causal_conv1d(xs, wc, st), direct, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(st, xs[-(kw - 1) :])
    st2 = np.zeros((kw - 1, c), f32)
    parts = [be.causal_conv1d(xs[a:b], wc, st2) for a, b in ((0, 2), (2, 3), (3, 9))]
    np.testing.assert_allclose(np.vstack(parts), direct, rtol=1e-5, atol=1e-6)

    # rotary: pairs (i, i + half) rotate by pos * inv_freq_i; dims past 2*half pass through
    half = 4
    xr = rng.normal(size=(6, 3, 16)).astype(f32)
    pos = np.arange(7, 13)
    inv = 1e4 ** (-np.arange(half) * 2.0 / (2 * half))
    got = be.rotary(xr, pos, inv)
    c64 = (xr[..., :half] + 1j * xr[..., half : 2 * half]) * np.exp(1j * pos[:, None, None] * inv)
    np.testing.assert_allclose(got[..., :half], c64.real, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[..., half : 2 * half], c64.imag, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got[..., 2 * half :], xr[..., 2 * half :])

    # attention: causal GQA with 4 earlier positions in the cache
    hq, hkv, d, start, t = 6, 2, 8, 4, 5
    q = rng.normal(size=(t, hq, d)).astype(f32)
    keys = rng.normal(size=(hkv, start + t, d)).astype(f32)
    vals = rng.normal(size=(hkv, start + t, d)).astype(f32)
    got = be.attention(q, keys, vals, start, d**-0.5)
    for i in range(t):
        for h in range(hq):
            g = h // (hq // hkv)
            s = keys[g, : start + i + 1].astype(np.float64) @ q[i, h] / np.sqrt(d)
            p = np.exp(s - s.max())
            np.testing.assert_allclose(got[i, h], (p / p.sum()) @ vals[g, : start + i + 1], rtol=1e-4, atol=1e-5)

    # gated delta rule: value head j reads key head j // 3
    t, hk, hv, dk, dv = 4, 2, 6, 8, 5
    q = rng.normal(size=(t, hk, dk)).astype(f32)
    k = rng.normal(size=(t, hk, dk)).astype(f32) / 3
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
    st = s0.copy()
    np.testing.assert_allclose(be.gated_delta_rule(q, k, v, g, beta, st), ref, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(st, s64, rtol=1e-4, atol=1e-5)

    # matmul: float and quantised weights
    xm = rng.normal(size=(3, 128)).astype(f32)
    wm = rng.normal(size=(5, 128)).astype(f32)
    np.testing.assert_allclose(be.matmul(xm, wm), xm.astype(np.float64) @ wm.T, rtol=1e-4, atol=1e-5)
    qt = quantize(wm, 4)
    np.testing.assert_allclose(be.matmul(xm, qt), xm.astype(np.float64) @ qt.dequantize().T, rtol=1e-4, atol=1e-4)

    # SwiGLU MLP / routed expert: float weights, quantised (the fused kernel), and a mix (the fallback)
    hid, inter = 128, 64
    mats = {
        "gate": rng.normal(size=(inter, hid)) / np.sqrt(hid),
        "up": rng.normal(size=(inter, hid)) / np.sqrt(hid),
        "down": rng.normal(size=(hid, inter)) / np.sqrt(inter),
    }
    qmats = {n: quantize(m.astype(f32), 4) for n, m in mats.items()}
    for tokens in (1, 4):
        xe = rng.normal(size=(tokens, hid)).astype(f32)
        for ws in ({n: m.astype(f32) for n, m in mats.items()}, qmats, {**qmats, "up": qmats["up"].dequantize()}):
            w64 = {n: (w.dequantize() if isinstance(w, QuantTensor) else w).astype(np.float64) for n, w in ws.items()}
            g64, u64 = xe.astype(np.float64) @ w64["gate"].T, xe.astype(np.float64) @ w64["up"].T
            want = (g64 / (1 + np.exp(-g64)) * u64) @ w64["down"].T
            tol = 1e-5 * np.abs(want).max()
            np.testing.assert_allclose(be.mlp(xe, ws["gate"], ws["up"], ws["down"]), want, rtol=0, atol=tol)
            np.testing.assert_allclose(be.expert_mlp(xe, ExpertWeights(**ws)), want, rtol=0, atol=tol)
    # large gate pre-activations: no overflow, a finite result
    big = np.array([[-200.0, 200.0] * (hid // 2)], f32)
    assert np.isfinite(be.mlp(big, *(mats[n].astype(f32) for n in ("gate", "up", "down")))).all()


def test_route_softmax_topk_renormalised(rng):
    logits = rng.normal(size=(6, 9)).astype(np.float32)
    for k in (1, 3, 9):
        top, w = route(logits, k)
        p = np.exp(logits.astype(np.float64))
        p /= p.sum(-1, keepdims=True)
        for t in range(6):
            want = np.argsort(-p[t])[:k]
            assert set(top[t].tolist()) == set(want.tolist())
            np.testing.assert_allclose(w[t], p[t, top[t]] / p[t, top[t]].sum(), rtol=1e-5)
        np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)


# ---- the network --------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [3, 1, 7])
def test_network_matches_float64_reference(weights, k, rng):
    dense, experts = weights
    ids = prompt(12, rng)
    net = make_net(weights, k=k)
    got = net.forward(ids, net.new_state())
    want, routed = f64_reference(CFG, dense, experts, ids, k)
    assert got.dtype == np.float32 and got.shape == (12, CFG.vocab_size)
    assert relative_error(got, want).max() < 1e-4
    # prefill: exactly one fetch per layer, in layer order, of the union of the routed experts
    calls = net.experts.calls
    assert [layer for layer, _ in calls] == list(range(CFG.num_hidden_layers))
    for layer, ids_fetched in calls:
        assert list(ids_fetched) == sorted(routed[layer])


def test_fetch_chunk_reads_each_expert_once(weights, rng):
    dense, experts = weights
    ids = prompt(15, rng)
    whole = make_net(weights)
    want = whole.forward(ids, whole.new_state())
    chunked = Qwen35MoeNetwork(CFG, dense, DictExperts(experts), CpuBackend(), fetch_chunk=2)
    got = chunked.forward(ids, chunked.new_state())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    src = chunked.experts
    assert all(len(e) <= 2 for _, e in src.calls)
    assert max(src.fetched.values()) == 1  # no expert read twice in a layer
    assert set(src.fetched) == set(whole.experts.fetched)
    with pytest.raises(FmoeError, match="fetch_chunk"):
        Qwen35MoeNetwork(CFG, dense, DictExperts(experts), CpuBackend(), fetch_chunk=0)


def test_quantised_dense_equals_float_on_dequantised_values(weights, rng):
    dense, experts = weights
    qdense = {n: (quantize(v, 4) if v.ndim == 2 and v.shape[1] % 64 == 0 else v) for n, v in dense.items()}
    fdense = {n: (v.dequantize() if isinstance(v, QuantTensor) else v) for n, v in qdense.items()}
    assert sum(isinstance(v, QuantTensor) for v in qdense.values()) > 10
    ids = prompt(6, rng)
    a = Qwen35MoeNetwork(CFG, qdense, DictExperts(experts), CpuBackend())
    b = Qwen35MoeNetwork(CFG, fdense, DictExperts(experts), CpuBackend())
    assert relative_error(a.forward(ids, a.new_state()), b.forward(ids, b.new_state())).max() < 1e-4


@pytest.mark.parametrize("splits", [(1,), (9,), (5, 3), (2, 7, 1)])
def test_decode_with_state_equals_fresh_prefill(weights, splits, rng):
    """Prefill in chunks (``splits``), then decode one token at a time: every step's logits equal
    those of one prefill of the whole sequence (1 = fully token by token)."""
    ids = prompt(20, rng)
    net = make_net(weights)
    full = net.forward(ids, net.new_state())
    state = net.new_state()
    got, pos = [], 0
    for n in splits:
        got.append(net.forward(ids[pos : pos + n], state))
        pos += n
    while pos < len(ids):
        got.append(net.forward(ids[pos : pos + 1], state))
        pos += 1
    assert state.position == len(ids)
    assert relative_error(np.vstack(got), full).max() < 1e-4


def test_state_copy_branches_independently(weights, rng):
    ids = prompt(10, rng)
    net = make_net(weights)
    state = net.new_state()
    net.forward(ids[:6], state)
    branch = state.copy()
    a = net.forward(ids[6:], state)
    b = net.forward(ids[6:], branch)
    np.testing.assert_array_equal(a, b)
    assert state.nbytes > 0
    # both equal a fresh prefill of the whole sequence (a shared buffer would have moved b's state)
    full = net.forward(ids, net.new_state())
    assert relative_error(b, full[6:]).max() < 1e-4
    assert state.position == branch.position == len(ids)


def test_profile_records_phases_and_tokens(weights, rng):
    net = make_net(weights)
    prof = PhaseProfile(CFG.num_hidden_layers)
    state = net.new_state()
    net.forward(prompt(7, rng), state, profile=prof)
    net.forward([3], state, profile=prof)
    net.forward([4], state, profile=prof)
    s = prof.summary()
    assert s["tokens"] == {"prefill": 7, "decode": 2}
    assert s["tokens_per_second"]["prefill"] > 0 and s["tokens_per_second"]["decode"] > 0
    assert set(s["phases"]) == set(PHASES)
    assert len(s["layers"]) == CFG.num_hidden_layers  # the loop below checks every layer
    for layer in s["layers"]:
        assert all(v >= 0 for v in layer.values())
        assert layer["dense"] > 0 and layer["mixer"] > 0 and layer["expert_compute"] > 0
    assert sum(s["phases"].values()) <= s["seconds"]["prefill"] + s["seconds"]["decode"]
    prof.reset()
    assert prof.summary()["tokens"] == {"prefill": 0, "decode": 0}


def test_bad_input_is_one_line_error(weights, rng):
    dense, experts = weights
    for k in (0, CFG.num_experts + 1):
        with pytest.raises(FmoeError, match="--k"):
            make_net(weights, k=k)
    net = make_net(weights)
    for ids, what in (([], "empty"), ([CFG.vocab_size], "vocabulary"), ([-1], "vocabulary")):
        with pytest.raises(FmoeError, match=what):
            net.forward(ids, net.new_state())
    state = net.new_state()
    net.forward(prompt(CFG.max_position_embeddings - 1, rng), state)
    with pytest.raises(FmoeError, match="context limit"):
        net.forward([1, 2], state)
    missing = {n: v for n, v in dense.items() if n != "layers.1.self_attn.k_norm.weight"}
    with pytest.raises(FmoeError, match=r"missing tensor layers\.1\.self_attn\.k_norm\.weight"):
        Qwen35MoeNetwork(CFG, missing, DictExperts(experts), CpuBackend())
    wrong = {**dense, "norm.weight": np.ones(CFG.hidden_size + 1, np.float32)}
    with pytest.raises(FmoeError, match=r"norm\.weight has shape"):
        Qwen35MoeNetwork(CFG, wrong, DictExperts(experts), CpuBackend())
    assert set(expected_dense_shapes(CFG)) == set(dense)


# ---- the real artifacts against the golden outputs of transformers --------------------------------
@pytest.fixture(scope="module")
def golden():
    meta = json.loads((GOLDEN / "tiny_reference.json").read_text())
    data = np.load(GOLDEN / "tiny_reference.npz")
    return meta, {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory, golden):
    from fmoe.runtime.diagnostics import build_packed

    meta, _ = golden
    s = meta["synth"]
    assert s["layout"] == "official" and s["on_grid"]
    work = tmp_path_factory.mktemp("model-artifacts")
    return build_packed(
        work,
        preset=s["preset"],
        seed=s["seed"],
        dense_bits=meta["extract"]["dense_bits"],
        expert_bits=(meta["repack"]["bits"], 2),
    )


def test_packed_model_matches_golden_reference(artifacts, golden):
    import fmoe

    meta, g = golden
    src, packed = artifacts
    spec = importlib.util.spec_from_file_location("fmoe_make_goldens", ROOT / "scripts" / "make_goldens.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.checkpoint_hashes(src) == meta["source_xxh3_128"], (
        "fmoe synth now writes different weights than when tests/golden was made: "
        "if that change is intended, regenerate with `python scripts/make_goldens.py`"
    )
    with fmoe.load(packed, bits=meta["repack"]["bits"]) as model:
        assert model.config.num_experts_per_tok > 2
        assert sum(model.config.is_full_attention(i) for i in range(model.config.num_hidden_layers)) >= 2
        logits = model.logits(g["prompt"])
        rel = relative_error(logits, g["prefill_logits"])
        assert rel.max() < 1e-3, f"prefill rel err {rel.max():.2e}"
        run = fmoe_greedy(model.network, g["prompt"], meta["new_tokens"])
        np.testing.assert_array_equal(run.tokens, g["tokens"])
        assert len(run.tokens) == 64
        # each decode step's logits, through their top-2 margin (the golden file keeps those):
        # within the same 1e-3 relative bar as the prefill
        bound = 1e-3 * np.abs(run.step_logits).max(axis=-1)
        assert np.all(np.abs(run.margins - g["margins"]) < bound), np.abs(run.margins - g["margins"]).max()


def test_prefill_fetches_each_needed_expert_once_per_layer(artifacts, golden):
    import fmoe

    _, g = golden
    _, packed = artifacts
    with fmoe.load(packed) as model:
        net = model.network
        net.experts = counting = CountingSource(net.experts)
        model.store.stats.reset()
        net.forward(g["prompt"], net.new_state())
        assert [layer for layer, _ in counting.calls] == list(range(model.config.num_hidden_layers))
        per_layer = model.store.stats.summary()["per_layer"]
        for (layer, ids), stats in zip(counting.calls, per_layer, strict=True):
            assert len(ids) == len(set(ids)) and len(ids) >= model.k, layer
            assert stats["reads"] == len(ids)  # each needed expert file read once, no more


def test_divergence_script_reports_finite_numbers(artifacts, golden, rng):
    from fmoe.runtime.diagnostics import build_packed

    spec = importlib.util.spec_from_file_location("fmoe_divergence", ROOT / "scripts" / "divergence.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    meta, _ = golden
    src, exact = artifacts
    # same source checkpoint (same work dir), dense weights at 4 bits this time
    _, dense4 = build_packed(
        src.parent, preset=meta["synth"]["preset"], seed=meta["synth"]["seed"], dense_bits=4, expert_bits=(4,)
    )
    rows = mod.measure(exact, dense4, prompt(24, rng), [1, 2])
    names = [r["variant"] for r in rows]
    assert names[:2] == ["dense 4-bit", "experts 2-bit"] and any(n.startswith("K=1") for n in names)
    for r in rows:
        assert np.isfinite(r["kl_mean"]) and 0 <= r["kl_mean"] <= r["kl_max"] < 20
        assert 0.0 <= r["top1"] <= 1.0 and r["positions"] == 24
    mod.render(rows)
