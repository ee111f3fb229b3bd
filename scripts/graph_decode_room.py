"""Graphed decode by the KV room it is captured with: the bench's greedy loop (replay, argmax, the
token back to the host) over a synthetic model, the decode captured with each room in turn (twice,
alternating), timed with CUDA events. Attention that took the whole room showed here: `fmoe run`
captures 4096 positions past the prompt (runtime/engine/runner.py, ``GRAPH_SPAN``).

    python scripts/graph_decode_room.py [PRESET] [--layers 4] [--bits 4] [--k 10] [--rooms 128,4160] [--tokens 48]
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from fmoe.runtime.engine.cuda_graph import CudaGraphDecoder
from fmoe.runtime.synthetic import synthetic_config, synthetic_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--rooms", default="128,4160")
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--float", action="store_true", help="the float matvecs (default: --int8-dot's)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("graph_decode_room: needs a CUDA device")
    rooms = [int(r) for r in args.rooms.split(",")]
    if min(rooms) < args.prompt + args.tokens + 5:
        raise SystemExit(f"graph_decode_room: every room must hold {args.prompt + args.tokens + 5} positions")
    cfg = synthetic_config(args.preset, args.layers, None)
    options = None if args.float else {"int8": True}
    with synthetic_engine(
        cfg, bits=args.bits, k=args.k, device="cuda", max_context=max(rooms) + 8, backend_options=options
    ) as engine:
        net = engine.runner.network
        for room in rooms * 2:
            state = net.new_state()
            net.forward(np.arange(args.prompt, dtype=np.int64) % cfg.vocab_size, state, last_only=True)
            decoder = CudaGraphDecoder(net, state, room)
            token = 3
            for _ in range(4):
                token = int(decoder.step(token)[-1].argmax())
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(args.tokens):
                token = int(decoder.step(token)[-1].argmax())
                net.after_pass()
            end.record()
            end.synchronize()
            first = args.prompt + 4
            us = start.elapsed_time(end) * 1e3 / args.tokens
            print(f"{args.layers} layers {args.bits}-bit K={args.k}, KV room {room:6d}: {us:8.1f} us a token "
                  f"(positions {first}..{first + args.tokens - 1})", flush=True)  # fmt: skip
            del decoder


if __name__ == "__main__":
    main()
