"""Wall clock of a prefill beside the GPU's time for it: whether a prefill is bound by the GPU or by the
host issuing its launches.

    python scripts/prefill_wall.py [PRESET] [--layers 4] [--experts 64] [--bits 4] [--k 10] [--prompt 512]
        [--runs 5] [--int8-dot] [--cuda-graph] [--packed DIR] [--profile N] [--json]

A synthetic slice of PRESET (runtime/synthetic.py, every expert on the device), or with ``--packed``
a packed model (``fmoe.load``, the torch backend on CUDA), prefills ``--prompt`` tokens on a fresh
state ``--runs`` times after two warm-ups. Each run reports the wall clock (to the GPU's end), the
time the host took to issue the pass, and the GPU's time between CUDA events around it: when the
host's issue time is about the wall time, the host sets the pace (the pass is the runner's, which reads
the last row's logits back: the issue time includes waiting for them, so it shows the host's share
only when the GPU's time is well below it). ``--cuda-graph``: the runner replays a fresh sequence's
first chunk from a CUDA graph (captured in the warm-ups). ``--profile N``: then one pass under
cProfile, its N most expensive functions by own time.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import io
import json
import pstats
import statistics
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def timed_runs(forward: Callable[[], object], runs: int, events: Callable[[], Any], sync: Callable[[], None]) -> list:
    """``runs`` passes of ``forward``, each as (wall ms, host issue ms, GPU ms): ``events()`` makes a
    started/ended pair of timing events (``record()``, ``elapsed_time(other)``), ``sync`` waits for
    the device."""
    out = []
    for _ in range(runs):
        sync()
        start, end = events(), events()
        t0 = time.perf_counter()
        start.record()
        forward()
        end.record()
        t1 = time.perf_counter()
        sync()
        t2 = time.perf_counter()
        out.append((1e3 * (t2 - t0), 1e3 * (t1 - t0), start.elapsed_time(end)))
    return out


@contextlib.contextmanager
def _engine(args: argparse.Namespace) -> Iterator[Any]:
    import fmoe
    from fmoe.runtime.synthetic import synthetic_config, synthetic_engine

    options = {"int8": True} if args.int8_dot else None
    if args.packed:
        with fmoe.load(args.packed, backend="torch", device="cuda", backend_options=options,
                       cuda_graph=args.cuda_graph) as engine:  # fmt: skip
            yield engine
        return
    cfg = synthetic_config(args.preset, args.layers, args.experts)
    with synthetic_engine(cfg, bits=args.bits, k=args.k, device="cuda", max_context=2 * args.prompt + 16,
                          backend_options=options, cuda_graph=args.cuda_graph) as engine:  # fmt: skip
        yield engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=64, help="routed experts a layer (synthetic)")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--int8-dot", action="store_true")
    ap.add_argument("--cuda-graph", action="store_true", help="a fresh sequence's first chunk from a CUDA graph")
    ap.add_argument("--packed", help="a packed model instead of the synthetic slice")
    ap.add_argument("--profile", type=int, default=0, metavar="N", help="then one pass under cProfile: N lines")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name in ("layers", "experts", "prompt", "runs"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be at least 1")
    if not args.packed:
        from fmoe.errors import FmoeError
        from fmoe.runtime.synthetic import synthetic_config

        try:
            synthetic_config(args.preset, args.layers, args.experts)
        except FmoeError as e:
            ap.error(str(e))
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("prefill_wall: needs a CUDA device")
    with _engine(args) as engine:
        runner = engine.runner
        vocab = min(engine.config.vocab_size, engine.tokenizer.vocab_size)
        ids = np.random.default_rng(0).integers(0, vocab, args.prompt).tolist()
        forward = lambda: runner.forward(ids, runner.new_state(), last_only=True)  # noqa: E731
        for _ in range(2):  # compiles every shape, fills the allocator's cache
            forward()
        event = lambda: torch.cuda.Event(enable_timing=True)  # noqa: E731
        rows = timed_runs(forward, args.runs, event, torch.cuda.synchronize)
        profile = ""
        if args.profile:
            torch.cuda.synchronize()
            prof = cProfile.Profile()
            prof.enable()
            forward()
            torch.cuda.synchronize()
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(args.profile)
            profile = buf.getvalue()
    wall = statistics.median(r[0] for r in rows)
    doc = {"prompt": args.prompt, "int8_dot": args.int8_dot, "cuda_graph": args.cuda_graph, "packed": args.packed,
           "runs": [{"wall_ms": w, "host_issue_ms": h, "gpu_ms": g} for w, h, g in rows],
           "median_wall_ms": wall, "tokens_per_second": args.prompt / wall * 1e3}  # fmt: skip
    if args.json:
        print(json.dumps(doc))
        return
    print(f"{args.prompt}-token prefill, {args.packed or f'{args.preset} {args.layers} layers {args.experts} experts'}")
    print(f"{'wall ms':>10s} {'host issue ms':>14s} {'GPU ms':>10s} {'tok/s':>10s}")
    for w, h, g in rows:
        print(f"{w:10.2f} {h:14.2f} {g:10.2f} {args.prompt / w * 1e3:10.0f}")
    print(profile, end="")


if __name__ == "__main__":
    main()
