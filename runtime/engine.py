"""The user-facing model: tokenise, prefill as a batch, decode token by token, stream text, time it.

``fmoe.load(...)`` returns a :class:`Model` (built by runtime/loader.py).
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.runtime.chat import ChatTemplate
from fmoe.runtime.experts import ExpertStore
from fmoe.runtime.model import Qwen35MoeNetwork
from fmoe.runtime.profile import PhaseProfile
from fmoe.runtime.sampling import Sampler, SamplingParams, StopStrings
from fmoe.runtime.tokenizer import Tokenizer


def phase_timing(tokens: int, seconds: float, profile: PhaseProfile, experts: dict[str, Any]) -> dict[str, Any]:
    """The timing of a prefill or a decode: tokens, wall seconds, tok/s, the phase profile and the
    expert store's statistics (the shape `fmoe run --json` and `fmoe bench model` report)."""
    return {
        "tokens": tokens,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds > 0 else 0.0,
        "profile": profile.summary(),
        "experts": experts,
    }


@dataclass
class GenerationResult:
    text: str  # the generated text (stop token / stop string not included)
    token_ids: list[int]  # the generated token ids (stop token not included)
    prompt_tokens: int
    finish_reason: str  # "stop" (stop token or string), "length" (max tokens or the context limit)
    timing: dict[str, Any] = field(default_factory=dict)


class Model:
    """A loaded packed model: ``logits``, ``generate`` and ``stream``.

    Attributes: ``config`` (TextConfig), ``tokenizer``, ``network`` (Qwen35MoeNetwork, which holds
    the dense weights), ``store`` (ExpertStore), ``chat_template`` (or None), ``stop_ids``, ``bits``,
    ``k``, ``max_context``; ``last_result`` holds the GenerationResult of the latest generate/stream.
    """

    def __init__(
        self,
        *,
        config: TextConfig,
        tokenizer: Tokenizer,
        network: Qwen35MoeNetwork,
        store: ExpertStore,
        chat_template: ChatTemplate | None,
        stop_ids: set[int],
        packed_dir: Path,
        bits: int,
        max_context: int,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.network = network
        self.store = store
        self.chat_template = chat_template
        self.stop_ids = set(stop_ids)
        self.packed_dir = packed_dir
        self.bits = bits
        self.max_context = max_context
        # separate profiles: a prefill's per-layer cost and a decode token's are different questions
        self.prefill_profile = PhaseProfile(config.num_hidden_layers)
        self.decode_profile = PhaseProfile(config.num_hidden_layers)
        self.last_result: GenerationResult | None = None

    @property
    def k(self) -> int:
        return self.network.k

    @property
    def backend(self) -> str:
        return self.network.backend.name

    # ---- prompts -------------------------------------------------------------------------------
    def encode_prompt(
        self, prompt: str | Sequence[int], *, chat: bool = True, thinking: bool = True, system: str | None = None
    ) -> list[int]:
        """Token ids of a prompt: ids pass through; text goes through the chat template unless ``chat``
        is False (raw completion)."""
        if not isinstance(prompt, str):
            return [int(t) for t in prompt]
        if chat:
            if self.chat_template is None:
                raise FmoeError(f"{self.packed_dir}: no chat template (chat_template.jinja); use --raw")
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": prompt}
            ]
            prompt = self.chat_template.render(messages, add_generation_prompt=True, enable_thinking=thinking)
        elif system:
            raise FmoeError("--system needs the chat template (drop --raw)")
        return self.tokenizer.encode(prompt)

    def _check_context(self, n: int) -> None:
        if n == 0:
            raise FmoeError("prompt: empty (no tokens)")
        if n > self.max_context:
            raise FmoeError(f"prompt: {n} tokens exceed the context limit of {self.max_context} tokens")

    # ---- inference -----------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[len(token_ids), vocab]``: the prefill logits of every position, from a fresh state."""
        ids = [int(t) for t in token_ids]
        self._check_context(len(ids))
        return self.network.forward(ids, self.network.new_state())

    def generate(
        self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.0, **options: Any
    ) -> GenerationResult:
        """Generate up to ``max_tokens`` tokens (greedy at temperature 0) and return the result.

        ``prompt`` and ``options`` are those of :meth:`stream` (top_p, top_k, seed, stop, chat,
        thinking, system); generation ends at a stop token, a ``stop`` string (not included),
        ``max_tokens`` or the context limit."""
        for _ in self.stream(prompt, max_tokens, temperature, **options):
            pass
        assert self.last_result is not None
        return self.last_result

    def stream(
        self,
        prompt: str | Sequence[int],
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        chat: bool = True,
        thinking: bool = True,
        system: str | None = None,
    ) -> Iterator[str]:
        """Yield the generated text piece by piece (complete UTF-8 characters only); the
        GenerationResult (with timing) is in ``last_result`` afterwards."""
        self.last_result = None
        if max_tokens < 0:
            raise FmoeError(f"--tokens {max_tokens}: must be >= 0")
        sampler = Sampler(SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed))
        stops = StopStrings(stop)
        ids = self.encode_prompt(prompt, chat=chat, thinking=thinking, system=system)
        self._check_context(len(ids))
        self.prefill_profile.reset()
        self.decode_profile.reset()
        self.store.stats.reset()
        state = self.network.new_state()
        decoder = self.tokenizer.stream_decoder()
        out_ids: list[int] = []
        pending = ""  # decoded text not yet shown (it may be the start of a stop string)
        shown: list[str] = []
        finish = "length"
        cut_by_string = False
        decode_s = 0.0
        decode_steps = 0

        t0 = time.perf_counter()
        logits = self.network.forward(ids, state, profile=self.prefill_profile, last_only=True)[-1]
        prefill_s = time.perf_counter() - t0
        prefill_experts = self.store.stats.summary()
        self.store.stats.reset()  # from here on: decode's expert reads

        for step in range(max_tokens):
            token = sampler(logits)
            if token in self.stop_ids:
                finish = "stop"
                break
            out_ids.append(token)
            pending += decoder.push(token)
            cut = stops.find(pending)
            if cut >= 0:
                pending, finish, cut_by_string = pending[:cut], "stop", True
                break
            safe = stops.safe_length(pending)
            if safe:
                shown.append(pending[:safe])
                yield pending[:safe]
                pending = pending[safe:]
            if step == max_tokens - 1:
                break  # no forward pass for a token nobody will sample
            if state.position >= self.max_context:
                break  # context full: finish "length"
            t1 = time.perf_counter()
            logits = self.network.forward([token], state, profile=self.decode_profile, last_only=True)[-1]
            decode_s += time.perf_counter() - t1
            decode_steps += 1
        if not cut_by_string:
            pending += decoder.flush()
            cut = stops.find(pending)
            if cut >= 0:
                pending, finish = pending[:cut], "stop"
        if pending:
            shown.append(pending)
            yield pending
        timing = self._timing(len(ids), prefill_s, prefill_experts, decode_steps, decode_s, len(out_ids))
        self.last_result = GenerationResult("".join(shown), out_ids, len(ids), finish, timing)

    def _timing(
        self,
        prompt_tokens: int,
        prefill_s: float,
        prefill_experts: dict[str, Any],
        decode_steps: int,
        decode_s: float,
        generated: int,
    ) -> dict[str, Any]:
        return {
            "prompt_tokens": prompt_tokens,
            "generated_tokens": generated,
            "k": self.k,
            "bits": self.bits,
            "backend": self.backend,
            "cache_bytes": self.store.cache_bytes,
            "prefill": phase_timing(prompt_tokens, prefill_s, self.prefill_profile, prefill_experts),
            "decode": phase_timing(decode_steps, decode_s, self.decode_profile, self.store.stats.summary()),
        }

    def close(self) -> None:
        self.store.close()

    def __enter__(self) -> Model:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
