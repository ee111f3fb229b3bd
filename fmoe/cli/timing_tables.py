"""Rich tables for `fmoe run --timing` and `fmoe bench model`: where the time of a token goes."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# phase -> column title (dense = projections incl. shared expert and router; mixer = delta rule or
# attention core; exp I/O = ExpertStore.fetch; exp comp = the routed experts' SwiGLU)
PHASE_TITLES = {
    "dense": "dense",
    "mixer": "mixer",
    "routing": "routing",
    "expert_io": "exp I/O",
    "expert_compute": "exp comp",
}

_CAPTION = "mixer: delta rule / attention core; dense: projections, shared expert, router"


def _ms(seconds: float, per: int) -> str:
    return f"{seconds * 1e3 / max(per, 1):.3f}"


def layer_table(profile: dict[str, Any], layer_types: list[str], tokens: int, title: str) -> Table:
    """Per-layer phase breakdown in ms per token (like the seed project's --timing)."""
    table = Table(title=title, title_justify="left", caption=_CAPTION, caption_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("type")
    for name in PHASE_TITLES.values():
        table.add_column(name, justify="right")
    table.add_column("total", justify="right")
    phases = list(PHASE_TITLES)
    for i, row in enumerate(profile["layers"]):
        kind = "attn" if layer_types[i] == "full_attention" else "delta"
        table.add_row(str(i), kind, *(_ms(row[p], tokens) for p in phases), _ms(sum(row.values()), tokens))
    head = profile["head"]
    table.add_row(
        "head", "emb/lm", *(_ms(head[p], tokens) for p in phases), _ms(sum(head.values()), tokens), end_section=True
    )
    totals = profile["phases"]
    total = sum(totals.values())
    table.add_row("all", "", *(_ms(totals[p], tokens) for p in phases), _ms(total, tokens), style="bold")
    table.add_row("share", "", *(f"{100 * totals[p] / total:.0f}%" if total else "-" for p in phases), "100%")
    n = max(len(profile["layers"]), 1)
    table.add_row(
        "avg",
        "layer",
        *(_ms(sum(r[p] for r in profile["layers"]) / n, tokens) for p in phases),
        _ms(sum(sum(r.values()) for r in profile["layers"]) / n, tokens),
    )
    return table


def throughput_table(timing: dict[str, Any]) -> Table:
    table = Table(title="Throughput", title_justify="left")
    for col in ("phase", "tokens", "seconds", "tok/s"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for kind in ("prefill", "decode"):
        t = timing[kind]
        table.add_row(kind, str(t["tokens"]), f"{t['seconds']:.3f}", f"{t['tokens_per_second']:.2f}")
    return table


def expert_table(timing: dict[str, Any]) -> Table:
    cache = timing.get("cache_bytes", 0)
    label = f"in-process cache {cache / 1e9:.2f} GB" if cache else "OS page cache only"
    table = Table(title=f"Expert store ({timing['bits']}-bit, K={timing['k']}, {label})", title_justify="left")
    for col in ("phase", "fetched", "reads", "MB read", "cache hits", "hit rate", "I/O s", "GB/s"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for kind in ("prefill", "decode"):
        e = timing[kind]["experts"]
        table.add_row(
            kind,
            str(e["hits"] + e["misses"]),
            str(e["reads"]),
            f"{e['bytes'] / 1e6:.1f}",
            str(e["hits"]),
            f"{100 * e['hit_rate']:.0f}%",
            f"{e['seconds']:.3f}",
            f"{e['read_gb_per_s']:.2f}",
        )
    return table


def print_timing(console: Console, timing: dict[str, Any], layer_types: list[str]) -> None:
    """The full --timing report: per-layer breakdown (decode per token, else prefill), throughput,
    expert store statistics."""
    decode = timing["decode"]
    if decode["tokens"]:
        console.print(layer_table(decode["profile"], layer_types, decode["tokens"], "Decode: ms per token"))
    prefill = timing["prefill"]
    console.print(
        layer_table(prefill["profile"], layer_types, prefill["tokens"], "Prefill: ms per prompt token (batched)")
    )
    console.print(throughput_table(timing))
    console.print(expert_table(timing))
