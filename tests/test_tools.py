"""Reading the model's output: reasoning, answer text and Qwen3.5 XML tool calls typed by schema,
the same whether the text arrives at once or a character at a time."""

from __future__ import annotations

import json

import pytest

from fmoe.runtime.text.tools import MalformedCall, OutputParser, convert_value, parse_output, render_call

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "search",
            "parameters": {
                "type": "object",
                "properties": {
                    "query": {"type": "string"},
                    "limit": {"type": "integer"},
                    "score": {"type": "number"},
                    "exact": {"type": "boolean"},
                    "tags": {"type": "array"},
                    "filters": {"type": "object"},
                    "maybe": {"type": ["integer", "null"]},
                    "mode": {"enum": ["a", "b"]},
                },
            },
        },
    },
    {"name": "bare", "parameters": {"type": "object", "properties": {}}},
]


def _stream(text: str, *, thinking: bool, tools: list | None = TOOLS, size: int = 1) -> tuple[str, str, list]:
    parser = OutputParser(thinking=thinking, tools=tools)
    events = []
    for i in range(0, len(text), size):
        events += parser.feed(text[i : i + size])
    events += parser.finish()
    reasoning = "".join(e.text for e in events if e.kind == "reasoning")
    content = "".join(e.text for e in events if e.kind == "content")
    return reasoning, content, [(e.call.name, e.call.arguments) for e in events if e.call is not None]


CASES = [
    # (text, thinking, reasoning, content, calls)
    ("plan it</think>\n\nHello!", True, "plan it", "Hello!", []),
    ("all thought, cut off", True, "all thought, cut off", "", []),
    ("<think>\nhm</think>\n\nHi", False, "hm", "Hi", []),
    ("Just text <b>bold</b> and </think> here", False, "", "Just text <b>bold</b> and </think> here", []),
    (
        "x</think>\n\nOk.\n\n"
        + render_call(
            "search",
            {
                "query": "a b\n c",
                "limit": 3,
                "score": 0.5,
                "exact": False,
                "tags": ["x"],
                "filters": {"k": 1},
                "maybe": None,
                "mode": "b",
            },
        ),
        True,
        "x",
        "Ok.\n\n",
        [
            (
                "search",
                {
                    "query": "a b\n c",
                    "limit": 3,
                    "score": 0.5,
                    "exact": False,
                    "tags": ["x"],
                    "filters": {"k": 1},
                    "maybe": None,
                    "mode": "b",
                },
            )
        ],
    ),
    (
        render_call("search", {"query": "1"}) + "\n" + render_call("bare", {"any": [1, 2]}),
        False,
        "",
        "",
        [("search", {"query": "1"}), ("bare", {"any": [1, 2]})],
    ),
    (
        "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n",
        False,
        "",
        "<tool_call>\n<function=search>\n<parameter=query>\nq\n</parameter>\n",
        [],
    ),
    ("A" + render_call("nope", {}), False, "", "A" + render_call("nope", {}), []),
    ('<tool_call>{"name": "search"}</tool_call>', False, "", '<tool_call>{"name": "search"}</tool_call>', []),
    (
        "<tool_call>\n<function=search>\nstray\n<parameter=query>\nq\n</parameter>\n</function>\n</tool_call>",
        False,
        "",
        "<tool_call>\n<function=search>\nstray\n<parameter=query>\nq\n</parameter>\n</function>\n</tool_call>",
        [],
    ),
]


@pytest.mark.parametrize("case", range(len(CASES)))
def test_output_parsing_whole_and_streamed(case: int) -> None:
    text, thinking, reasoning, content, calls = CASES[case]
    whole = parse_output(text, thinking=thinking, tools=TOOLS)
    assert (whole.reasoning, whole.content, [(c.name, c.arguments) for c in whole.calls]) == (reasoning, content, calls)
    assert bool(whole.malformed) == ("<tool_call>" in content)
    for size in (1, 2, 7):  # any chunking gives the same answer
        assert _stream(text, thinking=thinking, size=size) == (reasoning, content, calls)


def test_without_tools_calls_stay_text() -> None:
    text = render_call("search", {"query": "q"})
    assert _stream(text, thinking=False, tools=None) == ("", text, [])


def test_values_typed_by_schema() -> None:
    assert convert_value("42", {"type": "integer"}) == 42
    assert convert_value(" 4.0 ", {"type": "integer"}) == 4
    assert convert_value("007", {"type": "string"}) == "007"
    assert convert_value("TRUE", {"type": "boolean"}) is True
    assert convert_value("{'a': 1}", {"type": "object"}) == {"a": 1}  # a Python literal is accepted
    assert convert_value("5", {"anyOf": [{"type": "string"}, {"type": "integer"}]}) == 5
    assert convert_value("hello", {"type": ["integer", "string"]}) == "hello"
    assert convert_value("[1, 2]", None) == [1, 2] and convert_value("plain", None) == "plain"
    for raw, schema in (
        ("x", {"type": "integer"}),
        ("1.5", {"type": "integer"}),
        ("yes", {"type": "boolean"}),
        ("[1]", {"type": "object"}),
        ("true", {"type": "number"}),
    ):
        with pytest.raises(MalformedCall):
            convert_value(raw, schema)


def test_call_ids_and_json_arguments() -> None:
    calls = parse_output(render_call("search", {"query": "é"}) * 2, thinking=False, tools=TOOLS).calls
    assert len(calls) == 2 and calls[0].id != calls[1].id
    assert json.loads(calls[0].arguments_json) == {"query": "é"}
