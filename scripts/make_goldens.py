"""Write tests/golden/tiny_reference.{npz,json}: transformers' outputs on the synthetic tiny model.

The checkpoint is rebuilt deterministically (``fmoe synth --preset tiny --seed 0 --on-grid``), so
tests/test_model.py can compare fmoe against these outputs without torch. Run after changing the
synth generator or the golden parameters (needs torch + transformers):

    python scripts/make_goldens.py [--out tests/golden] [--workdir /tmp/fmoe-goldens]
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
from pathlib import Path

import numpy as np

# What the golden outputs are made of (tests/test_model.py reads these back from the JSON).
GOLDEN = {
    "synth": {"preset": "tiny", "seed": 0, "layout": "official", "on_grid": True},
    "extract": {"dense_bits": 16},
    "repack": {"bits": 4},
    "prompt": {"length": 16, "seed": 1234},
    "new_tokens": 64,
}
REL_ERR = "per position: max|fmoe - reference| / max|reference| over the vocabulary"


def golden_prompt(vocab_size: int) -> np.ndarray:
    p = GOLDEN["prompt"]
    return np.random.default_rng(p["seed"]).integers(0, vocab_size, p["length"]).astype(np.int64)


def checkpoint_hashes(src: Path) -> dict[str, str]:
    """xxh3_128 of the synthetic checkpoint's weight shards: tells a stale golden file from a bug."""
    from fmoe.fsutil import xxh3_128_file

    return {p.name: xxh3_128_file(p) for p in sorted(src.glob("*.safetensors"))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "tests" / "golden")
    ap.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    args = ap.parse_args(argv)

    import torch
    import transformers

    import fmoe
    from fmoe.config import TextConfig
    from fmoe.runtime.diagnostics import build_packed, fmoe_greedy, reference_greedy, relative_error

    with tempfile.TemporaryDirectory(prefix="fmoe-goldens-") as tmp:
        work = args.workdir or Path(tmp)
        s = GOLDEN["synth"]
        src, packed = build_packed(
            work,
            preset=s["preset"],
            seed=s["seed"],
            dense_bits=GOLDEN["extract"]["dense_bits"],
            expert_bits=(GOLDEN["repack"]["bits"],),
        )
        cfg = TextConfig.from_file(src / "config.json")
        source_hashes = checkpoint_hashes(src)
        prompt = golden_prompt(cfg.vocab_size)
        ref = reference_greedy(src, prompt, GOLDEN["new_tokens"])

        # a cross-check only: the golden file holds the reference's outputs, never fmoe's
        model = fmoe.load(packed, bits=GOLDEN["repack"]["bits"])
        run = fmoe_greedy(model, prompt, GOLDEN["new_tokens"])
        rel = float(relative_error(run.prefill_logits, ref.prefill_logits).max())
        same = int(np.sum(run.tokens == ref.tokens))

    args.out.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out / "tiny_reference.npz",
        prompt=ref.prompt,
        prefill_logits=ref.prefill_logits.astype(np.float32),
        tokens=ref.tokens,
        margins=ref.margins.astype(np.float32),
    )
    meta = {
        **GOLDEN,
        "rel_err": REL_ERR,
        "reference": "transformers Qwen3_5MoeForCausalLM, float32, greedy with its own cache",
        "source_xxh3_128": source_hashes,
        "min_margin": float(ref.margins.min()),
        "fmoe_at_generation": {"max_rel_err": rel, "tokens_matched": same},
        "versions": {
            "fmoe": fmoe.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
    }
    (args.out / "tiny_reference.json").write_text(json.dumps(meta, indent=1) + "\n")
    print(
        f"wrote {args.out}/tiny_reference.npz: prompt {len(prompt)}, {len(ref.tokens)} greedy tokens, "
        f"min top-2 margin {meta['min_margin']:.4f}; fmoe now: max rel err {rel:.2e}, "
        f"{same}/{len(ref.tokens)} tokens match"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
