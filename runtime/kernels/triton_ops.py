"""Triton kernels for the model's glue ops on the NVIDIA fast path: norms (the attention's q/k norm
with its RoPE), the Gated DeltaNet's conv, inputs and recurrence, routing, gates.

In plain torch each of these ops is a chain of small kernels (an RMSNorm is six, a DeltaNet step
about forty): a decode layer was about 80 launches, and at batch 1 launches, not bytes, set the
pace even inside a CUDA graph. Here each op is one launch. Same float32 formulas as the torch ops
(runtime/backends/torch_backend.py), sums in a different order: the conformance suite
(tests/test_backend_ops.py, backend ``torch-cpu-triton`` through Triton's interpreter, and
``torch-cuda``) holds them to the same float64 bounds.

Every wrapper takes float32 tensors of one device, checks shapes on the host only (nothing is read
back from the device, so calls can be captured in CUDA graphs) and returns new tensors, except
:func:`causal_conv`, :func:`gated_delta_rule` and :func:`delta_rule`, which update their state in place.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from fmoe.runtime.kernels.pdl import pdl, pdl_start
from fmoe.runtime.kernels.triton_steps import write_int8_groups

_MAX_BLOCK = 16384  # columns one program holds at once; longer rows are taken in steps
_CONV_CHANNELS = 256  # channels per program of the conv ...
_CONV_TOKENS = 16  # ... over this many tokens (a prefill's token blocks run in parallel)
_STATE_COLUMNS = 32  # value columns per program of the recurrence (a [dk, 32] float32 state tile)


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


# ---- kernels ------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_kernel(
    x,
    x_stride,
    res,
    w,
    gate,
    s_out,
    out,
    N,
    eps,
    HAS_RES: tl.constexpr,
    HAS_GATE: tl.constexpr,
    BLOCK: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Row r: ``s = x[r] (+ res[r])``, ``out[r] = s * rsqrt(mean(s^2) + eps) * w (* silu(gate[r]))``.
    ``x`` rows are ``x_stride`` apart, everything else contiguous rows of N. The second pass
    recomputes ``s`` from the inputs rather than reading ``s_out`` (written by other threads)."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    sq = tl.zeros((BLOCK,), dtype=tl.float32)
    for c0 in range(0, N, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < N
        s = tl.load(x + r * x_stride + c, mask=m, other=0.0)
        if HAS_RES:
            s += tl.load(res + r * N + c, mask=m, other=0.0)
            tl.store(s_out + r * N + c, s, mask=m)
        sq += s * s
    inv = 1.0 / tl.sqrt(tl.sum(sq, axis=0) / N + eps)
    for c0 in range(0, N, BLOCK):
        c = c0 + tl.arange(0, BLOCK)
        m = c < N
        s = tl.load(x + r * x_stride + c, mask=m, other=0.0)
        if HAS_RES:
            s += tl.load(res + r * N + c, mask=m, other=0.0)
        y = s * inv * tl.load(w + c, mask=m, other=0.0)
        if HAS_GATE:
            z = tl.load(gate + r * N + c, mask=m, other=0.0)
            y = y * (z / (1.0 + tl.exp(-z)))
        tl.store(out + r * N + c, y, mask=m)


@triton.jit
def _conv_kernel(
    x, w, state, out, T, C, W: tl.constexpr, BLOCK: tl.constexpr, BLOCK_T: tl.constexpr, PDL: tl.constexpr = False
):
    """Depthwise causal conv of width W over ``full = [state; x]`` (``state`` the last W-1 inputs),
    then SiLU: ``out[t, c] = silu(sum_j full[t + j, c] * w[c, j])``; then ``state = full[T:]`` in
    place. A program owns a block of channels over a block of tokens (BLOCK_T >= W - 1), so only the
    first token block reads ``state``: it writes the new one after a barrier, once its reads are done."""
    pdl_start(PDL)
    c = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    cm = c < C
    t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    m = (t < T)[:, None] & cm[None, :]
    acc = tl.zeros((BLOCK_T, BLOCK), dtype=tl.float32)
    for j in tl.static_range(W):
        src = (t + j)[:, None]  # row of full
        old = tl.load(state + src * C + c[None, :], mask=m & (src < W - 1), other=0.0)
        new = tl.load(x + (src - (W - 1)) * C + c[None, :], mask=m & (src >= W - 1), other=0.0)
        acc += (old + new) * tl.load(w + c * W + j, mask=cm, other=0.0)[None, :]
    tl.store(out + t[:, None] * C + c[None, :], acc / (1.0 + tl.exp(-acc)), mask=m)
    if tl.program_id(1) == 0:
        tl.debug_barrier()  # every thread's reads of the old state are done
        for i in tl.static_range(W - 1):  # ascending: row T + i > i is read before row i is written
            row = c * 0 + T + i  # of full (as a vector: the masks are vectors)
            kept = tl.load(state + row * C + c, mask=cm & (row < W - 1), other=0.0)
            came = tl.load(x + (row - (W - 1)) * C + c, mask=cm & (row >= W - 1), other=0.0)
            tl.store(state + i * C + c, kept + came, mask=cm)


@triton.jit
def _delta_inputs_kernel(
    qkv,
    a,
    b,
    a_log,
    dt_bias,
    q_out,
    k_out,
    g_out,
    beta_out,
    C,
    q_scale,
    HK: tl.constexpr,
    DK: tl.constexpr,
    HV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    """Program (t, r): r < 2*HK l2-normalises query (scaled by DK^-0.5) or key head r of token t;
    r == 2*HK computes the token's decays ``g = -exp(A_log) * softplus(a + dt_bias)`` and
    ``beta = sigmoid(b)`` for every value head."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    r = tl.program_id(1)
    # the branches' variables have their own names: the compiler wants one type per name
    if r < 2 * HK:
        i = tl.arange(0, BLOCK_K)
        im = i < DK
        row = _l2_normalize(tl.load(qkv + t * C + r * DK + i, mask=im, other=0.0))
        if r < HK:
            tl.store(q_out + (t * HK + r) * DK + i, row * q_scale, mask=im)
        else:
            tl.store(k_out + (t * HK + r - HK) * DK + i, row, mask=im)
    else:
        h = tl.arange(0, BLOCK_H)
        hm = h < HV
        z = tl.load(a + t * HV + h, mask=hm, other=0.0) + tl.load(dt_bias + h, mask=hm, other=0.0)
        tl.store(g_out + t * HV + h, _log_decay(z, tl.load(a_log + h, mask=hm, other=0.0)), mask=hm)
        tl.store(beta_out + t * HV + h, _sigmoid(tl.load(b + t * HV + h, mask=hm, other=0.0)), mask=hm)


@triton.jit
def _l2_normalize(row):
    """``row / sqrt(sum(row^2) + 1e-6)``: the reference DeltaNet's l2norm, its epsilon included."""
    return row / tl.sqrt(tl.sum(row * row, axis=0) + 1e-6)


@triton.jit
def _log_decay(z, a_log):
    """``-exp(A_log) * softplus(z)`` (z = a + dt_bias): softplus as ``max(z, 0) + log1p(exp(-|z|))``,
    log1p's series where 1 + e would round."""
    e = tl.exp(-tl.abs(z))
    return -tl.exp(a_log) * (tl.maximum(z, 0.0) + tl.where(e < 1e-4, e - 0.5 * e * e, tl.log(1.0 + e)))


@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _delta_rule_kernel(
    q,
    k,
    qk_row,
    v,
    v_stride,
    g,
    beta,
    a_log,
    dt_bias,
    q_scale,
    state,
    out,
    T,
    HK: tl.constexpr,
    DK: tl.constexpr,
    HV: tl.constexpr,
    DV: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    RAW: tl.constexpr,
    z=None,
    norm_w=None,
    eps=0.0,
    xp=None,
    X_ROW: tl.constexpr = 0,
    NORM: tl.constexpr = False,
    BITS: tl.constexpr = 4,
    GS: tl.constexpr = 64,
    NG_P: tl.constexpr = 1,
    WPG_P: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    """Program (value head h, block of value columns): the head's state tile ``[DK, BLOCK_V]`` stays
    in registers over the T tokens: ``S *= exp(g)``, ``S += k (x) (v - S^T k) * beta``,
    ``o = S^T q``, with key head ``h // (HV / HK)``; written back once at the end. Token rows of q
    and k are ``qk_row`` apart. RAW: q, k, g and beta are what :func:`delta_rule_inputs` takes (the
    conv output's q and k, a and b), turned into the recurrence's inputs here as that kernel does:
    one launch fewer a layer, the inputs never stored.

    NORM (a program holds the whole head, BLOCK_V >= DV): ``out`` is the gated norm's output
    ``o * rsqrt(mean(o^2) + eps) * norm_w * silu(z)`` (as ``gated_rms_norm``), and its groups of GS
    columns (whole in a head) go to the int8 input rows ``xp`` of the output projection (BITS, GS,
    NG_P, WPG_P as ``write_int8_groups`` takes them): another launch fewer."""
    pdl_start(PDL)
    h = tl.program_id(0).to(tl.int64)
    kh = h // (HV // HK)
    i = tl.arange(0, BLOCK_K)
    j = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    im, jm = i < DK, j < DV
    sm = im[:, None] & jm[None, :]
    tile = state + h * DK * DV + i[:, None] * DV + j[None, :]
    s = tl.load(tile, mask=sm, other=0.0)
    a_log_h, bias_h = 0.0, 0.0
    if RAW:
        a_log_h = tl.load(a_log + h)
        bias_h = tl.load(dt_bias + h)
    qt, kt, vt, gt, bt = _delta_step_inputs(q, k, v, g, beta, 0, T, qk_row, v_stride, kh, h, i, j, im, jm, HV, DK, DV)
    qt, kt, gt, bt = _delta_step_prepare(qt, kt, gt, bt, a_log_h, bias_h, q_scale, RAW)
    for t in range(T):
        # the next token's loads go out before this token's arithmetic, which hides their latency
        # (a prefill's tokens are a chain of steps; each waited for its own loads)
        qn, kn, vn, gn, bn = _delta_step_inputs(q, k, v, g, beta, t + 1, T, qk_row, v_stride, kh, h, i, j, im, jm, HV,
                                                DK, DV)  # fmt: skip
        s = s * tl.exp(gt)
        delta = (vt - tl.sum(s * kt[:, None], axis=0)) * bt
        s = s + kt[:, None] * delta[None, :]
        o = tl.sum(s * qt[:, None], axis=0)
        if NORM:
            zt = tl.load(z + (t * HV + h) * DV + j, mask=jm, other=0.0)
            inv = 1.0 / tl.sqrt(tl.sum(o * o, axis=0) / DV + eps)
            o = o * inv * tl.load(norm_w + j, mask=jm, other=0.0) * (zt / (1.0 + tl.exp(-zt)))
        tl.store(out + (t * HV + h) * DV + j, o, mask=jm)
        if NORM:
            tl.debug_barrier()  # the program's stores of out are visible to all its threads
            write_int8_groups(out + t * HV * DV, xp + t * X_ROW, h * (DV // GS), DV // GS, HV * DV, BITS, GS, NG_P,
                              WPG_P)  # fmt: skip
        qt, kt, gt, bt = _delta_step_prepare(qn, kn, gn, bn, a_log_h, bias_h, q_scale, RAW)
        vt = vn
    tl.store(tile, s, mask=sm)


@triton.jit
def _delta_step_inputs(q, k, v, g, beta, t, T, qk_row, v_stride, kh, h, i, j, im, jm, HV: tl.constexpr,
                       DK: tl.constexpr, DV: tl.constexpr):  # fmt: skip
    """Token ``t``'s q, k, v, g and beta rows for :func:`_delta_rule_kernel` (zeros past ``T``)."""
    here = t < T
    qt = tl.load(q + t * qk_row + kh * DK + i, mask=im & here, other=0.0)
    kt = tl.load(k + t * qk_row + kh * DK + i, mask=im & here, other=0.0)
    vt = tl.load(v + t * v_stride + h * DV + j, mask=jm & here, other=0.0)
    gt = tl.load(g + t * HV + h, mask=here, other=0.0)
    bt = tl.load(beta + t * HV + h, mask=here, other=0.0)
    return qt, kt, vt, gt, bt


@triton.jit
def _delta_step_prepare(qt, kt, gt, bt, a_log_h, bias_h, q_scale, RAW: tl.constexpr):
    """RAW: the recurrence's inputs from the conv output's q and k and from a and b (as
    :func:`_delta_inputs_kernel` makes them); else they are already."""
    if RAW:
        qt = _l2_normalize(qt) * q_scale
        kt = _l2_normalize(kt)
        gt = _log_decay(gt + bias_h, a_log_h)
        bt = _sigmoid(bt)
    return qt, kt, gt, bt


@triton.jit
def _route_kernel(logits, ids, weights, E, K, BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr = False):
    """Token t: softmax over the E logits, the K largest probabilities in descending order (lowest
    id first among equals), renormalised to sum to 1. Each pick is one max over 64-bit keys (the
    probability's bits above, the id's complement below; -1 for taken and padding), not a max and
    a min: the picks are serial, so a decode step waits on every reduction."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    e = tl.arange(0, BLOCK_E)
    em = e < E
    x = tl.load(logits + t * E + e, mask=em, other=-float("inf"))
    p = tl.exp(x - tl.max(x, axis=0))
    p = p / tl.sum(p, axis=0)
    # probabilities are >= 0, so their float32 bits order as they do
    key = tl.where(em, (p.to(tl.int32, bitcast=True).to(tl.int64) << 32) | (BLOCK_E - 1 - e), -1)
    slot = tl.arange(0, BLOCK_K)
    top_p = tl.zeros((BLOCK_K,), dtype=tl.float32)
    top_i = tl.zeros((BLOCK_K,), dtype=tl.int64)
    for n in range(K):
        best = tl.max(key, axis=0)
        top_p = tl.where(slot == n, (best >> 32).to(tl.int32).to(tl.float32, bitcast=True), top_p)
        top_i = tl.where(slot == n, BLOCK_E - 1 - (best & 0xFFFFFFFF), top_i)
        key = tl.where(key == best, -1, key)
    km = slot < K
    tl.store(ids + t * K + slot, top_i, mask=km)
    tl.store(weights + t * K + slot, top_p / tl.sum(top_p, axis=0), mask=km)


@triton.jit
def _norm_rope_kernel(x, x_row, x_head, w, cos, sin, out, H, eps, D: tl.constexpr, HALF: tl.constexpr,
                      BLOCK: tl.constexpr, PDL: tl.constexpr = False):  # fmt: skip
    """Head h of token t: ``y = x[t, h] * rsqrt(mean(x[t, h]^2) + eps) * w``, then NeoX RoPE on its
    first 2 * HALF dims (pair (i, i + HALF) turned by the angle of ``cos[t, i]``, ``sin[t, i]``), the
    rest passed through; ``out`` contiguous ``[T, H, D]``. A dim's partner is loaded and normed
    again, so the rotation needs no exchange between threads."""
    pdl_start(PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1).to(tl.int64)
    d = tl.arange(0, BLOCK)
    m = d < D
    row = x + t * x_row + h * x_head
    v = tl.load(row + d, mask=m, other=0.0)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    y = v * inv * tl.load(w + d, mask=m, other=0.0)
    turned = d < 2 * HALF
    first = d < HALF
    partner = tl.where(first, d + HALF, d - HALF)
    yp = tl.load(row + partner, mask=turned, other=0.0) * inv * tl.load(w + partner, mask=turned, other=0.0)
    i = tl.where(first, d, d - HALF)
    c = tl.load(cos + t * HALF + i, mask=turned, other=1.0)
    s = tl.load(sin + t * HALF + i, mask=turned, other=0.0)
    y = tl.where(turned, y * c + tl.where(first, -yp, yp) * s, y)
    tl.store(out + (t * H + h) * D + d, y, mask=m)


@triton.jit
def _sigmoid_gate_kernel(x, gate, out, N, GATE_COLS: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr = False):
    """``out[r, c] = x[r, c] * sigmoid(gate[r, c])``, or ``gate[r, 0]`` for every c when GATE_COLS == 1."""
    pdl_start(PDL)
    r = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < N
    if GATE_COLS == 1:
        z = tl.load(gate + r + c * 0, mask=m, other=0.0)
    else:
        z = tl.load(gate + r * GATE_COLS + c, mask=m, other=0.0)
    tl.store(out + r * N + c, tl.load(x + r * N + c, mask=m, other=0.0) / (1.0 + tl.exp(-z)), mask=m)


# ---- wrappers -----------------------------------------------------------------------------------
def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
    gate: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm over the last axis of ``x [..., N]`` (rows may be strided, columns contiguous):
    ``(s, s * rsqrt(mean(s^2) + eps) * weight)`` with ``s = x + residual`` (``s`` is ``x`` itself
    without a residual); times ``silu(gate)`` when given (same element count as x). The normed
    result is contiguous with x's shape."""
    fn = "rms_norm"
    n = x.shape[-1]
    _check(x, fn, "x")
    if x.stride(-1) != 1 or any(x.stride(d) != x.shape[d + 1] * x.stride(d + 1) for d in range(x.dim() - 2)):
        x = x.contiguous()  # rows must be one stride apart
    rows = x.numel() // n if n else 0
    row_stride = x.stride(-2) if x.dim() > 1 else n
    _check(weight, fn, "weight", (n,), x.device)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    s = x
    if residual is not None:
        residual = _check(residual, fn, "residual", tuple(x.shape), x.device).contiguous()
        s = torch.empty_like(out)
    if gate is not None:
        if gate.numel() != x.numel():
            raise ValueError(f"{fn}: gate has {gate.numel()} elements, x has {x.numel()}")
        gate = _check(gate, fn, "gate", None, x.device).contiguous()
    if rows:
        _rms_norm_kernel[(rows,)](
            x, row_stride, residual, weight.contiguous(), gate, s, out, n, float(eps),
            residual is not None, gate is not None, min(_MAX_BLOCK, _pow2(n)),
            **pdl(x.device),
        )  # fmt: skip
    return s, out


def causal_conv(x: torch.Tensor, weight: torch.Tensor, state: torch.Tensor) -> torch.Tensor:
    """``silu(depthwise causal conv)`` of ``x [T, C]`` with ``weight [C, W]`` after ``state
    [W-1, C]`` (the previous inputs); ``state`` becomes the last W-1 inputs, in place."""
    fn = "causal_conv"
    t, c = _check(x, fn, "x", (None, None)).shape
    width = _check(weight, fn, "weight", (c, None), x.device).shape[1]
    _check(state, fn, "state", (width - 1, c), x.device)
    if not state.is_contiguous():
        raise ValueError(f"{fn}: state must be contiguous (it is updated in place)")
    out = torch.empty((t, c), dtype=torch.float32, device=x.device)
    if t and c:
        block = min(_CONV_CHANNELS, _pow2(c))
        block_t = max(_pow2(width - 1), min(_CONV_TOKENS, _pow2(t)))  # the first token block holds the state's rows
        _conv_kernel[(triton.cdiv(c, block), triton.cdiv(t, block_t))](
            x.contiguous(), weight.contiguous(), state, out, t, c, width, block, block_t, **pdl(out.device)
        )
    return out


def delta_rule_inputs(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    heads: tuple[int, int, int, int],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta rule's inputs from the conv output ``qkv [T, 2*Hk*Dk + Hv*Dv]``: l2-normalised
    ``q`` (times Dk^-0.5) and ``k`` ``[T, Hk, Dk]``, ``v`` (a view of qkv) ``[T, Hv, Dv]``, the log
    decay ``g`` and ``beta`` ``[T, Hv]``."""
    fn = "delta_rule_inputs"
    hk, dk, hv, dv = heads
    t, c = _check_delta_inputs(qkv, a, b, a_log, dt_bias, heads, fn)
    qkv = qkv.contiguous()
    q = torch.empty((t, hk, dk), dtype=torch.float32, device=qkv.device)
    k = torch.empty_like(q)
    g = torch.empty((t, hv), dtype=torch.float32, device=qkv.device)
    beta = torch.empty_like(g)
    if t:
        _delta_inputs_kernel[(t, 2 * hk + 1)](
            qkv, a.contiguous(), b.contiguous(), a_log.contiguous(), dt_bias.contiguous(), q, k, g, beta,
            c, dk**-0.5, hk, dk, hv, _pow2(dk), _pow2(hv),
            **pdl(qkv.device),
        )  # fmt: skip
    return q, k, qkv[:, 2 * hk * dk :].reshape(t, hv, dv), g, beta


def gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor
) -> torch.Tensor:
    """The gated delta rule over T tokens (value head j reads key head ``j // (Hv / Hk)``): ``q, k
    [T, Hk, Dk]``, ``v [T, Hv, Dv]`` (token rows may be strided), ``g, beta [T, Hv]``; ``state
    [Hv, Dk, Dv]`` is updated in place. Returns ``o [T, Hv, Dv]``."""
    fn = "gated_delta_rule"
    t, hk, dk = _check(q, fn, "q", (None, None, None)).shape
    hv, dv = _check(v, fn, "v", (t, None, None), q.device).shape[1:]
    _check(k, fn, "k", (t, hk, dk), q.device)
    for name, arr in (("g", g), ("beta", beta)):
        _check(arr, fn, name, (t, hv), q.device)
    _check_state(state, (hk, dk, hv, dv), fn, q.device)
    if v.stride(2) != 1 or v.stride(1) != dv:
        v = v.contiguous()
    return _delta_rule(q.contiguous(), k.contiguous(), hk * dk, v, g, beta, None, None, state, (hk, dk, hv, dv))


def delta_rule(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    heads: tuple[int, int, int, int],
    state: torch.Tensor,
    **launch: Any,
) -> torch.Tensor:
    """:func:`gated_delta_rule` on what :func:`delta_rule_inputs` takes (the conv output ``qkv [T,
    2*Hk*Dk + Hv*Dv]``, ``a``, ``b [T, Hv]``, ``A_log``, ``dt_bias [Hv]``), the inputs made inside
    the recurrence's launch. ``state [Hv, Dk, Dv]`` is updated in place. Returns ``o [T, Hv, Dv]``.
    ``launch``: :func:`_delta_rule`'s own arguments (runtime/kernels/triton_moe.py fuses the gated
    norm in with them)."""
    fn = "delta_rule"
    _check_delta_inputs(qkv, a, b, a_log, dt_bias, heads, fn)
    _check_state(state, heads, fn, qkv.device)
    qkv = qkv.contiguous()
    kd = heads[0] * heads[1]
    return _delta_rule(qkv, qkv[:, kd:], qkv.shape[1], qkv[:, 2 * kd :], a, b, a_log, dt_bias, state, heads, **launch)


def _check_delta_inputs(
    qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    a_log: torch.Tensor,
    dt_bias: torch.Tensor,
    heads: tuple[int, int, int, int],
    fn: str,
) -> tuple[int, int]:
    """The delta rule's raw inputs checked against ``heads``; returns qkv's ``(T, columns)``."""
    hk, dk, hv, dv = heads
    t, c = _check(qkv, fn, "qkv", (None, 2 * hk * dk + hv * dv)).shape
    for name, arr in (("a", a), ("b", b)):
        _check(arr, fn, name, (t, hv), qkv.device)
    for name, arr in (("A_log", a_log), ("dt_bias", dt_bias)):
        _check(arr, fn, name, (hv,), qkv.device)
    return t, c


def _check_state(state: torch.Tensor, heads: tuple[int, int, int, int], fn: str, device: torch.device) -> None:
    """The recurrence's state ``[Hv, Dk, Dv]``, contiguous (updated in place), for heads that fit."""
    hk, dk, hv, dv = heads
    _check(state, fn, "state", (hv, dk, dv), device)
    if hk == 0 or hv % hk:
        raise ValueError(f"{fn}: {hv} value heads are not a multiple of {hk} key heads")
    if not state.is_contiguous():
        raise ValueError(f"{fn}: state must be contiguous (it is updated in place)")


def _delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    qk_row: int,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    a_log: torch.Tensor | None,
    dt_bias: torch.Tensor | None,
    state: torch.Tensor,
    heads: tuple[int, int, int, int],
    out: torch.Tensor | None = None,
    whole_heads: bool = False,
    **norm: Any,
) -> torch.Tensor:
    """Launch :func:`_delta_rule_kernel` (RAW when ``a_log`` is given: ``g``, ``beta`` are a, b) into
    ``out`` (new ``[T, Hv, Dv]`` by default); ``whole_heads``: a program a head, as ``norm`` (the
    kernel's NORM arguments) needs."""
    hk, dk, hv, dv = heads
    t = v.shape[0]
    if out is None:
        out = torch.empty((t, hv, dv), dtype=torch.float32, device=v.device)
    if t and hv and dv:
        raw = a_log is not None and dt_bias is not None
        block_v = _pow2(dv) if whole_heads else min(_STATE_COLUMNS, _pow2(dv))
        _delta_rule_kernel[(hv, triton.cdiv(dv, block_v))](
            q, k, qk_row, v, v.stride(0), g.contiguous(), beta.contiguous(),
            a_log.contiguous() if a_log is not None else g, dt_bias.contiguous() if dt_bias is not None else g,
            dk**-0.5, state, out, t, hk, dk, hv, dv, _pow2(dk), block_v, raw,
            **norm, **pdl(v.device),
        )  # fmt: skip
    return out


def route(logits: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over ``logits [T, E]``, the top ``k`` per token (descending) renormalised: ``ids``
    int64 and ``weights`` float32 ``[T, k]``."""
    fn = "route"
    t, e = _check(logits, fn, "logits", (None, None)).shape
    if not 1 <= k <= e:
        raise ValueError(f"{fn}: k {k} must be between 1 and the {e} experts")
    ids = torch.empty((t, k), dtype=torch.int64, device=logits.device)
    weights = torch.empty((t, k), dtype=torch.float32, device=logits.device)
    if t:
        block = _pow2(e)
        warps = 1 if block <= 1024 else 4  # one warp while a thread holds at most 32 logits: no barriers
        _route_kernel[(t,)](logits.contiguous(), ids, weights, e, k, block, _pow2(k), num_warps=warps,
                            **pdl(ids.device))  # fmt: skip
    return ids, weights


def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Per-head RMSNorm then partial NeoX RoPE of ``x [T, H, D]`` (heads may be strided, a head's
    dims contiguous: the query part of a query|gate projection is read in place): the attention's
    q/k norm and rotation in one launch. ``weight [D]``; ``cos``, ``sin`` ``[T, R/2]`` (R <= D: the
    rotated dims). Returns a contiguous ``[T, H, D]``."""
    fn = "norm_rope"
    t, h, d = _check(x, fn, "x", (None, None, None)).shape
    if x.stride(2) != 1:
        x = x.contiguous()
    _check(weight, fn, "weight", (d,), x.device)
    half = _check(cos, fn, "cos", (t, None), x.device).shape[1]
    _check(sin, fn, "sin", (t, half), x.device)
    if 2 * half > d:
        raise ValueError(f"{fn}: cos {tuple(cos.shape)} rotates {2 * half} dims of heads of {d}")
    out = torch.empty((t, h, d), dtype=torch.float32, device=x.device)
    if t and h and d:
        _norm_rope_kernel[(t, h)](
            x, x.stride(0), x.stride(1), weight.contiguous(), cos.contiguous(), sin.contiguous(), out, h, float(eps),
            d, half, _pow2(d),
            **pdl(x.device),
        )  # fmt: skip
    return out


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """``x [T, N] * sigmoid(gate)``, gate ``[T, N]`` or ``[T, 1]`` (one gate per row)."""
    fn = "sigmoid_gate"
    t, n = _check(x, fn, "x", (None, None)).shape
    cols = _check(gate, fn, "gate", (t, None), x.device).shape[1]
    if cols not in (1, n):
        raise ValueError(f"{fn}: gate {tuple(gate.shape)} must be [{t}, 1] or [{t}, {n}]")
    out = torch.empty((t, n), dtype=torch.float32, device=x.device)
    if t and n:
        block = min(1024, _pow2(n))
        _sigmoid_gate_kernel[(t, triton.cdiv(n, block))](
            x.contiguous(), gate.contiguous(), out, n, cols, block, **pdl(out.device)
        )
    return out


def _check(
    t: torch.Tensor,
    fn: str,
    name: str,
    shape: tuple[int | None, ...] | None = None,
    device: torch.device | None = None,
) -> torch.Tensor:
    """``t`` is float32 (of ``shape``, None for any size; on ``device``), else a ValueError naming it."""
    if t.dtype != torch.float32 or (device is not None and t.device != device):
        raise ValueError(f"{fn}: {name} must be float32 on {device or t.device}, got {t.dtype} on {t.device}")
    if shape is not None and (
        t.dim() != len(shape) or any(w is not None and n != w for n, w in zip(t.shape, shape, strict=True))
    ):
        want = tuple("*" if s is None else s for s in shape)
        raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {want}")
    return t
