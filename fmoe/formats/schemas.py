"""Declared schemas of the JSON files fmoe reads, one per file kind: a model's text config, the dense
manifest (model_weights.json) and the expert manifest (experts-q{bits}/manifest.json).

Every field is checked for type and range before anything is computed or allocated from it (msgspec:
strict types, so ``128.7`` or ``"128"`` or ``true`` is not an integer; NaN fails every bound). The
bounds are generous for any member of the family (the largest, Qwen3.8-2.4T: 92 layers, hidden 8192,
512 experts) and tight enough that a hostile file cannot make fmoe allocate without limit.
Relations between fields (divisibility, a list's length) are checked by the readers.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

from fmoe.errors import FmoeError


def validated(doc: Any, schema: Any, where: str) -> Any:
    """``doc`` (parsed JSON) as ``schema``; a one-line FmoeError naming ``where``, the field and its
    value, e.g. ``config.json: hidden_size = 128.7: expected int, got float``."""
    try:
        return msgspec.convert(doc, schema, strict=True)
    except msgspec.ValidationError as exc:
        raise FmoeError(f"{where}: {_describe(doc, schema, str(exc))}") from None


def schema_problem(doc: Any, schema: Any) -> str | None:
    """What is wrong with ``doc`` against ``schema`` (the first problem, in one line), or None."""
    try:
        msgspec.convert(doc, schema, strict=True)
    except msgspec.ValidationError as exc:
        return _describe(doc, schema, str(exc))
    return None


# ---- naming the field ----------------------------------------------------------------------------
_Step = tuple[str, Any]  # ("field", name) | ("index", i) | ("key", dict key) | ("any", None)


def _describe(doc: Any, schema: Any, error: str) -> str:
    """msgspec says "Expected `int` >= 0 - at `$.tensors[...].parts[...].offset`" (dict keys hidden):
    find the keys and the value, and put the field first: ``tensors["x"].parts["data"].offset = -64: ...``."""
    what, sep, at = error.partition(" - at `$")
    what = what.replace("`", "")
    what = what[:1].lower() + what[1:]
    if not sep:
        return what
    steps: list[_Step] = []
    for name, index in re.findall(r"\.([^.\[\]]+)|\[(\d+|\.\.\.)\]", at.rstrip("`")):
        steps.append(("field", name) if name else ("any", None) if index == "..." else ("index", int(index)))
    steps = _find_keys(doc, schema, error, steps)
    value = _lookup(doc, steps)
    shown = "" if value is _MISSING else f" = {_short(value)}"
    return f"{_render(steps)}{shown}: {what}"


def _find_keys(doc: Any, schema: Any, error: str, steps: list[_Step]) -> list[_Step]:
    """Each hidden dict key: the one whose entry alone still fails the same way (bisection, so a
    manifest of 50k files costs a few conversions, and only when it is bad)."""
    done: list[_Step] = []
    node = doc
    for kind, key in steps:
        if kind == "any" and isinstance(node, dict) and node:
            keys = list(node)
            while len(keys) > 1:
                half = keys[: len(keys) // 2]
                trial = _replaced(doc, done, {k: node[k] for k in half})
                keys = half if _fails_as(trial, schema, error) else keys[len(keys) // 2 :]
            kind, key = "key", keys[0]
        if kind == "any":
            return [*done, (kind, key), *steps[len(done) + 1 :]]
        done.append((kind, key))
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return done + steps[len(done) :]
    return done


def _fails_as(doc: Any, schema: Any, error: str) -> bool:
    try:
        msgspec.convert(doc, schema, strict=True)
    except msgspec.ValidationError as exc:
        return str(exc) == error
    return False


def _replaced(node: Any, steps: list[_Step], value: Any) -> Any:
    """``node`` with the value at ``steps`` replaced (copies along the path only)."""
    if not steps:
        return value
    key = steps[0][1]
    copy: Any = dict(node) if isinstance(node, dict) else list(node)
    copy[key] = _replaced(node[key], steps[1:], value)
    return copy


_MISSING = object()


def _lookup(doc: Any, steps: list[_Step]) -> Any:
    node = doc
    for kind, key in steps:
        if kind == "any":
            return _MISSING
        try:
            node = node[key]
        except (KeyError, IndexError, TypeError):
            return _MISSING
    return node


def _render(steps: list[_Step]) -> str:
    out = ""
    for kind, key in steps:
        if kind == "field":
            out += f".{key}" if out else str(key)
        elif kind == "key":
            out += f"[{json.dumps(key)}]"
        else:
            out += f"[{'...' if key is None else key}]"
    return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


Count = Annotated[int, Meta(ge=1, le=1024)]  # layers, heads, per-layer counts
Width = Annotated[int, Meta(ge=1, le=1 << 17)]  # hidden and intermediate sizes
HeadDim = Annotated[int, Meta(ge=1, le=4096)]
Experts = Annotated[int, Meta(ge=1, le=1 << 14)]
TokenId = Annotated[int, Meta(ge=0, le=1 << 24)]
Vocab = Annotated[int, Meta(ge=1, le=1 << 24)]
Context = Annotated[int, Meta(ge=1, le=1 << 24)]
ConvKernel = Annotated[int, Meta(ge=1, le=64)]
PositiveFloat = Annotated[float, Meta(gt=0, le=1e12)]
Fraction = Annotated[float, Meta(gt=0, le=1)]
Epsilon = Annotated[float, Meta(gt=0, lt=1)]
Offset = Annotated[int, Meta(ge=0, le=1 << 50)]  # byte offsets and sizes (up to a petabyte)
Dim = Annotated[int, Meta(ge=0, le=1 << 32)]
Shape = Annotated[list[Dim], Meta(min_length=1, max_length=4)]
Hex128 = Annotated[str, Meta(pattern="^[0-9a-f]{32}$")]


# ---- a model's text config (config.json's text_config, or a flat text-only config) ------------
class RopeParameters(msgspec.Struct, kw_only=True):
    rope_theta: PositiveFloat | None = None
    partial_rotary_factor: Fraction | None = None


class TextConfigSchema(msgspec.Struct, kw_only=True):
    """The fields fmoe reads; others (vision, MTP, quantisation) are allowed and ignored here."""

    model_type: str | None = None
    vocab_size: Vocab
    hidden_size: Width
    num_hidden_layers: Count
    num_attention_heads: Count
    num_key_value_heads: Count
    head_dim: HeadDim
    linear_conv_kernel_dim: ConvKernel
    linear_key_head_dim: HeadDim
    linear_value_head_dim: HeadDim
    linear_num_key_heads: Count
    linear_num_value_heads: Count
    moe_intermediate_size: Width
    shared_expert_intermediate_size: Width
    num_experts: Experts
    num_experts_per_tok: Experts
    layer_types: list[Literal["linear_attention", "full_attention"]] | None = None
    full_attention_interval: Count | None = None
    rms_norm_eps: Epsilon = 1e-6
    rope_theta: PositiveFloat | None = None
    partial_rotary_factor: Fraction | None = None
    rope_parameters: RopeParameters | None = None
    max_position_embeddings: Context = 262144
    eos_token_id: TokenId | list[TokenId] | None = None
    tie_word_embeddings: bool | None = None


# ---- model_weights.json -----------------------------------------------------------------------
class DensePart(msgspec.Struct, kw_only=True):
    offset: Offset
    size: Offset
    dtype: Literal["uint32", "bf16", "float32"]
    shape: Shape


class DenseTensor(msgspec.Struct, kw_only=True):
    shape: Shape
    kind: Literal["float", "affine"]
    parts: dict[str, DensePart]
    bits: Literal[2, 4, 8] | None = None
    group_size: Literal[32, 64, 128] | None = None
    xxh3_128: Hex128 | None = None


class DenseManifestSchema(msgspec.Struct, kw_only=True):
    format: Literal["fmoe-dense"]
    version: int
    model_fingerprint: str
    tensors: dict[str, DenseTensor]
    file_size: Offset | None = None
    file_xxh3_128: Hex128 | None = None
    dense_bits: Literal[16, 8, 4] | None = None


# ---- experts-q{bits}/manifest.json ------------------------------------------------------------
class ExpertComponent(msgspec.Struct, kw_only=True):
    offset: Offset
    size: Offset
    dtype: Literal["uint32", "bf16"]
    shape: Annotated[list[Dim], Meta(min_length=2, max_length=2)]


class ExpertFileEntry(msgspec.Struct, kw_only=True):
    size: Offset
    xxh3_128: Hex128


class ExpertManifestSchema(msgspec.Struct, kw_only=True):
    format: Literal["fmoe-experts"]
    version: int
    model_fingerprint: str
    bits: Literal[2, 4, 8]
    group_size: Literal[32, 64, 128]
    num_layers: Count
    num_experts: Experts
    file_size: Offset
    components: dict[str, ExpertComponent]
    files: dict[str, ExpertFileEntry]
