"""Rendering of the conversion reports for a person (`fmoe verify`, `fmoe info`); the reports
themselves are plain dicts made by fmoe.convert (and printed as JSON with --json)."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from fmoe.cli.console import console


# ---- fmoe verify -----------------------------------------------------------------------------
def render_verify(report: dict[str, Any]) -> None:
    """Print the report for a person: one line per bad file and per warning, then a verdict."""

    for w in report["warnings"]:
        console.print(f"[yellow]warning[/] {escape(w['file'])}: {escape(w['problem'])}", soft_wrap=True)
    for b in report["bad"]:
        console.print(f"[bold red]bad[/] {escape(b['file'])}: {escape(b['problem'])}", soft_wrap=True)
    widths = ", ".join(f"q{b}" for b in report["expert_bits"]) or "none"
    summary = (
        f"{report['checked_files']} files, {report['checked_bytes'] / 1e6:.1f} MB hashed in {report['seconds']:.1f} s"
        f" (experts: {widths})"
    )
    deep = report.get("deep")
    if deep:
        summary += f"; deep: {deep['experts']} experts, {deep['tensors']} dense tensors compared with the source"
    if report["ok"]:
        console.print(f"[bold green]ok[/] {escape(report['path'])}: {summary}", soft_wrap=True)
    else:
        files = len({b["file"] for b in report["bad"]})
        console.print(f"[bold red]FAILED[/] {escape(report['path'])}: {files} bad file(s); {summary}", soft_wrap=True)


# ---- fmoe info ---------------------------------------------------------------------------------
def render_info(report: dict[str, Any]) -> None:
    """Print the description as Rich tables on stdout."""

    def table(title: str, rows: list[tuple[str, Any]]) -> Table:
        t = Table(title=title, title_justify="left", show_header=False, box=None, padding=(0, 2))
        t.add_column(style="bold")
        t.add_column()
        for key, value in rows:
            t.add_row(key, escape(str(value)) if value is not None else "[dim]-[/]")
        return t

    g = report["geometry"]
    geo = [
        ("layers", f"{g['layers']} ({g['full_attention_layers']} full attention)"),
        ("hidden", g["hidden_size"]),
        ("experts", f"{g['experts']}, {g['experts_per_token']} per token"),
        ("expert intermediate", g["moe_intermediate_size"]),
        ("vocab", g["vocab_size"]),
    ]
    if report["kind"] == "source":
        e = report["experts"]
        rows = [
            ("layout", report["layout"]),
            ("repo", report["repo"]),
            ("revision", report["revision"]),
            ("fingerprint", report["model_fingerprint"]),
            ("shards", f"{len(report['shards'])} files, {_size(report['bytes'])}"),
            ("expert weights", f"affine {e['bits']}-bit" if e["bits"] else (e["dtype"] or "float")),
            ("dense tensors", f"{report['dense_tensors']} ({report['dense_quantized']} quantised)"),
        ]
        console.print(table(f"source checkpoint {report['path']}", [*rows, *geo]))
        return
    m, d = report["model"], report["dense"]
    rows = [
        ("fingerprint", m["fingerprint"]),
        ("source layout", m["source"]["layout"]),
        ("source repo", m["source"]["repo"]),
        ("source revision", m["source"]["revision"]),
        ("source path", m["source"]["path"]),
    ]
    console.print(table(f"packed directory {report['path']}", [*rows, *geo]))
    complete = d["state"] == "complete"
    weights = [("dense", f"{d['bits']}-bit, {d['tensors']} tensors, {_size(d['bytes'])}" if complete else d["state"])]
    for e in report["experts"]:
        text = f"{e['state']}: {e['files']}/{e['expected']} files, {_size(e['bytes'])}"
        if e["method"]:
            text += f", {e['method']} from {e['from']}"
        if isinstance(e["rel_rms"], float):
            text += f", rel. RMS error {e['rel_rms']:.4f}"
        weights.append((f"experts q{e['bits']}", text))
    if not report["experts"]:
        weights.append(("experts", "none (run `fmoe repack`)"))
    console.print(table("weights", weights))
    present = [n for n, ok in report["tokenizer"].items() if ok]
    checks = report["checksums"]
    console.print(
        table(
            "files",
            [
                ("tokenizer files", ", ".join(present) or "none"),
                ("checksums", f"{checks['state']}; manifests: {', '.join(checks['manifests'])}"),
            ],
        )
    )


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n} B"
