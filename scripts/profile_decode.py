"""Where the host's time goes in decode steps of a synthetic model: Python's profiler over greedy
steps of `fmoe run`'s pass (the runner's; replayed from CUDA graphs with ``--cuda-graph``, the
token picked on the device), the functions that took the most time
themselves and with what they call. With experts streamed to a device tier, the host's work in each
layer's experts stage is time the GPU waits.

``--gpu``: the GPU's side of the same steps instead (torch's profiler; kernels inside replayed
graphs included): a step's wall time against the time some kernel or copy ran (the rest is the GPU
waiting for the host), and the kernels that took the most time, per step.

    python scripts/profile_decode.py [PRESET] [--layers 8] [--bits 4] [--k 10] [--gpu-cache-gb 20]
        [--host-gb 4] [--host-reads direct] [--routing zipf:1.2] [--tokens 16] [--cuda-graph] [--int8-dot]
        [--top 25] [--gpu]
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from collections import Counter
from typing import Any

from fmoe.runtime.routing_trace import replaying, routing_source
from fmoe.runtime.synthetic import synthetic_config, synthetic_engine
from fmoe.runtime.text.sampling import GREEDY


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--gpu-cache-gb", type=float, default=None)
    ap.add_argument("--host-gb", type=float, default=4.0)
    ap.add_argument("--routing", default="model")
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--host-reads", choices=["copy", "direct"], default="copy")
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--int8-dot", action="store_true")
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--gpu", action="store_true", help="the GPU's kernels per step, not the host's functions")
    args = ap.parse_args(argv)
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("profile_decode --gpu: needs a CUDA device")
    cfg = synthetic_config(args.preset, args.layers)
    cache = None if args.gpu_cache_gb is None else int(args.gpu_cache_gb * 1e9)
    engine = synthetic_engine(
        cfg, bits=args.bits, k=args.k, device=args.device, device_cache_bytes=cache,
        host_bytes=int(args.host_gb * 1e9), host_reads=args.host_reads, max_context=3 * args.tokens + 16,
        cuda_graph=args.cuda_graph, backend_options={"int8": True} if args.int8_dot else None,
    )  # fmt: skip
    source = routing_source(args.routing, cfg.num_hidden_layers, cfg.num_experts, engine.k)
    runner = engine.runner
    with engine, replaying(engine, source):
        state = runner.new_state()

        def step(ids: list[int]) -> int:  # `fmoe run`'s greedy pass (graphs replayed with --cuda-graph)
            token = runner.forward(ids, state, pick=GREEDY).token
            assert token is not None
            return token

        token = step(list(range(8)))

        for _ in range(args.tokens):  # warm: every kernel compiled, the device tier filled a little
            token = step([token])
        if args.gpu:
            import torch
            from torch.profiler import ProfilerActivity, profile

            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA]) as gpu:
                t0 = time.perf_counter()
                for _ in range(args.tokens):
                    token = step([token])
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
        else:
            profiler = cProfile.Profile()
            t0 = time.perf_counter()
            profiler.enable()
            for _ in range(args.tokens):
                token = step([token])
            profiler.disable()
            seconds = time.perf_counter() - t0
    print(
        f"{args.preset}, {cfg.num_hidden_layers} layers, {args.bits}-bit, K={engine.k}, routing {args.routing}: "
        f"{1e3 * seconds / args.tokens:.2f} ms a token under the profiler"
    )
    if args.gpu:
        print_gpu_table(gpu.events(), args.tokens, cfg.num_hidden_layers, args.top)
        return 0
    stats = pstats.Stats(profiler)
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumulative").print_stats(args.top)
    return 0


def print_gpu_table(events: Any, steps: int, layers: int, top: int) -> None:
    """The GPU's activity over ``steps`` steps: its span, the time some kernel or copy ran (intervals
    merged: kernels that overlap count once) and the kernels by time, per step and per layer."""
    spans = sorted(
        (e.time_range.start, e.time_range.end, e.name) for e in events if e.device_type.name == "CUDA"
    )  # fmt: skip
    if not spans:
        print("no GPU activity recorded (a CPU device, or the profiler saw no kernels)")
        return
    busy, end = 0.0, spans[0][0]
    for start, stop, _ in spans:  # merge overlapping intervals
        busy += max(0.0, stop - max(start, end))
        end = max(end, stop)
    count: Counter[str] = Counter()
    micros: Counter[str] = Counter()
    for start, stop, name in spans:
        count[name] += 1
        micros[name] += stop - start
    span, total = end - spans[0][0], sum(micros.values())
    print(
        f"GPU: {span / 1e3 / steps:.3f} ms a step from the first kernel to the last, busy {busy / 1e3 / steps:.3f} "
        f"({busy / span:.1%}; {busy / steps / layers:.1f} us a layer), kernels' sum {total / 1e3 / steps:.3f}"
    )
    print(f"{'us a step':>10} {'share':>6} {'a step':>7} {'us each':>8}  kernel")
    for name, us in micros.most_common(top):
        print(f"{us / steps:10.1f} {us / total:6.1%} {count[name] / steps:7.1f} {us / count[name]:8.2f}  {name[:90]}")


if __name__ == "__main__":
    raise SystemExit(main())
