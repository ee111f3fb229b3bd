"""`fmoe eval`: perplexity and the divergence of quantised experts and smaller K from a reference."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fmoe.cli import command, options
from fmoe.errors import FmoeError


def parse_ints(name: str, values: list[str] | None, allowed: tuple[int, ...] | None = None) -> list[int]:
    """Repeated and/or comma-separated whole numbers (``--k 4 --k 2`` or ``--k 4,2``); a one-line error otherwise."""
    out: list[int] = []
    for value in values or []:
        for item in value.split(","):
            try:
                n = int(item.strip())
            except ValueError:
                raise FmoeError(f"{name} {item.strip()!r}: not a whole number") from None
            if allowed is not None and n not in allowed:
                raise FmoeError(f"{name} {n}: must be one of {', '.join(map(str, allowed))}")
            out.append(n)
    return list(dict.fromkeys(out))


@command("eval")
def eval_command(
    packed: Annotated[Path, typer.Argument(help="Packed model directory to evaluate.")],
    reference: Annotated[
        Path | None,
        typer.Option(
            help="What the variants are compared with: a source checkpoint (the bf16 model, through transformers), "
            "another packed directory, or a reference saved by --save-reference (default: PACKED's own 4-bit experts at its K)."
        ),
    ] = None,
    text: Annotated[
        Path | None,
        typer.Option(
            help="UTF-8 text to evaluate on (default: the held-out Python files of the reference model's corpus)."
        ),
    ] = None,
    bits: Annotated[
        list[str] | None,
        typer.Option("--bits", help="Expert bit widths to evaluate: 4, 2 or 4,2 (default: all present)."),
    ] = None,
    k: Annotated[
        list[str] | None,
        typer.Option("--k", help="Experts per token to evaluate, e.g. --k 8,4,2,1 (default: the model's)."),
    ] = None,
    tokens: Annotated[
        int, typer.Option(help="Evaluate at most this many tokens of the text.")
    ] = 8192,  # runtime.eval's defaults
    ctx: Annotated[
        int, typer.Option(help="Window length; each window runs from a fresh state, its second half is scored.")
    ] = 512,
    calls: Annotated[
        int,
        typer.Option(help="Also complete N held-out lines cut before a call's '(' and count well-formed completions."),
    ] = 0,
    reference_bits: Annotated[int, typer.Option(help="Expert bit width of a packed reference.")] = 4,
    save_reference: Annotated[
        Path | None,
        typer.Option(
            help="Write the reference's logits (float32, full vocabulary, the scored positions) to this .npz for later runs."
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="Compute backend of the packed models: cpu, torch or mlx.")] = "cpu",
    device: Annotated[str | None, typer.Option(help="Device of the backend (torch: cpu, cuda; mlx: gpu, cpu).")] = None,
    threads: options.Threads = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Perplexity, KL divergence, same-top-token rate and Δp of each bit width and K against a reference (as llama.cpp's KL report)."""
    from fmoe.runtime.eval import check_eval_options

    bit_list = parse_ints("--bits", bits, (4, 2))
    k_list: list[int | None] = list(parse_ints("--k", k)) or [None]
    check_eval_options(ctx, tokens, calls)
    if reference_bits not in (4, 2):
        raise FmoeError(f"--reference-bits {reference_bits}: must be 4 or 2")
    if reference is not None and not reference.exists():
        raise FmoeError(f"--reference {reference}: no such file or directory")
    if save_reference is not None and save_reference.suffix != ".npz":
        raise FmoeError(f"--save-reference {save_reference}: must end in .npz")
    options: dict[str, Any] = {"backend": backend, "device": device}
    if threads is not None:
        options["threads"] = threads
    report = _run(packed, reference, text, bit_list, k_list, tokens, ctx, calls, reference_bits, save_reference,
                  options, as_json)  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    else:
        from rich.console import Console

        from fmoe.cli.console import console

        # a table of 12 columns: wider than 80 when written to a file or a pipe
        (console if console.is_terminal else Console(width=160)).print(render(report))


def _run(
    packed: Path,
    reference: Path | None,
    text: Path | None,
    bits: list[int],
    ks: list[int | None],
    tokens: int,
    ctx: int,
    calls: int,
    reference_bits: int,
    save_reference: Path | None,
    options: dict[str, Any],
    quiet: bool,
) -> dict[str, Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from fmoe.cli.console import err_console
    from fmoe.runtime.eval import evaluate

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=err_console, transient=True, disable=quiet) as bar:
        task = bar.add_task("eval", total=None)

        def step(label: str) -> None:
            bar.update(task, description=f"eval: {label}", advance=1)

        return evaluate(
            packed,
            reference=reference,
            reference_bits=reference_bits,
            text=text,
            bits=bits,
            ks=ks,
            tokens=tokens,
            ctx=ctx,
            calls=calls,
            save_reference=save_reference,
            load_options=options,
            progress=step,
        )


def render(report: dict[str, Any]) -> Any:
    """The report as a Rich table, one row per variant."""
    from rich.table import Table

    ref = report["reference"]
    packed = sorted({f"{r['packed']} (dense {r['dense_bits']}-bit)" for r in report["variants"]})
    title = (
        f"{', '.join(packed)}: {report['positions']} scored positions ({report['windows']} windows of "
        f"{report['ctx']} tokens) of {report['text']}\nreference: {ref['label']}, PPL {ref['ppl']:.4f}"
    )
    if "calls" in ref:
        title += f", well-formed calls {ref['calls']['well_formed']:.0%}"
    table = Table(title=title)
    calls = any("calls" in r for r in report["variants"])
    heads = ["variant", "PPL", "ln(PPL/ref)", "KL mean", "KL median", "KL p99", "KL max", "same top", "Δp", "Δp top"]
    heads += ["calls ok", "as ref"] if calls else []
    for h in heads:
        table.add_column(h, justify="left" if h == "variant" else "right")
    for r in report["variants"]:
        cells = [
            f"q{r['bits']} K={r['k']}",
            f"{r['ppl']:.4f}",
            f"{r['ln_ppl_ratio']:+.4f}",
            f"{r['kl_mean']:.5f} ± {r['kl_mean_se']:.5f}",
            f"{r['kl_median']:.5f}",
            f"{r['kl_p99']:.4f}",
            f"{r['kl_max']:.4f}",
            f"{r['same_top']:.1%} ± {r['same_top_se']:.1%}",
            f"{r['dp_mean']:+.2%}",
            f"{r['dp_top_mean']:+.2%}",
        ]
        if calls:
            c = r.get("calls", {})
            cells += [f"{c.get('well_formed', 0):.0%}", f"{c.get('as_reference', 0):.0%}"]
        table.add_row(*cells)
    return table
