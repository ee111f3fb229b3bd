"""The CUDA C decode matvec on int8 activations (runtime/kernels/cuda_matvec.py,
shaders/cuda/qmatvec_int8.cu): on a CUDA device against the float64 emulation of the int8 rounding
and against the Triton kernel it stands in for; everywhere, the choices that decide when it runs
(formats, blocks, availability, falling back to Triton).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pytest

if TYPE_CHECKING:
    import torch
else:
    torch = pytest.importorskip("torch")
pytest.importorskip("triton")

from test_triton_int8 import emulation, read_input, unit_rows
from test_triton_kernels import DEVICE, dev, host, torch_quant

from fmoe.formats.quant import quantize
from fmoe.runtime.kernels import cuda_matvec as cm
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
    assert cm.blocks(4, 4096) == cm.Blocks(2, 8)  # 512 words: four vectors a lane, two rows a warp
    assert cm.blocks(4, 8192) == cm.Blocks(1, 8)
    assert cm.blocks(2, 8192) == cm.Blocks(2, 8)
    assert cm.blocks(4, 4096).rows_per_block == 16


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
