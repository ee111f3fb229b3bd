"""Whether the host can compute part of each layer's host-homed experts while the GPU reads the rest
over the link, inside one CUDA graph (issue 9's "misses computed on the CPU from pinned memory").

    python scripts/cocompute_probe.py [PRESET] [--k 10] [--host 4] [--cpu 0 1 2] [--layers 16]
        [--threads 16] [--rounds 5] [--json]

A decode step of ``--layers`` experts stages, each one token's K experts of which ``--host`` live in
page-locked host memory (``--host-reads direct``). Without the host, the GPU's expert kernels read
those over the link. With it, the graph copies each layer's input, weights and a step number to
page-locked memory, a worker thread (waiting on that number) computes ``C`` of the host experts with
the CPU kernels from the same page-locked rows and writes their weighted sum and a flag, while the
GPU computes the others (the host's slots -1); then a one-program kernel polls the flag and adds the
sum. Prints the time a layer for each ``C`` in ``--cpu`` beside the GPU-only stage, and the largest
difference between the two outputs (the host's kernels round differently, nothing more). The
link's copy-engine rate is measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.cocompute import HostCoCompute, default_cores
from fmoe.runtime.experts.cocompute_device import tensor_alloc
from fmoe.runtime.kernels import triton_cocompute
from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels.gpu_bandwidth import host_to_device_bandwidth
from fmoe.runtime.kernels.threads import physical_cores
from fmoe.runtime.synthetic import fill_random_experts, host_random_experts, synthetic_config


def _cpu_alone(hc: HostCoCompute, hidden: int, n_host: int, rows: int, file_size: int) -> list[dict[str, float]]:
    """The workers' time for 1..n_host experts of one token, driven from here (no GPU): median and
    best of 30 calls on different rows, and the GB/s those experts' bytes make."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal(hidden).astype(np.float32)
    out = []
    for n in range(1, n_host + 1):
        times = []
        for _ in range(30):
            pick = rng.choice(rows, size=n, replace=False).tolist()
            t0 = time.perf_counter()
            hc.compute(x, pick, [1.0 / n] * n)
            times.append(time.perf_counter() - t0)
        med, best = float(np.median(times)), min(times)
        out.append({"experts": n, "median_ms": med * 1e3, "best_ms": best * 1e3, "gb_per_s": n * file_size / med / 1e9})
    return out


def probe(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cfg = synthetic_config(args.preset, 1)
    layout = ExpertLayout.for_config(cfg, args.bits)
    offsets = tm.ExpertOffsets.from_layout(layout)
    k, n_host, n_layers, hidden = args.k, args.host, args.layers, cfg.hidden_size
    n_dev = max(k, (256 << 20) // layout.file_size)
    slab = torch.empty((n_dev, layout.file_size), dtype=torch.uint8, device=device)
    fill_random_experts(slab, layout)
    n_rows = max(1, n_layers * n_host, 64)
    host = host_random_experts(layout, n_rows, device)
    rng = np.random.default_rng(0)
    # layer l: choices at `on_host` read host rows l*H.., the others device slots l*K..
    on_host = [sorted(rng.choice(k, size=n_host, replace=False).tolist()) for _ in range(n_layers)]
    slots = [[-2 - (l * n_host + on_host[l].index(j)) if j in on_host[l] else (l * k + j) % n_dev for j in range(k)]
             for l in range(n_layers)]  # fmt: skip
    x = torch.randn(n_layers, 1, hidden, device=device)
    w = torch.softmax(torch.randn(n_layers, 1, k, device=device), dim=-1)
    h = torch.empty(n_layers, k, cfg.moe_intermediate_size, device=device)
    out = torch.empty(n_layers, 1, hidden, device=device)
    shared = torch.zeros(1, hidden, device=device)
    seq = torch.zeros(1, dtype=torch.int64, device=device)
    failed = torch.zeros(1, dtype=torch.int32, device=device)
    threads = args.threads or max(1, physical_cores() - 1)  # one core left to the thread driving the GPU
    with HostCoCompute(host.numpy(), layout, 1, max(1, n_host), threads, int8=args.int8,
                       cores=default_cores(threads)) as alone_hc:  # fmt: skip
        alone = _cpu_alone(alone_hc, hidden, max(n_host, 1), n_rows, layout.file_size)
    alloc, pinned = tensor_alloc(pin=True)
    hc = HostCoCompute(host.numpy(), layout, n_layers, max(1, n_host), threads, int8=args.int8, alloc=alloc,
                       cores=default_cores(threads))  # fmt: skip
    t_x, t_mark, t_flag, t_out = (pinned[a.ctypes.data] for a in (hc.x, hc.mark, hc.flag, hc.out))

    def layer_stage(l: int, gpu_slots: torch.Tensor, cocompute: bool) -> None:
        if cocompute:
            t_x[l].copy_(x[l, 0], non_blocking=True)
            t_mark[l : l + 1].copy_(seq, non_blocking=True)  # after x, in stream order
        tm.experts_gate_up(slab, offsets, gpu_slots, x[l], k, out=h[l], host=host, int8=args.int8)
        tm.experts_down_combine(slab, offsets, gpu_slots.view(1, k), h[l], w[l], shared, out=out[l], host=host,
                                int8=args.int8)  # fmt: skip
        if cocompute:
            triton_cocompute.add_host_sum(t_flag[l : l + 1], seq, t_out[l], out[l], failed)

    def run(n_cpu: int | None) -> tuple[float, float, np.ndarray]:
        """Best and median ms a layer over the rounds, and the last round's outputs; ``n_cpu`` None: GPU only."""
        cocompute = n_cpu is not None
        gpu_slots = []
        for l in range(n_layers):
            mine = on_host[l][: n_cpu or 0]
            gpu_slots.append(torch.tensor([-1 if j in mine else s for j, s in enumerate(slots[l])], device=device))
            hc.jobs[l, 0] = len(mine)
            hc.jobs[l, 1 : 1 + len(mine)] = [-2 - slots[l][j] for j in mine]
            hc.weights[l, : len(mine)] = w[l, 0, mine].cpu().numpy()
        for l in range(n_layers):  # compilation, outside the graph, without the host's part
            layer_stage(l, gpu_slots[l], False)
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            seq.add_(1)
            for l in range(n_layers):
                layer_stage(l, gpu_slots[l], cocompute)
        times = []
        for _ in range(args.rounds):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / n_layers)
        if int(failed.item()):
            raise SystemExit("cocompute_probe: the GPU gave up waiting for the host's flag")
        if hc.error is not None:
            raise SystemExit(f"cocompute_probe: a host worker failed: {hc.error!r}")
        return min(times), float(np.median(times)), out.cpu().numpy().copy()

    try:
        link = host_to_device_bandwidth(device)
        base_ms, base_median, base_out = run(None)
        rows = [{"cpu_experts": None, "ms_per_layer": base_ms, "median_ms": base_median, "max_rel_diff": 0.0}]
        for n_cpu in args.cpu:
            n = min(n_cpu, n_host)
            ms, median, got = run(n)
            diff = float(np.abs(got - base_out).max() / np.abs(base_out).max())
            rows.append({"cpu_experts": n, "ms_per_layer": ms, "median_ms": median, "max_rel_diff": diff})
    finally:
        hc.close()
    return {"preset": args.preset, "k": k, "host": n_host, "layers": n_layers, "threads": threads, "int8": hc.int8,
            "link_gb_per_s": link, "host_mb_per_layer": n_host * layout.file_size / 1e6, "cpu_alone": alone,
            "rows": rows}  # fmt: skip


def _print(r: dict[str, Any]) -> None:
    print(f"{r['preset']} K={r['k']}, {r['host']} of them host-homed ({r['host_mb_per_layer']:.1f} MB a layer), "
          f"{r['threads']} host threads{', int8' * r['int8']}; link {r['link_gb_per_s']:.1f} GB/s")  # fmt: skip
    for row in r["cpu_alone"]:
        print(f"  host alone, {row['experts']} experts: median {row['median_ms']:.3f} ms (best {row['best_ms']:.3f}), "
              f"{row['gb_per_s']:.1f} GB/s")  # fmt: skip
    base = r["rows"][0]["ms_per_layer"]
    for row in r["rows"]:
        who = "GPU only" if row["cpu_experts"] is None else f"host computes {row['cpu_experts']}"
        print(f"  {who:20s} {row['ms_per_layer'] * 1e3:8.1f} us a layer (median {row['median_ms'] * 1e3:.1f})  "
              f"x{base / row['ms_per_layer']:.2f}  "
              f"max diff {row['max_rel_diff']:.1e}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--bits", type=int, choices=(2, 4, 8), default=4)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--host", type=int, default=4, help="of the K experts, those homed in host memory")
    ap.add_argument("--cpu", type=int, nargs="+", default=[0, 1, 2], help="of those, how many the host computes")
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None, help="the host's worker threads (default: physical cores - 1)")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--int8", action="store_true", help="int8 activations on both sides (--int8-dot)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name in ("k", "layers", "rounds"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be at least 1")
    if not 0 <= args.host <= args.k:
        ap.error(f"argument --host: must lie between 0 and --k ({args.k})")
    if any(c < 0 for c in args.cpu):
        ap.error("argument --cpu: counts must not be negative")
    try:
        synthetic_config(args.preset, 1)
    except FmoeError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        raise SystemExit("cocompute_probe: needs a CUDA device")
    result = probe(args, torch.device("cuda"))
    if args.json:
        print(json.dumps(result))
    else:
        _print(result)


if __name__ == "__main__":
    main()
