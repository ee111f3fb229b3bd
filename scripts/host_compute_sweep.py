"""Decode of a synthetic model whose experts do not all fit the GPU, at several shares of the misses
computed on the host (``--host-compute``), alternating in rounds over one model built once: what the
host's share buys against copying every miss over the link, measured side by side.

    python scripts/host_compute_sweep.py [PRESET] [--layers N] [--bits 4] [--k 10] [--host-gb 16]
        [--routing uniform zipf:1.2] [--shares off 0.25 0.5 auto] [--rounds 2] [--tokens 32]
        [--warm-tokens 64] [--cuda-graph] [--host-reads copy|direct] [--int8-dot] [--threads N]
        [--host-bits 4|2] [--json]

Before the rounds, ``--warm-tokens`` decode steps fill the device tier, so hit rates are near their
steady state (under uniform routing, the tier's share of the experts); random routing draws afresh
for every run (another seed), so no run finds the experts an earlier one left behind. Each row: decode tok/s, the
device tier's hit rate, MB a token copied over the link and computed on the host, the ceiling those
allow at the rates measured in the same run (runtime/bench.py), and the share of it reached; with the
host's share over direct reads, also the ceiling at the rate host memory gave the link and the CPU
together (its "shared" rate).

With ``--host-reads direct`` the device reads the experts it does not hold from page-locked host
memory in place, and a share is the host workers' part of each decode layer's host-homed choices
(runtime/experts/cocompute_device.py), started afresh for each run ("auto" measured again each time).
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Any

from fmoe.runtime.bench import bench_model
from fmoe.runtime.experts.host_share import HostShare, share_direct_reads
from fmoe.runtime.routing_trace import RandomRouting, routing_source
from fmoe.runtime.synthetic import synthetic_config, synthetic_engine


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--gpu-cache-gb", type=float, default=None)
    ap.add_argument("--host-gb", type=float, default=16.0)
    ap.add_argument("--routing", nargs="+", default=["uniform"])
    ap.add_argument("--shares", nargs="+", default=["off", "0.25", "0.5", "auto"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--warm-tokens", type=int, default=64)
    ap.add_argument("--cuda-graph", action="store_true")
    ap.add_argument("--host-reads", choices=("copy", "direct"), default="copy")
    ap.add_argument("--int8-dot", action="store_true", help="int8 activations (the backend's and the host workers')")
    ap.add_argument("--threads", type=int, default=None, help="host workers (direct reads)")
    ap.add_argument("--host-bits", type=int, default=None)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    for s in args.shares:
        HostShare.parse(s)  # a bad share fails before the model is built
    cfg = synthetic_config(args.preset, args.layers)
    cache = None if args.gpu_cache_gb is None else int(args.gpu_cache_gb * 1e9)
    context = args.prompt_tokens + max(args.tokens, args.warm_tokens) + 8
    engine = synthetic_engine(
        cfg, bits=args.bits, k=args.k, device=args.device, device_cache_bytes=cache,
        host_bytes=int(args.host_gb * 1e9), max_context=context, cuda_graph=args.cuda_graph,
        host_reads=args.host_reads, host_bits=args.host_bits, backend_options={"int8": args.int8_dot},
    )  # fmt: skip
    store = engine.runner.store
    if getattr(store, "host", None) is None:
        raise SystemExit("host_compute_sweep: every expert fits the device; nothing is left on the host")

    def share_with_host(share: str | None) -> None:
        parsed = None if share is None else HostShare.parse(share)
        if args.host_reads == "copy":
            store.host_compute = parsed
        elif parsed is None:
            store.stop_sharing()
        else:
            share_direct_reads(store, engine.runner.network.backend, parsed, args.threads)

    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    with engine:
        for routing in args.routing:
            source = routing_source(routing, cfg.num_hidden_layers, cfg.num_experts, engine.k)
            draws = iter(range(1, 1 << 30))
            share_with_host(None)
            bench_model(engine, prompt_tokens=args.prompt_tokens, tokens=args.warm_tokens, routing=source)
            for _ in range(args.rounds):
                for share in args.shares:
                    if isinstance(source, RandomRouting):
                        source.seed = next(draws)
                    share_with_host(share)
                    r = bench_model(
                        engine, prompt_tokens=args.prompt_tokens, tokens=args.tokens, routing=source
                    ).to_dict()
                    rows.setdefault((routing, share), []).append(r)
    table = [_summary(routing, share, runs) for (routing, share), runs in rows.items()]
    if args.json:
        head = {"preset": args.preset, "layers": cfg.num_hidden_layers, "k": engine.k, "host_reads": args.host_reads}
        print(json.dumps({**head, "rows": table}))
        return 0
    print(
        f"{args.preset}, {cfg.num_hidden_layers} layers, {args.bits}-bit, K={engine.k}, {args.rounds} rounds, "
        f"host reads {args.host_reads}{', int8 activations' if args.int8_dot else ''}"
    )
    head = (
        "routing      share  decode tok/s (rounds)     hit   link MB  host MB  ceiling  reached  share used  set"
        "  ceiling (shared)"
    )
    print(head)
    for r in table:
        runs = " / ".join(f"{v:.2f}" for v in r["decode_tok_s_rounds"])
        print(
            f"{r['routing']:<12} {r['share']:<6} {r['decode_tok_s']:7.2f} ({runs:<14}) {r['device_hits']:6.1%} "
            f"{r['link_mb']:8.0f} {r['host_mb']:8.0f} {r['ceiling_tok_s']:8.1f} {r['reached']:8.0%} "
            f"{r['share_used']:10.2f} {r['share_set']:4.2f}"
            + (f"  {r['ceiling_shared_tok_s']:.1f} ({r['reached_shared']:.0%})" if r["ceiling_shared_tok_s"] else "")
        )
    return 0


def _summary(routing: str, share: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    def med(f: Any) -> float:
        return statistics.median(f(r) for r in runs)

    def hits(r: dict[str, Any]) -> float:
        e = r["decode"]["experts"]
        return e["tiers"]["device"]["served"] / max(e["requested"], 1)

    def used(r: dict[str, Any]) -> float:
        e = r["decode"]["experts"]
        misses = e["requested"] - e["tiers"]["device"]["served"]
        return e["host_computed"] / misses if misses else 0.0

    decode = med(lambda r: r["decode"]["tokens_per_second"])
    ceiling = med(lambda r: r["decode_ceiling_tok_s"] or 0.0)
    shared = med(lambda r: r["decode_ceiling_shared_tok_s"] or 0.0)  # host memory at its rate under both readers
    return {
        "routing": routing,
        "share": share,
        "decode_tok_s": decode,
        "decode_tok_s_rounds": [r["decode"]["tokens_per_second"] for r in runs],
        "device_hits": med(hits),
        "link_mb": med(lambda r: r["link_bytes_per_token"] / 1e6),
        "host_mb": med(lambda r: r["host_compute_bytes_per_token"] / 1e6),
        "link_gb_per_s": med(lambda r: r["link_gb_per_s"] or 0.0),
        "host_read_gb_per_s": med(lambda r: r["host_read_gb_per_s"] or 0.0),
        "ceiling_tok_s": ceiling,
        "reached": decode / ceiling if ceiling else 0.0,
        "host_shared_gb_per_s": med(lambda r: r["host_shared_gb_per_s"] or 0.0),
        "ceiling_shared_tok_s": shared,
        "reached_shared": decode / shared if shared else 0.0,
        "share_used": med(used),
        "share_set": med(lambda r: r["host_compute_share"] or 0.0),  # direct reads: as set, or as "auto" measured
    }


if __name__ == "__main__":
    raise SystemExit(main())
