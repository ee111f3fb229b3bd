"""`fmoe bench model`: prefill and decode throughput of a loaded model on random token ids.

Stop tokens are ignored (every run decodes exactly ``tokens`` tokens, greedy) so runs compare.
A short warm-up run first takes compilation and cold-file costs out of the measurement.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.engine import Model, phase_timing
from fmoe.runtime.profile import PhaseProfile


def _run(model: Model, prompt: list[int], tokens: int) -> dict[str, Any]:
    net = model.network
    prefill, decode = PhaseProfile(model.config.num_hidden_layers), PhaseProfile(model.config.num_hidden_layers)
    model.store.stats.reset()
    state = net.new_state()
    t0 = time.perf_counter()
    logits = net.forward(prompt, state, profile=prefill, last_only=True)[-1]  # as generation runs it
    prefill_s = time.perf_counter() - t0
    prefill_experts = model.store.stats.summary()
    model.store.stats.reset()
    decode_s = 0.0
    for _ in range(tokens):
        token = int(np.argmax(logits))
        t1 = time.perf_counter()
        logits = net.forward([token], state, profile=decode)[-1]
        decode_s += time.perf_counter() - t1
    decode_experts = model.store.stats.summary()
    return {
        "prefill": phase_timing(len(prompt), prefill_s, prefill, prefill_experts),
        "decode": phase_timing(tokens, decode_s, decode, decode_experts),
    }


def bench_model(model: Model, *, prompt_tokens: int = 64, tokens: int = 32, seed: int = 0) -> dict[str, Any]:
    """Measure prefill (``prompt_tokens`` random ids as one batch) and decode (``tokens`` steps)."""
    if prompt_tokens < 1 or tokens < 1:
        raise FmoeError("--prompt-tokens and --tokens: must be >= 1")
    if prompt_tokens + tokens > model.max_context:
        raise FmoeError(
            f"--prompt-tokens + --tokens: {prompt_tokens + tokens} exceed the context limit of {model.max_context}"
        )
    rng = np.random.default_rng(seed)
    vocab = min(model.config.vocab_size, model.tokenizer.vocab_size)
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
    _run(model, prompt[: min(4, prompt_tokens)], min(2, tokens))  # warm-up
    result = _run(model, prompt, tokens)
    cfg = model.config
    result.update(
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        bits=model.bits,
        k=model.k,
        backend=model.backend,
        kernels=getattr(model.network.backend, "kernels", None),
        model={
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "fingerprint": cfg.fingerprint(),
        },
        cache_bytes=model.store.cache_bytes,
    )
    return result
