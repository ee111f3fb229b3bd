"""Rich progress for long work: bytes done, rate and ETA, on stderr (live on a terminal; elsewhere
only the final state is printed, or nothing for a transient display)."""

from __future__ import annotations

from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from fmoe.cli.console import err_console


def byte_progress(*, transient: bool = False) -> Progress:
    """A progress display whose tasks count bytes (use ``total=`` in bytes, ``advance=`` bytes)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
    )
