"""Decode attention over a KV cache in Triton: a few query rows against the keys and values written
so far, split over the positions (flash-decoding) and combined in a second launch.

Why: torch's SDPA takes the cache's positions as given, so a decode step replayed from a CUDA graph
(runtime/engine/cuda_graph.py), which cannot change shapes, attended over the whole reserved cache
under a mask: its time grew with the room reserved (4096 positions past the prompt in ``fmoe run``),
not with the tokens written. Here the number of positions a query row sees is read on the device
(the graph's position scalar) and the programs split exactly those: the work and the bytes follow the
sequence's length, whatever the capacity.

Grid of the first launch: (query rows x KV heads, splits). A program holds the G query heads that
share its KV head (grouped-query attention: G = Hq / Hkv) and walks its share of the visible
positions in tiles of ``_BLOCK_N``: scores and weighted values on ``tl.dot`` in three-pass TF32
(float32's accuracy on tensor cores: 1e-6 of float64 at 4001 positions on an H200; IEEE float32
dots, on the CUDA cores, took 80 us a call against 10), a running max and sum (online softmax). It
writes its max, sum and partial output; the second launch weighs the splits by their maxima and
divides once. Splits with no positions write nothing and are not read. The sums run in a fixed
order for a given length: the same inputs give the same bits.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fmoe.runtime.kernels.pdl import pdl, pdl_start

MAX_ROWS = 8  # query rows a call: decode (one) and short steps; longer chunks take SDPA's prefill kernels
_BLOCK_N = 32  # positions a tile
_SPLITS = 64  # position splits a (row, KV head): 2 KV heads x 64 programs fill an H200's 132 SMs


@triton.jit
def _split_kernel(
    q, k, v, part_m, part_l, part_o, first_at, first, hkv, cap, scale,
    G: tl.constexpr, D: tl.constexpr, G_P: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, FIRST_ON_DEVICE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (t * hkv + h, split): query row t's heads of KV head h over its split of positions
    0 .. first + t, the running max, sum and output in ``part_*[(t * hkv + h) * SPLITS + split]``."""
    pdl_start(PDL)
    row = tl.program_id(0)
    split = tl.program_id(1)
    t = row // hkv
    h = row % hkv
    start = tl.load(first_at) if FIRST_ON_DEVICE else first
    length = tl.minimum(start + t + 1, cap)  # positions row t sees
    tiles = tl.cdiv(length, BLOCK_N)
    per = tl.cdiv(tiles, SPLITS)  # tiles a split, from the length: the splits share what is there
    lo = split * per * BLOCK_N
    hi = tl.minimum(lo + per * BLOCK_N, length)
    g = tl.arange(0, G_P)
    d = tl.arange(0, D_P)
    dm = d < D
    qm = (g < G)[:, None] & dm[None, :]
    qv = tl.load(q + (t * (hkv * G) + h * G + g)[:, None] * D + d[None, :], mask=qm, other=0.0)
    m_i = tl.full((G_P,), float("-inf"), tl.float32)
    l_i = tl.zeros((G_P,), tl.float32)
    acc = tl.zeros((G_P, D_P), tl.float32)
    base = h.to(tl.int64) * cap * D
    for n0 in range(lo, hi, BLOCK_N):
        n = n0 + tl.arange(0, BLOCK_N)
        nm = n < hi
        at = base + n[:, None].to(tl.int64) * D + d[None, :]
        kt = tl.load(k + at, mask=nm[:, None] & dm[None, :], other=0.0)
        s = tl.dot(qv, tl.trans(kt), input_precision="tf32x3") * scale  # [G_P, BLOCK_N]
        s = tl.where(nm[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))  # finite: every tile holds a visible position
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        vt = tl.load(v + at, mask=nm[:, None] & dm[None, :], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p, vt, input_precision="tf32x3")
        m_i = m_new
    if lo < hi:  # a split past the positions writes nothing: the combine reads the splits with positions
        out = row * SPLITS + split
        tl.store(part_m + out * G_P + g, m_i)
        tl.store(part_l + out * G_P + g, l_i)
        tl.store(part_o + (out * G_P + g)[:, None] * D_P + d[None, :], acc)


@triton.jit
def _combine_kernel(
    part_m, part_l, part_o, out, first_at, first, hkv, cap,
    G: tl.constexpr, D: tl.constexpr, G_P: tl.constexpr, D_P: tl.constexpr, BLOCK_N: tl.constexpr,
    SPLITS: tl.constexpr, FIRST_ON_DEVICE: tl.constexpr, PDL: tl.constexpr = False,
):  # fmt: skip
    """Program (t * Hq + head): the parts of that head from the splits that had positions, weighed by
    exp(max - the overall max), summed and divided by the weighed sums, into ``out[t, head * D:...]``."""
    pdl_start(PDL)
    r = tl.program_id(0)
    hq = hkv * G
    t = r // hq
    head = r % hq
    row = t * hkv + head // G
    start = tl.load(first_at) if FIRST_ON_DEVICE else first
    tiles = tl.cdiv(tl.minimum(start + t + 1, cap), BLOCK_N)
    used = tl.cdiv(tiles, tl.cdiv(tiles, SPLITS))  # splits with positions (as _split_kernel shares them)
    s = tl.arange(0, SPLITS)
    sm = s < used
    at = (row * SPLITS + s) * G_P + head % G
    m = tl.load(part_m + at, mask=sm, other=float("-inf"))
    total = tl.max(m, axis=0)  # finite: the first split always holds position 0
    w = tl.exp(m - total)  # splits without positions (-inf): 0
    lsum = tl.sum(w * tl.load(part_l + at, mask=sm, other=0.0), axis=0)
    d = tl.arange(0, D_P)
    o = tl.load(part_o + at[:, None] * D_P + d[None, :], mask=sm[:, None], other=0.0)
    tl.store(out + r.to(tl.int64) * D + d, tl.sum(w[:, None] * o, axis=0) / lsum, mask=d < D)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, first: int | torch.Tensor, scale: float
) -> torch.Tensor:
    """Causal grouped-query attention of query rows ``q [T, Hq, D]`` (positions first .. first + T - 1)
    over a KV cache ``k, v [Hkv, capacity, D]`` whose positions up to first + T - 1 are written: query
    head h reads KV head h // (Hq / Hkv). ``first`` an int, or a device scalar (int64; a CUDA graph's
    position: read on the device). Returns float32 ``[T, Hq * D]``. At most :data:`MAX_ROWS` rows."""
    fn = "decode_attention"
    t, hq, d = q.shape
    hkv, cap, dk = k.shape
    if not 0 < t <= MAX_ROWS:
        raise ValueError(f"{fn}: 1 to {MAX_ROWS} query rows, got {t}")
    if dk != d or v.shape != k.shape or hkv == 0 or hq % hkv:
        raise ValueError(f"{fn}: q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)} do not match")
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.dtype != torch.float32 or not x.is_contiguous() or x.device != q.device:
            raise ValueError(f"{fn}: {name} must be contiguous float32 on {q.device}")
    on_device = isinstance(first, torch.Tensor)
    if isinstance(first, torch.Tensor):
        if first.dtype != torch.int64 or first.numel() != 1 or first.device != q.device:
            raise ValueError(f"{fn}: first must be one int64 on {q.device}")
    elif not 0 <= first <= cap - t:
        raise ValueError(f"{fn}: positions {first}..{first + t - 1} are outside the cache's {cap}")
    g = hq // hkv
    g_p, d_p = max(16, triton.next_power_of_2(g)), max(16, triton.next_power_of_2(d))  # tl.dot's smallest tile
    rows = t * hkv
    part_m = torch.empty((rows, _SPLITS, g_p), dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    part_o = torch.empty((rows, _SPLITS, g_p, d_p), dtype=torch.float32, device=q.device)
    out = torch.empty((t, hq * d), dtype=torch.float32, device=q.device)
    first_at = first if on_device else part_m  # (not read)
    _split_kernel[(rows, _SPLITS)](
        q, k, v, part_m, part_l, part_o, first_at, 0 if on_device else first, hkv, cap, scale,
        g, d, g_p, d_p, _BLOCK_N, _SPLITS, on_device, num_warps=4, **pdl(q.device),
    )  # fmt: skip
    _combine_kernel[(t * hq,)](
        part_m, part_l, part_o, out, first_at, 0 if on_device else first, hkv, cap,
        g, d, g_p, d_p, _BLOCK_N, _SPLITS, on_device, num_warps=4, **pdl(q.device),
    )  # fmt: skip
    return out
