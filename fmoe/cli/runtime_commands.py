"""Runtime commands: run, demo (filled in by the runtime)."""

from __future__ import annotations
