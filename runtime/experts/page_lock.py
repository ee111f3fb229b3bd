"""Page-locking host buffers for a CUDA device, and undoing it safely.

Both expert tiers that reach into host memory page-lock it (``cudaHostRegister``): the device cache
so that its misses are copied by DMA at the link's rate, the placed experts so that the kernels can
read their host rows in place. The registration must be undone before the buffer's memory is freed:
otherwise the driver keeps translating the old pages and a later copy from memory reused at the same
address fails (seen in the GPU tests). So the undoing is tied to the owner's lifetime as well as to
an explicit close, and the finalizer holds the buffer until then.
"""

from __future__ import annotations

import weakref
from typing import Any

import numpy as np
import torch


def page_lock(owner: object, host: np.ndarray, device: torch.device) -> weakref.finalize | None:
    """Page-lock ``host`` for ``device``; returns the finalizer that unregisters it (call it to do so
    now; it also runs when ``owner`` is collected or at exit), or None when the driver refused (too
    little memory, or the locked-memory limit), with the failure cleared so that the next launch does
    not report it."""
    cudart = torch.cuda.cudart()
    if int(cudart.cudaHostRegister(host.ctypes.data, host.nbytes, 0)) == 0:
        return weakref.finalize(owner, _unregister, device, host)
    torch.cuda.synchronize(device)
    cudart.cudaGetLastError()
    return None


def _unregister(device: torch.device, host: Any) -> None:
    """Unregister ``host`` once the device's queued work, which may still read it, is done."""
    torch.cuda.synchronize(device)
    torch.cuda.cudart().cudaHostUnregister(host.ctypes.data)
