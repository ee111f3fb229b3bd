"""`fmoe repack`: one 4 KiB-aligned file per routed expert, with a checksummed manifest (docs/FORMAT.md).

Sources: a bf16 checkpoint or the official block-FP8 release (dequantised as transformers does; 4-bit
min/max, 2-bit clip-search), an MLX 4-bit checkpoint (4-bit copied
bit for bit; 2-bit from its dequantised weights), or a packed directory's finished 4-bit experts
(2-bit). Experts are converted in parallel threads (numpy releases the GIL), each holding one
expert. Every file is written atomically and then logged in ``.progress.jsonl``, so a killed run
resumes with the missing files only; the manifest is written last and its xxh3_128 recorded in
fmoe.json. A re-run keeps a finished file only when it was made from the same kind of input and the
same source (the identity of convert/source_identity.py, carried by every log line and the
manifest) and still has its recorded size and xxh3_128.

Each projection is checked for NaN/Inf while in memory (refused by layer, expert and projection
unless allowed). The packed directory is locked while it is written; Ctrl-C stops the workers
within one expert, cancels the queue, removes temp files and leaves a resumable log (exit 130).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.convert.nonfinite import ADVICE, count_nonfinite, describe_nonfinite
from fmoe.convert.packed_dir import is_packed_dir, resolve_out, writing_packed_dir
from fmoe.convert.packed_experts import PackedExperts
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.source_identity import digest_of, packed_identity, root_digest, source_identity
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    EXPERT_PROJECTIONS,
    FORMAT_VERSION,
    PROGRESS_FILE,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
    forget_manifest_digest,
    progress_entries,
    record_manifest_digest,
    recorded_manifest_digest,
)
from fmoe.formats.quant import DEFAULT_GROUP_SIZE, QuantTensor, quantize
from fmoe.fsutil import (
    atomic_output,
    file_size,
    read_json_or_none,
    remove_stale_temps,
    require_free_space,
    write_json_atomic,
    xxh3_128_file,
)
from fmoe.locking import Stop, directory_lock, hidden_on_error, run_bounded, sigint_stops
from fmoe.progress import byte_progress

REPACK_BITS = (4, 2)
PACKED_ORIGIN = "packed-4bit"  # quantization "from" of experts requantised from a packed directory's q4
ERROR_SAMPLE = 8  # experts whose quantisation error is measured (both methods) ...
ERROR_ROWS = 512  # ... on at most this many evenly spaced rows of each projection


class ExpertSource(Protocol):
    config: TextConfig

    def read_expert(self, layer: int, expert: int) -> dict[str, np.ndarray | QuantTensor]: ...
    def expert_nbytes(self) -> int: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class _Options:
    """How one repack runs."""

    bits: int
    method: str  # passthrough | minmax | clip-search
    origin: str  # quantization "from": bf16 | fp8 | mlx-{bits}bit | packed-4bit
    workers: int
    identity: dict[str, Any]  # what the experts are made from (convert/source_identity.py)
    where: str  # the input, for messages
    overwrite: bool
    allow_nonfinite: bool


@dataclass(frozen=True)
class _Input:
    reader: ExpertSource
    out: Path
    origin: str
    identity: dict[str, Any]
    where: str


def repack(
    source: Path | str,
    out: Path | str | None = None,
    *,
    bits: int,
    workers: int = 0,
    overwrite: bool = False,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Write ``experts-q{bits}``; returns ``{experts, bytes, path, bits, quantization, ...}``.

    ``overwrite`` redoes every file (and lets another source checkpoint take over the directory, its
    artifacts made from the old one dropped); ``allow_nonfinite`` converts NaN/Inf weights (recorded
    in the manifest) instead of refusing them."""
    if bits not in REPACK_BITS:
        raise FmoeError(f"--bits: {bits} is not one of {', '.join(map(str, REPACK_BITS))}")
    if workers < 0:
        raise FmoeError(f"--workers: {workers} must be >= 0 (0 = all cores)")
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    stop = Stop()
    with sigint_stops(stop), _open_input(Path(source), None if out is None else Path(out), bits, overwrite) as inp:
        stored = _stored_bits(inp.reader)
        if stored == bits:
            method = "passthrough"
        else:
            method = "clip-search" if bits == 2 else "minmax"
        options = _Options(bits, method, inp.origin, workers, inp.identity, inp.where, overwrite, allow_nonfinite)
        report = _Repacker(inp.reader, inp.out, options, stop).run()
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


@contextlib.contextmanager
def _open_input(source: Path, out: Path | None, bits: int, overwrite: bool) -> Iterator[_Input]:
    """The input, opened, and the output directory, locked and claimed, for the block."""
    command = f"fmoe repack --bits {bits}"
    with contextlib.ExitStack() as stack:
        if is_packed_dir(source) and not (source / "config.json").is_file():
            if bits != 2:
                raise FmoeError(
                    f"{source}: a packed directory's experts are 4-bit already; --bits 4 needs the "
                    "source checkpoint (a packed directory is only requantised to --bits 2)"
                )
            out_dir = out if out is not None else source
            same = out_dir.resolve() == source.resolve()
            stack.enter_context(directory_lock(source, command, shared=not same))
            packed = PackedExperts(source, 4)
            record = packed.identity.get("source")
            record = record if isinstance(record, dict) else {}
            identity = packed_identity(packed.manifest.path, packed.manifest.document.get("source_identity"))
            if not same:
                stack.enter_context(
                    writing_packed_dir(out_dir, packed.config, record, overwrite=overwrite, command=command)
                )
            yield _Input(packed, out_dir, PACKED_ORIGIN, identity, str(packed.dir))
            return
        src = stack.enter_context(SourceCheckpoint.open(source))
        out_dir = resolve_out(out, src.path)
        identity = source_identity(src)
        record = {**src.record(), "identity": identity}
        stack.enter_context(writing_packed_dir(out_dir, src.config, record, overwrite=overwrite, command=command))
        yield _Input(src, out_dir, src.expert_origin(), identity, str(src.path))


def _stored_bits(reader: ExpertSource) -> int | None:
    """Bits of the input experts if they can be copied as they are (group 64), else None."""
    sample = reader.read_expert(0, 0)["gate_proj"]
    if isinstance(sample, QuantTensor) and sample.group_size == DEFAULT_GROUP_SIZE:
        return sample.bits
    return None


class _Repacker:
    def __init__(self, reader: ExpertSource, out: Path, options: _Options, stop: Stop) -> None:
        self.reader, self.out, self.opt, self.stop = reader, out, options, stop
        self.bits, self.method, self.origin = options.bits, options.method, options.origin
        self.workers = options.workers
        self.source = digest_of(options.identity)
        self.cfg = reader.config
        self.layout = ExpertLayout.for_config(self.cfg, self.bits)
        self.dir = out / experts_dirname(self.bits)
        self.relpath = f"{experts_dirname(self.bits)}/{EXPERT_MANIFEST}"
        self.manifest_path = self.dir / EXPERT_MANIFEST
        self.progress_path = self.dir / PROGRESS_FILE
        self._lock = threading.Lock()
        self.written = 0
        self.nonfinite: dict[str, dict[str, int]] = {}  # file -> projection -> count (allowed ones)
        self.timing: dict[str, float] = {}

    def all_files(self) -> list[tuple[int, int, str]]:
        cfg = self.cfg
        return [(L, e, expert_relpath(L, e)) for L in range(cfg.num_hidden_layers) for e in range(cfg.num_experts)]

    def run(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.dir, recursive=True)  # what a killed run was writing
        old = None if self.opt.overwrite else self._manifest()
        old_from = old["quantization"].get("from") if old else None
        if old is not None and old_from != self.origin and self.origin == PACKED_ORIGIN:
            return self._keep_from_source(old)
        if old_from != self.origin or (old and digest_of(old.get("source_identity")) != self.source):
            old = None  # made from another input: redone (a bf16 source beats requantised 4-bit)
        done = {} if self.opt.overwrite else self._verified_finished(old)
        todo = [(L, e, rel) for L, e, rel in self.all_files() if rel not in done]
        if old is not None and not todo and done.keys() <= old["files"].keys():
            record_manifest_digest(self.out, self.relpath)  # one written by an older fmoe gets its digest
            return self._report(old, skipped=True)
        # the finished entries, compacted (a torn last line dropped), before an old manifest goes
        with atomic_output(self.progress_path, "w") as f:
            f.writelines(self._progress_line(rel, entry) for rel, entry in sorted(done.items()))
        forget_manifest_digest(self.out, self.relpath)
        self.manifest_path.unlink(missing_ok=True)  # stale or partial: never left beside new files
        require_free_space(self.dir, len(todo) * self.layout.file_size, f"{len(todo)} expert files")
        t0 = time.perf_counter()
        self._convert_all(todo, done)
        t1 = time.perf_counter()
        quant = {
            "method": self.method,
            "from": self.origin,
            "error": self._measure_error(),
            "sample_experts": min(ERROR_SAMPLE, len(self.all_files())),
        }
        self.timing = {"convert_s": round(t1 - t0, 3), "error_sample_s": round(time.perf_counter() - t1, 3)}
        files = {rel: done[rel] for _, _, rel in self.all_files()}
        doc = {
            "format": "fmoe-experts",
            "version": FORMAT_VERSION,
            "model_fingerprint": self.cfg.fingerprint(),
            "bits": self.bits,
            "group_size": self.layout.group_size,
            "num_layers": self.cfg.num_hidden_layers,
            "num_experts": self.cfg.num_experts,
            "file_size": self.layout.file_size,
            "components": self.layout.to_dict()["components"],
            "quantization": quant,
            "source_identity": self.opt.identity,
            "nonfinite": {"allowed": self.opt.allow_nonfinite, "found": dict(sorted(self.nonfinite.items()))},
            "files": files,
        }
        self.stop.check()
        write_json_atomic(self.manifest_path, doc)
        record_manifest_digest(self.out, self.relpath)
        self.progress_path.unlink(missing_ok=True)  # the manifest now says everything
        return self._report(doc, skipped=False)

    def _report(self, doc: dict[str, Any], *, skipped: bool) -> dict[str, Any]:
        return {
            "experts": len(doc["files"]),
            "bytes": len(doc["files"]) * doc["file_size"],
            "path": str(self.out),
            "bits": self.bits,
            "quantization": doc["quantization"],
            "written": self.written,
            "skipped": skipped,
            "source_bytes": self.written * self.reader.expert_nbytes(),
            "source_identity": digest_of(doc.get("source_identity")),
            "nonfinite": (doc.get("nonfinite") or {}).get("found", {}),
            **self.timing,
        }

    # ---- resume state -------------------------------------------------------------------------------
    def _manifest(self) -> dict[str, Any] | None:
        """The existing manifest if it describes experts of this model at this width, made from this
        source checkpoint, unchanged since it was written (fmoe.json's digest), and holding non-finite
        values only when they are allowed."""
        doc = read_json_or_none(self.manifest_path)
        if not (
            doc
            and doc.get("model_fingerprint") == self.cfg.fingerprint()
            and doc.get("bits") == self.bits
            and doc.get("file_size") == self.layout.file_size
            and isinstance(doc.get("files"), dict)
            and isinstance(doc.get("quantization"), dict)
            and isinstance(doc.get("nonfinite"), dict)
            and isinstance(doc["nonfinite"].get("found"), dict)
            and (self.opt.allow_nonfinite or not doc["nonfinite"]["found"])
            and root_digest(self.opt.identity) is not None
            and root_digest(doc.get("source_identity")) == root_digest(self.opt.identity)
        ):
            return None
        recorded = recorded_manifest_digest(self.out, self.relpath)
        if recorded is not None and xxhash.xxh3_128_hexdigest(self.manifest_path.read_bytes()) != recorded:
            return None  # edited after it was written: not trusted
        return doc

    def _keep_from_source(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Requantising the packed 4-bit experts never replaces a set made from the source checkpoint
        (it would be worse): a whole one is kept, a damaged one is for the source to redo."""
        done = self._verified_finished(manifest)
        missing = [rel for _, _, rel in self.all_files() if rel not in done or rel not in manifest["files"]]
        if missing:
            raise FmoeError(
                f"{self.dir}: {len(missing)} expert files quantised from "
                f"{manifest['quantization'].get('from')} are missing or damaged (e.g. {missing[0]}); "
                "re-run `fmoe repack` on the source checkpoint, or pass --overwrite to requantise "
                "the packed 4-bit experts"
            )
        record_manifest_digest(self.out, self.relpath)
        return self._report(manifest, skipped=True)

    def _verified_finished(self, manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Files recorded as finished from this input (in ``manifest`` or the progress log) whose
        size and xxh3_128 still hold: only those are skipped; a damaged one is redone."""
        found = (manifest or {}).get("nonfinite", {}).get("found", {})
        entries = [
            {"file": rel, **e, "nonfinite": found.get(rel)}
            for rel, e in (manifest or {}).get("files", {}).items()
            if isinstance(e, dict)
        ]
        entries += [
            e for e in progress_entries(self.dir) if e.get("from") == self.origin and e.get("source") == self.source
        ]
        wanted = {rel for _, _, rel in self.all_files()}
        claimed: dict[str, str] = {}
        nonfinite: dict[str, dict[str, int]] = {}
        size = self.layout.file_size
        for entry in entries:
            rel, digest, bad = entry.get("file"), entry.get("xxh3_128"), entry.get("nonfinite")
            if (
                isinstance(rel, str)
                and rel in wanted
                and isinstance(digest, str)
                and entry.get("size") == size
                and (self.opt.allow_nonfinite or not bad)
                and file_size(self.dir / rel) == size
            ):
                claimed[rel] = digest
                if isinstance(bad, dict) and bad:
                    nonfinite[rel] = bad
        if not claimed:
            return {}
        ok: dict[str, bool] = {}
        with byte_progress(transient=True) as progress, hidden_on_error(progress):
            task = progress.add_task(f"check finished q{self.bits}", total=len(claimed) * size)

            def advance(n: int) -> None:
                progress.advance(task, n)
                self.stop.check()

            def intact(rel: str) -> bool:
                return xxh3_128_file(self.dir / rel, on_bytes=advance) == claimed[rel]

            def keep(item: tuple[Any, ...], result: bool) -> None:
                ok[item[0]] = result

            run_bounded(
                intact,
                [(rel,) for rel in claimed],
                workers=self.workers,
                stop=self.stop,
                name="fmoe-check",
                on_result=keep,
            )
        self.nonfinite.update({rel: n for rel, n in nonfinite.items() if ok[rel]})
        return {rel: {"size": size, "xxh3_128": d} for rel, d in claimed.items() if ok[rel]}

    def _progress_line(self, rel: str, entry: dict[str, Any]) -> str:
        extra = {"nonfinite": self.nonfinite[rel]} if rel in self.nonfinite else {}
        return json.dumps({"file": rel, **entry, **extra, "from": self.origin, "source": self.source}) + "\n"

    # ---- conversion ---------------------------------------------------------------------------------
    def _convert_all(self, todo: list[tuple[int, int, str]], done: dict[str, dict[str, Any]]) -> None:
        if not todo:
            return
        per_expert = self.reader.expert_nbytes()
        with byte_progress() as progress, hidden_on_error(progress), open(self.progress_path, "a") as log:
            task = progress.add_task(f"repack q{self.bits}", total=len(todo) * per_expert)

            def one(L: int, e: int, rel: str) -> None:
                entry, found = self._write_expert(L, e, rel)
                with self._lock:
                    if found:
                        self.nonfinite[rel] = found
                    log.write(self._progress_line(rel, entry))
                    log.flush()
                    done[rel] = entry
                    self.written += 1
                progress.advance(task, per_expert)

            run_bounded(one, todo, workers=self.workers, stop=self.stop, name="fmoe-repack")

    def _write_expert(self, layer: int, expert: int, rel: str) -> tuple[dict[str, Any], dict[str, int]]:
        """Convert and write one expert file; returns its entry and its (allowed) non-finite counts."""
        parts = self.reader.read_expert(layer, expert)
        tensors: dict[str, QuantTensor] = {}
        found: dict[str, int] = {}
        for proj in EXPERT_PROJECTIONS:
            self.stop.check()
            count = self._nonfinite(parts[proj], layer, expert, proj, produced=False)
            tensors[proj] = self._quantize(parts[proj])
            if not count:
                count = self._nonfinite(tensors[proj], layer, expert, proj, produced=True)
            if count:
                found[proj] = count
        data = self.layout.encode(tensors)
        self.stop.check()
        with atomic_output(self.dir / rel) as f:
            f.write(data)
        return {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}, found

    def _nonfinite(self, t: np.ndarray | QuantTensor, layer: int, expert: int, proj: str, *, produced: bool) -> int:
        """NaN/Inf in what was read (or what quantising it ``produced``): counted when allowed, else
        the one-line error naming layer, expert and projection."""
        count = count_nonfinite(t)
        if count and not self.opt.allow_nonfinite:
            what = (
                "quantising it gives non-finite scales/biases (weights beyond the bf16 range)"
                if produced
                else f"holds {describe_nonfinite(t)}"
            )
            raise FmoeError(f"{self.opt.where}: layer {layer} expert {expert} {proj}: {what}; {ADVICE}")
        return count

    def _quantize(self, t: np.ndarray | QuantTensor) -> QuantTensor:
        if self.method == "passthrough" and isinstance(t, QuantTensor):
            return t
        w = t.dequantize() if isinstance(t, QuantTensor) else t
        with np.errstate(all="ignore"):  # allowed NaN/Inf, or an overflow the caller reports: no warnings
            return quantize(w, self.bits, DEFAULT_GROUP_SIZE, clip_search=self.method == "clip-search")

    # ---- error report -------------------------------------------------------------------------------
    def _measure_error(self) -> dict[str, Any]:
        """rel RMS (float64) of min/max and of clip-search on a sample of experts, against the best
        float weights available (the source's, or the dequantised 4-bit ones). Nothing for a copy;
        None where allowed non-finite weights make it undefined."""
        if self.method == "passthrough":
            return {}
        cfg = self.cfg
        picks = _sample(cfg.num_hidden_layers, cfg.num_experts, ERROR_SAMPLE)
        names = ("minmax", "clip-search")
        parts: dict[tuple[int, int, str], tuple[float, float]] = {}  # (L, e, method) -> (sse, ref)

        def measure(L: int, e: int) -> None:
            sums = dict.fromkeys(names, (0.0, 0.0))
            for t in self.reader.read_expert(L, e).values():
                self.stop.check()
                w = t.dequantize() if isinstance(t, QuantTensor) else t
                w = w[:: max(1, -(-w.shape[0] // ERROR_ROWS))]  # evenly spaced rows bound the cost
                w64 = w.astype(np.float64).ravel()
                with np.errstate(all="ignore"):
                    ref = float(np.dot(w64, w64))
                    for name in names:
                        qt = quantize(w, self.bits, DEFAULT_GROUP_SIZE, clip_search=name == "clip-search")
                        diff = qt.dequantize().ravel() - w64
                        sse, total = sums[name]
                        sums[name] = (sse + float(np.dot(diff, diff)), total + ref)
            with self._lock:
                parts.update({(L, e, name): v for name, v in sums.items()})

        run_bounded(measure, picks, workers=self.workers, stop=self.stop, name="fmoe-error")
        out = {}
        for name in names:  # summed in sample order, so the report does not depend on thread timing
            sse = sum(parts[L, e, name][0] for L, e in picks)
            ref = sum(parts[L, e, name][1] for L, e in picks)
            rel = float(np.sqrt(sse / ref)) if ref else 0.0
            out[name] = {"rel_rms": rel if np.isfinite(rel) else None}  # JSON has no NaN
        return out


def _sample(layers: int, experts: int, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` distinct (layer, expert) pairs spread over layers and experts, deterministically."""
    total = layers * experts
    step = max(1, total // n)
    picks = [(i // experts, (i * 7 + i // experts) % experts) for i in range(0, total, step)][:n]
    return sorted(set(picks))
