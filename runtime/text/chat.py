"""The artifact's chat template (chat_template.jinja), rendered with a sandboxed jinja2, and the
model's stop tokens."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError

if TYPE_CHECKING:
    from fmoe.runtime.text.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
IM_END = "<|im_end|>"


# A template comes with the model files: it is untrusted code. Bounds on what rendering may cost.
RENDER_SECONDS = 2.0  # real chat templates render in milliseconds
RENDER_CHARS = 16 << 20  # a prompt this long would exceed any context anyway
_MAX_REPEAT = 1 << 20  # "x" * n and [..] * n: at most this many items (jinja's own range() stops at 100000)


class ChatTemplate:
    """A chat template: ``render(messages, add_generation_prompt=True, enable_thinking=True, tools=None)``.

    Rendered like transformers' ``apply_chat_template`` (trim_blocks, lstrip_blocks, loop
    controls, ``tojson``, ``raise_exception``) in jinja2's immutable sandbox, since the template
    comes with the model files. It may not load other files (include, import, extends are refused
    when it is read) and its rendering is bounded in time and output size.
    """

    def __init__(self, source: str, where: str = TEMPLATE_FILE) -> None:
        from jinja2 import TemplateError, nodes

        env = _environment()
        self.where = where
        try:
            tree = env.parse(source)
            loaders = {
                "include": nodes.Include,
                "import": nodes.Import,
                "from": nodes.FromImport,
                "extends": nodes.Extends,
            }
            for tag, kind in loaders.items():
                if tree.find(kind) is not None:
                    raise FmoeError(f"{where}: uses {{% {tag} %}}; a chat template may not load other templates")
            self._template = env.from_string(tree)
        except TemplateError as exc:
            raise FmoeError(f"{where}: not a valid jinja2 template ({exc})") from None

    @classmethod
    def from_dir(cls, packed_dir: Path | str) -> ChatTemplate | None:
        """The template of a packed directory (chat_template.jinja, else tokenizer_config.json's), or None."""
        packed_dir = Path(packed_dir)
        path = packed_dir / TEMPLATE_FILE
        if path.is_file():
            return cls(path.read_text(encoding="utf-8"), str(path))
        cfg_path = packed_dir / "tokenizer_config.json"
        template = _json_value(cfg_path, "chat_template")
        return cls(template, f"{cfg_path} (chat_template)") if isinstance(template, str) else None

    def render(
        self,
        messages: Sequence[dict[str, Any]],
        *,
        add_generation_prompt: bool = True,
        enable_thinking: bool = True,
        tools: Sequence[dict[str, Any]] | None = None,
        **extra: Any,
    ) -> str:
        from jinja2 import TemplateError

        context = dict(
            messages=list(messages),
            add_generation_prompt=add_generation_prompt,
            enable_thinking=enable_thinking,
            tools=list(tools) if tools else None,
            **extra,
        )
        try:
            return _bounded_render(self._template.generate(**context))
        except _Overrun as exc:
            raise FmoeError(f"{self.where}: rendering stopped: {exc}") from None
        except TemplateError as exc:
            raise FmoeError(f"{self.where}: rendering failed ({exc})") from None


class _Overrun(Exception):
    pass


def _environment() -> Any:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Environment(ImmutableSandboxedEnvironment):
        intercepted_binops = frozenset({"*", "**"})

        def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
            if operator == "**" and isinstance(right, int) and abs(right) > 64:
                raise _Overrun(f"an exponent of {right} (at most 64)")
            if operator == "*":
                for seq, n in ((left, right), (right, left)):
                    if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > _MAX_REPEAT:
                        raise _Overrun(f"a repetition of {len(seq) * n} items (at most {_MAX_REPEAT})")
            return super().call_binop(context, operator, left, right)

    env = Environment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _bounded_render(chunks: Iterator[str]) -> str:
    """Join the rendered chunks, stopping past RENDER_CHARS or RENDER_SECONDS. Time is checked on
    every line the template's own compiled code runs (a trace on its frames only, in this thread),
    so a loop that emits nothing is stopped too."""
    deadline = time.monotonic() + RENDER_SECONDS

    def on_line(frame: Any, event: str, arg: Any) -> Any:
        if time.monotonic() > deadline:
            raise _Overrun(f"took more than {RENDER_SECONDS:g} s (a template that loops for ever?)")
        return on_line

    def on_call(frame: Any, event: str, arg: Any) -> Any:
        return on_line if frame.f_code.co_filename == "<template>" else None

    out: list[str] = []
    size = 0
    previous = sys.gettrace()
    sys.settrace(on_call)
    try:
        for chunk in chunks:
            size += len(chunk)
            if size > RENDER_CHARS:
                raise _Overrun(f"output beyond {RENDER_CHARS} characters")
            out.append(chunk)
    finally:
        sys.settrace(previous)
    return "".join(out)


def stop_token_ids(config: TextConfig, tokenizer: Tokenizer, packed_dir: Path | str | None = None) -> set[int]:
    """Token ids that end generation: the config's eos ids, generation_config.json's eos list
    (when the packed directory has one) and ``<|im_end|>`` when the vocabulary has it."""
    stops = set(config.eos_token_ids)
    if packed_dir is not None:
        eos = _json_value(Path(packed_dir) / "generation_config.json", "eos_token_id")
        stops.update(e for e in (eos if isinstance(eos, list) else [eos]) if isinstance(e, int))
    im_end = tokenizer.token_id(IM_END)
    if im_end is not None:
        stops.add(im_end)
    return stops


def _json_value(path: Path, key: str) -> Any:
    """``key`` of an optional JSON object file; None when the file, the key or valid JSON is missing
    (these files are extras copied from the source: their absence must not stop a run)."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc.get(key) if isinstance(doc, dict) else None


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise FmoeError(f"chat template: {message}")
