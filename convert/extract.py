"""`fmoe extract`: the non-expert tensors into model_weights.bin + model_weights.json (docs/FORMAT.md),
plus tokenizer, chat template and generation config.

Tensors are streamed one at a time (huge matrices in row chunks) into a temp file that is renamed
when complete; the manifest is written last, so its presence means the .bin is whole, and its
xxh3_128 is then recorded in fmoe.json. A re-run skips the work only when the manifest describes
this source (files and identity, convert/source_identity.py) and ``dense_bits``, still has the
digest fmoe.json records, and the .bin still hashes to the manifest's xxh3_128.

Each chunk is checked for NaN/Inf while it is in memory (refused by tensor name unless allowed).
The packed directory is locked while it is written (fmoe/locking.py); Ctrl-C stops the workers
within one chunk, removes the temp file and leaves nothing a later run could take for whole.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
import xxhash

from fmoe.convert.nonfinite import ADVICE, count_nonfinite, describe_nonfinite
from fmoe.convert.packed_dir import resolve_out, writing_packed_dir
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.source_identity import digest_of, source_identity
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import MIN_8BIT_SUFFIXES
from fmoe.formats.packed import (
    DENSE_ALIGN,
    DENSE_BIN,
    DENSE_BITS,
    DENSE_MANIFEST,
    FORMAT_VERSION,
    GENERATION_CONFIG,
    TOKENIZER_FILES,
    align_up,
    forget_manifest_digest,
    record_manifest_digest,
    recorded_manifest_digest,
)
from fmoe.formats.quant import DEFAULT_GROUP_SIZE, QuantTensor, f32_to_bf16, quantize
from fmoe.fsutil import (
    atomic_output,
    check_regular_file,
    confined,
    copy_atomic,
    file_size,
    read_json,
    read_json_or_none,
    remove_stale_temps,
    require_free_space,
    write_json_atomic,
    xxh3_128_file,
)
from fmoe.locking import Stop, hidden_on_error, sigint_stops, stopping_pool, submit
from fmoe.progress import byte_progress

CHUNK_ELEMENTS = 4 << 20  # rows per chunk bounded to ~16 MB of float32
WINDOW = max(1, min(4, os.cpu_count() or 1)) + 1  # chunks in flight (workers + 1)
CHAT_TEMPLATE = "chat_template.jinja"

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class _Plan:
    """How one tensor is written: float (bf16 / float32) or affine at ``bits``."""

    name: str
    shape: tuple[int, ...]
    dtype: str  # "float32" | "bf16" | "affine"
    bits: int = 0
    passthrough: bool = False  # an MLX tensor already at the target bits: copied bit for bit


def extract(
    source: Path | str,
    out: Path | str | None = None,
    *,
    dense_bits: int = 4,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Write the packed directory's dense part; returns ``{tensors, bytes, path, ...}``.

    ``overwrite`` redoes model_weights.* even when they are whole, and lets another source checkpoint
    take over a packed directory (its artifacts made from the old one are dropped); without it such a
    directory is refused. ``allow_nonfinite`` converts NaN/Inf weights (recorded) instead of refusing."""
    if dense_bits not in DENSE_BITS:
        raise FmoeError(f"--dense-bits: {dense_bits} is not one of {', '.join(map(str, DENSE_BITS))}")
    started = time.perf_counter()
    stop = Stop()
    with sigint_stops(stop), SourceCheckpoint.open(source) as src:
        out_dir = resolve_out(out, src.path)
        tokenizer = _tokenizer_sources(src.path)
        plans = [_plan(src, name, dense_bits) for name in src.dense_names()]
        cfg = src.config
        identity = source_identity(src)
        record = {**src.record(), "identity": identity}
        command = f"fmoe extract --dense-bits {dense_bits}"
        with writing_packed_dir(out_dir, cfg, record, overwrite=overwrite, command=command):
            remove_stale_temps(out_dir)  # what a killed run was writing
            manifest_path, bin_path = out_dir / DENSE_MANIFEST, out_dir / DENSE_BIN
            wanted = {
                "model_fingerprint": cfg.fingerprint(),
                "dense_bits": dense_bits,
                "source_fingerprint": src.source_fingerprint(),
            }
            existing = None
            if not overwrite:
                existing = _finished_manifest(out_dir, wanted, digest_of(identity), allow_nonfinite, stop)
            doc = existing
            if doc is None:
                forget_manifest_digest(out_dir, DENSE_MANIFEST)
                manifest_path.unlink(missing_ok=True)  # stale: the new .bin must not pair with an old manifest
                require_free_space(out_dir, sum(_size_estimate(p) for p in plans), DENSE_BIN)
                tensors, size, digest, nonfinite = _write_dense(src, bin_path, plans, stop, allow_nonfinite)
                doc = {
                    "format": "fmoe-dense",
                    "version": FORMAT_VERSION,
                    **wanted,
                    "source_identity": identity,
                    "nonfinite": {"allowed": allow_nonfinite, "found": nonfinite},
                    "file_size": size,
                    "file_xxh3_128": digest,
                    "tensors": tensors,
                }
                write_json_atomic(manifest_path, doc)  # last: its presence means the .bin is whole
            record_manifest_digest(out_dir, DENSE_MANIFEST)
            _copy_tokenizer(tokenizer, out_dir)
        source_bytes = sum(src.dense_nbytes(n) for n in src.dense_names())
    return {
        "tensors": len(doc["tensors"]),
        "bytes": doc["file_size"],
        "path": str(out_dir),
        "dense_bits": dense_bits,
        "skipped": existing is not None,
        "source_bytes": source_bytes,
        "source_identity": digest_of(identity),
        "nonfinite": doc.get("nonfinite", {}).get("found", {}),
        "seconds": round(time.perf_counter() - started, 3),
    }


# ---- planning -----------------------------------------------------------------------------------------
def _plan(src: SourceCheckpoint, name: str, dense_bits: int) -> _Plan:
    spec = src.dense_spec(name)
    if spec.role != "matrix":
        return _Plan(name, spec.shape, "float32")
    bits = dense_bits
    if bits != 16 and name.endswith(MIN_8BIT_SUFFIXES):
        bits = max(bits, 8)  # routing is sensitive: never below 8 bits
    if spec.shape[-1] % DEFAULT_GROUP_SIZE:
        bits = 16  # not groupable: stays bf16 (docs/FORMAT.md)
    src_bits = src.dense_bits(name)
    if bits == 16:
        if src_bits is not None:
            raise FmoeError(
                f"--dense-bits 16: {src.path} stores {name} quantised to {src_bits} bits, so bf16 "
                "cannot be recovered; use --dense-bits 8 or 4 (or the BF16 release)"
            )
        return _Plan(name, spec.shape, "bf16")
    return _Plan(name, spec.shape, "affine", bits, passthrough=src_bits == bits and _group_ok(src, name))


def _group_ok(src: SourceCheckpoint, name: str) -> bool:
    sample = src.read_dense(name, rows=(0, 1))
    return isinstance(sample, QuantTensor) and sample.group_size == DEFAULT_GROUP_SIZE


def _size_estimate(p: _Plan) -> int:
    elements = int(np.prod(p.shape))
    if p.dtype == "float32":
        return elements * 4 + DENSE_ALIGN
    if p.dtype == "bf16":
        return elements * 2 + DENSE_ALIGN
    return elements * p.bits // 8 + 2 * (elements // DEFAULT_GROUP_SIZE) * 2 + 3 * DENSE_ALIGN


def _finished_manifest(
    out: Path, wanted: dict[str, Any], identity: str | None, allow_nonfinite: bool, stop: Stop
) -> dict[str, Any] | None:
    """The existing manifest if it describes exactly what this run would write (model, bits, source
    files and identity; non-finite values only when allowed), fmoe.json's digest of it (if any)
    holds, and the .bin still has its size and xxh3_128 (a damaged file is rewritten), else None."""
    manifest, bin_path = out / DENSE_MANIFEST, out / DENSE_BIN
    doc = read_json_or_none(manifest)
    nonfinite = doc.get("nonfinite") if doc else None
    if not (
        doc
        and all(doc.get(k) == v for k, v in wanted.items())
        and identity is not None
        and digest_of(doc.get("source_identity")) == identity
        and isinstance(nonfinite, dict)
        and (allow_nonfinite or not nonfinite.get("found"))
        and isinstance(doc.get("tensors"), dict)
        and isinstance(doc.get("file_size"), int)
        and file_size(bin_path) == doc["file_size"]
    ):
        return None
    recorded = recorded_manifest_digest(out, DENSE_MANIFEST)
    if recorded is not None and xxhash.xxh3_128_hexdigest(manifest.read_bytes()) != recorded:
        return None  # edited after it was written: not trusted to skip the work

    def advance(n: int) -> None:
        progress.advance(task, n)
        stop.check()

    with byte_progress(transient=True) as progress:
        task = progress.add_task(f"check {DENSE_BIN}", total=doc["file_size"])
        digest = xxh3_128_file(bin_path, on_bytes=advance)
    return doc if digest == doc.get("file_xxh3_128") else None


# ---- writing ------------------------------------------------------------------------------------------
class _Writer:
    """Sequential writer of the .bin: 64-byte aligned parts, whole-file hash on the fly."""

    def __init__(self, f: BinaryIO) -> None:
        self.f, self.offset, self.hash = f, 0, xxhash.xxh3_128()

    def align(self) -> None:
        pad = align_up(self.offset, DENSE_ALIGN) - self.offset
        if pad:
            self.write(bytes(pad))

    def write(self, data: bytes | memoryview | np.ndarray) -> None:
        buf = np.ascontiguousarray(data).data.cast("B") if isinstance(data, np.ndarray) else data
        self.f.write(buf)
        self.hash.update(buf)
        self.offset += len(buf)


def _write_dense(
    src: SourceCheckpoint, bin_path: Path, plans: list[_Plan], stop: Stop, allow_nonfinite: bool
) -> tuple[dict[str, Any], int, str, dict[str, int]]:
    """Write model_weights.bin; returns (manifest tensors, size, xxh3_128, non-finite counts)."""
    total = sum(src.dense_nbytes(p.name) for p in plans)
    tensors: dict[str, Any] = {}
    nonfinite: dict[str, int] = {}
    with (
        byte_progress() as progress,
        hidden_on_error(progress),
        atomic_output(bin_path) as f,
        stopping_pool(WINDOW - 1, stop, "fmoe-extract") as pool,
    ):
        task = progress.add_task("extract dense", total=total)
        w = _Writer(f)
        for plan in plans:
            per_row = src.dense_nbytes(plan.name) / plan.shape[0]

            def advance(rows: int, per_row: float = per_row) -> None:
                progress.advance(task, rows * per_row)

            guard = _Guard(src.path, plan.name, allow_nonfinite)
            tensors[plan.name] = _write_tensor(src, plan, w, _Pool(pool, stop), advance, guard)
            if guard.found:
                nonfinite[plan.name] = guard.found
        size, digest = w.offset, w.hash.hexdigest()
    return tensors, size, digest, nonfinite


@dataclass(frozen=True)
class _Pool:
    """The worker pool and the run's stop flag, handed around together."""

    pool: ThreadPoolExecutor
    stop: Stop


class _Guard:
    """Counts one tensor's non-finite values, chunk by chunk (from several threads); raises the
    one-line error naming the tensor unless they are allowed."""

    def __init__(self, source: Path, name: str, allow: bool) -> None:
        self.source, self.name, self.allow = source, name, allow
        self.found = 0
        self._lock = threading.Lock()

    def check(self, t: np.ndarray | QuantTensor, span: tuple[int, int] | None, produced: bool = False) -> int:
        """``t``: what was read (rows ``span``), or what quantising it ``produced``; returns the count."""
        count = count_nonfinite(t)
        if not count:
            return 0
        if not self.allow:
            rows = f" (rows {span[0]}..{span[1] - 1})" if span else ""
            what = (
                "quantising it gives non-finite scales/biases (weights beyond the bf16 range)"
                if produced
                else f"holds {describe_nonfinite(t)}"
            )
            raise FmoeError(f"{self.source}: tensor {self.name!r}{rows}: {what}; {ADVICE}")
        with self._lock:
            self.found += count
        return count


def _write_tensor(
    src: SourceCheckpoint,
    plan: _Plan,
    w: _Writer,
    pool: _Pool,
    advance: Callable[[int], None],
    guard: _Guard,
) -> dict[str, Any]:
    h = xxhash.xxh3_128()
    parts: dict[str, Any] = {}

    def part(name: str, dtype: str, shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> None:
        w.align()
        start = w.offset
        for chunk in chunks:
            buf = np.ascontiguousarray(chunk).data.cast("B")
            w.write(buf)
            h.update(buf)
        parts[name] = {"offset": start, "size": w.offset - start, "dtype": dtype, "shape": list(shape)}

    rows = plan.shape[0]
    if plan.dtype == "float32":
        data = np.asarray(src.read_dense(plan.name), dtype=np.float32)
        guard.check(data, None)
        part("data", "float32", plan.shape, [data])
        advance(rows)
        return {"shape": list(plan.shape), "kind": "float", "parts": parts, "xxh3_128": h.hexdigest()}

    spans = _row_spans(rows, plan.shape[1])
    if plan.dtype == "bf16":  # a float source (_plan refuses bf16 from a quantised one)

        def to_bf16(span: tuple[int, int]) -> np.ndarray:
            data = src.read_dense(plan.name, rows=span)
            assert isinstance(data, np.ndarray)  # _plan refuses bf16 from a quantised tensor
            guard.check(data, span)
            return f32_to_bf16(data)

        def bf16_chunks() -> Iterator[np.ndarray]:
            for span, chunk in zip(spans, _ordered_map(pool, to_bf16, spans), strict=True):
                advance(span[1] - span[0])
                yield chunk

        part("data", "bf16", plan.shape, bf16_chunks())
        return {"shape": list(plan.shape), "kind": "float", "parts": parts, "xxh3_128": h.hexdigest()}

    def to_affine(span: tuple[int, int]) -> QuantTensor:
        data = src.read_dense(plan.name, rows=span)
        bad_input = guard.check(data, span)
        if plan.passthrough and isinstance(data, QuantTensor):
            return data
        if isinstance(data, QuantTensor):
            data = data.dequantize()
        with np.errstate(all="ignore"):  # allowed NaN/Inf, or an overflow reported below: no warnings
            qt = quantize(data, plan.bits, DEFAULT_GROUP_SIZE)
        if not bad_input:
            guard.check(qt, span, produced=True)
        return qt

    scales: list[np.ndarray] = []  # small (1/32 of the weights at 4 bits): kept until the codes are written
    biases: list[np.ndarray] = []

    def weight_chunks() -> Iterator[np.ndarray]:
        for span, qt in zip(spans, _ordered_map(pool, to_affine, spans), strict=True):
            scales.append(qt.scales)
            biases.append(qt.biases)
            advance(span[1] - span[0])
            yield qt.weight

    out_dim, in_dim = plan.shape
    groups = in_dim // DEFAULT_GROUP_SIZE
    part("weight", "uint32", (out_dim, in_dim * plan.bits // 32), weight_chunks())
    part("scales", "bf16", (out_dim, groups), scales)
    part("biases", "bf16", (out_dim, groups), biases)
    return {
        "shape": list(plan.shape),
        "kind": "affine",
        "bits": plan.bits,
        "group_size": DEFAULT_GROUP_SIZE,
        "parts": parts,
        "xxh3_128": h.hexdigest(),
    }


def _row_spans(rows: int, cols: int) -> list[tuple[int, int]]:
    step = max(1, CHUNK_ELEMENTS // max(1, cols))
    return [(r, min(rows, r + step)) for r in range(0, rows, step)]


def _ordered_map(pool: _Pool, fn: Callable[[T], R], items: list[T]) -> Iterator[R]:
    """``map`` in order with at most ``WINDOW`` items in flight, so memory stays bounded. On an error
    or a stop the pool (stopping_pool) cancels what is still queued."""
    pending: deque[Future[R]] = deque()
    it = iter(items)
    for item in itertools.islice(it, WINDOW):
        pending.append(submit(pool.pool, pool.stop, fn, item))
    while pending:
        result = pending.popleft().result()
        pool.stop.check()
        for nxt in itertools.islice(it, 1):
            pending.append(submit(pool.pool, pool.stop, fn, nxt))
        yield result


# ---- tokenizer and friends ----------------------------------------------------------------------------
def _tokenizer_sources(src: Path) -> dict[str, Path | str]:
    """What to copy: file name -> source file, or the chat template text taken from tokenizer_config."""
    if not os.path.lexists(src / "tokenizer.json"):
        raise FmoeError(f"{src}: no tokenizer.json (the packed model needs the tokenizer)")
    found: dict[str, Path | str] = {}
    for name in (*TOKENIZER_FILES, GENERATION_CONFIG):
        if os.path.lexists(src / name):  # copied into the packed directory: never from outside the source
            path = confined(src, name, "the tokenizer files")
            check_regular_file(path)
            found[name] = path
    if CHAT_TEMPLATE not in found and "tokenizer_config.json" in found:
        template = _template_from_config(src / "tokenizer_config.json")
        if template:
            found[CHAT_TEMPLATE] = template
    return found


def _template_from_config(path: Path) -> str | None:
    template = read_json(path).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": "default", "template": "..."}]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) else None


def _copy_tokenizer(files: dict[str, Path | str], out: Path) -> None:
    for name, what in files.items():
        if isinstance(what, Path):
            copy_atomic(what, out / name)
        else:
            with atomic_output(out / name, "w") as f:
                f.write(what)
