"""The CUDA C decode matvec on int8 activations (runtime/kernels/cuda_kernels.py,
shaders/cuda/qmatvec_int8.cu): on a CUDA device against the float64 emulation of the int8 rounding
and against the Triton kernel it stands in for; everywhere, the choices that decide when it runs
(formats, blocks, availability, falling back to Triton).
"""

from __future__ import annotations

import ctypes
import dataclasses
import functools
import glob
import os
import re
import site
from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from test_triton_int8 import _experts, emulation, read_input, unit_rows
from test_triton_kernels import DEVICE, dev, expert_layout, host, host_slab, torch_quant

from fmoe.formats.quant import quantize
from fmoe.runtime.kernels import cuda_kernels as cm
from fmoe.runtime.kernels import triton_int8 as ti
from fmoe.runtime.kernels import triton_moe as tm

on_cuda = pytest.mark.skipif(not cm.available(DEVICE), reason="needs a CUDA device and NVRTC")

# (bits, n_out, n_in, group size) the kernel takes: odd row counts, rows of fewer vectors than a
# warp's lanes (n_in 256 at 2 bits: 8 vectors), of several vectors a lane (4096 and 8192 at 4 bits)
FORMATS = [(4, 37, 192, 64), (2, 50, 256, 64), (8, 30, 128, 32), (4, 13, 4096, 64), (4, 9, 8192, 64), (4, 3, 128, 32)]


def test_the_formats_it_takes() -> None:
    """A 16-byte vector must lie inside one group: ``group_size * bits`` a multiple of 128."""
    assert cm.supported(4, 64, 4096) and cm.supported(2, 64, 256) and cm.supported(8, 16, 64)
    assert not cm.supported(4, 16, 4096)  # two words a group
    assert not cm.supported(2, 32, 256) and not cm.supported(3, 64, 4096) and not cm.supported(4, 64, 4000)


def test_blocks_keep_a_lanes_loads_within_four_vectors_a_row() -> None:
    assert cm.blocks(4, 4096) == cm.Blocks(2, 8, 32)  # 512 words: four vectors a lane, two rows a lane
    assert cm.blocks(4, 8192) == cm.Blocks(1, 8, 32)
    assert cm.blocks(2, 8192) == cm.Blocks(2, 8, 32)
    assert cm.blocks(4, 4096).rows_per_block == 16


def test_rows_shorter_than_a_warp_share_it() -> None:
    """A row of fewer 16-byte vectors than a warp's lanes takes the power of two that covers them, and
    a warp reads 32 / that many rows at once: no lane idles where a row fills half a warp."""
    assert [cm.row_lanes(2, n) for n in (8192, 4096, 1024, 512, 384, 256, 64)] == [32, 32, 16, 8, 8, 4, 1]
    assert cm.row_lanes(4, 1024) == 32 and cm.row_lanes(4, 512) == 16 and cm.row_lanes(8, 192) == 16
    assert cm.blocks(2, 1024) == cm.Blocks(2, 8, 16) and cm.blocks(2, 1024).rows_per_block == 32
    assert cm.blocks(4, 192).rows_per_block == 2 * 8 * 4  # 6 vectors: 8 lanes a row, 4 rows a warp at once


def test_the_expert_kernels_grids_cover_their_rows(monkeypatch: pytest.MonkeyPatch, rng: np.random.Generator) -> None:
    """The 397B's experts at 2 bits: down's 1024-wide rows fill half a warp, so a block of 8 warps
    covers 16 of the 4096 output rows; gate+up's 4096-wide rows take whole warps, two rows a lane."""
    runs: list[tuple[str, tuple[int, int, int], dict]] = []
    monkeypatch.setattr(cm, "available", lambda device: True)
    monkeypatch.setattr(
        cm, "_run", lambda src, kernel, device, grid, warps, args, **d: runs.append((kernel, grid, d)) or True
    )
    offsets = tm.ExpertOffsets.from_layout(expert_layout(4096, 1024, 2, 64))
    slab = torch.zeros((2, offsets.file_size), dtype=torch.uint8)
    ids = torch.zeros((1, 10), dtype=torch.int64)
    xq = torch.zeros((1, ti.input_row_words(4096, 64)), dtype=torch.int32)  # int8 input rows (no launch)
    hq = torch.zeros((10, ti.input_row_words(1024, 64)), dtype=torch.int32)
    assert cm.experts_gate_up(xq, slab, offsets, ids.reshape(-1), 10, torch.empty((10, 1024)), None, None, None)
    assert cm.experts_down_combine(hq, slab, offsets, ids, torch.ones((1, 10)), torch.zeros((1, 4096)),
                                   torch.empty((1, 4096)), None, None, None)  # fmt: skip
    assert [kernel for kernel, _, _ in runs] == ["experts_gate_up_int8", "experts_down_int8"]
    (_, grid_gu, d_gu), (_, grid_d, d_d) = runs
    assert grid_gu == (10, 1024 // (2 * 8), 1) and (d_gu["RL"], d_gu["ROWS"]) == (32, 2)
    assert grid_d == (1, 4096 // (8 * 2), 1) and d_d["RL"] == 16


def test_which_experts_the_kernels_take(rng: np.random.Generator) -> None:
    """The expert kernels' constants from the slab's format, or a decline: a format whose vectors
    straddle groups, misaligned matrices, ids of another type, a slot map not int32."""
    offsets, _, slab = _experts(rng, 2, 256, 128, 4, 64)
    ids, slot_map = torch.zeros(3, dtype=torch.int64), torch.zeros(2, dtype=torch.int32)
    assert cm._expert_args(slab, offsets, ids, None, None) == {
        "BITS": 4, "GS": 64, "HOST": 0, "MAPPED": 0, "ID_T": "long long"
    }  # fmt: skip
    assert cm._expert_args(slab, offsets, ids.int(), slot_map, slab)["ID_T"] == "int"
    assert cm._expert_args(slab, offsets, ids.int(), slot_map, slab)["MAPPED"] == 1
    assert cm._expert_args(slab, offsets, ids.to(torch.int16), None, None) is None
    assert cm._expert_args(slab, offsets, ids, slot_map.long(), None) is None
    assert cm._expert_args(slab, dataclasses.replace(offsets, gate=(4, *offsets.gate[1:])), ids, None, None) is None
    small_groups, _, slab16 = _experts(rng, 2, 256, 128, 4, 16)
    assert cm._expert_args(slab16, small_groups, ids, None, None) is None


def test_input_rows_beyond_static_shared_memory_are_left_to_triton(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A block stages its input rows in static shared memory (48 KB): wider rows, or more of a
    token's choices than fit, decline before anything is compiled or launched."""
    monkeypatch.setattr(cm, "available", lambda device: True)
    monkeypatch.setattr(cm, "_kernel", lambda *a, **k: pytest.fail("compiled a kernel that cannot fit"))
    wide = torch_quant(quantize(rng.standard_normal((4, 65536)).astype(np.float32), 2, 64))
    xq = torch.zeros((1, 65536 // 4 + 2 * 65536 // 64), dtype=torch.int32)  # 72 KB a row
    assert cm.supported(2, 64, 65536)  # the format alone would be taken
    assert not cm.matvecs(xq, [wide], [torch.empty(1, 4)])
    offsets, _, slab = _experts(rng, 2, 256, 2048, 4, 64)
    hq = torch.zeros((2 * 30, 2048 // 4 + 2 * 2048 // 64), dtype=torch.int32)  # 2.3 KB a row, 30 choices: 69 KB
    ids = torch.zeros((2, 30), dtype=torch.int64)
    weights, out = torch.zeros(2, 30), torch.empty(2, 256)
    assert not cm.experts_down_combine(hq, slab, offsets, ids, weights, torch.zeros(2, 256), out, None, None, None)


def test_a_launch_compiles_once_then_launches_or_declines(monkeypatch: pytest.MonkeyPatch) -> None:
    """The wrappers' common step: a grid past CUDA's row-block limit declines before compiling, a failed
    compilation declines, a grid of no blocks compiles and launches nothing, else one launch with the
    kernel's constants, its warps and the PDL flag both in the constants and the launch."""
    compiled: list[dict] = []
    launched: list[tuple] = []
    monkeypatch.setattr(cm, "_kernel", lambda *a, **defines: compiled.append(defines) or "fn")
    monkeypatch.setattr(cm, "launch", lambda fn, device, grid, block, args, pdl: launched.append((grid, block, pdl)))
    dev_ = torch.device("cuda")
    assert not cm._run("k.cu", "k", dev_, (1, cm._MAX_GRID_Y + 1, 1), 8, [], A=1) and not compiled
    assert cm._run("k.cu", "k", dev_, (0, 3, 1), 8, [], A=1) and len(compiled) == 1 and not launched
    assert cm._run("k.cu", "k", dev_, (2, 3, 1), 4, [], A=1)
    assert compiled[-1] == {"A": 1, "WARPS": 4, "PDL": 0} and launched == [((2, 3, 1), (128, 1, 1), False)]
    monkeypatch.setattr(cm, "_kernel", lambda *a, **defines: None)  # a compilation that failed
    assert not cm._run("k.cu", "k", dev_, (2, 3, 1), 4, [], A=1) and len(launched) == 1


def test_the_launch_config_is_cudas_struct() -> None:
    """CUlaunchConfig / CUlaunchAttribute as the driver lays them out (cuda.h, 64-bit): a wrong offset
    would hand the driver garbage; the PDL attribute only when asked."""
    assert ctypes.sizeof(cm._LaunchAttribute) == 72 and cm._LaunchAttribute.value.offset == 8
    assert ctypes.sizeof(cm._LaunchConfig) == 56
    lc = cm._LaunchConfig
    assert (lc.stream.offset, lc.attrs.offset, lc.num_attrs.offset) == (32, 40, 48)
    config, _attr = cm._launch_config((3, 2, 1), (256, 1, 1), 1234, pdl=True)
    assert (config.grid_x, config.grid_y, config.block_x, config.stream, config.num_attrs) == (3, 2, 256, 1234, 1)
    assert (config.attrs.contents.id, config.attrs.contents.value[0]) == (6, 1)
    assert cm._launch_config((1, 1, 1), (32, 1, 1), 0, pdl=False)[0].num_attrs == 0


def test_kernel_parameters_are_the_values_in_their_slots() -> None:
    """What the driver reads behind each ``kernelParams`` pointer: a tensor's address, a C int (a
    negative one too), a long long, a null pointer; the storage reused by the next launch."""
    t = torch.empty(8)
    words = cm._words([t, 7, -2, ctypes.c_longlong(-3), ctypes.c_longlong(1 << 40), None])
    assert words == [t.data_ptr(), 7, (1 << 32) - 2, (1 << 64) - 3, 1 << 40, 0]
    params = cm._parameters(words)
    assert [ctypes.c_uint64.from_address(params[i]).value for i in range(6)] == words
    assert ctypes.c_int.from_address(params[2]).value == -2  # the driver reads 4 bytes for an int
    assert ctypes.c_longlong.from_address(params[3]).value == -3
    again = cm._parameters([1, 2, 3, 4, 5, 6])
    assert [ctypes.c_uint64.from_address(again[i]).value for i in range(6)] == [1, 2, 3, 4, 5, 6]


def test_off_without_cuda_or_when_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    assert not cm.available(torch.device("cpu"))
    monkeypatch.setenv("FMOE_CUDA_C", "0")
    assert not cm.available(torch.device("cuda"))


def test_the_triton_kernel_runs_where_the_cuda_c_one_does_not(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The dispatch in triton_moe's ``_matvecs``: the CUDA C kernel declining (here on every call)
    leaves the Triton kernel's result, the same as with the CUDA C kernel switched off."""
    asked: list[int] = []
    real = cm.matvecs

    def declining(xq: torch.Tensor, ws: list, outs: list) -> bool:
        asked.append(len(ws))
        return False

    monkeypatch.setattr(cm, "matvecs", declining)
    qts = [torch_quant(quantize(rng.standard_normal((r, 128)).astype(np.float32), 4, 64)) for r in (40, 7)]
    x = dev(unit_rows(rng, 1, 128))
    got = [host(y) for y in tm.qmatvecs(x, qts, int8=True)]
    assert asked == [2]
    monkeypatch.setattr(cm, "matvecs", real)
    monkeypatch.setenv("FMOE_CUDA_C", "0")
    for y, w in zip(got, qts, strict=True):
        np.testing.assert_array_equal(y, host(tm.qmatvec(x, w, int8=True)))


def test_matvecs_read_rows_handed_over_for_other_matrices(
    rng: np.random.Generator, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a norm handed over the 4-bit projections' int8 rows, 8-bit matrices (the router and the
    shared expert's gate) and 2-bit experts' gate+up are given those rows (x_bits 4) and no int8 input
    is made, so the 4-bit rows stay with x for the 4-bit matrices after them (the router's own rows had
    replaced them, and the experts made theirs again); changed in place since, of other groups, or
    where the CUDA C kernel declines, the rows are made in the matrices' own format as before."""
    made: list[tuple[int, int]] = []
    real_input = ti.int8_input
    monkeypatch.setattr(ti, "int8_input", lambda x, bits, gs: made.append((bits, gs)) or real_input(x, bits, gs))
    taken: list[tuple[str, int | None]] = []
    monkeypatch.setattr(cm, "matvecs", lambda xq, ws, outs, x_bits=None: taken.append(("matvecs", x_bits)) or True)
    monkeypatch.setattr(
        cm, "experts_gate_up", lambda *a, x_bits=None, **k: taken.append(("experts_gate_up", x_bits)) or True
    )
    eight = [torch_quant(quantize(rng.standard_normal((r, 128)).astype(np.float32), 8, 64)) for r in (40, 1)]
    x = dev(unit_rows(rng, 1, 128))
    rows4 = torch.zeros((1, ti.input_row_words(128, 64)), dtype=torch.int32)
    ti.hand_over(x, rows4, 4, 64)
    tm.qmatvecs(x, eight, int8=True)
    tm.qmatvec(x, eight[0], int8=True)
    offsets, _, slab = _experts(rng, 2, 128, 64, 2, 64)
    tm.experts_gate_up(slab, offsets, dev(np.array([1, 0])), x, 2, int8=True)
    assert taken == [("matvecs", 4), ("matvecs", 4), ("experts_gate_up", 4)] and not made
    four = torch_quant(quantize(rng.standard_normal((8, 128)).astype(np.float32), 4, 64))
    read: list[torch.Tensor] = []
    monkeypatch.setattr(cm, "matvecs", lambda xq, ws, outs, x_bits=None: read.append(xq) or True)
    tm.qmatvecs(x, [four], int8=True)  # the 8-bit reads left the 4-bit rows with x: taken as they are
    assert len(read) == 1 and read[0] is rows4
    made.clear()
    monkeypatch.setattr(cm, "matvecs", lambda xq, ws, outs, x_bits=None: taken.append(("matvecs", x_bits)) or True)
    x.mul_(1.0)  # changed in place: the rows handed over no longer hold
    tm.qmatvecs(x, eight, int8=True)
    assert taken[-1] == ("matvecs", None) and made == [(8, 64)]
    other_groups = [torch_quant(quantize(rng.standard_normal((8, 128)).astype(np.float32), 8, 32))]
    ti.hand_over(x, torch.zeros((1, ti.input_row_words(128, 64)), dtype=torch.int32), 4, 64)
    tm.qmatvecs(x, other_groups, int8=True)
    assert taken[-1] == ("matvecs", None) and made[-1] == (8, 32)
    monkeypatch.setattr(cm, "matvecs", lambda *a, **k: False)  # declined: the rows made, for Triton's kernel
    made.clear()
    tm.qmatvecs(x, eight, int8=True)
    assert made == [(8, 64)]


@on_cuda
@pytest.mark.parametrize("tokens", [1, 2])
def test_cuda_c_kernels_read_rows_made_for_4_bit_matrices(tokens: int, rng: np.random.Generator) -> None:
    """8-bit matrices (two in a launch, as the router and the shared expert's gate) and 2-bit experts'
    gate+up on the int8 rows made for 4-bit matrices of the same groups: against the float64 emulation
    on the rows made for their own format (the same int8 values and steps; sums in another order),
    and equal to the kernels on those rows within float32 rounding."""
    n, inter, k = 512, 128, 3
    qts = [quantize(rng.standard_normal((r, n)).astype(np.float32), 8, 64) for r in (300, 1)]
    x = dev(unit_rows(rng, tokens, n))
    x4, own8 = ti.int8_input(x, 4, 64), ti.int8_input(x.clone(), 8, 64)
    outs = [torch.full((tokens, qt.shape[0]), float("nan"), device=DEVICE) for qt in qts]
    assert cm.matvecs(x4, [torch_quant(qt) for qt in qts], outs, x_bits=4)
    for qt, y in zip(qts, outs, strict=True):
        for t in range(tokens):
            want = emulation(qt, *read_input(own8[t], n, 8, 64))
            assert np.abs(host(y)[t] - want).max() <= 1e-5 * np.abs(want).max()
    offsets, _, slab = _experts(rng, 4, n, inter, 2, 64)
    flat = dev(rng.integers(0, 4, tokens * k))
    h = torch.full((tokens * k, inter), float("nan"), device=DEVICE)
    assert cm.experts_gate_up(x4, slab, offsets, flat, k, h, None, None, None, x_bits=4)
    h_own = torch.empty_like(h)
    assert cm.experts_gate_up(ti.int8_input(x.clone(), 2, 64), slab, offsets, flat, k, h_own, None, None, None)
    np.testing.assert_allclose(host(h), host(h_own), rtol=1e-5, atol=1e-5 * np.abs(host(h_own)).max())


@on_cuda
@pytest.mark.parametrize(("bits", "n_out", "n_in", "gs"), FORMATS)
@pytest.mark.parametrize("tokens", [1, 3])
def test_cuda_c_matvec_computes_the_int8_rounding(
    bits: int, n_out: int, n_in: int, gs: int, tokens: int, rng: np.random.Generator
) -> None:
    """Against the float64 emulation of what the Triton kernel computes (1e-5 of the largest output),
    and against the Triton kernel itself (the two sum in other orders: within float32 rounding)."""
    qt = quantize(rng.standard_normal((n_out, n_in)).astype(np.float32), bits, gs)
    w = torch_quant(qt)
    x = dev(unit_rows(rng, tokens, n_in))
    xq = ti.int8_input(x, bits, gs)
    y = torch.full((tokens, n_out), float("nan"), device=DEVICE)
    assert cm.matvecs(xq, [w], [y])
    got = host(y)
    for t in range(tokens):
        want = emulation(qt, *read_input(xq[t], n_in, bits, gs))
        assert np.abs(got[t] - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FMOE_CUDA_C", "0")
        triton = host(tm.qmatvec(x, w, int8=True))
    np.testing.assert_allclose(got, triton, rtol=1e-5, atol=1e-5 * np.abs(triton).max())


@on_cuda
def test_cuda_c_matvecs_of_several_matrices_in_one_launch(rng: np.random.Generator) -> None:
    """Four matrices with row blocks ending part-way, each equal to itself alone; the dispatch
    from ``qmatvecs`` takes the CUDA C kernel."""
    rows = [300, 1, 37, 17]
    qts = [torch_quant(quantize(rng.standard_normal((r, 512)).astype(np.float32), 4, 64)) for r in rows]
    x = dev(unit_rows(rng, 2, 512))
    xq = ti.int8_input(x, 4, 64)
    outs = [torch.full((2, r), float("nan"), device=DEVICE) for r in rows]
    assert cm.matvecs(xq, qts, outs)
    for w, y in zip(qts, outs, strict=True):
        alone = torch.empty_like(y)
        assert cm.matvecs(xq, [w], [alone])
        np.testing.assert_array_equal(host(y), host(alone))
    for y, via in zip(outs, tm.qmatvecs(x, qts, int8=True), strict=True):
        np.testing.assert_array_equal(host(y), host(via))


@on_cuda
def test_cuda_c_matvec_in_a_cuda_graph(rng: np.random.Generator) -> None:
    """Captured and replayed on a new input, as the decode graph runs it."""
    qt = quantize(rng.standard_normal((64, 256)).astype(np.float32), 4, 64)
    w = torch_quant(qt)
    x = dev(unit_rows(rng, 1, 256))
    xq = ti.int8_input(x, 4, 64).clone()
    y = torch.empty((1, 64), device=DEVICE)
    cm.matvecs(xq, [w], [y])
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cm.matvecs(xq, [w], [y])
    x2 = dev(unit_rows(rng, 1, 256))
    xq.copy_(ti.int8_input(x2, 4, 64))
    graph.replay()
    torch.cuda.synchronize()
    want = emulation(qt, *read_input(xq[0], 256, 4, 64))
    assert np.abs(host(y)[0] - want).max() <= 1e-5 * np.abs(want).max()


@functools.cache
def _nvrtc() -> ctypes.CDLL | None:
    """NVRTC from an installed NVIDIA wheel (``nvidia/*/lib``: torch's CUDA builds carry one, CI installs
    ``nvidia-cuda-nvrtc``), its builtins loaded first; None where there is none. No GPU needed."""
    for root in site.getsitepackages():
        for lib in sorted(glob.glob(os.path.join(root, "nvidia", "*", "lib", "libnvrtc.so.*"))):
            if ".alt." in lib:
                continue
            for builtins in glob.glob(os.path.join(os.path.dirname(lib), "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            return ctypes.CDLL(lib)
    return None


def nvrtc_compile(source: str, defines: dict) -> tuple[int, str, int]:
    """Compile ``source`` for sm_90 with these ``-D`` constants: (NVRTC's result, its log, cubin bytes)."""
    lib = _nvrtc()
    if lib is None:
        pytest.skip("no NVRTC installed (pip install nvidia-cuda-nvrtc)")
    prog = ctypes.c_void_p()
    assert lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), b"kernel.cu", 0, None, None) == 0
    options = [b"--gpu-architecture=sm_90", *(f"-D{k}={v}".encode() for k, v in defines.items())]
    rc = lib.nvrtcCompileProgram(prog, len(options), (ctypes.c_char_p * len(options))(*options))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    cubin = ctypes.c_size_t()
    lib.nvrtcGetCUBINSize(prog, ctypes.byref(cubin))
    lib.nvrtcDestroyProgram(ctypes.byref(prog))
    return rc, log.value.decode(errors="replace"), cubin.value


@pytest.mark.parametrize(
    ("name", "defines"),
    [
        ("qmatvec_int8.cu", dict(BITS=4, GS=64, NW=512, X_WORDS=1152, ROWS=2, WARPS=8)),
        ("qmatvec_int8.cu", dict(BITS=2, GS=64, NW=40, X_WORDS=96, ROWS=1, WARPS=8, PDL=1, RL=16)),
        ("experts_gate_up_int8.cu",
         dict(BITS=4, GS=64, NW=512, X_WORDS=1152, ROWS=1, WARPS=8, INTER=1024, HOST=1, MAPPED=1, ID_T="long long",
              PDL=1)),
        ("qmatvec_int8.cu", dict(BITS=8, GS=64, NW=1024, X_WORDS=1152, ROWS=1, WARPS=8, PDL=1, XJ=2)),
        ("experts_gate_up_int8.cu",
         dict(BITS=2, GS=64, NW=256, X_WORDS=1152, ROWS=2, WARPS=8, INTER=1024, HOST=1, MAPPED=1, ID_T="int", PDL=1,
              XJ=2)),
        ("experts_down_int8.cu",
         dict(BITS=8, GS=32, NW=256, X_WORDS=320, WARPS=8, MIN_BLOCKS=1, HIDDEN=4096, K=10, SHARED=1, HOST=0, MAPPED=0,
              ID_T="int")),
        ("experts_down_int8.cu",
         dict(BITS=2, GS=64, NW=64, X_WORDS=288, WARPS=4, MIN_BLOCKS=3, HIDDEN=4096, K=3, SHARED=0, HOST=1, MAPPED=1,
              ID_T="int", RL=16)),
    ],
)  # fmt: skip
def test_the_cuda_sources_compile(name: str, defines: dict) -> None:
    """Each kernel's source (after the shared header, as cuda_kernels reads it) through NVRTC for sm_90,
    with and without its options; a broken twin is refused, so the check can fail."""
    src = cm._source(name)
    rc, log, cubin = nvrtc_compile(src, defines)
    assert rc == 0 and cubin > 1000, log
    rc, log, _ = nvrtc_compile(src.replace("dp4a_us(code_lanes", "dp4a_us(code_lanez"), defines)
    assert rc != 0 and "code_lanez" in log
    if "XJ" in defines:  # a layout no branch reads: refused by name
        rc, log, _ = nvrtc_compile(src, {**defines, "XJ": 4 if defines["BITS"] == 8 else 1})
        assert rc != 0 and "XJ" in log


def _byte_perm(x: int, y: int, selector: int) -> int:
    """CUDA's ``__byte_perm``: byte n of the result is byte ``selector``'s nibble n of y:x (little-endian)."""
    pool = (int(x) & 0xFFFFFFFF).to_bytes(4, "little") + (int(y) & 0xFFFFFFFF).to_bytes(4, "little")
    return int.from_bytes(bytes(pool[(selector >> 4 * n) & 7] for n in range(4)), "little")


def _selectors(branch: str) -> list[int]:
    """The distinct byte-permute selectors of ``input_lanes``' branch for ``branch``, in the header's order."""
    src = cm._source("qmatvec_int8.cu")
    body = src[src.index(f"#elif {branch}") :]
    body = body[: body.index("#e", 1)]
    return list(dict.fromkeys(int(m, 16) for m in re.findall(r"0x([0-9A-Fa-f]{4})u?\b", body)))


@pytest.mark.parametrize(("bits", "n"), [(8, 256), (2, 192), (2, 1024)])
def test_the_lanes_gathered_from_a_4_bit_row_are_the_rows_own(bits: int, n: int, rng: np.random.Generator) -> None:
    """``input_lanes`` (int8_rows.cuh) for XJ 2: its byte permutes, with the selectors read from the
    header, applied as it applies them to the row int8_input makes for 4-bit matrices give, word for
    word, the lanes of the row it makes for ``bits`` matrices of the same groups (their steps and sums
    start at the same word). On the CPU: no GPU needed for the layouts' arithmetic."""
    x = dev(unit_rows(rng, 1, n))
    four, own = host(ti.int8_input(x, 4, 64))[0], host(ti.int8_input(x.clone(), bits, 64))[0]
    nv = n * bits // 32 // 4  # the matrices' 16-byte vectors a row
    words = four.astype(np.int64)
    got = []
    if bits == 8:
        s0, s1 = _selectors("BITS == 8 && XJ == 2")
        for v in range(nv):
            a, c = words[2 * v : 2 * v + 2], words[2 * nv + 2 * v : 2 * nv + 2 * v + 2]  # int2s v and NV + v
            got += [_byte_perm(a[0], c[0], s0), _byte_perm(a[0], c[0], s1),
                    _byte_perm(a[1], c[1], s0), _byte_perm(a[1], c[1], s1)]  # fmt: skip
        want = own[: n // 4]
    else:
        low, high = _selectors("BITS == 2 && XJ == 2")
        want = np.concatenate([own[j * (n // 16) : (j + 1) * (n // 16)] for j in range(4)])  # lane rows j
        for j in range(4):
            for v in range(nv):
                base = (j & 1) * 8 * nv + 8 * v  # int4s (j & 1) 2 NV + 2 v and the next: eight words
                a = words[base : base + 8]
                sel = low if j < 2 else high
                got += [_byte_perm(a[2 * i], a[2 * i + 1], sel) for i in range(4)]
    np.testing.assert_array_equal(np.array(got, dtype=np.int64) & 0xFFFFFFFF, want.astype(np.int64) & 0xFFFFFFFF)
    np.testing.assert_array_equal(four[n // 4 : n // 4 + n // 64], own[n // 4 : n // 4 + n // 64])  # the steps


@on_cuda
@pytest.mark.parametrize(("bits", "gs"), [(4, 64), (8, 32), (2, 64)])
@pytest.mark.parametrize("form", ["slots", "mapped+host", "int32 ids+no shared"])
def test_cuda_c_experts_compute_the_int8_rounding(bits: int, gs: int, form: str, rng: np.random.Generator) -> None:
    """gate+up (SwiGLU fused) and down+combine through the CUDA C kernels, called directly (so they
    ran), with an expert computed elsewhere (-1), experts read from a page-locked host slab (slots
    <= -2), expert ids mapped to slots, int32 ids, and the shared expert fused or given as an output:
    against float64 emulations of the inputs' rounding, and against the Triton kernels."""
    hidden, inter, k, tokens = 256, 128, 3, 2
    offsets, mats, slab = _experts(rng, 4, hidden, inter, bits, gs)
    shared = {p: quantize(rng.standard_normal(sh).astype(np.float32), bits, gs)
              for p, sh in (("gate", (inter, hidden)), ("up", (inter, hidden)), ("down", (hidden, inter)))}  # fmt: skip
    experts = np.array([[2, -1, 0], [3, 1, 2]])  # the expert each choice computes (-1: none here)
    ids, slot_map, host_rows = experts, None, None
    if form == "mapped+host":  # ids mapped: 0 and 3 read from the host slab (rows 1, 0), id 4 not here
        ids = np.array([[2, 4, 0], [3, 1, 2]])
        slot_map = dev(np.array([-3, 1, 2, -2, -1], dtype=np.int32))
        host_rows = host_slab(torch.stack([slab[3], slab[0]]))
    id_dtype = np.int32 if form.startswith("int32") else np.int64
    fused = not form.endswith("no shared")
    x = dev(unit_rows(rng, tokens, hidden))
    xq = ti.int8_input(x, bits, gs)
    pair = (torch_quant(shared["gate"]), torch_quant(shared["up"])) if fused else None
    flat = dev(ids.reshape(-1).astype(id_dtype))
    h = torch.full((tokens * k + tokens * fused, inter), float("nan"), device=DEVICE)
    assert cm.experts_gate_up(xq, slab, offsets, flat, k, h, slot_map, pair, host_rows)
    silu = lambda v: v / (1 + np.exp(-v))  # noqa: E731
    got_h = host(h)
    for p in range(h.shape[0]):
        t = p // k if p < tokens * k else p - tokens * k
        xin = read_input(xq[t], hidden, bits, gs)
        if p < tokens * k and experts.flat[p] < 0:
            assert (got_h[p] == 0).all()  # computed elsewhere: adds nothing
            continue
        e = mats[experts.flat[p]] if p < tokens * k else {"gate_proj": shared["gate"], "up_proj": shared["up"]}
        want = silu(emulation(e["gate_proj"], *xin)) * emulation(e["up_proj"], *xin)
        assert np.abs(got_h[p] - want).max() <= 1e-5 * np.abs(want).max()

    hin = dev(unit_rows(rng, h.shape[0], inter))
    hq = ti.int8_input(hin, bits, gs)
    weights = rng.uniform(0.1, 1, (tokens, k)).astype(np.float32)
    base = rng.standard_normal((tokens, 1 if fused else hidden)).astype(np.float32)
    y = torch.full((tokens, hidden), float("nan"), device=DEVICE)
    down = torch_quant(shared["down"]) if fused else None
    ids_t, weights_t, base_t = dev(ids.astype(id_dtype)), dev(weights), dev(base)
    assert cm.experts_down_combine(hq, slab, offsets, ids_t, weights_t, base_t, y, slot_map, down, host_rows)
    for t in range(tokens):
        if fused:
            want = emulation(shared["down"], *read_input(hq[tokens * k + t], inter, bits, gs)) / (1 + np.exp(-base[t]))
        else:
            want = base[t].astype(np.float64)
        for j in range(k):
            if experts[t, j] >= 0:
                want = want + weights[t, j] * emulation(mats[experts[t, j]]["down_proj"],
                                                        *read_input(hq[t * k + j], inter, bits, gs))  # fmt: skip
        assert np.abs(host(y)[t] - want).max() <= 1e-5 * np.abs(want).max()
    with pytest.MonkeyPatch.context() as mp:  # the Triton twins on the same inputs
        mp.setenv("FMOE_CUDA_C", "0")
        tri_h = tm.experts_gate_up(slab, offsets, flat, x, k, slot_map=slot_map, shared=pair, host=host_rows, int8=True)
        tri_y = tm.experts_down_combine(slab, offsets, ids_t, hin, weights_t, base_t, slot_map=slot_map,
                                        shared_down=down, host=host_rows, int8=True)  # fmt: skip
    np.testing.assert_allclose(got_h, host(tri_h), rtol=1e-5, atol=1e-5 * np.abs(host(tri_h)).max())
    np.testing.assert_allclose(host(y), host(tri_y), rtol=1e-5, atol=1e-5 * np.abs(host(tri_y)).max())


@on_cuda
def test_cuda_c_kernels_under_programmatic_dependent_launch(rng: np.random.Generator) -> None:
    """Inside ``pdl.launches()`` (the resident decode graph) the kernels launch with PDL after a Triton
    kernel that writes their input: captured, replayed on a new input, the results are the new input's."""
    from fmoe.runtime.kernels import pdl

    if not pdl.pdl(DEVICE)["PDL"] and not pdl._capable(DEVICE.index or 0):
        pytest.skip("no PDL on this device")
    qt = quantize(rng.standard_normal((300, 512)).astype(np.float32), 4, 64)
    w = torch_quant(qt)
    x = dev(unit_rows(rng, 1, 512))
    xq = torch.empty_like(ti.int8_input(x, 4, 64))
    y = torch.empty((1, 300), device=DEVICE)

    def step() -> None:
        xq.copy_(ti.int8_input(x.add(0.0), 4, 64))  # a fresh tensor each call: its rows are made, not reused
        assert cm.matvecs(xq, [w], [y])

    with pdl.launches():
        step()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            step()
    x.copy_(dev(unit_rows(rng, 1, 512)))
    graph.replay()
    torch.cuda.synchronize()
    want = emulation(qt, *read_input(ti.int8_input(x.add(0.0), 4, 64)[0], 512, 4, 64))
    assert np.abs(host(y)[0] - want).max() <= 1e-5 * np.abs(want).max()


def test_reports_name_the_cuda_c_kernels_where_they_run(monkeypatch: pytest.MonkeyPatch) -> None:
    """``fmoe bench``'s kernels line: Triton alone on the CPU and without ``--int8-dot``; with it on a
    GPU where the CUDA C kernels compile, both; after a failed compilation, Triton again."""
    from fmoe.runtime.backends.torch_backend import TorchBackend

    be = TorchBackend("cpu", kernels="triton", int8=True)
    assert be.kernels_in_use == "triton"
    monkeypatch.setattr(be, "torch_device", torch.device("cuda"))
    monkeypatch.setattr(cm, "available", lambda device: True)
    assert be.kernels_in_use == "triton + CUDA C"
    monkeypatch.setattr(cm, "_FAILED", ["RuntimeError: no NVRTC"])
    assert be.kernels_in_use == "triton"
    be.int8 = False
    monkeypatch.setattr(cm, "_FAILED", [])
    assert be.kernels_in_use == "triton"
