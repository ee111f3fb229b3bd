"""`fmoe eval`'s measures on hand-made distributions (against float64 computed independently here),
the well-formed-call check, saved references, routing traces, and the CLI's one-line errors.
The end-to-end bounds on the trained model are in tests/test_reference_model.py."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.errors import FmoeError
from fmoe.runtime.eval import (
    PositionMetrics,
    Reference,
    call_prompts,
    call_report,
    compare,
    cut_call,
    log_softmax,
    scored,
    summarise,
    window_starts,
)
from fmoe.runtime.routing_trace import RoutingTrace, routing_source

runner = CliRunner()


def _by_hand(p_logits: list[float], q_logits: list[float], target: int) -> dict[str, float]:
    """One position's measures with Python floats (math.exp/log): an independent float64 computation."""

    def probs(z: list[float]) -> list[float]:
        m = max(z)
        e = [math.exp(v - m) for v in z]
        return [v / sum(e) for v in e]

    p, q = probs(p_logits), probs(q_logits)
    top = max(range(len(p)), key=lambda i: p[i])
    return {
        "kl": sum(pi * (math.log(pi) - math.log(qi)) for pi, qi in zip(p, q, strict=True) if pi > 0),
        "nll": -math.log(q[target]),
        "nll_ref": -math.log(p[target]),
        "dp": q[target] - p[target],
        "dp_top": q[top] - p[top],
        "same_top": float(max(range(len(q)), key=lambda i: q[i]) == top),
    }


def test_identical_models_diverge_by_nothing(rng: np.random.Generator) -> None:
    logits = rng.normal(0, 3, (50, 300)).astype(np.float32)
    targets = rng.integers(0, 300, 50)
    m = compare(log_softmax(logits), targets, logits)
    assert np.abs(m.kl).max() < 1e-12 and m.same_top.all()
    assert np.abs(m.dp).max() < 1e-12 and np.abs(m.dp_top).max() < 1e-12
    s = summarise(m)
    assert s["kl_mean"] < 1e-12 and s["same_top"] == 1.0 and s["ppl"] == pytest.approx(s["ppl_ref"], rel=1e-12)
    assert s["ln_ppl_ratio"] == pytest.approx(0.0, abs=1e-12)


def test_known_distributions() -> None:
    # p = (1/2, 1/4, 1/4), q = (1/4, 1/2, 1/4): KL(p||q) = ln2/2 - ln2/4 = ln2/4; shifted logits change nothing
    p = np.log([[0.5, 0.25, 0.25]])
    q = np.log([[0.25, 0.5, 0.25]]) + 7.0
    m = compare(p, np.array([1]), q)
    assert m.kl[0] == pytest.approx(math.log(2) / 4, rel=1e-14)
    assert m.nll[0] == pytest.approx(math.log(2), rel=1e-14) and m.nll_ref[0] == pytest.approx(math.log(4), rel=1e-14)
    assert m.dp[0] == pytest.approx(0.25, rel=1e-14)  # q(target 1) - p(target 1) = 1/2 - 1/4
    assert m.dp_top[0] == pytest.approx(-0.25, rel=1e-14)  # the reference's top token 0: 1/4 - 1/2
    assert not m.same_top[0]


def test_random_distributions_match_float64_by_hand(rng: np.random.Generator) -> None:
    n, vocab = 40, 64
    p_logits = rng.normal(0, 4, (n, vocab)) + 1000.0  # large offsets: the softmax must be stable
    q_logits = p_logits + rng.normal(0, 0.5, (n, vocab))
    q_logits[::7] = rng.normal(0, 4, (len(q_logits[::7]), vocab))  # some positions far apart
    targets = rng.integers(0, vocab, n)
    m = compare(log_softmax(p_logits), targets, q_logits.astype(np.float32))
    for i in range(n):
        want = _by_hand(list(p_logits[i]), [float(v) for v in q_logits[i].astype(np.float32)], int(targets[i]))
        for name in ("kl", "nll", "nll_ref", "dp", "dp_top", "same_top"):
            assert float(getattr(m, name)[i]) == pytest.approx(want[name], rel=1e-9, abs=1e-12), (i, name)
    assert (m.kl >= 0).all()


def test_summary_statistics() -> None:
    kl = np.array([0.0, 0.1, 0.2, 0.3, 1.0])
    nll, nll_ref = np.array([1.0, 2.0, 3.0, 2.0, 2.0]), np.array([1.0, 1.0, 2.0, 2.0, 2.0])
    same = np.array([True, True, False, True, False])
    dp, dp_top = np.array([0.1, -0.1, 0.2, 0.0, -0.2]), np.array([-0.1, 0.0, -0.3, 0.0, 0.1])
    s = summarise(PositionMetrics(nll, nll_ref, kl, same, dp, dp_top))
    assert s["positions"] == 5
    assert s["ppl"] == pytest.approx(math.exp(2.0)) and s["ppl_ref"] == pytest.approx(math.exp(1.6))
    assert s["ln_ppl_ratio"] == pytest.approx(0.4)
    assert s["kl_mean"] == pytest.approx(0.32) and s["kl_median"] == pytest.approx(0.2) and s["kl_max"] == 1.0
    assert s["kl_p99"] == pytest.approx(0.3 + 0.96 * 0.7)  # linear interpolation between the two largest
    assert s["kl_mean_se"] == pytest.approx(np.std(kl, ddof=1) / math.sqrt(5))
    assert s["same_top"] == pytest.approx(0.6) and s["same_top_se"] == pytest.approx(math.sqrt(0.6 * 0.4 / 5))
    assert s["dp_mean"] == pytest.approx(0.0, abs=1e-15) and s["dp_rms"] == pytest.approx(math.sqrt(0.1 / 5))
    assert s["dp_top_mean"] == pytest.approx(-0.06)
    with pytest.raises(FmoeError, match="no scored positions"):
        summarise(PositionMetrics(*(np.zeros(0),) * 6))


def test_windows_score_the_second_halves() -> None:
    assert window_starts(1100, 512) == [0, 512] and window_starts(511, 512) == []
    s = scored(512)
    assert (s.start, s.stop) == (256, 511)  # positions 256..510 predict tokens 257..511 of the window
    assert scored(8) == slice(4, 7)


def test_call_prompts_and_the_well_formed_cut() -> None:
    body = [f"x{i} = {i}" for i in range(14)]
    body += ["    result = os.path.join(base, name)", "print()", "# call(me)", "    if check(x):", "y = f(a"]
    prompts = call_prompts("\n".join(body), 10, context_lines=12)
    assert [p.head for p in prompts] == ["    result = os.path.join"]  # empty, comment, block, unclosed: skipped
    p = prompts[0]
    assert p.original == "(base, name)" and p.prompt.endswith("x13 = 13\n    result = os.path.join")
    assert cut_call(p.head, "(base, name)\n    return result\n") == "(base, name)"
    assert cut_call(p.head, "(base,\n        name)\n") == "(base,\n        name)"  # closes on its second line
    assert cut_call(p.head, "(base, name))\n") is None and cut_call(p.head, "(base, name") is None
    r = call_report([p, p], ["(base, name)\n", "(a\n"], ["(base, name)\nfoo", "(b)\n"])
    assert r == {"prompts": 2, "well_formed": 0.5, "as_original": 0.5, "as_reference": 0.5}


def test_saved_reference_round_trip(tmp_path: Path, rng: np.random.Generator) -> None:
    ctx, tokens = 8, rng.integers(0, 50, 16)
    targets = np.concatenate([tokens[s : s + ctx][1:][scored(ctx)] for s in (0, 8)])
    lp = log_softmax(rng.normal(size=(len(targets), 50))).astype(np.float32)
    ref = Reference("model q4", tokens, ctx, lp, targets, ["(a)\n"])
    ref.save(tmp_path / "r.npz")
    back = Reference.load(tmp_path / "r.npz")
    assert np.array_equal(back.tokens, tokens) and np.array_equal(back.targets, targets)
    assert np.array_equal(back.logits, lp) and back.ctx == ctx and back.calls == ["(a)\n"]
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "array.npy", lp)
    for bad in ("bad.npz", "array.npy"):
        with pytest.raises(FmoeError, match=r"not a reference saved by .*npz"):
            Reference.load(tmp_path / bad)


# ---- routing traces --------------------------------------------------------------------------------------
def _trace(experts: list[list[list[int]]], num_experts: int, starts: tuple[int, ...] = (0,)) -> RoutingTrace:
    e = np.asarray(experts, dtype=np.uint16)
    return RoutingTrace(e, np.full(e.shape, 1 / e.shape[2], np.float16), np.asarray(starts, np.int64), num_experts)


def test_trace_statistics_by_hand() -> None:
    # one layer, k=2, 6 experts; tokens: {0,1} {0,1} {1,2} | new sequence {3,4} {4,0}
    t = _trace([[[0, 1]], [[0, 1]], [[2, 1]], [[3, 4]], [[4, 0]]], 6, starts=(0, 3))
    assert t.popularity().tolist() == [[3, 3, 1, 1, 2, 0]]
    # pairs within a sequence: (t1,t0): 2 shared, (t2,t1): 1, (t4,t3): 1; the pair across the start is not one
    assert t.reuse().tolist() == pytest.approx([(2 + 1 + 1) / 3 / 2])
    # LRU of 2: 0m 1m | 0h 1h | 2m(evict 0) 1h | 3m(evict 2) 4m(evict 1) | 4h 0m  -> 4 hits of 10
    assert t.lru_hit_rate(2).tolist() == pytest.approx([0.4])
    assert t.lru_hit_rate(6).tolist() == pytest.approx([(10 - 5) / 10])  # only first uses miss
    u = t.uniform()
    assert u.experts.shape == t.experts.shape and (np.sort(u.experts, axis=2)[:, :, 0] != u.experts.max(2)).all()
    rows = t.summary(capacities=(2,))
    assert rows[0]["top_share"] == pytest.approx(0.3) and rows[0]["max_load"] == pytest.approx(1.8)
    assert rows[0]["min_load"] == 0.0 and rows[0]["lru"]["2"]["trace"] == pytest.approx(0.4)


def test_trace_file_round_trip_and_refusals(tmp_path: Path) -> None:
    t = _trace([[[0, 1], [2, 3]], [[1, 2], [3, 0]]], 4)
    t.meta = {"text": "x"}
    t.save(tmp_path / "t.npz")
    back = RoutingTrace.load(tmp_path / "t.npz")
    assert np.array_equal(back.experts, t.experts) and back.num_experts == 4 and back.meta["text"] == "x"
    assert (back.tokens, back.num_layers, back.k) == (2, 2, 2)
    back.check(2, 4, 1)
    with pytest.raises(FmoeError, match="recorded on 2 layers x 4 experts"):
        back.check(2, 8, 2)
    with pytest.raises(FmoeError, match="K=3 cannot be replayed"):
        back.check(2, 4, 3)

    def bad(path: Path, match: str, **arrays: object) -> None:
        base = {"experts": t.experts, "weights": t.weights, "starts": t.starts,
                "meta": '{"format": "fmoe-routing-trace", "version": 1, "num_experts": 4}'}  # fmt: skip
        np.savez(path, **{**base, **arrays})
        with pytest.raises(FmoeError, match=match):
            RoutingTrace.load(path)

    bad(tmp_path / "a.npz", "uint16", experts=t.experts.astype(np.int64))
    bad(tmp_path / "b.npz", "does not cover", experts=t.experts + 3)
    bad(tmp_path / "c.npz", "same expert twice", experts=np.zeros_like(t.experts))
    bad(tmp_path / "d.npz", "starts must", starts=np.array([1], np.int64))
    bad(tmp_path / "e.npz", "its format is not fmoe-routing-trace", meta='{"format": "other"}')
    with pytest.raises(FmoeError, match="no such file"):
        RoutingTrace.load(tmp_path / "missing.npz")
    np.save(tmp_path / "array.npy", t.experts)
    with pytest.raises(FmoeError, match=r"not an \.npz archive"):
        RoutingTrace.load(tmp_path / "array.npy")


def test_routing_sources(tmp_path: Path) -> None:
    """Replayed routing: valid distinct ids, seeded, Zipf skewed as asked, traces in token order."""
    assert routing_source("model", 2, 16, 4) is None
    uniform = routing_source("uniform", 2, 16, 4)
    zipf = routing_source("zipf:1.5", 2, 16, 4)
    assert uniform is not None and zipf is not None and zipf.name == "zipf:1.5"
    tokens = np.arange(4000)
    counts = {}
    for name, src in (("uniform", uniform), ("zipf", zipf)):
        ids = src.pick(1, tokens, 4)
        assert ids.shape == (4000, 4) and ids.min() >= 0 and ids.max() < 16
        assert (np.diff(np.sort(ids, axis=1), axis=1) > 0).all()  # k distinct experts per token
        assert np.array_equal(src.pick(1, tokens[7:9], 4), ids[7:9])  # the same token draws the same
        counts[name] = np.bincount(ids.ravel(), minlength=16) / ids.size
    # uniform: each expert 1/16 (4000 draws of 4: sd about 0.002); Zipf 1.5 over 16 without replacement:
    # the most popular expert is in nearly every token (share near 1/4), the least in few
    assert np.abs(counts["uniform"] - 1 / 16).max() < 0.012
    assert counts["zipf"].max() > 0.2 and counts["zipf"].min() < 0.03
    # each layer ranks its experts in its own order
    assert zipf.pick(0, tokens, 1).tolist() != zipf.pick(1, tokens, 1).tolist()

    t = _trace([[[0, 1], [2, 3]], [[1, 2], [3, 0]], [[3, 2], [1, 0]]], 4)
    t.meta = {}
    t.save(tmp_path / "t.npz")
    replay = routing_source(f"trace:{tmp_path / 't.npz'}", 2, 4, 1)
    assert replay is not None
    assert replay.pick(1, np.array([0, 1, 2, 3, 4]), 1).ravel().tolist() == [2, 3, 1, 2, 3]  # wraps around

    bad = {"zipf:0": "Zipf exponent", "zipf:x": "Zipf exponent", "lru": "expected model",
           "trace:": "expected model", f"trace:{tmp_path / 't.npz'}": "recorded on 2 layers"}  # fmt: skip
    for spec, match in bad.items():
        with pytest.raises(FmoeError, match=match):
            routing_source(spec, 3, 4, 2)


# ---- the CLI's one-line errors --------------------------------------------------------------------------
def test_eval_bad_options(tmp_path: Path) -> None:
    def err(*args: str) -> str:
        return assert_cli_error(runner.invoke(app, ["eval", str(tmp_path), *args]))

    assert "--bits 3" in err("--bits", "3") and "--k 'x'" in err("--k", "4,x")
    assert "--ctx 2" in err("--ctx", "2") and "--tokens 100" in err("--tokens", "100")
    assert "--calls -1" in err("--calls", "-1")
    assert "no such file or directory" in err("--reference", str(tmp_path / "nope"))
    assert "must end in .npz" in err("--save-reference", str(tmp_path / "r.txt"))
    assert "not a packed fmoe directory" in err()
