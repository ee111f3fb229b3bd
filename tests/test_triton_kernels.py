"""The Triton kernels (runtime/kernels/triton_moe.py) against float64 numpy on fresh random inputs: on
the GPU where torch sees one, else on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``).

Bound: every path accumulates in float32 and its products are float32-exact or close (the grouped
tensor-core tiles multiply exact integer codes by two float16 halves of the input, which hold it to
about 2**-22 of its row's largest value, each product exact in float32), so against float64 the
norm-wise relative error is the rounding of sums of at most 256 terms whose magnitudes are a few
times the result's (the affine bias cancels against the codes' term): about sqrt(n) * eps * 3,
below 1e-6 (measured on the H200 at full size: 1e-7 to 6e-7). 1e-5 leaves room for exp and the
division in SwiGLU; one wrong code, scale or bias moves a row by about 1/n of its sum, 1e-3 or more.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest
from support import expert_config

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("triton")  # without a GPU, tests/conftest.py has set TRITON_INTERPRET=1 already

from fmoe.formats.packed import ExpertLayout
from fmoe.formats.quant import QuantTensor, quantize
from fmoe.runtime.backends.torch_backend import TorchQuant
from fmoe.runtime.kernels import triton_moe as tm

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
BOUND = 1e-5


# ---- helpers ------------------------------------------------------------------------------------
def dev(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a)).to(DEVICE)


def host(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().numpy()


def check(got: torch.Tensor, want: np.ndarray) -> None:
    """float32, finite everywhere (outputs are NaN-poisoned first), within BOUND of ``want`` (float64)."""
    y = host(got)
    assert y.dtype == np.float32 and y.shape == want.shape
    assert np.isfinite(y).all()
    err = np.linalg.norm(y - want) / np.linalg.norm(want)
    assert err < BOUND, err


def poisoned(*shape: int) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=torch.float32, device=DEVICE)


def torch_quant(qt: QuantTensor) -> TorchQuant:
    """As TorchBackend.weight makes it: int32 words, bf16 scales and biases on the device."""
    bf16 = lambda a: dev(a.view(np.int16)).view(torch.bfloat16)  # noqa: E731
    return TorchQuant(dev(qt.weight.view(np.int32)), bf16(qt.scales), bf16(qt.biases), qt.bits, qt.group_size)


def expert_layout(hidden: int, inter: int, bits: int, group_size: int) -> ExpertLayout:
    cfg = expert_config(hidden, inter, 4)
    return ExpertLayout.for_config(cfg, bits, group_size)


class Experts:
    """``n`` random quantised experts in a device slab, with their float64 dequantised matrices."""

    def __init__(self, rng: np.random.Generator, n: int, hidden: int, inter: int, bits: int, gs: int = 64) -> None:
        self.layout = expert_layout(hidden, inter, bits, gs)
        shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
        experts = [
            {
                p: quantize((rng.standard_normal(sh) / np.sqrt(sh[1])).astype(np.float32), bits, gs)
                for p, sh in shapes.items()
            }
            for _ in range(n)
        ]
        self.slab = dev(np.stack([np.frombuffer(self.layout.encode(e), np.uint8) for e in experts]))
        self.f64 = [{p: q.dequantize().astype(np.float64) for p, q in e.items()} for e in experts]
        self.offsets = tm.ExpertOffsets.from_layout(self.layout)

    def hidden_act(self, slot: int, x: np.ndarray) -> np.ndarray:
        """float64 ``silu(gate x) * (up x)`` of the expert in ``slot``."""
        g, u = self.f64[slot]["gate_proj"] @ x, self.f64[slot]["up_proj"] @ x
        return g / (1 + np.exp(-g)) * u

    def moe(self, slots: np.ndarray, x: np.ndarray, weights: np.ndarray, shared: np.ndarray) -> np.ndarray:
        """float64 ``shared[t] + sum_j weights[t, j] * expert_{slots[t, j]}(x[t])``."""
        out = shared.astype(np.float64).copy()
        for t, j in np.ndindex(*slots.shape):
            out[t] += weights[t, j] * (self.f64[slots[t, j]]["down_proj"] @ self.hidden_act(slots[t, j], x[t]))
        return out


@pytest.fixture(params=["heuristic", "odd"])
def blocks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The launch heuristic's blocks, and blocks that leave partial row, group and column blocks
    (matvec steps of fewer words than a group has, or of several groups; several tl.dot column steps
    in one group)."""
    if request.param == "odd":
        monkeypatch.setattr(tm, "_matvec_blocks", lambda *a, **k: tm._MatvecBlocks(128, 4, 4))
        monkeypatch.setattr(tm, "_grouped_blocks", lambda *a, **k: tm._GemmBlocks(16, 128, 16, 4))
    return str(request.param)


# ---- dense quantised matrices ---------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("n_out", "n_in", "gs"), [(37, 192, 64), (130, 48, 16), (300, 128, 32), (50, 192, 48)])
@pytest.mark.parametrize("tokens", [1, 3, 19])  # 19 tokens of 300 rows: the grouped kernel
def test_qmatvec_matches_float64(
    bits: int, n_out: int, n_in: int, gs: int, tokens: int, blocks: str, rng: np.random.Generator
) -> None:
    w = rng.standard_normal((n_out, n_in)).astype(np.float32) * rng.uniform(0.1, 3, (n_out, 1)).astype(np.float32)
    qt = quantize(w, bits, gs)
    x = rng.standard_normal((tokens, n_in)).astype(np.float32)
    out = poisoned(tokens, n_out)
    assert tm.qmatvec(dev(x), torch_quant(qt), out=out) is out
    check(out, x.astype(np.float64) @ qt.dequantize().astype(np.float64).T)


@pytest.mark.parametrize(
    ("bits", "tokens", "count"), [(4, 1, 4), (2, 3, 3), (8, 1, 6), (4, 19, 2)]
)  # 6 matrices: two launches; 19 tokens: qmatvec each
def test_qmatvecs_match_float64(bits: int, tokens: int, count: int, blocks: str, rng: np.random.Generator) -> None:
    """Several matrices of one input width and format in one launch (rows of 1 to 300, so row blocks
    of every matrix end part-way), each output its own tensor."""
    rows = [300, 1, 37, 64, 5, 130][:count]
    qts = [quantize(rng.standard_normal((r, 192)).astype(np.float32), bits, 64) for r in rows]
    x = rng.standard_normal((tokens, 192)).astype(np.float32)
    got = tm.qmatvecs(dev(x), [torch_quant(q) for q in qts])
    assert [tuple(y.shape) for y in got] == [(tokens, r) for r in rows]
    # checked together: a one-row matrix's single dot product may cancel to near zero
    want = np.concatenate([x.astype(np.float64) @ q.dequantize().astype(np.float64).T for q in qts], axis=1)
    check(torch.cat(got, dim=1), want)


def test_qmatvecs_want_one_format(rng: np.random.Generator) -> None:
    a, b = (torch_quant(quantize(rng.standard_normal((8, 64)).astype(np.float32), bits, 64)) for bits in (4, 8))
    with pytest.raises(ValueError, match=r"qmatvecs: .*one input width and format"):
        tm.qmatvecs(dev(np.ones((1, 64), np.float32)), [a, b])


@pytest.mark.parametrize("bits", [4, 8])
def test_groups_below_a_tensor_core_step_take_the_matvecs(bits: int, rng: np.random.Generator) -> None:
    """Groups of 8 columns (too few for a tl.dot step inside one group): qmatvec, dense_gate_up and
    experts_grouped on many tokens fall back to the matvec kernels, still exact."""
    hidden, inter, tokens = 64, 264, tm._MATVEC_MAX_TOKENS + 1
    assert inter >= tm._GROUPED_MIN_ROWS  # rows enough for the grouped kernel: the group size decides
    w = quantize(rng.standard_normal((inter, hidden)).astype(np.float32), bits, 8)
    up = quantize(rng.standard_normal((inter, hidden)).astype(np.float32), bits, 8)
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    x64, w64, u64 = x.astype(np.float64), w.dequantize().astype(np.float64), up.dequantize().astype(np.float64)
    check(tm.qmatvec(dev(x), torch_quant(w)), x64 @ w64.T)
    g, u = x64 @ w64.T, x64 @ u64.T
    check(tm.dense_gate_up(dev(x), torch_quant(w), torch_quant(up)), g / (1 + np.exp(-g)) * u)
    ex = Experts(rng, 3, hidden, inter, bits, gs=8)
    routed = rng.choice(3, (tokens, 2))
    weights = rng.uniform(0, 1, (tokens, 2)).astype(np.float32)
    shared = rng.standard_normal((tokens, hidden)).astype(np.float32)
    got = tm.experts_grouped(ex.slab, ex.offsets, dev(routed), dev(x), dev(weights), dev(shared))
    check(got, ex.moe(routed, x64, weights, shared))


@pytest.mark.parametrize("tokens", [3, 24])  # the matvecs, the grouped kernel
def test_inputs_of_any_magnitude(tokens: int, rng: np.random.Generator) -> None:
    """Both paths scale their input per row (the grouped kernel's float16 halves; the matvecs' input,
    multiplied by subnormal codes): rows from 1e-25 to 1e25 (far outside float16's range, and
    products that would leave float32's without the scaling) each keep float32 accuracy, and a row
    of zeros gives exact zeros."""
    n_out, n_in = 272, 128
    assert n_out >= tm._GROUPED_MIN_ROWS and (tokens > tm._MATVEC_MAX_TOKENS) == (tokens == 24)
    qt = quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), 4, 32)
    x = rng.standard_normal((tokens, n_in)) * 10.0 ** rng.uniform(-25, 25, (tokens, 1))
    x[rng.integers(tokens)] = 0.0
    x = x.astype(np.float32)
    got = host(tm.qmatvec(dev(x), torch_quant(qt), out=poisoned(tokens, n_out)))
    want = x.astype(np.float64) @ qt.dequantize().astype(np.float64).T
    for row, ref in zip(got, want, strict=True):
        if not ref.any():
            assert not row.any()
        else:
            assert np.linalg.norm(row - ref) / np.linalg.norm(ref) < BOUND


def _check_handed_over(h: torch.Tensor, bits: int, gs: int, rng: np.random.Generator, mp: pytest.MonkeyPatch) -> None:
    """The matvec input an op hands over with its rows ``h`` is what a matvec of that format then reads
    (no preparation launched) and gives float32 accuracy; after an in-place change of the rows the
    matvec prepares them afresh. Above the matvecs' rows nothing is handed over: one preparation."""
    tokens, n = h.shape
    qt = quantize(rng.standard_normal((70, n)).astype(np.float32), bits, gs)
    w64 = qt.dequantize().astype(np.float64)
    launches: list[tuple[int, ...]] = []
    permute = tm._permute_kernel

    class Counted:  # the preparation kernel, its launches recorded
        def __getitem__(self, grid: tuple[int, ...]) -> object:
            launches.append(grid)
            return permute[grid]

    with mp.context() as m:
        m.setattr(tm, "_permute_kernel", Counted())
        check(tm.qmatvec(h, torch_quant(qt)), host(h).astype(np.float64) @ w64.T)
        assert len(launches) == (0 if tokens <= tm._MATVEC_MAX_TOKENS else 1)
        if tokens <= tm._MATVEC_MAX_TOKENS:
            h.mul_(-2.0)  # in place: the input handed over no longer matches the rows
            check(tm.qmatvec(h, torch_quant(qt)), host(h).astype(np.float64) @ w64.T)
            assert len(launches) == 1


def _silu(z: np.ndarray) -> np.ndarray:
    return z / (1 + np.exp(-z))


@pytest.mark.parametrize(("bits", "gs", "n"), [(4, 64, 192), (2, 32, 96), (8, 48, 144)])
@pytest.mark.parametrize("tokens", [1, 4, 6])  # 6 rows: more than the matvecs take, no input prepared
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_prepared(
    bits: int, gs: int, n: int, tokens: int, residual: bool, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The norm against float64, and the matvec input it hands over (:func:`_check_handed_over`)."""
    x = rng.standard_normal((tokens, n)).astype(np.float32) * 10.0 ** rng.uniform(-3, 3, (tokens, 1)).astype(np.float32)
    res = rng.standard_normal((tokens, n)).astype(np.float32) if residual else None
    w = rng.uniform(0.5, 1.5, n).astype(np.float32)
    s, h = tm.rms_norm_prepared(dev(x), dev(w), 1e-6, bits, gs, residual=None if res is None else dev(res))
    s64 = x.astype(np.float64) + (0 if res is None else res)
    if residual:
        check(s, s64)
    check(h, s64 / np.sqrt((s64**2).mean(axis=1, keepdims=True) + 1e-6) * w)
    _check_handed_over(h, bits, gs, rng, monkeypatch)


# heads and head sizes not powers of two (the heads' tile is padded), rows of whole groups
@pytest.mark.parametrize(("bits", "gs", "heads", "d"), [(4, 64, 3, 64), (2, 32, 6, 16), (8, 48, 3, 48)])
@pytest.mark.parametrize("tokens", [1, 4, 6])
def test_gated_norm_and_gate_prepared(
    bits: int, gs: int, heads: int, d: int, tokens: int, rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The DeltaNet's gated norm and the attention's output gate against float64, and the matvec
    input each hands over to the output projection (:func:`_check_handed_over`)."""
    scale = 10.0 ** rng.uniform(-3, 3, (tokens, 1, 1))
    x = (rng.standard_normal((tokens, heads, d)) * scale).astype(np.float32)
    w = rng.uniform(0.5, 1.5, d).astype(np.float32)
    z = (3 * rng.standard_normal((tokens, heads * d))).astype(np.float32)
    got = tm.gated_rms_norm_prepared(dev(x), dev(w), dev(z), 1e-6, bits, gs)
    x64 = x.astype(np.float64)
    normed = x64 / np.sqrt((x64**2).mean(axis=2, keepdims=True) + 1e-6) * w
    check(got, normed.reshape(tokens, -1) * _silu(z.astype(np.float64)))
    _check_handed_over(got, bits, gs, rng, monkeypatch)
    o = x.reshape(tokens, -1)
    got = tm.sigmoid_gate_prepared(dev(o), dev(z), bits, gs)
    check(got, o.astype(np.float64) / (1 + np.exp(-z.astype(np.float64))))
    _check_handed_over(got, bits, gs, rng, monkeypatch)


def test_prepared_ops_reject_bad_arguments() -> None:
    x, w = torch.ones((2, 64), device=DEVICE), torch.ones(64, device=DEVICE)
    with pytest.raises(ValueError, match="rms_norm_prepared: x \\(2, 64\\) is not rows of whole groups of 48"):
        tm.rms_norm_prepared(x, w, 1e-6, 4, 48)
    with pytest.raises(ValueError, match="rms_norm_prepared: weight has shape"):
        tm.rms_norm_prepared(x, torch.ones(32, device=DEVICE), 1e-6, 4, 64)
    with pytest.raises(ValueError, match="rms_norm_prepared: residual"):
        tm.rms_norm_prepared(x, w, 1e-6, 4, 64, residual=torch.ones((1, 64), device=DEVICE))
    with pytest.raises(ValueError, match="sigmoid_gate_prepared: gate has shape"):
        tm.sigmoid_gate_prepared(x, torch.ones((2, 1), device=DEVICE), 4, 64)
    with pytest.raises(ValueError, match="sigmoid_gate_prepared: unsupported bit width 3"):
        tm.sigmoid_gate_prepared(x, x, 3, 64)
    heads = torch.ones((2, 4, 16), device=DEVICE)
    with pytest.raises(ValueError, match="gated_rms_norm_prepared: x must be \\[tokens, heads, head dim\\]"):
        tm.gated_rms_norm_prepared(x, w, x, 1e-6, 4, 64)
    with pytest.raises(ValueError, match="rows of 64 are not whole groups of 48"):
        tm.gated_rms_norm_prepared(heads, torch.ones(16, device=DEVICE), x, 1e-6, 4, 48)
    with pytest.raises(ValueError, match="gated_rms_norm_prepared: gate has shape"):
        tm.gated_rms_norm_prepared(heads, torch.ones(16, device=DEVICE), x[:1], 1e-6, 4, 64)


# ---- experts in a slab --------------------------------------------------------------------------
@pytest.mark.parametrize(("bits", "index"), [(2, torch.int32), (4, torch.int64), (8, torch.int32)])
def test_experts_gate_up_and_down_combine(bits: int, index: torch.dtype, blocks: str, rng: np.random.Generator) -> None:
    hidden, inter, n_slots, n_tok, k = 192, 128, 4, 2, 3
    ex = Experts(rng, n_slots, hidden, inter, bits)
    x = rng.standard_normal((n_tok, hidden)).astype(np.float32)

    # gate/up over pairs in any order, slots and tokens repeating
    slots, token = rng.integers(0, n_slots, 5), rng.integers(0, n_tok, 5)
    h = poisoned(5, inter)
    assert tm.experts_gate_up(ex.slab, ex.offsets, dev(slots).to(index), dev(x), dev(token).to(index), out=h) is h
    check(h, np.stack([ex.hidden_act(s, x[t].astype(np.float64)) for s, t in zip(slots, token, strict=True)]))

    # down + combine on pair t*K + j's hidden activations
    routed = rng.integers(0, n_slots, (n_tok, k))
    h = tm.experts_gate_up(
        ex.slab, ex.offsets, dev(routed.reshape(-1)).to(index), dev(x), dev(np.repeat(np.arange(n_tok), k)).to(index)
    )
    weights = rng.uniform(0, 1, (n_tok, k)).astype(np.float32)
    shared = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    out = poisoned(n_tok, hidden)
    args = (ex.slab, ex.offsets, dev(routed).to(index), h, dev(weights), dev(shared))
    assert tm.experts_down_combine(*args, out=out) is out
    check(out, ex.moe(routed, x.astype(np.float64), weights, shared))
    assert torch.equal(tm.experts_down_combine(*args), out)  # deterministic: no atomics, a fixed order


@pytest.mark.parametrize(("bits", "k"), [(2, 3), (4, 1), (8, 2), (4, 0)])  # K = 0: the shared expert alone
def test_shared_expert_inside_the_expert_launches(bits: int, k: int, blocks: str, rng: np.random.Generator) -> None:
    """The shared expert's gate+up as one more pair per token, its down projection gated by the
    sigmoid of its logit starting each token's sum: the whole MoE block in two launches, against
    float64, through a slot map as decode runs it; matrices of another shape or format refused."""
    hidden, inter, n_slots, n_tok = 128, 64, 5, 2
    ex = Experts(rng, n_slots, hidden, inter, bits)
    sh = {
        p: quantize((rng.standard_normal(shape) / np.sqrt(shape[1])).astype(np.float32), bits, 64)
        for p, shape in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))
    }
    slot_map = rng.permutation(n_slots)
    ids = np.stack([rng.choice(n_slots, k, replace=False) for _ in range(n_tok)]).reshape(n_tok, k)
    x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    weights = rng.dirichlet(np.ones(max(k, 1)), n_tok)[:, :k].astype(np.float32)
    logit = rng.standard_normal((n_tok, 1)).astype(np.float32)
    h = tm.experts_gate_up(
        ex.slab, ex.offsets, dev(ids.reshape(-1)), dev(x), max(k, 1), slot_map=dev(slot_map),
        shared=(torch_quant(sh["gate"]), torch_quant(sh["up"])),
    )  # fmt: skip
    x64 = x.astype(np.float64)
    g, u = (x64 @ sh[p].dequantize().astype(np.float64).T for p in ("gate", "up"))
    pairs = zip(np.repeat(np.arange(n_tok), k), ids.reshape(-1), strict=True)
    routed_h = [ex.hidden_act(slot_map[e], x64[t]) for t, e in pairs]
    check(h, np.stack([*routed_h, *(g / (1 + np.exp(-g)) * u)]))
    out = tm.experts_down_combine(
        ex.slab, ex.offsets, dev(ids), h, dev(weights), dev(logit), slot_map=dev(slot_map),
        shared_down=torch_quant(sh["down"]),
    )  # fmt: skip
    shared = (g / (1 + np.exp(-g)) * u) @ sh["down"].dequantize().astype(np.float64).T / (1 + np.exp(-logit))
    check(out, ex.moe(slot_map[ids], x64, weights, shared))
    other = (torch_quant(quantize(rng.standard_normal((inter, hidden)).astype(np.float32), bits, 32)),) * 2
    with pytest.raises(ValueError, match=r"experts_gate_up: shared gate .* is not an expert matrix"):
        tm.experts_gate_up(ex.slab, ex.offsets, dev(ids.reshape(-1)), dev(x), max(k, 1), shared=other)
    with pytest.raises(ValueError, match=r"experts_down_combine: shared down .* is not an expert matrix"):
        tm.experts_down_combine(ex.slab, ex.offsets, dev(ids), h, dev(weights), dev(logit), shared_down=other[0])


def test_expert_ids_through_a_slot_map_and_implicit_tokens(blocks: str, rng: np.random.Generator) -> None:
    """The decode path's form: ids (not slots) mapped by the kernels through ``slot_map``, pair p
    reading token p // K: bit for bit the explicit form's result."""
    hidden, inter, n_slots, n_tok, k = 128, 64, 5, 2, 3
    ex = Experts(rng, n_slots, hidden, inter, 4)
    slot_map = rng.permutation(n_slots)  # expert e lives in slot slot_map[e]
    ids = np.stack([rng.choice(n_slots, k, replace=False) for _ in range(n_tok)])
    x = dev(rng.standard_normal((n_tok, hidden)).astype(np.float32))
    weights = dev(rng.uniform(0, 1, (n_tok, k)).astype(np.float32))
    shared = dev(rng.standard_normal((n_tok, hidden)).astype(np.float32))
    token = dev(np.repeat(np.arange(n_tok), k))
    h_explicit = tm.experts_gate_up(ex.slab, ex.offsets, dev(slot_map[ids].reshape(-1)), x, token)
    h_mapped = tm.experts_gate_up(ex.slab, ex.offsets, dev(ids.reshape(-1)), x, k, slot_map=dev(slot_map))
    assert torch.equal(h_mapped, h_explicit)
    explicit = tm.experts_down_combine(ex.slab, ex.offsets, dev(slot_map[ids]), h_explicit, weights, shared)
    mapped = tm.experts_down_combine(ex.slab, ex.offsets, dev(ids), h_mapped, weights, shared, slot_map=dev(slot_map))
    assert torch.equal(mapped, explicit)
    check(mapped, ex.moe(slot_map[ids], host(x).astype(np.float64), host(weights), host(shared)))
    with pytest.raises(ValueError, match="pairs at 1 per token"):
        tm.experts_gate_up(ex.slab, ex.offsets, dev(ids.reshape(-1)), x, 1)


@pytest.mark.parametrize(("bits", "gs", "hidden"), [(2, 32, 96), (4, 64, 1152), (8, 48, 144)])
def test_embed_rows_equal_the_dequantised_table(bits: int, gs: int, hidden: int, rng: np.random.Generator) -> None:
    """Rows of a quantised table, repeated and out of order, equal numpy's dequantisation exactly (a
    code times a bf16 scale is exact in float32; the bias is added with one rounding either way);
    1152 columns: two column blocks, the last partial."""
    table = quantize(rng.standard_normal((50, hidden)).astype(np.float32), bits, gs)
    ids = np.array([7, 0, 49, 7, 23])
    got = host(tm.embed_rows(torch_quant(table), dev(ids)))
    np.testing.assert_array_equal(got, table.dequantize()[ids])
    with pytest.raises(ValueError, match="embed_rows: ids must be a 1-D int32 or int64 tensor"):
        tm.embed_rows(torch_quant(table), dev(ids.reshape(1, -1)))


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize(("tokens", "inter"), [(1, 37), (3, 37), (19, 37), (19, 260)])  # the last: grouped
def test_dense_gate_up_matches_float64(
    bits: int, tokens: int, inter: int, blocks: str, rng: np.random.Generator
) -> None:
    """Two separate matrices read by one kernel from the gate's tensors at element offsets."""
    hidden = 192
    g, u = (quantize(rng.standard_normal((inter, hidden)).astype(np.float32) / 14, bits) for _ in range(2))
    x = rng.standard_normal((tokens, hidden)).astype(np.float32)
    got = tm.dense_gate_up(dev(x), torch_quant(g), torch_quant(u))
    x64 = x.astype(np.float64)
    a, b = x64 @ g.dequantize().astype(np.float64).T, x64 @ u.dequantize().astype(np.float64).T
    check(got, a / (1 + np.exp(-a)) * b)
    with pytest.raises(ValueError, match="differ in shape"):
        tm.dense_gate_up(dev(x), torch_quant(g), torch_quant(quantize(rng.standard_normal((5, hidden)), bits)))


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_experts_grouped_matches_float64(bits: int, blocks: str, rng: np.random.Generator) -> None:
    """Many tokens, skewed routing: one slot gets several tiles of pairs, one may get none."""
    hidden, inter, n_slots, n_tok, k = 192, 128, 5, 19, 3
    ex = Experts(rng, n_slots, hidden, inter, bits, gs=32)  # "odd" blocks: tl.dot steps span two groups
    routed = rng.choice(n_slots, (n_tok, k), p=[0.55, 0.25, 0.1, 0.1, 0.0])
    x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    weights = rng.uniform(0, 1, (n_tok, k)).astype(np.float32)
    shared = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    out = poisoned(n_tok, hidden)
    assert (
        tm.experts_grouped(ex.slab, ex.offsets, dev(routed).to(torch.int32), dev(x), dev(weights), dev(shared), out=out)
        is out
    )
    check(out, ex.moe(routed, x.astype(np.float64), weights, shared))


def test_experts_grouped_down_takes_larger_tiles_than_gate_up(
    monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    """Slots with more pairs than GLU's tile holds: the down pass cuts its own, larger tiles (its own
    tile starts, several for the busiest slot), and every pair is still exact."""
    monkeypatch.setattr(tm, "_GROUPED_MIN_PROGRAMS", 1)  # a small problem keeps the largest tiles
    hidden, inter, n_experts, n_tok, k = 256, 128, 3, 150, 2
    pairs = n_tok * k
    glu, down = (tm._grouped_blocks(pairs, n_experts, n, 64, glu=g) for n, g in ((inter, True), (hidden, False)))
    assert down.tokens > glu.tokens
    ex = Experts(rng, 8, hidden, inter, 4, gs=64)  # a slab of more rows than the layer's experts
    slots = np.array([5, 1, 6])[rng.choice(n_experts, (n_tok, k), p=[0.7, 0.2, 0.1])]
    assert (slots == 5).sum() > down.tokens  # the busiest slot spans two of down's tiles
    x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    weights = rng.uniform(0, 1, (n_tok, k)).astype(np.float32)
    shared = rng.standard_normal((n_tok, hidden)).astype(np.float32)
    want = ex.moe(slots, x.astype(np.float64), weights, shared)
    for experts in (None, n_experts):  # the slab's rows, or the layer's experts, bound the distinct slots
        got = tm.experts_grouped(ex.slab, ex.offsets, dev(slots), dev(x), dev(weights), dev(shared), experts=experts)
        check(got, want)
    with pytest.raises(ValueError, match="experts_grouped: experts must be at least 1"):
        tm.experts_grouped(ex.slab, ex.offsets, dev(slots), dev(x), dev(weights), dev(shared), experts=0)


def test_negative_slots_add_nothing(blocks: str, rng: np.random.Generator) -> None:
    """An expert not on the device (slot -1, computed on the host) contributes nothing, whether the
    slot comes through a slot map (decode), directly, or to the grouped prefill kernel; the other
    pairs are exact as before."""
    hidden, inter, n_slots, k = 128, 64, 4, 3
    ex = Experts(rng, n_slots, hidden, inter, 4)
    for n_tok in (2, 5):  # decode, prefill
        ids = np.stack([rng.choice(n_slots + 2, k, replace=False) for _ in range(n_tok)])
        ids[0, :2] = [n_slots, 0]  # one pair elsewhere and one resident, at least
        slot_map = np.concatenate([rng.permutation(n_slots), [-1, -1]])  # ids 4 and 5 are elsewhere
        slots = slot_map[ids]
        x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
        weights = rng.uniform(0, 1, (n_tok, k)).astype(np.float32)
        shared = rng.standard_normal((n_tok, hidden)).astype(np.float32)
        want = ex.moe(np.maximum(slots, 0), x.astype(np.float64), np.where(slots < 0, 0, weights), shared)
        xd, wd, sd = dev(x), dev(weights), dev(shared)
        h = tm.experts_gate_up(ex.slab, ex.offsets, dev(ids.reshape(-1)), xd, k, slot_map=dev(slot_map))
        assert not host(h)[(slots < 0).reshape(-1)].any()  # the pairs elsewhere: h is 0
        check(tm.experts_down_combine(ex.slab, ex.offsets, dev(ids), h, wd, sd, slot_map=dev(slot_map)), want)
        h = tm.experts_gate_up(ex.slab, ex.offsets, dev(slots.reshape(-1)), xd, k)
        check(tm.experts_down_combine(ex.slab, ex.offsets, dev(slots), h, wd, sd), want)
        check(tm.experts_grouped(ex.slab, ex.offsets, dev(slots), xd, wd, sd, out=poisoned(n_tok, hidden)), want)


def host_slab(rows: torch.Tensor) -> torch.Tensor:
    """Slab rows as the host tier holds them: page-locked host memory beside a CUDA device, else as they are."""
    return rows.cpu().pin_memory() if DEVICE.type == "cuda" else rows.clone()


def test_experts_read_in_place_from_a_host_slab(blocks: str, rng: np.random.Generator) -> None:
    """Slots <= -2 are rows of a host slab (``-2 - slot``), read by the kernels in place: decode through
    a slot map (2 tokens), explicit slots and the grouped prefill kernel (9 tokens), each against
    float64 over experts split between the two slabs; slot -1 still adds nothing. (The addressing
    does not depend on the bit width, which the other tests cover.)"""
    hidden, inter, on_device, k = 128, 64, 3, 3
    ex = Experts(rng, 6, hidden, inter, 4, gs=32)
    device_slab, host_rows = ex.slab[:on_device], host_slab(ex.slab[on_device:])
    # expert e: device slot e, host row e - 3 (slot -2 - row); expert 6 is elsewhere (-1)
    slot_map = np.array([0, 1, 2, -2, -3, -4, -1])
    home = np.array([0, 1, 2, 3, 4, 5, 0])  # its matrices in the float64 reference
    for n_tok in (2, 5):  # decode, prefill
        ids = np.stack([rng.choice(7, k, replace=False) for _ in range(n_tok)])
        ids[0] = [4, 1, 6]  # one on the host, one on the device, one elsewhere at least
        x = rng.standard_normal((n_tok, hidden)).astype(np.float32)
        weights = rng.uniform(0, 1, (n_tok, k)).astype(np.float32)
        shared = rng.standard_normal((n_tok, hidden)).astype(np.float32)
        want = ex.moe(home[ids], x.astype(np.float64), np.where(ids == 6, 0, weights), shared)
        xd, wd, sd, mapped = dev(x), dev(weights), dev(shared), dev(slot_map)
        if n_tok == 2:  # decode's form: expert ids through the slot map
            flat = dev(ids.reshape(-1))
            h = tm.experts_gate_up(device_slab, ex.offsets, flat, xd, k, slot_map=mapped, host=host_rows)
            assert not host(h)[(ids == 6).reshape(-1)].any()
            got = tm.experts_down_combine(device_slab, ex.offsets, dev(ids), h, wd, sd, slot_map=mapped, host=host_rows)
            check(got, want)
            continue
        slots = dev(slot_map[ids])
        h = tm.experts_gate_up(device_slab, ex.offsets, slots.reshape(-1), xd, k, host=host_rows)
        check(tm.experts_down_combine(device_slab, ex.offsets, slots, h, wd, sd, host=host_rows), want)
        out = poisoned(n_tok, hidden)
        check(tm.experts_grouped(device_slab, ex.offsets, slots, xd, wd, sd, out=out, host=host_rows), want)
    with pytest.raises(ValueError, match=r"experts_gate_up \(host slab\): slab must be a contiguous uint8"):
        tm.experts_gate_up(device_slab, ex.offsets, dev(ids.reshape(-1)), xd, k, host=host_rows[:, :-4])


@pytest.mark.skipif(DEVICE.type != "cuda", reason="host memory beside a CUDA device")
def test_a_host_slab_must_be_page_locked(rng: np.random.Generator) -> None:
    ex = Experts(rng, 2, 64, 64, 4)
    x, ids = dev(rng.standard_normal((1, 64)).astype(np.float32)), dev(np.array([0, -2]))
    with pytest.raises(ValueError, match="experts_gate_up: a host slab on cpu cannot be read on cuda"):
        tm.experts_gate_up(ex.slab, ex.offsets, ids, x, 2, host=ex.slab.cpu())


def test_empty_inputs(rng: np.random.Generator) -> None:
    ex = Experts(rng, 2, 64, 64, 4)
    none = torch.zeros(0, dtype=torch.int64, device=DEVICE)
    assert tm.experts_gate_up(ex.slab, ex.offsets, none, poisoned(0, 64), none).shape == (0, 64)
    shared = dev(rng.standard_normal((2, 64)).astype(np.float32))
    no_choice = torch.zeros((2, 0), dtype=torch.int64, device=DEVICE)
    empty_w = torch.zeros((2, 0), device=DEVICE)
    assert torch.equal(
        tm.experts_down_combine(ex.slab, ex.offsets, no_choice, poisoned(0, 64), empty_w, shared), shared
    )
    assert torch.equal(tm.experts_grouped(ex.slab, ex.offsets, no_choice, poisoned(2, 64), empty_w, shared), shared)


# ---- arguments ----------------------------------------------------------------------------------
def test_offsets_from_layout() -> None:
    layout = expert_layout(256, 128, 4, 64)
    off = tm.ExpertOffsets.from_layout(layout)
    assert (off.file_size, off.bits, off.group_size, off.hidden, off.inter) == (layout.file_size, 4, 64, 256, 128)
    for proj, got in (("gate_proj", off.gate), ("up_proj", off.up), ("down_proj", off.down)):
        assert got == tuple(layout.components[f"{proj}.{part}"].offset for part in ("weight", "scales", "biases"))
    with pytest.raises(ValueError, match="32-bit words"):
        tm.ExpertOffsets.from_layout(expert_layout(256, 128, 2, 8))
    with pytest.raises(ValueError, match="bit width"):
        tm.ExpertOffsets(off.file_size, 3, 64, 256, 128, off.gate, off.up, off.down)


def test_wrappers_reject_bad_arguments(rng: np.random.Generator) -> None:
    ex = Experts(rng, 2, 64, 64, 4)
    s, o = ex.slab, ex.offsets
    slots = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    x = torch.zeros((2, 64), device=DEVICE)
    with pytest.raises(ValueError, match="slab must be"):
        tm.experts_gate_up(s.view(torch.int32), o, slots, x, slots)
    with pytest.raises(ValueError, match="slab must be"):
        tm.experts_gate_up(s[:, :-4], o, slots, x, slots)
    with pytest.raises(ValueError, match="offsets must be"):
        tm.experts_gate_up(s, ex.layout, slots, x, slots)
    with pytest.raises(ValueError, match="slots must be"):
        tm.experts_gate_up(s, o, slots.float(), x, slots)
    with pytest.raises(ValueError, match="differ in length"):
        tm.experts_gate_up(s, o, slots, x, slots[:2])
    with pytest.raises(ValueError, match="x has shape"):
        tm.experts_gate_up(s, o, slots, torch.zeros((2, 32), device=DEVICE), slots)
    with pytest.raises(ValueError, match="x must be a float32"):
        tm.experts_gate_up(s, o, slots, x.double(), slots)
    with pytest.raises(ValueError, match="out must be"):
        tm.experts_gate_up(s, o, slots, x, slots, out=torch.zeros((3, 32), device=DEVICE))

    routed = torch.zeros((2, 3), dtype=torch.int32, device=DEVICE)
    h, w = torch.zeros((6, 64), device=DEVICE), torch.zeros((2, 3), device=DEVICE)
    with pytest.raises(ValueError, match="slots must be a 2-D"):
        tm.experts_down_combine(s, o, slots, h, w, x)
    with pytest.raises(ValueError, match="h has shape"):
        tm.experts_down_combine(s, o, routed, h[:5], w, x)
    with pytest.raises(ValueError, match="weights has shape"):
        tm.experts_down_combine(s, o, routed, h, w[:, :2], x)
    with pytest.raises(ValueError, match="shared has shape"):
        tm.experts_grouped(s, o, routed, x, w, x[:1])

    qt = torch_quant(quantize(rng.standard_normal((8, 64)).astype(np.float32), 4))
    with pytest.raises(ValueError, match="x has shape"):
        tm.qmatvec(torch.zeros((1, 32), device=DEVICE), qt)
    with pytest.raises(ValueError, match="2-D int32"):
        tm.qmatvec(x, TorchQuant(qt.weight[None], qt.scales, qt.biases, 4, 64))
    with pytest.raises(ValueError, match="scales must be bfloat16"):
        tm.qmatvec(x, TorchQuant(qt.weight, qt.scales.float(), qt.biases, 4, 64))
    with pytest.raises(ValueError, match="32-bit words"):
        tm.qmatvec(x, TorchQuant(qt.weight, qt.scales, qt.biases, 2, 8))


def test_glue_kernels_reject_bad_arguments() -> None:
    """runtime/kernels/triton_ops.py's wrappers: one-line errors naming the argument (their results
    are checked op by op in tests/test_backend_ops.py, backend torch-cpu-triton / torch-cuda)."""
    from fmoe.runtime.kernels import triton_ops as ops

    x = torch.zeros((2, 8), device=DEVICE)
    with pytest.raises(ValueError, match="rms_norm: weight has shape"):
        ops.rms_norm(x, torch.ones(7, device=DEVICE), 1e-6)
    with pytest.raises(ValueError, match="rms_norm: residual must be float32"):
        ops.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, residual=x.double())
    with pytest.raises(ValueError, match="gate has 3 elements"):
        ops.rms_norm(x, torch.ones(8, device=DEVICE), 1e-6, gate=torch.zeros(3, device=DEVICE))
    with pytest.raises(ValueError, match="causal_conv: state has shape"):
        ops.causal_conv(x, torch.zeros((8, 4), device=DEVICE), torch.zeros((2, 8), device=DEVICE))
    with pytest.raises(ValueError, match="route: k 9 must be between 1 and the 8 experts"):
        ops.route(x, 9)
    with pytest.raises(ValueError, match="sigmoid_gate: gate"):
        ops.sigmoid_gate(x, torch.zeros((2, 3), device=DEVICE))
    heads, rot = torch.zeros((2, 3, 8), device=DEVICE), torch.zeros((2, 2), device=DEVICE)
    with pytest.raises(ValueError, match="norm_rope: weight has shape"):
        ops.norm_rope(heads, torch.ones(4, device=DEVICE), 1e-6, rot, rot)
    with pytest.raises(ValueError, match="norm_rope: sin has shape"):
        ops.norm_rope(heads, torch.ones(8, device=DEVICE), 1e-6, rot, torch.zeros((2, 3), device=DEVICE))
    with pytest.raises(ValueError, match="norm_rope: cos \\(2, 5\\) rotates 10 dims of heads of 8"):
        ops.norm_rope(heads, torch.ones(8, device=DEVICE), 1e-6, *(torch.zeros((2, 5), device=DEVICE),) * 2)
    q = torch.zeros((1, 2, 4), device=DEVICE)
    with pytest.raises(ValueError, match="not a multiple of 2 key heads"):
        ops.gated_delta_rule(q, q, torch.zeros((1, 3, 4), device=DEVICE), *(torch.zeros((1, 3), device=DEVICE),) * 2,
                             torch.zeros((3, 4, 4), device=DEVICE))  # fmt: skip


@pytest.mark.parametrize(("experts", "k", "tokens"), [(512, 10, 3), (256, 8, 1), (1500, 4, 2), (7, 7, 2)])
def test_route_picks_the_largest_probabilities_in_order(
    experts: int, k: int, tokens: int, rng: np.random.Generator
) -> None:
    """The 397B's 512 experts and K=10, the 35B's 256 and 8, more experts than one warp's kernel takes
    (four warps), every expert picked: against float64 softmax, the picks in descending order of
    probability, ties (copied logits) to the lowest id, and the weights renormalised over the picks."""
    from fmoe.runtime.kernels import triton_ops as ops

    logits = rng.normal(size=(tokens, experts)).astype(np.float32)
    logits[:, 5] = logits[:, 3] = logits.max(1)  # a tie at the top: 3 first, then 5
    ids, w = ops.route(dev(logits), k)
    ids, w = host(ids), host(w)
    p = np.exp(logits.astype(np.float64) - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    for t in range(tokens):
        want = sorted(range(experts), key=lambda i: (-p[t, i], i))[:k]
        assert ids[t].tolist() == want
        np.testing.assert_allclose(w[t], p[t, want] / p[t, want].sum(), rtol=1e-5)


def test_route_breaks_ties_by_the_lowest_id() -> None:
    from fmoe.runtime.kernels import triton_ops as ops

    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]], device=DEVICE)
    ids, w = ops.route(logits, 3)
    assert host(ids).tolist() == [[1, 3, 4]]
    np.testing.assert_allclose(host(w), [[1 / 3] * 3], rtol=1e-6)


# ---- programmatic dependent launch --------------------------------------------------------------
def test_pdl_is_on_only_in_its_scope_on_cuda_devices_that_have_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """PDL's launch keyword comes only with the kernels' wait (a kernel launched early without it
    would race), on only inside ``launches()`` for CUDA of compute capability 9.0 and later, unless
    FMOE_PDL=0; off, Triton's option is not passed at all."""
    from fmoe.runtime.kernels import pdl

    off = {"PDL": False}
    monkeypatch.setattr(pdl, "_ENABLED", True)
    with pdl.launches():
        assert pdl.pdl(torch.device("cpu")) == off
        for capable in (True, False):
            monkeypatch.setattr(pdl, "_capable", lambda index, c=capable: c)
            assert pdl.pdl(torch.device("cuda", 0)) == ({"PDL": True, "launch_pdl": True} if capable else off)
        monkeypatch.setattr(pdl, "_ENABLED", False)
        assert pdl.pdl(torch.device("cuda", 0)) == off
    monkeypatch.setattr(pdl, "_ENABLED", True)
    assert pdl.pdl(torch.device("cuda", 0)) == off  # out of the scope: plain launches


def test_every_kernel_waits_for_its_predecessor_before_anything_else() -> None:
    """Each Triton kernel takes the PDL constexpr and starts with pdl_start (after its docstring):
    launched with PDL it may start while the previous kernel runs, so it must read and write nothing
    before the wait."""
    import ast
    import inspect

    from fmoe.runtime.kernels import triton_ops

    kernels = [
        fn
        for module in (tm, triton_ops)
        for name, fn in vars(module).items()
        if name.endswith("_kernel") and hasattr(fn, "fn")
    ]
    assert len(kernels) >= 15
    for kernel in kernels:
        tree = ast.parse(inspect.getsource(kernel.fn))
        fn = tree.body[0]
        assert isinstance(fn, ast.FunctionDef)
        assert "PDL" in [a.arg for a in fn.args.args], kernel.fn.__name__
        first = fn.body[1] if ast.get_docstring(fn) is not None else fn.body[0]
        assert ast.unparse(first) == "pdl_start(PDL)", kernel.fn.__name__


@pytest.mark.parametrize("tokens", [1, 2, 3, 17, 40])
def test_causal_conv_over_token_blocks_matches_float64(
    tokens: int, monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator
) -> None:
    """The conv's grid over channel and token blocks (4-token blocks here: a prompt spans several, and
    only the first reads the old state, which it then replaces): outputs and the new state against
    float64, from a state that is not zero, for prompts shorter and longer than the state."""
    from fmoe.runtime.kernels import triton_ops as ops

    monkeypatch.setattr(ops, "_CONV_TOKENS", 4)
    monkeypatch.setattr(ops, "_CONV_CHANNELS", 64)
    channels, width = 150, 4
    x = rng.standard_normal((tokens, channels)).astype(np.float32)
    w = rng.standard_normal((channels, width)).astype(np.float32)
    state = rng.standard_normal((width - 1, channels)).astype(np.float32)
    full = np.vstack([state, x]).astype(np.float64)
    pre = np.stack([(full[t : t + width] * w.T.astype(np.float64)).sum(0) for t in range(tokens)])
    st = dev(state)
    check(ops.causal_conv(dev(x), dev(w), st), pre / (1 + np.exp(-pre)))
    np.testing.assert_array_equal(host(st), full[-(width - 1) :].astype(np.float32))
