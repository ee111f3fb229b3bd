"""The host's side of experts computed beside a GPU (runtime/experts/cocompute.py): one token's
share of a layer's experts, computed by threads that never leave compiled code between layers.

Each worker thread runs :func:`worker_loop_float` (or ``_int8``) on its own: it waits (spinning on
an acquire load) for the device's step number in ``mark[layer]``, computes its slice of the gate and
up rows of the layer's jobs (``jobs[layer] = count, host rows...``, ``weights[layer]`` their routing
weights) on the input ``x[layer]``, meets the other threads at a counter, computes its slice of the
down rows summed over the jobs into ``out[layer]``, and the last thread to finish writes the step
number to ``flag[layer]`` (a release store: ``out`` is complete before the device can see it).
A numba ``prange`` region per stage would instead wake and join a thread pool twice a layer from
the Python interpreter (1-1.5 ms for one expert from a worker thread on a 16-core host, against
0.25 ms alone: the sixteenth pass in docs/PERFORMANCE.md).

The rows are the packed format's row dots of the CPU kernels (cpu.py, int8dot.py), on float or
int8 activations.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from fmoe.runtime.kernels import int8dot
from fmoe.runtime.kernels.atomics import fetch_add, load_acquire, store_release
from fmoe.runtime.kernels.cpu import _FASTMATH, _row_dot, _split_x
from fmoe.runtime.kernels.packed_numba import gate_up_matrices, slot_matrix

SYNC_STRIDE = 16  # int64s between a layer's counters: two cache lines, so the threads' adds do not share one
# the worker loops' returns: told to stop; no step for ``idle_spins`` polls, none served in the call (the
# caller naps); the same after serving some (the caller polls on at once)
STOPPED, IDLE, IDLE_AFTER_WORK = 0, 1, 2


@njit(nogil=True, cache=True)
def _wait_at_least(counter, index, target, control):
    """Spin until ``counter[index] >= target`` (False if told to stop first)."""
    while load_acquire(counter, index) < target:
        if load_acquire(control, 0) != 0:
            return False
    return True


# The two stages of a thread's share, one pair per kind of row dot. Each thread prepares the whole
# input itself (phase split or int8 rounding of x, then of the jobs' h): a few microseconds, less than
# one more meeting of the threads would cost, and every thread's copy is the same.
@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gate_up_float(x, h, slab, rows, n, lo, hi, gate, up, group_size, bits):
    """``h[e, r] = silu(gate_e[r] . x) * (up_e[r] . x)`` for the flat rows ``lo..hi`` of
    ``n x inter`` (expert e in host row ``rows[e]``); float row dots."""
    hidden, inter = x.shape[0], h.shape[1]
    xs, xsum = _split_x(x.reshape((1, hidden)), 8 // bits, group_size, True)
    for e in range(n):
        r0, r1 = max(lo, e * inter) - e * inter, min(hi, (e + 1) * inter) - e * inter
        if r0 < r1:
            gw, gs, gb, uw, us, ub = gate_up_matrices(slab[rows[e]], gate, up, inter, hidden * bits // 8,
                                                      hidden // group_size)  # fmt: skip
            for r in range(r0, r1):
                g = _row_dot(gw, r, gs, gb, xs[0], xsum[0], bits)
                u = _row_dot(uw, r, us, ub, xs[0], xsum[0], bits)
                h[e, r] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def down_float(h, slab, rows, weights, n, lo, hi, down, group_size, bits, out):
    """``out[r] = sum_e weights[e] * (down_e[r] . h[e])`` for the down rows ``lo..hi`` (``out`` the
    whole row of ``hidden``); float row dots."""
    inter = h.shape[1]
    hs, hsum = _split_x(h[:n], 8 // bits, group_size, True)
    for r in range(lo, hi):
        out[r] = 0.0
    for e in range(n):
        w8, sc, bi = slot_matrix(slab[rows[e]], down[0], down[1], down[2], out.shape[0], inter * bits // 8,
                                 inter // group_size)  # fmt: skip
        for r in range(lo, hi):
            out[r] += weights[e] * _row_dot(w8, r, sc, bi, hs[e], hsum[e], bits)


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def gate_up_int8(x, h, slab, rows, n, lo, hi, gate, up, group_size, bits):
    """:func:`gate_up_float` on int8 activations (4 or 2 bits, 64-column groups: int8dot's row dots)."""
    hidden, inter = x.shape[0], h.shape[1]
    groups = hidden // group_size
    x0, x1, xscale, xsum = int8dot.quantize_row(x, bits)
    gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
    for e in range(n):
        r0, r1 = max(lo, e * inter) - e * inter, min(hi, (e + 1) * inter) - e * inter
        if r0 < r1:
            gw, gs, gb, uw, us, ub = gate_up_matrices(slab[rows[e]], gate, up, inter, hidden * bits // 8, groups)
            for r in range(r0, r1):
                g = int8dot.row(gw, r, gs, gb, x0, x1, xscale, xsum, gscale, gbias)
                u = int8dot.row(uw, r, us, ub, x0, x1, xscale, xsum, gscale, gbias)
                h[e, r] = g / (np.float32(1.0) + np.exp(-g)) * u


@njit(nogil=True, cache=True, fastmath=_FASTMATH)
def down_int8(h, slab, rows, weights, n, lo, hi, down, group_size, bits, out):
    """:func:`down_float` on int8 activations."""
    inter = h.shape[1]
    groups = inter // group_size
    gscale, gbias = np.empty(groups, np.float32), np.empty(groups, np.float32)
    for r in range(lo, hi):
        out[r] = 0.0
    for e in range(n):
        h0, h1, hscale, hsum = int8dot.quantize_row(h[e], bits)
        w8, sc, bi = slot_matrix(slab[rows[e]], down[0], down[1], down[2], out.shape[0], inter * bits // 8, groups)
        for r in range(lo, hi):
            out[r] += weights[e] * int8dot.row(w8, r, sc, bi, h0, h1, hscale, hsum, gscale, gbias)


@njit(nogil=True, cache=True)
def _checked_jobs(jobs, n_rows, max_jobs, control, layer):
    """A layer's (count, host rows), or none where they do not fit (the rows are read unchecked):
    ``control[1]`` then names the layer (plus one) for the caller to report; the step still completes."""
    n = jobs[0]
    ok = 0 <= n <= max_jobs
    for e in range(n if ok else 0):
        ok = ok and 0 <= jobs[1 + e] < n_rows
    if not ok:
        control[1] = layer + 1
        return 0, jobs[1:]
    return n, jobs[1:]


@njit(nogil=True, cache=True)
def _next_layer(control, state, mark, idle_spins, served):
    """The next layer whose step the device has posted, taken: (layer, step), this thread's ``state``
    updated; or (-1, what the loop returns): told to stop, or no step for ``idle_spins`` polls."""
    layers = mark.shape[0]
    idle = 0
    while True:
        for i in range(layers):
            at = (state[2 * layers] + i) % layers
            posted = load_acquire(mark, at)
            if posted > state[at]:
                state[at] = posted
                state[layers + at] += 1
                return at, posted
        if load_acquire(control, 0) != 0:
            return -1, STOPPED
        idle += 1
        if idle > idle_spins:
            return -1, IDLE_AFTER_WORK if served else IDLE


@njit(nogil=True, cache=True)
def _slices(tid, threads, jobs, n_rows, max_jobs, inter, hidden, control, layer):
    """The layer's checked jobs (count, host rows) and this thread's slices: of the jobs' ``n x inter``
    gate and up rows, and of the ``hidden`` down rows."""
    n, rows = _checked_jobs(jobs, n_rows, max_jobs, control, layer)
    lo, hi = tid * n * inter // threads, (tid + 1) * n * inter // threads
    return n, rows, lo, hi, tid * hidden // threads, (tid + 1) * hidden // threads


@njit(nogil=True, cache=True)
def _halfway(sync, layer, threads, rounds, control):
    """Meet the other threads once every gate and up row is done (False: told to stop meanwhile)."""
    fetch_add(sync, layer * SYNC_STRIDE, 1)
    return _wait_at_least(sync, layer * SYNC_STRIDE, threads * rounds, control)


@njit(nogil=True, cache=True)
def _finish(sync, layer, threads, rounds, flag, step, state):
    """Count this thread out; the last one out posts the step in the flag (a release store: every slice
    of ``out`` is written before the device can see it). Polling starts at the next layer."""
    if fetch_add(sync, layer * SYNC_STRIDE + SYNC_STRIDE // 2, 1) == threads * rounds - 1:
        store_release(flag, layer, step)
    state[2 * flag.shape[0]] = (layer + 1) % flag.shape[0]


# The loop, once per kind of row dot (numba caches neither a loop taking its stages as arguments nor
# one that compiles the integer kind where the CPU lacks it, int8dot.AVAILABLE).
@njit(nogil=True, cache=True)
def worker_loop_float(
    tid, threads, control, state, idle_spins, mark, flag, jobs, weights, x, out, sync, h, slab, gate, up, down,
    group_size, bits,
):  # fmt: skip
    """Thread ``tid`` of ``threads``: serve each layer whose step the device posts, until ``control[0]``
    is set (returns STOPPED) or no step comes for ``idle_spins`` polls (returns IDLE, or IDLE_AFTER_WORK
    if it served any; call again to go on). The device posts one layer at a time (the next only after
    this one's flag), so every thread finds the same one; the layers are polled from the one after the
    last served, the likely next. ``state`` (int64 ``[2 * layers + 1]``, this thread's own): the last
    step served a layer, the rounds served a layer, and where polling starts; it carries over between
    calls. Float row dots."""
    layers, served = mark.shape[0], False
    while True:
        layer, step = _next_layer(control, state, mark, idle_spins, served)
        if layer < 0:
            return step
        served, rounds = True, state[layers + layer]
        n, rows, lo, hi, d_lo, d_hi = _slices(tid, threads, jobs[layer], slab.shape[0], h.shape[0], h.shape[1],
                                              x.shape[1], control, layer)  # fmt: skip
        gate_up_float(x[layer], h, slab, rows, n, lo, hi, gate, up, group_size, bits)
        if not _halfway(sync, layer, threads, rounds, control):
            return STOPPED
        down_float(h, slab, rows, weights[layer], n, d_lo, d_hi, down, group_size, bits, out[layer])
        _finish(sync, layer, threads, rounds, flag, step, state)


@njit(nogil=True, cache=True)
def worker_loop_int8(
    tid, threads, control, state, idle_spins, mark, flag, jobs, weights, x, out, sync, h, slab, gate, up, down,
    group_size, bits,
):  # fmt: skip
    """:func:`worker_loop_float` on int8 activations (4 or 2 bits, 64-column groups: int8dot's row dots)."""
    layers, served = mark.shape[0], False
    while True:
        layer, step = _next_layer(control, state, mark, idle_spins, served)
        if layer < 0:
            return step
        served, rounds = True, state[layers + layer]
        n, rows, lo, hi, d_lo, d_hi = _slices(tid, threads, jobs[layer], slab.shape[0], h.shape[0], h.shape[1],
                                              x.shape[1], control, layer)  # fmt: skip
        gate_up_int8(x[layer], h, slab, rows, n, lo, hi, gate, up, group_size, bits)
        if not _halfway(sync, layer, threads, rounds, control):
            return STOPPED
        down_int8(h, slab, rows, weights[layer], n, d_lo, d_hi, down, group_size, bits, out[layer])
        _finish(sync, layer, threads, rounds, flag, step, state)
