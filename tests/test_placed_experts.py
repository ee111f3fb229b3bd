"""Experts at fixed homes (runtime/experts/placed.py, ``--host-reads direct``): device slots or host
rows that the kernels read in place. The same logits as the host path with most experts on the host,
before and after rebalancing moves them; rebalancing moves the most routed host experts' bytes to
the device and the least routed back; one CUDA graph for the whole step; the bench and its errors.
Runs on the CPU (torch's kernels; Triton's interpreter for the kernels themselves is in
tests/test_triton_kernels.py) and on CUDA when present (page-locked host rows, Triton kernels)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import assert_cli_error, expert_config, replaying_capture, whole_blocks
from typer.testing import CliRunner

import fmoe
from fmoe.cli import app
from fmoe.errors import CorruptionError, FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.diagnostics import build_packed

torch = pytest.importorskip("torch")

from fmoe.runtime.experts.host_share import check_host_reads  # noqa: E402
from fmoe.runtime.experts.placed import PlacedExperts  # noqa: E402
from fmoe.runtime.experts.stats import TIERS  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = "triton" if DEVICE == "cuda" else "torch"


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("placed"), seed=5)[1]


def _direct(packed: Path, slots: int, kernels: str = KERNELS, **options: Any) -> fmoe.Engine:
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as probe:
        size = probe.runner.store.layout.file_size
    return fmoe.load(
        packed, backend="torch", device=DEVICE, device_cache_bytes=slots * size, host_reads="direct",
        backend_options={"kernels": kernels}, **options,
    )  # fmt: skip


def _kernels() -> list[str]:
    """The torch backend's kernel sets usable here: Triton needs a GPU or its interpreter."""
    import importlib.util
    import os

    usable = importlib.util.find_spec("triton") is not None and (
        DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    return ["torch", "triton"] if usable else ["torch"]


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_direct_reads_match_the_host_path_before_and_after_rebalancing(packed: Path) -> None:
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        ids = host.tokenizer.encode("a prompt long enough that the prefill routes to many experts")
        want = host.logits(ids)
    with _direct(packed, slots=5) as engine:
        store, cfg = engine.runner.store, engine.config
        assert isinstance(store, PlacedExperts) and store.capacity == 5
        assert (store.home < -1).sum() == cfg.num_hidden_layers * cfg.num_experts - 5

        def no_read_back(_ids: object) -> np.ndarray:
            raise AssertionError("the routing was read back to the host")

        engine.runner.backend.expert_ids = no_read_back  # every layer on the device's slot map
        first = engine.logits(ids)
        stats = store.stats
        assert stats.tier("device")["served"] + stats.tier("memory")["served"] == int(stats.requested.sum()) > 0
        assert stats.tier("memory")["served"] > 0
        before = store.home.copy()
        store.every = 1  # a rebalance after every pass: the most routed host experts move in
        engine.logits(ids)
        assert store.swaps > 0 and (store.home != before).any()
        again = engine.logits(ids)
        result = engine.generate(ids, max_tokens=2)
        assert result.timing.host_reads == "direct" and result.timing.to_dict()["host_reads"] == "direct"
    for got in (first, again):
        assert _rel(got, want) < 1e-5
        assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize("kernels", _kernels())
def test_host_rows_of_another_width_match_the_float64_reference(
    tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch, kernels: str
) -> None:
    """`--host-bits 2`: the device slots hold experts' 4-bit files, the host rows the others' 2-bit
    ones, and the logits (prefill, then decode steps) are float64's on exactly that mix of files,
    before and after rebalancing has swapped homes (each swap reading the other width's files); the
    link's bytes are the 2-bit files'."""
    from fmoe.runtime.diagnostics import float64_reference, packed_weights, relative_error

    whole_blocks(monkeypatch)  # (Triton's interpreter: the largest blocks)
    packed = build_packed(tmp_path_factory.mktemp("mixed"), seed=5, expert_bits=(4, 2))[1]
    cfg, dense, experts4 = packed_weights(packed, 4)
    experts2 = packed_weights(packed, 2)[2]
    prompt = [3, 141, 59, 265, 35, 89]
    steps = [7, 300] if kernels == "torch" else [7]  # (the interpreter runs a step's programs one by one)

    def run(engine: fmoe.Engine) -> np.ndarray:
        net, be = engine.runner.network, engine.runner.backend
        state = net.new_state()
        out = [be.to_numpy(net.forward(np.array(prompt), state))]
        out += [be.to_numpy(net.forward(np.array([t]), state, last_only=True)) for t in steps]
        net.after_pass()
        return np.concatenate(out)

    def reference(homes: np.ndarray) -> np.ndarray:
        mixed = {
            layer: {e: (experts4 if homes[layer, e] >= 0 else experts2)[layer][e] for e in range(cfg.num_experts)}
            for layer in range(cfg.num_hidden_layers)
        }
        return float64_reference(cfg, dense, mixed, [*prompt, *steps], engine.k)[0]

    with _direct(packed, slots=5, kernels=kernels, host_bits=2) as engine:
        store = engine.runner.store
        assert store.mixed and store.capacity == 5 and store.host.shape[1] == store.host_layout.file_size
        first, homes = run(engine), store.home.copy()
        reads = store.stats.tier("memory")
        assert store.host_bits == 2
        if kernels == "torch":  # homes follow the routing: the most routed host experts move in
            assert engine.generate(prompt, max_tokens=1).timing.to_dict()["host_bits"] == 2
            store.every = 1
            engine.runner.network.after_pass()  # (plans the swaps; their files are read meanwhile)
            store.settle()
            assert store.swaps > 0 and (store.home != homes).any()
            again, moved = run(engine), store.home.copy()
    assert relative_error(first, reference(homes)).max() < 1e-4
    assert reads["served"] > 0 and reads["bytes"] == reads["served"] * store.host_layout.file_size
    all4 = float64_reference(cfg, dense, experts4, [*prompt, *steps], engine.k)[0]
    assert relative_error(reference(homes), all4).max() > 1e-2  # (the 2-bit files count)
    if kernels == "torch":
        assert relative_error(again, reference(moved)).max() < 1e-4


def test_homes_of_two_widths_swap_the_other_widths_files() -> None:
    """A swap between a device slot and a host row of another width: the expert moving in gets its
    device-width file, the one moving out its host-width file (read by the provider's reader), and both
    maps follow; without those files, homes of two widths stay where they are."""
    wide, narrow = _layout(), ExpertLayout.for_config(expert_config(64, 32, 4), 2, 32)

    class Files:  # file bytes that say which they are: 10 * layer + expert, plus 100 at the host width
        closed = False

        def read_into(self, layer: int, expert: int, on_device: bool, buf: np.ndarray) -> None:
            assert buf.size == (wide if on_device else narrow).file_size
            buf[...] = 10 * layer + expert + (0 if on_device else 100)

        def close(self) -> None:
            Files.closed = True

    host = np.zeros((4, narrow.file_size), dtype=np.uint8)
    store = PlacedExperts(wide, 2, 4, 4, DEVICE, host, host_layout=narrow, files=Files(), every=14, swap_rate=0.1)
    np.testing.assert_array_equal(store.home, [[0, 1, -2, -3], [2, 3, -4, -5]])
    counts = store.all_resident(1).routed_counts
    for _ in range(3):  # expert 3 of layer 1 (host row 3) hot, expert 0 (slot 2) cold
        counts += torch.tensor([0, 5, 0, 9], dtype=torch.int32, device=DEVICE)
        store.maintain()
    store.settle()
    assert store.swaps == 1
    np.testing.assert_array_equal(store.home[1], [-5, 3, -4, 2])
    assert (store.slab[2].cpu().numpy() == 13).all()  # expert 3's device-width file in slot 2
    assert (store.host[3] == 110).all()  # expert 0's host-width file in host row 3
    part = store.all_resident(1)
    np.testing.assert_array_equal(part.device_slots.cpu().numpy(), [-1, 3, -1, 2])
    np.testing.assert_array_equal(part.host_slots.cpu().numpy(), [-5, -1, -4, -1])
    store.close()
    assert Files.closed
    fixed = PlacedExperts(wide, 2, 4, 4, DEVICE, host, host_layout=narrow)
    with pytest.raises(FmoeError, match="other width's files"):
        fixed.rebalance(1)
    fixed.close()

    class Corrupt(Files):  # a swap meets a file whose checksum fails: its one-line error at the next pass
        def read_into(self, layer: int, expert: int, on_device: bool, buf: np.ndarray) -> None:
            raise CorruptionError(f"layer {layer} expert {expert}: xxh3_128 mismatch")

    bad = PlacedExperts(wide, 2, 4, 4, DEVICE, host, host_layout=narrow, files=Corrupt(), every=1)
    bad.all_resident(1).routed_counts.add_(torch.tensor([0, 5, 0, 9], dtype=torch.int32, device=DEVICE))
    bad.maintain()
    bad.maintain()  # (the counters taken in: the swap planned, its files read)
    homes = bad.home.copy()
    with pytest.raises(CorruptionError, match="xxh3_128 mismatch"):
        bad.settle()
    np.testing.assert_array_equal(bad.home, homes)  # nothing moved
    bad.close()
    Files.closed = False
    everything = PlacedExperts(wide, 2, 4, 8, DEVICE, host, host_layout=narrow, files=Files())  # all on the device
    assert not everything.mixed and everything.all_resident(0).host_slots is None and Files.closed
    everything.close()


def _layout() -> ExpertLayout:
    return ExpertLayout.for_config(expert_config(64, 32, 4), 4, 32)


def _marked(layout: ExpertLayout, rows: int, start: int) -> np.ndarray:
    """``rows`` expert files whose bytes say which they are (row i: every byte ``start + i``)."""
    return np.repeat(np.arange(start, start + rows, dtype=np.uint8)[:, None], layout.file_size, axis=1)


def test_rebalancing_moves_the_most_routed_host_experts_to_the_device() -> None:
    layout = _layout()
    # a rebalance after 14 choices a layer, 0.1 swaps a choice: one swap then
    store = PlacedExperts(layout, 2, 4, 4, DEVICE, _marked(layout, 4, 100), every=14, swap_rate=0.1)
    # two device slots a layer (its first experts), the rest in host rows in order
    np.testing.assert_array_equal(store.home, [[0, 1, -2, -3], [2, 3, -4, -5]])
    store.slab.copy_(torch.from_numpy(_marked(layout, 4, 0)))
    np.testing.assert_array_equal(store.all_resident(1).device_slots.cpu().numpy(), [2, 3, -4, -5])
    counts = store.all_resident(1).routed_counts
    counts += torch.tensor([0, 5, 0, 9], dtype=torch.int32, device=DEVICE)  # expert 3 hot, 0 cold
    store.maintain()
    assert store.swaps == 0  # 7 choices a layer so far
    counts += torch.tensor([0, 5, 0, 9], dtype=torch.int32, device=DEVICE)
    store.maintain()
    assert store.swaps == 0  # (a pass's counters are taken in at the next maintain: nothing waits for them)
    assert not counts.any()  # the counters start again after each pass
    store.maintain()  # a pass that routed nothing
    assert store.swaps == 1  # the largest gain only: expert 3 for expert 0 (slot 2, host row 3)
    np.testing.assert_array_equal(store.home, [[0, 1, -2, -3], [-5, 3, -4, 2]])
    np.testing.assert_array_equal(store.all_resident(1).device_slots.cpu().numpy(), [-5, 3, -4, 2])
    assert (store.slab[2].cpu().numpy() == 103).all()  # host row 3's bytes (expert 3) now in slot 2
    assert (store.host[3] == 2).all()  # slot 2's bytes (expert 0) now in host row 3
    np.testing.assert_array_equal(store.all_resident(1).slots, [-5, 3, -4, 2])
    stats = store.stats  # two passes routed to experts 1 (device) and 3 (host): by distinct expert a pass
    assert stats.tier("device")["served"] == 2 and stats.tier("memory")["served"] == 2
    assert stats.tier("memory")["bytes"] == 2 * layout.file_size
    store.close()


def test_each_pass_statistics_come_back_by_its_number() -> None:
    """A step queued ahead has its own pass's statistics when its pick is collected: the pass maintained
    as that number, never the one queued after it (whose counters are not waited for)."""
    layout = _layout()
    store = PlacedExperts(layout, 2, 4, 4, DEVICE, _marked(layout, 4, 100))  # homes [[0, 1, -2, -3], [2, 3, -4, -5]]
    store.all_resident(1).routed_counts.add_(torch.tensor([0, 5, 0, 9], dtype=torch.int32, device=DEVICE))
    store.maintain()
    store.all_resident(0).routed_counts.add_(torch.tensor([2, 0, 1, 0], dtype=torch.int32, device=DEVICE))
    store.maintain()
    assert store.passes == 2
    first = store.pass_stats(1)
    np.testing.assert_array_equal(first.served[:, TIERS.index("device")], [0, 1])  # layer 1's expert 1
    np.testing.assert_array_equal(first.served[:, TIERS.index("memory")], [0, 1])  # and its expert 3
    second = store.pass_stats(2)
    np.testing.assert_array_equal(second.served[:, TIERS.index("device")], [1, 0])  # layer 0's expert 0
    np.testing.assert_array_equal(second.bytes[:, TIERS.index("memory")], [layout.file_size, 0])  # its expert 2
    assert store.pass_stats(1).requested.sum() == 0  # handed out once
    assert store.stats.requested.sum() == 4  # the totals hold both
    store.close()


def test_homes_with_fewer_host_rows_than_experts_share_them() -> None:
    layout = _layout()
    store = PlacedExperts(layout, 3, 4, 5, DEVICE, _marked(layout, 2, 0))
    # 5 slots over 3 layers: 2, 2, 1; the 7 experts left share 2 host rows in turn
    np.testing.assert_array_equal(store.home, [[0, 1, -2, -3], [2, 3, -2, -3], [4, -2, -3, -2]])
    assert store.capacity == 5 and not store.fully_resident
    with pytest.raises(FmoeError, match="the host slab must be uint8"):
        PlacedExperts(layout, 1, 4, 2, DEVICE, np.zeros((2, 8), np.uint8))
    store.close()


def test_plan_swaps_takes_the_largest_gains_first_within_each_layer() -> None:
    from fmoe.runtime.experts.homes import plan_swaps

    home = np.array([[0, 1, -2, -3], [2, -4, 3, -5]])  # layer 0: device 0, 1; layer 1: device 0, 2
    freq = np.array([[1.0, 5.0, 9.0, 0.5], [3.0, 7.0, 0.0, 8.0]])
    # layer 0: host 2 (9) over device 0 (1): gain 8; host 3 (0.5) is routed to less than device 1
    # layer 1: host 3 (8) over device 2 (0): gain 8; host 1 (7) over device 0 (3): gain 4
    assert plan_swaps(home, freq, 3) == [(0, 2, 0), (1, 3, 2), (1, 1, 0)]
    assert plan_swaps(home, freq, 2) == [(0, 2, 0), (1, 3, 2)]  # the two gains of 8
    assert plan_swaps(home, np.ones_like(freq), 4) == []  # no gain, no swap


def test_cache_policy_script_replays_routing_through_the_homes() -> None:
    """scripts/cache_policy.py's homes columns use the runtime's own policy: static homes hold their
    share under uniform routing; under Zipf routing rebalancing brings the hot experts in."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "cache_policy", Path(__file__).parent.parent / "scripts/cache_policy.py"
    )
    assert spec is not None and spec.loader is not None
    cp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cp)
    from fmoe.runtime.routing_trace import RandomRouting

    layers, experts, tokens = 2, 64, 400
    for s, static_max in ((0.0, 0.6), (1.2, 0.6)):
        src = RandomRouting(layers, experts, zipf_s=s, seed=1)
        picks = np.stack([src.pick(layer, np.arange(tokens), 4) for layer in range(layers)], axis=1)
        stream = lambda t, layer, p=picks: p[t, layer]  # noqa: E731
        static, no_swaps = cp.homes_hit_rate(stream, layers, experts, tokens, 100, 0.5, 0.0)
        moved, swaps = cp.homes_hit_rate(stream, layers, experts, tokens, 100, 0.5, 1.0)
        assert no_swaps == 0 and 0.4 < static < static_max
        if s:
            assert swaps > 0 and moved > static + 0.2  # the hot experts moved to the device
        else:
            assert abs(moved - static) < 0.1  # nothing to gain under uniform routing


def test_a_prefill_stages_the_host_experts_it_routes_to() -> None:
    """The grouped GEMM's narrow reads are slow over the link: a prefill copies the host-homed experts
    it uses to a device buffer and renames their slots to its rows; device-homed slots stay."""
    from fmoe.runtime.backends.torch_backend import stage_host_experts

    layout = _layout()
    store = PlacedExperts(layout, 1, 6, 2, DEVICE, _marked(layout, 4, 100))  # experts 2..5: host rows 0..3
    part = store.all_resident(0)
    ids = torch.tensor([[5, 0], [3, 5], [1, 0]], device=DEVICE)
    slots, buffer = stage_host_experts(part, ids, store.table)
    assert buffer is not None and buffer.device == store.slab.device and buffer.shape[0] == 2
    # experts 3 and 5 (host rows 1 and 3) staged in id order: buffer rows 0 and 1, slots -2 and -3
    np.testing.assert_array_equal(slots.cpu().numpy(), [[-3, 0], [-2, -3], [1, 0]])
    assert (buffer[0].cpu().numpy() == 101).all() and (buffer[1].cpu().numpy() == 103).all()
    slots, buffer = stage_host_experts(part, ids[2:], store.table)
    assert buffer is None
    np.testing.assert_array_equal(slots.cpu().numpy(), [[1, 0]])
    store.close()


@pytest.mark.parametrize(("host_bits", "share", "graphed"), [(None, 1.0, True), (2, 0.5, False)])
def test_host_computes_part_of_each_decode_layer_inside_the_one_graph(
    tmp_path_factory: Any, monkeypatch: pytest.MonkeyPatch, host_bits: int | None, share: float, graphed: bool
) -> None:
    """`--host-compute` with direct reads: in each decode layer the hand-over gives the host workers
    ``share`` of the token's host-homed choices (rows read in place, in the host rows' width) while
    the device reads the rest; eager and graphed decode (one graph still) give the logits of the run
    without it, and each step's statistics count, layer by layer, round(share x its host-homed
    choices) experts computed by the host. (Short: Triton's interpreter runs every kernel here.)"""
    if "triton" not in _kernels():
        pytest.skip("the hand-over is a Triton kernel: needs a GPU or Triton's interpreter")
    from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder

    whole_blocks(monkeypatch)  # (Triton's interpreter: the largest blocks)
    packed = build_packed(tmp_path_factory.mktemp("cocompute"), seed=5, expert_bits=(4, 2))[1]
    options = {"kernels": "triton", "host_bits": host_bits}
    prompt, tokens = np.array([3, 141]), (7, 300)

    def decode(engine: fmoe.Engine, graphed: bool, steps: list[Any]) -> list[np.ndarray]:
        """Logits of each decode token; ``steps`` gets each token's own statistics."""
        net, be, store = engine.runner.network, engine.runner.backend, engine.runner.store
        state = net.new_state()
        net.forward(prompt, state)
        net.after_pass()
        decoder = None
        if graphed:
            decoder = CudaGraphDecoder(net, state, capacity=64, capture=None if DEVICE == "cuda" else replaying_capture)
            assert decoder.cuts == []
            net.after_pass()  # (the capture's warm-up steps: a pass of their own)
        out = []
        for t in tokens:
            y = net.forward(np.array([t]), state, last_only=True) if decoder is None else decoder.step(t)
            out.append(be.to_numpy(y).copy())
            net.after_pass()
            steps.append(store.pass_stats(store.passes))
        return out

    with _direct(packed, slots=5, **options) as engine:
        want = decode(engine, False, [])
    steps: list[Any] = []
    with _direct(packed, slots=5, host_compute=str(share), **options) as engine:
        store = engine.runner.store
        assert store.cocompute is not None and store.host_share == share
        got = decode(engine, graphed, steps)
        if host_bits is None:  # homes moved by rebalancing: the jobs name the host rows as they are now
            before = store.home.copy()
            store.every = 1
            engine.runner.network.after_pass()
            assert store.swaps > 0 and (store.home != before).any()
            got += decode(engine, False, steps)
            want += want
        store.stop_sharing()  # the device reads every host-homed choice again (eager: the interpreter is slow)
        assert store.cocompute is None and store.host_share is None
        unshared: list[Any] = []
        for g, w in zip(decode(engine, False, unshared), want, strict=False):
            assert np.abs(g - w).max() <= 1e-5 * np.abs(w).max()
        assert all(int(s.host_computed.sum()) == 0 for s in unshared)
    for g, w in zip(got, want, strict=True):  # the CPU kernels' float32 sums, in another order
        assert np.abs(g - w).max() <= 1e-4 * np.abs(w).max()
        assert not np.array_equal(g, w)  # (and they did take part)
    for s in steps:  # one token: its distinct host-homed experts are its host-homed choices
        reads = s.served[:, TIERS.index("memory")]
        np.testing.assert_array_equal(s.host_computed, np.minimum(8, (reads * share + 0.5).astype(int)))
    assert sum(int(s.host_computed.sum()) for s in steps) > 0


def test_one_graph_for_the_whole_step_matches_eager_decode(packed: Path) -> None:
    from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder

    with _direct(packed, slots=5) as engine:
        net, be = engine.runner.network, engine.runner.backend
        prompt = np.array(engine.tokenizer.encode("import os\n"), dtype=np.int64)
        eager = net.new_state()
        net.forward(prompt, eager)
        graphed = eager.copy()
        capture = None if DEVICE == "cuda" else replaying_capture
        decoder = CudaGraphDecoder(net, graphed, capacity=64, capture=capture)
        assert decoder.cuts == []  # every layer all resident: no host read-back, one graph
        for token in (5, 17, 3, 99):
            want = be.to_numpy(net.forward(np.array([token]), eager, last_only=True))
            got = be.to_numpy(decoder.step(token))
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("routing", ["uniform", "zipf:1.2"])
def test_routing_replaced_on_the_host_is_an_input_of_the_one_graph(packed: Path, routing: str) -> None:
    """The benchmarks' uniform or Zipf routing does not cut the captured decode: the step stays one
    graph, its routing copied up with the token, and gives the eager decode's logits under the same
    routing token after token (each step routes its own token's draws), which differ from the
    router's own."""
    from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder
    from fmoe.runtime.routing_trace import replaying, routing_source

    tokens = (5, 17, 3, 99)
    with _direct(packed, slots=5) as engine:
        net, be, cfg = engine.runner.network, engine.runner.backend, engine.config
        prompt = np.array(engine.tokenizer.encode("import os\n"), dtype=np.int64)

        def decode(state: Any) -> list[np.ndarray]:
            net.forward(prompt, state)
            return [be.to_numpy(net.forward(np.array([t]), state, last_only=True)).copy() for t in tokens]

        def source() -> Any:
            return routing_source(routing, cfg.num_hidden_layers, cfg.num_experts, engine.k)

        own = decode(net.new_state())
        with replaying(engine, source()):
            want = decode(net.new_state())
        with replaying(engine, source()):  # the same draws for the same tokens
            graphed = net.new_state()
            net.forward(prompt, graphed)
            capture = None if DEVICE == "cuda" else replaying_capture
            decoder = CudaGraphDecoder(net, graphed, capacity=64, capture=capture)
            assert decoder.cuts == [] and decoder.routed
            got = [be.to_numpy(decoder.step(t)).copy() for t in tokens]
    for g, w, o in zip(got, want, own, strict=True):
        scale = np.abs(w).max()
        assert np.abs(g - w).max() <= 1e-5 * scale
        assert np.abs(o - w).max() > 1e-3 * scale  # (the replaced routing, not the router's)


def test_graphed_decode_queued_ahead_counts_the_experts_it_reads(packed: Path) -> None:
    """`fmoe bench --cuda-graph` over placed experts: every decode step is replayed and queued ahead of
    the one before's pick, and still the run counts what each step read, from the device and from host
    rows (over the link): each layer's K experts a step, the host's bytes behind the link figure."""
    from fmoe.runtime.bench import bench_model
    from fmoe.runtime.routing_trace import routing_source

    with _direct(packed, slots=5) as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        cfg, tokens = engine.config, 5
        source = routing_source("uniform", cfg.num_hidden_layers, cfg.num_experts, engine.k)
        result = bench_model(engine, prompt_tokens=3, tokens=tokens, warm_tokens=2, routing=source)
        size = engine.runner.store.layout.file_size
    experts = result.decode.experts
    assert result.decode.replayed == tokens
    np.testing.assert_array_equal(experts.requested, [tokens * engine.k] * cfg.num_hidden_layers)
    np.testing.assert_array_equal(experts.served.sum(axis=1), experts.requested)  # the device or host rows
    reads = experts.served[:, TIERS.index("memory")].sum()
    assert reads > 0 and result.link_bytes_per_token == pytest.approx(reads * size / tokens)


@pytest.mark.parametrize("host_bits", [None, 2])
def test_bench_synthetic_direct_reads(host_bits: int | None) -> None:
    """`fmoe bench synthetic --host-reads direct`: the JSON counts the experts read from host memory
    (over the link, per token, in their own width with `--host-bits`) beside those on the device."""
    from fmoe.runtime.synthetic import synthetic_config

    args = ["bench", "synthetic", "tiny", "--tokens", "3", "--prompt-tokens", "5", "--device", DEVICE]
    args += ["--gpu-cache-gb", "0.0005", "--host-reads", "direct", "--warm-tokens", "4", "--json"]
    if host_bits is not None:
        args[-1:-1] = ["--host-bits", str(host_bits)]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    tiers = doc["decode"]["experts"]["tiers"]
    assert doc["decode"]["experts"]["requested"] == tiers["device"]["served"] + tiers["memory"]["served"]
    assert tiers["memory"]["served"] > 0
    assert doc["link_bytes_per_token"] == pytest.approx(tiers["memory"]["bytes"] / 3)
    assert doc["host_reads"] == "direct" and doc["host_bits"] == host_bits
    cfg = synthetic_config("tiny", None)  # each tier's bytes are its experts' files, of its width
    width = {"device": doc["bits"], "memory": host_bits or doc["bits"]}
    sizes = {t: tiers[t]["bytes"] / tiers[t]["served"] for t in width if tiers[t]["served"]}
    assert sizes == {t: ExpertLayout.for_config(cfg, width[t]).file_size for t in sizes}
    table = CliRunner().invoke(app, args[:-1])
    label = "host rows read in place" + (f" ({host_bits}-bit)" if host_bits else "") + ", device slots"
    assert table.exit_code == 0 and label in " ".join(table.stdout.split())


def test_expert_table_names_the_hosts_share() -> None:
    """`--timing` of run/chat and bench's table: the store's line says what share the host computes."""
    from fmoe.cli.timing_tables import expert_table
    from fmoe.runtime.engine.results import PhaseTiming

    def title(share: float | None) -> str:
        table = expert_table(PhaseTiming(1), PhaseTiming(1), 4, 10, 1 << 30, "direct", None, share)
        return str(table.title)

    assert "the host computing 0.59 of decode's host-homed choices" in title(0.587)
    assert "host computing" not in title(None) and "host rows read in place" in title(None)
    small = expert_table(PhaseTiming(1), PhaseTiming(1), 4, 10, 3_981_312, "direct", None, None)
    assert "device slots 4.0 MB" in str(small.title)  # (a small cache is not "0.00 GB")


def test_host_reads_errors_are_one_line(packed: Path) -> None:
    base = ["bench", "synthetic", "tiny", "--tokens", "2", "--prompt-tokens", "2", "--host-gb", "0.01"]
    assert_cli_error(CliRunner().invoke(app, [*base, "--host-reads", "zero"]), "--host-reads 'zero'")
    assert_cli_error(CliRunner().invoke(app, [*base, "--warm-tokens", "0"]), "--warm-tokens")
    both = [*base, "--device", "cpu", "--gpu-cache-gb", "0.0005", "--host-reads", "direct", "--host-compute", "1.5"]
    assert_cli_error(CliRunner().invoke(app, both), "--host-compute '1.5'")
    plain = [*both[:-1], "auto"]  # (the plain-torch kernels, the CPU's default: no hand-over kernel)
    assert_cli_error(CliRunner().invoke(app, plain), "--host-compute with --host-reads direct", "Triton")
    assert_cli_error(CliRunner().invoke(app, [*base, "--backend", "cpu", "--host-reads", "direct"]), "--host-reads")
    with pytest.raises(FmoeError, match="--host-reads direct: needs the torch backend"):
        fmoe.load(packed, backend="cpu", host_reads="direct")
    run = ["run", str(packed), "--prompt", "x", "--tokens", "1", "--backend", "torch", "--device", "cpu"]
    assert_cli_error(CliRunner().invoke(app, [*run, "--host-reads", "direct"]), "--host-reads direct", "--gpu-cache-gb")
    with fmoe.load(packed, backend="torch", device="cpu", device_cache_bytes=0) as probe:
        size = probe.runner.store.layout.file_size
    capped = [*run, "--host-reads", "direct", "--gpu-cache-gb", str(3 * size / 1e9), "--timing", "--json"]
    result = CliRunner().invoke(app, capped)  # the hint's option: three device slots, the rest read in place
    assert result.exit_code == 0, result.output
    tiers = json.loads(result.stdout.strip().splitlines()[-1])["timing"]["prefill"]["experts"]["tiers"]
    assert tiers["memory"]["served"] > 0 and tiers["device"]["served"] > 0
    assert_cli_error(CliRunner().invoke(app, [*run, "--gpu-cache-gb", "-1"]), "--gpu-cache-gb -1")
    assert_cli_error(CliRunner().invoke(app, [*run, "--host-reads", "nope"]), "--host-reads 'nope'")
    check_host_reads("copy")
    assert_cli_error(CliRunner().invoke(app, [*base, "--host-bits", "2"]), "--host-bits 2", "--host-reads direct")
    assert_cli_error(CliRunner().invoke(app, [*base, "--host-reads", "direct", "--host-bits", "3"]), "--host-bits 3")
    direct = [*run, "--host-reads", "direct", "--host-bits", "2"]
    assert_cli_error(CliRunner().invoke(app, direct), "no 2-bit experts", "fmoe repack")  # (only 4-bit files there)


# ---- page-locking host memory (a fake CUDA runtime, so the bookkeeping runs on any machine) -------------
class _FakeCudart:
    """Records what is registered; refuses every registration when ``refuse``."""

    def __init__(self, refuse: bool = False) -> None:
        self.refuse, self.registered, self.unregistered, self.cleared = refuse, [], [], 0

    def cudaHostRegister(self, ptr: int, nbytes: int, flags: int) -> int:
        if self.refuse:
            return 2  # cudaErrorMemoryAllocation
        self.registered.append((ptr, nbytes))
        return 0

    def cudaHostUnregister(self, ptr: int) -> int:
        self.unregistered.append(ptr)
        return 0

    def cudaGetLastError(self) -> int:
        self.cleared += 1
        return 0


@pytest.fixture
def fake_cudart(monkeypatch: pytest.MonkeyPatch) -> _FakeCudart:
    fake = _FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: fake)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: None)
    return fake


def test_page_locked_memory_is_unregistered_once_on_close_or_when_its_owner_goes(fake_cudart: _FakeCudart) -> None:
    import gc

    from fmoe.runtime.experts.page_lock import page_lock

    class Owner:
        pass

    a, b = np.zeros(4096, np.uint8), np.zeros(8192, np.uint8)
    owner_a, owner_b = Owner(), Owner()
    unpin_a, unpin_b = page_lock(owner_a, a, torch.device("cpu")), page_lock(owner_b, b, torch.device("cpu"))
    assert unpin_a is not None and unpin_b is not None
    assert fake_cudart.registered == [(a.ctypes.data, 4096), (b.ctypes.data, 8192)]
    unpin_a()  # an explicit close
    unpin_a()
    assert fake_cudart.unregistered == [a.ctypes.data]
    del owner_b, unpin_b  # the owner collected without a close: b's registration goes with it
    gc.collect()
    assert fake_cudart.unregistered == [a.ctypes.data, b.ctypes.data]


def test_memory_the_driver_will_not_page_lock(fake_cudart: _FakeCudart) -> None:
    from fmoe.runtime.experts.page_lock import page_lock

    fake_cudart.refuse = True
    assert page_lock(object(), np.zeros(64, np.uint8), torch.device("cpu")) is None
    assert fake_cudart.cleared == 1  # the failure cleared, or the next kernel launch would report it
    # the placed experts cannot run without it: one line that says what to do
    store = PlacedExperts(_layout(), 1, 4, 2, "cpu", _marked(_layout(), 2, 0))
    with pytest.raises(
        FmoeError, match=r"--host-reads direct: could not page-lock .* ulimit -l.*--host-reads copy"
    ) as err:
        store._page_lock()
    assert "\n" not in str(err.value)
