"""Test helpers, importable as ``support`` (pyproject's pytest ``pythonpath``):

- fresh random seeds, reproducible: every seed derives from one per-process base seed (drawn fresh,
  or ``FMOE_TEST_SEED``), which tests/conftest.py prints on any failure;
- the one-line CLI error check of the project's standards;
- the backends to check (every one installed: cpu, cpu with the numpy reference kernels, torch on
  the CPU, torch on CUDA when a GPU is present, mlx when it imports: Metal kernels on Apple
  silicon, MLX ops elsewhere), made by name;
- a minimal config for the expert kernels' tests, where only the experts' geometry matters;
- for the model tests (tests/test_model.py, tests/test_reference.py): an in-memory expert provider
  that counts what it is asked for, a network over in-memory weights on any backend, random
  weights under the canonical names, and a converter from a transformers state dict to those names.
"""

from __future__ import annotations

import importlib.util
import os
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fmoe.config import TextConfig
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.quant import QuantTensor, bf16_to_f32, quantize, unpack
from fmoe.runtime.experts.slots import ExpertPart, ExpertSlots, ExpertWeights
from fmoe.runtime.experts.stats import ExpertStats

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


def torch_devices() -> list[str]:
    """The torch devices to test on: the CPU when torch imports, and CUDA when a GPU is present."""
    try:
        import torch
    except ImportError:
        return []
    return ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def mlx_available() -> bool:
    """Whether mlx imports (``mlx[cpu]`` on Linux, ``mlx`` on Apple silicon)."""
    import importlib.util

    return importlib.util.find_spec("mlx") is not None


# Every backend the conformance tests run on, by name (absent ones are skipped, never faked).
# ``torch-cpu-triton``: the torch backend's CUDA kernel set (Triton) run on the CPU by Triton's
# interpreter, so CI without a GPU checks the fast path's every op.
BACKENDS = ["cpu", "cpu-reference", "torch-cpu", "torch-cpu-triton", "torch-cuda", "mlx"]


def backend_available(name: str) -> bool:
    if name == "mlx":
        return mlx_available()
    if name == "torch-cpu-triton":
        import importlib.util
        import os

        interpreted = os.environ.get("TRITON_INTERPRET") == "1"
        return interpreted and "cpu" in torch_devices() and importlib.util.find_spec("triton") is not None
    return not name.startswith("torch") or name.removeprefix("torch-") in torch_devices()


def make_backend(name: str) -> Any:
    """A backend by conformance name: ``cpu`` (numba kernels), ``cpu-reference`` (numpy kernels),
    ``torch-cpu``, ``torch-cpu-triton``, ``torch-cuda``, ``mlx`` (its default device and kernels)."""
    from fmoe.runtime.backends import make_backend as make

    if name == "cpu-reference":
        return make("cpu", kernels="reference")
    if name == "torch-cpu-triton":
        return make("torch", "cpu", kernels="triton")
    if name.startswith("torch-"):
        return make("torch", name.removeprefix("torch-"))
    return make(name)


def load_options(name: str) -> dict[str, Any]:
    """fmoe.load options that select the backend ``name``."""
    if name == "cpu-reference":
        return {"backend": "cpu", "backend_options": {"kernels": "reference"}}
    if name == "torch-cpu-triton":
        return {"backend": "torch", "device": "cpu", "backend_options": {"kernels": "triton"}}
    if name.startswith("torch-"):
        return {"backend": "torch", "device": name.removeprefix("torch-")}
    return {"backend": name}


class DictExperts:
    """An expert provider over experts held in memory, counting every request (for the 'once per
    layer' checks); ``part_size`` splits each request into parts of that many experts."""

    def __init__(self, experts: Mapping[int, Mapping[int, ExpertWeights]], part_size: int | None = None) -> None:
        self.tables = {layer: ExpertSlots.stack([d[e] for e in sorted(d)]) for layer, d in experts.items()}
        self.part_size = part_size
        self.calls: list[tuple[int, tuple[int, ...]]] = []
        self.fetched: Counter[tuple[int, int]] = Counter()
        self.stats = ExpertStats.zeros(len(experts))

    def resident(self, layer: int, experts: Sequence[int]) -> Iterator[ExpertPart]:
        ids = [int(e) for e in experts]
        self.calls.append((layer, tuple(ids)))
        self.fetched.update((layer, e) for e in ids)
        self.stats.requested[layer] += len(ids)
        step = self.part_size or max(1, len(ids))
        for lo in range(0, len(ids), step):
            chunk = np.array(ids[lo : lo + step], dtype=np.int64)
            yield ExpertPart(self.tables[layer], chunk, chunk)  # slot = expert id


def make_net(cfg: TextConfig, weights: tuple[dict, dict], backend: Any, k: int | None = None, **provider: Any) -> Any:
    """A network over in-memory (dense, experts) weights on ``backend``; ``provider``: DictExperts options."""
    from fmoe.runtime.model import Qwen35MoeNetwork
    from fmoe.runtime.weights import ModelWeights

    dense, experts = weights
    host = ModelWeights.from_tensors(cfg, dense)
    return Qwen35MoeNetwork(
        cfg, backend.prepare(host), DictExperts(experts, **provider), backend, k or cfg.num_experts_per_tok
    )


def logits(net: Any, ids: Sequence[int] | np.ndarray, state: Any, **options: Any) -> np.ndarray:
    """Host float32 logits of ``net.forward``."""
    return net.backend.to_numpy(net.forward(np.asarray(ids, dtype=np.int64), state, **options))


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
    for name, shape in dense_tensor_shapes(cfg).items():
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


def exact_terms(qt: QuantTensor) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``W`` and ``|s*q| + |b|`` (the size of what a kernel adds up), from the packed codes."""
    n_out, n_in = qt.shape
    gs = qt.group_size
    q = unpack(qt.weight, qt.bits).astype(np.float64).reshape(n_out, n_in // gs, gs)
    s = bf16_to_f32(qt.scales).astype(np.float64)[..., None]
    b = bf16_to_f32(qt.biases).astype(np.float64)[..., None]
    return (q * s + b).reshape(n_out, n_in), (np.abs(q * s) + np.abs(b)).reshape(n_out, n_in)


def expert_config(
    hidden: int, inter: int, experts: int = 4, layer_types: tuple[str, ...] = ("linear_attention",)
) -> TextConfig:
    """A config whose only meaningful fields are the routed experts' geometry (for expert layouts and
    slabs); the rest is the smallest valid model."""
    return TextConfig(
        vocab_size=10, hidden_size=hidden, num_hidden_layers=len(layer_types), num_attention_heads=1,
        num_key_value_heads=1, head_dim=8, linear_conv_kernel_dim=4, linear_key_head_dim=8,
        linear_value_head_dim=8, linear_num_key_heads=1, linear_num_value_heads=1, moe_intermediate_size=inter,
        shared_expert_intermediate_size=inter, num_experts=experts, num_experts_per_tok=2,
        layer_types=layer_types, rms_norm_eps=1e-6, rope_theta=1e4, partial_rotary_factor=0.25,
        max_position_embeddings=64, eos_token_ids=(),
    )  # fmt: skip


def replaying_capture(fn: Callable[[], tuple], like: tuple) -> tuple[Callable[[], None], tuple]:
    """A capture with a CUDA graph's contract, for the CPU: nothing runs now; each replay runs the
    recorded segment again and leaves its results in the same output tensors (what later segments
    and the caller hold)."""
    outputs = tuple(t.new_empty(t.shape) for t in like)

    def replay() -> None:
        for out, new in zip(outputs, fn(), strict=True):
            out.copy_(new)

    return replay, outputs


def whole_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under Triton's interpreter, the matvecs take their largest row blocks: the launch heuristic
    halves them until an H200's SMs have work, but the interpreter runs programs one after another in
    Python, so the small blocks only multiply its time (the golden run's prefill: 250 -> 44 s on two
    cores). The cases that run the model or its backend ops check how the kernels compose; the
    kernels' own tests (tests/test_triton_kernels.py, test_triton_int8.py) keep the heuristic's blocks
    and odd ones."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        from fmoe.runtime.kernels import triton_moe

        monkeypatch.setattr(triton_moe, "_TARGET_PROGRAMS", 1)


SCRIPTS = Path(__file__).parents[1] / "scripts"


def load_script(name: str) -> Any:
    """``scripts/<name>.py`` imported as a module (scripts are files, not a package)."""
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def causal_gqa64(
    q: np.ndarray, keys: np.ndarray, vals: np.ndarray, start: int, scale: float | None = None
) -> np.ndarray:
    """float64 causal attention of rows ``q [T, Hq, D]`` at positions start.. over ``keys, vals [L, Hkv,
    D]`` (query head h reads KV head h // (Hq / Hkv); positions 0 .. start + t for row t), scale
    1/sqrt(D) unless given: ``[T, Hq * D]``."""
    t, hq, d = q.shape
    group = hq // keys.shape[1]
    scale = d**-0.5 if scale is None else scale
    want = np.zeros((t, hq, d))
    for i in range(t):
        for h in range(hq):
            s = keys[: start + i + 1, h // group].astype(np.float64) @ q[i, h].astype(np.float64) * scale
            p = np.exp(s - s.max())
            want[i, h] = (p / p.sum()) @ vals[: start + i + 1, h // group].astype(np.float64)
    return want.reshape(t, hq * d)
