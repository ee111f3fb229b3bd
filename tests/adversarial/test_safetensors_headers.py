"""Hostile and broken safetensors headers: fmoe's reader refuses what the safetensors library refuses
(``Metadata::validate`` and ``read_metadata`` in safetensors/src/tensor.rs), plus duplicate keys,
each with one line naming the file, the tensor and what is wrong, and accepts what it accepts.

Every case is checked against the library itself (``safe_open``), so a rule that drifts from the
library fails here."""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import SafetensorError, safe_open
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.synth import synthesize
from fmoe.errors import FmoeError
from fmoe.formats.safetensors_io import MAX_HEADER, SafetensorsFile

Header = dict[str, Any]


# ---- building files ---------------------------------------------------------------------------------------
def random_tensors(rng: np.random.Generator, count: int) -> list[tuple[str, str, list[int]]]:
    """(name, dtype, shape) of ``count`` small tensors of random dtypes and shapes."""
    dtypes = ["F32", "BF16", "U8", "I64", "F16", "U32"]
    out = []
    for i in range(count):
        shape = [int(d) for d in rng.integers(1, 5, size=int(rng.integers(0, 3)))]
        out.append((f"layers.{i}.w{int(rng.integers(100))}", str(rng.choice(dtypes)), shape))
    return out


SIZES = {"F32": 4, "BF16": 2, "U8": 1, "I64": 8, "F16": 2, "U32": 4}


def valid_header(tensors: list[tuple[str, str, list[int]]]) -> tuple[Header, int]:
    """A header laying the tensors out back to back, and the data section's size."""
    header: Header = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape in tensors:
        n = int(np.prod(shape, dtype=np.int64)) * SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + n]}
        offset += n
    return header, offset


def write_file(path: Path, header: Header | str | bytes, data: bytes, *, length: int | None = None) -> Path:
    """``u64 length | header | data``; ``header`` as an object, JSON text, or raw bytes."""
    raw = header if isinstance(header, bytes) else (header if isinstance(header, str) else json.dumps(header)).encode()
    path.write_bytes(struct.pack("<Q", len(raw) if length is None else length) + raw + data)
    return path


def library_refuses(path: Path) -> bool:
    try:
        with safe_open(str(path), framework="numpy") as f:
            list(f.keys())
    except SafetensorError:
        return True
    return False


def fmoe_error(path: Path) -> str | None:
    """fmoe's one-line error for ``path``, None when it opens."""
    try:
        SafetensorsFile(path).close()
    except FmoeError as exc:
        msg = str(exc)
        assert "\n" not in msg and msg.startswith(str(path)), msg
        return msg
    return None


# ---- the cases --------------------------------------------------------------------------------------------
# Each mutation edits a valid header of >= 3 tensors (names sorted by offset in ``order``) and returns
# (header, data size, fragments of the expected error; "{t}" stands for the tensor named).
Mutation = Callable[[Header, list[str], int], tuple[Header | str, int, list[str]]]


def _set(header: Header, name: str, **fields: Any) -> Header:
    return {**header, name: {**header[name], **fields}}


def overlap(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    a, b = order[0], order[1]
    n = h[b]["data_offsets"][1] - h[b]["data_offsets"][0]
    begin = h[a]["data_offsets"][0]  # b's bytes start inside a's (the data section stays covered)
    h = _set(
        h, b, dtype="U8", shape=[n + h[a]["data_offsets"][1] - begin], data_offsets=[begin, h[b]["data_offsets"][1]]
    )
    return h, size, ["{t}", "overlap"]


def same_range(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    a, b = order[0], order[-1]
    return _set(h, b, **{k: h[a][k] for k in ("dtype", "shape", "data_offsets")}), size, ["overlap"]


def gap(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    last = order[-1]
    begin, end = h[last]["data_offsets"]
    return _set(h, last, data_offsets=[begin + 8, end + 8]), size + 8, ["{t}", "gap"]


def negative_offset(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    first = order[0]
    begin, end = h[first]["data_offsets"]
    return _set(h, first, data_offsets=[begin - 16, end - 16]), size, ["{t}", "non-negative"]


def end_before_begin(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[1]
    begin, end = h[t]["data_offsets"]
    return _set(h, t, data_offsets=[end, begin]), size, ["{t}"]


def wrong_size(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[-1]
    return _set(h, t, shape=[*h[t]["shape"], 2]), size, ["{t}", "needs"]


def unknown_dtype(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return _set(h, order[1], dtype="float32"), size, ["{t}", "unknown dtype"]


def bad_shape(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[0]
    return _set(h, t, shape=[*h[t]["shape"], -1]), size, ["{t}", "shape"]


def float_shape(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[0]
    return _set(h, t, shape=[float(d) for d in h[t]["shape"]] or [1.0]), size, ["{t}", "shape"]


def three_offsets(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[1]
    return _set(h, t, data_offsets=[*h[t]["data_offsets"], 0]), size, ["{t}", "data_offsets"]


def missing_field(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    t = order[1]
    return {**h, t: {k: v for k, v in h[t].items() if k != "shape"}}, size, ["{t}", "no shape"]


def overflow_shape(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return _set(h, order[0], shape=[1 << 40, 1 << 40]), size, ["{t}", "overflows"]


def huge_offsets(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    last = order[-1]
    begin, end = h[last]["data_offsets"]
    return _set(h, last, data_offsets=[begin + (1 << 64), end + (1 << 64)]), size, ["{t}", "64-bit"]


def metadata_not_strings(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return {**h, "__metadata__": {"format": "pt", "step": 3}}, size, ["__metadata__"]


def metadata_list(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return {**h, "__metadata__": ["format", "pt"]}, size, ["__metadata__"]


def trailing_bytes(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return h, size + 3, ["3 bytes belong to no tensor"]


def truncated(h: Header, order: list[str], size: int) -> tuple[Header, int, list[str]]:
    return h, size - 1, ["truncated", "{t}"]


def duplicate_key(h: Header, order: list[str], size: int) -> tuple[str, int, list[str]]:
    """The first tensor listed twice with different offsets: the library keeps the last (and then
    finds the first's bytes uncovered); fmoe names the duplicate."""
    first, last = order[0], order[-1]
    text = json.dumps(h)[:-1] + f", {json.dumps(first)}: {json.dumps(h[last])}}}"
    return text, size, ["duplicate key", "{t}"]


def nan_in_shape(h: Header, order: list[str], size: int) -> tuple[str, int, list[str]]:
    return json.dumps(_set(h, order[0], shape=[float("nan")])), size, ["NaN"]


def not_an_object(h: Header, order: list[str], size: int) -> tuple[str, int, list[str]]:
    return json.dumps(list(h.items())), size, ["not a JSON object"]


def not_json(h: Header, order: list[str], size: int) -> tuple[str, int, list[str]]:
    return json.dumps(h)[:-2], size, ["not JSON"]


MUTATIONS: list[Mutation] = [
    overlap, same_range, gap, negative_offset, end_before_begin, wrong_size, unknown_dtype, bad_shape,
    float_shape, three_offsets, missing_field, overflow_shape, huge_offsets, metadata_not_strings,
    metadata_list, trailing_bytes, truncated, duplicate_key, nan_in_shape, not_an_object, not_json,
]  # fmt: skip


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.__name__)
def test_refused_like_the_library(mutation: Mutation, tmp_path: Path, rng: np.random.Generator) -> None:
    tensors = random_tensors(rng, int(rng.integers(3, 7)))
    header, size = valid_header(tensors)
    order = [name for name, _, _ in tensors]
    assert fmoe_error(write_file(tmp_path / "ok.safetensors", header, rng.bytes(size))) is None
    bad_header, data_size, fragments = mutation(header, order, size)
    path = write_file(tmp_path / "bad.safetensors", bad_header, rng.bytes(max(data_size, 0)))
    msg = fmoe_error(path)
    assert msg is not None, f"{mutation.__name__}: accepted"
    assert library_refuses(path), f"{mutation.__name__}: the library accepts what fmoe refuses: {msg}"
    for fragment in fragments:
        if fragment == "{t}":
            assert any(repr(name) in msg for name in order), msg  # names a tensor
        else:
            assert fragment in msg, (fragment, msg)


@pytest.mark.parametrize(
    "length, fragment",
    [(MAX_HEADER + 1, "over the format's limit"), (1 << 63, "over the format's limit"), (10_000, "does not fit")],
)
def test_header_length_checked_before_reading(tmp_path: Path, length: int, fragment: str) -> None:
    path = write_file(tmp_path / "x.safetensors", "{}", b"", length=length)
    msg = fmoe_error(path)
    assert msg is not None and fragment in msg and str(length) in msg, msg
    assert library_refuses(path)


@pytest.mark.parametrize("blob", [b"", b"\x01\x00", b"\x04\x00\x00\x00\x00\x00\x00\x00\xff\xfe{}"])
def test_short_files_and_non_utf8(tmp_path: Path, blob: bytes) -> None:
    path = tmp_path / "x.safetensors"
    path.write_bytes(blob)
    msg = fmoe_error(path)
    assert msg is not None and "not a valid safetensors file" in msg, msg
    assert library_refuses(path)


def test_utf16_header_is_not_guessed(tmp_path: Path) -> None:
    """json.loads(bytes) would detect UTF-16; the format (and the library) say UTF-8."""
    path = write_file(tmp_path / "x.safetensors", "{}".encode("utf-16"), b"")
    assert "not UTF-8" in (fmoe_error(path) or "")
    assert library_refuses(path)


def test_duplicate_keys_refused_even_when_identical(tmp_path: Path, rng: np.random.Generator) -> None:
    """Stricter than the library, on purpose: a repeated key (tensor, field or metadata) means two
    writers disagreed, and one of them would be silently dropped."""
    header, size = valid_header(random_tensors(rng, 2))
    name = next(k for k in header if k != "__metadata__")
    entry = json.dumps(header[name])
    texts = [
        json.dumps(header)[:-1] + f", {json.dumps(name)}: {entry}}}",
        json.dumps(header).replace('"dtype"', '"dtype": "U8", "dtype"', 1),
        json.dumps(header).replace('"format": "pt"', '"format": "pt", "format": "np"', 1),
    ]
    for text in texts:
        msg = fmoe_error(write_file(tmp_path / "d.safetensors", text, rng.bytes(size)))
        assert msg is not None and "duplicate key" in msg, msg


def test_accepted_like_the_library(tmp_path: Path, rng: np.random.Generator) -> None:
    """What the library accepts, fmoe reads, with the same bytes: entries in any order, empty and
    zero-size tensors sharing an offset, null metadata, unknown extra fields, whitespace padding."""
    tensors = random_tensors(rng, 5)
    header, size = valid_header(tensors)
    names = [n for n, _, _ in tensors]
    shuffled = {k: header[k] for k in rng.permutation(names)}
    variants: list[tuple[Header | str, int]] = [
        ({"__metadata__": None, **shuffled}, size),
        ({**header, "empty.a": {"dtype": "F32", "shape": [0, 3], "data_offsets": [0, 0]}}, size),
        ({**header, "empty.b": {"dtype": "BF16", "shape": [4, 0], "data_offsets": [size, size]}}, size),
        (_set(header, names[0], note="ignored"), size),
        ("  " + json.dumps(header) + "       ", size),
        ({}, 0),
    ]
    for i, (variant, data_size) in enumerate(variants):
        data = rng.bytes(data_size)
        path = write_file(tmp_path / f"v{i}.safetensors", variant, data)
        assert not library_refuses(path), variant
        f = SafetensorsFile(path)
        with safe_open(str(path), framework="numpy") as ref:
            assert sorted(f.tensors) == sorted(ref.keys())
            for name, info in f.tensors.items():
                if info.dtype != "BF16" and info.shape and info.shape[0]:
                    got = f.read_rows(name, 0, info.shape[0])
                    np.testing.assert_array_equal(got, ref.get_tensor(name).reshape(got.shape))
        f.close()


def test_random_offsets_agree_with_the_library(tmp_path: Path, rng: np.random.Generator) -> None:
    """Random edits of data_offsets and the data size: fmoe accepts exactly what the library accepts."""
    disagreements = []
    for i in range(40):
        tensors = random_tensors(rng, int(rng.integers(1, 5)))
        header, size = valid_header(tensors)
        for name, _, _ in tensors:
            if rng.random() < 0.5:
                begin, end = header[name]["data_offsets"]
                shift = int(rng.integers(-4, 5))
                header = _set(header, name, data_offsets=[max(begin + shift, 0), max(end + shift, 0)])
        data_size = max(size + int(rng.integers(-2, 3)) * int(rng.random() < 0.3), 0)
        path = write_file(tmp_path / f"r{i}.safetensors", header, rng.bytes(data_size))
        ours, theirs = fmoe_error(path) is not None, library_refuses(path)
        if ours != theirs:
            disagreements.append((header, data_size, fmoe_error(path)))
    assert not disagreements, disagreements[:3]


# ---- through a checkpoint and the CLI ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("headers") / "ckpt"
    synthesize(path, preset="tiny", layers=2, experts=4, seed=5)
    return path


def rewrite_header(st: Path, edit: Callable[[Header], Header | str]) -> None:
    """Replace the header of a real file (its data kept as is)."""
    blob = st.read_bytes()
    (n,) = struct.unpack("<Q", blob[:8])
    edited = edit(json.loads(blob[8 : 8 + n]))
    write_file(st, edited, blob[8 + n :])


def two_same_size(header: Header) -> tuple[str, str]:
    """Two tensors whose data ranges have the same length (so one can be pointed at the other's)."""
    by_size: dict[int, list[str]] = {}
    for name, e in header.items():
        if name != "__metadata__":
            by_size.setdefault(e["data_offsets"][1] - e["data_offsets"][0], []).append(name)
    return next(names[:2] for names in by_size.values() if len(names) > 1)  # type: ignore[return-value]


@pytest.mark.parametrize("case", ["overlap", "negative", "duplicate"])
def test_extract_cli_names_file_and_tensor(checkpoint: Path, tmp_path: Path, case: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(checkpoint, src)
    st = src / "model.safetensors"
    seen: dict[str, str] = {}

    def edit(header: Header) -> Header | str:
        a, b = two_same_size(header)
        seen["tensor"] = b
        if case == "overlap":  # b reads a's bytes; its own range is left uncovered
            return _set(header, b, data_offsets=header[a]["data_offsets"])
        if case == "negative":
            begin, end = header[b]["data_offsets"]
            return _set(header, b, data_offsets=[begin - end - 8, -8])
        return json.dumps(header)[:-1] + f", {json.dumps(b)}: {json.dumps(header[a])}}}"

    rewrite_header(st, edit)
    with pytest.raises(FmoeError):
        SourceCheckpoint.open(src)
    result = CliRunner().invoke(app, ["extract", str(src), "--out", str(tmp_path / "out")])
    fragment = {"overlap": "overlap", "negative": "non-negative", "duplicate": "duplicate key"}[case]
    line = assert_cli_error(result, str(st), fragment)
    assert repr(seen["tensor"]) in line, line
    assert not (tmp_path / "out" / "model_weights.bin").exists()
