"""Decode attention on a CUDA device: fmoe's Triton kernel (runtime/kernels/triton_attention.py)
against torch's SDPA over the whole KV room under a mask (what a replayed CUDA graph ran before),
by KV room and position, each as a CUDA graph of 20 calls timed with CUDA events; and the kernel's
error against float64 at one long position.

    python scripts/attention_sweep.py [--heads 32] [--kv-heads 2] [--head-dim 256] [--rooms 128,4096,32768]
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import numpy as np
import torch

from fmoe.runtime.kernels import triton_attention as ta


def graph_us(fn: Callable[[], object], calls: int = 200) -> float:
    """Microseconds a call of ``fn`` replayed from a CUDA graph of 20 calls."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(20):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(calls // 20):
        graph.replay()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def case(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, scale: float) -> tuple[float, float]:
    """(the Triton kernel, SDPA over the whole room under a mask): microseconds a call at ``position``."""
    pos = torch.tensor(position, dtype=torch.int64, device=q.device)
    visible = torch.arange(k.shape[1], device=q.device)[None, :]

    def sdpa() -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            q.transpose(0, 1)[None], k[None], v[None], attn_mask=visible <= pos, scale=scale, enable_gqa=True
        )

    return graph_us(lambda: ta.decode_attention(q, k, v, pos, scale)), graph_us(sdpa)


def error64(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, position: int, scale: float) -> float:
    """The kernel's relative error against float64 at ``position``."""
    got = ta.decode_attention(q, k, v, position, scale).double().cpu().numpy()
    hq, group = q.shape[1], q.shape[1] // k.shape[0]
    kk, vv, qq = (x.double().cpu().numpy() for x in (k, v, q))
    want = np.zeros((hq, q.shape[2]))
    for h in range(hq):
        s = kk[h // group, : position + 1] @ qq[0, h] * scale
        p = np.exp(s - s.max())
        want[h] = p / p.sum() @ vv[h // group, : position + 1]
    return float(np.linalg.norm(got.reshape(want.shape) - want) / np.linalg.norm(want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=256)
    ap.add_argument("--rooms", default="128,4096,32768")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("attention_sweep: needs a CUDA device")
    dev = torch.device("cuda")
    hq, hkv, d = args.heads, args.kv_heads, args.head_dim
    scale = d**-0.5
    print(f"{hq} query heads, {hkv} KV heads of {d}; us a call")
    print(f"{'KV room':>8} {'position':>9} {'triton':>9} {'SDPA+mask':>10} {'KV MB':>7} {'triton GB/s':>12}")
    for room in (int(r) for r in args.rooms.split(",")):
        k = torch.randn(hkv, room, d, device=dev)
        v, q = torch.randn_like(k), torch.randn(1, hq, d, device=dev)
        for position in sorted({60, 1000, room - 1} & set(range(room))):
            kernel, sdpa = case(q, k, v, position, scale)
            mb = 2 * hkv * (position + 1) * d * 4 / 1e6
            print(f"{room:8d} {position:9d} {kernel:9.2f} {sdpa:10.2f} {mb:7.2f} {mb / kernel * 1e3:12.0f}")
        if room > 96:
            err = error64(q, k, v, room - 96, scale)
            print(f"{'':8} relative error against float64 at {room - 95} positions: {err:.2e}")


if __name__ == "__main__":
    main()
