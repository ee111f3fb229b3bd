"""fmoe's decode kernels on int8 activations in CUDA C (``shaders/cuda/``), compiled at first use by
NVRTC through torch and launched through the CUDA driver: the dense matvec (:func:`matvecs`) and the
routed experts' gate+up with SwiGLU (:func:`experts_gate_up`) and down with the weighted combine
(:func:`experts_down_combine`). Each is the twin of a Triton kernel in runtime/kernels/triton_moe.py on
``int8=True`` (``--int8-dot``): the same packed matrices and slab rows, the same int8 input rows
(runtime/kernels/triton_int8.py; for 8-bit and 2-bit matrices also rows made for 4-bit ones, read in
place: :func:`reads_rows_made_for`), the same arithmetic summed in another fixed order; triton_moe's
wrappers call these first and keep Triton where they decline (return False).

Why a second language: Triton tiles a matvec as a program that loads its block once and then computes,
and on an H200 a layer's short matrices (8-30 MB) read HBM at 34-48% of its rate (docs/PERFORMANCE.md,
ninth and fifteenth passes); in CUDA C a warp owns whole rows, issues every 16-byte load of them
before its arithmetic, and its register use is set by the source (nineteenth pass: the measured gain).

Nothing here reads device data on the host, so launches can be captured in CUDA graphs. Needs torch's
NVRTC entry point (``torch.cuda._compile_kernel``, torch 2.8 or later) and the driver library; where
either is missing, or ``FMOE_CUDA_C=0``, :func:`available` is False and Triton runs everything. A
compilation that fails warns once and leaves Triton for the rest of the process.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import importlib.resources
import os
import sys
import threading
import warnings
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from fmoe.runtime.kernels.pdl import pdl

if TYPE_CHECKING:
    from fmoe.runtime.backends.torch_backend import TorchQuant
    from fmoe.runtime.kernels.triton_moe import ExpertOffsets

MAX_MATRICES = 4  # matrices of one launch (the kernel's w0..w3)
_WARPS = 8  # warps a block
_MAX_GRID_Y = 65535  # CUDA's limit on a grid's second dimension (the row blocks)


class Blocks(NamedTuple):
    rows: int  # a lane's rows
    warps: int  # warps a block
    lanes: int = 32  # lanes a row (:func:`row_lanes`)

    @property
    def rows_per_block(self) -> int:
        return self.rows * self.warps * (32 // self.lanes)


def supported(bits: int, group_size: int, n_in: int) -> bool:
    """Whether the kernel takes matrices of this format and input width: 16-byte vectors inside one
    group (``group_size * bits`` a multiple of 128) and whole vectors a row."""
    return bits in (2, 4, 8) and group_size > 0 and group_size * bits % 128 == 0 and n_in % group_size == 0


def reads_rows_made_for(bits: int, x_bits: int) -> bool:
    """Whether the kernels' matrices of ``bits`` read int8 input rows made for matrices of ``x_bits``
    (the same groups) in place: their own, or 8-bit and 2-bit ones a 4-bit row (int8_rows.cuh's
    ``input_lanes``), so that a router at 8 bits, or experts at 2, need no int8-input launch of their
    own after a norm that hands over the 4-bit projections' rows."""
    return x_bits == bits or (x_bits == 4 and bits in (2, 8))


def _input_layout(bits: int, x_bits: int | None, group_size: int, n_in: int) -> dict[str, int] | None:
    """The XJ constant for input rows made for ``x_bits`` matrices (none: the matrices' own layout), or
    None where the kernels cannot read such rows for ``bits`` matrices."""
    if x_bits is None or x_bits == bits:
        return {}
    if not (reads_rows_made_for(bits, x_bits) and supported(x_bits, group_size, n_in)):
        return None
    return {"XJ": 8 // x_bits}


def row_lanes(bits: int, n_in: int) -> int:
    """Lanes that own a row of ``n_in`` codes: a warp's 32, or for a row of fewer 16-byte vectors the
    power of two that covers them, so that a warp reads several rows at once instead of leaving lanes
    idle (a 1024-wide row at 2 bits, the 397B's down projection: 16 vectors, two rows a warp)."""
    vectors = n_in * bits // 128
    return 32 if vectors >= 32 else 1 << max(vectors - 1, 0).bit_length()


def blocks(bits: int, n_in: int) -> Blocks:
    """A lane's rows: two while its share of a row is at most four 16-byte vectors (a 4096-wide row at
    4 bits), else one, so that the loads in flight stay within about 32 registers a lane."""
    lanes = row_lanes(bits, n_in)
    vectors_a_lane = -(-(n_in * bits // 128) // lanes)
    return Blocks(2 if vectors_a_lane <= 4 else 1, _WARPS, lanes)


def available(device: torch.device) -> bool:
    """Whether the CUDA C kernels can run on ``device``: a CUDA device, torch's NVRTC entry point, the
    driver library, and not switched off by ``FMOE_CUDA_C=0``."""
    if os.environ.get("FMOE_CUDA_C", "1") == "0" or device.type != "cuda" or torch.version.hip:
        return False
    return hasattr(torch.cuda, "_compile_kernel") and _driver() is not None


@functools.cache
def _driver() -> Any:
    """The CUDA driver library (``cuLaunchKernelEx``), or None."""
    for name in ("nvcuda.dll",) if sys.platform == "win32" else ("libcuda.so.1", "libcuda.so"):
        try:
            return ctypes.CDLL(name)
        except OSError:
            continue
    return None


@functools.cache
def _source(name: str) -> str:
    """``shaders/cuda/<name>`` after the kernels' shared header ``int8_rows.cuh``."""
    files = importlib.resources.files("fmoe.shaders").joinpath("cuda")
    return "".join(files.joinpath(part).read_text(encoding="utf-8") for part in ("int8_rows.cuh", name))


@functools.cache
def _compiled(name: str, kernel: str, defines: tuple[tuple[str, int | str], ...], device_index: int) -> Any:
    """``kernel`` of ``shaders/cuda/<name>`` compiled with these constants for one device (cached)."""
    with torch.cuda.device(device_index):
        compile_kernel = getattr(torch.cuda, "_compile_kernel")  # noqa: B009 (private: typed in some torch builds only)
        return compile_kernel(_source(name), kernel, nvcc_options=[f"-D{k}={v}" for k, v in defines])


def _kernel(name: str, kernel: str, device: torch.device, **defines: int | str) -> Any:
    """The compiled kernel, or None where compiling failed (now or before: Triton from then on)."""
    if _FAILED:
        return None
    try:
        index = torch.cuda.current_device() if device.index is None else device.index
        return _compiled(name, kernel, tuple(defines.items()), index)
    except Exception as e:  # whatever stops the compilation (NVRTC absent, refusing, ...): Triton runs instead
        _fail(e)
        return None


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig (cuLaunchKernelEx, CUDA 12)
    _fields_ = [
        *((f, ctypes.c_uint) for f in ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_bytes")),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_LaunchAttribute)),
        ("num_attrs", ctypes.c_uint),
    ]


_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION


def _launch_config(
    grid: tuple[int, int, int], block: tuple[int, int, int], stream: int, pdl: bool
) -> tuple[_LaunchConfig, _LaunchAttribute]:
    """The launch of ``grid`` x ``block`` on ``stream``, with programmatic dependent launch when ``pdl``:
    the kernel may start while the previous one finishes (it waits for it: ``pdl_wait`` in int8_rows.cuh).
    Returns the config and the attribute it points to (to be kept alive with it)."""
    attr = _LaunchAttribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION)
    attr.value[0] = 1
    return _LaunchConfig(*grid, *block, 0, stream, ctypes.pointer(attr), int(pdl)), attr


_LOCAL = threading.local()  # per thread: launch configs and parameter storage, reused launch to launch
_INT_BITS, _LONG_BITS = (1 << 32) - 1, (1 << 64) - 1


def _parameters(values: list[Any]) -> Any:
    """``kernelParams`` for ``values``: each in an 8-byte slot of storage reused by every launch of as
    many parameters on this thread (the driver copies them at the launch, captured or not), so a launch
    costs about as much host time as a Triton one instead of building a ctypes object per argument."""
    cache = _LOCAL.__dict__.setdefault("parameters", {})
    slots = cache.get(len(values))
    if slots is None:
        store = (ctypes.c_uint64 * len(values))()
        base = ctypes.addressof(store)
        slots = cache[len(values)] = (store, (ctypes.c_void_p * len(values))(*range(base, base + 8 * len(values), 8)))
    slots[0][:] = values
    return slots[1]


def _words(args: list[Any]) -> list[int]:
    """Each kernel argument as the 8-byte slot the driver reads it from: a tensor's data pointer, an
    ``int`` as a C int (its low 4 bytes), a ``ctypes.c_longlong``, None as a null pointer."""
    return [
        a.data_ptr() if isinstance(a, torch.Tensor) else a & _INT_BITS if isinstance(a, int)
        else 0 if a is None else a.value & _LONG_BITS
        for a in args
    ]  # fmt: skip


def launch(
    fn: Any, device: torch.device, grid: tuple[int, int, int], block: tuple[int, int, int], args: list[Any], pdl: bool
) -> None:
    """``cuLaunchKernelEx`` of ``fn`` (a compiled kernel: ``.func``) on torch's current stream of ``device``.
    ``args``: tensors (their data pointers), ``int`` (a C int), ``ctypes.c_longlong`` (a C long long) or
    None (a null pointer); ``pdl``: as a programmatic dependent launch (the kernel compiled with ``PDL=1``)."""
    words = _words(args)
    stream = torch.cuda.current_stream(device).cuda_stream
    configs = _LOCAL.__dict__.setdefault("configs", {})
    key = (grid, block, stream, pdl)
    config = configs.get(key)
    if config is None:
        config = configs[key] = _launch_config(grid, block, stream, pdl)
    func = fn.func if isinstance(fn.func, ctypes.c_void_p) else ctypes.c_void_p(fn.func)  # torch's: a c_void_p
    current = torch.cuda.current_device()
    with contextlib.nullcontext() if device.index in (None, current) else torch.cuda.device(device):
        err = _driver().cuLaunchKernelEx(ctypes.byref(config[0]), func, _parameters(words), None)
    if err:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUDA error {err}")


def _run(
    source: str, kernel: str, device: torch.device, grid: tuple[int, int, int], warps: int, args: list[Any],
    **defines: int | str,
) -> bool:  # fmt: skip
    """``kernel`` of ``shaders/cuda/<source>`` compiled (once) with these constants and launched on
    ``grid`` blocks of ``warps`` warps, with PDL where :mod:`pdl` has it on; False (nothing launched)
    where the grid exceeds CUDA's row-block limit or compiling failed. A grid of no blocks launches nothing."""
    if grid[1] > _MAX_GRID_Y:
        return False
    on = pdl(device)["PDL"]
    fn = _kernel(source, kernel, device, **defines, WARPS=warps, PDL=int(on))
    if fn is None:
        return False
    if all(grid):
        launch(fn, device, grid, (32 * warps, 1, 1), args, on)
    return True


def matvecs(xq: torch.Tensor, ws: list[TorchQuant], outs: list[torch.Tensor], x_bits: int | None = None) -> bool:
    """``outs[m] = x @ ws[m].T`` for up to :data:`MAX_MATRICES` matrices of one format and input width,
    ``xq`` the int8 input rows of ``x`` ``[T, X_WORDS]`` (triton_int8's ``int8_input``; made for
    matrices of ``x_bits`` and the same groups where given: :func:`reads_rows_made_for`), each output
    float32 ``[T, rows]``, in one launch; False (nothing launched) where this kernel cannot take them:
    not :func:`available`, not :func:`supported`, too many row blocks, or a compilation that failed
    (NVRTC missing or refusing: the caller keeps Triton, and so do later calls)."""
    if not 0 < len(ws) <= MAX_MATRICES or len(outs) != len(ws):
        raise ValueError(f"cuda_kernels.matvecs: 1 to {MAX_MATRICES} matrices and as many outputs, got {len(ws)}")
    w0 = ws[0]
    n_in, bits, gs = w0.shape[1], w0.bits, w0.group_size
    layout = _input_layout(bits, x_bits, gs, n_in)
    if not available(xq.device) or not supported(bits, gs, n_in) or layout is None:
        return False
    if not all(_aligned(t) for t in (xq, *(w.weight for w in ws))):  # 16-byte vector loads of every row
        return False
    if 4 * xq.shape[1] > _STATIC_SHARED:
        return False
    blk = blocks(bits, n_in)
    rows = [w.shape[0] for w in ws] + [0] * (MAX_MATRICES - len(ws))
    grid = (xq.shape[0], sum(-(-r // blk.rows_per_block) for r in rows), 1)
    pad = lambda seq: [*seq, *[seq[0]] * (MAX_MATRICES - len(seq))]  # noqa: E731
    ws4, outs4 = pad(ws), pad(outs)
    args: list[Any] = [xq, *(w.weight for w in ws4), *(w.scales for w in ws4), *(w.biases for w in ws4), *outs4, *rows]
    return _run("qmatvec_int8.cu", "qmatvec_int8", xq.device, grid, blk.warps, args, BITS=bits, GS=gs,
                NW=n_in * bits // 32, X_WORDS=xq.shape[1], ROWS=blk.rows, RL=blk.lanes, **layout)  # fmt: skip


def _aligned(t: torch.Tensor) -> bool:
    return t.is_contiguous() and t.data_ptr() % 16 == 0 and t.shape[-1] % 4 == 0


_FAILED: list[str] = []  # why compilation failed, once it has (then every call keeps Triton)


def failed() -> bool:
    """Whether a compilation has failed in this process (Triton runs everything since)."""
    return bool(_FAILED)


def _fail(error: Exception) -> None:
    if not _FAILED:
        _FAILED.append(f"{type(error).__name__}: {error}")
        warnings.warn(f"the CUDA C kernels did not compile ({_FAILED[0]}); using the Triton kernels", stacklevel=3)


_MAX_K = 32  # choices a token the down kernel takes
_STATIC_SHARED = 48 << 10  # bytes of static shared memory a block may have: the input rows staged there
_DOWN_WARPS = 8  # the down kernel's warps a block (a warp an output row) ...
_DOWN_MIN_BLOCKS = 2  # ... and the blocks an SM its registers must allow (__launch_bounds__: 1.4x an H200's 1)


def _expert_args(
    slab: torch.Tensor, offsets: ExpertOffsets, ids: torch.Tensor, slot_map: torch.Tensor | None,
    host: torch.Tensor | None,
) -> dict[str, int | str] | None:  # fmt: skip
    """The expert kernels' shared constants, or None where they cannot take these experts: a format
    :func:`supported` at both widths, 16-byte aligned files and matrices, int32/int64 ids and an int32
    slot map."""
    bits, gs = offsets.bits, offsets.group_size
    if not (supported(bits, gs, offsets.hidden) and supported(bits, gs, offsets.inter)):
        return None
    if offsets.file_size % 16 or any(o[0] % 16 for o in (offsets.gate, offsets.up, offsets.down)):
        return None
    if slab.data_ptr() % 16 or (host is not None and host.data_ptr() % 16):
        return None
    if ids.dtype not in (torch.int32, torch.int64) or not ids.is_contiguous():
        return None
    if slot_map is not None and (slot_map.dtype != torch.int32 or not slot_map.is_contiguous()):
        return None
    id_type = "int" if ids.dtype == torch.int32 else "long long"
    return {"BITS": bits, "GS": gs, "HOST": int(host is not None), "MAPPED": int(slot_map is not None), "ID_T": id_type}


def _dense_args(ws: tuple[TorchQuant, ...] | None, n: int) -> list[Any] | None:
    """Pointers to the shared expert's matrices (weight, scales, biases each), nulls for ``n`` absent
    ones, or None where one is not 16-byte aligned."""
    if ws is None:
        return [None] * (3 * n)
    if not all(_aligned(w.weight) for w in ws):
        return None
    return [t for w in ws for t in (w.weight, w.scales, w.biases)]


def experts_gate_up(
    xq: torch.Tensor, slab: torch.Tensor, offsets: ExpertOffsets, ids: torch.Tensor, k: int, h: torch.Tensor,
    slot_map: torch.Tensor | None, shared: tuple[TorchQuant, TorchQuant] | None, host: torch.Tensor | None,
    x_bits: int | None = None,
) -> bool:  # fmt: skip
    """triton_moe's ``experts_gate_up`` on int8 input rows ``xq`` with pair p on row ``p // k`` (the
    decode form; its arguments validated there; ``x_bits`` as in :func:`matvecs`): ``h [P (+ T), inter]``
    written; False where this kernel cannot take them."""
    if not available(xq.device) or not _aligned(xq) or 4 * xq.shape[1] > _STATIC_SHARED:
        return False
    consts = _expert_args(slab, offsets, ids, slot_map, host)
    dense = _dense_args(shared, 2)
    bits, n_in = offsets.bits, offsets.hidden
    layout = _input_layout(bits, x_bits, offsets.group_size, n_in)
    if consts is None or dense is None or layout is None:
        return False
    lanes = row_lanes(bits, n_in)
    # a lane's gate and up rows: two while that is at most eight 16-byte vectors (4096 wide at 4 bits)
    rows = 2 if -(-(n_in * bits // 128) // lanes) <= 2 else 1
    units = [ctypes.c_longlong(o) for o in (offsets.file_size, *offsets.gate, *offsets.up)]
    args = [xq, slab, slab if host is None else host, ids, slot_map, h, *units, *dense, ids.shape[0], k]
    grid = (h.shape[0], -(-offsets.inter // Blocks(rows, _WARPS, lanes).rows_per_block), 1)
    return _run("experts_gate_up_int8.cu", "experts_gate_up_int8", xq.device, grid, _WARPS, args, **consts,
                NW=n_in * bits // 32, X_WORDS=xq.shape[1], INTER=offsets.inter, ROWS=rows, RL=lanes,
                **layout)  # fmt: skip


def experts_down_combine(
    hq: torch.Tensor, slab: torch.Tensor, offsets: ExpertOffsets, ids: torch.Tensor, weights: torch.Tensor,
    shared: torch.Tensor, out: torch.Tensor, slot_map: torch.Tensor | None, shared_down: TorchQuant | None,
    host: torch.Tensor | None,
) -> bool:  # fmt: skip
    """triton_moe's ``experts_down_combine`` on int8 input rows ``hq`` (its arguments validated there):
    ``out [T, hidden]`` written; False where this kernel cannot take them."""
    n_tok, k = ids.shape
    if not available(hq.device) or not _aligned(hq) or not 0 < k <= _MAX_K:
        return False
    if 4 * hq.shape[1] * (k + (shared_down is not None)) > _STATIC_SHARED:  # the token's input rows
        return False
    consts = _expert_args(slab, offsets, ids, slot_map, host)
    dense = _dense_args(None if shared_down is None else (shared_down,), 1)
    if consts is None or dense is None or not (weights.is_contiguous() and shared.is_contiguous()):
        return False
    units = [ctypes.c_longlong(o) for o in (offsets.file_size, *offsets.down)]
    args = [hq, slab, slab if host is None else host, ids, slot_map, weights, shared, out, *units, *dense, n_tok]
    lanes = row_lanes(offsets.bits, offsets.inter)  # a warp's output rows: 32 // lanes
    grid = (n_tok, -(-offsets.hidden // Blocks(1, _DOWN_WARPS, lanes).rows_per_block), 1)
    return _run("experts_down_int8.cu", "experts_down_int8", hq.device, grid, _DOWN_WARPS, args, **consts,
                NW=offsets.inter * offsets.bits // 32, X_WORDS=hq.shape[1], HIDDEN=offsets.hidden, K=k,
                SHARED=int(shared_down is not None), MIN_BLOCKS=_DOWN_MIN_BLOCKS, RL=lanes)  # fmt: skip
