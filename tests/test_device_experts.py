"""The device expert tier (runtime/experts/device.py) on the torch backend: the same logits as the
host path whether every expert is resident (no host read-back of the routing) or a few slots are
cycled; the device part's slot map; synthetic experts. Runs on the CPU (torch's own kernels, and
Triton's interpreter when it is installed), and on CUDA when present."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import expert_config, replaying_capture, whole_blocks

import fmoe
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.kernels.int8dot import AVAILABLE as INT8_CPU

torch = pytest.importorskip("torch")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _kernels() -> list[str]:
    """The torch backend's kernel sets usable here: Triton needs a GPU or its interpreter."""
    import importlib.util
    import os

    usable = importlib.util.find_spec("triton") is not None and (
        DEVICE == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    )
    return ["torch", "triton"] if usable else ["torch"]


# kernels whose experts stage a captured decode holds (on CUDA the plain-torch experts read routing
# back); on the CPU, torch's own (Triton's interpreter would only take longer)
GRAPHED_KERNELS = "triton" if DEVICE == "cuda" else "torch"


@pytest.fixture(autouse=True)
def _whole_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    whole_blocks(monkeypatch)  # these cases run the model or its expert ops


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("device"), seed=3)[1]


def _load(packed: Path, kernels: str, **options: object) -> fmoe.Engine:
    return fmoe.load(packed, backend="torch", device=DEVICE, backend_options={"kernels": kernels}, **options)


@pytest.mark.parametrize("kernels", _kernels())
def test_all_resident_matches_the_host_path_without_reading_routing_back(packed: Path, kernels: str) -> None:
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        ids = host.tokenizer.encode("def add(a, b):")  # a short prefill: the interpreter is slow
        want = host.logits(ids)
    with _load(packed, kernels, device_cache_bytes=1 << 40) as dev:
        tier = dev.runner.store
        assert type(tier).__name__ == "DeviceExpertStore"
        cfg = dev.config
        assert tier.capacity == cfg.num_hidden_layers * cfg.num_experts
        be = dev.runner.backend

        def no_read_back(_ids: object) -> np.ndarray:
            raise AssertionError("the routing was read back to the host")

        be.expert_ids = no_read_back  # every layer takes the all-resident path
        got = dev.logits(ids)
        part = tier.all_resident(0)
        assert part is not None
        # the part maps every expert id to its own slot
        slots = part.device_slots.cpu().numpy()
        assert sorted(slots.tolist()) == sorted(set(slots.tolist())) and (slots >= 0).all()
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel  # the same float32 math, kernels summing in another order
    assert (got.argmax(-1) == want.argmax(-1)).all()


@pytest.mark.parametrize(
    ("kernels", "spare"),  # spare: slots beyond one layer's experts; -1: all experts but one
    [(k, s) for k in _kernels() for s in (2, -1) if (k, s) != ("triton", -1)],  # the interpreter: 90 s a case
)
def test_a_device_cache_cycles_slots_and_changes_nothing(packed: Path, kernels: str, spare: int) -> None:
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        ids = host.tokenizer.encode("a prompt long enough that the prefill routes to many experts")
        want = host.logits(ids)
        size = host.runner.store.layout.file_size
        cfg = host.config
    total = cfg.num_hidden_layers * cfg.num_experts
    capacity = cfg.num_experts + spare if spare >= 0 else total - 1
    with _load(packed, kernels, device_cache_bytes=capacity * size) as dev:
        tier = dev.runner.store
        assert tier.capacity == capacity and tier.all_resident(0) is None
        first = dev.logits(ids)
        before = tier.stats.copy()
        again = dev.logits(ids)
        second = tier.stats - before
        for stats in (tier.stats, second):
            assert stats.tier("device")["served"] + stats.tier("disk")["served"] == int(stats.requested.sum())
        if spare < 0:  # the second pass finds most experts resident (LRU: one eviction can cascade)
            assert 4 * second.tier("disk")["served"] < second.tier("device")["served"]
    for got in (first, again):
        rel = np.linalg.norm(got - want) / np.linalg.norm(want)
        assert rel < 1e-5, rel


@pytest.mark.parametrize("share", ["0.5", "1", "auto"])
def test_a_host_share_of_the_misses_changes_nothing(packed: Path, share: str) -> None:
    """Misses left on the host (computed there by the CPU kernels, added to the device's result)
    give the host path's logits, in prefill and decode; the store counts them as served from host
    memory and computed there, the rest as copied."""

    def run(engine: fmoe.Engine) -> np.ndarray:
        net = engine.runner.network
        state = net.new_state()
        prompt = engine.tokenizer.encode("a prompt that routes to many experts, then a few decode steps")
        rows = [net.backend.to_numpy(net.forward(np.array(prompt), state))]
        for token in (5, 17, 3):
            rows.append(net.backend.to_numpy(net.forward(np.array([token]), state, last_only=True)))
        return np.concatenate(rows)

    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        want = run(host)
        size, cfg = host.runner.store.layout.file_size, host.config
    capacity = cfg.num_experts + 2
    with _load(packed, "torch", device_cache_bytes=capacity * size, host_compute=share) as dev:
        tier = dev.runner.store
        assert tier.host_compute is not None
        got = run(dev)
        stats = tier.stats
        computed = int(stats.host_computed.sum())
        assert computed > 0
        if share == "1":  # every miss computed on the host: nothing copied after the first slots
            assert tier.copied_bytes == 0
        served = stats.tier("device")["served"] + stats.tier("disk")["served"] + stats.tier("memory")["served"]
        assert served == int(stats.requested.sum())
    rel = np.linalg.norm(got - want) / np.linalg.norm(want)
    assert rel < 1e-5, rel


def test_host_share_rounds_with_a_carry_and_balances_measured_times() -> None:
    from fmoe.errors import FmoeError
    from fmoe.runtime.experts.host_share import HostShare

    fixed = HostShare(0.3)
    counts = [fixed.split(4) for _ in range(100)]
    assert sum(counts) == 120 and set(counts) <= {1, 2}  # 30% of 400 misses, never more than one off
    assert HostShare(1.0).split(7) == 7 and HostShare(0.0).split(7) == 0
    auto = HostShare.parse("auto")
    assert auto is not None and auto.adaptive
    assert sum(auto.split(4) for _ in range(10)) == 20  # nothing measured yet: half and half
    auto.observe_link(0.006, 2)  # the link takes 3 ms an expert, the host 1 ms
    auto.observe_host(0.002, 2)
    assert auto.split(4) == 3 and auto.split(8) == 6  # 3 * 1 ms on the host beside 1 * 3 ms of link
    assert abs(auto.share - 0.75) < 1e-9
    slow = HostShare.parse("auto")
    assert slow is not None
    slow.observe_link(0.001, 1)
    for _ in range(50):  # a host far slower than the link (or compiling): nothing goes to it ...
        slow.observe_host(10.0, 1)
    counts = [slow.split(4) for _ in range(10 * HostShare.EXPLORE_EVERY)]
    assert sum(counts) == 10 and max(counts) == 1  # ... but one expert in every EXPLORE_EVERY steps
    assert slow.split(1) == 0  # a single miss: never forced to the slower side
    assert HostShare.parse("off") is None and HostShare.parse(None) is None and HostShare.parse("0") is None
    assert HostShare.parse("0.25").share == 0.25  # type: ignore[union-attr]
    for bad in ("2", "-0.1", "nan", "half"):
        with pytest.raises(FmoeError, match="--host-compute"):
            HostShare.parse(bad)


def test_a_device_cache_too_small_for_a_layer_is_not_used(packed: Path) -> None:
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=1) as dev:
        assert type(dev.runner.store).__name__ == "ExpertStore"


def test_synthetic_experts_are_finite_and_bounded() -> None:
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.backends.torch_backend import TorchBackend
    from fmoe.runtime.experts.device import DeviceExpertStore
    from fmoe.runtime.synthetic import fill_random_experts

    cfg = expert_config(128, 64, 4, ("linear_attention", "full_attention"))
    for bits in (2, 4, 8):
        layout = ExpertLayout.for_config(cfg, bits)
        tier = DeviceExpertStore(layout, 2, 4, 8, DEVICE)
        fill_random_experts(tier.slab, layout, torch.Generator(device=DEVICE).manual_seed(0))
        tier.assign_all()
        be = TorchBackend(DEVICE, kernels="torch")
        x = torch.randn((3, 128), device=DEVICE)
        ids = torch.tensor([[0, 3], [1, 2], [3, 3]], device=DEVICE)
        w = torch.full((3, 2), 0.5, device=DEVICE)
        part = tier.all_resident(1)
        assert part is not None
        y = be.moe(x, ids, w, (part,), torch.zeros_like(x))
        rms = float(y.square().mean().sqrt())
        assert np.isfinite(rms) and 0.05 < rms < 20, (bits, rms)  # about unit scale, not blown up
        words = tier.slab.view(torch.int32)
        assert len(torch.unique(words[:, :64])) > 100  # random codes, not a constant fill


@pytest.mark.skipif("triton" not in _kernels(), reason="needs Triton (a GPU or its interpreter)")
@pytest.mark.parametrize("bits", [2, 4])
def test_shared_expert_in_the_expert_launches_changes_nothing(bits: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Decode-sized MoE over a resident layer: a SharedExpert in the experts' format is computed
    inside the two expert launches (no separate shared-expert kernels run), equal within float32
    rounding to the shared expert computed by the dense ops and handed over as its output."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.backends.base import SharedExpert, shared_output
    from fmoe.runtime.backends.torch_backend import TorchBackend
    from fmoe.runtime.experts.device import DeviceExpertStore
    from fmoe.runtime.kernels import triton_moe as tm
    from fmoe.runtime.synthetic import fill_random_experts, random_device_quant

    hidden, inter = 128, 64
    layout = ExpertLayout.for_config(expert_config(hidden, inter, 6, ("linear_attention",)), bits)
    tier = DeviceExpertStore(layout, 1, 6, 6, DEVICE)
    fill_random_experts(tier.slab, layout, torch.Generator(device=DEVICE).manual_seed(1))
    tier.assign_all()
    part = tier.all_resident(0)
    assert part is not None
    be = TorchBackend(DEVICE, kernels="triton")
    torch.manual_seed(2)
    gate, up, down = (random_device_quant(s, bits, DEVICE) for s in ((inter, hidden),) * 2 + ((hidden, inter),))
    calls: list[str] = []

    def recorded(name: str, fn: Callable[..., object]) -> Callable[..., object]:
        def call(*args: object, **kwargs: object) -> object:
            calls.append(name)
            return fn(*args, **kwargs)

        return call

    monkeypatch.setattr(tm, "dense_gate_up", recorded("dense_gate_up", tm.dense_gate_up))
    monkeypatch.setattr(be._ops, "sigmoid_gate", recorded("sigmoid_gate", be._ops.sigmoid_gate))
    for t in (1, 2):
        x = torch.randn((t, hidden), device=DEVICE)
        ids = torch.stack([torch.randperm(6, device=DEVICE)[:3] for _ in range(t)])
        w = torch.softmax(torch.randn((t, 3), device=DEVICE), dim=-1)
        shared = SharedExpert(gate, up, down, torch.randn((t, 1), device=DEVICE))
        want = be.moe(x, ids, w, (part,), shared_output(be, x, shared))
        assert calls == ["dense_gate_up", "sigmoid_gate"]  # the shared expert by the dense ops
        calls.clear()
        got = be.moe(x, ids, w, (part,), shared)
        assert calls == []  # no shared-expert kernel of its own
        rel = float((got - want).norm() / want.norm())
        assert rel < 1e-5, rel


def test_decode_with_positions_on_the_device_matches_host_positions(packed: Path) -> None:
    """The torch backend's device-position mode (what a CUDA graph replays): RoPE from a device
    scalar, keys and values written into caches reserved to full length, attention masking the rest."""
    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as engine:
        net, be = engine.runner.network, engine.runner.backend
        prompt = np.array(engine.tokenizer.encode("print('hello')"), dtype=np.int64)
        host = net.new_state()
        net.forward(prompt, host)
        dev = host.copy()
        for layer in dev.layers:
            if hasattr(layer, "reserve"):
                layer.reserve(64)
        pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
        for token in (5, 17, 3):
            want = be.to_numpy(net.forward(np.array([token]), host, last_only=True))
            pos.fill_(dev.position)
            with be.device_positions(pos):
                got = be.to_numpy(net.forward(torch.tensor([token], device=DEVICE), dev, last_only=True))
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert dev.position == host.position


@pytest.mark.skipif(DEVICE != "cuda", reason="CUDA graphs need a CUDA device")
def test_cuda_graph_decode_matches_eager_decode(packed: Path) -> None:
    from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder

    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=1 << 40) as engine:
        net, be = engine.runner.network, engine.runner.backend
        prompt = np.array(engine.tokenizer.encode("import os\n"), dtype=np.int64)
        eager = net.new_state()
        net.forward(prompt, eager)
        graphed = eager.copy()
        decoder = CudaGraphDecoder(net, graphed, capacity=64)
        for token in (5, 17, 3, 99):
            want = be.to_numpy(net.forward(np.array([token]), eager, last_only=True))
            got = be.to_numpy(decoder.step(token))
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert graphed.position == eager.position


@pytest.mark.parametrize(
    ("cache", "split"), [("all", False), ("all", True), ("cycling", False), ("cycling-host", False)]
)
def test_segmented_graph_decode_matches_eager_decode(packed: Path, cache: str, split: bool) -> None:
    """The decoder's segments (one for the whole step when every expert is resident; one per layer
    when a device cache cycles slots, with or without a host share of the misses, or every layer is
    cut; each cut's experts kernels captured over the layer's slot map) give the eager decode's
    logits step after step, the state carried through the replays."""
    from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder

    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        size, cfg = host.runner.store.layout.file_size, host.config
    budget = 1 << 40 if cache == "all" else (cfg.num_experts + 2) * size
    host = "0.5" if cache == "cycling-host" else None
    kernels = "triton" if DEVICE == "cuda" else "torch"
    with _load(packed, kernels, device_cache_bytes=budget, host_compute=host) as engine:
        net, be = engine.runner.network, engine.runner.backend
        prompt = np.array(engine.tokenizer.encode("import os\n"), dtype=np.int64)
        eager = net.new_state()
        net.forward(prompt, eager)
        graphed = eager.copy()
        capture = None if DEVICE == "cuda" else replaying_capture
        decoder = CudaGraphDecoder(net, graphed, capacity=64, split_every_layer=split, capture=capture)
        every = list(range(cfg.num_hidden_layers))
        assert decoder.cuts == ([] if cache == "all" and not split else every)
        assert all(g is not None for g in decoder._moe_graphs)  # every cut's experts kernels captured
        stats, computed = engine.runner.store.stats, 0
        for token in (5, 17, 3, 99):
            want = be.to_numpy(net.forward(np.array([token]), eager, last_only=True))
            before = int(stats.host_computed.sum())
            got = be.to_numpy(decoder.step(token))
            computed += int(stats.host_computed.sum()) - before
            assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert graphed.position == eager.position
        assert (computed > 0) == bool(host)  # the decoder's own steps left misses to the host


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_random_device_quant_maps_unit_rms_to_unit_rms(bits: int) -> None:
    """The kernel sweeps' random matrices: the torch backend's layout, unit_rms_affine's scales and
    biases, and uniform codes: a unit-RMS input gives an output RMS of ``2 / L * sqrt(L (L + 2) / 12)``
    (L = 2**bits - 1: the centred codes' spread times the scale), within sampling noise."""
    from fmoe.runtime.synthetic import random_device_quant, unit_rms_affine

    q = random_device_quant((256, 512), bits, DEVICE)
    assert q.shape == (256, 512) and q.weight.dtype == torch.int32 and q.scales.dtype == torch.bfloat16
    scale, bias = unit_rms_affine(bits, 512)
    for got, want in ((q.scales, scale), (q.biases, bias)):
        assert (got.view(torch.int16) == int(want.view(np.int16))).all()
    x = torch.randn(64, 512, device=DEVICE)
    rms = (x @ q.dequantize().T).square().mean().sqrt().item()
    levels = (1 << bits) - 1
    assert rms == pytest.approx(2 / levels * np.sqrt(levels * (levels + 2) / 12), rel=0.1), rms


@pytest.mark.parametrize(
    "extra",
    [
        [],
        ["--gpu-cache-gb", "0.002", "--host-gb", "0.01"],
        ["--backend", "cpu", "--experts", "3", *(["--int8-dot"] if INT8_CPU else [])],
    ],
)
def test_bench_synthetic_runs_every_tier_layout(extra: list[str]) -> None:
    """`fmoe bench synthetic`: every expert on the device, a device cache over a host slab, the cpu
    backend over a host slab (with `--int8-dot` where the CPU has integer dot products); the JSON
    says which, and a wrong option is a one-line error."""
    import json

    from support import assert_cli_error
    from typer.testing import CliRunner

    from fmoe.cli import app

    args = ["bench", "synthetic", "tiny", "--tokens", "3", "--prompt-tokens", "5", "--json"]
    if "--backend" not in extra:
        extra = [*extra, "--device", DEVICE]
    result = CliRunner().invoke(app, [*args, *extra])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["decode"]["tokens"] == 3 and doc["prefill"]["tokens"] == 5
    assert doc["model"]["experts"] == (3 if "--experts" in extra else 15)
    assert doc["int8_dot"] == ("--int8-dot" in extra)
    resident = doc["resident_expert_bytes"] is not None
    assert resident == (extra[0] == "--device")  # all on the device only without a cache budget or cpu
    tiers = doc["decode"]["experts"]["tiers"]
    if not resident:  # the store counted every expert it served, from the device or the host slab
        assert doc["decode"]["experts"]["requested"] == sum(t["served"] for t in tiers.values()) > 0
        assert (tiers["device"]["served"] > 0) == (extra[0] == "--gpu-cache-gb")
    bad = CliRunner().invoke(app, ["bench", "synthetic", "tiny", "--bits", "3"])
    assert_cli_error(bad, "--bits 3")


def test_bench_synthetic_samples_when_told() -> None:
    """`fmoe bench --temperature/--top-k/--top-p`: decode draws its tokens (where the logits are) and
    the JSON says how; a bad value is a one-line error before anything is built."""
    import json

    from support import assert_cli_error
    from typer.testing import CliRunner

    from fmoe.cli import app

    args = ["bench", "synthetic", "tiny", "--tokens", "3", "--prompt-tokens", "3", "--device", DEVICE]
    result = CliRunner().invoke(app, [*args, "--temperature", "0.7", "--top-k", "5", "--top-p", "0.9", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    assert doc["sampling"] == {"temperature": 0.7, "top_k": 5, "top_p": 0.9} and doc["decode"]["tokens"] == 3
    greedy = CliRunner().invoke(app, [*args, "--json"])
    assert json.loads(greedy.stdout.strip().splitlines()[-1])["sampling"] is None
    assert_cli_error(CliRunner().invoke(app, [*args, "--top-k", "-1"]), "--top-k -1")


def test_bench_synthetic_reports_a_host_share() -> None:
    """`fmoe bench synthetic --host-compute 1`: every miss computed on the host; the JSON counts its
    bytes (none over the link) beside the host's read rate, the table shows the host-computed row."""
    import json

    from typer.testing import CliRunner

    from fmoe.cli import app

    args = ["bench", "synthetic", "tiny", "--tokens", "3", "--prompt-tokens", "3", "--device", DEVICE]
    args += ["--gpu-cache-gb", "0.002", "--host-gb", "0.01", "--host-compute", "1"]
    result = CliRunner().invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout.strip().splitlines()[-1])
    experts = doc["decode"]["experts"]
    assert experts["host_computed"] == experts["requested"] - experts["tiers"]["device"]["served"] > 0
    assert doc["host_compute_bytes_per_token"] > 0 and doc["link_bytes_per_token"] == 0
    assert doc["host_read_gb_per_s"] > 0
    table = CliRunner().invoke(app, args)
    assert table.exit_code == 0 and "host-computed" in table.stdout


@pytest.mark.skipif(DEVICE == "cuda", reason="the refusals of a machine without CUDA")
def test_cuda_graph_without_cuda_is_a_one_line_error() -> None:
    from support import assert_cli_error
    from typer.testing import CliRunner

    from fmoe.cli import app

    base = ["bench", "synthetic", "tiny", "--tokens", "2", "--prompt-tokens", "2", "--cuda-graph"]
    assert_cli_error(CliRunner().invoke(app, [*base, "--device", "cpu"]), "CUDA graphs", "CUDA device")
    replayed = CliRunner().invoke(app, [*base, "--device", "cpu", "--routing", "uniform", "--host-gb", "0.01"])
    assert_cli_error(replayed, "CUDA graphs", "CUDA device")


def test_bench_synthetic_bad_options_are_one_line_errors() -> None:
    from support import assert_cli_error
    from typer.testing import CliRunner

    from fmoe.cli import app

    base = ["bench", "synthetic", "tiny", "--tokens", "2", "--prompt-tokens", "2"]
    assert_cli_error(CliRunner().invoke(app, [*base, "--dense-bits", "5"]), "--dense-bits 5")
    assert_cli_error(CliRunner().invoke(app, [*base, "--gpu-cache-gb", "-1"]), "--gpu-cache-gb -1")
    assert_cli_error(CliRunner().invoke(app, [*base, "--host-gb", "nan"]), "--host-gb nan")
    assert_cli_error(CliRunner().invoke(app, [*base, "--host-compute", "2"]), "--host-compute '2'")
    assert_cli_error(CliRunner().invoke(app, ["bench", "synthetic", "nope"]), "unknown preset 'nope'")
    assert_cli_error(CliRunner().invoke(app, [*base, "--layers", "99"]), "--layers")
    assert_cli_error(CliRunner().invoke(app, [*base, "--experts", "0"]), "--experts")


def test_host_compute_sweep_and_decode_profile_scripts(capsys: pytest.CaptureFixture[str]) -> None:
    """scripts/host_compute_sweep.py: one row per routing and share, the host's share as asked, over
    copies or direct reads;
    scripts/profile_decode.py: a profile of the experts stage."""
    import importlib.util
    import json

    def script(name: str) -> object:
        spec = importlib.util.spec_from_file_location(name, Path(__file__).parents[1] / "scripts" / f"{name}.py")
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module

    small = ["tiny", "--device", DEVICE, "--gpu-cache-gb", "0.002", "--host-gb", "0.01"]
    sweep = script("host_compute_sweep")
    args = [*small, "--tokens", "2", "--warm-tokens", "2", "--prompt-tokens", "2", "--rounds", "1"]
    assert sweep.main([*args, "--routing", "uniform", "--shares", "off", "1", "--json"]) == 0  # type: ignore[attr-defined]
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [(r["routing"], r["share"]) for r in rows] == [("uniform", "off"), ("uniform", "1")]
    assert rows[0]["share_used"] == 0.0 and rows[1]["share_used"] == 1.0  # every miss on the host
    assert rows[1]["link_mb"] == 0.0 < rows[0]["link_mb"]
    # experts read in place from host memory (no host share: the hand-over needs Triton on a GPU)
    assert sweep.main([*args, "--host-reads", "direct", "--shares", "off", "--json"]) == 0  # type: ignore[attr-defined]
    doc = json.loads(capsys.readouterr().out)
    assert doc["host_reads"] == "direct" and doc["rows"][0]["link_mb"] > 0 and doc["rows"][0]["device_hits"] < 1
    profile = script("profile_decode")
    assert profile.main([*small, "--routing", "zipf:1.2", "--tokens", "2", "--top", "5"]) == 0  # type: ignore[attr-defined]
    out = capsys.readouterr().out
    assert "ms a token under the profiler" in out and out.count("Ordered by") == 2  # by own time, and cumulative


@pytest.mark.parametrize("cache", ["all", "cycling"])
def test_runner_decodes_from_graphs_like_eager(packed: Path, cache: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`--cuda-graph` in run/chat/serve: the runner's one-token passes replay graphs captured for the
    state they run on. Greedy generation gives the eager tokens and logits over two turns of one
    session (an eager prefill between graphed decodes); the second turn outgrows the first capture's
    span and is captured again."""
    from fmoe.runtime.engine import runner as runner_module

    with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
        size, cfg = host.runner.store.layout.file_size, host.config
    budget = 1 << 40 if cache == "all" else (cfg.num_experts + 2) * size
    prompts = ["def add(a, b):", "    return"]

    def run(engine: fmoe.Engine) -> list[np.ndarray]:
        rows = []
        session = engine.new_session()
        for p in prompts:  # two turns on one session: an eager prefill between graphed decodes
            for n, tok in enumerate(generate_greedy(engine, session, p)):
                rows.append(tok)
                if n == 5:
                    break
        return rows

    with _load(packed, "torch", device_cache_bytes=budget) as eager:
        want = run(eager)
    monkeypatch.setattr(runner_module, "GRAPH_SPAN", 8)  # the second turn outgrows the first capture
    with _load(packed, "torch", device_cache_bytes=budget) as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        captures = counted_captures(monkeypatch)
        got = run(engine)
    assert len(got) == len(want)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0]  # the same greedy token
        assert np.abs(g[1] - w[1]).max() <= 1e-5 * np.abs(w[1]).max()
    assert len(captures) >= 2  # the span ran out in the second turn: captured again, larger


def test_a_graphed_greedy_step_reads_back_its_pick_alone(packed: Path) -> None:
    """Greedy decode without a sampler (`fmoe run`'s default): each token is the captured graph's own
    pick (the argmax and a finiteness flag made in the graph; the logits stay on the device), the
    host-argmax tokens of eager decode; logits that turn NaN in a replay are refused."""
    from fmoe.errors import FmoeError
    from fmoe.runtime.engine.generate import generate_step

    prompt = "def add(a, b):"
    with _load(packed, "torch") as eager:
        gen = generate_greedy(eager, eager.new_session(), prompt)
        want = [next(gen)[0] for _ in range(5)]
    with _load(packed, "torch", device_cache_bytes=1 << 40) as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        ids = engine.tokenizer.encode(prompt)
        gen = generate_step(engine.runner, engine.new_session(), ids, None)
        got = [next(gen) for _ in range(5)]
        assert [g.token for g in got] == want
        assert all(g.logits is None and g.step.logits is None for g in got)
        assert [g.step.replayed for g in got] == [False, True, True, True, True]  # decode replayed its graph
        engine.runner.network.weights.norm.fill_(float("nan"))  # in place: what the captured graph reads
        with pytest.raises(FmoeError, match="non-finite logits"):
            for _ in range(2):  # (the step queued before the weights turned is read first)
                next(gen)


@pytest.mark.parametrize(("temperature", "top_k", "top_p"), [(0.8, 20, 0.9), (1.0, 0, 1.0)])
def test_a_sampled_step_draws_where_the_logits_are(
    packed: Path, temperature: float, top_k: int, top_p: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sampler's draws made on the device (`fmoe run --temperature`, graphed decode, each step
    queued on the draw of the step before) are the tokens the host sampler draws from eager decode's
    logits, for the same seed."""
    from fmoe.runtime.engine.generate import generate_step
    from fmoe.runtime.engine.runner import Runner
    from fmoe.runtime.text.sampling import Sampler, SamplingParams

    following = []
    launch = Runner.launch

    def counted(self: Runner, state: Any, token: int | None, *args: Any) -> Any:
        out = launch(self, state, token, *args)
        following.append(token is None and out is not None)
        return out

    monkeypatch.setattr(Runner, "launch", counted)

    params = SamplingParams(temperature, top_k, top_p, seed=5)
    ids = None

    def tokens(engine: fmoe.Engine, sample: Any) -> list[Any]:
        gen = generate_step(engine.runner, engine.new_session(), ids, sample)
        return [next(gen) for _ in range(8)]

    with _load(packed, "torch") as eager:
        ids = eager.tokenizer.encode("def add(a, b):")
        want = [g.token for g in tokens(eager, Sampler(params).__call__)]
    with _load(packed, GRAPHED_KERNELS, device_cache_bytes=1 << 40) as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        got = tokens(engine, Sampler(params))
    assert [g.token for g in got] == want
    assert all(g.logits is None for g in got) and all(g.step.replayed for g in got[1:])
    assert any(following)  # steps queued on the device's draw


def test_queued_draws_replay_each_sampler_s_own_capture(packed: Path) -> None:
    """A sampled step queued ahead draws from a capture of its sampler's settings (each captured once,
    the last few kept), reading the step's uniform number from the device: every token is the draw
    the backend's ops make from the same logits and number, whichever settings come in turn."""
    from fmoe.runtime.backends.torch_backend import sample_pick_tensors
    from fmoe.runtime.engine.cuda_graph import KEPT_DRAWS, CudaGraphDecoder, cuda_capture
    from fmoe.runtime.text.sampling import Pick, SamplingParams

    captured: list[Any] = []

    def capture(fn: Any, like: Any) -> Any:
        captured.append(fn)
        return (cuda_capture() if DEVICE == "cuda" else replaying_capture)(fn, like)

    settings = [SamplingParams(t, k, p) for t, k, p in [(0.8, 20, 0.9), (1.0, 0, 1.0), (0.5, 0, 0.7)]]
    settings += [SamplingParams(1.2, 3, 1.0), SamplingParams(0.9, 0, 0.95)]
    rng = np.random.default_rng(11)
    with _load(packed, GRAPHED_KERNELS, device_cache_bytes=1 << 40) as engine:
        runner = engine.runner
        state = runner.new_state()
        runner.network.forward(np.array([1, 2, 3], dtype=np.int64), state, last_only=True)
        decoder = CudaGraphDecoder(runner.network, state, state.position + 16, capture=capture)
        graphs = len(captured)
        token: int | None = 4
        order = [0, 1, 0, 2, 3, 4, 0, 1]  # the first settings again, after more than KEPT_DRAWS others
        for i in order:
            pick = Pick(settings[i], float(rng.random()))
            slot = decoder.launch(token, pick)
            p = settings[i]
            want = sample_pick_tensors(decoder._outputs[-1][0], p.temperature, p.top_k, p.top_p, pick.u)
            assert decoder.collect(slot) == (int(want[0]), True)
            token = None
            assert len(decoder._draws) <= KEPT_DRAWS
        # each settings captured once, but the second again: the least recently used when the fifth came
        assert len(captured) - graphs == len(settings) + 1


def test_greedy_steps_queued_ahead_keep_the_conversation(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Greedy graphed decode queues each step on the device's copy of the token before reading it
    (`Runner.launch`): over three turns of one session (max_tokens, a stop token, max_tokens again) the
    tokens and the conversation are eager decode's, the state holds exactly the tokens fed, nothing
    is fed past max_tokens, and a stop token is fed already (not pending)."""
    from fmoe.runtime.engine.runner import Runner

    turns = [[5, 6, 7, 8], [9, 10], [11]]

    def run(engine: fmoe.Engine, stop: set[int]) -> tuple[list[list[int]], list[int], list[bool]]:
        session, out, fed = engine.new_session(), [], []
        for n, ids in enumerate(turns):
            r = engine.generate(ids, max_tokens=5, session=session, stop_ids=stop if n == 1 else ())
            out.append(r.token_ids)
            assert session.state.position == len(session.token_ids)  # the state holds what was fed
            fed.append(not session.pending)
        return out, session.conversation, fed

    with _load(packed, "torch") as eager:
        want, conversation, fed = run(eager, set())
        stop = {want[1][2]}  # the second turn stops at its third token
        want, conversation, fed = run(eager, stop)
    assert fed == [False, False, False]  # eager: the last token of each turn pending
    launched = []
    launch = Runner.launch

    def counted(self: Runner, state: Any, token: int | None, *args: Any) -> Any:
        out = launch(self, state, token, *args)
        launched.append((token, out is not None))
        return out

    monkeypatch.setattr(Runner, "launch", counted)
    with _load(packed, GRAPHED_KERNELS, device_cache_bytes=1 << 40) as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        got, got_conversation, got_fed = run(engine, stop)
    assert got == want and got_conversation == conversation
    assert got_fed == [False, True, False]  # the stop token queued ahead; max_tokens: nothing fed past it
    assert any(token is None and ok for token, ok in launched)  # steps queued on the device's pick


def counted_captures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The CudaGraphDecoders captured from now on, one entry a capture."""
    from fmoe.runtime.engine import cuda_graph

    captures: list[Any] = []

    class Counted(cuda_graph.CudaGraphDecoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            captures.append(self)

    monkeypatch.setattr(cuda_graph, "CudaGraphDecoder", Counted)
    return captures


def test_bench_times_the_runs_own_graphed_loop(packed: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`fmoe bench --cuda-graph` times `fmoe run`'s loop (the runner's captured decodes, logits to the
    host): each sequence's capturing step is left out, every timed pass replays. With routing
    replaced on the host, the decode is still one graph (the routing an input of each step), and the
    graphs captured over that routing are dropped after."""
    from fmoe.runtime.bench import bench_model
    from fmoe.runtime.routing_trace import routing_source

    with _load(packed, GRAPHED_KERNELS, device_cache_bytes=1 << 40) as engine:  # every expert on the device
        runner = engine.runner
        runner.cuda_graph = True
        runner._capture = None if DEVICE == "cuda" else replaying_capture
        captures = counted_captures(monkeypatch)
        result = bench_model(engine, prompt_tokens=3, tokens=4, warm_tokens=2)
        assert result.cuda_graph and result.decode.seconds > 0
        assert (result.decode.tokens, result.decode.passes, result.decode.replayed) == (4, 4, 4)
        assert len(captures) == 2  # the warm-up's sequence and the timed one's, at their first decode step
        assert all(d.cuts == [] and d.routed for d in captures)  # one graph, routing made in it
        cfg = engine.config
        source = routing_source("uniform", cfg.num_hidden_layers, cfg.num_experts, engine.k)
        replayed = bench_model(engine, prompt_tokens=3, tokens=4, warm_tokens=2, routing=source)
        assert replayed.decode.replayed == 4 and len(captures) == 4
        assert all(d.cuts == [] and d.routed and d._routing is not None for d in captures[2:])
        assert not runner._graphed  # dropped when the routing was given back


@pytest.mark.parametrize("kept", [4, 1])
def test_interleaved_sequences_replay_their_own_graphs(
    packed: Path, kept: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two sessions decoding in turn, one pass each (as a server's requests interleave): each replays
    the decode captured for its own state, captured once, and gives its eager tokens and logits. With
    one kept (``GRAPHED_STATES = 1``) every switch captures again."""
    from fmoe.runtime.engine import runner as runner_module

    prompts = ["def add(a, b):", "class Stack:"]

    def interleaved(engine: fmoe.Engine) -> list[tuple[int, np.ndarray]]:
        gens = [generate_greedy(engine, engine.new_session(), p) for p in prompts]
        return [next(g) for _ in range(4) for g in gens]

    with _load(packed, "torch") as eager:
        want = interleaved(eager)
    monkeypatch.setattr(runner_module, "GRAPHED_STATES", kept)
    with _load(packed, "torch") as engine:
        engine.runner.cuda_graph = True
        engine.runner._capture = None if DEVICE == "cuda" else replaying_capture
        captures = counted_captures(monkeypatch)
        got = interleaved(engine)
    for g, w in zip(got, want, strict=True):
        assert g[0] == w[0]
        assert np.abs(g[1] - w[1]).max() <= 1e-5 * np.abs(w[1]).max()
    # decode passes: three a session (the first token comes from the prefill)
    assert len(captures) == (2 if kept > 1 else 6)


def test_a_kept_decode_does_not_keep_its_sequence_alive(packed: Path) -> None:
    """The runner keeps captured decodes by state, weakly: a finished sequence's state (its KV room on
    the GPU) is freed, and its decode dropped at the next capture. (A capture that holds nothing, as a
    CUDA graph holds no Python objects; the tests' replaying capture keeps its segments' closures.)"""
    import gc
    import weakref

    from fmoe.errors import FmoeError

    def inert(fn, like):  # type: ignore[no-untyped-def]
        return (lambda: None), fn()

    with _load(packed, "torch") as engine:
        runner = engine.runner
        runner._capture = inert
        first, second = runner.new_state(), runner.new_state()
        for st in (first, second):
            runner.network.forward(np.array([1, 2], dtype=np.int64), st, last_only=True)
        orphan = runner._decoder(first)
        gone = weakref.ref(first)
        del first
        gc.collect()
        assert gone() is None  # not held by its kept decode
        with pytest.raises(FmoeError, match="the sequence this decode was captured for is gone"):
            orphan.step(1)
        runner._decoder(second)
        assert len(runner._graphed) == 1  # the dead state's decode dropped


def test_a_capture_out_of_memory_drops_the_kept_decodes_and_tries_again(
    packed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Other sequences' kept decodes give their memory when a capture runs out of it; with none kept,
    the error stands."""
    import torch

    from fmoe.runtime.engine import cuda_graph

    real, failures = cuda_graph.CudaGraphDecoder, []

    class Short(real):  # type: ignore[misc, valid-type]
        def __init__(self, *args: object, **kwargs: object) -> None:
            if failures:
                failures.pop()
                raise torch.cuda.OutOfMemoryError("CUDA out of memory (a test)")
            super().__init__(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(cuda_graph, "CudaGraphDecoder", Short)
    with _load(packed, "torch") as engine:
        runner = engine.runner
        runner._capture = lambda fn, like: ((lambda: None), fn())
        states = [runner.new_state() for _ in range(3)]
        for st in states:
            runner.network.forward(np.array([1, 2], dtype=np.int64), st, last_only=True)
        runner._decoder(states[0])
        runner._decoder(states[1])
        failures.append(1)
        runner._decoder(states[2])  # out of memory once: the two kept go, the capture tries again
        assert list(runner._graphed) == [id(states[2])]
        runner._graphed.clear()
        failures.append(1)
        with pytest.raises(torch.cuda.OutOfMemoryError):
            runner._decoder(states[0])  # nothing kept to give


def test_a_captured_decode_covers_the_span_within_the_context_limit(packed: Path) -> None:
    """The KV room a decode is captured with (what `fmoe bench --cuda-graph` also uses, so that its
    attention costs what it costs in `fmoe run`): GRAPH_SPAN past the position, never past the limit."""
    from fmoe.runtime.engine import runner as runner_module

    with _load(packed, "torch") as engine:
        runner = engine.runner
        state = runner.new_state()
        assert runner.graph_capacity(state) == min(runner.max_context, runner_module.GRAPH_SPAN)
        state.position = runner.max_context - 3
        assert runner.graph_capacity(state) == runner.max_context


def generate_greedy(engine: fmoe.Engine, session: object, prompt: str):  # type: ignore[no-untyped-def]
    from fmoe.runtime.engine.generate import generate_step

    ids = engine.tokenizer.encode(prompt)
    for gen in generate_step(engine.runner, session, ids, lambda row: int(np.argmax(row))):  # type: ignore[arg-type]
        yield gen.token, gen.logits


def test_cuda_graph_and_host_compute_refuse_what_they_cannot_use(packed: Path) -> None:
    from fmoe.errors import FmoeError

    with pytest.raises(FmoeError, match="--cuda-graph: needs the torch backend on a CUDA device"):
        fmoe.load(packed, backend="cpu", cuda_graph=True)
    for options, why in (
        ({"backend": "cpu"}, "needs a device expert cache"),
        ({"backend": "torch", "device": DEVICE, "device_cache_bytes": 1}, "hold no whole layer"),
        ({"backend": "torch", "device": DEVICE, "device_cache_bytes": 1 << 40}, "every expert fits the device"),
    ):
        with pytest.raises(FmoeError, match=why):
            fmoe.load(packed, host_compute="auto", **options)


@pytest.mark.skipif("triton" not in _kernels(), reason="the Triton kernels need a GPU or Triton's interpreter")
def test_a_prefill_sizes_the_grouped_tiles_by_its_layer_s_experts(
    packed: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The device slab holds every layer's experts, but a prefill's pairs go to one layer's: the
    backend tells the grouped GEMM that layer's expert count, so its tiles fit the pairs each expert
    can expect (counting the slab's rows made them all 16 pairs: the sixteenth pass)."""
    from fmoe.runtime.backends import torch_backend
    from fmoe.runtime.kernels import triton_moe as tm

    monkeypatch.setattr(torch_backend, "_DEVICE_MATVEC_PAIRS", 1)  # a short prompt takes the GEMMs too
    seen: list[tuple[int, int | None]] = []
    grouped = tm.experts_grouped

    def spy(slab: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        seen.append((slab.shape[0], kwargs.get("experts")))
        return grouped(slab, *args, **kwargs)

    monkeypatch.setattr(tm, "experts_grouped", spy)
    with _load(packed, "triton", device_cache_bytes=1 << 40) as dev:
        cfg = dev.config
        with fmoe.load(packed, backend="torch", device=DEVICE, device_cache_bytes=0) as host:
            ids = host.tokenizer.encode("def add(a, b):")
            want = host.logits(ids)
        np.testing.assert_allclose(dev.logits(ids), want, rtol=1e-4, atol=1e-4)
    assert len(seen) == cfg.num_hidden_layers
    assert all(rows > cfg.num_experts and experts == cfg.num_experts for rows, experts in seen)
