"""The decode matvec on int8 activations in CUDA C (``shaders/cuda/qmatvec_int8.cu``), compiled at first
use by NVRTC through torch and launched through the CUDA driver: the same arithmetic as the Triton
kernel of runtime/kernels/triton_moe.py on ``int8=True`` (``--int8-dot``), on the same packed matrices
and the same int8 input rows (runtime/kernels/triton_int8.py), and a drop-in for it where it measures
faster (docs/PERFORMANCE.md, nineteenth pass).

Why a second language: Triton tiles a matvec as a program that loads its block once and then computes,
and on an H200 the layer's short matrices (8-30 MB) read HBM at 34-48% of its rate; in CUDA C a warp
owns whole rows, issues every 16-byte load of them before its arithmetic, and its register use is
set by the source.

Nothing here reads device data on the host, so launches can be captured in CUDA graphs. Needs torch's
NVRTC entry point (``torch.cuda._compile_kernel``, torch 2.8 or later) and the driver library; where
either is missing, or ``FMOE_CUDA_C=0``, :func:`available` is False and callers keep Triton.
"""

from __future__ import annotations

import ctypes
import functools
import importlib.resources
import os
import sys
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

if TYPE_CHECKING:
    from fmoe.runtime.backends.torch_backend import TorchQuant

MAX_MATRICES = 4  # matrices of one launch (the kernel's w0..w3)
_WARPS = 8  # warps a block
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the row blocks)


class Blocks(NamedTuple):
    rows: int  # rows a warp
    warps: int  # warps a block

    @property
    def rows_per_block(self) -> int:
        return self.rows * self.warps


def supported(bits: int, group_size: int, n_in: int) -> bool:
    """Whether the kernel takes matrices of this format and input width: 16-byte vectors inside one
    group (``group_size * bits`` a multiple of 128) and whole vectors a row."""
    return bits in (2, 4, 8) and group_size > 0 and group_size * bits % 128 == 0 and n_in % group_size == 0


def blocks(bits: int, n_in: int) -> Blocks:
    """A warp's rows: two while a lane's share of a row is at most four 16-byte vectors (a 4096-wide row
    at 4 bits), else one, so that the loads in flight stay within about 32 registers a lane."""
    vectors_a_lane = -(-(n_in * bits // 128) // 32)
    return Blocks(2 if vectors_a_lane <= 4 else 1, _WARPS)


def available(device: torch.device) -> bool:
    """Whether the CUDA C matvec can run on ``device``: a CUDA device, torch's NVRTC entry point, the
    driver library, and not switched off by ``FMOE_CUDA_C=0``."""
    if os.environ.get("FMOE_CUDA_C", "1") == "0" or device.type != "cuda" or torch.version.hip:
        return False
    return hasattr(torch.cuda, "_compile_kernel") and _driver() is not None


@functools.cache
def _driver() -> Any:
    """The CUDA driver library (``cuLaunchKernel``), or None."""
    for name in ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.cache
def _source() -> str:
    return importlib.resources.files("fmoe.shaders").joinpath("cuda/qmatvec_int8.cu").read_text(encoding="utf-8")


@functools.cache
def _kernel(bits: int, group_size: int, n_words: int, x_words: int, blk: Blocks, device_index: int) -> Any:
    """The compiled kernel for one format, row width and input row (cached per device)."""
    with torch.cuda.device(device_index):
        defines = {"BITS": bits, "GS": group_size, "NW": n_words, "X_WORDS": x_words, "ROWS": blk.rows,
                   "WARPS": blk.warps}  # fmt: skip
        compile_kernel = getattr(torch.cuda, "_compile_kernel")  # noqa: B009 (private: typed in some torch builds only)
        return compile_kernel(_source(), "qmatvec_int8", nvcc_options=[f"-D{k}={v}" for k, v in defines.items()])


def launch(fn: Any, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any]) -> None:
    """``cuLaunchKernel`` of ``fn`` (a compiled kernel: ``.func``) on torch's current stream; ``args``:
    tensors (their data pointers), ``int`` (a C int) or ctypes values as they are."""
    values: list[Any] = []
    for a in args:
        if isinstance(a, torch.Tensor):
            values.append(ctypes.c_void_p(a.data_ptr()))
        elif isinstance(a, int):
            values.append(ctypes.c_int(a))
        else:
            values.append(a)
    params = (ctypes.c_void_p * len(values))(*(ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in values))
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    func = fn.func if isinstance(fn.func, ctypes.c_void_p) else ctypes.c_void_p(fn.func)  # torch's: a c_void_p
    err = _driver().cuLaunchKernel(func, *grid, *block, 0, stream, params, None)
    if err:
        raise RuntimeError(f"cuLaunchKernel failed with CUDA error {err}")


def matvecs(xq: torch.Tensor, ws: list[TorchQuant], outs: list[torch.Tensor]) -> bool:
    """``outs[m] = x @ ws[m].T`` for up to :data:`MAX_MATRICES` matrices of one format and input width,
    ``xq`` the int8 input rows of ``x`` ``[T, X_WORDS]`` (triton_int8's ``int8_input``), each output
    float32 ``[T, rows]``, in one launch; False (nothing launched) where this kernel cannot take them:
    not :func:`available`, not :func:`supported`, too many row blocks, or a compilation that failed
    (NVRTC missing or refusing: the caller keeps Triton, and so do later calls)."""
    if not 0 < len(ws) <= MAX_MATRICES or len(outs) != len(ws):
        raise ValueError(f"cuda_matvec.matvecs: 1 to {MAX_MATRICES} matrices and as many outputs, got {len(ws)}")
    w0 = ws[0]
    n_in, bits, gs = w0.shape[1], w0.bits, w0.group_size
    if _FAILED or not available(xq.device) or not supported(bits, gs, n_in):
        return False
    if not all(_aligned(t) for t in (xq, *(w.weight for w in ws))):  # 16-byte vector loads of every row
        return False
    blk = blocks(bits, n_in)
    rows = [w.shape[0] for w in ws] + [0] * (MAX_MATRICES - len(ws))
    grid_y = sum(-(-r // blk.rows_per_block) for r in rows)
    if grid_y > _MAX_GRID_Y:
        return False
    try:
        fn = _kernel(bits, gs, n_in * bits // 32, xq.shape[1], blk, xq.device.index or 0)
    except (RuntimeError, OSError) as e:  # NVRTC absent or refusing: Triton from now on
        _fail(e)
        return False
    pad = lambda seq: [*seq, *[seq[0]] * (MAX_MATRICES - len(seq))]  # noqa: E731
    ws4, outs4 = pad(ws), pad(outs)
    args: list[Any] = [xq, *(w.weight for w in ws4), *(w.scales for w in ws4), *(w.biases for w in ws4), *outs4, *rows]
    launch(fn, (xq.shape[0], grid_y, 1), (32 * blk.warps, 1, 1), args)
    return True


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] % 4 == 0


_FAILED: list[str] = []  # why compilation failed, once it has (then every call keeps Triton)


def _fail(error: Exception) -> None:
    if not _FAILED:
        _FAILED.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"the CUDA C matvec did not compile ({_FAILED[0]}); using the Triton kernels", stacklevel=3)
