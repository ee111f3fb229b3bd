"""Test and diagnostics support for the model (nothing here runs in normal inference):

- in-memory / counting expert sources, random canonical weights;
- a converter from a transformers state dict to the canonical names of docs/FORMAT.md;
- the real pipeline for tests (synth --on-grid -> extract -> repack);
- greedy runs of the reference (imports torch only when called) and of fmoe;
- the divergence measures of scripts/divergence.py.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.formats.quant import quantize
from fmoe.runtime.experts import ExpertWeights

ZERO_CENTRED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")


class DictExperts:
    """An ExpertSource over experts held in memory, counting every fetch (for the 'once per layer' checks)."""

    def __init__(self, experts: Mapping[int, Mapping[int, Any]]) -> None:
        self.experts = experts
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.fetched: Counter[tuple[int, int]] = Counter()

    def fetch(self, layer: int, experts: Sequence[int]) -> dict[int, Any]:
        ids = tuple(int(e) for e in experts)
        self.calls.append((layer, ids))
        self.fetched.update((layer, e) for e in ids)
        return {e: self.experts[layer][e] for e in ids}


class CountingSource:
    """Wraps any ExpertSource and records each fetch call (layer, expert ids)."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[tuple[int, tuple[int, ...]]] = []

    def fetch(self, layer: int, experts: Sequence[int]) -> Any:
        self.calls.append((layer, tuple(int(e) for e in experts)))
        return self.inner.fetch(layer, experts)


def canonical_from_reference(
    state: Mapping[str, np.ndarray], cfg: TextConfig, expert_bits: int = 4, group_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[int, dict[int, ExpertWeights]], dict[int, dict[int, dict[str, np.ndarray]]]]:
    """Convert a transformers ``Qwen3_5MoeForCausalLM`` state dict (numpy float32 arrays) to
    (dense tensors by canonical name, quantised experts, the experts' dequantised float values).

    Conventions applied (docs/FORMAT.md): ``model.`` prefix dropped, zero-centred norms stored as
    ``1 + w``, ``conv1d.weight`` ``[C, 1, K]`` -> ``[C, K]``, fused experts split per expert.
    The dequantised values let a caller put the reference model on exactly the same experts.
    """
    dense: dict[str, np.ndarray] = {}
    experts: dict[int, dict[int, ExpertWeights]] = {i: {} for i in range(cfg.num_hidden_layers)}
    floats: dict[int, dict[int, dict[str, np.ndarray]]] = {i: {} for i in range(cfg.num_hidden_layers)}
    inter = cfg.moe_intermediate_size
    for key, value in state.items():
        name = key.removeprefix("model.")
        arr = np.asarray(value, dtype=np.float32)
        if name.endswith("mlp.experts.gate_up_proj") or name.endswith("mlp.experts.down_proj"):
            continue
        if name.endswith(ZERO_CENTRED_NORMS) or name == "norm.weight":
            arr = 1.0 + arr
        elif name.endswith("linear_attn.conv1d.weight"):
            arr = arr.reshape(arr.shape[0], arr.shape[-1])
        dense[name] = np.ascontiguousarray(arr)
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.mlp.experts."
        gate_up = np.asarray(state[p + "gate_up_proj"], dtype=np.float32)
        down = np.asarray(state[p + "down_proj"], dtype=np.float32)
        for e in range(cfg.num_experts):
            qs = {
                "gate": quantize(gate_up[e, :inter], expert_bits, group_size),
                "up": quantize(gate_up[e, inter:], expert_bits, group_size),
                "down": quantize(down[e], expert_bits, group_size),
            }
            experts[layer][e] = ExpertWeights(**qs)
            floats[layer][e] = {k: q.dequantize() for k, q in qs.items()}
    return dense, experts, floats


def random_canonical(
    cfg: TextConfig, seed: int, expert_bits: int = 4, group_size: int = 64
) -> tuple[dict[str, np.ndarray], dict[int, dict[int, ExpertWeights]]]:
    """Random weights under canonical names (float32 dense, quantised experts), scaled so that
    activations stay O(1) and the logits have a spread: for model tests that need no checkpoint."""
    from fmoe.runtime.model import expected_dense_shapes

    rng = np.random.default_rng(seed)
    dense: dict[str, np.ndarray] = {}
    for name, shape in expected_dense_shapes(cfg).items():
        if name.endswith("A_log"):
            a = np.log(rng.uniform(1.0, 16.0, shape))
        elif name.endswith("dt_bias"):
            a = rng.normal(0.0, 1.0, shape)
        elif name.endswith("linear_attn.norm.weight"):
            a = rng.normal(1.0, 0.2, shape)  # plain weight
        elif len(shape) == 1:
            a = 1.0 + rng.normal(0.0, 0.2, shape)  # effective scale 1 + w
        elif name.endswith("conv1d.weight"):
            a = rng.normal(0.0, 0.5, shape)
        elif name == "embed_tokens.weight":
            a = rng.normal(0.0, 1.0, shape)
        else:
            a = rng.normal(0.0, 1.0, shape) / np.sqrt(shape[-1])
        dense[name] = a.astype(np.float32)
    experts: dict[int, dict[int, ExpertWeights]] = {}
    h, i = cfg.hidden_size, cfg.moe_intermediate_size
    for layer in range(cfg.num_hidden_layers):
        experts[layer] = {}
        for e in range(cfg.num_experts):
            mats = {
                "gate": rng.normal(0.0, h**-0.5, (i, h)),
                "up": rng.normal(0.0, h**-0.5, (i, h)),
                "down": rng.normal(0.0, i**-0.5, (h, i)),
            }
            experts[layer][e] = ExpertWeights(**{k: quantize(v, expert_bits, group_size) for k, v in mats.items()})
    return dense, experts


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


def reference_greedy(source: Path | str, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """Run transformers' Qwen3_5MoeForCausalLM (float32, its own cache) on an official checkpoint."""
    import torch

    from fmoe.convert.synth import load_reference_model

    model = load_reference_model(Path(source))
    ids = np.asarray(prompt, dtype=np.int64)
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids)[None], use_cache=True)
        prefill = out.logits[0].float().numpy().copy()
        past = out.past_key_values
        steps = [prefill[-1]]
        tokens: list[int] = []
        for _ in range(new_tokens):
            tokens.append(int(np.argmax(steps[-1])))
            if len(tokens) == new_tokens:
                break
            out = model(input_ids=torch.tensor([[tokens[-1]]]), past_key_values=past, use_cache=True)
            past = out.past_key_values
            steps.append(out.logits[0, -1].float().numpy().copy())
    return GreedyRun(ids, prefill, np.asarray(tokens, dtype=np.int64), np.stack(steps))


def fmoe_greedy(network: Any, prompt: Sequence[int], new_tokens: int) -> GreedyRun:
    """The same run through a Qwen35MoeNetwork: one batched prefill, then decode token by token."""
    ids = np.asarray(prompt, dtype=np.int64)
    state = network.new_state()
    prefill = network.forward(ids, state)
    steps = [prefill[-1]]
    tokens: list[int] = []
    for _ in range(new_tokens):
        tokens.append(int(np.argmax(steps[-1])))
        if len(tokens) == new_tokens:
            break
        steps.append(network.forward([tokens[-1]], state)[0])
    return GreedyRun(ids, prefill, np.asarray(tokens, dtype=np.int64), np.stack(steps))
