"""The Anthropic-compatible endpoint: ``POST /v1/messages`` (non-streaming, and the streaming
events message_start ... message_stop), with system prompts, thinking blocks, tool_use and
tool_result blocks, so agents that speak this API can use a local model."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from fmoe.runtime.serve.common import (
    Final,
    RequestError,
    Run,
    ServerState,
    chat_prompt,
    run_unless_disconnected,
    sampling_checked,
)
from fmoe.runtime.text.tools import Event, ToolCall

API = "anthropic"

_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "request_too_large",
    503: "overloaded_error",
}


class _Model(BaseModel):
    model_config = ConfigDict(extra="allow")


class MessageIn(_Model):
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class ToolIn(_Model):
    name: str = Field(min_length=1, max_length=128)
    description: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=lambda: {"type": "object"})


class MessagesRequest(_Model):
    model: str
    max_tokens: int = Field(ge=1)
    messages: list[MessageIn] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0, le=1)
    top_p: float | None = None
    top_k: int | None = None
    stream: bool = False
    tools: list[ToolIn] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


def error(status: int, message: str, **_: Any) -> JSONResponse:
    """Anthropic's error envelope."""
    kind = _ERROR_TYPES.get(status, "api_error")
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


# ---- request -> chat template -------------------------------------------------------------------
def _block_text(blocks: str | list[Any], where: str) -> str:
    if isinstance(blocks, str):
        return blocks
    out = []
    for i, b in enumerate(blocks):
        if not isinstance(b, dict) or b.get("type") != "text" or not isinstance(b.get("text"), str):
            raise RequestError(f"{where}[{i}]: only text blocks are supported here (this model reads text)", where)
        out.append(b["text"])
    return "".join(out)


def template_messages(req: MessagesRequest) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    if req.system:
        out.append({"role": "system", "content": _block_text(req.system, "system")})
    for i, m in enumerate(req.messages):
        where = f"messages[{i}].content"
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        if m.role == "assistant":
            out.append(_assistant(m.content, where))
            continue
        text: list[str] = []
        for j, b in enumerate(m.content):  # tool results become tool turns; text stays a user turn
            kind = b.get("type") if isinstance(b, dict) else None
            if kind == "tool_result":
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                content = b.get("content") or ""
                result = _block_text(content, f"{where}[{j}].content")
                if b.get("is_error"):
                    result = f"Error: {result}"
                out.append({"role": "tool", "content": result, "tool_call_id": b.get("tool_use_id")})
            elif kind == "text" and isinstance(b.get("text"), str):
                text.append(b["text"])
            else:
                raise RequestError(f"{where}[{j}]: block type {kind!r} is not supported in a user turn", where)
        if text:
            out.append({"role": "user", "content": "".join(text)})
    return out


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"role": "assistant", "content": ""}
    text: list[str] = []
    calls: list[dict[str, Any]] = []
    for j, b in enumerate(blocks):
        kind = b.get("type")
        if kind == "text":
            text.append(str(b.get("text", "")))
        elif kind == "thinking":
            msg["reasoning_content"] = str(b.get("thinking", ""))
        elif kind == "redacted_thinking":
            continue
        elif kind == "tool_use":
            args = b.get("input")
            if not isinstance(args, dict) or not isinstance(b.get("name"), str):
                raise RequestError(f"{where}[{j}]: a tool_use block needs a name and an object input", where)
            calls.append({"id": b.get("id"), "type": "function", "function": {"name": b["name"], "arguments": args}})
        else:
            raise RequestError(f"{where}[{j}]: block type {kind!r} is not supported in an assistant turn", where)
    msg["content"] = "".join(text)
    if calls:
        msg["tool_calls"] = calls
    return msg


def _thinking(req: MessagesRequest, state: ServerState) -> bool:
    kind = (req.thinking or {}).get("type")
    if kind in ("enabled", "adaptive"):
        return True
    if kind == "disabled":
        return False
    return state.thinking


# ---- handler ------------------------------------------------------------------------------------
async def messages(request: Request, state: ServerState, body: dict[str, Any]) -> Response:
    req = MessagesRequest.model_validate(body)
    tools = (
        [
            {
                "type": "function",
                "function": {"name": t.name, "description": t.description or "", "parameters": t.input_schema},
            }
            for t in req.tools
        ]
        if req.tools
        else None
    )
    choice = (req.tool_choice or {}).get("type")
    defaults = state.sampling_defaults
    sampling = sampling_checked(
        max_tokens=req.max_tokens,
        temperature=defaults["temperature"] if req.temperature is None else req.temperature,
        top_p=defaults["top_p"] if req.top_p is None else req.top_p,
        top_k=defaults["top_k"] if req.top_k is None else req.top_k,
        stop=list(req.stop_sequences or []),
    )
    prompt = chat_prompt(
        state.engine,
        template_messages(req),
        tools=tools,
        thinking=_thinking(req, state),
        parse_tools=choice != "none",
    )
    run = Run(state, prompt, sampling, api=API)
    run.start()
    ident = f"msg_{uuid.uuid4().hex[:24]}"
    if req.stream:
        return StreamingResponse(
            _stream(run, state, ident, len(prompt.ids)),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
    outcome = await run_unless_disconnected(run, request.receive)
    if outcome is None:
        return Response(status_code=499)
    events, final = outcome
    content: list[dict[str, Any]] = []
    for e in events:  # blocks in the order the model wrote them
        kind = _block_kind(e)
        if content and kind != "tool_use" and content[-1]["type"] == kind:
            content[-1][_TEXT_KEY[kind]] += e.text
        elif kind == "tool_use" and e.call is not None:
            content.append(_tool_use(e.call))
        else:
            content.append(_empty_block(kind) | {_TEXT_KEY[kind]: e.text})
    return JSONResponse(
        {
            "id": ident,
            "type": "message",
            "role": "assistant",
            "model": state.model_id,
            "content": content,
            "stop_reason": stop_reason(final),
            "stop_sequence": final.stop_sequence,
            "usage": _usage(final),
        }
    )


_TEXT_KEY = {"thinking": "thinking", "text": "text"}


def _block_kind(e: Event) -> str:
    return {"reasoning": "thinking", "content": "text", "tool_call": "tool_use"}[e.kind]


def _empty_block(kind: str) -> dict[str, Any]:
    return {"type": "thinking", "thinking": "", "signature": ""} if kind == "thinking" else {"type": "text", "text": ""}


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_use", "id": f"toolu_{call.id}", "name": call.name, "input": call.arguments}


def stop_reason(final: Final) -> str:
    if final.calls:
        return "tool_use"
    if final.finish == "length":
        return "max_tokens"
    return "stop_sequence" if final.stop_sequence is not None else "end_turn"


def _usage(final: Final) -> dict[str, Any]:
    # Anthropic counts cache reads apart: input_tokens are the prompt tokens computed afresh
    return {
        "input_tokens": final.prompt_tokens - final.cached_tokens,
        "output_tokens": final.completion_tokens,
        "cache_read_input_tokens": final.cached_tokens,
        "cache_creation_input_tokens": 0,
    }


def _event(name: str, doc: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(doc, ensure_ascii=False)}\n\n"


async def _stream(run: Run, state: ServerState, ident: str, prompt_tokens: int) -> AsyncIterator[str]:
    message = {
        "id": ident,
        "type": "message",
        "role": "assistant",
        "model": state.model_id,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": prompt_tokens, "output_tokens": 0},
    }
    yield _event("message_start", {"type": "message_start", "message": message})
    index = -1
    open_kind: str | None = None

    def close() -> list[str]:
        nonlocal open_kind
        out = []
        if open_kind == "thinking":
            delta = {"type": "signature_delta", "signature": ""}
            out.append(_event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}))
        if open_kind is not None:
            out.append(_event("content_block_stop", {"type": "content_block_stop", "index": index}))
        open_kind = None
        return out

    try:
        async for e in run.events():
            if isinstance(e, Final):
                for s in close():
                    yield s
                delta = {"stop_reason": stop_reason(e), "stop_sequence": e.stop_sequence}
                yield _event("message_delta", {"type": "message_delta", "delta": delta, "usage": _usage(e)})
                yield _event("message_stop", {"type": "message_stop"})
                return
            kind = _block_kind(e)
            if kind != open_kind or kind == "tool_use":
                for s in close():
                    yield s
                index += 1
                start = _tool_use(e.call) | {"input": {}} if e.call is not None else _empty_block(kind)
                yield _event(
                    "content_block_start", {"type": "content_block_start", "index": index, "content_block": start}
                )
                open_kind = kind
            if e.call is not None:
                delta = {"type": "input_json_delta", "partial_json": e.call.arguments_json}
            elif kind == "thinking":
                delta = {"type": "thinking_delta", "thinking": e.text}
            else:
                delta = {"type": "text_delta", "text": e.text}
            yield _event("content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta})
    except Exception as exc:  # headers are sent: the error travels as an error event
        message_text = (
            str(exc) if isinstance(exc, RequestError) else "internal error while generating (see the server log)"
        )
        kind = "invalid_request_error" if isinstance(exc, RequestError) else "api_error"
        yield _event("error", {"type": "error", "error": {"type": kind, "message": message_text}})
