"""`fmoe verify --deep`: dequantise a deterministic sample of the artifacts and compare with the source.

What must hold, per kind of data (docs/FORMAT.md):
- minmax affine (4-bit experts, 8/4-bit dense matrices): every element within half a quantisation
  step of the source, plus the slack from rounding the group's scale and bias to bf16;
- clip-search affine (2-bit): every code is the nearest one for its group's scale and bias (or
  the clamp), the squared error is no larger than plain min/max would give, and the relative RMS
  error is not far above the one the manifest records;
- pass-through (an MLX source at the same bits): bit for bit equal;
- float tensors: float32 exact, bf16 within bf16 rounding.
Memory stays bounded: one expert, or a slice of rows of one tensor, at a time.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.errors import FmoeError
from fmoe.formats.packed import DENSE_BIN, EXPERT_PROJECTIONS, PART_DTYPES, QUANT_PARTS, expert_relpath, experts_dirname
from fmoe.formats.quant import SUPPORTED_BITS, QuantTensor, bf16_to_f32, quantize

if TYPE_CHECKING:
    from fmoe.convert.source import SourceCheckpoint
    from fmoe.convert.verify import DenseSet, ExpertSet, Findings

EXPERTS_PER_LAYER = 2
DENSE_ROWS = 64  # rows compared per dense matrix (a deterministic slice, bounded memory)
BF16_REL = 2.0**-7  # twice the worst bf16 rounding (8 significant bits: at most 2^-8 relative)
FLOAT_SLACK = 1e-6  # float32 evaluation of scale * q + bias
CLIP_RMS_FACTOR = 2.0  # a sampled expert's rel. RMS error may exceed the recorded (average) one by this much
METHODS = ("passthrough", "minmax", "clip-search")
ORIGINS = ("bf16", "fp8", "packed-4bit", *(f"mlx-{b}bit" for b in SUPPORTED_BITS))  # repack's quantization "from"


def open_source(identity: dict[str, Any], cfg: TextConfig, source: Path | None) -> SourceCheckpoint:
    """The source checkpoint for the deep check: ``--source`` or the path fmoe.json records."""
    from fmoe.convert.source import SourceCheckpoint

    recorded = (identity.get("source") or {}).get("path")
    path = Path(source) if source is not None else Path(recorded) if recorded else None
    if path is None:
        raise FmoeError("--deep: fmoe.json records no source checkpoint; pass --source DIR")
    if not path.is_dir():
        raise FmoeError(f"--deep: source checkpoint {path} not found; pass --source DIR")
    src = SourceCheckpoint.open(path)
    if src.config.fingerprint() != cfg.fingerprint():
        raise FmoeError(
            f"--deep: source {path} is another model (fingerprint {src.config.fingerprint()}, "
            f"the packed directory holds {cfg.fingerprint()})"
        )
    return src


def deep_check(
    packed: Path,
    cfg: TextConfig,
    src: SourceCheckpoint,
    dense: DenseSet | None,
    expert_sets: list[ExpertSet],
    found: Findings,
) -> dict[str, Any]:
    """Compare the sample with the source; problems go to ``found``; returns the deep summary."""
    summary: dict[str, Any] = {"source": str(src.path), "tensors": 0, "experts": 0, "expert_sets": {}}
    if dense is not None:
        for name in sample_dense_names(cfg, dense.tensors):
            if name in dense.bad_tensors:
                continue
            problem = _compare_dense(packed / DENSE_BIN, name, dense.tensors[name], src)
            summary["tensors"] += 1
            if problem:
                found.fail(DENSE_BIN, f"deep: tensor {name}: {problem}")
    by_bits = {s.manifest.bits: s for s in expert_sets}
    for es in expert_sets:
        result = _check_expert_set(packed, cfg, src, es, by_bits, found)
        summary["expert_sets"][experts_dirname(es.manifest.bits)] = result
        summary["experts"] += result["experts"]
    return summary


# ---- the sample --------------------------------------------------------------------------------
def sample_experts(cfg: TextConfig, fingerprint: str) -> list[tuple[int, int]]:
    """A few experts per layer, the same ones on every run for one model."""
    out = []
    k = min(EXPERTS_PER_LAYER, cfg.num_experts)
    for layer in range(cfg.num_hidden_layers):
        rng = np.random.default_rng([int(fingerprint, 16), layer])
        out += [(layer, int(e)) for e in sorted(rng.choice(cfg.num_experts, size=k, replace=False))]
    return out


def sample_dense_names(cfg: TextConfig, tensors: dict[str, Any]) -> list[str]:
    """Embedding, head, final norm and every tensor of the first linear and the first full layer:
    each role (norms, conv, vectors, matrices, router) is compared at least once."""
    layers = {
        next((L for L in range(cfg.num_hidden_layers) if cfg.is_full_attention(L) == full), None)
        for full in (False, True)
    }
    prefixes = tuple(f"layers.{L}." for L in sorted(x for x in layers if x is not None))
    names = ["embed_tokens.weight", "lm_head.weight", "norm.weight"]
    names += sorted(n for n in tensors if n.startswith(prefixes))
    return [n for n in names if n in tensors]


# ---- dense -------------------------------------------------------------------------------------
def _compare_dense(path: Path, name: str, entry: dict[str, Any], src: SourceCheckpoint) -> str | None:
    shape = tuple(entry["shape"])
    rows = None
    if src.dense_spec(name).role == "matrix":  # matrices can be huge (embedding): a slice of rows
        rng = np.random.default_rng(sum(name.encode()))
        start = int(rng.integers(0, max(1, shape[0] - DENSE_ROWS + 1)))
        rows = (start, min(shape[0], start + DENSE_ROWS))
    ref = src.read_dense(name, rows=rows) if rows else src.read_dense(name)
    parts = entry["parts"]
    if entry["kind"] == "float":
        raw = _read_part(path, parts["data"], rows)
        got = bf16_to_f32(raw) if parts["data"]["dtype"] == "bf16" else raw
        ref_f = ref.dequantize() if isinstance(ref, QuantTensor) else ref
        ref_f = np.asarray(ref_f, dtype=np.float32).reshape(got.shape)
        tol = np.abs(ref_f) * (BF16_REL if parts["data"]["dtype"] == "bf16" else FLOAT_SLACK)
        excess = np.abs(got - ref_f) - tol
        if (excess > 0).any():
            return f"differs from the source by up to {float(np.abs(got - ref_f).max()):.3g}"
        return None
    weight, scales, biases = (_read_part(path, parts[p], rows) for p in QUANT_PARTS)
    qt = QuantTensor(weight, scales, biases, entry["bits"], entry["group_size"])
    if isinstance(ref, QuantTensor) and (ref.bits, ref.group_size) == (qt.bits, qt.group_size):
        return None if _same_codes(qt, ref) else "differs from the MLX source it should copy bit for bit"
    ref_f = ref.dequantize() if isinstance(ref, QuantTensor) else np.asarray(ref, dtype=np.float32)
    return _check_affine(qt, ref_f, "minmax", None)


def _read_part(path: Path, part: dict[str, Any], rows: tuple[int, int] | None) -> np.ndarray:
    """One part of a dense tensor (or a range of its rows) from model_weights.bin."""
    dtype = PART_DTYPES[part["dtype"]]
    shape = list(part["shape"])
    offset = part["offset"]
    if rows is not None:
        row_bytes = int(np.prod(shape[1:])) * dtype.itemsize
        offset += rows[0] * row_bytes
        shape[0] = rows[1] - rows[0]
    return np.fromfile(path, dtype=dtype, count=int(np.prod(shape)), offset=offset).reshape(shape)


# ---- experts -----------------------------------------------------------------------------------
def _check_expert_set(
    packed: Path,
    cfg: TextConfig,
    src: SourceCheckpoint,
    es: ExpertSet,
    by_bits: dict[int, ExpertSet],
    found: Findings,
) -> dict[str, Any]:
    dirname = experts_dirname(es.manifest.bits)
    quant = _dict(es.manifest.document.get("quantization"))
    method, origin = (v if isinstance(v, str) else repr(v) for v in (quant.get("method"), quant.get("from")))
    recorded = _dict(_dict(quant.get("error")).get(method)).get("rel_rms")
    if not isinstance(recorded, float):
        recorded = None
    result: dict[str, Any] = {
        "method": method,
        "from": origin,
        "experts": 0,
        "max_rel_rms": 0.0,
        "recorded_rel_rms": recorded,
    }
    if method not in METHODS or origin not in ORIGINS:
        found.fail(f"{dirname}/manifest.json", f"deep: unknown quantization method/from {method!r}/{origin!r}")
        return result
    q4 = by_bits.get(4) if origin == "packed-4bit" else None  # the experts this set was quantised from
    if origin == "packed-4bit" and (q4 is None or es.manifest.bits == 4):
        found.fail(f"{dirname}/manifest.json", "deep: quantised from packed 4-bit experts, but experts-q4 is absent")
        return result
    for layer, expert in sample_experts(cfg, es.manifest.document["model_fingerprint"]):
        rel = expert_relpath(layer, expert)
        if rel in es.bad_files or (q4 is not None and rel in q4.bad_files):
            continue  # already reported; its bytes are not what the manifest describes
        packed_qt = es.manifest.layout.decode((packed / dirname / rel).read_bytes())
        if q4 is not None:
            ref = q4.manifest.layout.decode((packed / experts_dirname(4) / rel).read_bytes())
        else:
            ref = src.read_expert(layer, expert)
        result["experts"] += 1
        for proj in EXPERT_PROJECTIONS:
            problem, rel_rms = _compare_expert(packed_qt[proj], ref[proj], method, origin, recorded)
            result["max_rel_rms"] = max(result["max_rel_rms"], rel_rms)
            if problem:
                found.fail(f"{dirname}/{rel}", f"deep: {proj}: {problem}")
                break
    return result


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _compare_expert(
    qt: QuantTensor, ref: np.ndarray | QuantTensor, method: str, origin: str, recorded: float | None
) -> tuple[str | None, float]:
    """(problem or None, relative RMS error) of one projection against its reference."""
    if origin.startswith("mlx-") and not isinstance(ref, QuantTensor):
        return f"the manifest says quantised from {origin}, but the source holds float experts", 0.0
    if origin in ("bf16", "fp8") and isinstance(ref, QuantTensor):
        return f"the manifest says quantised from {origin}, but the source holds quantised experts", 0.0
    if method == "passthrough":
        if not isinstance(ref, QuantTensor) or (ref.bits, ref.group_size) != (qt.bits, qt.group_size):
            return "pass-through from a source of another bit width", 0.0
        return (None if _same_codes(qt, ref) else "differs from the MLX source it should copy bit for bit"), 0.0
    ref_f = ref.dequantize() if isinstance(ref, QuantTensor) else np.asarray(ref, dtype=np.float32)
    return _check_affine(qt, ref_f, method, recorded), _rel_rms(qt.dequantize(), ref_f)


def _same_codes(a: QuantTensor, b: QuantTensor) -> bool:
    return all(np.array_equal(x, y) for x, y in ((a.weight, b.weight), (a.scales, b.scales), (a.biases, b.biases)))


def _rel_rms(got: np.ndarray, ref: np.ndarray) -> float:
    ref64 = ref.astype(np.float64)
    denom = float(np.sqrt(np.mean(ref64**2))) or 1.0
    return float(np.sqrt(np.mean((got.astype(np.float64) - ref64) ** 2))) / denom


# ---- the affine checks -------------------------------------------------------------------------
def _check_affine(qt: QuantTensor, ref: np.ndarray, method: str, recorded: float | None) -> str | None:
    """Whether ``qt`` is a faithful ``method`` quantisation of float ``ref`` (see the module doc)."""
    if ref.shape != qt.shape:
        return f"shape {list(qt.shape)} but the source has {list(ref.shape)}"
    levels = (1 << qt.bits) - 1
    g = qt.group_size
    groups = (*ref.shape[:-1], ref.shape[-1] // g, g)
    w = ref.astype(np.float64).reshape(groups)
    deq = qt.dequantize().astype(np.float64).reshape(groups)
    s = bf16_to_f32(qt.scales).astype(np.float64)[..., None]
    b = bf16_to_f32(qt.biases).astype(np.float64)[..., None]
    err = np.abs(deq - w)
    step_slack = s * 1e-3 + FLOAT_SLACK * (np.abs(b) + levels * s)
    if method == "minmax":
        # Interior elements round to the nearest code; the range's ends move by the bf16 rounding
        # of the group's bias and scale.
        bound = s / 2 + BF16_REL * (levels * s + np.abs(b)) + step_slack
        if (err > bound).any():
            worst = float((err / bound).max())
            return f"error up to {worst:.2f}x the quantisation bound (not a min/max quantisation of the source)"
        return None
    # clip-search: nearest codes for the chosen range, clamped at its ends...
    codes = np.rint((deq - b) / s)
    top = b + levels * s
    nearest = (
        (err <= s / 2 + step_slack)
        | ((codes == 0) & (w <= b + step_slack))
        | ((codes == levels) & (w >= top - step_slack))
    )
    if not nearest.all():
        return f"{int((~nearest).sum())} codes are not the nearest for their group's scale and bias"
    # ...and a range no worse than plain min/max.
    sse = float(((deq - w) ** 2).sum())
    plain = quantize(ref.astype(np.float32), qt.bits, qt.group_size).dequantize().astype(np.float64).reshape(groups)
    sse_plain = float(((plain - w) ** 2).sum())
    if sse > sse_plain * (1 + 1e-3) + 1e-30:
        return f"squared error {sse:.3g} above plain min/max's {sse_plain:.3g}"
    rel = _rel_rms(deq, w)
    if recorded is not None and rel > CLIP_RMS_FACTOR * recorded + 1e-6:
        return f"relative RMS error {rel:.4f}, the manifest records {recorded:.4f}"
    return None
