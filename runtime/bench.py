"""`fmoe bench model`: prefill and decode throughput of a loaded model on random token ids.

Stop tokens are ignored (every run decodes exactly ``tokens`` tokens, greedy) so runs compare. A short
warm-up run first takes compilation and cold-file costs out of the measurement. The loop is the
engine's own (``generate_step``); every forward pass is profiled per layer and phase.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.engine.generate import generate_step
from fmoe.runtime.engine.results import PhaseTiming
from fmoe.runtime.routing_trace import RoutingSource, replaying


@dataclass
class BenchResult:
    prefill: PhaseTiming
    decode: PhaseTiming
    prompt_tokens: int
    tokens: int
    bits: int
    k: int
    backend: str
    device: str
    kernels: str | None
    threads: int | None
    cache_bytes: int
    model: dict[str, Any]
    dense_bytes_per_token: int  # what a decode step reads of the resident weights
    memory_read_gb_per_s: float | None  # this machine's, measured in the same run (CPU backend)
    routing: str = "model"  # the router's own choice, or what replaced it (uniform, zipf:S, trace:FILE)

    @property
    def expert_bytes_per_token(self) -> float:
        """Expert bytes a decode step used, whichever tier served them."""
        e = self.decode.experts
        return float(e.bytes.sum()) / max(self.decode.tokens, 1)

    @property
    def decode_gb_per_s(self) -> float:
        """Bytes per decoded token (dense + experts) times tokens per second."""
        return (self.dense_bytes_per_token + self.expert_bytes_per_token) * self.decode.tokens_per_second / 1e9

    @property
    def decode_ceiling_tok_s(self) -> float | None:
        """Tokens/s if a decode step ran at the measured memory bandwidth."""
        if not self.memory_read_gb_per_s:
            return None
        return self.memory_read_gb_per_s * 1e9 / (self.dense_bytes_per_token + self.expert_bytes_per_token)

    def to_dict(self) -> dict[str, Any]:
        d = {name: getattr(self, name) for name in self.__dataclass_fields__}
        d["prefill"], d["decode"] = self.prefill.to_dict(), self.decode.to_dict()
        d.update(
            expert_bytes_per_token=self.expert_bytes_per_token,
            decode_gb_per_s=self.decode_gb_per_s,
            decode_ceiling_tok_s=self.decode_ceiling_tok_s,
        )
        return d


def _run(engine: Engine, prompt: list[int], tokens: int) -> tuple[PhaseTiming, PhaseTiming]:
    layers = engine.config.num_hidden_layers
    prefill, decode = PhaseTiming(layers), PhaseTiming(layers)
    session = engine.new_session()
    for n, gen in enumerate(
        generate_step(engine.runner, session, prompt, lambda row: int(np.argmax(row)), profile=True)
    ):
        (prefill if n == 0 else decode).add(gen.step)
        if n == tokens:
            break
    return prefill, decode


def bench_model(
    engine: Engine, *, prompt_tokens: int = 64, tokens: int = 32, seed: int = 0, routing: RoutingSource | None = None
) -> BenchResult:
    """Measure prefill (``prompt_tokens`` random ids as one batch) and decode (``tokens`` steps), on the
    router's own choice of experts or on ``routing``'s (cache behaviour under realistic routing)."""
    if prompt_tokens < 1 or tokens < 1:
        raise FmoeError("--prompt-tokens and --tokens: must be >= 1")
    if prompt_tokens + tokens > engine.max_context:
        raise FmoeError(
            f"--prompt-tokens + --tokens: {prompt_tokens + tokens} exceed the context limit of {engine.max_context}"
        )
    rng = np.random.default_rng(seed)
    vocab = min(engine.config.vocab_size, engine.tokenizer.vocab_size)
    prompt = [int(t) for t in rng.integers(0, vocab, prompt_tokens)]
    with replaying(engine, routing):
        _run(engine, prompt[: min(4, prompt_tokens)], min(2, tokens))  # warm-up
        prefill, decode = _run(engine, prompt, tokens)
    cfg = engine.config
    backend = engine.runner.backend
    memory = None
    if getattr(backend, "kernels", None) == "numba":  # the CPU's ceiling, with the kernels' threads
        from fmoe.runtime.kernels.membw import read_bandwidth

        backend.use_threads()
        memory = read_bandwidth()
    return BenchResult(
        prefill=prefill,
        decode=decode,
        prompt_tokens=prompt_tokens,
        tokens=tokens,
        bits=engine.bits,
        k=engine.k,
        backend=engine.backend,
        device=engine.device,
        kernels=getattr(backend, "kernels", None),
        threads=getattr(backend, "threads", None),
        cache_bytes=engine.runner.store.cache_bytes,
        model={
            "layers": cfg.num_hidden_layers,
            "hidden": cfg.hidden_size,
            "experts": cfg.num_experts,
            "fingerprint": cfg.fingerprint(),
        },
        dense_bytes_per_token=engine.runner.network.weights.bytes_per_token(),
        memory_read_gb_per_s=memory,
        routing=routing.name if routing else "model",
    )
