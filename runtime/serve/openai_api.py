"""The OpenAI-compatible endpoints: ``GET /v1/models``, ``POST /v1/chat/completions``,
``POST /v1/completions`` (non-streaming, and SSE streaming that ends ``data: [DONE]``)."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fmoe.runtime.engine.results import TokenLogprob
from fmoe.runtime.serve.common import (
    Final,
    RequestError,
    Run,
    ServerState,
    chat_prompt,
    run_unless_disconnected,
    sampling_checked,
    text_prompt,
)
from fmoe.runtime.text.tools import Event, ToolCall

API = "openai"


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Model):
    name: str
    arguments: str | dict[str, Any] = "{}"


class ToolCallIn(_Model):
    id: str | None = None
    type: str = "function"
    function: FunctionCall


class Message(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class Tool(_Model):
    type: Literal["function"] = "function"
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool = False


class _Sampling(_Model):
    model: str | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int | None = None
    logprobs: bool | int | None = None


class ChatRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    tools: list[Tool] | None = None
    tool_choice: str | dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    top_logprobs: int | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    reasoning_effort: str | None = None


class CompletionRequest(_Sampling):
    prompt: str | list[str] | list[int]
    max_tokens: int | None = 16  # OpenAI's default for completions
    echo: bool = False
    suffix: str | None = None


# ---- errors -------------------------------------------------------------------------------------
def error(status: int, message: str, *, param: str | None = None) -> JSONResponse:
    """OpenAI's error envelope."""
    kind = "invalid_request_error" if status < 500 else "server_error"
    code = {401: "invalid_api_key", 404: "not_found", 503: "server_busy"}.get(status)
    body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
    return JSONResponse(body, status_code=status)


# ---- handlers -----------------------------------------------------------------------------------
async def models(request: Request, state: ServerState) -> Response:
    return JSONResponse(
        {
            "object": "list",
            "data": [{"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "fmoe"}],
        }
    )


def _sampling(req: _Sampling, max_tokens: int | None, state: ServerState, logprobs: int | None) -> Any:
    if req.n not in (None, 1):
        raise RequestError("n: only 1 choice per request is supported", "n")
    stop = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    limit = state.max_tokens_default if max_tokens is None else max_tokens
    defaults = state.sampling_defaults
    return sampling_checked(
        max_tokens=limit,
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_p=defaults["top_p"] if req.top_p is None else req.top_p,
        top_k=defaults["top_k"] if req.top_k is None else req.top_k,
        seed=req.seed,
        stop=stop,
        logprobs=logprobs,
    )


def _chat_logprobs(req: ChatRequest) -> int | None:
    if req.top_logprobs is not None and not req.logprobs:
        raise RequestError("top_logprobs: needs logprobs: true", "top_logprobs")
    return (req.top_logprobs or 0) if req.logprobs else None


def _completion_logprobs(req: CompletionRequest) -> int | None:
    n = req.logprobs
    if n is None or n is False:
        return None
    if n is True or not 0 <= int(n) <= 5:
        raise RequestError("logprobs: a whole number between 0 and 5 for completions", "logprobs")
    return int(n)


def _token(engine: Any, token: int) -> tuple[str, list[int]]:
    text = engine.tokenizer.decode([token], skip_special_tokens=False)
    return text, list(text.encode("utf-8"))


def logprobs_chat(engine: Any, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI chat's ``logprobs``: every generated token (the reasoning's too), with alternatives."""
    if lps is None:
        return None
    content = []
    for lp in lps:
        text, raw = _token(engine, lp.token)
        top = []
        for t, v in lp.top:
            alt, alt_raw = _token(engine, t)
            top.append({"token": alt, "logprob": v, "bytes": alt_raw})
        content.append({"token": text, "logprob": lp.logprob, "bytes": raw, "top_logprobs": top})
    return {"content": content, "refusal": None}


def logprobs_completion(engine: Any, lps: list[TokenLogprob] | None) -> dict[str, Any] | None:
    """OpenAI completions' ``logprobs``: tokens, their logprobs, alternatives, text offsets."""
    if lps is None:
        return None
    tokens = [_token(engine, lp.token)[0] for lp in lps]
    offsets, at = [], 0
    for t in tokens:
        offsets.append(at)
        at += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [lp.logprob for lp in lps],
        "top_logprobs": [{_token(engine, t)[0]: v for t, v in lp.top} for lp in lps],
        "text_offset": offsets,
    }


def _text(content: str | list[dict[str, Any]] | None, where: str) -> str:
    """A message's text: a string, or text parts joined (this model reads text only)."""
    if content is None or isinstance(content, str):
        return content or ""
    out = []
    for i, part in enumerate(content):
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise RequestError(f"{where}.content[{i}]: only text parts are supported (this model reads text)", where)
        out.append(part["text"])
    return "".join(out)


def _arguments(raw: str | dict[str, Any], where: str) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        raise RequestError(f"{where}.function.arguments: not valid JSON", where) from None
    if not isinstance(value, dict):
        raise RequestError(f"{where}.function.arguments: must be a JSON object", where)
    return value


def template_messages(messages: list[Message]) -> list[dict[str, Any]]:
    """OpenAI messages in the chat template's form."""
    out: list[dict[str, Any]] = []
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        role = "system" if m.role == "developer" else m.role
        msg: dict[str, Any] = {"role": role, "content": _text(m.content, where)}
        if m.role == "assistant":
            if m.tool_calls:
                msg["tool_calls"] = [
                    {
                        "id": c.id,
                        "type": "function",
                        "function": {"name": c.function.name, "arguments": _arguments(c.function.arguments, where)},
                    }
                    for c in m.tool_calls
                ]
            if m.reasoning_content:
                msg["reasoning_content"] = m.reasoning_content
        elif m.role == "tool":
            msg["tool_call_id"] = m.tool_call_id
        out.append(msg)
    return out


def _json_mode(fmt: dict[str, Any] | None) -> dict[str, Any] | bool | None:
    if fmt is None or fmt.get("type") in (None, "text"):
        return None
    if fmt.get("type") == "json_object":
        return True
    if fmt.get("type") == "json_schema":
        schema = (fmt.get("json_schema") or {}).get("schema")
        return schema if isinstance(schema, dict) else True
    raise RequestError(f"response_format.type {fmt.get('type')!r}: one of text, json_object, json_schema")


def _thinking(req: ChatRequest, state: ServerState) -> bool:
    kw = req.chat_template_kwargs or {}
    if isinstance(kw.get("enable_thinking"), bool):
        return bool(kw["enable_thinking"])
    if req.reasoning_effort is not None:
        return req.reasoning_effort not in ("none", "minimal")
    return state.thinking


async def chat_completions(request: Request, state: ServerState, body: dict[str, Any]) -> Response:
    req = ChatRequest.model_validate(body)
    sampling = _sampling(req, req.max_completion_tokens or req.max_tokens, state, _chat_logprobs(req))
    tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
    prompt = chat_prompt(
        state.engine,
        template_messages(req.messages),
        tools=tools,
        thinking=_thinking(req, state),
        parse_tools=req.tool_choice != "none",
        json_schema=_json_mode(req.response_format),
    )
    run = Run(state, prompt, sampling, api=API)
    run.start()  # QueueFull -> 503 (the app's handler)
    ident, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_chat_stream(run, state, ident, created, include_usage))
    outcome = await run_unless_disconnected(run, request.receive)
    if outcome is None:
        return Response(status_code=499)
    events, final = outcome
    message: dict[str, Any] = {"role": "assistant", "content": _join(events, "content") or None}
    reasoning = _join(events, "reasoning")
    if reasoning:
        message["reasoning_content"] = reasoning
    if final.calls:
        message["tool_calls"] = [_tool_call(c) for c in final.calls]
    elif message["content"] is None:
        message["content"] = ""
    choice = {
        "index": 0,
        "message": message,
        "finish_reason": finish_reason(final),
        "logprobs": logprobs_chat(state.engine, final.logprobs),
    }
    return JSONResponse(_envelope("chat.completion", ident, created, state, [choice], usage=usage(final)))


async def completions(request: Request, state: ServerState, body: dict[str, Any]) -> Response:
    req = CompletionRequest.model_validate(body)
    if req.echo or req.suffix:
        raise RequestError("echo and suffix are not supported", "echo" if req.echo else "suffix")
    prompt_in: Any = req.prompt
    if isinstance(prompt_in, list) and prompt_in and isinstance(prompt_in[0], str):
        if len(prompt_in) != 1:
            raise RequestError("prompt: one prompt per request", "prompt")
        prompt_in = prompt_in[0]
    sampling = _sampling(req, req.max_tokens, state, _completion_logprobs(req))
    run = Run(state, text_prompt(state.engine, prompt_in), sampling, api=API)
    run.start()
    ident, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return _sse(_completion_stream(run, state, ident, created, include_usage))
    outcome = await run_unless_disconnected(run, request.receive)
    if outcome is None:
        return Response(status_code=499)
    events, final = outcome
    logprobs = logprobs_completion(state.engine, final.logprobs)
    choice = {"index": 0, "text": _join(events, "content"), "logprobs": logprobs, "finish_reason": final.finish}
    return JSONResponse(_envelope("text_completion", ident, created, state, [choice], usage=usage(final)))


# ---- pieces -------------------------------------------------------------------------------------
def _envelope(
    obj: str, ident: str, created: int, state: ServerState, choices: list[Any], **extra: Any
) -> dict[str, Any]:
    """The fields every OpenAI response and stream chunk carries around its choices."""
    return {"id": ident, "object": obj, "created": created, "model": state.model_id, "choices": choices, **extra}


def _join(events: list[Event], kind: str) -> str:
    return "".join(e.text for e in events if e.kind == kind)


def _tool_call(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f"call_{call.id}",
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments_json},
    }
    if index is not None:
        out["index"] = index
    return out


def finish_reason(final: Final) -> str:
    return "tool_calls" if final.calls else final.finish


def usage(final: Final) -> dict[str, Any]:
    return {
        "prompt_tokens": final.prompt_tokens,
        "completion_tokens": final.completion_tokens,
        "total_tokens": final.prompt_tokens + final.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": final.cached_tokens},
    }


def _sse(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events, media_type="text/event-stream", headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    )


def _data(doc: Any) -> str:
    return f"data: {json.dumps(doc, ensure_ascii=False)}\n\n"


def stream_error(exc: Exception) -> str:
    """An error after the stream began: one ``error`` event (the client raises it), then [DONE]."""
    message = str(exc) if isinstance(exc, RequestError) else "internal error while generating (see the server log)"
    kind = "invalid_request_error" if isinstance(exc, RequestError) else "server_error"
    return _data({"error": {"message": message, "type": kind, "param": None, "code": None}}) + "data: [DONE]\n\n"


async def _chat_stream(
    run: Run, state: ServerState, ident: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(delta: dict[str, Any], finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": logprobs}
        extra = {"usage": None} if include_usage else {}
        return _data(_envelope("chat.completion.chunk", ident, created, state, [choice], **extra))

    yield chunk({"role": "assistant", "content": ""})
    calls = 0
    try:
        async for e in run.events():
            if isinstance(e, Final):
                yield chunk({}, finish_reason(e), logprobs_chat(state.engine, e.logprobs))
                if include_usage:
                    yield _data(_envelope("chat.completion.chunk", ident, created, state, [], usage=usage(e)))
            elif e.kind == "tool_call" and e.call is not None:
                yield chunk({"tool_calls": [_tool_call(e.call, calls)]})
                calls += 1
            elif e.kind == "reasoning":
                yield chunk({"reasoning_content": e.text})
            else:
                yield chunk({"content": e.text})
    except Exception as exc:  # headers are sent: the error travels in the stream
        yield stream_error(exc)
        return
    yield "data: [DONE]\n\n"


async def _completion_stream(
    run: Run, state: ServerState, ident: str, created: int, include_usage: bool
) -> AsyncIterator[str]:
    def chunk(text: str, finish: str | None = None, logprobs: Any = None) -> str:
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        extra = {"usage": None} if include_usage else {}
        return _data(_envelope("text_completion", ident, created, state, [choice], **extra))

    try:
        async for e in run.events():
            if isinstance(e, Final):
                yield chunk("", e.finish, logprobs_completion(state.engine, e.logprobs))
                if include_usage:
                    yield _data(_envelope("text_completion", ident, created, state, [], usage=usage(e)))
            else:
                yield chunk(e.text)
    except Exception as exc:
        yield stream_error(exc)
        return
    yield "data: [DONE]\n\n"
