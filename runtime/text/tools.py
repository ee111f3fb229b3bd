"""Reading the model's output: the ``<think>`` part, the answer and Qwen3.5's XML tool calls.

The model writes (docs/SERVING.md has the whole format)::

    reasoning...</think>

    answer text<tool_call>
    <function=NAME>
    <parameter=ARG>
    value
    </parameter>
    </function>
    </tool_call>

:class:`OutputParser` takes the text as it streams and turns it into events (reasoning text,
answer text, whole tool calls) the moment each is certain; a complete answer is the same parser
fed all at once, so a streamed answer always equals the non-streamed one. Parameter values are
typed by the tool's JSON schema. A tool call that does not parse (unclosed, no function, an
unknown tool, a value that does not fit its type) is given back as answer text, never raised.
"""

from __future__ import annotations

import ast
import json
import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

THINK_START, THINK_END = "<think>", "</think>"
CALL_START, CALL_END = "<tool_call>", "</tool_call>"

_FUNCTION = re.compile(r"\s*<function=([^>\n]+)>\n?(.*?)</function>\s*\Z", re.S)
_PARAMETER = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


@dataclass
class ToolCall:
    """A parsed call: the tool's name and its arguments (a JSON object typed by the tool's schema)."""

    name: str
    arguments: dict[str, Any]
    id: str = field(default_factory=lambda: uuid.uuid4().hex[:24])

    @property
    def arguments_json(self) -> str:
        return json.dumps(self.arguments, ensure_ascii=False)


@dataclass
class Event:
    """One piece of output: ``kind`` is "reasoning" or "content" (with ``text``) or "tool_call" (with ``call``)."""

    kind: str
    text: str = ""
    call: ToolCall | None = None


class MalformedCall(ValueError):
    pass


def tool_schemas(tools: Sequence[Mapping[str, Any]] | None) -> dict[str, dict[str, Any]]:
    """name -> parameters schema, from OpenAI-style tools (``{"type": "function", "function": {...}}``)
    or bare function objects (``{"name", "parameters"}``)."""
    out: dict[str, dict[str, Any]] = {}
    for tool in tools or ():
        fn = tool.get("function", tool)
        if isinstance(fn, Mapping) and isinstance(fn.get("name"), str):
            params = fn.get("parameters")
            out[fn["name"]] = dict(params) if isinstance(params, Mapping) else {}
    return out


def parse_call(body: str, schemas: Mapping[str, Mapping[str, Any]]) -> ToolCall:
    """One ``<tool_call>`` body (between the tags) as a ToolCall; MalformedCall says what is wrong."""
    m = _FUNCTION.match(body)
    if m is None:
        raise MalformedCall("no <function=NAME>...</function> in the tool call")
    name, inner = m.group(1).strip(), m.group(2)
    if name not in schemas:
        raise MalformedCall(f"the model called {name!r}, which is not one of the request's tools")
    props = schemas[name].get("properties")
    props = props if isinstance(props, Mapping) else {}
    args: dict[str, Any] = {}
    end = 0
    for p in _PARAMETER.finditer(inner):
        if inner[end : p.start()].strip():
            raise MalformedCall("text between the parameters of the tool call")
        end = p.end()
        key = p.group(1).strip()
        args[key] = convert_value(p.group(2), props.get(key))
    if inner[end:].strip():
        raise MalformedCall("text after the last parameter of the tool call")
    return ToolCall(name, args)


def convert_value(raw: str, schema: Any) -> Any:
    """A parameter's text as the JSON type its schema declares (strings stay verbatim); without a
    schema, JSON when it parses as JSON, else the text."""
    types = _schema_types(schema)
    if not types:
        try:
            return json.loads(raw)
        except ValueError:
            return raw
    # try every declared non-string type first: "5" for ["integer", "string"] is the integer 5
    for t in sorted(types, key=lambda t: t == "string"):
        ok, value = _as_type(raw, t)
        if ok:
            return value
    raise MalformedCall(f"value {raw[:40]!r} is not of type {'/'.join(sorted(types))}")


def _schema_types(schema: Any) -> set[str]:
    if not isinstance(schema, Mapping):
        return set()
    t = schema.get("type")
    if isinstance(t, str):
        return {t}
    if isinstance(t, list):
        return {x for x in t if isinstance(x, str)}
    out: set[str] = set()
    for key in ("anyOf", "oneOf"):
        for sub in schema.get(key) or ():
            out |= _schema_types(sub)
    if "enum" in schema and not out:
        out.add("string" if all(isinstance(v, str) for v in schema["enum"]) else "any")
    return out


def _as_type(raw: str, t: str) -> tuple[bool, Any]:
    text = raw.strip()
    if t == "string":
        return True, raw
    if t == "any":
        return True, convert_value(raw, None)
    if t == "null":
        return text in ("null", "None"), None
    if t == "boolean":
        low = text.lower()
        return low in ("true", "false"), low == "true"
    if t in ("integer", "number"):
        try:
            value = json.loads(text)
        except ValueError:
            return False, None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False, None
        if t == "integer":
            return (isinstance(value, int) or float(value).is_integer()), int(value)
        return True, value
    if t in ("object", "array"):
        want = dict if t == "object" else list
        for load in (json.loads, ast.literal_eval):  # models sometimes write Python literals
            try:
                value = load(text)
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                continue
            if isinstance(value, want):
                return True, value
        return False, None
    return False, None


class OutputParser:
    """Incremental reader of the generated text. ``thinking``: the prompt opened a ``<think>`` block
    (the generation prompt ends with it), so output starts as reasoning. ``tools``: the request's
    tools (tool calls are parsed only when it has some)."""

    def __init__(self, *, thinking: bool, tools: Sequence[Mapping[str, Any]] | None = None) -> None:
        self.schemas = tool_schemas(tools)
        self.parse_tools = bool(self.schemas)
        self._mode = "reasoning" if thinking else "start"
        self._buf = ""  # text not given out yet
        self.calls: list[ToolCall] = []
        self.malformed: list[str] = []  # why each malformed call was refused, in order

    def feed(self, text: str) -> list[Event]:
        self._buf += text
        return self._drain(final=False)

    def finish(self) -> list[Event]:
        """Whatever is still held (an unclosed tool call is malformed: it becomes answer text)."""
        return self._drain(final=True)

    # A held tail that may be the start of a tag stays in the buffer until the next text decides it.
    def _drain(self, final: bool) -> list[Event]:
        out: list[Event] = []
        while True:
            before = (self._mode, len(self._buf))
            if self._mode == "start":
                self._start(final)
            elif self._mode == "reasoning":
                self._reasoning(out, final)
            elif self._mode == "think_open":
                self._skip_newlines("reasoning", final)
            elif self._mode == "after_think":
                self._skip_newlines("content", final)
            elif self._mode == "content":
                self._content(out, final)
            elif self._mode == "call":
                self._call(out, final)
            elif self._mode == "after_call":
                self._after_call(final)
            if (self._mode, len(self._buf)) == before:
                return _merge(out)

    def _start(self, final: bool) -> None:
        # a model whose prompt did not open <think> may open it itself
        stripped = self._buf.lstrip()
        if stripped.startswith(THINK_START):
            self._buf, self._mode = stripped[len(THINK_START) :], "think_open"
        elif final or not THINK_START.startswith(stripped):
            self._mode = "content"

    def _reasoning(self, out: list[Event], final: bool) -> None:
        i = self._buf.find(THINK_END)
        if i >= 0:
            _emit(out, "reasoning", self._buf[:i])
            self._buf, self._mode = self._buf[i + len(THINK_END) :], "after_think"
            return
        keep = 0 if final else _partial_tag(self._buf, THINK_END)
        _emit(out, "reasoning", self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]

    def _skip_newlines(self, then: str, final: bool) -> None:
        # "<think>\n" and "</think>\n\n" frame the parts: those newlines belong to neither
        self._buf = self._buf.lstrip("\n")
        if self._buf or final:
            self._mode = then

    def _content(self, out: list[Event], final: bool) -> None:
        if not self.parse_tools:
            _emit(out, "content", self._buf)
            self._buf = ""
            return
        i = self._buf.find(CALL_START)
        if i >= 0:
            _emit(out, "content", self._buf[:i])
            self._buf, self._mode = self._buf[i:], "call"
            return
        keep = 0 if final else _partial_tag(self._buf, CALL_START)
        _emit(out, "content", self._buf[: len(self._buf) - keep])
        self._buf = self._buf[len(self._buf) - keep :]

    def _call(self, out: list[Event], final: bool) -> None:
        j = self._buf.find(CALL_END)
        if j < 0:
            if final:  # cut off inside the call
                self.malformed.append("the tool call was not closed with </tool_call>")
                _emit(out, "content", self._buf)
                self._buf, self._mode = "", "content"
            return
        raw = self._buf[: j + len(CALL_END)]
        self._buf, self._mode = self._buf[j + len(CALL_END) :], "content"
        try:
            call = parse_call(raw[len(CALL_START) : j], self.schemas)
        except MalformedCall as exc:
            self.malformed.append(str(exc))
            _emit(out, "content", raw)
            return
        self.calls.append(call)
        out.append(Event("tool_call", call=call))
        self._mode = "after_call"

    def _after_call(self, final: bool) -> None:
        # whitespace between calls (or after the last) belongs to no one
        self._buf = self._buf.lstrip()
        if self._buf or final:
            self._mode = "content"


def _emit(out: list[Event], kind: str, text: str) -> None:
    if text:
        out.append(Event(kind, text))


def _merge(events: list[Event]) -> list[Event]:
    """Adjacent text events of one kind joined (fewer, larger stream chunks)."""
    merged: list[Event] = []
    for e in events:
        if merged and e.kind != "tool_call" and merged[-1].kind == e.kind:
            merged[-1] = Event(e.kind, merged[-1].text + e.text)
        else:
            merged.append(e)
    return merged


def _partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of ``text`` that is a proper start of ``tag`` (held back)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


@dataclass
class ParsedOutput:
    reasoning: str
    content: str
    calls: list[ToolCall]
    malformed: list[str]


def parse_output(text: str, *, thinking: bool, tools: Sequence[Mapping[str, Any]] | None = None) -> ParsedOutput:
    """A whole answer at once (the same parser as streaming)."""
    parser = OutputParser(thinking=thinking, tools=tools)
    events = parser.feed(text) + parser.finish()
    return ParsedOutput(
        "".join(e.text for e in events if e.kind == "reasoning"),
        "".join(e.text for e in events if e.kind == "content"),
        parser.calls,
        parser.malformed,
    )


def render_call(name: str, arguments: Mapping[str, Any]) -> str:
    """A call in the model's own XML form (the chat REPL shows calls this way; tests script them)."""
    params = "".join(
        f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n</parameter>\n"
        for k, v in arguments.items()
    )
    return f"{CALL_START}\n<function={name}>\n{params}</function>\n{CALL_END}"
