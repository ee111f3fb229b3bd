"""Test helpers, importable as ``support`` (pyproject's pytest ``pythonpath``):

- fresh random seeds, reproducible: every seed derives from one per-process base seed (drawn fresh,
  or ``FMOE_TEST_SEED``), which tests/conftest.py prints on any failure;
- the one-line CLI error check of the project's standards;
- for the model tests (tests/test_model.py, tests/test_reference.py): in-memory / counting expert
  sources, random weights under the canonical names, and a converter from a transformers state dict
  to those names.
"""

from __future__ import annotations

import os
import zlib
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fmoe.config import TextConfig
from fmoe.formats.quant import quantize
from fmoe.runtime.experts import ExpertWeights
from fmoe.runtime.model import expected_dense_shapes

SEED_ENV = "FMOE_TEST_SEED"
# The base of every seed in this process: fresh each run unless FMOE_TEST_SEED pins it.
BASE_SEED = int(os.environ.get(SEED_ENV) or np.random.SeedSequence().entropy % 2**63)


# Every source layout fmoe reads, as synth_sources variants.
LAYOUT_VARIANTS: dict[str, dict[str, Any]] = {
    layout: {"layout": layout} for layout in ("official", "official-per-expert", "mlx")
}


def synth_sources(root: Any, variants: Mapping[str, Mapping[str, Any]], **common: Any) -> dict[str, Any]:
    """One synthetic source checkpoint per variant (``name -> synthesize options``) under ``root``."""
    from fmoe.convert.synth import synthesize

    for name, options in variants.items():
        synthesize(root / name, **common, **options)
    return {name: root / name for name in variants}


def fresh_seed(label: str) -> int:
    """A seed for ``label`` (a test id or a fixture's name): new every run, the same for the same
    label under the same FMOE_TEST_SEED, so a failure reruns exactly."""
    return int(np.random.SeedSequence([BASE_SEED, zlib.crc32(label.encode())]).generate_state(2, np.uint64)[0] >> 1)


def fresh_rng(label: str) -> np.random.Generator:
    return np.random.default_rng(fresh_seed(label))


def assert_cli_error(result: Any, *fragments: str) -> str:
    """A failed CLI command as the standards demand: a non-zero exit through SystemExit (an escaped
    exception would be a traceback in the real CLI; CliRunner hides it), exactly one non-empty line
    on stderr, starting ``error:`` and holding every fragment. Returns that line."""
    assert result.exit_code != 0, result.output
    assert isinstance(result.exception, SystemExit), f"escaped exception {result.exception!r}: {result.output}"
    assert "Traceback" not in result.output, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


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
