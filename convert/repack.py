"""`fmoe repack`: one 4 KiB-aligned file per routed expert, with a checksummed manifest (docs/FORMAT.md).

Sources: a bf16 checkpoint (4-bit min/max, 2-bit clip-search), an MLX 4-bit checkpoint (4-bit copied
bit for bit; 2-bit from its dequantised weights), or a packed directory's finished 4-bit experts
(2-bit). Experts are converted in parallel threads (numpy releases the GIL), each holding one
expert. Every file is written atomically and then logged in ``.progress.jsonl``, so a killed run
resumes with the missing files only; the manifest is written last.
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
from fmoe.convert.expert_files import PackedExperts, expert_bytes
from fmoe.convert.packed_dir import default_out, is_packed_dir, open_packed_dir
from fmoe.convert.source import SourceCheckpoint
from fmoe.errors import FmoeError
from fmoe.formats.packed import (
    EXPERT_MANIFEST,
    EXPERT_PROJECTIONS,
    FORMAT_VERSION,
    ExpertLayout,
    expert_relpath,
    experts_dirname,
)
from fmoe.formats.quant import DEFAULT_GROUP_SIZE, QuantTensor, quantize
from fmoe.fsutil import atomic_output, require_free_space, write_json_atomic
from fmoe.progress import byte_progress

REPACK_BITS = (4, 2)
PROGRESS_FILE = ".progress.jsonl"
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
            raise FmoeError(f"{source}: a packed directory's experts are 4-bit already; --bits 4 needs the "
                            "source checkpoint (a packed directory is only requantised to --bits 2)")
        packed = PackedExperts(source, 4)
        out_dir = out if out is not None else source
        if out_dir.absolute() != source.absolute():
            open_packed_dir(out_dir, packed.config, packed.identity.get("source", {}))
        return packed, out_dir, "packed-4bit"
    src = SourceCheckpoint.open(source)
    try:
        out_dir = out if out is not None else default_out(src.path)
        if out_dir.absolute() == src.path.absolute():
            raise FmoeError(f"--out: {out_dir} is the source checkpoint; choose another directory")
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
        finished = self._finished_manifest()
        if finished is not None:
            return self._report(finished, skipped=True)
        self.dir.mkdir(parents=True, exist_ok=True)
        _remove_temp_files(self.dir)
        done = self._load_progress()
        # the finished entries, compacted (a torn last line dropped), before an old manifest goes
        with atomic_output(self.progress_path, "w") as f:
            f.writelines(json.dumps({"file": rel, **entry}) + "\n" for rel, entry in sorted(done.items()))
        self.manifest_path.unlink(missing_ok=True)  # stale or partial: never left beside new files
        todo = [(L, e, rel) for L, e, rel in self.all_files() if rel not in done]
        require_free_space(self.dir, len(todo) * self.layout.file_size, f"{len(todo)} expert files")
        t0 = time.perf_counter()
        self._convert_all(todo, done)
        t1 = time.perf_counter()
        quant = {"method": self.method, "from": self.origin, "error": self._measure_error(),
                 "sample_experts": min(ERROR_SAMPLE, len(self.all_files()))}
        self.timing = {"convert_s": round(t1 - t0, 3), "error_sample_s": round(time.perf_counter() - t1, 3)}
        files = {rel: done[rel] for _, _, rel in self.all_files()}
        doc = {"format": "fmoe-experts", "version": FORMAT_VERSION, "model_fingerprint": self.cfg.fingerprint(),
               "bits": self.bits, "group_size": self.layout.group_size,
               "num_layers": self.cfg.num_hidden_layers, "num_experts": self.cfg.num_experts,
               "file_size": self.layout.file_size, "components": self.layout.to_dict()["components"],
               "quantization": quant, "files": files}
        write_json_atomic(self.manifest_path, doc)
        self.progress_path.unlink(missing_ok=True)  # the manifest now says everything
        return self._report(doc, skipped=False)

    def _report(self, doc: dict[str, Any], *, skipped: bool) -> dict[str, Any]:
        return {"experts": len(doc["files"]), "bytes": len(doc["files"]) * doc["file_size"], "path": str(self.out),
                "bits": self.bits, "quantization": doc["quantization"], "written": self.written, "skipped": skipped,
                "source_bytes": self.written * self.reader.expert_nbytes(), **self.timing}

    # ---- resume state -------------------------------------------------------------------------------
    def _finished_manifest(self) -> dict[str, Any] | None:
        """The manifest if it is complete for this model and every listed file has its size."""
        doc = _read_json_or_none(self.manifest_path)
        if not (doc and doc.get("model_fingerprint") == self.cfg.fingerprint()
                and doc.get("bits") == self.bits and doc.get("file_size") == self.layout.file_size
                and isinstance(doc.get("files"), dict)):
            return None
        files = doc["files"]
        for _, _, rel in self.all_files():
            if rel not in files or _size(self.dir / rel) != self.layout.file_size:
                return None
        return doc

    def _load_progress(self) -> dict[str, dict[str, Any]]:
        """Files recorded as finished (in the progress log, or in an incomplete manifest of this
        model and width) that are still present with their size; a torn last line is ignored."""
        entries: list[Any] = []
        old = _read_json_or_none(self.manifest_path)
        if (old and old.get("model_fingerprint") == self.cfg.fingerprint() and old.get("bits") == self.bits
                and old.get("file_size") == self.layout.file_size and isinstance(old.get("files"), dict)):
            entries += [{"file": rel, **e} for rel, e in old["files"].items() if isinstance(e, dict)]
        if self.progress_path.is_file():
            for line in self.progress_path.read_text(errors="replace").splitlines():
                try:
                    entries.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        done: dict[str, dict[str, Any]] = {}
        for entry in entries:
            try:
                rel, size, digest = str(entry["file"]), int(entry["size"]), str(entry["xxh3_128"])
            except (KeyError, TypeError, ValueError):
                continue
            if size == self.layout.file_size and _size(self.dir / rel) == size:
                done[rel] = {"size": size, "xxh3_128": digest}
        return done

    # ---- conversion ---------------------------------------------------------------------------------
    def _convert_all(self, todo: list[tuple[int, int, str]], done: dict[str, dict[str, Any]]) -> None:
        if not todo:
            return
        per_expert = self.reader.expert_nbytes()
        with (byte_progress() as progress, open(self.progress_path, "a") as log,
              ThreadPoolExecutor(self.workers, thread_name_prefix="fmoe-repack") as pool):
            task = progress.add_task(f"repack q{self.bits}", total=len(todo) * per_expert)

            def one(L: int, e: int, rel: str) -> None:
                entry = self._write_expert(L, e, rel)
                with self._lock:
                    log.write(json.dumps({"file": rel, **entry}) + "\n")
                    log.flush()
                    done[rel] = entry
                    self.written += 1
                progress.advance(task, per_expert)

            _run_bounded(pool, one, todo, 2 * self.workers)

    def _write_expert(self, layer: int, expert: int, rel: str) -> dict[str, Any]:
        parts = self.reader.read_expert(layer, expert)
        tensors = {proj: self._quantize(parts[proj]) for proj in EXPERT_PROJECTIONS}
        data = expert_bytes(self.layout, tensors)
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


def _run_bounded(pool: ThreadPoolExecutor, fn: Callable[..., None], items: list[tuple[Any, ...]],
                 window: int) -> None:
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


def _remove_temp_files(folder: Path) -> None:
    """Temp files left by a killed run (atomic_output names them ``.NAME.XXXX.tmp``)."""
    for tmp in folder.rglob(".*.tmp"):
        tmp.unlink(missing_ok=True)


def _read_json_or_none(path: Path) -> dict[str, Any] | None:
    try:
        doc = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return doc if isinstance(doc, dict) else None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return -1
