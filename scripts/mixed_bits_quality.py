"""What host-homed experts at 2 bits would cost: the reference model with a share of each layer's
experts read from its 2-bit files and the rest from its 4-bit ones, against the bf16 source, beside
all 4-bit and all 2-bit (docs/QUALITY.md's measures, on its positions).

    python scripts/mixed_bits_quality.py [--workdir /tmp/fmoe-mixed] [--share 0.35] [--tokens 32768]
        [--ctx 512] [--threads 1] [--json]

On one H200 the 397B keeps about 35% of its 4-bit experts in page-locked host memory, and every
byte of those crosses the link (docs/PERFORMANCE.md, sixteenth pass): the same experts at 2 bits
would halve that traffic. Which experts go to 2 bits: per layer, the share routed to least (what
the homes policy leaves in host memory under skewed routing; counted from the routing trace checked
in with the model), a random share (uniform routing, where homes cannot choose), and the share
routed to most (the worst case). Dense weights bf16 (``d16``, as the table's expert rows).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.runtime.eval import (
    EngineModel,
    PositionMetrics,
    SourceModel,
    compare,
    compute_reference,
    read_text,
    reference_model_dir,
    scored,
    summarise,
    window_starts,
)
from fmoe.runtime.experts.stats import ExpertStats


class MixedExperts:
    """A provider over two expert stores of one packed model: expert ``e`` of ``layer`` from ``low``
    where ``low_mask[layer, e]``, else from ``high`` (the CPU backend computes each part in its own
    format)."""

    def __init__(self, high: Any, low: Any, low_mask: np.ndarray) -> None:
        self.high, self.low, self.low_mask = high, low, low_mask

    def resident(self, layer: int, experts: np.ndarray) -> Iterator[Any]:
        experts = np.asarray(experts, dtype=np.int64)
        low = self.low_mask[layer, experts]
        tickets = [self.high.resident(layer, experts[~low]), self.low.resident(layer, experts[low])]
        try:
            for ticket in tickets:
                yield from ticket
        finally:
            for ticket in tickets:
                ticket.close()

    @property
    def stats(self) -> ExpertStats:
        total = self.high.stats.copy()
        total += self.low.stats
        return total


def low_masks(share: float, popularity: np.ndarray, seed: int = 0) -> dict[str, np.ndarray]:
    """bool ``[layers, experts]`` masks of the experts at 2 bits, ``round(share * experts)`` a layer:
    the least routed, a random set, the most routed (``popularity``: choices per expert)."""
    layers, n = popularity.shape
    count = round(share * n)
    order = np.argsort(popularity, axis=1, kind="stable")  # least routed first
    rng = np.random.default_rng(seed)
    picks = {
        "least routed": order[:, :count],
        "random": np.stack([rng.choice(n, size=count, replace=False) for _ in range(layers)]),
        "most routed": order[:, n - count :],
    }
    masks = {}
    for name, chosen in picks.items():
        mask = np.zeros((layers, n), dtype=bool)
        np.put_along_axis(mask, chosen, True, axis=1)
        masks[name] = mask
    return masks


def build(work: Path) -> Path:
    """The reference model packed with bf16 dense weights, 4-bit experts and 2-bit ones from them."""
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack

    packed, source = work / "d16", reference_model_dir()
    # each step once: a run cut short resumes where it stopped (each step writes atomically)
    if not (packed / "model_weights.bin").is_file():
        extract(source, packed, dense_bits=16)
    if not (packed / "experts-q4").is_dir():
        repack(source, packed, bits=4)
    if not (packed / "experts-q2").is_dir():
        repack(packed, packed, bits=2)
    return packed


def routed_share(mask: np.ndarray, popularity: np.ndarray) -> float:
    """The share of the trace's routed choices that land on masked experts."""
    return float(popularity[mask].sum() / popularity.sum())


def run(args: argparse.Namespace) -> dict[str, Any]:
    from fmoe.runtime.routing_trace import RoutingTrace
    from fmoe.runtime.text.tokenizer import Tokenizer

    packed = build(args.workdir)
    body, text_label = read_text(None)
    ids = np.asarray(Tokenizer(packed / "tokenizer.json").encode(body)[: args.tokens], dtype=np.int64)
    ids = ids[: len(window_starts(len(ids), args.ctx)) * args.ctx]
    source = SourceModel(reference_model_dir())
    try:
        ref = compute_reference(source, ids, args.ctx)
    finally:
        source.close()
    popularity = RoutingTrace.load(reference_model_dir() / "routing-trace.npz").popularity()
    options = {"threads": args.threads}
    high, low = EngineModel(packed, 4, **options), EngineModel(packed, 2, **options)
    stores = high.engine.runner.network.experts, low.engine.runner.network.experts
    per_window = args.ctx - 1 - args.ctx // 2
    variants: list[tuple[str, Any, np.ndarray | None]] = [("all 4-bit", high, None), ("all 2-bit", low, None)]
    variants += [(f"{args.share:.0%} at 2 bits, {name}", high, mask)
                 for name, mask in low_masks(args.share, popularity).items()]  # fmt: skip
    rows = []
    try:
        for name, model, mask in variants:
            network = model.engine.runner.network
            if mask is not None:
                network.experts = MixedExperts(*stores, mask)
            parts = []
            for i, s in enumerate(window_starts(len(ids), args.ctx)):
                w = ids[s : s + args.ctx]
                lp = ref.logits[i * per_window : (i + 1) * per_window]
                parts.append(compare(lp, w[1:][scored(args.ctx)], model.logits(w.tolist())[scored(args.ctx)]))
            share = None if mask is None else routed_share(mask, popularity)
            rows.append({"variant": name, "routed_share_at_2_bits": share, **summarise(PositionMetrics.concat(parts))})
            network.experts = stores[0] if model is high else stores[1]  # its own again
    finally:
        high.close()
        low.close()
    return {"text": text_label, "positions": len(ref.targets), "share": args.share, "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/fmoe-mixed"))
    ap.add_argument("--share", type=float, default=0.35, help="of each layer's experts, the share at 2 bits")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if not 0.0 < args.share < 1.0:
        ap.error(f"argument --share: {args.share} must lie strictly between 0 and 1")
    if args.tokens < args.ctx or args.ctx < 4:
        ap.error("arguments --tokens and --ctx: need --ctx of at least 4 and --tokens of at least --ctx")
    if args.threads < 1:
        ap.error("argument --threads: must be at least 1")
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return
    print(f"{result['positions']} positions of {result['text']}; reference: bf16 (transformers, float32)")
    print("| variant | routed choices at 2 bits | PPL | KL mean | KL p99 | same top | Δp |")
    print("|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        share = "" if r["routed_share_at_2_bits"] is None else f"{r['routed_share_at_2_bits']:.0%}"
        print(f"| {r['variant']} | {share} | {r['ppl']:.3f} | {r['kl_mean']:.4f} ± {r['kl_mean_se']:.4f} "
              f"| {r['kl_p99']:.3f} | {r['same_top']:.1%} | {r['dp_mean']:+.2%} |")  # fmt: skip


if __name__ == "__main__":
    main()
