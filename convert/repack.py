"""`fmoe repack`: one 4 KiB-aligned file per routed expert, with a checksummed manifest (docs/FORMAT.md).

Sources: a bf16 checkpoint (4-bit min/max, 2-bit clip-search), an MLX 4-bit checkpoint (4-bit copied
bit for bit; 2-bit from its dequantised weights), or a packed directory's finished 4-bit experts
(2-bit). Experts are converted in parallel threads (numpy releases the GIL), each holding one
expert. Every file is written atomically and then logged in ``.progress.jsonl``, so a killed run
resumes with the missing files only; the manifest is written last. A re-run keeps a finished file
only when it was made from the same kind of input and still has its recorded size and xxh3_128.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.convert.packed_dir import is_packed_dir, open_packed_dir, resolve_out
from fmoe.convert.packed_experts import PackedExperts
from fmoe.convert.source import SourceCheckpoint
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    EXPERT_PROJECTIONS,
    FORMAT_VERSION,
    PROGRESS_FILE,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
    progress_entries,
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


def repack(source: Path | str, out: Path | str | None = None, *, bits: int, workers: int = 0) -> dict[str, Any]:
    """Write ``experts-q{bits}``; returns ``{experts, bytes, path, bits, quantization, ...}``."""
    if bits not in REPACK_BITS:
        raise FmoeError(f"--bits: {bits} is not one of {', '.join(map(str, REPACK_BITS))}")
    if workers < 0:
        raise FmoeError(f"--workers: {workers} must be >= 0 (0 = all cores)")
    workers = workers or os.cpu_count() or 1
    started = time.perf_counter()
    reader, out_dir, origin = _open_input(Path(source), None if out is None else Path(out), bits)
    try:
        stored = _stored_bits(reader)
        if stored == bits:
            method = "passthrough"
        else:
            method = "clip-search" if bits == 2 else "minmax"
        report = _Repacker(reader, out_dir, bits, method, origin, workers).run()
    finally:
        reader.close()
    report["seconds"] = round(time.perf_counter() - started, 3)
    return report


def _open_input(source: Path, out: Path | None, bits: int) -> tuple[ExpertSource, Path, str]:
    if is_packed_dir(source) and not (source / "config.json").is_file():
        if bits != 2:
            raise FmoeError(
                f"{source}: a packed directory's experts are 4-bit already; --bits 4 needs the "
                "source checkpoint (a packed directory is only requantised to --bits 2)"
            )
        packed = PackedExperts(source, 4)
        out_dir = out if out is not None else source
        if out_dir.absolute() != source.absolute():
            open_packed_dir(out_dir, packed.config, packed.identity.get("source", {}))
        return packed, out_dir, PACKED_ORIGIN
    src = SourceCheckpoint.open(source)
    try:
        out_dir = resolve_out(out, src.path)
        open_packed_dir(out_dir, src.config, src.record())
    except BaseException:
        src.close()
        raise
    stored = src.expert_bits()
    return src, out_dir, "bf16" if stored is None else f"mlx-{stored}bit"


def _stored_bits(reader: ExpertSource) -> int | None:
    """Bits of the input experts if they can be copied as they are (group 64), else None."""
    sample = reader.read_expert(0, 0)["gate_proj"]
    if isinstance(sample, QuantTensor) and sample.group_size == DEFAULT_GROUP_SIZE:
        return sample.bits
    return None


class _Repacker:
    def __init__(self, reader: ExpertSource, out: Path, bits: int, method: str, origin: str, workers: int) -> None:
        self.reader, self.out, self.bits, self.method, self.origin = reader, out, bits, method, origin
        self.workers = workers
        self.cfg = reader.config
        self.layout = ExpertLayout.for_config(self.cfg, bits)
        self.dir = out / experts_dirname(bits)
        self.manifest_path = self.dir / EXPERT_MANIFEST
        self.progress_path = self.dir / PROGRESS_FILE
        self._lock = threading.Lock()
        self.written = 0
        self.timing: dict[str, float] = {}

    def all_files(self) -> list[tuple[int, int, str]]:
        cfg = self.cfg
        return [(L, e, expert_relpath(L, e)) for L in range(cfg.num_hidden_layers) for e in range(cfg.num_experts)]

    def run(self) -> dict[str, Any]:
        self.dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(self.dir, recursive=True)  # what a killed run was writing
        old = self._manifest()
        old_from = old["quantization"].get("from") if old else None
        if old is not None and old_from != self.origin and self.origin == PACKED_ORIGIN:
            return self._keep_from_source(old)
        if old_from != self.origin:
            old = None  # made from another kind of input: redone (a bf16 source beats requantised 4-bit)
        done = self._verified_finished(old)
        todo = [(L, e, rel) for L, e, rel in self.all_files() if rel not in done]
        if old is not None and not todo and done.keys() <= old["files"].keys():
            return self._report(old, skipped=True)
        # the finished entries, compacted (a torn last line dropped), before an old manifest goes
        with atomic_output(self.progress_path, "w") as f:
            f.writelines(self._progress_line(rel, entry) for rel, entry in sorted(done.items()))
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
            "files": files,
        }
        write_json_atomic(self.manifest_path, doc)
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
            **self.timing,
        }

    # ---- resume state -------------------------------------------------------------------------------
    def _manifest(self) -> dict[str, Any] | None:
        """The existing manifest if it describes experts of this model at this width."""
        doc = read_json_or_none(self.manifest_path)
        if (
            doc
            and doc.get("model_fingerprint") == self.cfg.fingerprint()
            and doc.get("bits") == self.bits
            and doc.get("file_size") == self.layout.file_size
            and isinstance(doc.get("files"), dict)
            and isinstance(doc.get("quantization"), dict)
        ):
            return doc
        return None

    def _keep_from_source(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Requantising the packed 4-bit experts never replaces a set made from the source checkpoint
        (it would be worse): a whole one is kept, a damaged one is for the source to redo."""
        done = self._verified_finished(manifest)
        missing = [rel for _, _, rel in self.all_files() if rel not in done or rel not in manifest["files"]]
        if missing:
            raise FmoeError(
                f"{self.dir}: {len(missing)} expert files quantised from "
                f"{manifest['quantization'].get('from')} are missing or damaged (e.g. {missing[0]}); "
                "re-run `fmoe repack` on the source checkpoint, or delete the folder to requantise "
                "the packed 4-bit experts"
            )
        return self._report(manifest, skipped=True)

    def _verified_finished(self, manifest: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
        """Files recorded as finished from this input (in ``manifest`` or the progress log) whose
        size and xxh3_128 still hold: only those are skipped; a damaged one is redone."""
        entries = [{"file": rel, **e} for rel, e in (manifest or {}).get("files", {}).items() if isinstance(e, dict)]
        entries += [e for e in progress_entries(self.dir) if e.get("from") == self.origin]
        wanted = {rel for _, _, rel in self.all_files()}
        claimed: dict[str, str] = {}
        size = self.layout.file_size
        for entry in entries:
            rel, digest = entry.get("file"), entry.get("xxh3_128")
            if (
                isinstance(rel, str)
                and rel in wanted
                and isinstance(digest, str)
                and entry.get("size") == size
                and file_size(self.dir / rel) == size
            ):
                claimed[rel] = digest
        if not claimed:
            return {}
        with (
            byte_progress(transient=True) as progress,
            ThreadPoolExecutor(self.workers, thread_name_prefix="fmoe-check") as pool,
        ):
            task = progress.add_task(f"check finished q{self.bits}", total=len(claimed) * size)

            def intact(rel: str) -> bool:
                return xxh3_128_file(self.dir / rel, on_bytes=lambda n: progress.advance(task, n)) == claimed[rel]

            ok = dict(zip(claimed, pool.map(intact, claimed), strict=True))
        return {rel: {"size": size, "xxh3_128": d} for rel, d in claimed.items() if ok[rel]}

    def _progress_line(self, rel: str, entry: dict[str, Any]) -> str:
        return json.dumps({"file": rel, **entry, "from": self.origin}) + "\n"

    # ---- conversion ---------------------------------------------------------------------------------
    def _convert_all(self, todo: list[tuple[int, int, str]], done: dict[str, dict[str, Any]]) -> None:
        if not todo:
            return
        per_expert = self.reader.expert_nbytes()
        with (
            byte_progress() as progress,
            open(self.progress_path, "a") as log,
            ThreadPoolExecutor(self.workers, thread_name_prefix="fmoe-repack") as pool,
        ):
            task = progress.add_task(f"repack q{self.bits}", total=len(todo) * per_expert)

            def one(L: int, e: int, rel: str) -> None:
                entry = self._write_expert(L, e, rel)
                with self._lock:
                    log.write(self._progress_line(rel, entry))
                    log.flush()
                    done[rel] = entry
                    self.written += 1
                progress.advance(task, per_expert)

            _run_bounded(pool, one, todo, 2 * self.workers)

    def _write_expert(self, layer: int, expert: int, rel: str) -> dict[str, Any]:
        parts = self.reader.read_expert(layer, expert)
        tensors = {proj: self._quantize(parts[proj]) for proj in EXPERT_PROJECTIONS}
        data = self.layout.encode(tensors)
        with atomic_output(self.dir / rel) as f:
            f.write(data)
        return {"size": len(data), "xxh3_128": xxhash.xxh3_128_hexdigest(data)}

    def _quantize(self, t: np.ndarray | QuantTensor) -> QuantTensor:
        if self.method == "passthrough" and isinstance(t, QuantTensor):
            return t
        w = t.dequantize() if isinstance(t, QuantTensor) else t
        return quantize(w, self.bits, DEFAULT_GROUP_SIZE, clip_search=self.method == "clip-search")

    # ---- error report -------------------------------------------------------------------------------
    def _measure_error(self) -> dict[str, Any]:
        """rel RMS (float64) of min/max and of clip-search on a sample of experts, against the best
        float weights available (the source's, or the dequantised 4-bit ones). Nothing for a copy."""
        if self.method == "passthrough":
            return {}
        cfg = self.cfg
        picks = _sample(cfg.num_hidden_layers, cfg.num_experts, ERROR_SAMPLE)
        names = ("minmax", "clip-search")
        parts: dict[tuple[int, int, str], tuple[float, float]] = {}  # (L, e, method) -> (sse, ref)

        def measure(L: int, e: int) -> None:
            sums = dict.fromkeys(names, (0.0, 0.0))
            for t in self.reader.read_expert(L, e).values():
                w = t.dequantize() if isinstance(t, QuantTensor) else t
                w = w[:: max(1, -(-w.shape[0] // ERROR_ROWS))]  # evenly spaced rows bound the cost
                w64 = w.astype(np.float64).ravel()
                ref = float(np.dot(w64, w64))
                for name in names:
                    qt = quantize(w, self.bits, DEFAULT_GROUP_SIZE, clip_search=name == "clip-search")
                    diff = qt.dequantize().ravel() - w64
                    sse, total = sums[name]
                    sums[name] = (sse + float(np.dot(diff, diff)), total + ref)
            with self._lock:
                parts.update({(L, e, name): v for name, v in sums.items()})

        with ThreadPoolExecutor(self.workers, thread_name_prefix="fmoe-error") as pool:
            _run_bounded(pool, measure, picks, 2 * self.workers)
        out = {}
        for name in names:  # summed in sample order, so the report does not depend on thread timing
            sse = sum(parts[L, e, name][0] for L, e in picks)
            ref = sum(parts[L, e, name][1] for L, e in picks)
            out[name] = {"rel_rms": float(np.sqrt(sse / ref)) if ref else 0.0}
        return out


def _sample(layers: int, experts: int, n: int) -> list[tuple[int, int]]:
    """Up to ``n`` distinct (layer, expert) pairs spread over layers and experts, deterministically."""
    total = layers * experts
    step = max(1, total // n)
    picks = [(i // experts, (i * 7 + i // experts) % experts) for i in range(0, total, step)][:n]
    return sorted(set(picks))


def _run_bounded(pool: ThreadPoolExecutor, fn: Callable[..., None], items: list[tuple[Any, ...]], window: int) -> None:
    """Run ``fn(*item)`` for every item with at most ``window`` in flight; the first error stops
    the rest (pending work is cancelled) and is raised."""
    pending: set[Future[None]] = set()
    it = iter(items)
    try:
        while True:
            while len(pending) < window:
                item = next(it, None)
                if item is None:
                    break
                pending.add(pool.submit(fn, *item))
            if not pending:
                return
            finished, pending = wait(pending, return_when=FIRST_COMPLETED)
            for fut in finished:
                fut.result()
    finally:
        for fut in pending:
            fut.cancel()
        wait(pending)
