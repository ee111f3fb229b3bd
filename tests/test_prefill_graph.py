"""Chunked prefill and a fresh sequence's first chunk replayed from a graph (runtime/engine/runner.py,
runtime/engine/prefill_graph.py): the same logits as one eager pass, and a state the decode carries
on from as it would after the eager pass. On the CPU the graph is recorded by tests/support.py's
``replaying_capture`` (a CUDA graph's contract: nothing runs at capture, each replay reruns the pass
into the same output tensors); on CUDA by real graphs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from support import replaying_capture

import fmoe
from fmoe.errors import FmoeError
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.engine.runner import PREFILL_CHUNK

torch = pytest.importorskip("torch")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
KERNELS = "triton" if DEVICE == "cuda" else "torch"  # the interpreter's Triton: minutes for a prefill


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("prefill"), seed=5)[1]


def _load(packed: Path, **options: object) -> fmoe.Engine:
    return fmoe.load(packed, backend="torch", device=DEVICE, backend_options={"kernels": KERNELS}, **options)


def _graphed(engine: fmoe.Engine) -> fmoe.Engine:
    engine.runner.cuda_graph = True
    engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
    return engine


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert got.shape == want.shape
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


def _prompt(engine: fmoe.Engine, n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, engine.config.vocab_size, n).astype(np.int64)


def _decode(engine: fmoe.Engine, state: object, tokens: list[int]) -> list[np.ndarray]:
    """Eager one-token passes from ``state``: what reads every layer's state after the prefill."""
    engine.runner.cuda_graph = False  # (the decode graphs have their own tests)
    return [engine.runner.forward([t], state, last_only=True).logits for t in tokens]  # type: ignore[arg-type]


def test_chunked_prefill_matches_one_pass(packed: Path) -> None:
    """A prompt cut into chunks (the last one short) gives every position's logits of one pass, and
    the same state after it; ``last_only`` reads back the last chunk's last row alone."""
    with _load(packed, device_cache_bytes=1 << 40) as engine:
        runner, ids = engine.runner, _prompt(engine, 13, 0)
        whole, chunked = runner.new_state(), runner.new_state()
        want = runner.forward(ids, whole).logits
        runner.prefill_chunk = 5
        got = runner.forward(ids, chunked)
        _close(got.logits, want)
        assert got.tokens == 13 and chunked.position == whole.position == 13
        last = runner.forward(ids, runner.new_state(), last_only=True).logits
        _close(last, want[-1:])
        for g, w in zip(_decode(engine, chunked, [3, 9]), _decode(engine, whole, [3, 9]), strict=True):
            _close(g, w)


@pytest.mark.parametrize("chunk", [None, 4])
def test_first_chunk_replayed_from_a_graph(packed: Path, chunk: int | None) -> None:
    """The first chunk's length seen a second time is captured and then replayed: the logits of the
    eager pass, phases left unprofiled, and a state from which decode goes on exactly as from the
    eager one (conv, recurrent and KV states copied out of the graph's own); other lengths, later
    chunks and ``last_only=False`` stay eager."""
    with _load(packed, device_cache_bytes=1 << 40) as engine:
        runner = engine.runner
        ids = _prompt(engine, 11, 1)
        eager = runner.new_state()
        want = runner.forward(ids, eager, last_only=True).logits
        follow = _decode(engine, eager, [7, 2, 5])
        _graphed(engine)
        if chunk is not None:
            runner.prefill_chunk = chunk
        first = chunk or len(ids)
        states = []
        for n in range(3):
            state = runner.new_state()
            step = runner.forward(ids, state, last_only=True, profile=True)
            _close(step.logits, want)
            graph = runner._prefill_graph
            assert (graph is not None) == (n > 0)  # the second sighting captures
            assert graph is None or graph.tokens == first
            assert (step.profile is None) == (n > 0) == step.replayed
            assert state.position == len(ids)
            states.append(state)
        for state in states[1:]:  # replayed into fresh states, one after another
            for g, w in zip(_decode(engine, state, [7, 2, 5]), follow, strict=True):
                _close(g, w)
            _graphed(engine)
        captured = runner._prefill_graph
        runner.forward(ids, runner.new_state())  # every position's logits: eager
        runner.forward(ids[:3], runner.new_state(), last_only=True)  # a length seen once: eager
        assert runner._prefill_graph is captured


def test_first_chunk_graph_needs_every_expert_resident(packed: Path) -> None:
    """With a device cache that cycles slots a pass reads routing back: first chunks stay eager, and
    the graph itself refuses with the reason."""
    from fmoe.runtime.engine.prefill_graph import CudaGraphPrefill, prefill_graph_blocker

    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        size, experts = host.runner.store.layout.file_size, host.config.num_experts
    with _load(packed, device_cache_bytes=(experts + 2) * size) as engine:
        runner = _graphed(engine).runner
        ids = _prompt(engine, 6, 2)
        for _ in range(3):
            runner.forward(ids, runner.new_state(), last_only=True)
        assert runner._prefill_graph is None
        assert prefill_graph_blocker(runner.network, cuda=False) == "not every expert is resident on the device"
        with pytest.raises(FmoeError, match="CUDA graphs for a prefill: not every expert is resident"):
            CudaGraphPrefill(runner.network, 6, capture=replaying_capture)


def test_first_chunk_stays_eager_with_routing_replaced(packed: Path) -> None:
    """Routing replaced on the host (`--routing uniform`) is made between a pass's kernels: nothing to
    capture, so first chunks stay eager, with that routing."""
    from fmoe.runtime.engine.prefill_graph import prefill_graph_blocker
    from fmoe.runtime.routing_trace import replaying, routing_source

    with _load(packed, device_cache_bytes=1 << 40) as engine:
        runner = _graphed(engine).runner
        cfg, ids = engine.config, _prompt(engine, 6, 4)
        source = routing_source("uniform", cfg.num_hidden_layers, cfg.num_experts, engine.k)
        with replaying(engine, source):
            assert prefill_graph_blocker(runner.network, cuda=False) == "routing is replaced on the host"
            for _ in range(3):
                runner.forward(ids, runner.new_state(), last_only=True)
        assert runner._prefill_graph is None
        assert prefill_graph_blocker(runner.network, cuda=False) is None
        for _ in range(2):  # the router's own routing again: captured
            want = runner.forward(ids, runner.new_state(), last_only=True).logits
        assert runner._prefill_graph is not None
        runner.cuda_graph = False
        with replaying(engine, source):  # (each replay draws from its first token on)
            eager = runner.forward(ids, runner.new_state(), last_only=True).logits
        runner.cuda_graph = True
        with replaying(engine, source):  # a kept graph is not replayed over replaced routing either
            got = runner.forward(ids, runner.new_state(), last_only=True, profile=True)
        assert got.profile is not None  # (eager: a replay has no phases; and on the CPU the recording
        assert not np.allclose(eager, want)  # capture would rerun the replayer, so the logits alone
        _close(got.logits, eager)  # could not tell)


def test_first_chunk_graph_refusals(packed: Path) -> None:
    from fmoe.runtime.engine.prefill_graph import CudaGraphPrefill

    with _load(packed, device_cache_bytes=1 << 40) as engine:
        net = engine.runner.network
        with pytest.raises(FmoeError, match="one token is a decode step"):
            CudaGraphPrefill(net, 1, capture=replaying_capture)
        graph = CudaGraphPrefill(net, 4, capture=replaying_capture)
        state = net.new_state()
        with pytest.raises(FmoeError, match="captured for 4 tokens from position 0, asked for 3 from 0"):
            graph.run(np.arange(3), state)
        if DEVICE != "cuda":
            with pytest.raises(FmoeError, match="needs a CUDA device"):
                CudaGraphPrefill(net, 4)
    with pytest.raises(FmoeError, match="prefill chunk: 0 tokens"):
        type(engine.runner)(net, 64, prefill_chunk=0)


def test_chunked_prefill_on_the_cpu_backend(packed: Path) -> None:
    """``fmoe.load(prefill_chunk=)`` reaches the runner; on the cpu backend too a chunked prompt gives
    one pass's logits at every position."""
    ids = None
    rows = []
    for chunk in (None, 3):
        options = {} if chunk is None else {"prefill_chunk": chunk}
        with fmoe.load(packed, backend="cpu", **options) as engine:
            assert engine.runner.prefill_chunk == (chunk or PREFILL_CHUNK)
            ids = _prompt(engine, 10, 3) if ids is None else ids
            rows.append(engine.logits(ids))
    _close(rows[1], rows[0])


def test_bench_synthetic_refuses_a_chunk_of_no_tokens() -> None:
    """`bench synthetic --prefill-chunk 0` is a one-line error (not the default chunk in its place)."""
    from support import assert_cli_error
    from typer.testing import CliRunner

    from fmoe.cli import app

    args = ["bench", "synthetic", "tiny", "--tokens", "2", "--prompt-tokens", "2", "--device", "cpu"]
    assert_cli_error(CliRunner().invoke(app, [*args, "--prefill-chunk", "0"]), "prefill chunk: 0 tokens")
