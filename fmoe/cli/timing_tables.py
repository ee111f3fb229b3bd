"""Rich tables for `fmoe run --timing` and `fmoe bench model`: where the time of a token goes."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from fmoe.runtime.bench import BenchResult
from fmoe.runtime.engine.results import GenerationTiming, PhaseTiming
from fmoe.runtime.experts.stats import TIERS
from fmoe.runtime.timing import HEAD, PHASES, PhaseProfile

# phase -> column title (runtime/timing.py says what each phase covers)
PHASE_TITLES = {
    "dense": "dense",
    "mixer": "mixer",
    "routing": "routing",
    "expert_io": "exp I/O",
    "expert_compute": "exp comp",
}

_CAPTION = "mixer: delta rule / attention core; dense: projections, norms, shared expert, router"


def _ms(seconds: float, per: int) -> str:
    return f"{seconds * 1e3 / max(per, 1):.3f}"


def layer_table(profile: PhaseProfile, layer_types: list[str], tokens: int, title: str) -> Table:
    """Per-layer phase breakdown in ms per token (like the seed project's --timing)."""
    table = Table(title=title, title_justify="left", caption=_CAPTION, caption_justify="left")
    table.add_column("layer", justify="right")
    table.add_column("type")
    for phase in PHASES:  # the profile's column order
        table.add_column(PHASE_TITLES[phase], justify="right")
    table.add_column("total", justify="right")
    for i in range(profile.num_layers):
        row = profile.seconds[i]
        kind = "attn" if layer_types[i] == "full_attention" else "delta"
        table.add_row(str(i), kind, *(_ms(s, tokens) for s in row), _ms(row.sum(), tokens))
    head = profile.seconds[HEAD]
    table.add_row("head", "emb/lm", *(_ms(s, tokens) for s in head), _ms(head.sum(), tokens), end_section=True)
    totals = profile.seconds.sum(axis=0)
    total = float(totals.sum())
    table.add_row("all", "", *(_ms(s, tokens) for s in totals), _ms(total, tokens), style="bold")
    table.add_row("share", "", *(f"{100 * s / total:.0f}%" if total else "-" for s in totals), "100%")
    layers = profile.seconds[: profile.num_layers]
    n = max(profile.num_layers, 1)
    table.add_row("avg", "layer", *(_ms(s / n, tokens) for s in layers.sum(axis=0)), _ms(layers.sum() / n, tokens))
    return table


def throughput_table(prefill: PhaseTiming, decode: PhaseTiming) -> Table:
    table = Table(title="Throughput", title_justify="left")
    for col in ("phase", "tokens", "seconds", "tok/s", "ms/token"):
        table.add_column(col, justify="right" if col != "phase" else "left")
    for kind, t in (("prefill", prefill), ("decode", decode)):
        table.add_row(kind, str(t.tokens), f"{t.seconds:.3f}", f"{t.tokens_per_second:.2f}", _ms(t.seconds, t.tokens))
    return table


def expert_table(
    prefill: PhaseTiming,
    decode: PhaseTiming,
    bits: int,
    k: int,
    cache_bytes: int,
    host_reads: str = "copy",
    host_bits: int | None = None,
    host_share: float | None = None,
) -> Table:
    """Per phase and tier: experts served, their share of the requested ones, MB, busy seconds, GB/s;
    ``host_share``: the share of decode's host-homed choices the host computes (``--host-compute``)."""
    on_device = any(t.experts.tier("device")["served"] for t in (prefill, decode))
    where = "device cache" if on_device else "in-process cache"
    if host_reads == "direct":  # the memory tier: host rows the device's kernels read in place
        where = "host rows read in place" + (f" ({host_bits}-bit)" if host_bits else "") + ", device slots"
    size = f"{cache_bytes / 1e9:.2f} GB" if cache_bytes >= 1e8 else f"{cache_bytes / 1e6:.1f} MB"
    label = f"{where} {size}" if cache_bytes else "OS page cache only"
    if host_share is not None:
        label += f", the host computing {host_share:.2f} of decode's host-homed choices"
    table = Table(title=f"Expert store ({bits}-bit, K={k}, {label})", title_justify="left")
    for col in ("phase", "tier", "requested", "served", "share", "MB", "busy s", "GB/s"):
        table.add_column(col, justify="left" if col in ("phase", "tier") else "right")
    used = [n for n in TIERS if any(t.experts.tier(n)["served"] for t in (prefill, decode))] or ["disk"]
    for kind, t in (("prefill", prefill), ("decode", decode)):
        requested = int(t.experts.requested.sum())
        for name in used:  # the tiers this run has (a device tier only on a GPU, mapped only with --io mmap)
            s = t.experts.tier(name)
            table.add_row(
                kind,
                name,
                str(requested),
                str(s["served"]),
                f"{100 * s['share']:.0f}%",
                f"{s['bytes'] / 1e6:.1f}",
                f"{s['seconds']:.3f}",
                f"{s['gb_per_s']:.2f}",
            )
        computed = int(t.experts.host_computed.sum())
        if computed:  # of those the host tiers served, not copied to the device but computed on the host
            share = f"{100 * computed / requested:.0f}%" if requested else "-"
            table.add_row(kind, "host-computed", str(requested), str(computed), share, "", "", "")
    return table


def bandwidth_table(result: BenchResult) -> Table:
    """A decode step's bytes against the bandwidths measured in the same run (memory; on a GPU with a
    host tier, also the host -> device link that misses are copied over, and the host memory that the
    misses computed on the host are read from)."""
    table = Table(title="Decode against memory bandwidth", title_justify="left")
    link = result.link_gb_per_s is not None
    cols = ["dense MB/token", "expert MB/token", "achieved GB/s", "memory GB/s"]
    cols += ["link MB/token", "link GB/s"] if link else []
    host = result.host_read_gb_per_s is not None
    cols += ["host-computed MB/token", "host GB/s"] if host else []
    for col in (*cols, "ceiling tok/s", "share"):
        table.add_column(col, justify="right")
    memory, ceiling = result.memory_read_gb_per_s, result.decode_ceiling_tok_s
    row = [
        f"{result.dense_bytes_per_token / 1e6:.1f}",
        f"{result.expert_bytes_per_token / 1e6:.1f}",
        f"{result.decode_gb_per_s:.2f}",
        "-" if memory is None else f"{memory:.2f}",
    ]
    if link:
        row += [f"{result.link_bytes_per_token / 1e6:.1f}", f"{result.link_gb_per_s:.2f}"]
    if host:
        row += [f"{result.host_compute_bytes_per_token / 1e6:.1f}", f"{result.host_read_gb_per_s:.2f}"]
    row += [
        "-" if ceiling is None else f"{ceiling:.1f}",
        "-" if not ceiling else f"{100 * result.decode.tokens_per_second / ceiling:.0f}%",
    ]
    table.add_row(*row)
    return table


def print_timing(console: Console, timing: GenerationTiming, layer_types: list[str]) -> None:
    """The full --timing report: per-layer breakdown (decode per token, else prefill), throughput,
    expert store statistics."""
    if timing.decode.tokens:
        console.print(layer_table(timing.decode.profile, layer_types, timing.decode.tokens, "Decode: ms per token"))
    console.print(
        layer_table(
            timing.prefill.profile, layer_types, timing.prefill.tokens, "Prefill: ms per prompt token (batched)"
        )
    )
    console.print(throughput_table(timing.prefill, timing.decode))
    console.print(
        expert_table(
            timing.prefill,
            timing.decode,
            timing.bits,
            timing.k,
            timing.cache_bytes,
            timing.host_reads,
            timing.host_bits,
            timing.host_compute_share,
        )
    )
