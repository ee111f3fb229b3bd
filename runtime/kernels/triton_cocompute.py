"""The device's side of experts computed on the host (runtime/experts/cocompute.py): a layer's hand-over
and the wait for the host's sum, each one launch, so that a decode step stays one CUDA graph.

:func:`hand_over` (before the layer's expert kernels): of the token's K choices, those whose home is
a host row (``host_map[id] <= -2``) are counted, and the first ``round(count * share)`` of them in
choice order (at most the jobs' room) become the host's jobs: their rows and routing weights go to
page-locked ``jobs`` / ``job_weights``, the layer's input to ``x_host``, and the device's copy of the
map gets -1 for them (the expert kernels then leave them out). Last, the layer's step counter goes
up by one and the new step is posted to the host's ``mark`` by a release at system scope, so the host
sees it only once the jobs and input have landed. :func:`add_host_sum` (after the expert kernels):
polls the host's ``flag`` over the link until it shows the step, then adds the host's sum to the
layer's output; it gives up after ``MAX_POLLS`` (seconds) and raises ``failed`` instead of hanging.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

MAX_POLLS = 1 << 24  # about a microsecond each over the link: then the device gives up (``failed``)


@triton.jit
def _hand_over_kernel(ids, weights, host_map, share, override, x, jobs, job_weights, x_host, steps, computed, mark,
                      K: tl.constexpr,
                      E: tl.constexpr, HIDDEN: tl.constexpr, MAX_JOBS: tl.constexpr, BLOCK_K: tl.constexpr,
                      BLOCK: tl.constexpr):  # fmt: skip
    for e0 in range(0, E, BLOCK):  # the device's copy of the map, before the jobs' entries are cleared
        offs = e0 + tl.arange(0, BLOCK)
        tl.store(override + offs, tl.load(host_map + offs, mask=offs < E), mask=offs < E)
    for h0 in range(0, HIDDEN, BLOCK):
        offs = h0 + tl.arange(0, BLOCK)
        tl.store(x_host + offs, tl.load(x + offs, mask=offs < HIDDEN), mask=offs < HIDDEN)
    k = tl.arange(0, BLOCK_K)
    km = k < K
    e = tl.load(ids + k, mask=km, other=0)
    slot = tl.load(host_map + e, mask=km, other=-1)
    on_host = (slot <= -2) & km
    count = tl.sum(on_host.to(tl.int32), axis=0)
    take = tl.minimum((count.to(tl.float32) * tl.load(share) + 0.5).to(tl.int32), MAX_JOBS)
    rank = tl.cumsum(on_host.to(tl.int32), axis=0)  # 1, 2, ... at the host-homed choices
    mine = on_host & (rank <= take)
    tl.store(jobs + rank, (-2 - slot).to(tl.int64), mask=mine)
    tl.store(job_weights + rank - 1, tl.load(weights + k, mask=km, other=0.0), mask=mine)
    tl.store(jobs, take.to(tl.int64))
    tl.debug_barrier()  # every thread's copy of the map is written before any entry is cleared
    tl.store(override + e, -1, mask=mine)
    tl.store(computed, tl.load(computed) + take)
    step = tl.load(steps) + 1
    tl.store(steps, step)
    tl.debug_barrier()  # every thread's stores to the host are made before the step is posted...
    tl.atomic_xchg(mark, step, sem="release", scope="sys")  # ...and seen by the host before it


@triton.jit
def _add_host_sum_kernel(flag, steps, host_out, out, failed, HIDDEN: tl.constexpr, BLOCK: tl.constexpr,
                         MAX_POLLS: tl.constexpr):  # fmt: skip
    want = tl.load(steps)
    got = tl.load(flag, volatile=True)
    polls = 0
    while (got < want) & (polls < MAX_POLLS):
        got = tl.load(flag, volatile=True)
        polls += 1
    if got < want:
        tl.store(failed, 1)
    else:
        # an acquire at system scope on the flag the host released: its sum is read only after it
        # (the polls above are plain volatile loads, which order nothing after them)
        tl.atomic_add(flag, 0, sem="acquire", scope="sys")
        for h0 in range(0, HIDDEN, BLOCK):
            offs = h0 + tl.arange(0, BLOCK)
            m = offs < HIDDEN
            v = tl.load(host_out + offs, mask=m, other=0.0, volatile=True)
            tl.store(out + offs, tl.load(out + offs, mask=m) + v, mask=m)


def hand_over(
    ids: torch.Tensor,
    weights: torch.Tensor,
    host_map: torch.Tensor,
    share: torch.Tensor,
    override: torch.Tensor,
    x: torch.Tensor,
    jobs: torch.Tensor,
    job_weights: torch.Tensor,
    x_host: torch.Tensor,
    step: torch.Tensor,
    computed: torch.Tensor,
    mark: torch.Tensor,
) -> torch.Tensor:
    """One decode token's hand-over (module docstring): ``ids``/``weights`` ``[1, K]``, ``host_map``
    int32 ``[E]``, ``share`` float32 ``[1]``, ``override`` int32 ``[E]`` (written), ``x`` float32
    ``[1, hidden]``; ``jobs`` int64 ``[1 + J]``, ``job_weights`` float32 ``[J]`` and ``x_host`` float32
    ``[hidden]`` page-locked; ``step`` int64 ``[1]`` (incremented), ``computed`` int32 ``[1]`` (the
    jobs handed over added), ``mark`` page-locked int64 ``[1]`` (the new step posted). Returns ``override``."""
    ids, weights, x = ids.contiguous(), weights.contiguous(), x.contiguous()
    k, e, hidden = ids.shape[-1], host_map.shape[0], x.shape[-1]
    if ids.numel() != k or x.numel() != hidden or override.shape != host_map.shape:
        raise ValueError("hand_over: one token's ids, weights and input, and a map and its copy of one size")
    if jobs.dtype != torch.int64 or job_weights.dtype != torch.float32 or x_host.dtype != torch.float32:
        raise ValueError("hand_over: jobs int64, job weights and the host's input float32")
    block = min(1024, triton.next_power_of_2(max(e, hidden)))
    _hand_over_kernel[(1,)](
        ids, weights, host_map, share, override, x, jobs, job_weights, x_host, step, computed, mark, k, e, hidden,
        job_weights.shape[0], triton.next_power_of_2(k), block,
    )  # fmt: skip
    return override


def add_host_sum(
    flag: torch.Tensor, step: torch.Tensor, host_out: torch.Tensor, out: torch.Tensor, failed: torch.Tensor
) -> torch.Tensor:
    """``out += host_out`` once the host's ``flag`` (page-locked int64 ``[1]``) reaches ``step``;
    ``failed`` (int32 ``[1]``) set instead after ``MAX_POLLS`` polls. Returns ``out``."""
    hidden = out.shape[-1]
    if out.numel() != hidden or host_out.numel() != hidden or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("add_host_sum: one token's float32 output and the host's sum of its size")
    block = min(1024, triton.next_power_of_2(hidden))
    _add_host_sum_kernel[(1,)](flag, step, host_out, out, failed, hidden, block, MAX_POLLS)
    return out
