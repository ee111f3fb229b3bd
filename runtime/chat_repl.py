"""``fmoe chat``: an ``ollama run``-style terminal chat over one live session.

Each turn feeds only its own tokens (the session keeps the whole conversation's state, thinking
included: nothing is prefilled twice). Turns are rendered with the model's chat template, one
turn at a time. Tool calls are parsed, shown, and run only after the user says yes; their output
goes back as a tool response and the answer continues. Ctrl-C stops the current answer between
two tokens (a forward pass is never cut in half, so the session stays sound).
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fmoe.errors import FmoeError
from fmoe.runtime.engine.results import GenerationResult
from fmoe.runtime.text.tools import Event, OutputParser, ToolCall

IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TOOL_TIMEOUT = 60.0  # seconds a tool's command may run
TOOL_OUTPUT = 64 << 10  # characters of a tool's output given to the model
MAX_TOOL_ROUNDS = 8  # tool calls answered in a row before the chat asks the user again

HELP = """Commands:
  /set system TEXT     system prompt (starts a new conversation)
  /set temperature X   /set top_p X   /set top_k N   /set seed N   /set max_tokens N
  /set think | nothink thinking on or off      /set verbose | quiet  timings after each answer
  /show                the settings           /clear   a new conversation
  /save FILE           save the conversation  /bye     quit (or Ctrl-D)
  \"\"\"                  start and end a message of several lines
Ctrl-C stops the current answer."""


@dataclass
class Settings:
    system: str | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_tokens: int = 2048
    thinking: bool = True
    show_think: bool = False
    verbose: bool = False


@dataclass
class Tool:
    """A tool from the user's ``--tools`` file: its schema for the model and the command it runs
    (an argv list, no shell; the call's arguments arrive as JSON on its standard input)."""

    name: str
    description: str
    parameters: dict[str, Any]
    command: list[str]

    @property
    def schema(self) -> dict[str, Any]:
        return {
            "type": "function",
            "function": {"name": self.name, "description": self.description, "parameters": self.parameters},
        }

    def run(self, arguments: dict[str, Any]) -> str:
        try:
            done = subprocess.run(
                self.command, input=json.dumps(arguments), capture_output=True, text=True, timeout=TOOL_TIMEOUT
            )
        except subprocess.TimeoutExpired:
            return f"error: the tool did not finish within {TOOL_TIMEOUT:g} s"
        except OSError as exc:
            return f"error: the tool could not be started ({exc.strerror or exc})"
        out = done.stdout if done.returncode == 0 else f"error (exit {done.returncode}): {done.stderr or done.stdout}"
        return out[:TOOL_OUTPUT]


def read_tools(path: Path) -> list[Tool]:
    """The tools of a JSON file: a list of {name, description, parameters, command}."""
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise FmoeError(f"--tools {path}: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise FmoeError(f"--tools {path}: not valid JSON ({exc})") from None
    if not isinstance(doc, list):
        raise FmoeError(f"--tools {path}: expected a JSON list of tools")
    tools = []
    for i, t in enumerate(doc):
        where = f"--tools {path}: tool {i}"
        if not isinstance(t, dict) or not isinstance(t.get("name"), str) or not t["name"]:
            raise FmoeError(f'{where}: needs a "name"')
        command = t.get("command")
        if isinstance(command, str):
            command = [command]
        if not isinstance(command, list) or not command or not all(isinstance(c, str) for c in command):
            raise FmoeError(
                f'{where} ({t["name"]}): "command" must be a list of strings (the program and its arguments)'
            )
        params = t.get("parameters", {"type": "object", "properties": {}})
        if not isinstance(params, dict):
            raise FmoeError(f'{where} ({t["name"]}): "parameters" must be a JSON schema object')
        tools.append(Tool(t["name"], str(t.get("description", "")), params, command))
    if len({t.name for t in tools}) != len(tools):
        raise FmoeError(f"--tools {path}: two tools have the same name")
    return tools


class Chat:
    """The conversation: a live session of ``engine`` and how each turn is rendered."""

    def __init__(self, engine: Any, settings: Settings, tools: list[Tool] | None = None) -> None:
        self.engine = engine
        self.settings = settings
        self.tools = tools or []
        self.session = engine.new_session()
        self.last: GenerationResult | None = None
        self.calls: list[ToolCall] = []  # the last answer's tool calls

    def clear(self) -> None:
        self.session = self.engine.new_session()

    def turn_ids(self, messages: list[dict[str, Any]]) -> list[int]:
        """Tokens of the next turn: the end of the previous answer, ``messages`` and the prompt of
        the next answer (the system prompt and the tools with the first turn)."""
        s = self.settings
        first = not self.session.conversation
        if first:
            head = [{"role": "system", "content": s.system}] if s.system else []
            text = self._render(head + messages, tools=[t.schema for t in self.tools] or None)
        else:
            text = self._render(messages, tools=None)
            pending = self.session.pending
            im_end = self.engine.tokenizer.token_id(IM_END)
            if self.session.conversation[-1] == im_end:  # (pending, or fed already by a step queued ahead)
                text = "\n" + text  # the answer ended itself: its <|im_end|> is fed first
            else:
                if pending and pending[0] in self.engine.stop_ids:
                    self.session.pending = []
                text = f"{IM_END}\n{text}"  # cut short (length, Ctrl-C): close it
        return list(self.engine.tokenizer.encode(text))

    def _render(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
        template = self.engine.chat_template
        thinking = self.settings.thinking
        if template is not None:
            try:
                return str(template.render(messages, add_generation_prompt=True, enable_thinking=thinking, tools=tools))
            except FmoeError:
                if tools:
                    raise
        # ChatML by hand: a template that refuses a lone turn (one that wants a user message first)
        out = ""
        for m in messages:
            if m["role"] != "tool":
                out += f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n"
                continue
            piece = f"\n<tool_response>\n{m['content']}\n</tool_response>"
            if out.endswith(f"</tool_response>{IM_END}\n"):  # tool responses in a row share one turn
                out = out[: -len(IM_END) - 1] + f"{piece}{IM_END}\n"
            else:
                out += f"{IM_START}user{piece}{IM_END}\n"
        return out + f"{IM_START}assistant\n" + ("<think>\n" if thinking else "<think>\n\n</think>\n\n")

    def answer(self, ids: list[int], stop: Callable[[], bool]) -> Iterator[Event]:
        """Generate the answer to ``ids``; events as they are certain (``stop()`` true ends it
        between two tokens). ``self.last`` is the result (None when stopped)."""
        s = self.settings
        parser = OutputParser(thinking=self._opens_think(ids), tools=[t.schema for t in self.tools] or None)
        self.last = None
        stream = self.engine.stream(
            ids, s.max_tokens, s.temperature, s.top_p, s.top_k, s.seed, chat=False, session=self.session
        )
        try:
            for chunk in stream:
                yield from parser.feed(chunk.text)
                if chunk.result is not None:
                    self.last = chunk.result
                if stop():
                    break
        finally:
            stream.close()
        yield from parser.finish()
        self.calls = parser.calls

    def _opens_think(self, ids: list[int]) -> bool:
        tail = self.engine.tokenizer.decode(ids[-8:], skip_special_tokens=False)
        return bool(tail.rstrip().endswith("<think>"))


class Interrupt:
    """Ctrl-C during an answer sets a flag (checked between tokens) instead of raising."""

    def __init__(self) -> None:
        self.flag = threading.Event()
        self._previous: Any = None

    def __enter__(self) -> Interrupt:
        self.flag.clear()
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, lambda *_: self.flag.set())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


class Repl:
    """The prompt loop. ``read(prompt)`` returns a line (EOFError: Ctrl-D; KeyboardInterrupt:
    Ctrl-C at the prompt); ``write`` shows text; ``confirm(question)`` asks yes or no."""

    def __init__(
        self,
        chat: Chat,
        *,
        read: Callable[[str], str],
        write: Callable[[str], None],
        confirm: Callable[[str], bool] | None = None,
        color: bool = False,
        session_file: Path | None = None,
        save: Callable[[Path], None] | None = None,
    ) -> None:
        self.chat = chat
        self.read = read
        self.write = write
        self.confirm = confirm or (lambda q: read(q).strip().lower() in ("y", "yes"))
        self.color = color
        self.session_file = session_file
        self.save = save

    def dim(self, text: str) -> str:
        return f"\x1b[2m{text}\x1b[0m" if self.color else text

    def run(self) -> None:
        while True:
            try:
                line = self.read(">>> ")
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\nUse Ctrl-D or /bye to exit.\n")
                continue
            if line.lstrip().startswith('"""'):
                joined = self._multiline(line.lstrip()[3:])
                if joined is None:
                    return
                line = joined
            text = line.strip()
            if not text:
                continue
            if text.startswith("/"):
                if not self.command(text):
                    return
                continue
            self.ask([{"role": "user", "content": text}])

    def _multiline(self, first: str) -> str | None:
        lines = [first] if first else []
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        while True:
            try:
                more = self.read("... ")
            except (EOFError, KeyboardInterrupt):
                return None
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines)
            lines.append(more)

    def ask(self, messages: list[dict[str, Any]]) -> None:
        """One user turn, then as many tool rounds as the model asks for and the user allows."""
        for _ in range(MAX_TOOL_ROUNDS):
            try:
                ids = self.chat.turn_ids(messages)
            except FmoeError as exc:
                self.write(f"error: {exc}\n")
                return
            calls = self._show_answer(ids)
            self._save()
            if not calls:
                return
            messages = [{"role": "tool", "content": self._run_call(call)} for call in calls]
        self.write(self.dim(f"(stopped after {MAX_TOOL_ROUNDS} rounds of tool calls)\n"))

    def _show_answer(self, ids: list[int]) -> list[ToolCall]:
        s = self.chat.settings
        thought = False
        try:
            with Interrupt() as stop:
                for event in self.chat.answer(ids, stop.flag.is_set):
                    if event.kind == "reasoning":
                        if s.show_think:
                            self.write(self.dim(event.text))
                        elif not thought:
                            self.write(self.dim("Thinking...\n"))
                        thought = True
                    elif event.kind == "content":
                        if thought and s.show_think:
                            self.write("\n\n")
                        thought = False
                        self.write(event.text)
                    elif event.call is not None:
                        self.write(f"\n[tool call] {event.call.name} {event.call.arguments_json}\n")
        except FmoeError as exc:
            self.write(f"\nerror: {exc}\n")
            return []
        if self.chat.last is None:
            self.write(self.dim("\n(stopped)") + "\n")
            return []
        self.write("\n")
        if s.verbose:
            self.write(self.dim(timing_line(self.chat.last)) + "\n")
        return list(self.chat.calls)

    def _run_call(self, call: ToolCall) -> str:
        tool = next((t for t in self.chat.tools if t.name == call.name), None)
        if tool is None:  # the parser only accepts listed tools; kept for safety
            return f"error: no tool named {call.name}"
        if not self.confirm(f"Run {tool.name} ({' '.join(tool.command)}) with {call.arguments_json}? [y/N] "):
            return "The user declined to run this tool."
        result = tool.run(call.arguments)
        self.write(self.dim(result if len(result) < 400 else result[:400] + " ...") + "\n")
        return result

    def _save(self) -> None:
        if self.session_file is not None and self.save is not None:
            self.save(self.session_file)

    def command(self, text: str) -> bool:
        """Run a /command; False to quit."""
        name, _, arg = text.partition(" ")
        arg = arg.strip()
        s = self.chat.settings
        if name in ("/bye", "/exit", "/quit"):
            return False
        if name in ("/help", "/?"):
            self.write(HELP + "\n")
        elif name == "/clear":
            self.chat.clear()
            self.write("Cleared the conversation.\n")
        elif name == "/show":
            self.write(json.dumps(asdict(s), indent=1) + "\n")
        elif name == "/save":
            if not arg or self.save is None:
                self.write("usage: /save FILE\n")
            else:
                self.save(Path(arg))
                self.write(f"Saved the conversation to {arg}.\n")
        elif name == "/set":
            self.write(set_option(self.chat, arg) + "\n")
        else:
            self.write(f"unknown command {name} (see /help)\n")
        return True


def set_option(chat: Chat, arg: str) -> str:
    """``/set NAME VALUE``: one line saying what changed, or what is wrong."""
    from fmoe.runtime.text.sampling import SamplingParams

    s = chat.settings
    key, _, value = arg.partition(" ")
    value = value.strip()
    flags = {
        "think": ("thinking", True),
        "nothink": ("thinking", False),
        "verbose": ("verbose", True),
        "quiet": ("verbose", False),
    }
    if key in flags:
        attr, on = flags[key]
        setattr(s, attr, on)
        return f"Set {attr} {'on' if on else 'off'}."
    if key == "system":
        s.system = value or None
        chat.clear()
        return "Set the system prompt (a new conversation starts)."
    kinds: dict[str, Callable[[str], Any]] = {
        "temperature": float,
        "top_p": float,
        "top_k": int,
        "seed": int,
        "max_tokens": int,
    }
    if key not in kinds:
        names = "system, temperature, top_p, top_k, seed, max_tokens, think, nothink, verbose, quiet"
        return f"unknown setting {key!r} ({names})"
    try:
        parsed = kinds[key](value)
    except ValueError:
        return f"/set {key}: {value!r} is not a {'whole number' if kinds[key] is int else 'number'}"
    candidate = {**asdict(s), key: parsed}
    try:
        SamplingParams(candidate["temperature"], candidate["top_k"], candidate["top_p"], candidate["seed"])
    except FmoeError as exc:
        return f"/set {key}: {str(exc).partition(': ')[2]}"
    if key == "max_tokens" and parsed < 1:
        return "/set max_tokens: must be >= 1"
    setattr(s, key, parsed)
    return f"Set {key} to {parsed}."


def timing_line(r: GenerationResult) -> str:
    t = r.timing
    return (
        f"prompt: {t.prompt_tokens} tokens ({t.cached_tokens} in the session) in {t.prefill.seconds:.2f} s, "
        f"{t.prefill.tokens_per_second:.1f} tok/s; answer: {t.generated_tokens} tokens in {t.decode.seconds:.2f} s, "
        f"{t.decode.tokens_per_second:.1f} tok/s; finish: {r.finish_reason}"
    )


def settings_meta(settings: Settings) -> dict[str, Any]:
    return {"settings": asdict(settings)}


def restore_settings(settings: Settings, meta: dict[str, Any]) -> None:
    """The saved conversation's system prompt and thinking (its state was computed with them)."""
    saved = meta.get("settings") or {}
    for key in ("system", "thinking"):
        if key in saved:
            setattr(settings, key, saved[key])
