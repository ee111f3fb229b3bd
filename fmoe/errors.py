"""The one exception type for a user's mistake or a bad file: the CLI prints it as one line."""

from __future__ import annotations


class FmoeError(Exception):
    """A clear, one-line error about an input (file, tensor, option) and what is wrong with it.

    The CLI prints ``str(error)`` and exits with ``exit_code``; it never shows a traceback for these.
    """

    exit_code = 1

    def __init__(self, message: str, *, exit_code: int | None = None) -> None:
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class CorruptionError(FmoeError):
    """Data failed a length or checksum check: never computed on."""

    exit_code = 3
