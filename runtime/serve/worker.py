"""The one owner of the engine: a thread that runs requests one at a time from a bounded queue.

HTTP handlers never touch the model: they put a :class:`Job` on the queue (refused at once when it
is full: the server answers 503 with Retry-After) and read what the worker sends back through the
job's ``send`` callback. A job whose client went away is cancelled (``cancel``) and its generation
stops before the next token. Prompts are prefilled at their message cuts, resuming the longest
state the prefix cache holds (runtime/engine/prefix_cache.py).
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from fmoe.errors import FmoeError
from fmoe.runtime.engine.prefix_cache import PrefixCache
from fmoe.runtime.engine.results import GenerationChunk, GenerationResult
from fmoe.runtime.engine.session import Session

log = logging.getLogger("fmoe.serve")


class QueueFull(Exception):
    """The queue holds as many waiting requests as it may: answer 503 and try later."""


@dataclass
class Job:
    """One generation: prompt tokens, where to cut its prefill, sampling; results go to ``send``
    (called from the worker thread with a GenerationChunk, then a :class:`Done` or an exception)."""

    ids: list[int]
    send: Callable[[Any], None]
    max_tokens: int = 256
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, top_k, seed
    stop: Sequence[str] = ()
    cuts: Sequence[int] = ()
    logprobs: int | None = None  # per token: its log-probability and this many alternatives
    cancel: threading.Event = field(default_factory=threading.Event)


@dataclass
class Done:
    """The end of a job: the result, the tokens resumed from the prefix cache, and the stop
    string that ended it (if one did)."""

    result: GenerationResult
    cached_tokens: int
    stop_sequence: str | None
    cancelled: bool = False


class Worker:
    """Runs jobs on ``engine`` (an Engine, or anything with its ``stream``/``new_session``
    interface) in one thread, at most ``max_queue`` waiting."""

    def __init__(self, engine: Any, *, max_queue: int = 16, prefix_cache: PrefixCache | None = None) -> None:
        self.engine = engine
        self.prefix_cache = prefix_cache
        self._queue: queue.Queue[Job | None] = queue.Queue(maxsize=max(1, max_queue))
        self.busy = False
        self.completed = 0
        self.cancelled = 0
        self.failed = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.generated_tokens = 0
        self.decode_seconds = 0.0
        self.last_tokens_per_second = 0.0
        self._thread = threading.Thread(target=self._run, name="fmoe-engine", daemon=True)
        self._thread.start()

    @property
    def depth(self) -> int:
        """Requests waiting (not counting the one running)."""
        return self._queue.qsize()

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None

    def close(self) -> None:
        """Stop after the running job; waiting jobs are cancelled."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                break
            if job is not None:
                job.cancel.set()
                job.send(FmoeError("the server is shutting down"))
        self._queue.put(None)
        self._thread.join(timeout=30)

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancel.is_set():
                self.cancelled += 1
                continue
            self.busy = True
            try:
                self._one(job)
            except FmoeError as exc:  # a bad prompt (context limit, ids): the client's mistake
                self.failed += 1
                job.send(exc)
            except Exception as exc:  # a bug: logged with its traceback, a 500 for the client
                self.failed += 1
                log.exception("generation failed")
                job.send(exc)
            finally:
                self.busy = False

    def _one(self, job: Job) -> None:
        cache = self.prefix_cache
        cached, session = cache.lookup(job.ids, job.cuts) if cache is not None else (0, None)
        if session is None:
            cached, session = 0, self.engine.new_session()
        keep = {job.cuts[0], job.cuts[-1]} if job.cuts else set()  # the shared start; the end of the history

        def on_cut(s: Session) -> None:
            if cache is not None and s.position in keep:
                cache.store(s)

        extra = {"logprobs": job.logprobs} if job.logprobs is not None else {}
        stream = self.engine.stream(
            job.ids[cached:],
            job.max_tokens,
            **job.sampling,
            stop=job.stop,
            chat=False,
            session=session,
            cuts=[c - cached for c in job.cuts if c > cached],
            on_cut=on_cut,
            profile=False,
            **extra,
        )
        result: GenerationResult | None = None
        try:
            for chunk in stream:
                if job.cancel.is_set():
                    break
                if chunk.result is not None:
                    result = chunk.result
                job.send(chunk)
        finally:
            stream.close()
        if result is None:
            self.cancelled += 1
            return
        self.completed += 1
        self.prompt_tokens += len(job.ids)
        self.cached_tokens += cached
        self.generated_tokens += len(result.token_ids)
        decode = result.timing.decode
        if decode.tokens:
            self.decode_seconds += decode.seconds
            self.last_tokens_per_second = decode.tokens_per_second
        job.send(Done(result, cached, _stop_sequence(self.engine, session, result, job.stop)))


def _stop_sequence(engine: Any, session: Session, result: GenerationResult, stops: Sequence[str]) -> str | None:
    """The stop string that ended generation, or None (a stop token, max_tokens, the context)."""
    if result.finish_reason != "stop" or not stops:
        return None
    if session.conversation and session.conversation[-1] in engine.stop_ids:  # (pending, or fed by a step queued ahead)
        return None
    text = engine.tokenizer.decode([*result.token_ids, *session.pending])
    hits = [(i, s) for s in stops if s and (i := text.find(s)) >= 0]
    return min(hits)[1] if hits else None


def wait_idle(worker: Worker, timeout: float = 10.0) -> bool:
    """True once nothing runs or waits (tests; shutdown)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not worker.busy and worker.depth == 0:
            return True
        time.sleep(0.01)
    return False


__all__ = ["Done", "GenerationChunk", "Job", "QueueFull", "Worker"]
