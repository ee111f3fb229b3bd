"""Kernel benchmark of the MLX backend (``fmoe bench kernels --backend mlx``): each fused op as MLX
ops and, where MLX has a Metal GPU, as the Metal kernel of shaders/, side by side in one run, plus
the routed expert through ``mx.gather_qmm`` as the MoE op runs it.

Shapes come from a preset (default: the 397B's, whose routed expert is 4096 -> 1024 -> 4096).
Each call is evaluated (``mx.eval``) inside the timed region; medians of N calls after one warm-up
call (which also compiles a Metal kernel). GB/s counts the packed bytes a call reads.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from fmoe.config import TextConfig
from fmoe.formats.quant import quantize
from fmoe.presets import load_preset
from fmoe.runtime.backends.mlx_backend import quant
from fmoe.runtime.backends.mlx_kernels import MetalKernels, MlxKernels, MlxQuant, metal_available

DEFAULT_PRESET = "qwen3.5-397b-a17b"


@dataclass
class MlxBenchRow:
    kernel: str
    shape: str
    bits: str  # "4", "2", "8" or "fp32"
    tokens: int
    mlx_ms: float  # median, MLX ops
    metal_ms: float | None  # median, the Metal kernel (None off Metal)
    bytes_per_call: int | None  # packed weight bytes read per call

    def gbps(self, ms: float | None) -> float | None:
        if ms is None or self.bytes_per_call is None:
            return None
        return self.bytes_per_call / (ms * 1e-3) / 1e9

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "mlx_gbps": self.gbps(self.mlx_ms), "metal_gbps": self.gbps(self.metal_ms)}


def time_eval(fn: Callable[[], Any], repeat: int) -> float:
    """Median milliseconds of ``repeat`` evaluated calls after one untimed warm-up call."""
    mx.eval(fn())
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return float(np.median(times)) * 1e3


def _quant(rng: np.random.Generator, out: int, inp: int, bits: int) -> tuple[MlxQuant, int]:
    qt = quantize(rng.standard_normal((out, inp), dtype=np.float32), bits)
    return quant(qt.weight, qt.scales, qt.biases, bits, qt.group_size), int(qt.nbytes)


def run_mlx_kernel_bench(repeat: int = 20, *, preset: str = DEFAULT_PRESET, seed: int = 0) -> dict[str, Any]:
    """Every case at ``preset``'s geometry; returns ``{"machine", "device", "preset", "repeat", "rows"}``."""
    cfg = TextConfig.from_dict(load_preset(preset), where=f"preset {preset}")
    hidden, inter, k = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts_per_tok
    ops: MlxKernels = MlxKernels()
    metal: MlxKernels | None = MetalKernels() if metal_available() else None
    rng = np.random.default_rng(seed)
    rows: list[MlxBenchRow] = []

    def case(name: str, shape: str, bits: str, tokens: int, call: Callable[[MlxKernels], Any], nbytes: int | None):
        mlx_ms = time_eval(lambda: call(ops), repeat)
        metal_ms = None if metal is None else time_eval(lambda: call(metal), repeat)
        rows.append(MlxBenchRow(name, shape, bits, tokens, mlx_ms, metal_ms, nbytes))

    def vec(*shape: int) -> mx.array:
        return mx.array(rng.standard_normal(shape, dtype=np.float32))

    for bits in (4, 2):
        for out, inp in ((inter, hidden), (hidden, inter)):
            w, nbytes = _quant(rng, out, inp, bits)
            x = vec(1, inp)
            case("qmatvec", f"{out}x{inp}", str(bits), 1, _qmatvec(x, w), nbytes)
    g, u = vec(k, inter), vec(k, inter)
    case("swiglu", f"{k}x{inter}", "fp32", 1, lambda kern: kern.swiglu(g, u), None)
    x, y, w_norm = vec(1, hidden), vec(1, hidden), vec(hidden)
    case("rms_norm", str(hidden), "fp32", 1, lambda kern: kern.rms_norm(x, w_norm, 1e-6), None)
    case("add_rms_norm", str(hidden), "fp32", 1, lambda kern: kern.add_rms_norm(x, y, w_norm, 1e-6), None)
    heads, d, half = cfg.num_attention_heads, cfg.head_dim, cfg.rotary_dim // 2
    xq, cos, sin = vec(1, heads, d), vec(1, half), vec(1, half)
    case("rope", f"{heads}x{d}", "fp32", 1, lambda kern: kern.rope(xq, cos, sin), None)
    hv, hk = cfg.linear_num_value_heads, cfg.linear_num_key_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    for t in (1, 16):
        q, kk, v = vec(t, hk, dk) * 0.1, vec(t, hk, dk) * 0.1, vec(t, hv, dv)
        gd, beta, state = -mx.abs(vec(t, hv)), mx.sigmoid(vec(t, hv)), vec(hv, dk, dv)
        case("gated_delta", f"{hv}/{hk}x{dk}", "fp32", t, _delta(q, kk, v, gd, beta, state), None)
    yk, wk, shared = vec(1, k, hidden), mx.softmax(vec(1, k), axis=-1), vec(1, hidden)
    case("moe_combine", f"{k}x{hidden}", "fp32", 1, lambda kern: kern.moe_combine(yk, wk, shared), None)
    for bits in (4, 2):  # the routed experts as the MoE op runs them: K experts, one token
        tables = [_quant_stack(rng, k, o, i, bits) for o, i in ((inter, hidden), (inter, hidden), (hidden, inter))]
        nbytes = sum(n for _, n in tables)
        xs = vec(k, 1, hidden)
        case("experts (gather_qmm)", f"{k}x {hidden}/{inter}", str(bits), 1, _experts(xs, tables), nbytes)
    return {
        "machine": f"{platform.machine()} {platform.system()}",
        "device": "metal" if metal is not None else str(mx.default_device()),
        "preset": preset,
        "repeat": repeat,
        "rows": [r.to_dict() for r in rows],
    }


def _qmatvec(x: mx.array, w: MlxQuant) -> Callable[[MlxKernels], mx.array]:
    return lambda kern: kern.qmatmul(x, w)


def _delta(*args: mx.array) -> Callable[[MlxKernels], tuple[mx.array, mx.array]]:
    q, k, v, g, beta, state = args
    return lambda kern: kern.gated_delta(q, k, v, g, beta, state)


def _experts(x: mx.array, tables: list[tuple[MlxQuant, int]]) -> Callable[[MlxKernels], mx.array]:
    """The MoE op's expert step: every row of ``x [n, 1, hidden]`` through its own expert of the stacks."""
    (gate, _), (up, _), (down, _) = tables
    idx = mx.arange(x.shape[0], dtype=mx.uint32)

    def qmm(h: mx.array, w: MlxQuant) -> mx.array:
        return mx.gather_qmm(
            h, w.weight, scales=w.scales, biases=w.biases, rhs_indices=idx, group_size=w.group_size, bits=w.bits
        )

    return lambda kern: qmm(kern.swiglu(qmm(x, gate), qmm(x, up)), down)


def _quant_stack(rng: np.random.Generator, n: int, out: int, inp: int, bits: int) -> tuple[MlxQuant, int]:
    qt = quantize(rng.standard_normal((n, out, inp), dtype=np.float32), bits)
    return quant(qt.weight, qt.scales, qt.biases, bits, qt.group_size), int(qt.nbytes)


def render_mlx_table(result: dict[str, Any]) -> Any:  # -> rich.table.Table
    """The benchmark as a Rich table (MLX ops and Metal kernels side by side)."""
    from rich.table import Table

    def num(v: float | None, fmt: str) -> str:
        return "—" if v is None else format(v, fmt)

    table = Table(
        title=f"MLX backend kernels at {result['preset']} shapes on {result['device']}, median of {result['repeat']}",
        caption="MLX: MLX ops; Metal: the shaders/ kernel (— where MLX has no Metal GPU); GB/s: packed bytes per call",
    )
    table.add_column("kernel")
    table.add_column("shape")
    for col in ("bits", "T", "MLX ms", "Metal ms", "MLX GB/s", "Metal GB/s"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        table.add_row(
            r["kernel"],
            r["shape"],
            r["bits"],
            str(r["tokens"]),
            f"{r['mlx_ms']:.3f}",
            num(r["metal_ms"], ".3f"),
            num(r["mlx_gbps"], ".2f"),
            num(r["metal_gbps"], ".2f"),
        )
    return table
