"""Conversion commands: synth, download, extract, repack, verify, info."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from fmoe.cli import command
from fmoe.cli.console import console, err_console
from fmoe.errors import FmoeError


def print_json(data: object) -> None:
    typer.echo(json.dumps(data, indent=1, default=str))


def print_result(report: dict, as_json: bool, summary: str) -> None:
    """A command's result: the whole report as JSON, or one summary line."""
    if as_json:
        print_json(report)
    else:
        console.print(summary)


@command("synth")
def synth(
    out: Annotated[Path, typer.Argument(help="Directory to write the synthetic source checkpoint into.")],
    preset: Annotated[
        str,
        typer.Option(
            help="Geometry: tiny, qwen3.5-35b-a3b, qwen3.5-122b-a10b, qwen3.5-397b-a17b, qwen3.6-35b-a3b, qwen3.8-2.4t-a95b."
        ),
    ] = "tiny",
    layers: Annotated[int | None, typer.Option(help="Keep only the first N layers of the geometry.")] = None,
    experts: Annotated[int | None, typer.Option(help="Keep only N experts per layer.")] = None,
    seed: Annotated[int, typer.Option(help="Random seed (same seed, same bytes).")] = 0,
    layout: Annotated[
        str,
        typer.Option(
            help="official (fused experts), official-per-expert, mlx (4-bit), fp8 (block-FP8 release), fp8-fused."
        ),
    ] = "official",
    on_grid: Annotated[
        bool, typer.Option("--on-grid", help="Expert weights exactly on the 4-bit grid (lossless repack).")
    ] = False,
    shard_size: Annotated[str, typer.Option(help="Target safetensors shard size, e.g. 2GB, 500MB.")] = "2GB",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write a random-weight source checkpoint in a real release layout (for tests and demos)."""
    from fmoe.convert.synth import synthesize

    report = synthesize(
        out,
        preset=preset,
        layers=layers,
        experts=experts,
        seed=seed,
        layout=layout,
        on_grid=on_grid,
        shard_size=shard_size,
    )
    print_result(report, as_json, f"wrote {report['bytes'] / 1e6:.1f} MB to {out}")


@command("download")
def download(
    repo: Annotated[str, typer.Argument(help="Hub repo id (org/name) or an alias from manifests/repos.json.")],
    revision: Annotated[str, typer.Option(help="Branch, tag or commit sha; resolved and recorded as a sha.")] = "main",
    dir: Annotated[Path | None, typer.Option("--dir", help="Target directory (default: ./models/<name>).")] = None,
    endpoint: Annotated[str | None, typer.Option(envvar="HF_ENDPOINT", help="Hub endpoint URL.")] = None,
    token: Annotated[str | None, typer.Option(envvar="HF_TOKEN", help="Hub token for gated repos.")] = None,
    include_mtp: Annotated[bool, typer.Option(help="Also fetch shards holding only vision/MTP tensors.")] = False,
    workers: Annotated[int, typer.Option(help="Parallel downloads.")] = 4,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Fetch a checkpoint (only what the engine needs), pinned to a commit, resumable, sha256-verified."""
    from fmoe.convert.download import download as run_download

    report = run_download(
        repo, revision=revision, target=dir, endpoint=endpoint, token=token, include_unused=include_mtp, workers=workers
    )
    print_result(
        report,
        as_json,
        f"{report['repo']}@{report['sha']}: {report['files']} files, {report['bytes'] / 1e9:.2f} GB in {report['dir']}",
    )


OVERWRITE_HELP = (
    "Redo the artifacts even when they are whole, and let this source take over a directory made from "
    "another one (that one's artifacts are dropped)."
)
NONFINITE_HELP = "Convert weights holding NaN/Inf instead of refusing them (recorded in the manifest)."


def interrupted(out: object) -> FmoeError:
    """Ctrl-C during a conversion: one line and exit 130; the same command resumes."""
    return FmoeError(f"{out}: interrupted; run the same command again to resume", exit_code=130)


def warn_nonfinite(found: dict) -> None:
    """One line on stderr when --allow-nonfinite let NaN/Inf weights through."""
    if found:
        err_console.print(
            f"[bold yellow]warning:[/] NaN/Inf values in {len(found)} tensor(s)/expert file(s), converted as "
            "--allow-nonfinite asked (listed under 'nonfinite' in the manifest)",
            highlight=False,
            soft_wrap=True,
        )


@command("extract")
def extract(
    source: Annotated[Path, typer.Argument(help="Source checkpoint directory (official BF16 or MLX layout).")],
    out: Annotated[Path | None, typer.Option("--out", help="Packed directory (default: SOURCE-packed).")] = None,
    dense_bits: Annotated[
        int, typer.Option(help="16 keeps bf16; 8 or 4 use affine group-64 (router and shared gate stay 8).")
    ] = 4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help=NONFINITE_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write the non-expert weights to model_weights.bin + model_weights.json, with tokenizer and config."""
    from fmoe.convert.extract import extract as run_extract

    try:
        report = run_extract(source, out, dense_bits=dense_bits, overwrite=overwrite, allow_nonfinite=allow_nonfinite)
    except KeyboardInterrupt:
        raise interrupted(out or source) from None
    warn_nonfinite(report["nonfinite"])
    print_result(report, as_json, f"{report['tensors']} tensors, {report['bytes'] / 1e6:.1f} MB -> {report['path']}")


@command("repack")
def repack(
    source: Annotated[
        Path, typer.Argument(help="Source checkpoint, or a packed directory (requantise its 4-bit experts).")
    ],
    bits: Annotated[int, typer.Option(help="Expert bit width: 4 or 2.")],
    out: Annotated[Path | None, typer.Option("--out", help="Packed directory (default: SOURCE-packed).")] = None,
    workers: Annotated[int, typer.Option(help="Parallel worker threads (default: all cores).")] = 0,
    overwrite: Annotated[bool, typer.Option("--overwrite", help=OVERWRITE_HELP)] = False,
    allow_nonfinite: Annotated[bool, typer.Option("--allow-nonfinite", help=NONFINITE_HELP)] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Write one 4 KiB-aligned file per expert with a checksummed manifest."""
    from fmoe.convert.repack import repack as run_repack

    try:
        report = run_repack(
            source, out, bits=bits, workers=workers, overwrite=overwrite, allow_nonfinite=allow_nonfinite
        )
    except KeyboardInterrupt:
        raise interrupted(out or source) from None
    warn_nonfinite(report["nonfinite"])
    print_result(
        report,
        as_json,
        f"{report['experts']} experts at {bits} bits, {report['bytes'] / 1e9:.2f} GB -> {report['path']}",
    )


@command("verify")
def verify(
    packed: Annotated[Path, typer.Argument(help="Packed directory to check.")],
    deep: Annotated[
        bool, typer.Option("--deep", help="Also dequantise a sample of experts against the source.")
    ] = False,
    source: Annotated[
        Path | None, typer.Option(help="Source checkpoint for --deep (default: the one recorded).")
    ] = None,
    workers: Annotated[int, typer.Option(help="Parallel hashing threads (default: all cores).")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Check every artifact file: presence, sizes, shapes, xxh3_128; exit non-zero listing bad files."""
    from fmoe.convert.verify import verify as run_verify

    try:
        report = run_verify(packed, deep=deep, source=source, workers=workers)
    except KeyboardInterrupt:
        raise FmoeError(f"{packed}: verify interrupted", exit_code=130) from None
    if as_json:
        print_json(report)
    else:
        from fmoe.cli.reports import render_verify

        render_verify(report)
    if not report["ok"]:
        raise typer.Exit(1)


@command("info")
def info(
    path: Annotated[Path, typer.Argument(help="A packed directory or a source checkpoint.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Describe what a directory holds: model, geometry, bits, sizes, checksum state."""
    from fmoe.cli.reports import render_info
    from fmoe.convert.info import describe

    report = describe(path)
    if as_json:
        print_json(report)
    else:
        render_info(report)
