"""What `--int8-dot` costs in quality: a packed model decoded token by token on a backend's float
kernels and with int8 activations (the CPU's runtime/kernels/int8dot.py, or on the torch backend the
Triton kernels of runtime/kernels/triton_int8.py) side by side over the same text; KL divergence of
the int8 path's next-token distribution from the float path's (mean, p99, max), same-top-token
rate, and the logits' relative difference. ``--prefill``: the text as one prompt instead, every
position's logits (the CPU's int8 GEMM; on the torch backend the routed experts on int8 tensor
cores and the small matrices its matvecs take, while its dense GEMMs stay on float inputs).

    python scripts/int8_quality.py PACKED [--text FILE] [--tokens 512] [--backend cpu|torch] [--device cuda] [--prefill]

PACKED e.g. the trained reference model converted: `fmoe extract models/reference --out P` and
`fmoe repack models/reference --out P --bits 4`; the default text is its held-out file.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import fmoe


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max()
    return z - np.log(np.exp(z).sum())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("packed", type=Path)
    ap.add_argument("--text", type=Path, default=Path(__file__).parent.parent / "models/reference/heldout.txt")
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--backend", default="cpu", help="cpu, or torch (its Triton kernels: --device cuda)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--prefill", action="store_true", help="the text as one prompt, not token by token")
    args = ap.parse_args(argv)
    load = lambda **options: fmoe.load(args.packed, backend=args.backend, device=args.device, **options)  # noqa: E731
    with load() as float_path, load(backend_options={"int8": True}) as int8_path:
        ids = float_path.tokenizer.encode(args.text.read_text())[: args.tokens]
        states = float_path.runner.new_state(), int8_path.runner.new_state()
        kls, same, rel = [], 0, []
        engines = (float_path, int8_path)
        if args.prefill:  # one prompt: every position's logits
            pairs = zip(*(e.runner.forward(ids, st).logits for e, st in zip(engines, states, strict=True)), strict=True)
        else:  # decode-style: one token at a time
            pairs = ((*(e.runner.forward([t], st).logits[-1] for e, st in zip(engines, states, strict=True)),)
                     for t in ids)  # fmt: skip
        for a, b in pairs:
            a, b = a.astype(np.float64), b.astype(np.float64)
            la, lb = log_softmax(a), log_softmax(b)
            kls.append(float((np.exp(la) * (la - lb)).sum()))
            same += int(a.argmax() == b.argmax())
            rel.append(float(np.linalg.norm(a - b) / np.linalg.norm(a)))
    print(
        f"{len(ids)} tokens{' as one prompt' * args.prefill}: KL mean {np.mean(kls):.2e}, "
        f"p99 {np.percentile(kls, 99):.2e}, max {max(kls):.2e}; "
        f"same top token {same / len(ids):.1%}; logits relative difference median {np.median(rel):.2e}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
