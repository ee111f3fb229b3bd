"""Decode attention over a KV cache (runtime/kernels/triton_attention.py) against float64 numpy on
fresh random inputs: on the GPU where torch sees one, else through Triton's interpreter. Bound: the
scores and the weighted values are float32 sums of at most D (respectively a tile's 32) products
and the splits' parts are combined once, so against float64 the error is a few float32 roundings
of the result's size (measured on the CPU: about 1e-7); 1e-5 relative leaves room for exp. A wrong
position, head or split weight moves the result by the size of one value row: far beyond it.
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

from support import causal_gqa64
from test_triton_kernels import DEVICE, dev, host

from fmoe.runtime.kernels import triton_attention as ta


def attention64(q: np.ndarray, k: np.ndarray, v: np.ndarray, first: int, scale: float) -> np.ndarray:
    """The float64 reference over a cache laid out as the kernel reads it, ``k, v [Hkv, capacity, D]``."""
    return causal_gqa64(q, k.transpose(1, 0, 2), v.transpose(1, 0, 2), first, scale)


def cache(rng: np.random.Generator, hkv: int, cap: int, d: int, written: int) -> tuple[np.ndarray, np.ndarray]:
    """Keys and values written up to ``written``; the rest of the room holds large values that must
    never be read (a read would show)."""
    k, v = (rng.standard_normal((hkv, cap, d)).astype(np.float32) for _ in range(2))
    k[:, written:], v[:, written:] = 50.0, 1e4
    return k, v


def near(got: torch.Tensor, want: np.ndarray) -> None:
    y = host(got)
    assert y.shape == want.shape and np.isfinite(y).all()
    assert np.linalg.norm(y - want) / np.linalg.norm(want) < 1e-5


@pytest.mark.parametrize(
    ("hq", "hkv", "d", "cap", "first", "rows"),
    [
        (6, 2, 8, 16, 0, 1),  # a first position
        (6, 2, 8, 40, 9, 1),  # within one tile
        (32, 2, 256, 600, 417, 1),  # the 397B's heads; 418 positions over 14 tiles and splits
        (5, 1, 40, 3000, 2999, 1),  # odd heads and width; the cache full; more tiles than splits
        (2, 2, 16, 100, 37, 3),  # one query head a KV head; three causal rows
        (6, 1, 64, 70, 60, 8),  # the most rows
    ],
)  # fmt: skip
def test_decode_attention_is_causal_gqa_over_the_written_positions(
    hq: int, hkv: int, d: int, cap: int, first: int, rows: int, rng: np.random.Generator
) -> None:
    k, v = cache(rng, hkv, cap, d, first + rows)
    q = rng.standard_normal((rows, hq, d)).astype(np.float32)
    want = attention64(q, k, v, first, d**-0.5)
    near(ta.decode_attention(dev(q), dev(k), dev(v), first, d**-0.5), want)
    pos = torch.tensor(first, dtype=torch.int64, device=DEVICE)  # a CUDA graph's device position
    near(ta.decode_attention(dev(q), dev(k), dev(v), pos, d**-0.5), want)


@pytest.mark.parametrize(
    "graphed", [False, pytest.param(True, marks=pytest.mark.skipif(DEVICE.type != "cuda", reason="needs CUDA"))]
)
def test_decode_attention_reads_the_position_when_it_runs(graphed: bool, rng: np.random.Generator) -> None:
    """The device position moved between calls, or between replays of one captured CUDA graph (the
    397B's heads over a 4096-position room): each run sees the positions up to the new one."""
    hq, hkv, d, cap = (32, 2, 256, 4096) if graphed else (4, 2, 16, 80)
    k, v = cache(rng, hkv, cap, d, cap)
    q = rng.standard_normal((1, hq, d)).astype(np.float32)
    pos = torch.zeros((), dtype=torch.int64, device=DEVICE)
    tq, tk, tv = dev(q), dev(k), dev(v)

    def run() -> torch.Tensor:
        return ta.decode_attention(tq, tk, tv, pos, 0.0625)

    if graphed:
        run()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = run()

        def run() -> torch.Tensor:
            graph.replay()
            torch.cuda.synchronize()
            return out

    for first in (0, cap // 2 + 3, cap - 1):
        pos.fill_(first)
        near(run(), attention64(q, k, v, first, 0.0625))


def test_decode_attention_refuses_what_it_cannot_take() -> None:
    q = torch.zeros((1, 4, 16), device=DEVICE)
    k = torch.zeros((2, 8, 16), device=DEVICE)
    with pytest.raises(ValueError, match="query rows"):
        ta.decode_attention(torch.zeros((ta.MAX_ROWS + 1, 4, 16), device=DEVICE), k, k, 0, 1.0)
    with pytest.raises(ValueError, match="do not match"):
        ta.decode_attention(torch.zeros((1, 3, 16), device=DEVICE), k, k, 0, 1.0)
    with pytest.raises(ValueError, match="outside the cache"):
        ta.decode_attention(q, k, k, 8, 1.0)
    with pytest.raises(ValueError, match="one int64"):
        ta.decode_attention(q, k, k, torch.zeros((), dtype=torch.int32, device=DEVICE), 1.0)
    with pytest.raises(ValueError, match="contiguous float32"):
        ta.decode_attention(q, k.double(), k, 0, 1.0)
