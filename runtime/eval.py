"""`fmoe eval`: what quantisation and a smaller K cost, measured over the tokens of a text.

The text is cut into non-overlapping windows of ``ctx`` tokens, each run from a fresh state; as in
llama.cpp's ``llama-perplexity``, the positions of each window's second half are scored (position
``j`` predicts token ``j + 1`` for ``ctx/2 <= j < ctx - 1``), so every scored token has at least
``ctx/2`` tokens of context. Per variant (a packed directory at some expert bit width and K):

- perplexity ``exp(mean NLL)``, and against the reference ``ln(PPL/PPL_ref)`` (the mean NLL change);
- KL(reference || variant) of the next-token distributions: mean (with its standard error), median,
  99th percentile (numpy's linear interpolation), maximum;
- "same top p": the share of positions whose most likely token is the reference's;
- Δp: the mean (and RMS) change of the probability of the actual next token (llama.cpp's Δp), and
  Δp(top): the mean change of the probability of the reference's most likely token;
- optionally the well-formed-call check (:func:`call_prompts`): greedy completions of held-out code
  lines cut just before a call's opening bracket.

The reference is a source checkpoint (transformers' ``Qwen3_5MoeForCausalLM`` in float32 on the bf16
weights: the exact model; fmoe's engine equals it to about 1e-5 where their weights are equal), another
packed directory (its 4-bit experts by default), or a reference saved by an earlier run
(``save_reference``). Its logits are computed once per run and kept in memory for the
scored positions (``positions x vocab`` float32); they reach the disk only through ``save_reference``.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.errors import FmoeError
from fmoe.runtime.diagnostics import reference_cache

DEFAULT_CTX = 512
DEFAULT_TOKENS = 8192
CALL_TOKENS = 48  # generated tokens per call prompt
CALL_CONTEXT_LINES = 12  # lines of the text before the call's line, in its prompt
SAVED_FORMAT = "fmoe-eval-reference"


# ---- the text ------------------------------------------------------------------------------------
def reference_model_dir() -> Path:
    """The checked-in reference model (models/reference, installed as package data)."""
    from importlib import resources

    return Path(str(resources.files("fmoe.models").joinpath("reference")))


def read_text(path: Path | None) -> tuple[str, str]:
    """``(text, label)``: the file, or the reference model's held-out text when ``path`` is None."""
    if path is None:
        path = reference_model_dir() / "heldout.txt"
        label = "held-out CPython 3.11.7 Lib/ files (models/reference/heldout.txt)"
    else:
        label = str(path)
    if not path.is_file():
        raise FmoeError(f"--text {path}: {'not a regular file' if path.exists() else 'no such file'}")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FmoeError(f"--text {path}: not UTF-8 text") from None
    return text, label


def window_starts(n_tokens: int, ctx: int) -> list[int]:
    """Starts of the whole windows of ``ctx`` tokens that fit in ``n_tokens`` (none overlap)."""
    return list(range(0, n_tokens - ctx + 1, ctx))


def scored(ctx: int) -> slice:
    """The window positions whose next-token prediction is scored: the second half."""
    return slice(ctx // 2, ctx - 1)


def check_eval_options(ctx: int, tokens: int, calls: int) -> None:
    if not 4 <= ctx <= 1 << 20:
        raise FmoeError(f"--ctx {ctx}: must be between 4 and {1 << 20}")
    if tokens < ctx:
        raise FmoeError(f"--tokens {tokens}: must be at least --ctx ({ctx})")
    if calls < 0:
        raise FmoeError(f"--calls {calls}: must be >= 0")


# ---- metrics (float64) -----------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-probabilities of logits ``[..., vocab]``."""
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


@dataclass
class PositionMetrics:
    """Per scored position, a variant against the reference."""

    nll: np.ndarray  # -log q(next token)
    nll_ref: np.ndarray  # -log p(next token)
    kl: np.ndarray  # KL(p || q), nats
    same_top: np.ndarray  # bool: argmax q == argmax p
    dp: np.ndarray  # q(next) - p(next)
    dp_top: np.ndarray  # q(argmax p) - p(argmax p)

    @staticmethod
    def concat(parts: Sequence[PositionMetrics]) -> PositionMetrics:
        names = ("nll", "nll_ref", "kl", "same_top", "dp", "dp_top")
        return PositionMetrics(*(np.concatenate([getattr(p, n) for p in parts]) for n in names))


def compare(ref_logits: np.ndarray, targets: np.ndarray, logits: np.ndarray) -> PositionMetrics:
    """The metrics of each position from the reference's logits ``[N, vocab]`` (log-probabilities
    will do), the actual next tokens ``[N]`` and the variant's logits ``[N, vocab]``, in float64
    (equal logits give exactly 0)."""
    lp = log_softmax(ref_logits)
    lq = log_softmax(logits)
    if lp.shape != lq.shape or targets.shape != lp.shape[:1]:
        raise FmoeError(f"eval: shapes differ: reference {lp.shape}, variant {lq.shape}, targets {targets.shape}")
    rows = np.arange(len(targets))
    p = np.exp(lp)
    kl = np.where(p > 0, p * (lp - lq), 0.0).sum(axis=-1)
    top_p = lp.argmax(axis=-1)
    return PositionMetrics(
        nll=-lq[rows, targets],
        nll_ref=-lp[rows, targets],
        kl=kl,
        same_top=lq.argmax(axis=-1) == top_p,
        dp=np.exp(lq[rows, targets]) - p[rows, targets],
        dp_top=np.exp(lq[rows, top_p]) - p[rows, top_p],
    )


def summarise(m: PositionMetrics) -> dict[str, float]:
    """llama.cpp's KL-divergence report of one variant (PPL, KL statistics, same top p, Δp)."""
    n = len(m.kl)
    if n == 0:
        raise FmoeError("eval: no scored positions")
    same = float(m.same_top.mean())
    return {
        "positions": n,
        "ppl": math.exp(float(m.nll.mean())),
        "ppl_ref": math.exp(float(m.nll_ref.mean())),
        "ln_ppl_ratio": float((m.nll - m.nll_ref).mean()),
        "kl_mean": float(m.kl.mean()),
        "kl_mean_se": float(m.kl.std(ddof=1) / math.sqrt(n)) if n > 1 else 0.0,
        "kl_median": float(np.median(m.kl)),
        "kl_p99": float(np.percentile(m.kl, 99)),
        "kl_max": float(m.kl.max()),
        "same_top": same,
        "same_top_se": math.sqrt(same * (1 - same) / n),
        "dp_mean": float(m.dp.mean()),
        "dp_rms": float(np.sqrt((m.dp**2).mean())),
        "dp_top_mean": float(m.dp_top.mean()),
    }


# ---- the well-formed-call check --------------------------------------------------------------------
_CALL = re.compile(r"[A-Za-z_][A-Za-z0-9_.]*\(")


@dataclass(frozen=True)
class CallPrompt:
    """A held-out line holding a call, cut just before the call's ``(``: the model must write the
    argument list and close it."""

    prompt: str  # the preceding lines and the line up to the "("
    head: str  # the line up to the "(" (indented as in the text)
    original: str  # the rest of the original line, from the "("


def call_prompts(text: str, n: int, context_lines: int = CALL_CONTEXT_LINES) -> list[CallPrompt]:
    """``n`` prompts, evenly spaced over the lines of ``text`` that are one complete simple statement
    (16 to 100 characters, parsing on their own) holding a call with arguments."""
    lines = text.split("\n")
    found: list[CallPrompt] = []
    for i, line in enumerate(lines):
        s = line.strip()
        if i < context_lines or not 16 <= len(s) <= 100 or s.startswith(("#", "@")) or s.endswith(":"):
            continue
        m = _CALL.search(line)
        if m is None or line[m.end() :].startswith(")"):
            continue
        try:
            ast.parse(s)
        except SyntaxError:
            continue
        head = line[: m.end() - 1]
        context = "\n".join(lines[i - context_lines : i])
        found.append(CallPrompt(context + "\n" + head, head, line[m.end() - 1 :]))
    if not found:
        return []
    picks = sorted({round(x) for x in np.linspace(0, len(found) - 1, min(n, len(found)))})
    return [found[i] for i in picks]


def cut_call(head: str, completion: str) -> str | None:
    """The completion up to the first line end at which ``head + completion`` is valid Python (the
    call closed, the statement complete), or None when no line end within it makes it so."""
    for end in [i for i, c in enumerate(completion) if c == "\n"]:
        piece = completion[:end]
        try:
            ast.parse(head.lstrip() + piece)
        except SyntaxError:
            continue
        return piece
    return None


def call_report(prompts: Sequence[CallPrompt], completions: Sequence[str], ref: Sequence[str] | None) -> dict:
    """Well-formed share, the share identical to the original line, and to the reference's completions."""
    cuts = [cut_call(p.head, c) for p, c in zip(prompts, completions, strict=True)]
    n = max(len(prompts), 1)
    out = {
        "prompts": len(prompts),
        "well_formed": sum(c is not None for c in cuts) / n,
        "as_original": sum(c is not None and c == p.original for p, c in zip(prompts, cuts, strict=True)) / n,
    }
    if ref is not None:
        ref_cuts = [cut_call(p.head, c) for p, c in zip(prompts, ref, strict=True)]
        out["as_reference"] = sum(a == b for a, b in zip(cuts, ref_cuts, strict=True)) / n
    return out


# ---- models ----------------------------------------------------------------------------------------
class Model:
    """What eval needs of a model: logits of a window from a fresh state, and greedy continuations."""

    label: str
    vocab_size: int

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        raise NotImplementedError

    def greedy(self, ids: Sequence[int], max_tokens: int, stop_ids: frozenset[int]) -> list[int]:
        raise NotImplementedError

    def close(self) -> None:
        pass


class EngineModel(Model):
    """A packed directory through fmoe's engine, at one expert bit width; K is set per variant."""

    def __init__(self, packed: Path, bits: int, **load_options: Any) -> None:
        import fmoe

        self.engine = fmoe.load(packed, bits=bits, **load_options)
        self.packed, self.bits = packed, bits
        self.vocab_size = self.engine.config.vocab_size
        self.label = f"{packed.name} q{bits}"

    @contextmanager
    def k(self, k: int | None) -> Iterator[int]:
        """Run with ``k`` experts per token (None: the model's own), restored afterwards."""
        from fmoe.runtime.model import check_k

        network = self.engine.runner.network
        before = network.top_k
        network.top_k = check_k(self.engine.config, k)
        try:
            yield network.top_k
        finally:
            network.top_k = before

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        return self.engine.logits(ids)

    def greedy(self, ids: Sequence[int], max_tokens: int, stop_ids: frozenset[int]) -> list[int]:
        result = self.engine.generate(list(ids), max_tokens=max_tokens, chat=False, stop_ids=stop_ids, profile=False)
        return list(result.token_ids)

    def close(self) -> None:
        self.engine.close()


class SourceModel(Model):
    """An official-layout source checkpoint through transformers (float32, CPU): the exact model."""

    def __init__(self, source: Path) -> None:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError:
            raise FmoeError(
                f"--reference {source}: a source checkpoint runs through transformers, which is not installed "
                "(pip install 'fmoe[reference]'), or give a packed directory"
            ) from None
        from transformers.utils import logging as hf_logging

        from fmoe.convert.synth import load_reference_model

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity_error()  # the notes that optional kernels are missing (pure torch is exact)
        self.model = load_reference_model(source)
        self.vocab_size = int(self.model.config.vocab_size)
        self.label = f"{source.name} (bf16 source, transformers float32)"

    def logits(self, ids: Sequence[int]) -> np.ndarray:
        import torch

        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=False)
        return out.logits[0].float().numpy()

    def greedy(self, ids: Sequence[int], max_tokens: int, stop_ids: frozenset[int]) -> list[int]:
        import torch

        tokens: list[int] = []
        with torch.no_grad():
            out = self.model(input_ids=torch.tensor([list(ids)]), use_cache=True)
            while len(tokens) < max_tokens:
                token = int(out.logits[0, -1].argmax())
                tokens.append(token)
                if token in stop_ids:
                    break
                cache = reference_cache(self.model, out)
                out = self.model(input_ids=torch.tensor([[token]]), use_cache=True, **cache)
        return tokens


def is_packed(path: Path) -> bool:
    from fmoe.formats.packed import IDENTITY_FILE

    return (path / IDENTITY_FILE).is_file()


def dense_bits(packed: Path) -> int | None:
    from fmoe.formats.packed import DENSE_MANIFEST
    from fmoe.fsutil import read_json

    value = read_json(packed / DENSE_MANIFEST, "the dense manifest").get("dense_bits")
    return value if isinstance(value, int) else None


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class Reference:
    """The reference's logits at the scored positions, with the targets."""

    label: str
    tokens: np.ndarray  # int64 [n]: the evaluated tokens
    ctx: int
    logits: np.ndarray  # float32 [N, vocab], as the model computed them
    targets: np.ndarray  # int64 [N]
    calls: list[str] | None = None  # greedy completions of the call prompts
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> None:
        """An ``.npz``: tokens, ctx, the scored positions' logits (float32, full vocabulary) and what made them."""
        from fmoe.fsutil import atomic_output

        meta = {"format": SAVED_FORMAT, "version": 1, "label": self.label, "calls": self.calls, **self.meta}
        with atomic_output(path) as f:
            np.savez(f, tokens=self.tokens, ctx=np.int64(self.ctx), logits=self.logits, meta=json.dumps(meta))

    @classmethod
    def load(cls, path: Path) -> Reference:
        from fmoe.formats.npz import read_npz

        meta, z = read_npz(path, f"--reference {path}", "a reference saved by `fmoe eval --save-reference`",
                           SAVED_FORMAT, ("tokens", "ctx", "logits"))  # fmt: skip
        try:
            tokens, ctx, logits = z["tokens"].astype(np.int64), int(z["ctx"]), z["logits"]
        except (TypeError, ValueError) as exc:
            raise FmoeError(f"--reference {path}: tokens or ctx unreadable ({exc})") from None
        targets = np.concatenate([t for _, t in _windows(tokens, ctx)]) if len(tokens) >= ctx else np.zeros(0, int)
        if logits.ndim != 2 or logits.shape[0] != len(targets) or logits.dtype != np.float32:
            raise FmoeError(f"--reference {path}: {logits.dtype} {logits.shape} logits for {len(targets)} positions")
        label = f"{meta.get('label', path.name)} (saved in {path.name})"
        return cls(label, tokens, ctx, logits, targets, meta.get("calls"), meta)


def _windows(tokens: np.ndarray, ctx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(window ids, the next tokens of its scored positions)."""
    for s in window_starts(len(tokens), ctx):
        w = tokens[s : s + ctx]
        yield w, w[1:][scored(ctx)]


def compute_reference(
    model: Model,
    tokens: np.ndarray,
    ctx: int,
    calls: Sequence[list[int]] = (),
    complete: Callable[[Model, list[int]], str] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Reference:
    """Run the reference once over every window (and complete the call prompts)."""
    lps, targets = [], []
    for w, t in _windows(tokens, ctx):
        lps.append(np.asarray(model.logits(w.tolist())[scored(ctx)], dtype=np.float32))
        targets.append(t)
        if progress:
            progress("reference")
    completions = [complete(model, p) for p in calls] if calls and complete else None
    return Reference(model.label, tokens, ctx, np.concatenate(lps), np.concatenate(targets), completions)


def evaluate(
    packed: Path,
    *,
    reference: Path | None = None,
    reference_bits: int = 4,
    text: Path | None = None,
    bits: Sequence[int] = (),
    ks: Sequence[int | None] = (None,),
    tokens: int = DEFAULT_TOKENS,
    ctx: int = DEFAULT_CTX,
    calls: int = 0,
    save_reference: Path | None = None,
    load_options: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """The whole report as a dict (``fmoe eval --json``): the reference once, then every bit width
    (one engine each) at every K."""
    from fmoe.runtime.loader import available_bits, check_packed_dir
    from fmoe.runtime.text.tokenizer import Tokenizer

    check_eval_options(ctx, tokens, calls)
    packed = check_packed_dir(packed, bits[0] if bits else 4)
    bits = list(dict.fromkeys(bits)) or available_bits(packed)
    for b in bits:
        check_packed_dir(packed, b)
    options = dict(load_options or {})
    body, text_label = read_text(text)
    tokenizer = Tokenizer(packed / "tokenizer.json")
    ids = np.asarray(tokenizer.encode(body)[:tokens], dtype=np.int64)
    if len(ids) < ctx:
        raise FmoeError(f"--text {text_label}: {len(ids)} tokens, fewer than --ctx {ctx}")
    ids = ids[: len(window_starts(len(ids), ctx)) * ctx]  # whole windows
    prompts = call_prompts(body, calls) if calls else []
    prompt_ids = [tokenizer.encode(p.prompt) for p in prompts]
    stop_ids = _stop_ids(packed)

    def complete(model: Model, prompt: list[int]) -> str:
        return tokenizer.decode([t for t in model.greedy(prompt, CALL_TOKENS, stop_ids) if t not in stop_ids])

    # the reference, once
    ref_engine: EngineModel | None = None
    if reference is not None and reference.is_file():
        ref = Reference.load(reference)
        if not np.array_equal(ref.tokens, ids) or ref.ctx != ctx:
            raise FmoeError(
                f"--reference {reference}: saved for other tokens or another --ctx "
                "(use the same --text, --tokens and --ctx)"
            )
        if prompts and (ref.calls is None or len(ref.calls) != len(prompts)):
            raise FmoeError(f"--reference {reference}: saved without the same --calls {calls}")
    elif reference is None or is_packed(reference):
        ref_dir = reference or packed
        ref_engine = EngineModel(check_packed_dir(ref_dir, reference_bits), reference_bits, **options)
        with ref_engine.k(None) as k_ref:
            ref_engine.label = f"{ref_dir.name} q{reference_bits} K={k_ref} d{dense_bits(ref_dir)}"
            ref = compute_reference(ref_engine, ids, ctx, prompt_ids, complete, progress)
    elif (reference / "config.json").is_file():
        source = SourceModel(reference)
        try:
            ref = compute_reference(source, ids, ctx, prompt_ids, complete, progress)
        finally:
            source.close()
    else:
        raise FmoeError(
            f"--reference {reference}: neither a packed directory (fmoe.json), a source checkpoint "
            "(config.json) nor a reference saved by --save-reference"
        )
    if ref.logits.shape[1] != _vocab(packed):
        raise FmoeError(f"--reference: a vocabulary of {ref.logits.shape[1]} tokens; {packed} has {_vocab(packed)}")
    if save_reference is not None:
        ref.save(save_reference)

    per_window = ctx - 1 - ctx // 2
    rows = []
    try:
        for b in bits:
            same = ref_engine is not None and ref_engine.packed.resolve() == packed.resolve() and ref_engine.bits == b
            model = ref_engine if same and ref_engine is not None else EngineModel(packed, b, **options)
            try:
                for k in ks:
                    with model.k(k) as k_used:
                        parts = []
                        for i, (w, t) in enumerate(_windows(ids, ctx)):
                            lp = ref.logits[i * per_window : (i + 1) * per_window]
                            parts.append(compare(lp, t, model.logits(w.tolist())[scored(ctx)]))
                            if progress:
                                progress(f"q{b} K={k_used}")
                        row: dict[str, Any] = {
                            "variant": f"{packed.name} q{b} K={k_used} d{dense_bits(packed)}",
                            "packed": str(packed),
                            "bits": b,
                            "k": k_used,
                            "dense_bits": dense_bits(packed),
                            **summarise(PositionMetrics.concat(parts)),
                        }
                        if prompts:
                            completions = [complete(model, p) for p in prompt_ids]
                            row["calls"] = call_report(prompts, completions, ref.calls)
                        rows.append(row)
            finally:
                if model is not ref_engine:
                    model.close()
    finally:
        if ref_engine is not None:
            ref_engine.close()
    nll_ref = -log_softmax(ref.logits)[np.arange(len(ref.targets)), ref.targets]
    report: dict[str, Any] = {
        "text": text_label,
        "tokens": len(ids),
        "ctx": ctx,
        "windows": len(window_starts(len(ids), ctx)),
        "positions": len(ref.targets),
        "reference": {"label": ref.label, "ppl": math.exp(float(nll_ref.mean()))},
        "variants": rows,
    }
    if prompts:
        report["reference"]["calls"] = call_report(prompts, ref.calls or [""] * len(prompts), None)
    return report


def _vocab(packed: Path) -> int:
    from fmoe.formats.packed import read_identity

    return read_identity(packed)[1].vocab_size


def _stop_ids(packed: Path) -> frozenset[int]:
    from fmoe.formats.packed import read_identity
    from fmoe.runtime.text.chat import stop_token_ids
    from fmoe.runtime.text.tokenizer import Tokenizer

    cfg = read_identity(packed)[1]
    return frozenset(stop_token_ids(cfg, Tokenizer(packed / "tokenizer.json"), packed))
