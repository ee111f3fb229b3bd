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
    """Register a command (on ``group``, default the top level) whose FmoeError, or OSError (a path
    that cannot be read or written), becomes one red line on stderr and a non-zero exit."""

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(func)
        def run(*args: Any, **kw: Any) -> Any:
            try:
                return func(*args, **kw)
            except FmoeError as exc:
                _error_line(str(exc))
                raise typer.Exit(exc.exit_code) from None
            except OSError as exc:
                where = f"{exc.filename}: " if exc.filename is not None else ""
                _error_line(f"{where}{exc.strerror or exc}")
                raise typer.Exit(1) from None

        (group or app).command(name, **kwargs)(run)
        return func

    return decorate


def _error_line(message: str) -> None:
    from rich.markup import escape

    from fmoe.cli.console import err_console

    err_console.print(f"[bold red]error:[/] {escape(message)}", highlight=False, soft_wrap=True)


# Importing the command modules registers them (each is small; implementations load lazily).
from fmoe.cli import (  # noqa: E402, F401
    bench_commands,
    chat_commands,
    convert_commands,
    eval_commands,
    plan_commands,
    runtime_commands,
    serve_commands,
)


def main() -> None:
    """Run the CLI. Usage mistakes (a bad option value, an unknown option, a missing argument) are
    one line too, naming the command and the option, instead of Click's usage panel."""
    import signal
    import sys

    try:
        code = app(standalone_mode=False)
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:
        # Click's ClickException (Typer vendors Click, so it is matched by its interface).
        if not (hasattr(exc, "format_message") and hasattr(exc, "exit_code")):
            raise
        if type(exc).__name__ == "Abort" or isinstance(exc.__context__, KeyboardInterrupt):
            code = 130
        elif type(exc).__name__ == "NoArgsIsHelpError":  # the help was printed already
            code = exc.exit_code
        else:
            ctx = getattr(exc, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            _error_line(f"{where}{exc.format_message()} (see --help)")
            code = exc.exit_code
    # the command is over (its artifacts committed or cleanly abandoned): a Ctrl-C that arrives now,
    # during the interpreter's shutdown, has nothing left to stop and must not print a traceback
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    sys.exit(code if isinstance(code, int) else 0)
