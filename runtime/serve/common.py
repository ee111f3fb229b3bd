"""What both APIs share: the server's state, a request's prompt (chat template, tokens, cuts),
running it on the worker, and reading the answer into reasoning, text and tool calls."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from fmoe.errors import FmoeError
from fmoe.runtime.engine.prefix_cache import message_cuts
from fmoe.runtime.engine.results import GenerationChunk, TokenLogprob
from fmoe.runtime.serve.metrics import Metrics
from fmoe.runtime.serve.worker import Done, Job, QueueFull, Worker
from fmoe.runtime.text.tools import Event, OutputParser, ToolCall

JSON_INSTRUCTION = "Respond with one valid JSON object and nothing else."


class RequestError(Exception):
    """A mistake in the request: a 400 in the API's error envelope (``param``: the field)."""

    def __init__(self, message: str, param: str | None = None, status: int = 400) -> None:
        super().__init__(message)
        self.param = param
        self.status = status


@dataclass
class ServerState:
    """Everything a handler may use. ``engine`` and ``worker`` are None while the model loads."""

    model_id: str
    api_key: str | None = None
    thinking: bool = True  # the default when a request does not say
    max_queue: int = 16
    max_tokens_default: int = 4096
    sampling_defaults: dict[str, Any] = field(default_factory=lambda: {"temperature": 1.0, "top_p": 1.0, "top_k": 0})
    engine: Any = None
    worker: Worker | None = None
    load_error: str | None = None
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)

    @property
    def ready(self) -> bool:
        return self.worker is not None


@dataclass
class Prompt:
    ids: list[int]
    cuts: list[int]
    thinking: bool  # the prompt opened a <think> block: the answer starts as reasoning
    tools: list[dict[str, Any]] | None  # parse tool calls against these (None: no parsing)


def chat_prompt(
    engine: Any,
    messages: list[dict[str, Any]],
    *,
    tools: list[dict[str, Any]] | None,
    thinking: bool,
    parse_tools: bool,
    json_schema: Mapping[str, Any] | bool | None = None,
) -> Prompt:
    """Render ``messages`` (chat-template form: role, content, tool_calls, reasoning_content) with
    the model's template; ``json_schema`` (True or a schema) adds an instruction to answer in JSON."""
    if engine.chat_template is None:
        raise RequestError("this model has no chat template: use /v1/completions")
    if json_schema:
        messages = _with_json_instruction(messages, json_schema)
    text = engine.chat_template.render(messages, add_generation_prompt=True, enable_thinking=thinking, tools=tools)
    ids = engine.tokenizer.encode(text)
    check_length(engine, ids)
    im_end = engine.tokenizer.token_id("<|im_end|>")
    newline = engine.tokenizer.encode("\n")
    end = [im_end, *newline] if im_end is not None and len(newline) == 1 else [im_end] if im_end is not None else []
    opened = text.rstrip().endswith("<think>")
    return Prompt(ids, message_cuts(ids, end), opened, tools if tools and parse_tools else None)


def text_prompt(engine: Any, prompt: str | Sequence[int]) -> Prompt:
    ids = list(prompt) if not isinstance(prompt, str) else engine.tokenizer.encode(prompt)
    if ids and not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise RequestError("prompt: text or a list of token ids", "prompt")
    check_length(engine, ids)
    return Prompt(ids, [], False, None)


def check_length(engine: Any, ids: Sequence[int]) -> None:
    if not ids:
        raise RequestError("the prompt is empty (no tokens)")
    if len(ids) >= engine.max_context:
        raise RequestError(
            f"the prompt is {len(ids)} tokens; this server's context limit is {engine.max_context} tokens "
            "(prompt and answer together)"
        )


def _with_json_instruction(messages: list[dict[str, Any]], schema: Mapping[str, Any] | bool) -> list[dict[str, Any]]:
    import json

    note = JSON_INSTRUCTION
    if isinstance(schema, Mapping):
        note += " It must follow this JSON schema: " + json.dumps(schema, ensure_ascii=False)
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{**messages[0], "content": f"{messages[0]['content']}\n\n{note}"}, *messages[1:]]
    return [{"role": "system", "content": note}, *messages]


@dataclass
class Final:
    """The end of an answer: the engine's finish ("stop" or "length"), whether any tool call was
    made, the stop string that ended it, token counts."""

    finish: str
    calls: list[ToolCall]
    malformed: list[str]
    stop_sequence: str | None
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    logprobs: list[TokenLogprob] | None = None  # every generated token's, when the request asked


@dataclass
class Sampling:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: none; N: each token's and its N most likely alternatives


class Run:
    """One request on the worker: ``start`` queues it (QueueFull at once when the queue is full),
    ``events`` yields reasoning, content and tool-call events as they are certain, then one Final;
    ``cancel`` (or leaving ``events`` early: a client that went away) stops its generation."""

    def __init__(self, state: ServerState, prompt: Prompt, sampling: Sampling, *, api: str) -> None:
        assert state.worker is not None
        self.state, self.prompt, self.api = state, prompt, api
        loop = asyncio.get_running_loop()
        self._inbox: asyncio.Queue[Any] = asyncio.Queue()

        def send(item: Any) -> None:  # called from the worker thread
            try:
                loop.call_soon_threadsafe(self._inbox.put_nowait, item)
            except RuntimeError:  # the event loop is closed (the server stopped): nobody is listening
                self.job.cancel.set()

        self.job = Job(
            ids=prompt.ids,
            send=send,
            max_tokens=sampling.max_tokens,
            sampling=dict(
                temperature=sampling.temperature, top_p=sampling.top_p, top_k=sampling.top_k, seed=sampling.seed
            ),
            stop=list(sampling.stop),
            cuts=prompt.cuts,
            logprobs=sampling.logprobs,
        )
        self.logprobs: list[TokenLogprob] | None = [] if sampling.logprobs is not None else None
        self.parser = OutputParser(thinking=prompt.thinking, tools=prompt.tools)
        self._finished = False

    def start(self) -> None:
        assert self.state.worker is not None
        try:
            self.state.worker.submit(self.job)
        except QueueFull:
            self.state.metrics.rejected += 1
            raise
        self.state.metrics.started(self.api)

    def cancel(self) -> None:
        if not self._finished:
            self._finished = True
            self.job.cancel.set()
            self.state.metrics.cancelled += 1
            self.state.metrics.finished(self.api)

    async def events(self) -> AsyncIterator[Event | Final]:
        try:
            while True:
                item = await self._inbox.get()
                if isinstance(item, GenerationChunk):
                    if self.logprobs is not None and item.logprobs:
                        self.logprobs += item.logprobs
                    for event in self.parser.feed(item.text):
                        yield event
                elif isinstance(item, Done):
                    for event in self.parser.finish():
                        yield event
                    self._finished = True
                    self.state.metrics.finished(self.api)
                    self.state.metrics.malformed_calls += len(self.parser.malformed)
                    yield Final(
                        item.result.finish_reason,
                        self.parser.calls,
                        self.parser.malformed,
                        item.stop_sequence,
                        len(self.prompt.ids),
                        item.cached_tokens,
                        len(item.result.token_ids),
                        self.logprobs,
                    )
                    return
                elif isinstance(item, BaseException):
                    self._finished = True
                    self.state.metrics.finished(self.api)
                    if isinstance(item, FmoeError):
                        raise RequestError(str(item))
                    raise item
        finally:
            self.cancel()

    async def collect(self) -> tuple[list[Event], Final]:
        """Every event of the answer, and its Final."""
        events: list[Event] = []
        async for e in self.events():
            if isinstance(e, Final):
                return events, e
            events.append(e)
        raise AssertionError("the answer ended without a Final")


async def run_unless_disconnected(run: Run, receive: Any) -> tuple[list[Event], Final] | None:
    """``run.collect()``, or None (and the generation stopped) if the client disconnects first."""
    flag = asyncio.Event()
    collect = asyncio.ensure_future(run.collect())
    watch = asyncio.ensure_future(watch_disconnect(receive, flag))
    try:
        await asyncio.wait({collect, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
    if collect.done():
        return collect.result()
    collect.cancel()
    run.cancel()
    return None


def sampling_checked(**kw: Any) -> Sampling:
    """Sampling options checked as the engine checks them (a 400 naming the option)."""
    from fmoe.runtime.text.sampling import SamplingParams

    s = Sampling(**kw)
    if isinstance(s.max_tokens, bool) or not isinstance(s.max_tokens, int) or s.max_tokens < 0:
        raise RequestError(f"max_tokens {s.max_tokens!r}: must be a whole number >= 0", "max_tokens")
    try:
        SamplingParams(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k, seed=s.seed)
    except FmoeError as exc:  # "--top-p 2: must be ..." -> "top_p 2: must be ..."
        option, _, rest = str(exc).removeprefix("--").partition(" ")
        name = option.replace("-", "_")
        raise RequestError(f"{name} {rest}", name) from None
    if s.logprobs is not None and not 0 <= s.logprobs <= 20:
        raise RequestError("top_logprobs: between 0 and 20", "top_logprobs")
    if len(s.stop) > 16 or any(not isinstance(x, str) or len(x) > 1000 for x in s.stop):
        raise RequestError("stop: at most 16 strings of at most 1000 characters", "stop")
    return s


async def watch_disconnect(receive: Any, flag: asyncio.Event) -> None:
    """Set ``flag`` when the client disconnects (the request body has been read already)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            flag.set()
            return
