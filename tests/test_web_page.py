"""The chat page in headless Chromium (Debian's `chromium`) against a live server with an API key:
a message typed into the page streams an answer into it, the same answer the API gives. Driven
over the DevTools protocol on a pipe (no extra packages); skipped where Chromium is absent."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")

import fmoe  # noqa: E402
from fmoe.runtime.diagnostics import build_packed  # noqa: E402
from fmoe.runtime.serve.app import create_app  # noqa: E402
from fmoe.runtime.serve.server import BackgroundServer  # noqa: E402

CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
pytestmark = pytest.mark.skipif(
    CHROMIUM is None, reason="headless Chromium is not installed (apt-get install chromium)"
)


def _onto_3_and_4(read_fd: int, write_fd: int) -> None:
    """In the child: the pipe ends onto fds 3 and 4 (through fds >= 10, so neither clobbers the other)."""
    import fcntl

    high_r, high_w = fcntl.fcntl(read_fd, fcntl.F_DUPFD, 10), fcntl.fcntl(write_fd, fcntl.F_DUPFD, 10)
    os.dup2(high_r, 3)
    os.dup2(high_w, 4)


class Browser:
    """Chromium with --remote-debugging-pipe: DevTools messages are JSON ended by NUL on fds 3/4."""

    def __init__(self, profile: Path) -> None:
        to_chrome_r, self._w = os.pipe()
        self._r, from_chrome_w = os.pipe()
        # the child reads commands on fd 3 and writes replies on fd 4
        self.proc = subprocess.Popen(
            [
                CHROMIUM or "chromium",
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,  # 3 and 4 must stay open
            preexec_fn=lambda: _onto_3_and_4(to_chrome_r, from_chrome_w),
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buf = b""
        self._id = 0
        self.session: str | None = None

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" not in self._buf:
                chunk = os.read(self._r, 1 << 16)
                assert chunk, "chromium closed the pipe"
                self._buf += chunk
            raw, self._buf = self._buf.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._id:
                assert "error" not in reply, reply
                return dict(reply.get("result", {}))

    def eval(self, expression: str) -> Any:
        return self.call("Runtime.evaluate", expression=expression, returnByValue=True)["result"].get("value")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
        os.close(self._w)
        os.close(self._r)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    b = Browser(tmp_path / "profile")
    try:
        page = next(t for t in b.call("Target.getTargets")["targetInfos"] if t["type"] == "page")
        b.session = b.call("Target.attachToTarget", targetId=page["targetId"], flatten=True)["sessionId"]
        yield b
    finally:
        b.close()


def _until(browser: Browser, expression: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = browser.eval(expression)
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"never true in the page: {expression}")


def _type(browser: Browser, element: str, text: str) -> None:
    browser.eval(f"document.getElementById({element!r}).focus()")
    browser.call("Input.insertText", text=text)


def test_a_typed_message_streams_an_answer_into_the_page(browser: Browser, tmp_path: Path) -> None:
    packed = build_packed(tmp_path, seed=6)[1]
    with fmoe.load(packed) as engine:
        app = create_app(lambda: engine, model_id="tiny", api_key="page-key", owns_engine=False)
        with BackgroundServer(app) as srv:
            deadline = time.monotonic() + 60
            while httpx.get(srv.url + "/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            browser.call("Page.enable")
            browser.call("Page.navigate", url=srv.url + "/")
            _until(browser, "document.readyState === 'complete' && !!document.getElementById('input')")
            _type(browser, "key", "page-key")
            browser.eval("document.getElementById('key').dispatchEvent(new Event('change'))")
            _until(browser, "document.getElementById('model').textContent === 'tiny'")  # the key was accepted
            browser.eval("document.getElementById('thinking').click()")  # thinking off: the answer is text
            browser.eval("document.getElementById('max_tokens').value = ''")
            _type(browser, "max_tokens", "12")
            _type(browser, "temperature", "0")
            _type(browser, "input", "What is the capital of France?")
            for kind in ("keyDown", "keyUp"):  # Enter sends
                browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
            meta = _until(browser, "(document.querySelector('.assistant .meta') || {}).textContent")
            shown = browser.eval("document.querySelector('.assistant .text').textContent")
            assert browser.eval("document.querySelector('.msg.user').textContent") == "What is the capital of France?"
            body = {
                "model": "tiny",
                "messages": [{"role": "user", "content": "What is the capital of France?"}],
                "max_tokens": 12,
                "temperature": 0,
                "chat_template_kwargs": {"enable_thinking": False},
            }
            answer = httpx.post(srv.url + "/v1/chat/completions", json=body, headers={"x-api-key": "page-key"}).json()
    assert shown and shown == answer["choices"][0]["message"]["content"]
    assert "12 generated" in meta or "finish: length" in meta


class _Scripted:
    """Engine.stream's interface: every answer is ANSWER (thinking, text, a tool call)."""

    ANSWER = (
        "Plan the call.</think>\n\nHere.\n\n"
        "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n</function>\n</tool_call>"
    )

    def __init__(self, real: Any) -> None:
        self.tokenizer, self.chat_template = real.tokenizer, real.chat_template
        self.stop_ids, self.max_context, self.packed_dir = real.stop_ids, real.max_context, real.packed_dir

    def new_session(self) -> Any:
        from fmoe.runtime.engine.session import Session
        from fmoe.runtime.state import SequenceState

        return Session(SequenceState([]))

    def stream(self, ids: list[int], *args: Any, **kw: Any) -> Iterator[Any]:
        from fmoe.runtime.engine.results import GenerationChunk, GenerationResult, GenerationTiming, PhaseTiming

        for i in range(0, len(self.ANSWER), 4):
            yield GenerationChunk(self.ANSWER[i : i + 4], [])
        timing = GenerationTiming(len(ids), 0, 1, 0, 4, "scripted", "cpu", 0, PhaseTiming(1), PhaseTiming(1))
        yield GenerationChunk("", [1], "stop", GenerationResult(self.ANSWER, [1], len(ids), 0, "stop", timing))


def test_thinking_is_collapsed_and_tool_calls_are_cards(browser: Browser, tmp_path: Path) -> None:
    packed = build_packed(tmp_path, seed=6)[1]
    with fmoe.load(packed) as engine:
        app = create_app(lambda: _Scripted(engine), model_id="scripted", prefix_cache_bytes=0)
        with BackgroundServer(app) as srv:
            deadline = time.monotonic() + 60
            while httpx.get(srv.url + "/health").status_code != 200:
                assert time.monotonic() < deadline
                time.sleep(0.05)
            browser.call("Page.navigate", url=srv.url + "/")
            _until(browser, "document.readyState === 'complete' && !!document.getElementById('input')")
            tool = {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
                },
            }
            _type(browser, "tools", json.dumps([tool]))
            _type(browser, "input", "Weather in Paris?")
            for kind in ("keyDown", "keyUp"):
                browser.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter", windowsVirtualKeyCode=13)
            card = _until(browser, "(document.querySelector('.assistant .card') || {}).textContent")
            think = browser.eval(
                "(() => { const d = document.querySelector('.assistant details.think');"
                " return [d.hidden, d.open, d.textContent]; })()"
            )
            text = browser.eval("document.querySelector('.assistant .text').textContent")
    assert "tool call: get_weather" in card and '"city": "Paris"' in card
    assert think == [False, False, "thinkingPlan the call."]  # shown, collapsed
    assert text == "Here.\n\n"
