"""Kernel benchmark: the numpy reference and the numba kernels timed side by side in one run.

Used by ``fmoe bench kernels``. Timings are medians of N calls after one warm-up call
(``time.perf_counter``); the minimum is kept too, because on a shared machine the median carries
other processes' load. GB/s counts every packed byte a call reads: codes plus bf16 scales/biases.
4-bit rows, and the 2-bit routed experts (one token's row dots), also time the integer-dot kernels
(``int8=True``, ``--int8-dot``) where the CPU has them.
"""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from fmoe.config import TextConfig
from fmoe.formats.quant import QuantTensor, quantize
from fmoe.presets import load_preset
from fmoe.runtime.kernels.membw import read_bandwidth

DEFAULT_PRESET = "qwen3.5-397b-a17b"  # its routed expert is 4096 -> 1024 -> 4096: the shapes


@dataclass
class BenchRow:
    kernel: str  # "qmatmul", "swiglu_expert", "experts_swiglu" or "gated_delta_rule"
    shape: str  # qmatmul "out x in"; expert "hidden/intermediate"; delta rule "Hv/Hk x D"
    bits: str  # "4", "2", "8" or "fp32"
    tokens: int
    numpy_ms: float  # median
    numba_ms: float  # median
    numba_min_ms: float
    bytes_per_call: int | None  # packed weight bytes read per call (None for the delta rule)
    int8_ms: float | None = None  # median of the integer-dot kernels (4 bits, where the CPU has them)

    @property
    def speedup(self) -> float:
        return self.numpy_ms / self.numba_ms

    def gbps(self, ms: float) -> float | None:
        return None if self.bytes_per_call is None else self.bytes_per_call / (ms * 1e-3) / 1e9

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(
            speedup=self.speedup,
            numpy_gbps=self.gbps(self.numpy_ms),
            numba_gbps=self.gbps(self.numba_ms),
            int8_gbps=None if self.int8_ms is None else self.gbps(self.int8_ms),
            numba_ms_per_token=self.numba_ms / self.tokens,
        )
        return d


def time_call(fn: Callable[[], object], repeat: int) -> tuple[float, float]:
    """(median, min) seconds of ``repeat`` calls after one untimed warm-up call."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times)), float(np.min(times))


def bench_qmatmul(n_out: int, n_in: int, bits: int, tokens: int, repeat: int, rng: np.random.Generator) -> BenchRow:
    from fmoe.runtime.kernels import cpu, reference

    qt: QuantTensor = quantize(rng.standard_normal((n_out, n_in), dtype=np.float32), bits)
    x = rng.standard_normal((tokens, n_in), dtype=np.float32)
    if tokens == 1:
        x = x[0]
    ref, _ = time_call(lambda: reference.qmatmul(x, qt), repeat)
    fast, fast_min = time_call(lambda: cpu.qmatmul(x, qt), repeat)
    row = BenchRow("qmatmul", f"{n_out}x{n_in}", str(bits), tokens, ref * 1e3, fast * 1e3, fast_min * 1e3, qt.nbytes)
    row.int8_ms = _int8_ms(lambda: cpu.qmatmul(x, qt, int8=True), qt, repeat)
    return row


def _int8_ms(fn: Callable[[], object], qt: QuantTensor, repeat: int) -> float | None:
    """Median ms of the integer-dot form of a call, where it applies (4 bits in 64-column groups, a CPU
    with the instructions: cpu._int8_ok)."""
    from fmoe.runtime.kernels import cpu

    return time_call(fn, repeat)[0] * 1e3 if cpu._int8_ok(True, qt.bits, qt.group_size) else None


def bench_expert(hidden: int, inter: int, bits: int, tokens: int, repeat: int, rng: np.random.Generator) -> BenchRow:
    """One routed SwiGLU expert: numpy (three dequantise-and-matmul calls) vs the fused numba expert."""
    from fmoe.runtime.kernels import cpu, reference

    gate, up = (quantize(rng.standard_normal((inter, hidden), dtype=np.float32), bits) for _ in range(2))
    down = quantize(rng.standard_normal((hidden, inter), dtype=np.float32), bits)
    x = rng.standard_normal((tokens, hidden), dtype=np.float32)
    if tokens == 1:
        x = x[0]

    ref, _ = time_call(lambda: reference.swiglu_expert(x, gate, up, down), repeat)
    fast, fast_min = time_call(lambda: cpu.swiglu_expert(x, gate, up, down), repeat)
    nbytes = gate.nbytes + up.nbytes + down.nbytes
    row = BenchRow(
        "swiglu_expert", f"{hidden}/{inter}", str(bits), tokens, ref * 1e3, fast * 1e3, fast_min * 1e3, nbytes
    )
    row.int8_ms = _int8_ms(lambda: cpu.swiglu_expert(x, gate, up, down, int8=True), gate, repeat)
    return row


def bench_routed_experts(cfg: TextConfig, bits: int, repeat: int, rng: np.random.Generator) -> BenchRow:
    """A decode token's routed experts as the CPU backend runs them: ``num_experts_per_tok`` experts
    read from a slab of expert files (``experts_swiglu``), against the reference decoding each file."""
    from fmoe.formats.packed import ExpertLayout
    from fmoe.runtime.experts.slots import HostSlab
    from fmoe.runtime.kernels import cpu, reference

    k, hidden, inter = cfg.num_experts_per_tok, cfg.hidden_size, cfg.moe_intermediate_size
    layout = ExpertLayout.for_config(cfg, bits)
    slab = HostSlab(layout, k)
    shapes = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for slot in range(k):
        w = {name: quantize(rng.standard_normal(shape, dtype=np.float32), bits) for name, shape in shapes.items()}
        slab.data[slot] = np.frombuffer(layout.encode(w), np.uint8)
    slots = np.arange(k)
    x = rng.standard_normal((1, hidden), dtype=np.float32)
    tokens = np.zeros(k, np.int64)
    # the reference decodes every file in numpy (about a second a call at 397B's shapes): a few calls
    xs = np.repeat(x, k, axis=0)
    ref, _ = time_call(lambda: reference.experts_swiglu(slab.data, layout, slots, xs), min(repeat, 3))
    fast, fast_min = time_call(lambda: cpu.experts_swiglu(slab.data, layout, slots, x, tokens=tokens), repeat)
    shape = f"{k}x{hidden}/{inter}"
    row = BenchRow("experts_swiglu", shape, str(bits), 1, ref * 1e3, fast * 1e3, fast_min * 1e3, k * layout.file_size)
    if cpu._int8_ok(True, bits, layout.group_size, rows_only=True):  # (2-bit: a token's row dots)
        int8_ms, _ = time_call(lambda: cpu.experts_swiglu(slab.data, layout, slots, x, True, tokens), repeat)
        row.int8_ms = int8_ms * 1e3
    return row


def bench_delta_rule(
    hv: int, hk: int, dk: int, dv: int, tokens: int, repeat: int, rng: np.random.Generator
) -> BenchRow:
    from fmoe.runtime.kernels import cpu, reference

    def unit(shape: tuple[int, ...]) -> np.ndarray:
        a = rng.standard_normal(shape, dtype=np.float32)
        return a / np.linalg.norm(a, axis=-1, keepdims=True)

    q = unit((tokens, hk, dk)) * np.float32(dk**-0.5)
    k = unit((tokens, hk, dk))
    v = rng.standard_normal((tokens, hv, dv), dtype=np.float32)
    g = -rng.random((tokens, hv), dtype=np.float32)
    beta = rng.random((tokens, hv), dtype=np.float32)
    s_ref = np.zeros((hv, dk, dv), np.float32)
    s_fast = np.zeros((hv, dk, dv), np.float32)
    ref, _ = time_call(lambda: reference.gated_delta_rule(q, k, v, g, beta, s_ref), repeat)
    fast, fast_min = time_call(lambda: cpu.gated_delta_rule(q, k, v, g, beta, s_fast), repeat)
    shape = f"{hv}/{hk}x{dk}" if dk == dv else f"{hv}/{hk}x{dk}x{dv}"  # value heads / key heads x head dims
    return BenchRow("gated_delta_rule", shape, "fp32", tokens, ref * 1e3, fast * 1e3, fast_min * 1e3, None)


def run_kernel_bench(
    repeat: int = 20, *, preset: str = DEFAULT_PRESET, threads: int | None = None, seed: int = 0
) -> dict:
    """Time every case at the geometry of ``preset`` (its routed expert's matrices and its DeltaNet
    heads); returns ``{"machine", "preset", "threads", "threading_layer", "int8_isa", "repeat",
    "memory_read_gb_per_s", "rows": [...]}``."""
    import numba

    from fmoe.runtime.kernels import cpu, int8dot

    cfg = TextConfig.from_dict(load_preset(preset), where=f"preset {preset}")
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    shapes = ((hidden, inter), (inter, hidden))  # (out, in): the expert's down, then gate/up
    delta = (cfg.linear_num_value_heads, cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    previous = numba.get_num_threads()
    numba.set_num_threads(threads or previous)
    try:
        used = numba.get_num_threads()
        cpu.warmup()
        rng = np.random.default_rng(seed)
        rows = [bench_qmatmul(o, i, bits, 1, repeat, rng) for bits in (4, 2, 8) for o, i in shapes]
        rows += [bench_qmatmul(o, i, 4, t, repeat, rng) for t in (16, 128) for o, i in shapes]
        rows += [bench_expert(hidden, inter, bits, 1, repeat, rng) for bits in (4, 2)]
        rows += [bench_routed_experts(cfg, bits, repeat, rng) for bits in (4, 2)]
        rows += [bench_delta_rule(*delta, t, repeat, rng) for t in (1, 16)]
        memory = read_bandwidth()
    finally:
        numba.set_num_threads(previous)  # the setting is process-wide for this thread: leave it as found
    return {
        "machine": f"{platform.machine()} {platform.processor() or platform.system()}, {os.cpu_count()} CPUs",
        "preset": preset,
        "threads": used,
        "threading_layer": numba.threading_layer(),
        "int8_isa": int8dot.ISA,
        "repeat": repeat,
        "memory_read_gb_per_s": memory,
        "rows": [r.to_dict() for r in rows],
    }


def render_table(result: dict):  # -> rich.table.Table
    """The benchmark as a Rich table (one row per case, numpy and numba side by side)."""
    from rich.table import Table

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    table = Table(
        title=f"CPU kernels at {result['preset']} shapes: numpy vs numba, {result['threads']} threads, "
        f"median of {result['repeat']}",
        caption="GB/s: packed bytes per call (codes + bf16 scales/biases); min: fastest numba call; "
        f"int8: the integer-dot kernels of --int8-dot ({result['int8_isa'] or 'not on this CPU'}); "
        f"memory read bandwidth measured in this run: {result['memory_read_gb_per_s']:.1f} GB/s "
        "(single matrices fit the caches and may exceed it)",
    )
    table.add_column("kernel")
    table.add_column("shape")
    numbers = ("bits", "T", "numpy ms", "numba ms", "min ms", "speedup", "numpy GB/s", "numba GB/s")
    for col in (*numbers, "int8 ms", "int8 GB/s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            {"gated_delta_rule": "delta rule", "swiglu_expert": "expert", "experts_swiglu": "routed experts"}.get(
                r["kernel"], r["kernel"]
            ),
            r["shape"],
            r["bits"],
            str(r["tokens"]),
            f"{r['numpy_ms']:.3f}",
            f"{r['numba_ms']:.3f}",
            f"{r['numba_min_ms']:.3f}",
            f"{r['speedup']:.1f}x",
            num(r["numpy_gbps"], ".2f"),
            num(r["numba_gbps"], ".2f"),
            num(r["int8_ms"], ".3f"),
            num(r["int8_gbps"], ".2f"),
        )
    return table
