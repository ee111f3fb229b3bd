"""The artifact's chat template (chat_template.jinja), rendered with a sandboxed jinja2, and the
model's stop tokens."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fmoe.config import TextConfig
from fmoe.errors import FmoeError

if TYPE_CHECKING:
    from fmoe.runtime.text.tokenizer import Tokenizer

TEMPLATE_FILE = "chat_template.jinja"
IM_END = "<|im_end|>"


class ChatTemplate:
    """A chat template: ``render(messages, add_generation_prompt=True, enable_thinking=True, tools=None)``.

    Rendered like transformers' ``apply_chat_template`` (trim_blocks, lstrip_blocks, loop
    controls, ``tojson``, ``raise_exception``) in jinja2's immutable sandbox, since the template
    comes with the model files.
    """

    def __init__(self, source: str, where: str = TEMPLATE_FILE) -> None:
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        self.where = where
        try:
            self._template = env.from_string(source)
        except TemplateError as exc:
            raise FmoeError(f"{where}: not a valid jinja2 template ({exc})") from None

    @classmethod
    def from_dir(cls, packed_dir: Path | str) -> ChatTemplate | None:
        """The template of a packed directory (chat_template.jinja, else tokenizer_config.json's), or None."""
        packed_dir = Path(packed_dir)
        path = packed_dir / TEMPLATE_FILE
        if path.is_file():
            return cls(path.read_text(), str(path))
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

        try:
            return self._template.render(
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                enable_thinking=enable_thinking,
                tools=list(tools) if tools else None,
                **extra,
            )
        except TemplateError as exc:
            raise FmoeError(f"{self.where}: rendering failed ({exc})") from None


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
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc.get(key) if isinstance(doc, dict) else None


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


def _raise(message: str) -> None:
    raise FmoeError(f"chat template: {message}")
