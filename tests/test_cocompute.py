"""The host's worker threads for experts computed beside a GPU (runtime/experts/cocompute.py,
runtime/kernels/cpu_cocompute.py), driven from the test as the device would drive them: a layer's
input and jobs, then its step number; the threads' weighted sum against float64."""

from __future__ import annotations

import time

import numpy as np
import pytest
from support import exact_terms, expert_config

from fmoe.formats.packed import ExpertLayout
from fmoe.formats.quant import quantize
from fmoe.runtime.experts.cocompute import HostCoCompute
from fmoe.runtime.kernels import int8dot

HIDDEN, INTER = 256, 192  # 192: three 64-column groups, so thread slices end inside a group


def _slab(rng: np.random.Generator, bits: int, rows: int) -> tuple[np.ndarray, ExpertLayout]:
    layout = ExpertLayout.for_config(expert_config(HIDDEN, INTER), bits)
    shapes = {"gate_proj": (INTER, HIDDEN), "up_proj": (INTER, HIDDEN), "down_proj": (HIDDEN, INTER)}
    slab = np.zeros((rows, layout.file_size), np.uint8)
    for r in range(rows):
        w = {p: quantize((rng.standard_normal(s) / np.sqrt(s[1])).astype(np.float32), bits) for p, s in shapes.items()}
        slab[r] = np.frombuffer(layout.encode(w), np.uint8)
    return slab, layout


def _exact(
    slab: np.ndarray, layout: ExpertLayout, x: np.ndarray, rows: list[int], weights: list[float]
) -> tuple[np.ndarray, np.ndarray]:
    """``sum_j weights[j] * expert(rows[j])(x)`` in float64 from the packed codes, and the size of what
    the kernels add up for it (``sum_j |w_j| (|s q| + |b|) @ |h_j|`` of the down projections, as the
    CPU kernels' tests measure their float32 sums)."""
    total, magnitude = np.zeros(HIDDEN), np.zeros(HIDDEN)
    for r, w in zip(rows, weights, strict=True):
        e = layout.decode(slab[r])
        g, u = (exact_terms(e[p])[0] @ x.astype(np.float64) for p in ("gate_proj", "up_proj"))
        h = g / (1 + np.exp(-g)) * u
        down, down_terms = exact_terms(e["down_proj"])
        total += w * (down @ h)
        magnitude += abs(w) * (down_terms @ np.abs(h))
    return total, magnitude


@pytest.mark.parametrize("bits", [4, 2, 8])
@pytest.mark.parametrize("threads", [1, 3])
def test_workers_compute_each_layers_weighted_experts(bits: int, threads: int, rng: np.random.Generator) -> None:
    """Layers in turn, each with 0 to 3 jobs on random rows and weights: float row dots within 1e-5 of
    float64 against the size of their terms (the CPU kernels' bound for a slab's experts); three
    threads split rows unevenly (192 x jobs over 3, 256 over 3)."""
    slab, layout = _slab(rng, bits, 6)
    with HostCoCompute(slab, layout, layers=3, max_experts=3, threads=threads) as hc:
        assert not hc.int8
        for turn in range(8):
            n = turn % 4
            rows = rng.choice(6, size=n, replace=False).tolist()
            weights = rng.uniform(0.1, 1.0, n).tolist()
            x = rng.standard_normal(HIDDEN).astype(np.float32)
            got = hc.compute(x, rows, weights)
            want, magnitude = _exact(slab, layout, x, rows, weights)
            if n == 0:
                assert not got.any()  # a layer without jobs adds nothing (the slices are zeroed, not stale)
            else:
                assert (np.abs(got - want) / (magnitude + np.abs(want))).max() < 1e-5


@pytest.mark.skipif(not int8dot.AVAILABLE, reason="needs a CPU with AVX512-VNNI or AVX2")
@pytest.mark.parametrize("bits", [4, 2])
def test_int8_workers_stay_within_the_rounding_of_their_activations(bits: int, rng: np.random.Generator) -> None:
    """With int8 activations (4 or 2 bits, 64-column groups): the input and each expert's ``h`` rounded to
    int8 per group, measured against the magnitude of the terms as the CPU kernels' int8 test does
    (about 1% here; a wrong row, group, scale or weight moves it to tens of percent); and not the
    float path's result."""
    slab, layout = _slab(rng, bits, 5)
    with HostCoCompute(slab, layout, layers=2, max_experts=3, threads=2, int8=True) as hc:
        assert hc.int8
        for _ in range(4):
            rows, weights = rng.choice(5, size=3, replace=False).tolist(), rng.uniform(0.1, 1.0, 3).tolist()
            x = rng.standard_normal(HIDDEN).astype(np.float32)
            got = hc.compute(x, rows, weights)
            want, magnitude = _exact(slab, layout, x, rows, weights)
            assert np.linalg.norm(got - want) < 0.05 * np.linalg.norm(magnitude)
            assert np.abs(got - want).max() > 1e-5 * np.abs(want).max()


def test_workers_resume_after_napping_and_stop_when_closed(rng: np.random.Generator) -> None:
    """An idle worker leaves its spin loop to nap and comes back for the next step; close() returns
    with every thread ended, and a closed instance refuses work instead of waiting for ever."""
    slab, layout = _slab(rng, 4, 2)
    hc = HostCoCompute(slab, layout, layers=2, max_experts=1, threads=2)
    x = rng.standard_normal(HIDDEN).astype(np.float32)
    first = hc.compute(x, [1], [0.5])
    deadline = time.monotonic() + 30
    while min(hc.naps) == 0 and time.monotonic() < deadline:  # every worker idle long enough to nap
        time.sleep(0.01)
    assert min(hc.naps) > 0
    assert np.array_equal(hc.compute(x, [1], [0.5]), first)  # layer 1 now, same jobs: the same sum
    hc.close()
    assert not any(w.is_alive() for w in hc._workers)
    with pytest.raises(RuntimeError, match="stopped"):
        hc.compute(x, [1], [0.5])


def test_jobs_that_do_not_fit_leave_the_sum_zero_and_are_reported(rng: np.random.Generator) -> None:
    """Jobs are written by the device, so the workers check them before reading rows unchecked: a row
    outside the slab or too many jobs leave that layer's sum zero and check() names the layer."""
    slab, layout = _slab(rng, 4, 2)
    with HostCoCompute(slab, layout, layers=2, max_experts=2, threads=1) as hc:
        hc.jobs[0, :3] = [1, 7, 0]  # what compute() refuses to write: the device's part, played by hand
        hc.out[0] = 1.0
        hc.mark[0] = 1
        deadline = time.monotonic() + 30
        while hc.flag[0] < 1 and time.monotonic() < deadline:
            time.sleep(1e-3)
        assert hc.flag[0] == 1 and not hc.out[0].any()
        with pytest.raises(RuntimeError, match="layer 0's jobs do not fit"):
            hc.check()
    hc = HostCoCompute(slab, layout, layers=1, max_experts=1, threads=1)
    try:
        with pytest.raises(ValueError, match="host row out of range"):
            hc.compute(np.zeros(HIDDEN, np.float32), [5], [1.0])
    finally:
        hc.close()


def test_bad_arguments_are_refused(rng: np.random.Generator) -> None:
    slab, layout = _slab(rng, 4, 1)
    with pytest.raises(ValueError, match="C-contiguous uint8"):
        HostCoCompute(slab[:, :-1], layout, layers=1, max_experts=1, threads=1)
    with pytest.raises(ValueError, match="at least one layer"):
        HostCoCompute(slab, layout, layers=0, max_experts=1, threads=1)
    with pytest.raises(ValueError, match="2 cores for 1 threads"):
        HostCoCompute(slab, layout, layers=1, max_experts=1, threads=1, cores=[0, 1])


def test_device_hand_over_and_host_sum_through_the_kernels(rng: np.random.Generator) -> None:
    """The device's part (runtime/kernels/triton_cocompute.py, through Triton's interpreter without a
    GPU): of K choices with some homed in host rows, the first round(share x count) go to the host
    workers, the device's map gets -1 for exactly those, and the host's sum lands in the output once
    its flag shows the layer's step; three layers, twice each, with different shares."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from fmoe.runtime.experts.cocompute_device import DeviceCoCompute

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    slab, layout = _slab(rng, 4, 6)
    n_experts, k, layers = 16, 6, 3
    dc = DeviceCoCompute(slab, layout, layers, n_experts, device, share=0.5, threads=2, max_jobs=3)
    handed = 0
    try:
        for turn in range(2 * layers):
            layer = turn % layers
            share = (0.5, 1.0, 0.0)[turn % 3]
            dc.share.fill_(share)
            host_map = torch.arange(n_experts, dtype=torch.int32)  # device slots, and six host rows:
            homed = rng.choice(n_experts, size=6, replace=False)
            host_map[homed] = torch.tensor([-2 - r for r in range(6)], dtype=torch.int32)
            ids = torch.from_numpy(rng.choice(n_experts, size=(1, k), replace=False))
            weights = torch.from_numpy(rng.uniform(0.1, 1.0, (1, k)).astype(np.float32))
            x = torch.from_numpy(rng.standard_normal((1, HIDDEN)).astype(np.float32))
            on_host = [j for j in range(k) if int(host_map[ids[0, j]]) <= -2]
            taken = on_host[: min(3, int(len(on_host) * share + 0.5))]
            handed += len(taken)
            override = dc.hand_over(layer, x.to(device), ids.to(device), weights.to(device), host_map.to(device))
            want_map = host_map.clone()
            want_map[ids[0, taken]] = -1
            assert torch.equal(override.cpu(), want_map)
            out = torch.from_numpy(rng.standard_normal((1, HIDDEN)).astype(np.float32))
            got = dc.add_host_sum(layer, out.clone().to(device)).cpu().numpy()[0]
            rows = [-2 - int(host_map[ids[0, j]]) for j in taken]
            want, magnitude = _exact(slab, layout, x.numpy()[0], rows, [float(weights[0, j]) for j in taken])
            assert (np.abs(got - out.numpy()[0] - want) / (magnitude + np.abs(want) + 1e-30)).max() < 1e-5
            assert int(dc.steps[layer]) == turn // layers + 1
        dc.queue_read()
        if device.type == "cuda":
            torch.cuda.synchronize()
        assert int(dc.take_in().sum()) == handed  # the jobs counted for the statistics
        assert not dc.computed.any()  # (and the counters zeroed for the next pass)
    finally:
        dc.close()


def test_bench_ceiling_counts_the_host_memory_both_sides_read() -> None:
    """The decode ceiling with experts computed on the host: the dense part and the device's experts at
    the device's rate, then the slowest of the link's bytes at the link's rate and the host's plus the
    link's bytes at the host memory's rate (the link reads that memory too). By hand: 2 GB at 4 TB/s
    is 0.5 ms; link 0.5 GB at 50 GB/s is 10 ms; host 1 GB + 0.5 GB at 100 GB/s is 15 ms: 64.5 tok/s;
    with the host's memory at 200 GB/s the link's 10 ms: 95.2 tok/s."""
    from fmoe.runtime.bench import BenchResult
    from fmoe.runtime.engine.results import PhaseTiming

    def result(host_rate: float, shared: float | None = None) -> BenchResult:
        return BenchResult(
            PhaseTiming(1), PhaseTiming(1), 1, 1, 4, 10, "torch", "cuda", "triton", None, 0, {},
            dense_bytes_per_token=1_500_000_000, memory_read_gb_per_s=4000.0, link_gb_per_s=50.0,
            link_bytes_per_token=500_000_000, resident_expert_bytes=500_000_000,
            host_compute_bytes_per_token=1_000_000_000, host_read_gb_per_s=host_rate, host_shared_gb_per_s=shared,
        )  # fmt: skip

    assert result(100.0).decode_ceiling_tok_s == pytest.approx(1 / 0.0155)
    assert result(200.0).decode_ceiling_tok_s == pytest.approx(1 / 0.0105)
    # the same with host memory at the rate it gave the link and the CPU at once (75 GB/s: 20 ms)
    both = result(100.0, shared=75.0)
    assert both.decode_ceiling_tok_s == pytest.approx(1 / 0.0155)
    assert both.decode_ceiling_shared_tok_s == pytest.approx(1 / 0.0205)
    assert result(100.0).decode_ceiling_shared_tok_s is None
    assert both.to_dict()["decode_ceiling_shared_tok_s"] == both.decode_ceiling_shared_tok_s


def test_bench_header_names_the_hosts_share(capsys: pytest.CaptureFixture[str]) -> None:
    from fmoe.cli.bench_commands import _print_bench
    from fmoe.runtime.bench import BenchResult
    from fmoe.runtime.engine.results import PhaseTiming

    result = BenchResult(
        PhaseTiming(1), PhaseTiming(1), 1, 1, 4, 10, "torch", "cuda", "triton", None, 0, {}, 0, None,
        host_reads="direct", host_compute_share=0.6,
    )  # fmt: skip
    _print_bench("synthetic", result, ["linear_attention"], timing=False, as_json=False)
    assert "the host computing 0.60 of each decode layer's host-homed experts" in " ".join(
        capsys.readouterr().out.split()
    )


def test_device_side_failures_surface_as_one_line_errors(rng: np.random.Generator) -> None:
    """What the device's statistics read brings back: jobs the host could not take (rows outside its
    slab, as the device might write them) and the device giving up on the host's flag each become a
    one-line error at the next read, naming the option; a clean read returns the jobs counted."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from fmoe.errors import FmoeError
    from fmoe.runtime.experts.cocompute_device import DeviceCoCompute

    slab, layout = _slab(rng, 4, 2)
    dc = DeviceCoCompute(slab, layout, 1, 4, torch.device("cpu"), share=0.5, threads=1)
    try:
        dc.queue_read()
        assert not dc.take_in().any()
        dc._failed[0] = 1  # (as the wait kernel sets it after its polls)
        dc.queue_read()
        with pytest.raises(FmoeError, match="--host-compute: the device gave up"):
            dc.take_in()
        dc._failed[0] = 0
        dc.host.jobs[0, :2] = [1, 9]  # a row outside the host slab
        dc.host.mark[0] = 1
        deadline = time.monotonic() + 30
        while dc.host.flag[0] < 1 and time.monotonic() < deadline:
            time.sleep(1e-3)
        dc.queue_read()
        with pytest.raises(FmoeError, match="--host-compute: layer 0's jobs do not fit"):
            dc.take_in()
    finally:
        dc.close()
