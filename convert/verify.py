"""`fmoe verify`: check a packed directory against its manifests, without trusting anything in it.

Checks, in order: the identity file (fmoe.json), the dense manifest (every expected tensor present
with the shape the config gives, parts inside the file and aligned), each expert manifest (same
model, layout equal to the one the config gives, one entry per expert), then every byte: the
xxh3_128 of every expert file, of model_weights.bin and of each dense tensor, hashed in parallel
threads (xxhash releases the GIL). ``deep`` also dequantises a sample against the source
checkpoint (see verify_deep.py). Problems are collected, never raised: the report lists them all.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import xxhash

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import MIN_8BIT_SUFFIXES, dense_tensor_shapes
from fmoe.formats.expert_manifest import ExpertManifest, header_problems
from fmoe.formats.packed import (
    DENSE_ALIGN,
    DENSE_BIN,
    DENSE_BITS,
    DENSE_MANIFEST,
    EXPERT_MANIFEST,
    GENERATION_CONFIG,
    IDENTITY_FILE,
    PART_DTYPES,
    PROGRESS_FILE,
    TOKENIZER_FILES,
    experts_dir_bits,
    experts_dirname,
    manifest_digest_problem,
    progress_entries,
    read_identity,
    recorded_manifest_digest,
)
from fmoe.formats.quant import SUPPORTED_BITS
from fmoe.fsutil import HASH_CHUNK, read_json, xxh3_128_file
from fmoe.locking import LOCK_FILE, Stop, run_bounded, sigint_stops

MAX_TENSOR_PROBLEMS = 20  # per file: a corrupt manifest would otherwise list thousands of lines

Advance = Callable[[int], None]


@dataclass
class Findings:
    """Problems (make the artifact bad) and warnings (worth knowing), each ``{"file", "problem"}``."""

    bad: list[dict[str, str]] = field(default_factory=list)
    warnings: list[dict[str, str]] = field(default_factory=list)
    checked_files: int = 0
    checked_bytes: int = 0

    def fail(self, file: str, problem: str) -> None:
        self.bad.append({"file": file, "problem": problem})

    def warn(self, file: str, problem: str) -> None:
        self.warnings.append({"file": file, "problem": problem})


@dataclass
class HashJob:
    """One file to read and hash; ``run`` returns the problems found."""

    rel: str
    nbytes: int
    run: Callable[[Advance], list[str]]


@dataclass
class DenseSet:
    """model_weights.bin's tensors whose manifest entries passed the structural checks."""

    tensors: dict[str, dict[str, Any]]
    bad_tensors: set[str] = field(default_factory=set)


@dataclass
class ExpertSet:
    """One experts-q{bits} directory whose manifest passed the structural checks."""

    manifest: ExpertManifest
    bad_files: set[str] = field(default_factory=set)


# ---- entry point -------------------------------------------------------------------------------
def verify(packed: Path, deep: bool = False, source: Path | None = None, workers: int = 0) -> dict[str, Any]:
    """Check a packed directory; returns the report (``ok`` is False when anything is bad)."""
    packed = Path(packed)
    if workers < 0:
        raise FmoeError(f"--workers: {workers} must be >= 0 (0 = all cores)")
    if not packed.is_dir():
        raise FmoeError(f"{packed}: no such directory")
    started = time.monotonic()
    found = Findings()
    report: dict[str, Any] = {"path": str(packed), "model_fingerprint": None, "expert_bits": [], "deep": None}
    try:
        identity, cfg = read_identity(packed)
    except FmoeError as exc:
        # Without a trustworthy config nothing else can be checked against it.
        found.fail(IDENTITY_FILE, _strip_path(str(exc), packed / IDENTITY_FILE))
        return _finish(report, found, started)
    fingerprint = identity["model_fingerprint"]
    report["model_fingerprint"] = fingerprint

    src = None
    if deep:  # open the source first: a missing source is the user's mistake, reported before any hashing
        from fmoe.convert.verify_deep import open_source

        src = open_source(identity, cfg, source)

    stop = Stop()
    try:
        with sigint_stops(stop):  # the thread pool: Ctrl-C only sets the flag
            jobs: list[HashJob] = []
            dense = _plan_dense(packed, cfg, fingerprint, found, jobs)
            expert_sets = _plan_experts(packed, cfg, found, jobs)
            _check_top_level(packed, found)
            report["expert_bits"] = sorted(s.manifest.bits for s in expert_sets)
            _run_jobs(jobs, workers, found, expert_sets, stop)
        if src is not None:  # one thread, nothing written: a plain KeyboardInterrupt is safe here
            from fmoe.convert.verify_deep import deep_check

            report["deep"] = deep_check(packed, cfg, src, dense, expert_sets, found)
    finally:
        if src is not None:
            src.close()
    return _finish(report, found, started)


def _finish(report: dict[str, Any], found: Findings, started: float) -> dict[str, Any]:
    report.update(
        ok=not found.bad,
        bad=found.bad,
        warnings=found.warnings,
        checked_files=found.checked_files,
        checked_bytes=found.checked_bytes,
        seconds=round(time.monotonic() - started, 3),
    )
    return report


def _strip_path(message: str, path: Path) -> str:
    """FmoeErrors start with the file's path; the report names the file separately."""
    return message.removeprefix(f"{path}: ")


def _check_digest(packed: Path, rel: str, found: Findings) -> None:
    """fmoe.json's xxh3_128 of the manifest ``rel``: a mismatch makes it bad (edited or replaced after
    it was written); none recorded (an older fmoe wrote it) is worth a warning."""
    try:
        data = (packed / rel).read_bytes()
    except OSError:
        return  # reading the manifest itself reports it
    problem = manifest_digest_problem(packed, rel, data)
    if problem is None:
        return
    if recorded_manifest_digest(packed, rel) is None:
        found.warn(rel, problem)
    else:
        found.fail(rel, problem)


# ---- dense weights -----------------------------------------------------------------------------
def _plan_dense(
    packed: Path, cfg: TextConfig, fingerprint: str, found: Findings, jobs: list[HashJob]
) -> DenseSet | None:
    """Check model_weights.json against the config and queue the hashing of model_weights.bin.

    Returns the well-formed tensors (for the deep check), None when the manifest is unusable."""
    try:
        manifest = read_json(packed / DENSE_MANIFEST, "dense manifest")
    except FmoeError as exc:
        found.fail(DENSE_MANIFEST, _strip_path(str(exc), packed / DENSE_MANIFEST))
        if not (packed / DENSE_BIN).is_file():
            found.fail(DENSE_BIN, "missing")
        return None
    _check_digest(packed, DENSE_MANIFEST, found)
    problems = header_problems(manifest, "dense", fingerprint)
    if not isinstance(manifest.get("file_size"), int) or not isinstance(manifest.get("file_xxh3_128"), str):
        problems.append("has no file_size/file_xxh3_128")
    if manifest.get("dense_bits") not in DENSE_BITS:
        problems.append(f"dense_bits {manifest.get('dense_bits')!r} is not one of {DENSE_BITS}")
    tensors = manifest.get("tensors")
    if not isinstance(tensors, dict):
        problems.append("has no 'tensors' object")
        tensors = {}
    for p in problems:
        found.fail(DENSE_MANIFEST, p)
    if problems:
        return None

    bin_path = packed / DENSE_BIN
    if not bin_path.is_file():
        found.fail(DENSE_BIN, "missing")
        return None
    actual, declared = bin_path.stat().st_size, manifest["file_size"]

    expected = dense_tensor_shapes(cfg)
    tensor_problems: list[str] = []
    for name in expected.keys() - tensors.keys():
        tensor_problems.append(f"{name}: missing from the manifest")
    for name in sorted(tensors.keys() - expected.keys()):
        found.warn(DENSE_MANIFEST, f"{name}: not a tensor of this model's text config (ignored)")
    hashable: dict[str, dict[str, Any]] = {}
    spans: list[tuple[int, int, str]] = []
    for name in sorted(tensors.keys() & expected.keys()):
        errs = _check_tensor(name, tensors[name], expected[name], declared)
        tensor_problems += [f"{name}: {e}" for e in errs]
        if not errs:
            hashable[name] = tensors[name]
            spans += [(p["offset"], p["offset"] + p["size"], name) for p in tensors[name]["parts"].values()]
    spans.sort()
    for (_, end, a), (start, _, b) in itertools.pairwise(spans):
        if start < end:
            tensor_problems.append(f"{a} and {b}: parts overlap")
    _report_capped(found, DENSE_MANIFEST, sorted(tensor_problems))

    if declared != actual:  # tensors past a truncated end cannot be hashed; the size says why
        beyond = {n for n, t in hashable.items() if any(p["offset"] + p["size"] > actual for p in t["parts"].values())}
        found.fail(
            DENSE_BIN,
            f"size {actual} bytes, manifest says {declared} (truncated or replaced; "
            f"{len(beyond)} tensors lie past the end)",
        )
        hashable = {n: t for n, t in hashable.items() if n not in beyond}
    file_hash = manifest["file_xxh3_128"] if declared == actual else None
    dense = DenseSet(hashable)
    jobs.insert(0, HashJob(DENSE_BIN, actual, lambda adv: _hash_dense(bin_path, dense, file_hash, adv)))
    return dense


def _check_tensor(name: str, entry: Any, shape: tuple[int, ...], file_size: int) -> list[str]:
    """Structural problems of one dense tensor's manifest entry."""
    parts = entry.get("parts") if isinstance(entry, dict) else None
    if not isinstance(parts, dict) or not all(isinstance(p, dict) for p in parts.values()):
        return ["malformed manifest entry"]
    if not isinstance(entry.get("shape"), list) or tuple(entry["shape"]) != shape:
        return [f"shape {entry.get('shape')} but the config gives {list(shape)}"]
    if not isinstance(entry.get("xxh3_128"), str):
        return ["no xxh3_128"]
    kind = entry.get("kind")
    if kind == "float":
        dtype = parts.get("data", {}).get("dtype")
        if dtype not in ("bf16", "float32"):
            return [f"float dtype {dtype!r} is not bf16 or float32"]
        want = {"data": (dtype, shape)}
    elif kind == "affine":
        bits, group = entry.get("bits"), entry.get("group_size")
        if bits not in SUPPORTED_BITS or not isinstance(group, int) or group <= 0 or len(shape) != 2:
            return [f"affine bits {bits!r} / group_size {group!r} not valid for shape {list(shape)}"]
        if shape[1] % group or shape[1] * bits % 32:
            return [f"input dimension {shape[1]} does not fit group_size {group} at {bits} bits"]
        if bits < 8 and name.endswith(MIN_8BIT_SUFFIXES):
            return [f"quantised to {bits} bits; the format keeps this tensor at 8 bits or more"]
        out, inp = shape
        want = {
            "weight": ("uint32", (out, inp * bits // 32)),
            "scales": ("bf16", (out, inp // group)),
            "biases": ("bf16", (out, inp // group)),
        }
    else:
        return [f"unknown kind {kind!r}"]
    if list(parts) != list(want):
        return [f"parts {list(parts)} but a {kind} tensor has {list(want)}"]
    problems = []
    for part, (dtype, pshape) in want.items():
        p = parts[part]
        try:
            offset, size = int(p["offset"]), int(p["size"])
        except (KeyError, TypeError, ValueError):
            problems.append(f"{part}: no offset/size")
            continue
        if p.get("dtype") != dtype or not isinstance(p.get("shape"), list) or tuple(p["shape"]) != pshape:
            problems.append(f"{part}: {p.get('dtype')} {p.get('shape')}, expected {dtype} {list(pshape)}")
        elif size != math.prod(pshape) * PART_DTYPES[dtype].itemsize:
            problems.append(f"{part}: size {size} does not match {dtype} {list(pshape)}")
        if offset % DENSE_ALIGN:
            problems.append(f"{part}: offset {offset} not {DENSE_ALIGN}-byte aligned")
        if offset < 0 or offset + size > file_size:
            problems.append(f"{part}: bytes {offset}..{offset + size} lie outside the file ({file_size} bytes)")
    return problems


def _hash_dense(path: Path, dense: DenseSet, file_hash: str | None, advance: Advance) -> list[str]:
    """One sequential pass over model_weights.bin: the whole-file hash and every tensor's hash.

    A tensor's hash covers its parts in listed order; when that order is ascending (always, for
    files fmoe writes) the sweep feeds it, otherwise its parts are re-read afterwards. Tensors
    whose hash fails are recorded in ``dense.bad_tensors``."""
    tensors = dense.tensors
    ascending = {n for n, t in tensors.items() if _ascending(list(t["parts"].values()))}
    spans = sorted((p["offset"], p["offset"] + p["size"], n) for n in ascending for p in tensors[n]["parts"].values())
    hashers = {n: xxhash.xxh3_128() for n in ascending}
    whole = xxhash.xxh3_128()
    buf = bytearray(HASH_CHUNK)
    view = memoryview(buf)
    pos = first = 0
    with open(path, "rb") as f:
        while n := f.readinto(buf):
            chunk, end = view[:n], pos + n
            whole.update(chunk)
            i = first
            while i < len(spans) and spans[i][0] < end:
                lo, hi = max(spans[i][0], pos), min(spans[i][1], end)
                if hi > lo:
                    hashers[spans[i][2]].update(chunk[lo - pos : hi - pos])
                i += 1
            while first < len(spans) and spans[first][1] <= end:
                first += 1
            pos = end
            advance(n)
    digests = {n: h.hexdigest() for n, h in hashers.items()}
    for name in tensors.keys() - ascending:
        h = xxhash.xxh3_128()
        with open(path, "rb") as f:
            for p in tensors[name]["parts"].values():
                f.seek(p["offset"])
                h.update(f.read(p["size"]))
        digests[name] = h.hexdigest()
    dense.bad_tensors.update(n for n in tensors if digests[n] != tensors[n]["xxh3_128"])
    problems = [f"tensor {n}: xxh3_128 mismatch (corrupt bytes)" for n in sorted(dense.bad_tensors)]
    if file_hash is not None and whole.hexdigest() != file_hash:
        problems.insert(0, "xxh3_128 mismatch (corrupt bytes)")
    return problems


def _ascending(parts: list[dict[str, Any]]) -> bool:
    return all(a["offset"] <= b["offset"] for a, b in itertools.pairwise(parts))


# ---- experts -----------------------------------------------------------------------------------
def _plan_experts(packed: Path, cfg: TextConfig, found: Findings, jobs: list[HashJob]) -> list[ExpertSet]:
    sets = []
    for d in sorted(packed.iterdir()):
        bits = experts_dir_bits(d.name)
        if not d.is_dir() or bits is None:
            continue
        if bits not in SUPPORTED_BITS:
            found.warn(d.name, f"{bits}-bit experts are not a format of this version (ignored)")
            continue
        es = _check_expert_manifest(packed, cfg, bits, found)
        if es is None:
            continue
        sets.append(es)
        _queue_expert_files(packed / d.name, es, cfg, found, jobs)
    if not sets and not found.bad:
        # A model cannot run without its experts: an extract-only directory is incomplete.
        found.fail(".", "no expert files (run `fmoe repack`)")
    return sets


def _check_expert_manifest(packed: Path, cfg: TextConfig, bits: int, found: Findings) -> ExpertSet | None:
    """Structural checks of experts-q{bits}/manifest.json; None when it cannot be trusted."""
    dirname = experts_dirname(bits)
    rel = f"{dirname}/{EXPERT_MANIFEST}"
    path = packed / rel
    if not path.exists() and (packed / dirname / PROGRESS_FILE).is_file():
        done = len(progress_entries(packed / dirname))
        found.fail(
            rel,
            f"missing: repack did not finish ({done} of {cfg.num_hidden_layers * cfg.num_experts} "
            f"files recorded in {PROGRESS_FILE}); run `fmoe repack` again",
        )
        return None
    if not path.exists():
        found.fail(rel, f"missing (no finished experts here): run `fmoe repack --bits {bits}`, or delete {dirname}")
        return None
    try:
        doc = read_json(path, "expert manifest")
    except FmoeError as exc:
        found.fail(rel, _strip_path(str(exc), path))
        return None
    _check_digest(packed, rel, found)
    manifest, problems = ExpertManifest.check(path, doc, cfg, bits)
    for p in problems:
        found.fail(rel, p)
    return None if manifest is None else ExpertSet(manifest)


def _queue_expert_files(folder: Path, es: ExpertSet, cfg: TextConfig, found: Findings, jobs: list[HashJob]) -> None:
    files = es.manifest.files
    on_disk = {
        str(p.relative_to(folder)): p
        for p in folder.rglob("*")
        if p.is_file() and p.name not in (EXPERT_MANIFEST, PROGRESS_FILE)
    }
    for rel in sorted(on_disk.keys() - files.keys()):
        found.warn(f"{folder.name}/{rel}", "unknown file (not in the manifest)")
    for rel in sorted(files):
        name = f"{folder.name}/{rel}"
        path = on_disk.get(rel)
        if path is None:
            found.fail(name, "missing")
            es.bad_files.add(rel)
            continue
        size = path.stat().st_size
        if size != files[rel]["size"]:
            found.fail(name, f"size {size} bytes, manifest says {files[rel]['size']} (truncated or replaced)")
            es.bad_files.add(rel)
            continue
        jobs.append(HashJob(name, size, _expert_hasher(path, files[rel]["xxh3_128"])))


def _expert_hasher(path: Path, digest: str) -> Callable[[Advance], list[str]]:
    def run(advance: Advance) -> list[str]:
        ok = xxh3_128_file(path, on_bytes=advance) == digest
        return [] if ok else ["xxh3_128 mismatch (corrupt bytes)"]

    return run


# ---- the rest of the directory -----------------------------------------------------------------
def _check_top_level(packed: Path, found: Findings) -> None:
    if not (packed / "tokenizer.json").is_file():
        found.fail("tokenizer.json", "missing")
    if not (packed / "chat_template.jinja").is_file():
        found.warn("chat_template.jinja", "missing (chat requests will need a template)")
    known = {IDENTITY_FILE, DENSE_BIN, DENSE_MANIFEST, *TOKENIZER_FILES, GENERATION_CONFIG, LOCK_FILE}
    for p in sorted(packed.iterdir()):
        if p.name not in known and not (p.is_dir() and experts_dir_bits(p.name) is not None):
            found.warn(p.name, "unknown file (not part of the format)")


# ---- parallel hashing --------------------------------------------------------------------------
def _run_jobs(jobs: list[HashJob], workers: int, found: Findings, expert_sets: list[ExpertSet], stop: Stop) -> None:
    """Hash every queued file in a thread pool, with a byte progress bar on stderr; Ctrl-C cancels
    the queue and stops the running hashes at their next chunk."""
    from fmoe.progress import byte_progress

    if not jobs:
        return
    by_dir = {experts_dirname(s.manifest.bits): s for s in expert_sets}
    total = sum(j.nbytes for j in jobs)
    with byte_progress(transient=True) as progress:
        task = progress.add_task("verify", total=total)

        def advance(n: int) -> None:
            progress.advance(task, n)
            stop.check()

        def run(job: HashJob) -> list[str]:
            try:
                return job.run(advance)
            except OSError as exc:
                return [f"unreadable ({exc.strerror or exc})"]

        def record(item: tuple[Any, ...], problems: list[str]) -> None:
            job = item[0]
            found.checked_files += 1
            found.checked_bytes += job.nbytes
            _report_capped(found, job.rel, problems)
            if problems and "/" in job.rel:
                dirname, rel = job.rel.split("/", 1)
                if dirname in by_dir:
                    by_dir[dirname].bad_files.add(rel)

        run_bounded(
            run,
            [(j,) for j in jobs],
            workers=workers or os.cpu_count() or 1,
            stop=stop,
            name="fmoe-verify",
            on_result=record,
        )
    found.bad.sort(key=lambda b: b["file"])


def _report_capped(found: Findings, file: str, problems: list[str]) -> None:
    for p in problems[:MAX_TENSOR_PROBLEMS]:
        found.fail(file, p)
    if len(problems) > MAX_TENSOR_PROBLEMS:
        found.fail(file, f"... and {len(problems) - MAX_TENSOR_PROBLEMS} more problems")
