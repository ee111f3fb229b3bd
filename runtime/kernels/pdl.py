"""Programmatic dependent launch (PDL) for the Triton kernels on Hopper and later GPUs.

At batch 1 a decode step is a chain of short kernels (about 17 a layer), and each one normally
starts only after the one before it has finished and its writes are flushed: the gap between two
kernels is a launch's latency. Launched with PDL (CUDA 12, compute capability 9.0 or later), a
kernel may start while the previous kernel's last programs still run. Every kernel here begins
with :func:`pdl_start`: it lets the next kernel launch, then waits until the previous kernel has
completed and its memory is visible, before it reads or writes anything, so results are those of
plain launches (the wait also covers every earlier kernel: the previous one waited for its own
predecessor before finishing). Kernels of other libraries launch as before; one that follows ours
waits for it to finish.

Only launches inside :func:`launches` use it: the decode step captured as one CUDA graph, every
expert resident or read in place from host rows (runtime/engine/cuda_graph.py). Measured on an H200
(docs/PERFORMANCE.md), it made that graph about 4% faster, and a decode cut around a copying cache
(graphs cut at every layer, copies and read-backs between them) about 9% slower, so the latter
launches plainly. ``FMOE_PDL=0`` turns it
off everywhere (for side-by-side measurements).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os
from collections.abc import Iterator

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - torch without Triton (macOS): no kernels here to launch
    triton = None
try:  # Triton 3.3 and later
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: plain launches
    gdc_launch_dependents = gdc_wait = None

_ENABLED = os.environ.get("FMOE_PDL", "1") != "0" and gdc_wait is not None
_IN_SCOPE: contextvars.ContextVar[bool] = contextvars.ContextVar("fmoe_pdl", default=False)


@contextlib.contextmanager
def launches(on: bool = True) -> Iterator[None]:
    """Kernels launched (or captured) inside use PDL where the device has it (``on``: else plain launches)."""
    token = _IN_SCOPE.set(on)
    try:
        yield
    finally:
        _IN_SCOPE.reset(token)


if triton is not None:

    @triton.jit
    def pdl_start(PDL: tl.constexpr):
        """First statement of every kernel: with PDL, let the next kernel launch, then wait for the previous one."""
        if PDL:
            gdc_launch_dependents()
            gdc_wait()


@functools.cache
def _capable(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (9, 0)


def pdl(device: torch.device) -> dict[str, bool]:
    """Launch keywords for a kernel on ``device``: its ``PDL`` constexpr, and Triton's ``launch_pdl``
    with it when on (a Triton without that option never sees it): on inside :func:`launches` for
    CUDA devices of compute capability 9.0 or later, unless ``FMOE_PDL=0``."""
    on = _ENABLED and _IN_SCOPE.get() and device.type == "cuda"
    on = on and _capable(torch.cuda.current_device() if device.index is None else device.index)
    return {"PDL": True, "launch_pdl": True} if on else {"PDL": False}
