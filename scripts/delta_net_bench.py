"""Time one decode step of the DeltaNet (conv output to the output projection's input) at a preset's
head sizes, the backend's `delta_net` op beside what it replaced, alternating, and print a table.

    python scripts/delta_net_bench.py [PRESET] --device cpu --threads 16
    python scripts/delta_net_bench.py [PRESET] --device cuda

CPU: the three ops (`delta_rule_inputs`, `gated_delta_rule`, `gated_rms_norm`: numpy glue around the
numba recurrence) against `delta_net` (one numba pass), wall clock a call. CUDA: per call in a CUDA
graph of 50 calls, CUDA events: the three launches, the two (the inputs made in the recurrence), and
the one `--int8-dot` launch (recurrence, gated norm and the int8 hand-over) at 4, 8 and 16 warps.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import numpy as np

from fmoe.runtime.synthetic import synthetic_config

GRAPH_CALLS = 50


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--threads", type=int, default=2, help="numba threads (cpu)")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg = synthetic_config(args.preset, 1)
    heads = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads, cfg.linear_value_head_dim)
    cases = _cpu_cases(heads, args.threads) if args.device == "cpu" else _cuda_cases(heads)
    print(f"{args.preset}: DeltaNet heads (Hk, Dk, Hv, Dv) = {heads}, one token, {args.device}")
    print(f"{'case':48s}" + "".join(f"{f'round {r + 1}':>12s}" for r in range(args.rounds)))
    times: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(args.rounds):
        for name, timed in cases.items():
            times[name].append(timed())
    for name, ts in times.items():
        print(f"{name:48s}" + "".join(f"{t:10.2f}us" for t in ts))


def _inputs(heads: tuple[int, int, int, int]) -> dict[str, np.ndarray]:
    hk, dk, hv, dv = heads
    rng = np.random.default_rng(0)
    f32 = np.float32
    return {
        "qkv": rng.standard_normal((1, 2 * hk * dk + hv * dv)).astype(f32),
        "a": rng.standard_normal((1, hv)).astype(f32),
        "b": rng.standard_normal((1, hv)).astype(f32),
        "z": rng.standard_normal((1, hv * dv)).astype(f32),
        "A_log": rng.standard_normal(hv).astype(f32),
        "dt_bias": rng.standard_normal(hv).astype(f32),
        "norm": rng.uniform(0.5, 1.5, dv).astype(f32),
        "state": (rng.standard_normal((hv, dk, dv)) * 0.01).astype(f32),
    }


def _cpu_cases(heads: tuple[int, int, int, int], threads: int) -> dict[str, Callable[[], float]]:
    from fmoe.runtime.backends.cpu import CpuBackend

    be = CpuBackend(threads=threads)
    be.use_threads()
    x = _inputs(heads)

    def three() -> None:
        q, k, v, g, beta = be.delta_rule_inputs(x["qkv"], x["a"], x["b"], x["A_log"], x["dt_bias"], heads)
        o, _ = be.gated_delta_rule(q, k, v, g, beta, x["state"])
        be.gated_rms_norm(o, x["norm"], x["z"], 1e-6)

    def one() -> None:
        be.delta_net(x["qkv"], x["a"], x["b"], x["z"], x["A_log"], x["dt_bias"], x["norm"], 1e-6, heads, x["state"])

    return {
        f"three ops, {threads} threads": lambda: _wall(three),
        f"delta_net, {threads} threads": lambda: _wall(one),
    }


def _wall(fn: Callable[[], None], calls: int = 300) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def _cuda_cases(heads: tuple[int, int, int, int]) -> dict[str, Callable[[], float]]:
    import torch

    from fmoe.runtime.kernels import triton_moe as tm
    from fmoe.runtime.kernels import triton_ops as ops

    x = {k: torch.from_numpy(v).cuda() for k, v in _inputs(heads).items()}
    hv, dv = heads[2:]
    out = torch.empty((1, hv * dv), device="cuda")
    xp = tm._handover_buffer(out, 64, True)
    (_, gs, ng_p, wpg_p), _ = tm.row_tile_args(dv, 4, 64)

    def three(int8: bool) -> None:
        q, k, v, g, beta = ops.delta_rule_inputs(x["qkv"], x["a"], x["b"], x["A_log"], x["dt_bias"], heads)
        o = ops.gated_delta_rule(q, k, v, g, beta, x["state"])
        tm.gated_rms_norm_prepared(o, x["norm"], x["z"], 1e-6, 4, 64, int8=int8)

    def two(int8: bool) -> None:
        o = ops.delta_rule(x["qkv"], x["a"], x["b"], x["A_log"], x["dt_bias"], heads, x["state"])
        tm.gated_rms_norm_prepared(o, x["norm"], x["z"], 1e-6, 4, 64, int8=int8)

    def one(warps: int) -> None:
        ops.delta_rule(
            x["qkv"], x["a"], x["b"], x["A_log"], x["dt_bias"], heads, x["state"], out=out, whole_heads=True,
            z=x["z"], norm_w=x["norm"], eps=1e-6, xp=xp, X_ROW=xp.shape[1], NORM=True, BITS=4, GS=gs, NG_P=ng_p,
            WPG_P=wpg_p, num_warps=warps,
        )  # fmt: skip

    cases: dict[str, Callable[[], float]] = {}
    for int8 in (False, True):
        kind = "int8" if int8 else "float"
        cases[f"three launches, {kind}"] = lambda int8=int8: _graphed(lambda: three(int8))
        cases[f"two launches, {kind}"] = lambda int8=int8: _graphed(lambda: two(int8))
    for warps in (4, 8, 16):
        cases[f"one launch, int8, {warps} warps"] = lambda warps=warps: _graphed(lambda: one(warps))
    return cases


def _graphed(fn: Callable[[], None], reps: int = 20) -> float:
    """Median microseconds a call, in graph replay of GRAPH_CALLS calls (CUDA events)."""
    import torch

    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        fn()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, stream=stream):
            for _ in range(GRAPH_CALLS):
                fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / GRAPH_CALLS)
    return float(np.median(times))


if __name__ == "__main__":
    main()
