"""Time a decode token's projections of one input on the CPU at a preset's shapes: the quantised
matrices through `qmatvecs` (one parallel region on int8 inputs) against one `qmatmul` call a
matrix, alternating rounds, and print a table (median microseconds a set, and the ratio).

    python scripts/projections_bench.py [PRESET] --threads 16 [--float] [--bits 4] [--rounds 7]

The sets, from the preset's config: the DeltaNet's input projections (qkv, z, b, a), attention's q
(with its gate), k and v, and the router beside the shared expert's one-row gate.
"""

from __future__ import annotations

import argparse

import numpy as np

from fmoe.errors import FmoeError
from fmoe.formats.quant import QuantTensor, quantize
from fmoe.runtime.kernels import cpu
from fmoe.runtime.kernels.bench import time_call
from fmoe.runtime.synthetic import synthetic_config

CALLS = 20  # calls a timed round


def projection_sets(preset: str) -> dict[str, tuple[int, tuple[int, ...]]]:
    """name -> (input width, each matrix's rows) for the preset's sets of one input."""
    cfg = synthetic_config(preset, 1)
    hidden = cfg.hidden_size
    hv = cfg.linear_num_value_heads
    kv = cfg.num_key_value_heads * cfg.head_dim
    return {
        "DeltaNet in_proj (qkv, z, b, a)": (hidden, (cfg.conv_dim, cfg.linear_value_dim, hv, hv)),
        "attention (q + gate, k, v)": (hidden, (2 * cfg.num_attention_heads * cfg.head_dim, kv, kv)),
        "router + shared expert gate": (hidden, (cfg.num_experts, 1)),
    }


def time_set(qts: list[QuantTensor], x: np.ndarray, int8: bool, rounds: int) -> tuple[float, float]:
    """Microseconds a set, median over ``rounds`` alternating rounds of each round's median of
    ``CALLS`` calls (the first call of each round untimed): (qmatvecs, a qmatmul each)."""
    together = lambda: cpu.qmatvecs(x, qts, int8=int8)  # noqa: E731
    each = lambda: [cpu.qmatmul(x, qt, int8=int8) for qt in qts]  # noqa: E731
    times = [(time_call(together, CALLS)[0], time_call(each, CALLS)[0]) for _ in range(rounds)]
    return float(np.median([t[0] for t in times])) * 1e6, float(np.median([t[1] for t in times])) * 1e6


def _positive(text: str) -> int:
    """``--threads`` / ``--rounds``: a whole number of at least 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be at least 1")
    return value


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--threads", type=_positive, default=2, help="numba threads (at most the machine's)")
    ap.add_argument("--bits", type=int, default=4, choices=(2, 4, 8))
    ap.add_argument("--float", dest="int8", action="store_false", help="the float kernels (default: --int8-dot's)")
    ap.add_argument("--rounds", type=_positive, default=7)
    args = ap.parse_args()
    import numba

    if args.threads > numba.config.NUMBA_NUM_THREADS:
        ap.error(f"argument --threads: {args.threads} is more than numba's {numba.config.NUMBA_NUM_THREADS} threads")
    try:
        sets = projection_sets(args.preset)
    except FmoeError as e:
        ap.error(str(e))
    numba.set_num_threads(args.threads)
    rng = np.random.default_rng(0)
    kind = "int8" if args.int8 else "float"
    print(f"{args.preset}: one token, {args.bits}-bit, {kind} inputs, {args.threads} threads")
    print(f"{'set':34s} {'matrices':>28s} {'one region':>12s} {'a call each':>12s} {'ratio':>6s}")
    for name, (n_in, rows) in sets.items():
        qts = [quantize(rng.standard_normal((r, n_in)).astype(np.float32), args.bits) for r in rows]
        a, b = time_set(qts, rng.standard_normal(n_in).astype(np.float32), args.int8, args.rounds)
        shape = " ".join(map(str, rows)) + f" x {n_in}"
        print(f"{name:34s} {shape:>28s} {a:10.0f}us {b:10.0f}us {b / a:5.2f}x")


if __name__ == "__main__":
    main()
