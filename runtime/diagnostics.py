"""Diagnostics of the model against the reference, for scripts/make_goldens.py, scripts/divergence.py
and the tests (nothing here runs in normal inference):

- the real pipeline on a synthetic checkpoint (synth --on-grid -> extract -> repack);
- greedy runs of transformers' reference (imports torch only when called) and of fmoe;
- divergence measures (relative error, KL, top-1 agreement).
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from fmoe.runtime.engine.engine import Engine


# ---- artifacts through the real pipeline --------------------------------------------------------
def build_packed(
    workdir: Path | str,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dense_bits: int = 16,
    expert_bits: Sequence[int] = (4,),
) -> tuple[Path, Path]:
    """synth (on the 4-bit grid) -> extract -> repack, under ``workdir``; returns (source, packed).

    Re-running reuses what is there (extract and repack skip finished outputs)."""
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack
    from fmoe.convert.synth import synthesize

    workdir = Path(workdir)
    src = workdir / f"src-{preset}-s{seed}"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        synthesize(src, preset=preset, seed=seed, on_grid=True)
    packed = workdir / f"packed-{preset}-s{seed}-d{dense_bits}"
    extract(src, packed, dense_bits=dense_bits)
    for bits in expert_bits:
        repack(src, packed, bits=bits, workers=1)
    return src, packed


# ---- divergence measures ------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """KL(exact || approx) per position, in nats, from logits [T, vocab] (float64)."""
    lp, lq = log_softmax(exact), log_softmax(approx)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top1_agreement(exact: np.ndarray, approx: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same."""
    return float(np.mean(np.argmax(exact, axis=-1) == np.argmax(approx, axis=-1)))


def relative_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per position: max|approx - exact| / max|exact| (the correctness bar's measure)."""
    a = np.asarray(approx, dtype=np.float64)
    b = np.asarray(exact, dtype=np.float64)
    return np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)


# ---- reference runs (transformers) and the matching fmoe runs -----------------------------------
@dataclass
class GreedyRun:
    """Prefill logits of the prompt, then ``len(tokens)`` greedy tokens with each step's logits."""

    prompt: np.ndarray  # int64 [P]
    prefill_logits: np.ndarray  # float32 [P, vocab]
    tokens: np.ndarray  # int64 [N]: the greedy continuation
    step_logits: np.ndarray  # float32 [N, vocab]: logits that chose tokens[i] (row 0 = the prompt's last)

    @property
    def margins(self) -> np.ndarray:
        """top-1 minus top-2 logit at each greedy step (how robust the argmax is)."""
        top2 = np.sort(self.step_logits, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]


def _greedy(
    prompt: Sequence[int],
    new_tokens: int,
    prefill: Callable[[np.ndarray], np.ndarray],
    step: Callable[[int], np.ndarray],
) -> GreedyRun:
    """The reference's loop: ``prefill(ids)`` -> logits [P, vocab], then ``step(token)`` -> the next
    logits [vocab], its own cache carried."""
    ids = np.asarray(prompt, dtype=np.int64)
    prefill_logits = prefill(ids)
    steps = [prefill_logits[-1]]
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(steps[-1])))
        if len(tokens) == new_tokens:
            break
        steps.append(step(tokens[-1]))
    return GreedyRun(ids, prefill_logits, np.asarray(tokens, dtype=np.int64), np.stack(steps))


def reference_cache(model: Any, out: Any) -> dict[str, Any]:
    """The keyword that hands a transformers forward pass's cache to the next one: ``cache`` from
    transformers 5.2x on, ``past_key_values`` before (deprecated there, removed in 5.40)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def reference_greedy(source: Path | str, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """Run transformers' Qwen3_5MoeForCausalLM (float32, its own cache) on an official checkpoint."""
    import torch

    from fmoe.convert.synth import load_reference_model

    model = load_reference_model(Path(source))
    cache: dict[str, Any] = {}

    def run(ids: torch.Tensor) -> np.ndarray:
        nonlocal cache
        out = model(input_ids=ids[None], use_cache=True, **cache)
        cache = reference_cache(model, out)
        return out.logits[0].float().numpy().copy()

    with torch.no_grad():
        return _greedy(
            prompt, new_tokens, lambda ids: run(torch.from_numpy(ids)), lambda token: run(torch.tensor([token]))[-1]
        )


def fmoe_greedy(engine: Engine, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """The same run through fmoe's own generation loop: one batched prefill (every position's logits
    kept), then greedy decode with the session carried."""
    from fmoe.runtime.engine.generate import generate_step

    session = engine.new_session()
    steps, tokens = [], []
    prefill_logits = None
    greedy = generate_step(engine.runner, session, prompt, lambda row: int(np.argmax(row)), all_logits=True)
    for gen in greedy:
        if prefill_logits is None:
            prefill_logits = gen.step.logits
        steps.append(gen.logits)
        tokens.append(gen.token)
        if len(tokens) == new_tokens:
            break
    assert prefill_logits is not None
    return GreedyRun(
        np.asarray(prompt, dtype=np.int64), prefill_logits, np.asarray(tokens, dtype=np.int64), np.stack(steps)
    )
