"""The user-facing engine: ``fmoe.load(...)`` returns an :class:`Engine` (built by runtime/loader.py).

Thread safety: one Engine may be used from several threads at once. Forward passes are serialised by
the runner's lock (one pass at a time, each with its own statistics), every request keeps its own
state (a Session), sampler and results, so each caller gets exactly the answer it would get alone.
A Session itself belongs to one caller at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.runtime.engine.generate import stream_generate
from fmoe.runtime.engine.results import GenerationChunk, GenerationResult
from fmoe.runtime.engine.runner import Runner
from fmoe.runtime.engine.session import Session
from fmoe.runtime.text.chat import ChatTemplate
from fmoe.runtime.text.sampling import SamplingParams
from fmoe.runtime.text.tokenizer import Tokenizer


class Engine:
    """A loaded packed model: ``new_session``, ``logits``, ``stream`` and ``generate``."""

    def __init__(
        self,
        *,
        runner: Runner,
        tokenizer: Tokenizer,
        chat_template: ChatTemplate | None,
        stop_ids: Collection[int],
        packed_dir: Path,
    ) -> None:
        self.runner = runner
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.stop_ids = frozenset(stop_ids)
        self.packed_dir = packed_dir

    # ---- what is loaded ------------------------------------------------------------------------
    @property
    def config(self) -> TextConfig:
        return self.runner.config

    @property
    def k(self) -> int:
        return self.runner.network.top_k

    @property
    def bits(self) -> int:
        return int(self.runner.store.bits)

    @property
    def backend(self) -> str:
        return str(self.runner.backend.name)

    @property
    def device(self) -> str:
        return str(self.runner.backend.device)

    @property
    def max_context(self) -> int:
        return self.runner.max_context

    # ---- prompts and sessions ------------------------------------------------------------------
    def new_session(self) -> Session:
        """An empty conversation to continue over several requests (``stream(..., session=)``)."""
        return Session(self.runner.new_state())

    def encode_prompt(
        self, prompt: str | Sequence[int], *, chat: bool = True, thinking: bool = True, system: str | None = None
    ) -> list[int]:
        """Token ids of a prompt: ids pass through; text goes through the chat template (a user
        message, with ``system``) unless ``chat`` is False (raw completion)."""
        if isinstance(prompt, (bytes, bytearray, memoryview)):
            raise FmoeError("prompt: bytes, not text; decode them first (or pass token ids as a list of ints)")
        if not isinstance(prompt, str):
            return list(prompt)
        for name, text in (("--prompt", prompt), ("--system", system or "")):
            if not isinstance(text, str):
                raise FmoeError(f"{name}: expected text, got {type(text).__name__}")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise FmoeError(f"{name}: not valid UTF-8 text (undecodable bytes in the input)") from None
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

    # ---- inference -----------------------------------------------------------------------------
    def logits(self, token_ids: Sequence[int]) -> np.ndarray:
        """float32 ``[len(token_ids), vocab]``: the logits of every position, from a fresh state."""
        logits = self.runner.forward(token_ids, self.runner.new_state()).logits
        assert logits is not None  # (not a greedy pass)
        return logits

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
        *,
        session: Session | None = None,
        stop_ids: Collection[int] | None = None,
        profile: bool = True,
        cuts: Sequence[int] = (),
        on_cut: Callable[[Session], None] | None = None,
        logprobs: int | None = None,
    ) -> Iterator[GenerationChunk]:
        """Generate up to ``max_tokens`` tokens (greedy at temperature 0), yielding text chunks as they
        become final; the last chunk carries the finish reason and the GenerationResult.

        ``prompt`` is text (through the chat template unless ``chat`` is False) or token ids. With a
        ``session``, the prompt continues it (a session holding tokens takes ids or raw text: the
        chat template renders whole conversations) and the session keeps everything that was
        generated. Generation ends at a stop token (``stop_ids``, default the model's; empty to
        ignore them), a ``stop`` string (not included), ``max_tokens`` or the context limit.
        ``profile`` times every layer's phases (cheap on the CPU). ``cuts`` and ``on_cut`` split the
        prefill and see the state at each split (see :func:`stream_generate`; the server's prefix cache).
        ``logprobs``: chunks carry each token's log-probability and that many alternatives."""
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        if session is None:
            session = self.new_session()
        elif session.conversation and chat and isinstance(prompt, str):
            raise FmoeError("session: continue a conversation with token ids or chat=False (raw text)")
        ids = self.encode_prompt(prompt, chat=chat, thinking=thinking, system=system)
        yield from stream_generate(
            self.runner,
            self.tokenizer,
            session,
            ids,
            max_tokens=max_tokens,
            sampling=sampling,
            stop=stop,
            stop_ids=self.stop_ids if stop_ids is None else frozenset(stop_ids),
            profile=profile,
            cuts=cuts,
            on_cut=on_cut,
            logprobs=logprobs,
        )

    def generate(
        self, prompt: str | Sequence[int], max_tokens: int = 256, temperature: float = 0.0, **options: Any
    ) -> GenerationResult:
        """:meth:`stream` to its end; returns the GenerationResult (same options)."""
        for chunk in self.stream(prompt, max_tokens, temperature, **options):
            if chunk.result is not None:
                return chunk.result
        raise AssertionError("stream ended without a result")  # stream_generate always ends with one

    def close(self) -> None:
        self.runner.store.close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
