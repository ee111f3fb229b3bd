"""`fmoe chat`: the REPL driven through its commands in a pty, answers stopped between tokens, tool
calls confirmed before they run, and session files that resume with the same next tokens."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from support import assert_cli_error
from typer.testing import CliRunner

import fmoe
from fmoe.cli import app
from fmoe.errors import FmoeError
from fmoe.runtime.chat_repl import Chat, Repl, Settings, Tool, read_tools, set_option
from fmoe.runtime.diagnostics import build_packed
from fmoe.runtime.engine.engine import Engine
from fmoe.runtime.engine.results import GenerationChunk
from fmoe.runtime.engine.session import Session
from fmoe.runtime.engine.session_file import load_session, save_session
from fmoe.runtime.state import SequenceState
from fmoe.runtime.text.tools import render_call


@pytest.fixture(scope="module")
def packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_packed(tmp_path_factory.mktemp("chat"), seed=4)[1]


@pytest.fixture(scope="module")
def engine(packed: Path) -> Iterator[Engine]:
    with fmoe.load(packed) as e:
        yield e


def _repl(chat: Chat, lines: list[str], answers: list[bool] | None = None) -> tuple[Repl, list[str]]:
    out: list[str] = []
    feed = iter(lines)
    yes = iter(answers or [])

    def read(prompt: str) -> str:
        out.append(prompt)
        try:
            return next(feed)
        except StopIteration:
            raise EOFError from None

    return Repl(chat, read=read, write=out.append, confirm=lambda q: (out.append(q), next(yes))[1]), out


# ---- the REPL in a pty --------------------------------------------------------------------------
def test_repl_in_a_pty(packed: Path, tmp_path: Path) -> None:
    pexpect = pytest.importorskip("pexpect")
    env = {**os.environ, "TERM": "dumb", "COLUMNS": "200"}
    child = pexpect.spawn(
        sys.executable,
        ["-m", "fmoe", "chat", str(packed), "--no-think", "--tokens", "6", "--verbose"],
        env=env,
        encoding="utf-8",
        timeout=120,
    )
    try:
        child.expect(">>> ")
        child.sendline("/help")
        child.expect("/bye")
        child.expect(">>> ")
        child.sendline("Hello there")
        child.expect(r"prompt: \d+ tokens \(0 in the session\)")
        child.expect(">>> ")
        child.sendline('"""first line')
        child.expect(r"\.\.\. ")
        child.sendline('second line"""')
        child.expect(r"prompt: \d+ tokens \([1-9]\d* in the session\)")  # the second turn continues the session
        child.expect(">>> ")
        child.sendline("/set temperature -1")
        child.expect("/set temperature: must be a number >= 0")
        child.expect(">>> ")
        child.sendline("/set top_k 5")
        child.expect("Set top_k to 5.")
        child.sendline("/show")
        child.expect('"top_k": 5')
        child.expect(">>> ")
        child.sendline("/frobnicate")
        child.expect(r"unknown command /frobnicate \(see /help\)")
        child.expect(">>> ")
        child.sendline("/clear")
        child.expect("Cleared")
        child.sendline("again")
        child.expect(r"prompt: \d+ tokens \(0 in the session\)")  # a new conversation
        child.expect(">>> ")
        child.sendintr()  # Ctrl-C at the prompt does not quit
        child.expect("Use Ctrl-D or /bye to exit.")
        child.expect(">>> ")
        child.sendline("/bye")
        child.expect(pexpect.EOF)
    finally:
        child.close()
    assert child.exitstatus == 0
    # Ctrl-D quits too
    child = pexpect.spawn(sys.executable, ["-m", "fmoe", "chat", str(packed)], env=env, encoding="utf-8", timeout=120)
    child.expect(">>> ")
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


# ---- answers, interruption, sessions ------------------------------------------------------------
def test_an_interrupted_answer_leaves_a_sound_session(engine: Engine) -> None:
    """Stopping between tokens keeps the session equal to one prefill of its conversation; the next
    turn closes the cut answer and continues."""
    chat = Chat(engine, Settings(thinking=False, max_tokens=50))
    calls = 0

    def stop() -> bool:
        nonlocal calls
        calls += 1
        return calls >= 3

    list(chat.answer(chat.turn_ids([{"role": "user", "content": "Tell me a story"}]), stop))
    assert chat.last is None and len(chat.session.pending) == 1
    ids = chat.turn_ids([{"role": "user", "content": "Go on"}])
    assert engine.tokenizer.decode(ids, skip_special_tokens=False).startswith("<|im_end|>\n<|im_start|>user\nGo on")
    list(chat.answer(ids, lambda: False))
    assert chat.last is not None
    nxt = engine.runner.forward(chat.session.pending, chat.session.state).logits
    whole = engine.logits(chat.session.conversation)
    assert np.abs(nxt - whole[-1:]).max() / np.abs(whole[-1]).max() < 1e-4


def test_session_file_resumes_with_the_same_next_tokens(packed: Path, engine: Engine, tmp_path: Path) -> None:
    chat = Chat(engine, Settings(thinking=False, max_tokens=8, system="Be brief."))
    list(chat.answer(chat.turn_ids([{"role": "user", "content": "What is water?"}]), lambda: False))
    path = tmp_path / "s.fmoe-session"
    save_session(path, chat.session, engine, {"note": 1})
    with fmoe.load(packed) as other:
        resumed, meta = load_session(path, other)
        assert meta == {"note": 1} and resumed.conversation == chat.session.conversation
        again = Chat(other, Settings(thinking=False, max_tokens=8))
        again.session = resumed
        list(again.answer(again.turn_ids([{"role": "user", "content": "And ice?"}]), lambda: False))
    list(chat.answer(chat.turn_ids([{"role": "user", "content": "And ice?"}]), lambda: False))
    assert chat.last is not None and again.last is not None
    assert again.last.token_ids == chat.last.token_ids and again.last.cached_tokens == chat.last.cached_tokens > 0
    # damage: a flipped byte in the state, a truncated file, another model
    data = bytearray(path.read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(FmoeError, match="state checksum mismatch"):
        load_session(tmp_path / "bad", engine)
    (tmp_path / "short").write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(FmoeError, match="corrupt session file"):
        load_session(tmp_path / "short", engine)
    (tmp_path / "junk").write_bytes(b"hello")
    with pytest.raises(FmoeError, match="not an fmoe session file"):
        load_session(tmp_path / "junk", engine)
    with fmoe.load(packed, k=1) as fewer, pytest.raises(FmoeError, match=r"another model or settings \(k differ"):
        load_session(path, fewer)


def test_cli_one_shot_with_a_session_resumes(packed: Path, tmp_path: Path) -> None:
    session = tmp_path / "chat.session"
    runner = CliRunner()
    first = runner.invoke(app, ["chat", str(packed), "Hello", "--no-think", "--tokens", "4", "--session", str(session)])
    assert first.exit_code == 0, first.output
    assert session.is_file()
    second = runner.invoke(app, ["chat", str(packed), "More", "--tokens", "4", "--session", str(session)])
    assert second.exit_code == 0 and "resumed" in second.output
    bad = runner.invoke(app, ["chat", str(packed), "x", "--tools", str(tmp_path / "none.json")])
    assert bad.exit_code == 1 and "--tools" in bad.output and "Traceback" not in bad.output
    # the shared run options reach the loader and are checked there
    assert_cli_error(runner.invoke(app, ["chat", str(packed), "x", "--threads", "0"]), "--threads 0")
    assert_cli_error(runner.invoke(app, ["chat", str(packed), "x", "--io", "bogus"]), "--io 'bogus'")
    mapped = runner.invoke(app, ["chat", str(packed), "Hi", "--tokens", "2", "--io", "mmap", "--threads", "1"])
    assert mapped.exit_code == 0, mapped.output


# ---- tools --------------------------------------------------------------------------------------
class Scripted:
    """Engine.stream's interface: each answer is the next text of ``script``, ended by <|im_end|>,
    left pending (or ``fed``, as a greedy step queued ahead on a GPU leaves it); prompts are kept."""

    def __init__(self, real: Engine, script: list[str], fed: bool = False) -> None:
        self.tokenizer, self.chat_template, self.stop_ids = real.tokenizer, real.chat_template, real.stop_ids
        self.script = list(script)
        self.prompts: list[str] = []
        self.fed = fed

    def new_session(self) -> Session:
        return Session(SequenceState([]))

    def stream(self, ids: list[int], *args: Any, session: Session, **kw: Any) -> Iterator[GenerationChunk]:
        self.prompts.append(self.tokenizer.decode(ids, skip_special_tokens=False))
        session.token_ids += session.pending + list(ids)
        text = self.script.pop(0)
        out = self.tokenizer.encode(text)
        session.token_ids += out
        session.pending = [self.tokenizer.token_id("<|im_end|>")]
        if self.fed:
            session.token_ids += session.pending
            session.pending = []
        yield GenerationChunk(text, out)
        yield GenerationChunk("", [], "stop", object())  # type: ignore[arg-type]


def test_tool_calls_run_only_after_confirmation(engine: Engine, tmp_path: Path) -> None:
    upper = [sys.executable, "-c", "import json, sys; print(json.load(sys.stdin)['city'].upper())"]
    tool = Tool("shout", "Upper-case a city", {"type": "object", "properties": {"city": {"type": "string"}}}, upper)
    call = render_call("shout", {"city": "paris"})
    fake = Scripted(engine, [call, "It is PARIS.", call, "Fine."])
    chat = Chat(fake, Settings(thinking=False), [tool])
    repl, out = _repl(chat, ["Shout paris", "Again"], answers=[True, False])
    repl.run()
    shown = "".join(out)
    assert '[tool call] shout {"city": "paris"}' in shown and "It is PARIS." in shown
    assert '"name": "shout"' in fake.prompts[0]  # the tool list went into the first turn
    assert "<tool_response>\nPARIS\n\n</tool_response>" in fake.prompts[1]  # run after "yes"
    assert "<tool_response>\nThe user declined to run this tool.\n</tool_response>" in fake.prompts[3]
    assert sum("Run shout" in line for line in out) == 2


def test_a_turn_after_an_answer_whose_end_was_fed_already(engine: Engine) -> None:
    """An answer's <|im_end|> pending or already fed (greedy steps queued ahead on a GPU): the next
    turn's conversation is the same, the end token once."""
    conversations = []
    for fed in (False, True):
        chat = Chat(Scripted(engine, ["Hello.", "Again."], fed=fed), Settings(thinking=False))
        for message in ("Hi", "More"):
            list(chat.answer(chat.turn_ids([{"role": "user", "content": message}]), lambda: False))
        conversations.append(engine.tokenizer.decode(chat.session.conversation, skip_special_tokens=False))
    assert conversations[0] == conversations[1]
    assert conversations[0].count("<|im_end|>") == 4  # two questions, two answers


def test_read_tools_errors(tmp_path: Path) -> None:
    cases = {
        "[1]": 'needs a "name"',
        '[{"name": "x"}]': '"command" must be a list',
        '[{"name": "x", "command": ["a"], "parameters": 3}]': '"parameters" must be',
        '{"name": "x"}': "expected a JSON list",
        "[": "not valid JSON",
        '[{"name": "x", "command": "a"}, {"name": "x", "command": "b"}]': "same name",
    }
    for text, needle in cases.items():
        path = tmp_path / "tools.json"
        path.write_text(text)
        with pytest.raises(FmoeError, match=needle):
            read_tools(path)
    path.write_text(json.dumps([{"name": "t", "description": "d", "command": ["echo", "hi"]}]))
    (tool,) = read_tools(path)
    assert tool.run({}) == "hi\n" and tool.schema["function"]["name"] == "t"


def test_set_option(engine: Engine) -> None:
    chat = Chat(engine, Settings())
    assert set_option(chat, "temperature 0.5") == "Set temperature to 0.5." and chat.settings.temperature == 0.5
    assert "not a number" in set_option(chat, "temperature warm")
    assert "must be" in set_option(chat, "top_p 2") and chat.settings.top_p == 1.0
    assert set_option(chat, "nothink") == "Set thinking off." and not chat.settings.thinking
    assert "unknown setting" in set_option(chat, "colour blue")
