"""The cost of picking one token on a vocabulary of the flagship's size, by sampling parameters: the
host sampler (runtime/text/sampling.py) on host logits (what a token costs after the logits arrive,
their read not counted), beside the torch backend's ``greedy_pick``/``sample_pick`` where the logits
are (with ``--device cuda``: CUDA events, the 16-byte read of the pick included), side by side in one
run, and whether the two picked the same tokens.

    python scripts/sampling_bench.py [--vocab 248320] [--draws 50] [--device cuda]
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from fmoe.runtime.text.sampling import Pick, Sampler, SamplingParams

CASES = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.95), (0.6, 0, 0.95), (0.3, 0, 0.5), (1.0, 0, 0.99)]


def device_picks(device: str, logits: np.ndarray, picks: list[Pick]) -> tuple[float, list[int]]:
    """Milliseconds a pick (the backend's op and the read of its 16 bytes), and the tokens."""
    import torch

    from fmoe.runtime.backends.torch_backend import TorchBackend

    be: Any = TorchBackend(device=device)
    x = be.asarray(logits[None, :])

    def one(pick: Pick) -> int:
        if pick.greedy:
            out = be.greedy_pick(x)
        else:
            p = pick.params
            out = be.sample_pick(x, p.temperature, p.top_k, p.top_p, pick.u)
        return int(be.to_numpy(out)[0])

    one(picks[0])  # warm: allocator, kernels
    cuda = be.torch_device.type == "cuda"
    start, end = (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) if cuda else (None, None)
    t0 = time.perf_counter()
    if start is not None:
        start.record()
    tokens = [one(p) for p in picks]
    if start is not None and end is not None:
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / len(picks), tokens
    return (time.perf_counter() - t0) * 1e3 / len(picks), tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--draws", type=int, default=50)
    ap.add_argument("--device", default=None, help="also time the torch backend's picks on this device (cpu, cuda)")
    args = ap.parse_args()
    logits = (np.random.default_rng(0).standard_normal(args.vocab) * 3).astype(np.float32)
    print(f"vocabulary {args.vocab}, logits ~ N(0, 3^2), {args.draws} draws a case")
    device = f" {'ms on ' + args.device:>12} {'same':>5}" if args.device else ""
    print(f"{'temperature':>11} {'top-k':>6} {'top-p':>6} {'ms on host':>11}{device}")
    for t, k, p in CASES:
        params = SamplingParams(t, k, p, seed=1)
        sampler = Sampler(params)
        sampler(logits)
        start = time.perf_counter()
        host = [sampler(logits) for _ in range(args.draws)]
        row = f"{t:11.1f} {k:6d} {p:6.2f} {(time.perf_counter() - start) / args.draws * 1e3:11.3f}"
        if args.device:
            sampler = Sampler(params)
            sampler(logits)  # the same uniform numbers as the host's draws
            ms, tokens = device_picks(args.device, logits, [sampler.pick() for _ in range(args.draws)])
            row += f" {ms:12.3f} {'yes' if tokens == host else 'NO':>5}"
        print(row)


if __name__ == "__main__":
    main()
