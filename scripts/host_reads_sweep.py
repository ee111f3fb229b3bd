"""The expert kernels with part of a token's K experts read in place from page-locked host memory, as
``--host-reads direct`` runs them, at a model's decode shapes on a CUDA device, beside the link's
and HBM's rates measured in the same run.

    python scripts/host_reads_sweep.py [PRESET] [--bits 4] [--k 4 10] [--int8] [--blocks]
        [--host-gb G] [--host-memory pinned|registered] [--json]

For each K and each count H of host-homed experts (0, 1, 2, about a third, half, all K), one
token's gate+up and down+combine are timed alone and as a layer's experts stage (the two in turn),
each call on other experts (host rows cycled through a few GB, device rows through more than the
L2), calls captured in a CUDA graph and replayed as decode runs them. The stage's time over H = 0's
is the host rows' cost: their bytes over that time is the rate the link gives these kernels, beside
the copy engine's rate from page-locked memory. ``--blocks``: the kernels alone with other launch
blocks (rows, words, warps) where H > 0, to see whether host reads want other blocks than HBM's.
``--host-gb G``: the host rows span G GB (default: as many rows as the calls read, about 1-3 GB);
``--host-memory registered``: they are an anonymous mapping page-locked in place (cudaHostRegister),
as the runtime's host tier is, rather than torch's page-locked allocation: whether the GPU reads a
large registered buffer as fast as a small pinned one.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.page_lock import page_lock
from fmoe.runtime.experts.slots import HostSlab
from fmoe.runtime.kernels import triton_moe as tm
from fmoe.runtime.kernels.gpu_bandwidth import graph_us, hbm_read_bandwidth, host_to_device_bandwidth
from fmoe.runtime.synthetic import fill_random_experts, host_random_experts, synthetic_config

_L2_OVERFLOW = 256 << 20  # device slab bytes cycled through: several times an H200's 50 MB L2
_CALLS = 40  # calls per captured graph, each on its own experts
_BLOCKS = [(4, 512, 4), (8, 512, 4), (16, 128, 4), (8, 128, 4), (4, 128, 4), (16, 128, 8), (32, 128, 4)]


def host_counts(k: int) -> list[int]:
    """The host-homed counts swept for K choices: none, one, two, about a third (the share a 139 GB
    device leaves the 397B's 4-bit experts), half, all."""
    return sorted({h for h in (0, 1, 2, round(k * 0.36), k // 2, k) if 0 <= h <= k})


def call_slots(k: int, n_host: int, calls: int, n_dev: int, n_rows: int, seed: int = 0) -> list[list[int]]:
    """A token's K slots for each of ``calls`` calls: ``n_host`` of them host rows (slot ``-2 - r``) at
    random positions, the rest device rows; every call on rows the previous ``n_dev // k`` (device)
    and ``n_rows // k`` (host) calls did not read."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(calls):
        on_host = set(rng.choice(k, size=n_host, replace=False).tolist())
        out.append([-2 - (i * k + j) % n_rows if j in on_host else (i * k + j) % n_dev for j in range(k)])
    return out


def host_rows(layout: ExpertLayout, rows: int, memory: str, device: torch.device) -> tuple[torch.Tensor, Any]:
    """``rows`` random expert files in host memory: torch's page-locked allocation (``pinned``) or an
    anonymous mapping page-locked in place (``registered``, the runtime's host tier); and what keeps
    the registration alive (None for ``pinned``)."""
    if memory == "pinned":
        return host_random_experts(layout, rows, device), None
    slab = HostSlab(layout, rows)
    host = torch.from_numpy(slab.data)
    block = host_random_experts(layout, min(rows, 64), device)
    for r0 in range(0, rows, block.shape[0]):
        n = min(block.shape[0], rows - r0)
        host[r0 : r0 + n].copy_(block[:n])
    unpin = page_lock(slab, slab.data, device)
    if unpin is None:
        raise SystemExit(f"host_reads_sweep: could not page-lock {slab.nbytes / 1e9:.1f} GB")
    return host, (slab, unpin)


def sweep(
    preset: str,
    bits: int,
    ks: list[int],
    int8: bool,
    blocks: bool,
    device: torch.device,
    say: Callable[[str], None],
    host_gb: float | None = None,
    host_memory: str = "pinned",
) -> dict[str, Any]:
    """The sweep's rows and the run's ceilings; ``say`` gets each line as it is measured."""
    cfg = synthetic_config(preset, 1)
    layout = ExpertLayout.for_config(cfg, bits)
    offsets = tm.ExpertOffsets.from_layout(layout)
    hidden, inter = cfg.hidden_size, cfg.moe_intermediate_size
    n_dev = max(2 * max(ks), _L2_OVERFLOW // layout.file_size)
    slab = torch.empty((n_dev, layout.file_size), dtype=torch.uint8, device=device)
    fill_random_experts(slab, layout)
    n_rows = _CALLS * max(ks) if host_gb is None else max(1, int(host_gb * 1e9) // layout.file_size)
    host, keep = host_rows(layout, n_rows, host_memory, device)
    say(f"host rows: {n_rows} ({n_rows * layout.file_size / 1e9:.1f} GB, {host_memory})")
    ceilings = {"hbm_gb_per_s": hbm_read_bandwidth(device), "link_gb_per_s": host_to_device_bandwidth(device)}
    say(f"HBM {ceilings['hbm_gb_per_s']:.0f} GB/s, link (copy engine) {ceilings['link_gb_per_s']:.1f} GB/s")
    x = torch.randn(1, hidden, device=device)
    out = torch.empty(1, hidden, device=device)
    shared = torch.zeros(1, hidden, device=device)
    rows: list[dict[str, Any]] = []
    heuristic = tm._matvec_blocks
    for k in ks:
        h = torch.randn(k, inter, device=device)
        w = torch.full((1, k), 1.0 / k, device=device)
        base = None
        for n_host in host_counts(k):
            slots = [torch.tensor(s, device=device) for s in call_slots(k, n_host, _CALLS, n_dev, n_rows)]

            def gate_up(s: torch.Tensor, k: int = k, h: torch.Tensor = h) -> Callable[[], Any]:
                return lambda: tm.experts_gate_up(slab, offsets, s, x, k, out=h, host=host, int8=int8)

            def down(s: torch.Tensor, k: int = k, h: torch.Tensor = h, w: torch.Tensor = w) -> Callable[[], Any]:
                return lambda: tm.experts_down_combine(slab, offsets, s.view(1, k), h, w, shared, out=out, host=host,
                                                       int8=int8)  # fmt: skip

            stage = 2 * graph_us([fn for s in slots for fn in (gate_up(s), down(s))])  # a call each: per pair
            base = stage if n_host == 0 else base
            row = {"k": k, "host": n_host, "int8": int8, "blocks": "heuristic", "stage_us": stage,
                   "gate_up_us": graph_us([gate_up(s) for s in slots]), "down_us": graph_us([down(s) for s in slots]),
                   "host_mb": n_host * layout.file_size / 1e6}  # fmt: skip
            extra = stage - base if base is not None else float("nan")
            row["host_gb_per_s"] = n_host * layout.file_size / (extra * 1e-6) / 1e9 if n_host and extra > 0 else None
            rows.append(row)
            say(_line(row, ceilings["link_gb_per_s"]))
            for b in _BLOCKS if blocks and n_host else []:
                tm._matvec_blocks = lambda *a, b=b, **kw: tm._MatvecBlocks(*b)
                try:
                    gu, dn = graph_us([gate_up(s) for s in slots]), graph_us([down(s) for s in slots])
                except Exception as e:  # a block shape a kernel cannot take
                    gu = dn = float("nan")
                    say(f"  {b}: {type(e).__name__}")
                finally:
                    tm._matvec_blocks = heuristic
                rows.append({"k": k, "host": n_host, "int8": int8, "blocks": str(b), "gate_up_us": gu, "down_us": dn})
                say(f"K={k:2d} H={n_host:2d} blocks {b!s:16s} gate+up {gu:8.1f} us  down {dn:8.1f} us "
                     f"(heuristic {row['gate_up_us']:.1f} / {row['down_us']:.1f})")  # fmt: skip
    del keep  # (the rows' registration lives until here)
    return {**ceilings, "preset": preset, "bits": bits, "host_rows": n_rows, "host_memory": host_memory, "rows": rows}


def _line(r: dict[str, Any], link: float) -> str:
    rate = r["host_gb_per_s"]
    share = f"{rate:6.1f} GB/s ({rate / link:4.0%} of the link)" if rate else ""
    return (f"K={r['k']:2d} H={r['host']:2d}{' int8' * r['int8']}  gate+up {r['gate_up_us']:7.1f} us  down "
            f"{r['down_us']:7.1f} us  stage {r['stage_us']:7.1f} us  host {r['host_mb']:6.1f} MB  {share}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--bits", type=int, choices=(2, 4, 8), default=4, help="the experts' bit width")
    ap.add_argument("--k", type=int, nargs="+", default=[4, 10], help="experts a token (one sweep each)")
    ap.add_argument("--int8", action="store_true", help="on int8 activations (--int8-dot)")
    ap.add_argument("--blocks", action="store_true", help="also other launch blocks where experts are on the host")
    ap.add_argument("--host-gb", type=float, default=None, help="GB of host rows the calls cycle through")
    ap.add_argument(
        "--host-memory",
        choices=("pinned", "registered"),
        default="pinned",
        help="torch's page-locked allocation, or an anonymous mapping registered in place (the runtime's)",
    )
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if any(k < 1 for k in args.k):
        ap.error("argument --k: each must be at least 1")
    if args.host_gb is not None and not args.host_gb > 0:
        ap.error("argument --host-gb: must be positive")
    try:
        synthetic_config(args.preset, 1)
    except FmoeError as e:
        ap.error(str(e))
    if not torch.cuda.is_available():
        raise SystemExit("host_reads_sweep: needs a CUDA device")
    say = (lambda _: None) if args.json else (lambda text: print(text, flush=True))
    device = torch.device("cuda")
    result = sweep(args.preset, args.bits, args.k, args.int8, args.blocks, device, say, args.host_gb, args.host_memory)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
