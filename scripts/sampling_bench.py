"""Host time of drawing one token (runtime/text/sampling.py's Sampler) on a vocabulary of the flagship's
size, by sampling parameters: what each decoded token costs on the host after the logits arrive.

    python scripts/sampling_bench.py [--vocab 248320] [--draws 50]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from fmoe.runtime.text.sampling import Sampler, SamplingParams

CASES = [(0.0, 0, 1.0), (1.0, 0, 1.0), (0.7, 20, 0.95), (0.6, 0, 0.95), (0.3, 0, 0.5), (1.0, 0, 0.99)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, default=248320)
    ap.add_argument("--draws", type=int, default=50)
    args = ap.parse_args()
    logits = (np.random.default_rng(0).standard_normal(args.vocab) * 3).astype(np.float32)
    print(f"vocabulary {args.vocab}, logits ~ N(0, 3^2), {args.draws} draws a case")
    print(f"{'temperature':>11} {'top-k':>6} {'top-p':>6} {'ms a token':>11}")
    for t, k, p in CASES:
        sampler = Sampler(SamplingParams(t, k, p, seed=1))
        sampler(logits)
        start = time.perf_counter()
        for _ in range(args.draws):
            sampler(logits)
        print(f"{t:11.1f} {k:6d} {p:6.2f} {(time.perf_counter() - start) / args.draws * 1e3:11.3f}")


if __name__ == "__main__":
    main()
