"""Benchmarks: `fmoe bench kernels`, `fmoe bench model` (tables to stdout, `--json` for scripts)."""

from __future__ import annotations

import typer

from fmoe.cli import app

bench_app = typer.Typer(help="Benchmarks (print a table; results go in docs/PERFORMANCE.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")
