"""fmoe: run Qwen3.5-MoE models far larger than memory, experts streamed from SSD."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from fmoe.runtime.engine.engine import Engine


def load(packed_dir: Any, bits: int = 4, backend: str = "cpu", k: int | None = None, **options: Any) -> Engine:
    """Load a packed model (from `fmoe extract` + `fmoe repack`) for inference. ``options``: see
    :func:`fmoe.runtime.loader.load_model` (device, cache_bytes, checks, max_context, ...)."""
    from fmoe.runtime.loader import load_model

    return load_model(packed_dir, bits=bits, backend=backend, k=k, **options)


__all__ = ["__version__", "load"]
