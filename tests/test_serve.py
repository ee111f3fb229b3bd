"""`fmoe serve` through the official `openai` and `anthropic` clients against servers on port 0:
the synthetic model end to end, and a scripted engine (given text, malformed tool calls included)
for tool calls and reasoning. Every response is validated by the client's own types."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
anthropic = pytest.importorskip("anthropic")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")

from anthropic.types import Message, RawMessageStreamEvent  # noqa: E402
from openai.types import Completion, Model  # noqa: E402
from openai.types.chat import ChatCompletion, ChatCompletionChunk  # noqa: E402
from pydantic import TypeAdapter  # noqa: E402

import fmoe  # noqa: E402
from fmoe.runtime.diagnostics import build_packed  # noqa: E402
from fmoe.runtime.engine.engine import Engine  # noqa: E402
from fmoe.runtime.engine.results import GenerationChunk, GenerationResult, GenerationTiming, PhaseTiming  # noqa: E402
from fmoe.runtime.engine.session import Session  # noqa: E402
from fmoe.runtime.serve.app import create_app, worker_of  # noqa: E402
from fmoe.runtime.serve.server import BackgroundServer  # noqa: E402
from fmoe.runtime.serve.worker import Worker, wait_idle  # noqa: E402
from fmoe.runtime.state import SequenceState  # noqa: E402
from fmoe.runtime.text.tools import render_call  # noqa: E402

NO_THINK = {"chat_template_kwargs": {"enable_thinking": False}}
SYSTEM = "You are a careful assistant. Answer the question in one short sentence, without any preamble."
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer"},
                "metric": {"type": "boolean"},
                "hours": {"type": "array"},
            },
            "required": ["city"],
        },
    },
}


# ---- servers ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("serve"), seed=3)[1]


@pytest.fixture(scope="module")
def engine(packed: Path) -> Iterator[Engine]:
    with fmoe.load(packed) as e:
        yield e


def _ready(srv: BackgroundServer) -> BackgroundServer:
    deadline = time.monotonic() + 60
    while httpx.get(srv.url + "/health").status_code != 200:
        assert time.monotonic() < deadline, "the model did not load"
        time.sleep(0.02)
    return srv


@pytest.fixture(scope="module")
def server(engine: Engine) -> Iterator[BackgroundServer]:
    app = create_app(lambda: engine, model_id="tiny", max_queue=64, owns_engine=False)
    with BackgroundServer(app) as srv:
        yield _ready(srv)


def _oa(srv: BackgroundServer, key: str = "none") -> Any:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key=key, max_retries=0, timeout=60)


def _an(srv: BackgroundServer, key: str = "none") -> Any:
    return anthropic.Anthropic(base_url=srv.url, api_key=key, max_retries=0, timeout=60)


class ScriptedEngine:
    """Engine.stream's interface over a real model's tokenizer and template: the answer to a request
    is the text its last user message holds after ``SCRIPT:`` (``\\n`` escapes), streamed a few
    characters at a time (``SCRIPT:FOREVER``: never ending); ``gate`` (when set) holds every answer
    until it opens."""

    def __init__(self, real: Engine) -> None:
        self.tokenizer = real.tokenizer
        self.chat_template = real.chat_template
        self.stop_ids = real.stop_ids
        self.max_context = real.max_context
        self.packed_dir = real.packed_dir
        self.prompts: list[str] = []
        self.gate: threading.Event | None = None

    def new_session(self) -> Session:
        return Session(SequenceState([]))

    def stream(self, prompt: list[int], max_tokens: int = 256, *args: Any, **kw: Any) -> Iterator[GenerationChunk]:
        text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        self.prompts.append(text)
        if self.gate is not None:
            self.gate.wait(30)
        script = text.rsplit("SCRIPT:", 1)[-1].split("<|im_end|>")[0].replace("\\n", "\n")
        if script == "FOREVER":  # an answer that ends only when the worker stops reading it
            while True:
                time.sleep(0.002)
                yield GenerationChunk("x", [])
        ids = self.tokenizer.encode(script)
        finish = "length" if len(ids) > max_tokens else "stop"
        ids = ids[:max_tokens]
        out = self.tokenizer.decode(ids)
        for i in range(0, len(out), 3):
            yield GenerationChunk(out[i : i + 3], [])
        timing = GenerationTiming(len(prompt), 0, len(ids), 0, 4, "scripted", "cpu", 0, PhaseTiming(1), PhaseTiming(1))
        result = GenerationResult(out, ids, len(prompt), 0, finish, timing)
        yield GenerationChunk("", ids, finish, result)

    def close(self) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(engine: Engine) -> Iterator[tuple[BackgroundServer, ScriptedEngine]]:
    fake = ScriptedEngine(engine)
    app = create_app(lambda: fake, model_id="scripted", prefix_cache_bytes=0, max_queue=2)
    with BackgroundServer(app) as srv:
        yield _ready(srv), fake


def _chat(client: Any, content: str, **kw: Any) -> Any:
    messages = kw.pop("messages", None) or [{"role": "user", "content": content}]
    return client.chat.completions.create(model="m", messages=messages, **kw)


def _raw_chat(client: Any, **kw: Any) -> ChatCompletion:
    """A non-streamed answer, validated by the client's own type from the raw JSON."""
    raw = client.chat.completions.with_raw_response.create(model="m", **kw)
    return ChatCompletion.model_validate(raw.http_response.json())


def _streamed_chat(client: Any, **kw: Any) -> list[ChatCompletionChunk]:
    """Every chunk of a streamed answer, each validated by the client's own type."""
    return [
        ChatCompletionChunk.model_validate(c.model_dump())
        for c in client.chat.completions.create(model="m", stream=True, **kw)
    ]


# ---- the synthetic model, OpenAI ----------------------------------------------------------------
def test_models_health_and_page(server: BackgroundServer) -> None:
    listed = _oa(server).models.list()
    assert [Model.model_validate(m.model_dump()).id for m in listed.data] == ["tiny"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "<textarea" in page.text and "/v1/chat/completions" in page.text
    assert "https://" not in page.text and "http://" not in page.text  # nothing from elsewhere (no CDN)


def test_chat_stream_equals_non_stream_with_usage(server: BackgroundServer) -> None:
    client = _oa(server)
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What is the capital of France?"}]
    opts = dict(messages=messages, max_tokens=12, temperature=0, extra_body=NO_THINK)
    full = _raw_chat(client, **opts)
    choice = full.choices[0]
    assert choice.finish_reason == "length" and full.usage is not None
    assert full.usage.completion_tokens == 12 and full.usage.total_tokens == full.usage.prompt_tokens + 12
    chunks = _streamed_chat(client, stream_options={"include_usage": True}, **opts)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (full.usage.prompt_tokens, 12)
    assert all(c.usage is None for c in chunks[:-1])


def test_max_completion_tokens_and_stop_strings(server: BackgroundServer) -> None:
    client = _oa(server)
    base = dict(messages=[{"role": "user", "content": "Tell me a story"}], temperature=0, extra_body=NO_THINK)
    full = _raw_chat(client, max_completion_tokens=10, **base).choices[0].message.content
    assert full
    needle = full[len(full) // 2 : len(full) // 2 + 2]
    cut = _raw_chat(client, max_tokens=10, stop=[needle], **base)
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].message.content == full[: full.find(needle)]
    streamed = _streamed_chat(client, max_tokens=10, stop=needle, **base)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == full[: full.find(needle)]


def test_completions_plain_streamed_and_token_ids(server: BackgroundServer, engine: Engine) -> None:
    client = _oa(server)
    raw = client.completions.with_raw_response.create(model="m", prompt="Once upon a time", max_tokens=8, temperature=0)
    done = Completion.model_validate(raw.http_response.json())
    assert done.choices[0].finish_reason == "length" and done.usage is not None and done.usage.completion_tokens == 8
    docs = [
        c.model_dump()
        for c in client.completions.create(
            model="m", prompt="Once upon a time", max_tokens=8, temperature=0, stream=True
        )
    ]
    assert docs[-1]["choices"][0]["finish_reason"] == "length"
    # the client's Completion type has no null finish_reason, which OpenAI's own stream chunks carry
    # until the last: validate the rest of each chunk against it
    chunks = [Completion.model_validate({**d, "choices": [{**d["choices"][0], "finish_reason": "stop"}]}) for d in docs]
    assert "".join(c.choices[0].text for c in chunks) == done.choices[0].text
    ids = engine.tokenizer.encode("Once upon a time")
    by_ids = client.completions.create(model="m", prompt=ids, max_tokens=8, temperature=0)
    assert by_ids.choices[0].text == done.choices[0].text
    # the engine alone gives the same text (greedy, raw prompt)
    alone = engine.generate(ids, max_tokens=8, chat=False)
    assert alone.text == done.choices[0].text


def test_logprobs(server: BackgroundServer, engine: Engine) -> None:
    client = _oa(server)
    messages = [{"role": "user", "content": "Name a colour."}]
    opts: dict[str, Any] = dict(
        messages=messages, max_tokens=6, temperature=0, logprobs=True, top_logprobs=3, extra_body=NO_THINK
    )
    done = _raw_chat(client, **opts)
    lps = done.choices[0].logprobs
    assert lps is not None and lps.content is not None and done.usage is not None
    assert len(lps.content) == done.usage.completion_tokens
    for lp in lps.content:  # greedy: each token is its own most likely alternative
        assert lp.logprob <= 0 and len(lp.top_logprobs) == 3
        assert lp.top_logprobs[0].token == lp.token and lp.top_logprobs[0].logprob == lp.logprob
        assert [t.logprob for t in lp.top_logprobs] == sorted((t.logprob for t in lp.top_logprobs), reverse=True)
    ids = engine.tokenizer.encode(engine.chat_template.render(messages, enable_thinking=False))
    row = engine.logits(ids)[-1].astype(np.float64)
    want = row - row.max() - np.log(np.exp(row - row.max()).sum())
    assert abs(lps.content[0].logprob - want.max()) < 1e-3  # the model's own distribution
    chunks = _streamed_chat(client, **opts)
    streamed = [c.choices[0].logprobs for c in chunks if c.choices and c.choices[0].logprobs is not None]
    assert len(streamed) == 1 and streamed[0].content == lps.content  # all of them, with the finish
    raw = client.completions.with_raw_response.create(model="m", prompt="Once", max_tokens=4, temperature=0, logprobs=2)
    comp = Completion.model_validate(raw.http_response.json())
    clp = comp.choices[0].logprobs
    assert (
        clp is not None and clp.tokens is not None and clp.top_logprobs is not None and clp.token_logprobs is not None
    )
    assert len(clp.tokens) == 4 and all(len(t) == 2 for t in clp.top_logprobs)
    assert all(v <= 0 for v in clp.token_logprobs)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(model="m", messages=messages, top_logprobs=2)
    with pytest.raises(openai.BadRequestError, match="logprobs"):
        client.completions.create(model="m", prompt="x", logprobs=9)


def test_prefix_reuse_is_reported_and_changes_no_answer(server: BackgroundServer, engine: Engine) -> None:
    """A second turn resumes the first one's saved state (the prefilled count says so) and answers
    exactly what a server without a prefix cache answers."""
    client = _oa(server)
    system = {"role": "system", "content": SYSTEM + " Reuse test."}
    first = [system, {"role": "user", "content": "Name a fruit that is red and sweet."}]
    a = _raw_chat(client, messages=first, max_tokens=6, temperature=0, extra_body=NO_THINK)
    assert a.usage is not None and a.usage.prompt_tokens_details is not None
    second = [
        *first,
        {"role": "assistant", "content": a.choices[0].message.content},
        {"role": "user", "content": "And one that is yellow?"},
    ]
    before = worker_of(server.app).cached_tokens  # type: ignore[union-attr]
    b = _raw_chat(client, messages=second, max_tokens=6, temperature=0, extra_body=NO_THINK)
    assert b.usage is not None and b.usage.prompt_tokens_details is not None
    cached = b.usage.prompt_tokens_details.cached_tokens
    # everything up to the end of the first user turn is resumed, the rest is prefilled
    first_ids = engine.tokenizer.encode(engine.chat_template.render(first, add_generation_prompt=False))
    assert cached == len(first_ids) and cached > 0
    assert worker_of(server.server.config.app).cached_tokens - before == cached  # type: ignore[union-attr]
    metrics = httpx.get(server.url + "/metrics").text
    assert "fmoe_prefix_cache_hits_total" in metrics and "fmoe_prompt_tokens_cached_total" in metrics
    # the same request with no prefix cache at all: the same answer, nothing cached
    app = create_app(lambda: engine, model_id="tiny", prefix_cache_bytes=0, owns_engine=False)
    with BackgroundServer(app) as plain:
        c = _raw_chat(_oa(_ready(plain)), messages=second, max_tokens=6, temperature=0, extra_body=NO_THINK)
    assert c.usage is not None and c.usage.prompt_tokens_details is not None
    assert c.usage.prompt_tokens_details.cached_tokens == 0
    assert c.choices[0].message.content == b.choices[0].message.content


def test_tools_and_tool_results_end_to_end(server: BackgroundServer) -> None:
    """Tools in the request and a tool call with its result in the history go through the synthetic
    model's template: a valid answer (a random model calls no tool), the tools in the prompt."""
    client = _oa(server)
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 24 C"},
    ]
    with_tools = _raw_chat(client, messages=history, tools=[WEATHER], max_tokens=4, temperature=0, extra_body=NO_THINK)
    without = _raw_chat(client, messages=history, max_tokens=4, temperature=0, extra_body=NO_THINK)
    assert with_tools.usage is not None and without.usage is not None
    assert with_tools.usage.prompt_tokens > without.usage.prompt_tokens  # the tool list is in the prompt
    assert with_tools.choices[0].finish_reason in ("length", "stop", "tool_calls")
    bad = [
        {
            "role": "assistant",
            "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
        }
    ]
    with pytest.raises(openai.BadRequestError, match="not valid JSON"):
        _chat(client, "", messages=bad, max_tokens=2)


def test_errors_are_typed_by_the_client(server: BackgroundServer) -> None:
    client = _oa(server)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": -1}, "temperature"),
        ({"messages": [{"role": "user", "content": "hi"}], "top_p": 3}, "top_p"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": -2}, "max_tokens"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "role"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, "text"),
        ({"messages": [{"role": "user", "content": "hi " * 5000}]}, "context limit"),
    ]
    for body, needle in cases:
        with pytest.raises(openai.BadRequestError, match=needle) as info:
            client.chat.completions.create(model="m", **body)
        assert info.value.status_code == 400 and info.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")
    r = httpx.post(server.url + "/v1/chat/completions", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"
    r = httpx.get(server.url + "/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()
    r = httpx.post(server.url + "/v1/messages", json={"model": "m", "messages": []})
    assert r.status_code == 400 and r.json()["type"] == "error"
    an = _an(server)
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        an.messages.create(model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=0)
    with pytest.raises(anthropic.BadRequestError, match="temperature"):
        an.messages.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=2, extra_body={"temperature": 3}
        )
    with pytest.raises(anthropic.NotFoundError):
        an.models.retrieve("nope")


def test_api_key(engine: Engine) -> None:
    app = create_app(lambda: engine, model_id="tiny", api_key="s3cret", owns_engine=False)
    with BackgroundServer(app) as srv:
        _ready(srv)
        for key in ("none", "wrong"):
            with pytest.raises(openai.AuthenticationError):
                _oa(srv, key).models.list()
            with pytest.raises(anthropic.AuthenticationError):
                _an(srv, key).messages.create(model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}])
        assert _oa(srv, "s3cret").models.list().data[0].id == "tiny"
        answer = _an(srv, "s3cret").messages.create(
            model="m", max_tokens=2, messages=[{"role": "user", "content": "x"}]
        )
        assert Message.model_validate(answer.model_dump()).usage.output_tokens == 2
        assert httpx.get(srv.url + "/metrics").status_code == 401
        assert httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(srv.url + "/").status_code == 200 and httpx.get(srv.url + "/health").status_code == 200


def test_health_is_503_while_loading(engine: Engine) -> None:
    release = threading.Event()

    def slow_load() -> Engine:
        release.wait(30)
        return engine

    app = create_app(slow_load, model_id="tiny", owns_engine=False)
    with BackgroundServer(app) as srv:
        r = httpx.get(srv.url + "/health")
        assert r.status_code == 503 and r.json()["status"] == "loading"
        with pytest.raises(openai.InternalServerError) as info:
            _oa(srv).models.list()
        assert info.value.status_code == 503 and info.value.response.headers["retry-after"]
        release.set()
        assert _ready(srv) and _oa(srv).models.list().data[0].id == "tiny"


def test_disconnect_stops_generation(scripted: tuple[BackgroundServer, ScriptedEngine]) -> None:
    """An answer that would never end (the scripted engine's FOREVER) stops when its client leaves:
    a closed stream, or a non-streaming client that gives up (here: its read timeout)."""
    srv, _ = scripted
    worker = worker_of(srv.app)
    assert worker is not None
    before = (worker.cancelled, worker.completed)
    body = {
        "model": "m",
        "messages": [{"role": "user", "content": "SCRIPT:FOREVER"}],
        "max_tokens": 10**6,
        "stream": True,
        **NO_THINK,
    }
    with httpx.stream("POST", srv.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        assert [next(lines) for _ in range(6)]  # the answer is streaming
    assert wait_idle(worker, timeout=60)
    assert (worker.cancelled, worker.completed) == (before[0] + 1, before[1])
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(srv.url + "/v1/chat/completions", json={**body, "stream": False}, timeout=0.5)
    assert wait_idle(worker, timeout=60)
    assert (worker.cancelled, worker.completed) == (before[0] + 2, before[1])
    assert "fmoe_requests_cancelled_total" in httpx.get(srv.url + "/metrics").text
    # the server goes on serving
    assert _chat(_oa(srv), _script("still here"), extra_body=NO_THINK).choices[0].message.content == "still here"


def test_metrics(server: BackgroundServer) -> None:
    _chat(_oa(server), "hi", max_tokens=2)
    text = httpx.get(server.url + "/metrics").text
    for name in (
        'fmoe_requests_total{api="openai",status="200"}',
        "fmoe_queue_depth 0",
        "fmoe_generated_tokens_total",
        "fmoe_decode_tokens_per_second",
        'fmoe_experts_hit_rate{tier="memory"}',
        'fmoe_experts_hit_rate{tier="disk"}',
        "fmoe_prompt_tokens_total",
    ):
        assert name in text, name


# ---- the synthetic model, Anthropic -------------------------------------------------------------
def test_anthropic_messages_plain_and_streamed(server: BackgroundServer) -> None:
    client = _an(server)
    opts: dict[str, Any] = dict(
        model="m",
        max_tokens=10,
        system=SYSTEM,
        extra_body={"temperature": 0},
        thinking={"type": "disabled"},
        messages=[{"role": "user", "content": "What is the capital of France?"}],
    )
    raw = client.messages.with_raw_response.create(**opts)
    done = Message.model_validate(raw.http_response.json())
    assert done.stop_reason == "max_tokens" and done.usage.output_tokens == 10
    events = [
        TypeAdapter(RawMessageStreamEvent).validate_python(e.model_dump())
        for e in client.messages.create(stream=True, **opts)
    ]
    assert [e.type for e in events][:2] == ["message_start", "content_block_start"]
    assert [e.type for e in events][-2:] == ["message_delta", "message_stop"]
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta" and e.delta.type == "text_delta")
    assert [b.type for b in done.content] == ["text"] and text == done.content[0].text  # type: ignore[union-attr]
    with client.messages.stream(**opts) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == done.content[0].text and final.stop_reason == "max_tokens"  # type: ignore[union-attr]
    stop = done.content[0].text[3:5]  # type: ignore[union-attr]
    cut = client.messages.create(**{**opts, "stop_sequences": [stop]})
    assert cut.stop_reason == "stop_sequence" and cut.stop_sequence == stop


# ---- scripted outputs: tool calls, reasoning, malformed calls -----------------------------------
CALL = render_call("get_weather", {"city": "Paris", "days": 3, "metric": True, "hours": [6, 12]})


def _script(text: str) -> str:
    return "SCRIPT:" + text.replace("\n", "\\n")


def test_openai_tool_calls_and_reasoning_from_scripted_output(
    scripted: tuple[BackgroundServer, ScriptedEngine],
) -> None:
    srv, _ = scripted
    client = _oa(srv)
    content = _script(f"The user wants weather.</think>\n\nLet me look.\n\n{CALL}")
    opts = dict(
        messages=[{"role": "user", "content": content}],
        tools=[WEATHER],
        max_tokens=200,
        extra_body={"chat_template_kwargs": {"enable_thinking": True}},
    )
    done = _raw_chat(client, **opts)
    msg = done.choices[0].message
    assert done.choices[0].finish_reason == "tool_calls"
    assert msg.content == "Let me look.\n\n" and getattr(msg, "reasoning_content", None) == "The user wants weather."
    assert msg.tool_calls is not None and len(msg.tool_calls) == 1
    call = msg.tool_calls[0]
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"city": "Paris", "days": 3, "metric": True, "hours": [6, 12]}  # type: ignore[union-attr]
    chunks = _streamed_chat(client, **opts)
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(d.content or "" for d in deltas) == msg.content
    assert "".join(getattr(d, "reasoning_content", None) or "" for d in deltas) == "The user wants weather."
    streamed_calls = [t for d in deltas for t in d.tool_calls or []]
    assert [(t.index, t.function.name, json.loads(t.function.arguments or "")) for t in streamed_calls] == [  # type: ignore[union-attr]
        (0, "get_weather", {"city": "Paris", "days": 3, "metric": True, "hours": [6, 12]})
    ]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.parametrize(
    "bad",
    [
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n",  # never closed
        render_call("launch_rockets", {"n": 1}),  # not one of the tools
        render_call("get_weather", {"city": "Paris", "days": "three"}),  # not an integer
        '<tool_call>\n{"name": "get_weather"}\n</tool_call>',  # JSON, not the XML form
    ],
)
def test_malformed_tool_call_comes_back_as_text(scripted: tuple[BackgroundServer, ScriptedEngine], bad: str) -> None:
    srv, _ = scripted
    messages = [{"role": "user", "content": _script("Calling." + bad)}]
    done = _raw_chat(_oa(srv), messages=messages, tools=[WEATHER], max_tokens=200, extra_body=NO_THINK)
    assert done.choices[0].finish_reason == "stop" and not done.choices[0].message.tool_calls
    assert done.choices[0].message.content == "Calling." + bad
    an = _an(srv).messages.create(
        model="m",
        max_tokens=200,
        messages=messages,
        thinking={"type": "disabled"},
        tools=[{"name": "get_weather", "input_schema": WEATHER["function"]["parameters"]}],
    )
    assert an.stop_reason == "end_turn" and [b.type for b in an.content] == ["text"]
    assert "fmoe_tool_calls_malformed_total" in httpx.get(srv.url + "/metrics").text


def test_anthropic_tool_use_and_thinking_from_scripted_output(
    scripted: tuple[BackgroundServer, ScriptedEngine],
) -> None:
    srv, fake = scripted
    client = _an(srv)
    tools = [{"name": "get_weather", "description": "Weather", "input_schema": WEATHER["function"]["parameters"]}]
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "need a tool", "signature": ""},
                {"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {"city": "Paris"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny, 24 C"},
                {"type": "text", "text": _script(f"Hmm.</think>\n\n{CALL}")},
            ],
        },
    ]
    opts: dict[str, Any] = dict(
        model="m",
        max_tokens=300,
        system="Be useful.",
        tools=tools,
        messages=history,
        thinking={"type": "enabled", "budget_tokens": 1024},
    )
    raw = client.messages.with_raw_response.create(**opts)
    done = Message.model_validate(raw.http_response.json())
    assert done.stop_reason == "tool_use"
    assert [b.type for b in done.content] == ["thinking", "tool_use"]
    assert done.content[0].thinking == "Hmm."  # type: ignore[union-attr]
    use = done.content[1]
    assert use.name == "get_weather" and use.input == {"city": "Paris", "days": 3, "metric": True, "hours": [6, 12]}  # type: ignore[union-attr]
    prompt = fake.prompts[-1]  # the history was rendered: the call and its result are in the prompt
    assert "<tool_response>\nsunny, 24 C\n</tool_response>" in prompt and "<function=get_weather>" in prompt
    assert "Be useful." in prompt and '"name": "get_weather"' in prompt
    events = [
        TypeAdapter(RawMessageStreamEvent).validate_python(e.model_dump())
        for e in client.messages.create(stream=True, **opts)
    ]
    with client.messages.stream(**opts) as stream:
        final = stream.get_final_message()
    assert [b.type for b in final.content] == ["thinking", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == use.input  # type: ignore[union-attr]
    assert any(e.type == "content_block_delta" and e.delta.type == "input_json_delta" for e in events)


def test_response_format_and_length_with_scripted_output(scripted: tuple[BackgroundServer, ScriptedEngine]) -> None:
    srv, fake = scripted
    client = _oa(srv)
    done = _chat(client, _script('{"a": 1}'), response_format={"type": "json_object"}, extra_body=NO_THINK)
    assert json.loads(done.choices[0].message.content) == {"a": 1}
    assert "Respond with one valid JSON object" in fake.prompts[-1]
    cut = _chat(client, _script("one two three four five six seven"), max_tokens=2, extra_body=NO_THINK)
    assert cut.choices[0].finish_reason == "length" and cut.usage.completion_tokens == 2


def test_queue_full_is_503_with_retry_after(scripted: tuple[BackgroundServer, ScriptedEngine]) -> None:
    srv, fake = scripted
    worker = worker_of(srv.app)
    assert isinstance(worker, Worker)
    fake.gate = threading.Event()
    try:
        with ThreadPoolExecutor(3) as pool:
            running = [pool.submit(_chat, _oa(srv), _script("ok"), extra_body=NO_THINK) for _ in range(3)]
            deadline = time.monotonic() + 30
            while not (worker.busy and worker.depth == 2):  # one answering, two waiting: the queue is full
                assert time.monotonic() < deadline
                time.sleep(0.01)
            with pytest.raises(openai.InternalServerError) as info:
                _chat(_oa(srv), _script("no room"), extra_body=NO_THINK)
            assert info.value.status_code == 503 and info.value.response.headers["retry-after"] == "2"
            with pytest.raises(anthropic.ServiceUnavailableError):
                _an(srv).messages.create(model="m", max_tokens=5, messages=[{"role": "user", "content": "x"}])
            fake.gate.set()
            assert [f.result().choices[0].message.content for f in running] == ["ok"] * 3
    finally:
        fake.gate = None


# ---- load ---------------------------------------------------------------------------------------
def test_bounded_load_every_answer_exact_or_refused(engine: Engine) -> None:
    """16 clients, mixed streaming and not, sharing system prompts: every request is answered exactly
    as it is answered alone, or refused with 503; none lost."""
    app = create_app(lambda: engine, model_id="tiny", max_queue=6, owns_engine=False)
    requests = [
        dict(
            messages=[{"role": "system", "content": SYSTEM}, {"role": "user", "content": q}],
            max_tokens=n,
            temperature=t,
            seed=7,
            extra_body=NO_THINK,
        )
        for q, n, t in (
            ("What is the capital of France?", 12, 0),
            ("Write a poem about the sea.", 16, 0.8),
            ("How far does a train go in three hours?", 10, 0),
            ("Say hello.", 8, 1.0),
        )
    ]

    def ask(srv: BackgroundServer, i: int, stream: bool) -> str | None:
        try:
            if stream:
                return "".join(
                    c.choices[0].delta.content or "" for c in _streamed_chat(_oa(srv), **requests[i]) if c.choices
                )
            return _raw_chat(_oa(srv), **requests[i]).choices[0].message.content or ""
        except openai.InternalServerError as exc:
            assert exc.status_code == 503
            return None

    with BackgroundServer(app) as srv:
        _ready(srv)
        alone = [ask(srv, i, False) for i in range(len(requests))]
        jobs = [(c, r, (c + r) % len(requests), (c + r) % 2 == 0) for c in range(16) for r in range(3)]

        def client(c: int) -> list[tuple[int, str | None]]:
            return [(i, ask(srv, i, stream)) for cc, _, i, stream in jobs if cc == c]

        with ThreadPoolExecutor(16) as pool:
            results = [x for part in pool.map(client, range(16)) for x in part]
    assert len(results) == len(jobs)  # none lost
    answered = [(i, text) for i, text in results if text is not None]
    assert answered, "every request was refused"
    for i, text in answered:
        assert text == alone[i]
    # the server's own count agrees: every request it took was answered, the rest refused at once
    worker = worker_of(app)
    assert worker is not None and worker.failed == 0 and worker.cancelled == 0
    assert worker.completed == len(requests) + len(answered)
    assert app.state.fmoe.metrics.rejected == len(results) - len(answered)


def test_the_stop_string_of_an_answer_is_found_whether_its_stop_token_is_pending_or_fed(engine: Engine) -> None:
    """A request ended by a stop token names no stop sequence, whether that token waits in the
    session or a greedy step queued ahead on a GPU fed it already; one ended by a stop string names it."""
    from fmoe.runtime.serve.worker import _stop_sequence
    from fmoe.runtime.state import SequenceState

    ids = engine.tokenizer.encode("one two. three")
    stop = next(iter(engine.stop_ids))
    timing = GenerationTiming(0, 0, 0, 0, 0, "", "", 0, PhaseTiming(1), PhaseTiming(1))
    result = GenerationResult("one two", ids, 0, 0, "stop", timing)
    pending = Session(SequenceState([]), list(ids), [stop])
    fed = Session(SequenceState([]), [*ids, stop], [])
    assert _stop_sequence(engine, pending, result, ["three"]) is None
    assert _stop_sequence(engine, fed, result, ["three"]) is None
    by_string = Session(SequenceState([]), list(ids), [])
    assert _stop_sequence(engine, by_string, result, ["zz", "three"]) == "three"
