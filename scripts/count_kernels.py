"""Count the GPU kernels of one decode step of a synthetic model (runtime/synthetic.py), in total and
per layer kind, with torch's profiler, and the GPU time each kind of kernel took: at batch 1 the
launches, not the bytes, can set the pace, so these are the figures a fused kernel has to move.
``--prompt N``: the same for one prefill pass of N tokens instead.

    python scripts/count_kernels.py [PRESET] [--layers 4] [--experts E] [--k 10] [--bits 4] [--int8-dot]
        [--prompt N] [--json]

Meant for a CUDA device (``--device cpu`` counts torch's top-level ops instead, a dry run). Every
expert is resident (the slice's experts fit the GPU), so the step is the one a CUDA graph would
capture.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile

from fmoe.runtime.synthetic import synthetic_config, synthetic_engine


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--experts", type=int, default=None, help="routed experts a layer (default: the preset's)")
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--int8-dot", action="store_true", help="the decode matvecs on int8 inputs (as fmoe's --int8-dot)")
    ap.add_argument("--prompt", type=int, default=0, help="profile a prefill of this many tokens, not a decode step")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if args.prompt < 0:
        ap.error("argument --prompt: must not be negative")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("count_kernels: needs a CUDA device")
    cfg = synthetic_config(args.preset, args.layers, args.experts)
    with synthetic_engine(
        cfg,
        bits=args.bits,
        k=args.k,
        device=args.device,
        max_context=max(64, 2 * args.prompt + 16),
        backend_options={"int8": True} if args.int8_dot else None,
    ) as engine:
        net = engine.runner.network
        state = net.new_state()
        net.forward(np.arange(8, dtype=np.int64), state, last_only=True)  # prefill, compiles the kernels
        net.forward(np.array([1], dtype=np.int64), state, last_only=True)  # a first decode step, compiles
        sync = torch.cuda.synchronize if args.device.startswith("cuda") else lambda: None
        sync()
        activity = ProfilerActivity.CUDA if args.device.startswith("cuda") else ProfilerActivity.CPU
        step = np.array([2], dtype=np.int64)
        if args.prompt:  # a prefill of that length, compiled by a first one, then profiled on a fresh state
            step = np.arange(args.prompt, dtype=np.int64) % cfg.vocab_size
            net.forward(step, net.new_state(), last_only=True)
            sync()
            state = net.new_state()
        with profile(activities=[activity]) as prof:
            net.forward(step, state, last_only=True)
            sync()
    kernels: Counter[str] = Counter()
    micros: Counter[str] = Counter()  # time each kind took (on the GPU; the op's time on the CPU)
    for ev in prof.events():  # on the CPU (a dry run): torch's top-level ops, a proxy for launches
        if ev.device_type == torch.autograd.DeviceType.CUDA or (
            activity == ProfilerActivity.CPU and ev.cpu_parent is None
        ):
            kernels[ev.name] += 1
            micros[ev.name] += ev.time_range.elapsed_us()
    total = sum(kernels.values())
    busy = sum(micros.values())
    kinds = Counter(cfg.layer_types)
    result = {
        "preset": args.preset,
        "int8_dot": args.int8_dot,
        "tokens": len(step),
        "layers": cfg.num_hidden_layers,
        "layer_types": dict(kinds),
        "kernels_per_step": total,
        "kernels_per_layer": total / cfg.num_hidden_layers,
        "top": kernels.most_common(12),
        "busy_us_per_step": busy,
        "top_by_time": [(name, kernels[name], us) for name, us in micros.most_common(15)],
    }
    if args.json:
        print(json.dumps(result))
        return
    what = f"a {len(step)}-token prefill" if args.prompt else "a decode step"
    print(
        f"{args.preset}, {cfg.num_hidden_layers} layers {dict(kinds)}: {total} kernels {what}, "
        f"{total / cfg.num_hidden_layers:.1f} a layer (head included)"
    )
    for name, n in kernels.most_common(12):
        print(f"  {n:5d}  {name[:100]}")
    print(f"busy {busy:.0f} us a step ({busy / cfg.num_hidden_layers:.1f} a layer); by time:")
    for name, us in micros.most_common(15):
        print(f"  {us:8.1f} us {100 * us / busy:5.1f}%  {kernels[name]:5d} x {us / kernels[name]:6.2f} us  {name[:80]}")


if __name__ == "__main__":
    main()
