"""Diagnostics of the model against the reference, for scripts/make_goldens.py, scripts/divergence.py
and the tests (nothing here runs in normal inference):

- the real pipeline on a synthetic checkpoint (synth --on-grid -> extract -> repack);
- an independent float64 reference of the whole network, one token at a time (numpy only), and the
  loader of a packed model's own weights for it;
- greedy runs of transformers' reference (imports torch only when called) and of fmoe;
- divergence measures (relative error, KL, top-1 agreement).
"""

from __future__ import annotations

import inspect
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.formats.quant import QuantTensor

if TYPE_CHECKING:
    from fmoe.runtime.engine.engine import Engine
    from fmoe.runtime.experts.slots import ExpertWeights


# ---- artifacts through the real pipeline --------------------------------------------------------
def build_packed(
    workdir: Path | str,
    *,
    preset: str = "tiny",
    seed: int = 0,
    dense_bits: int = 16,
    expert_bits: Sequence[int] = (4,),
) -> tuple[Path, Path]:
    """synth (on the 4-bit grid) -> extract -> repack, under ``workdir``; returns (source, packed).

    Re-running reuses what is there (extract and repack skip finished outputs)."""
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack
    from fmoe.convert.synth import synthesize

    workdir = Path(workdir)
    src = workdir / f"src-{preset}-s{seed}"
    if not (src / "config.json").is_file():
        shutil.rmtree(src, ignore_errors=True)
        synthesize(src, preset=preset, seed=seed, on_grid=True)
    packed = workdir / f"packed-{preset}-s{seed}-d{dense_bits}"
    extract(src, packed, dense_bits=dense_bits)
    for bits in expert_bits:
        repack(src, packed, bits=bits, workers=1)
    return src, packed


# ---- divergence measures ------------------------------------------------------------------------
def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def kl_divergence(exact: np.ndarray, approx: np.ndarray) -> np.ndarray:
    """KL(exact || approx) per position, in nats, from logits [T, vocab] (float64)."""
    lp, lq = log_softmax(exact), log_softmax(approx)
    return (np.exp(lp) * (lp - lq)).sum(axis=-1)


def top1_agreement(exact: np.ndarray, approx: np.ndarray) -> float:
    """Fraction of positions whose argmax token is the same."""
    return float(np.mean(np.argmax(exact, axis=-1) == np.argmax(approx, axis=-1)))


def relative_error(approx: np.ndarray, exact: np.ndarray) -> np.ndarray:
    """Per position: max|approx - exact| / max|exact| (the correctness bar's measure)."""
    a = np.asarray(approx, dtype=np.float64)
    b = np.asarray(exact, dtype=np.float64)
    return np.abs(a - b).max(axis=-1) / np.abs(b).max(axis=-1)


# ---- an independent float64 reference, one token at a time --------------------------------------
def float64_reference(
    cfg: TextConfig,
    dense: Mapping[str, np.ndarray | QuantTensor],
    experts: Mapping[int, Mapping[int, ExpertWeights]],
    ids: Sequence[int] | np.ndarray,
    k: int,
) -> tuple[np.ndarray, dict[int, set[int]]]:
    """The network in float64, one token at a time, written from the model's definition and
    independent of fmoe's network code (runtime/model.py). ``dense``: every tensor by canonical name,
    lm_head included (float arrays or QuantTensor); ``experts``: by layer and id. Everything is
    dequantised to float64 first. Returns (logits [T, vocab], the routed expert ids per layer)."""
    w = {
        n: (v.dequantize() if isinstance(v, QuantTensor) else np.asarray(v)).astype(np.float64)
        for n, v in dense.items()
    }
    ex = {
        (layer, e): {p: getattr(x, p).dequantize().astype(np.float64) for p in ("gate", "up", "down")}
        for layer, d in experts.items()
        for e, x in d.items()
    }
    eps = cfg.rms_norm_eps

    def rms(x, scale):
        return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * scale

    def silu(x):
        return x / (1.0 + np.exp(-x))

    def sig(x):
        return 1.0 / (1.0 + np.exp(-x))

    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    hk, hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
    dk, dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
    half = cfg.rotary_dim // 2
    inv_freq = cfg.rope_theta ** (-np.arange(half) * 2.0 / cfg.rotary_dim)
    hist = {i: np.zeros((cfg.linear_conv_kernel_dim - 1, cfg.conv_dim)) for i in range(cfg.num_hidden_layers)}
    S = {i: np.zeros((hv, dk, dv)) for i in range(cfg.num_hidden_layers)}
    K: dict[int, list[np.ndarray]] = {i: [] for i in range(cfg.num_hidden_layers)}
    V: dict[int, list[np.ndarray]] = {i: [] for i in range(cfg.num_hidden_layers)}
    routed: dict[int, set[int]] = {i: set() for i in range(cfg.num_hidden_layers)}
    out = []

    def rope(x, pos):  # x [H, D]; the pair (i, i + half) rotates as one complex number
        c = (x[:, :half] + 1j * x[:, half : 2 * half]) * np.exp(1j * pos * inv_freq)
        y = x.copy()
        y[:, :half], y[:, half : 2 * half] = c.real, c.imag
        return y

    for pos, tok in enumerate(ids):
        x = w["embed_tokens.weight"][tok]
        for i in range(cfg.num_hidden_layers):
            p = f"layers.{i}."
            h = rms(x, w[p + "input_layernorm.weight"])
            if cfg.is_full_attention(i):
                a = p + "self_attn."
                qg = (w[a + "q_proj.weight"] @ h).reshape(hq, 2 * d)
                q = rope(rms(qg[:, :d], w[a + "q_norm.weight"]), pos)
                kk = rope(rms((w[a + "k_proj.weight"] @ h).reshape(hkv, d), w[a + "k_norm.weight"]), pos)
                K[i].append(kk)
                V[i].append((w[a + "v_proj.weight"] @ h).reshape(hkv, d))
                keys, vals = np.stack(K[i]), np.stack(V[i])  # [L, Hkv, D]
                o = np.zeros((hq, d))
                for head in range(hq):
                    g = head // (hq // hkv)
                    s = keys[:, g] @ q[head] / np.sqrt(d)
                    pr = np.exp(s - s.max())
                    o[head] = (pr / pr.sum()) @ vals[:, g]
                x = x + w[a + "o_proj.weight"] @ (o.reshape(-1) * sig(qg[:, d:].reshape(-1)))
            else:
                a = p + "linear_attn."
                qkv = w[a + "in_proj_qkv.weight"] @ h
                window = np.vstack([hist[i], qkv])  # [K, C]: oldest first
                hist[i] = window[1:]
                conv = silu((window * w[a + "conv1d.weight"].T).sum(axis=0))
                kd = hk * dk
                q = conv[:kd].reshape(hk, dk)
                kk = conv[kd : 2 * kd].reshape(hk, dk)
                v = conv[2 * kd :].reshape(hv, dv)
                q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6) / np.sqrt(dk)
                kk = kk / np.sqrt((kk * kk).sum(-1, keepdims=True) + 1e-6)
                beta = sig(w[a + "in_proj_b.weight"] @ h)
                gdec = -np.exp(w[a + "A_log"]) * np.log1p(np.exp(w[a + "in_proj_a.weight"] @ h + w[a + "dt_bias"]))
                z = (w[a + "in_proj_z.weight"] @ h).reshape(hv, dv)
                o = np.zeros((hv, dv))
                for j in range(hv):
                    kh = j // (hv // hk)
                    S[i][j] *= np.exp(gdec[j])
                    delta = (v[j] - S[i][j].T @ kk[kh]) * beta[j]
                    S[i][j] += np.outer(kk[kh], delta)
                    o[j] = rms(S[i][j].T @ q[kh], w[a + "norm.weight"]) * silu(z[j])
                x = x + w[a + "out_proj.weight"] @ o.reshape(-1)
            h = rms(x, w[p + "post_attention_layernorm.weight"])
            m = p + "mlp."
            logits = w[m + "gate.weight"] @ h
            probs = np.exp(logits - logits.max())
            probs /= probs.sum()
            top = np.argsort(-probs)[:k]
            routed[i].update(int(e) for e in top)
            y = np.zeros_like(x)
            for e, pe in zip(top, probs[top] / probs[top].sum(), strict=True):
                f = ex[(i, int(e))]
                y += pe * (f["down"] @ (silu(f["gate"] @ h) * (f["up"] @ h)))
            shared = w[m + "shared_expert.down_proj.weight"] @ (
                silu(w[m + "shared_expert.gate_proj.weight"] @ h) * (w[m + "shared_expert.up_proj.weight"] @ h)
            )
            x = x + y + sig(w[m + "shared_expert_gate.weight"] @ h) * shared
        out.append(w["lm_head.weight"] @ rms(x, w["norm.weight"]))
    return np.stack(out), routed


def packed_weights(
    packed_dir: Path | str, bits: int
) -> tuple[TextConfig, dict[str, np.ndarray | QuantTensor], dict[int, dict[int, ExpertWeights]]]:
    """A packed model's own weights for :func:`float64_reference`: (config, dense, experts), read
    with the runtime's readers (every dense tensor and expert file checked against its xxh3_128), so
    the reference computes on exactly the values fmoe computes on. Every expert is held in memory:
    for small models only."""
    from fmoe.formats.expert_manifest import ExpertManifest
    from fmoe.formats.packed import read_identity
    from fmoe.formats.quant import bf16_to_f32
    from fmoe.runtime.dense import read_dense_weights
    from fmoe.runtime.experts.files import ExpertFiles
    from fmoe.runtime.experts.slots import ExpertWeights
    from fmoe.runtime.weights import EMBED, LM_HEAD

    packed = Path(packed_dir)
    _, cfg = read_identity(packed)
    # the embedding table is kept as stored: bf16 bit patterns (uint16) are not its values
    dense = {
        name: bf16_to_f32(t) if isinstance(t, np.ndarray) and t.dtype == np.uint16 else t
        for name, t in read_dense_weights(packed, cfg).items()
    }
    dense.setdefault(LM_HEAD, dense[EMBED])  # tied
    files = ExpertFiles(ExpertManifest.read(packed, cfg, bits), checks="every-read")
    experts: dict[int, dict[int, ExpertWeights]] = {}
    try:
        for layer in range(cfg.num_hidden_layers):
            experts[layer] = {}
            for e in range(cfg.num_experts):
                data = np.empty(files.file_size, np.uint8)  # its own buffer: decode's arrays are views of it
                files.read_into(layer, e, files.open(layer, e), data)
                q = files.layout.decode(data)
                experts[layer][e] = ExpertWeights(q["gate_proj"], q["up_proj"], q["down_proj"])
    finally:
        files.close()
    return cfg, dense, experts


# ---- reference runs (transformers) and the matching fmoe runs -----------------------------------
@dataclass
class GreedyRun:
    """Prefill logits of the prompt, then ``len(tokens)`` greedy tokens with each step's logits."""

    prompt: np.ndarray  # int64 [P]
    prefill_logits: np.ndarray  # float32 [P, vocab]
    tokens: np.ndarray  # int64 [N]: the greedy continuation
    step_logits: np.ndarray  # float32 [N, vocab]: logits that chose tokens[i] (row 0 = the prompt's last)

    @property
    def margins(self) -> np.ndarray:
        """top-1 minus top-2 logit at each greedy step (how robust the argmax is)."""
        top2 = np.sort(self.step_logits, axis=-1)[:, -2:]
        return top2[:, 1] - top2[:, 0]


def _greedy(
    prompt: Sequence[int],
    new_tokens: int,
    prefill: Callable[[np.ndarray], np.ndarray],
    step: Callable[[int], np.ndarray],
) -> GreedyRun:
    """The reference's loop: ``prefill(ids)`` -> logits [P, vocab], then ``step(token)`` -> the next
    logits [vocab], its own cache carried."""
    ids = np.asarray(prompt, dtype=np.int64)
    prefill_logits = prefill(ids)
    steps = [prefill_logits[-1]]
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(steps[-1])))
        if len(tokens) == new_tokens:
            break
        steps.append(step(tokens[-1]))
    return GreedyRun(ids, prefill_logits, np.asarray(tokens, dtype=np.int64), np.stack(steps))


def reference_cache(model: Any, out: Any) -> dict[str, Any]:
    """The keyword that hands a transformers forward pass's cache to the next one: ``cache`` from
    transformers 5.2x on, ``past_key_values`` before (deprecated there, removed in 5.40)."""
    if "cache" in inspect.signature(model.forward).parameters:
        return {"cache": out.cache}
    return {"past_key_values": out.past_key_values}


def reference_greedy(source: Path | str, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """Run transformers' Qwen3_5MoeForCausalLM (float32, its own cache) on an official checkpoint."""
    import torch

    from fmoe.convert.synth import load_reference_model

    model = load_reference_model(Path(source))
    cache: dict[str, Any] = {}

    def run(ids: torch.Tensor) -> np.ndarray:
        nonlocal cache
        out = model(input_ids=ids[None], use_cache=True, **cache)
        cache = reference_cache(model, out)
        return out.logits[0].float().numpy().copy()

    with torch.no_grad():
        return _greedy(
            prompt, new_tokens, lambda ids: run(torch.from_numpy(ids)), lambda token: run(torch.tensor([token]))[-1]
        )


def fmoe_greedy(engine: Engine, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """The same run through fmoe's own generation loop: one batched prefill (every position's logits
    kept), then greedy decode with the session carried."""
    from fmoe.runtime.engine.generate import generate_step

    session = engine.new_session()
    steps, tokens = [], []
    prefill_logits = None
    greedy = generate_step(engine.runner, session, prompt, lambda row: int(np.argmax(row)), all_logits=True)
    for gen in greedy:
        if prefill_logits is None:
            prefill_logits = gen.step.logits
        steps.append(gen.logits)
        tokens.append(gen.token)
        if len(tokens) == new_tokens:
            break
    assert prefill_logits is not None
    return GreedyRun(
        np.asarray(prompt, dtype=np.int64), prefill_logits, np.asarray(tokens, dtype=np.int64), np.stack(steps)
    )
