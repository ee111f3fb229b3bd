"""`fmoe plan`: memory, placement and the tokens/s ceiling of a model on this machine (fmoe/plan.py)."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from fmoe.cli import command


@command("plan")
def plan(
    model: Annotated[str, typer.Argument(help="A preset or hub alias, a source checkpoint or a packed directory.")],
    bits: Annotated[int | None, typer.Option(help="Expert bits: 4 or 2 (default: 4, or a packed directory's).")] = None,
    k: Annotated[int | None, typer.Option("--k", help="Experts per token (default: the model's own).")] = None,
    context: Annotated[
        int | None, typer.Option(help="Tokens of context the KV cache holds (default: the model's maximum).")
    ] = None,
    dense_bits: Annotated[
        int | None, typer.Option(help="Dense weights: 16, 8 or 4 bits (default: 4, or a packed directory's).")
    ] = None,
    gpu_mem: Annotated[
        float | None, typer.Option(help="GPU memory to use, GB (default: free memory measured with torch; 0: none).")
    ] = None,
    ram: Annotated[float | None, typer.Option(help="Host memory to use, GB (default: MemAvailable now).")] = None,
    pinned: Annotated[
        float | None,
        typer.Option(help="Host memory for the in-process expert cache, GB (default: all left with a GPU, else 0)."),
    ] = None,
    disk_bw: Annotated[
        float | None, typer.Option(help="Disk read bandwidth, GB/s (default: measured on a packed directory).")
    ] = None,
    link_bw: Annotated[
        float | None, typer.Option(help="Host-to-GPU bandwidth, GB/s (default: measured with torch on CUDA).")
    ] = None,
    ram_bw: Annotated[float | None, typer.Option(help="Host memory bandwidth, GB/s (default: unknown).")] = None,
    gpu_bw: Annotated[
        float | None, typer.Option(help="GPU memory bandwidth, GB/s (default: measured with torch on CUDA).")
    ] = None,
    hit_rate: Annotated[
        float | None, typer.Option(help="Also plan for this fraction of expert reads served from memory (0..1).")
    ] = None,
    host_bits: Annotated[
        int | None,
        typer.Option(help="Experts off the GPU at this width, 4 or 2 (`fmoe run --host-bits`; default: --bits)."),
    ] = None,
    host_compute_bw: Annotated[
        float | None,
        typer.Option(
            help="The host's cores computing page-locked experts, GB/s (`fmoe run --host-compute`; "
            "`fmoe bench` measures it; default: not planned)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """What the model needs (dense, experts, KV and DeltaNet state), where it fits (GPU, pinned host
    memory, page cache, disk), bytes read per token from each tier and the tokens/s ceiling."""
    from fmoe.plan import plan as make_plan
    from fmoe.plan import render

    report = make_plan(
        model,
        bits=bits,
        k=k,
        context=context,
        dense_bits=dense_bits,
        gpu_mem=gpu_mem,
        ram=ram,
        pinned=pinned,
        disk_bw=disk_bw,
        ram_bw=ram_bw,
        gpu_bw=gpu_bw,
        link_bw=link_bw,
        hit_rate=hit_rate,
        host_bits=host_bits,
        host_compute_bw=host_compute_bw,
    )
    if as_json:
        typer.echo(json.dumps(report, indent=1))
        return
    from fmoe.cli.console import console

    for line in render(report):
        console.print(line, highlight=False, markup=False, soft_wrap=True)
