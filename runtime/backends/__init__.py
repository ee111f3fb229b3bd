"""Backends: providers of the model's ops (base.py has the contract). Each is imported only when
chosen, so the base install never imports torch or mlx."""

from __future__ import annotations

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

from fmoe.errors import FmoeError

if TYPE_CHECKING:
    from fmoe.runtime.backends.base import Backend

# name -> (module, class, the package that module needs, how to install it)
BACKENDS: dict[str, tuple[str, str, str | None, str]] = {
    "cpu": ("fmoe.runtime.backends.cpu", "CpuBackend", None, ""),
    "torch": ("fmoe.runtime.backends.torch_backend", "TorchBackend", "torch", "pip install 'fmoe[cuda]'"),
    "mlx": ("fmoe.runtime.backends.mlx_backend", "MlxBackend", "mlx", "pip install 'fmoe[metal]' (Linux: 'mlx[cpu]')"),
}


def make_backend(name: str, device: str | None = None, **options: Any) -> Backend:
    """The backend ``name`` on ``device`` (None: the backend's default); one-line errors for an
    unknown name, a device the backend does not drive, or a missing package."""
    if name not in BACKENDS:
        raise FmoeError(f"--backend {name!r}: unknown backend (available: {', '.join(BACKENDS)})")
    module, cls, needs, install = BACKENDS[name]
    if needs is not None and importlib.util.find_spec(needs) is None:
        raise FmoeError(f"--backend {name}: needs the {needs} package ({install})")
    backend_cls = getattr(importlib.import_module(module), cls)
    if name == "cpu":
        if device not in (None, "cpu"):
            raise FmoeError(f"--device {device}: the cpu backend runs on the cpu only (try --backend torch)")
        return backend_cls(**options)
    return backend_cls(device=device, **options)
