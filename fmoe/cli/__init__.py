"""The `fmoe` command line. Each command lives in its own small module under fmoe/cli/ and imports
its implementation lazily, so `fmoe --help` stays fast."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import typer

from fmoe.errors import FmoeError

app = typer.Typer(
    name="fmoe",
    help="Run Qwen3.5-MoE models far larger than memory: dense weights resident, experts streamed from SSD.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def command(
    name: str, *, group: typer.Typer | None = None, **kwargs: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Register a command (on ``group``, default the top level) whose FmoeError becomes one red line
    on stderr and a non-zero exit."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except FmoeError as exc:
                from rich.markup import escape

                from fmoe.cli.console import err_console

                err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
                raise typer.Exit(exc.exit_code) from None

        (group or app).command(name, **kwargs)(run)
        return func

    return decorate


# Importing the command modules registers them (each is small; implementations load lazily).
from fmoe.cli import bench_commands, convert_commands, runtime_commands  # noqa: E402, F401


def main() -> None:
    app()
