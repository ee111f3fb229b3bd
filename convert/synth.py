"""`fmoe synth`: a random-weight source checkpoint in a real release layout (for tests and demos).

Layouts:

- ``official``: the Hugging Face release (``model.language_model.*``, fused experts
  ``mlp.experts.gate_up_proj [E, 2I, H]`` / ``down_proj [E, H, I]``, bf16, A_log F32), plus a few
  ``model.visual.*`` and ``mtp.*`` tensors that converters must skip.
- ``official-per-expert``: the same with ``mlp.experts.{e}.{gate,up,down}_proj.weight``.
- ``mlx``: the mlx-community 4-bit layout (``language_model.model.*``, affine group-64 quantisation,
  router and shared-expert gate at 8 bits, stacked ``switch_mlp`` experts, zero-centred norms with
  the 1 already added, conv1d ``[C, K, 1]``, no vision/MTP tensors).
- ``fp8``: the official FP8 release (Qwen/Qwen3.5-397B-A17B-FP8 and kin): the per-expert layout with
  every Linear weight that the release quantises stored as float8 e4m3 plus a float32
  ``weight_scale_inv`` per 128 x 128 block (transformers' ``Fp8Quantize``), and ``quantization_config``
  ``{quant_method: fp8, fmt: e4m3, activation_scheme: dynamic, weight_block_size, modules_to_not_convert}``.
  Embeddings, lm_head, norms, routers, the DeltaNet's ``in_proj_a/b``, conv and vectors and the vision
  tower stay as in the BF16 release.
- ``fp8-fused``: the same FP8 weights with fused experts (``gate_up_proj`` + ``gate_up_proj_scale_inv``
  ``[E, ...]``), as transformers' FP8Experts holds them.

A preset marked ``text_only`` (Qwen3.8-2.4T-A95B) is written as its release is: a flat config
(``model_type: qwen3_5_moe_text``, ``Qwen3_5MoeForCausalLM``), names ``model.layers.*``, no vision tower
(any preset can be written so with ``text_only=True``: the same weights as its multimodal layout).
:func:`declare` gives every name, dtype and shape without writing anything, so a full-width slice of
the largest model can be checked without gigabytes on disk.

Every layout is a function of (preset, layers, experts, seed, on_grid): each weight is generated from
a seed derived from its official name (and expert, row block), so the MLX layout quantises exactly the
bf16 values the official layout stores, and the per-expert layout holds the fused one's values. With
``fp8_values`` the float layouts store the weights the ``fp8`` layout's release dequantises to (the bf16
of ``e4m3 * scale_inv``), so an FP8 and a BF16 checkpoint of the same weights can be compared.
Tensors are produced one row block / one expert at a time while their shard is written (bounded memory).
"""

from __future__ import annotations

import itertools
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, cast

import ml_dtypes
import numpy as np

from fmoe.config import TextConfig
from fmoe.convert import fp8
from fmoe.convert.source import LAYOUTS
from fmoe.convert.synth_tokenizer import TokenizerIds, special_base_for, write_tokenizer_files
from fmoe.errors import FmoeError
from fmoe.formats.quant import DEFAULT_GROUP_SIZE, bf16_to_f32, f32_to_bf16, quantize
from fmoe.formats.safetensors_io import ShardedSafetensorsWriter, parse_size
from fmoe.fsutil import read_json, write_json_atomic
from fmoe.presets import load_preset

CHUNK_ELEMS = 1 << 22  # values generated per block (16 MiB of float32)
GROUP_SIZE = DEFAULT_GROUP_SIZE  # what mlx-lm uses, and fmoe's format
MLX_BITS = 4
MLX_ROUTER_BITS = 8

# Weight statistics (why: a forward pass neither explodes nor vanishes, routers pick distinct experts).
EMBED_STD = 1.0
NORM_STD = 0.05  # zero-centred norms: (1 + w) stays near 1
CONV_STD = 0.3
DT_BIAS_STD = 0.1
A_RANGE = (1.0, 16.0)  # A_log = log(uniform(A_RANGE))


# ---- lazily generated float32 tensors -----------------------------------------------------------
@dataclass(frozen=True)
class Mat:
    """A tensor defined by its shape and a generator of float32 row blocks (C order, last dim whole)."""

    shape: tuple[int, ...]
    blocks: Callable[[], Iterator[np.ndarray]]

    @property
    def cols(self) -> int:
        return self.shape[-1]


class Values:
    """Deterministic weight values keyed by (seed, official tensor name, extra ids)."""

    def __init__(self, seed: int, on_grid: bool) -> None:
        self.seed = seed
        self.on_grid = on_grid

    def _rng(self, key: str, *extra: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, zlib.crc32(key.encode()), *extra])

    def _row_blocks(self, key: str, shape: tuple[int, ...], extra: tuple[int, ...], fill) -> Mat:
        cols = shape[-1]
        rows = int(np.prod(shape[:-1], dtype=np.int64))
        step = max(1, CHUNK_ELEMS // cols)

        def blocks() -> Iterator[np.ndarray]:
            for i, r0 in enumerate(range(0, rows, step)):
                yield fill(self._rng(key, *extra, i), (min(step, rows - r0), cols))

        return Mat(tuple(shape), blocks)

    def normal(self, key: str, shape: tuple[int, ...], std: float, mean: float = 0.0, extra=()) -> Mat:
        """N(mean, std) values (vectors: norms, biases, conv)."""

        def fill(rng: np.random.Generator, s: tuple[int, int]) -> np.ndarray:
            x = rng.standard_normal(s, dtype=np.float32)
            x *= np.float32(std)
            if mean:
                x += np.float32(mean)
            return x

        return self._row_blocks(key, shape, tuple(extra), fill)

    def uniform(self, key: str, shape: tuple[int, ...], std: float, extra=()) -> Mat:
        """Zero-mean uniform values of standard deviation ``std`` (matrices: numpy draws uniforms
        about 5x faster than normals, which decides the time of a real-width slice)."""
        half_width = np.float32(std * np.sqrt(3.0))

        def fill(rng: np.random.Generator, s: tuple[int, int]) -> np.ndarray:
            x = rng.random(s, dtype=np.float32)
            x -= np.float32(0.5)
            x *= 2 * half_width
            return x

        return self._row_blocks(key, shape, tuple(extra), fill)

    def linear(self, key: str, shape: tuple[int, ...], extra=()) -> Mat:
        """A weight matrix ``[out, in]``: zero mean, std 1/sqrt(in)."""
        return self.uniform(key, shape, 1.0 / np.sqrt(shape[-1]), extra=extra)

    def a_log(self, key: str, n: int) -> Mat:
        def fill(rng: np.random.Generator, s: tuple[int, int]) -> np.ndarray:
            return np.log(rng.uniform(*A_RANGE, size=s)).astype(np.float32)

        return self._row_blocks(key, (n,), (), fill)

    def expert(self, key: str, e: int, shape: tuple[int, int]) -> Mat:
        """One routed expert's matrix: on the 4-bit grid with ``on_grid``, else like :meth:`linear`."""
        if not self.on_grid:
            return self.linear(key, shape, extra=(e,))
        std = 1.0 / np.sqrt(shape[-1])
        return self._row_blocks(key, shape, (e,), lambda rng, s: on_grid_block(rng, s, std))


def on_grid_block(rng: np.random.Generator, shape: tuple[int, int], std: float) -> np.ndarray:
    """Values exactly on a 4-bit affine grid, groups of ``GROUP_SIZE`` columns.

    Per group: scale ``s = 2**k`` (exact in bf16), bias ``m * s`` with integer ``m`` in [-15, 0],
    values ``s * (q + m)`` for codes ``q`` in 0..15 with both 0 and 15 present, so min/max
    quantisation recovers ``s``, the bias and every code exactly.
    """
    rows, cols = shape
    if cols % GROUP_SIZE:
        raise FmoeError(f"--on-grid: input dimension {cols} is not a multiple of {GROUP_SIZE}")
    groups = cols // GROUP_SIZE
    levels = 15
    # uniform codes have std ~4.6 levels; pick k so the values' std is near `std`, varied per group
    k0 = int(np.round(np.log2(std / 4.6)))
    k = k0 + rng.integers(-1, 2, size=(rows, groups, 1))
    m = rng.integers(-10, -4, size=(rows, groups, 1))  # bias -10..-5 levels: roughly zero-centred
    q = rng.integers(0, levels + 1, size=(rows, groups, GROUP_SIZE))
    p0 = rng.integers(0, GROUP_SIZE, size=(rows, groups, 1))
    p1 = (p0 + rng.integers(1, GROUP_SIZE, size=(rows, groups, 1))) % GROUP_SIZE
    np.put_along_axis(q, p0, 0, axis=-1)
    np.put_along_axis(q, p1, levels, axis=-1)
    values = np.ldexp((q + m).astype(np.float32), k.astype(np.int32))
    return values.reshape(rows, cols)


def _chain(*mats: Mat) -> Callable[[], Iterator[np.ndarray]]:
    return lambda: itertools.chain.from_iterable(m.blocks() for m in mats)


def _bf16_blocks(blocks: Callable[[], Iterator[np.ndarray]]) -> Callable[[], Iterator[np.ndarray]]:
    # ml_dtypes rounds to nearest even like quant.f32_to_bf16, in one pass (7x faster)
    return lambda: (b.astype(ml_dtypes.bfloat16) for b in blocks())


def _bf16_plus_one_blocks(blocks: Callable[[], Iterator[np.ndarray]]) -> Callable[[], Iterator[np.ndarray]]:
    # 1 + w of the bf16-rounded w, rounded to bf16 again (as uint16 bits)
    return lambda: (f32_to_bf16(_bf16_round(b) + np.float32(1.0)) for b in blocks())


# ---- the model's tensors in official names ------------------------------------------------------
@dataclass(frozen=True)
class Tensor:
    """One official tensor: name, value source, how it is stored and what kind of weight it is."""

    name: str
    mat: Mat
    dtype: str = "BF16"  # official storage dtype
    role: str = "matrix"  # matrix | router | expert | norm1p (zero-centred) | plain | conv
    parts: tuple[tuple[str, tuple[Mat, ...]], ...] = ()  # fused experts: (projection, per-expert values)


def _layer_tensors(v: Values, tc: TextConfig, prefix: str, full: bool, per_expert: bool) -> list[Tensor]:
    """A decoder layer's tensors (official names under ``prefix``)."""
    H, E = tc.hidden_size, tc.num_experts
    out: list[Tensor] = []

    def lin(name: str, shape: tuple[int, ...], role: str = "matrix") -> None:
        out.append(Tensor(f"{prefix}.{name}", v.linear(f"{prefix}.{name}", shape), role=role))

    def vec(name: str, n: int, mean: float, std: float, role: str, dtype: str = "BF16") -> None:
        out.append(Tensor(f"{prefix}.{name}", v.normal(f"{prefix}.{name}", (n,), std, mean), dtype, role))

    vec("input_layernorm.weight", H, 0.0, NORM_STD, "norm1p")
    if full:
        hd, nq, nkv = tc.head_dim, tc.num_attention_heads, tc.num_key_value_heads
        lin("self_attn.q_proj.weight", (2 * nq * hd, H))  # per head [query | gate]
        lin("self_attn.k_proj.weight", (nkv * hd, H))
        lin("self_attn.v_proj.weight", (nkv * hd, H))
        lin("self_attn.o_proj.weight", (H, nq * hd))
        vec("self_attn.q_norm.weight", hd, 0.0, NORM_STD, "norm1p")
        vec("self_attn.k_norm.weight", hd, 0.0, NORM_STD, "norm1p")
    else:
        hv, dv = tc.linear_num_value_heads, tc.linear_value_head_dim
        lin("linear_attn.in_proj_qkv.weight", (tc.conv_dim, H))
        lin("linear_attn.in_proj_z.weight", (tc.linear_value_dim, H))
        lin("linear_attn.in_proj_b.weight", (hv, H))
        lin("linear_attn.in_proj_a.weight", (hv, H))
        name = f"{prefix}.linear_attn.conv1d.weight"
        shape = (tc.conv_dim, 1, tc.linear_conv_kernel_dim)
        out.append(Tensor(name, v.normal(name, shape, CONV_STD), role="conv"))
        out.append(Tensor(f"{prefix}.linear_attn.A_log", v.a_log(f"{prefix}.linear_attn.A_log", hv), "F32", "plain"))
        vec("linear_attn.dt_bias", hv, 1.0, DT_BIAS_STD, "plain")
        vec("linear_attn.norm.weight", dv, 1.0, NORM_STD, "plain")  # plain weight, not zero-centred
        lin("linear_attn.out_proj.weight", (H, tc.linear_value_dim))
    vec("post_attention_layernorm.weight", H, 0.0, NORM_STD, "norm1p")

    I, S = tc.moe_intermediate_size, tc.shared_expert_intermediate_size
    lin("mlp.gate.weight", (E, H), role="router")
    gate = [v.expert(f"{prefix}.mlp.experts.gate", e, (I, H)) for e in range(E)]
    up = [v.expert(f"{prefix}.mlp.experts.up", e, (I, H)) for e in range(E)]
    down = [v.expert(f"{prefix}.mlp.experts.down", e, (H, I)) for e in range(E)]
    if per_expert:
        for e in range(E):
            for proj, m in (("gate_proj", gate[e]), ("up_proj", up[e]), ("down_proj", down[e])):
                out.append(Tensor(f"{prefix}.mlp.experts.{e}.{proj}.weight", m, role="expert"))
    else:
        fused_gate_up = _chain(*itertools.chain.from_iterable(zip(gate, up, strict=True)))
        gate_up_parts = (("gate_proj", tuple(gate)), ("up_proj", tuple(up)))
        out.append(Tensor(f"{prefix}.mlp.experts.gate_up_proj", Mat((E, 2 * I, H), fused_gate_up), role="expert",
                          parts=gate_up_parts))  # fmt: skip
        out.append(Tensor(f"{prefix}.mlp.experts.down_proj", Mat((E, H, I), _chain(*down)), role="expert",
                          parts=(("down_proj", tuple(down)),)))  # fmt: skip
    lin("mlp.shared_expert.gate_proj.weight", (S, H))
    lin("mlp.shared_expert.up_proj.weight", (S, H))
    lin("mlp.shared_expert.down_proj.weight", (H, S))
    lin("mlp.shared_expert_gate.weight", (1, H), role="router")
    return out


def text_tensors(v: Values, tc: TextConfig, per_expert: bool, text_only: bool = False) -> list[Tensor]:
    """The text model in official names: embeddings, every layer, final norm, lm_head, under the
    multimodal release's ``model.language_model.`` or, ``text_only``, a text-only release's ``model.``
    (the same values: they are keyed by the multimodal names)."""
    if text_only:
        full = text_tensors(v, tc, per_expert)
        return [replace(t, name=t.name.replace("model.language_model.", "model.", 1)) for t in full]
    p = "model.language_model"
    embed = f"{p}.embed_tokens.weight"
    out = [Tensor(embed, v.uniform(embed, (tc.vocab_size, tc.hidden_size), EMBED_STD))]
    for layer in range(tc.num_hidden_layers):
        out += _layer_tensors(v, tc, f"{p}.layers.{layer}", tc.is_full_attention(layer), per_expert)
    out.append(Tensor(f"{p}.norm.weight", v.normal(f"{p}.norm.weight", (tc.hidden_size,), NORM_STD), role="norm1p"))
    out.append(Tensor("lm_head.weight", v.linear("lm_head.weight", (tc.vocab_size, tc.hidden_size))))
    return out


def extra_tensors(v: Values, tc: TextConfig, vision: dict[str, Any] | None, mtp_layers: int) -> list[Tensor]:
    """Vision tower (None: a text-only release has none) and MTP head tensors of the official release
    (converters skip them)."""
    H = tc.hidden_size
    out = [] if vision is None else _vision_tensors(v, vision)
    if mtp_layers:
        out.append(Tensor("mtp.fc.weight", v.linear("mtp.fc.weight", (H, 2 * H))))
        for name in ("mtp.pre_fc_norm_embedding.weight", "mtp.pre_fc_norm_hidden.weight"):
            out.append(Tensor(name, v.normal(name, (H,), NORM_STD), role="norm1p"))
        for i in range(mtp_layers):  # MTP layers are full attention; the release stores their experts per expert
            out += _layer_tensors(v, tc, f"mtp.layers.{i}", full=True, per_expert=True)
        out.append(Tensor("mtp.norm.weight", v.normal("mtp.norm.weight", (H,), NORM_STD), role="norm1p"))
    return out


def _vision_tensors(v: Values, vision: dict[str, Any]) -> list[Tensor]:
    vh, vi = vision["hidden_size"], vision["intermediate_size"]
    merged = vh * vision["spatial_merge_size"] ** 2
    patch = (vh, vision["in_channels"], vision["temporal_patch_size"], vision["patch_size"], vision["patch_size"])
    shapes = {
        "model.visual.patch_embed.proj.weight": patch,
        "model.visual.patch_embed.proj.bias": (vh,),
        "model.visual.pos_embed.weight": (vision["num_position_embeddings"], vh),
        "model.visual.blocks.0.norm1.weight": (vh,),
        "model.visual.blocks.0.attn.qkv.weight": (3 * vh, vh),
        "model.visual.blocks.0.attn.proj.weight": (vh, vh),
        "model.visual.blocks.0.mlp.linear_fc1.weight": (vi, vh),
        "model.visual.blocks.0.mlp.linear_fc2.weight": (vh, vi),
        "model.visual.merger.norm.weight": (vh,),
        "model.visual.merger.linear_fc1.weight": (merged, merged),
        "model.visual.merger.linear_fc2.weight": (vision["out_hidden_size"], merged),
    }
    return [Tensor(n, v.normal(n, s, 0.02)) for n, s in shapes.items()]


# ---- writing the layouts ------------------------------------------------------------------------
def _add_official(writer: ShardedSafetensorsWriter, tensors: list[Tensor]) -> None:
    for t in tensors:
        blocks = _bf16_blocks(t.mat.blocks) if t.dtype == "BF16" else t.mat.blocks
        writer.add(t.name, t.dtype, t.mat.shape, blocks)


def mlx_name(official: str) -> str:
    """Official text tensor name -> the MLX conversion's name (mlx-lm's qwen3_5_moe ``sanitize``: the
    multimodal ``model.language_model.`` and a text-only checkpoint's ``model.`` both become
    ``language_model.model.``)."""
    if official == "lm_head.weight":
        return "language_model.lm_head.weight"
    if official.startswith("model.language_model."):
        return official.replace("model.language_model.", "language_model.model.", 1)
    return "language_model." + official


def _mlx_module(official: str) -> str:
    """The MLX module path of a Linear/Embedding weight (the quantisation override key)."""
    return mlx_name(official).removesuffix(".weight")


def _add_mlx(writer: ShardedSafetensorsWriter, tensors: list[Tensor]) -> dict[str, Any]:
    """Quantise the text tensors as mlx-lm does; returns the per-module quantisation overrides."""
    overrides: dict[str, Any] = {}
    for t in tensors:
        if t.role in ("matrix", "router"):
            bits = MLX_ROUTER_BITS if t.role == "router" else MLX_BITS
            if bits != MLX_BITS:
                overrides[_mlx_module(t.name)] = {"group_size": GROUP_SIZE, "bits": bits}
            _add_quantised(writer, _mlx_module(t.name), t.mat, bits)
        elif t.role == "expert":
            _add_mlx_experts(writer, t)
        elif t.role == "norm1p":  # mlx-lm stores 1 + w for zero-centred norms
            writer.add(mlx_name(t.name), "BF16", t.mat.shape, _bf16_plus_one_blocks(t.mat.blocks))
        elif t.role == "conv":  # [C, 1, K] -> [C, K, 1]: same bytes, the size-1 axis moves
            c, _, k = t.mat.shape
            writer.add(mlx_name(t.name), "BF16", (c, k, 1), _bf16_blocks(t.mat.blocks))
        else:
            writer.add(mlx_name(t.name), "BF16", t.mat.shape, _bf16_blocks(t.mat.blocks))
    return overrides


def _bf16_round(x: np.ndarray) -> np.ndarray:
    return bf16_to_f32(f32_to_bf16(x))


def _quant_parts(blocks: Callable[[], Iterator[np.ndarray]], bits: int, part: str) -> Callable[[], Iterator]:
    # quantise exactly the bf16 values the official layout stores, block by block (groups lie in rows)
    return lambda: (getattr(quantize(_bf16_round(b), bits, GROUP_SIZE), part) for b in blocks())


def _add_quantised(writer: ShardedSafetensorsWriter, module: str, mat: Mat, bits: int) -> None:
    lead, cols = mat.shape[:-1], mat.cols
    if cols % GROUP_SIZE:
        raise FmoeError(f"{module}: input dimension {cols} is not a multiple of {GROUP_SIZE}")
    writer.add(f"{module}.weight", "U32", (*lead, cols * bits // 32), _quant_parts(mat.blocks, bits, "weight"))
    writer.add(f"{module}.scales", "BF16", (*lead, cols // GROUP_SIZE), _quant_parts(mat.blocks, bits, "scales"))
    writer.add(f"{module}.biases", "BF16", (*lead, cols // GROUP_SIZE), _quant_parts(mat.blocks, bits, "biases"))


def _add_mlx_experts(writer: ShardedSafetensorsWriter, t: Tensor) -> None:
    """Fused experts -> stacked ``switch_mlp.{gate,up,down}_proj`` ``[E, out, in]``, quantised."""
    base = mlx_name(t.name).rsplit(".experts.", 1)[0] + ".switch_mlp"
    for proj, mats in t.parts:
        shape = (len(mats), *mats[0].shape)
        _add_quantised(writer, f"{base}.{proj}", Mat(shape, _chain(*mats)), MLX_BITS)


# ---- the FP8 release ------------------------------------------------------------------------------
FP8_KEPT_SUFFIXES = (  # 2-D weights the release keeps in bf16 (its modules_to_not_convert)
    "embed_tokens.weight", "lm_head.weight", "linear_attn.in_proj_a.weight", "linear_attn.in_proj_b.weight",
)  # fmt: skip


def fp8_quantised(t: Tensor) -> bool:
    """Whether the FP8 release stores this tensor as float8 e4m3 with block scales: every Linear
    weight of the text model and MTP head except the routers, embeddings, lm_head and the DeltaNet's
    ``in_proj_a``/``in_proj_b`` (the vision tower stays bf16)."""
    return (
        t.role in ("matrix", "expert")
        and len(t.mat.shape) >= 2
        and not t.name.endswith(FP8_KEPT_SUFFIXES)
        and not t.name.startswith("model.visual.")
    )


def _module(name: str) -> str:
    return name.removesuffix(".weight")


@dataclass(frozen=True)
class Fp8Spec:
    """How the FP8 layouts are written: block size and the storage dtype of ``weight_scale_inv``."""

    block: tuple[int, int] = fp8.DEFAULT_BLOCK
    scale_dtype: str = "F32"  # or "BF16"


def _rechunk(blocks: Callable[[], Iterator[np.ndarray]], rows_per_matrix: int, bm: int) -> Iterator[np.ndarray]:
    """Row blocks regrouped so that each starts at a block boundary of its matrix (stacked matrices of
    ``rows_per_matrix`` rows follow each other) and holds whole ``bm``-row blocks, except a matrix's last."""
    buf: list[np.ndarray] = []
    held, done = 0, 0  # rows buffered; rows of the current matrix already given out
    for b in blocks():
        while len(b):
            take = min(len(b), rows_per_matrix - done - held)
            buf.append(b[:take])
            held += take
            b = b[take:]
            at_end = done + held == rows_per_matrix
            if at_end or held >= bm:
                give = held if at_end else held // bm * bm
                rows = np.concatenate(buf) if len(buf) > 1 else buf[0]
                yield rows[:give]
                rest = rows[give:]
                buf, held = ([rest], len(rest)) if len(rest) else ([], 0)
                done = 0 if at_end else done + give
    if held:
        raise AssertionError("row blocks do not add up to whole matrices")


def _fp8_encode(x: np.ndarray, spec: Fp8Spec) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(e4m3 codes, stored scale_inv, stored scale_inv as float32) of the bf16 rounding of ``x``
    (the release is made from the BF16 weights)."""
    codes, inv = fp8.quantize(_bf16_round(x), spec.block)
    if spec.scale_dtype == "BF16":
        stored = f32_to_bf16(inv)
        return codes, stored, bf16_to_f32(stored)
    return codes, inv, inv


def _fp8_parts(t: Tensor, spec: Fp8Spec, part: int) -> Callable[[], Iterator[np.ndarray]]:
    rows = t.mat.shape[-2]
    return lambda: (_fp8_encode(b, spec)[part] for b in _rechunk(t.mat.blocks, rows, spec.block[0]))


def _add_fp8(writer: ShardedSafetensorsWriter, tensors: list[Tensor], spec: Fp8Spec) -> list[str]:
    """The FP8 release's tensors; returns its ``modules_to_not_convert`` (the Linear weights kept in bf16)."""
    kept: list[str] = []
    for t in tensors:
        if not fp8_quantised(t):
            if t.role in ("matrix", "router") and not t.name.startswith("model.visual."):
                kept.append(_module(t.name))
            _add_official(writer, [t])
            continue
        *lead, rows, cols = t.mat.shape
        grid = fp8.expected_grid(rows, cols, spec.block)
        writer.add(t.name, fp8.FP8_WEIGHT_DTYPE, t.mat.shape, _fp8_parts(t, spec, 0))
        writer.add(fp8.scale_key(t.name), spec.scale_dtype, (*lead, *grid), _fp8_parts(t, spec, 1))
    return kept


def _fp8_rounded_mat(mat: Mat, spec: Fp8Spec) -> Mat:
    def blocks() -> Iterator[np.ndarray]:
        for b in _rechunk(mat.blocks, mat.shape[-2], spec.block[0]):
            codes, _, inv = _fp8_encode(b, spec)
            yield fp8.dequantize(codes, inv, spec.block)

    return Mat(mat.shape, blocks)


def fp8_rounded(t: Tensor, spec: Fp8Spec) -> Tensor:
    """``t`` holding the values the ``fp8`` layout's release dequantises to (per-expert blocks for
    experts, as the release stores them), or ``t`` itself when the release keeps it in bf16."""
    if not fp8_quantised(t):
        return t
    if not t.parts:
        return replace(t, mat=_fp8_rounded_mat(t.mat, spec))
    parts = tuple((proj, tuple(_fp8_rounded_mat(m, spec) for m in mats)) for proj, mats in t.parts)
    per_expert = zip(*(mats for _, mats in parts), strict=True)  # fused order: gate_e, up_e for each e
    return replace(t, mat=Mat(t.mat.shape, _chain(*itertools.chain.from_iterable(per_expert))), parts=parts)


# ---- config -------------------------------------------------------------------------------------
def vision_config(text_hidden: int) -> dict[str, Any]:
    """A small vision tower config (its tensors exist only to be skipped)."""
    return {
        "model_type": "qwen3_5_moe_vision",
        "depth": 1,
        "hidden_size": 64,
        "hidden_act": "gelu_pytorch_tanh",
        "intermediate_size": 128,
        "num_heads": 2,
        "in_channels": 3,
        "patch_size": 16,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "out_hidden_size": text_hidden,
        "num_position_embeddings": 64,
    }


def build_text_config(preset: dict[str, Any], layers: int | None, experts: int | None) -> dict[str, Any]:
    """The preset's ``text_config`` cut to ``layers`` layers and ``experts`` experts."""
    text = dict(preset["text_config"])
    name = preset.get("name", "?")
    all_layers = text["layer_types"]
    if layers is not None:
        if not 1 <= layers <= len(all_layers):
            raise FmoeError(f"--layers: {layers} is out of range 1..{len(all_layers)} for preset {name}")
        text["layer_types"] = list(all_layers[:layers])
        text["num_hidden_layers"] = layers
    if experts is not None:
        if not 1 <= experts <= text["num_experts"]:
            raise FmoeError(f"--experts: {experts} is out of range 1..{text['num_experts']} for preset {name}")
        text["num_experts"] = experts
        text["num_experts_per_tok"] = min(text["num_experts_per_tok"], experts)
    text["dtype"] = "bfloat16"
    return text


def build_config(
    text: dict[str, Any], ids: TokenizerIds, meta: dict[str, Any], text_only: bool = False
) -> dict[str, Any]:
    """config.json: the multimodal release's (nested ``text_config``, a vision config), or a text-only
    release's flat one (``qwen3_5_moe_text``, ``Qwen3_5MoeForCausalLM``, no vision)."""
    if text_only:
        return {
            "architectures": ["Qwen3_5MoeForCausalLM"],
            **text,
            "model_type": "qwen3_5_moe_text",
            "tie_word_embeddings": False,
            "dtype": "bfloat16",
            "fmoe_synth": meta,
        }
    return {
        "architectures": ["Qwen3_5MoeForConditionalGeneration"],
        "model_type": "qwen3_5_moe",
        "text_config": text,
        "vision_config": vision_config(text["hidden_size"]),
        "image_token_id": ids.id("<|image_pad|>"),
        "video_token_id": ids.id("<|video_pad|>"),
        "vision_start_token_id": ids.id("<|vision_start|>"),
        "vision_end_token_id": ids.id("<|vision_end|>"),
        "tie_word_embeddings": False,
        "dtype": "bfloat16",
        "fmoe_synth": meta,
    }


@dataclass(frozen=True)
class Declared:
    """A checkpoint declared but not written: its config, its tensors (names, dtypes, shapes; data is
    generated only when written) and the text config it was made from."""

    config: dict[str, Any]
    writer: ShardedSafetensorsWriter
    text_config: TextConfig

    def tensors(self) -> dict[str, tuple[str, tuple[int, ...]]]:
        """Name -> (safetensors dtype, shape) of every tensor, in file order."""
        return self.writer.declared()


def declare(
    out: Path,
    *,
    preset: str = "tiny",
    layers: int | None = None,
    experts: int | None = None,
    seed: int = 0,
    layout: str = "official",
    on_grid: bool = False,
    shard_size: str | int = "2GB",
    text_only: bool | None = None,
    fp8_values: bool = False,
    fp8_spec: Fp8Spec | None = None,
) -> Declared:
    """Everything :func:`synthesize` would write into ``out``, declared only: no file is touched and no
    weight generated, so a full-width slice of the largest model can be checked without writing it.
    ``text_only`` defaults to the preset's; ``fp8_spec`` (block size, scale dtype) is for the FP8
    layouts and ``fp8_values``."""
    if layout not in LAYOUTS:
        raise FmoeError(f"--layout: unknown layout {layout!r}; choose one of: {', '.join(LAYOUTS)}")
    fp8_layout = layout.startswith("fp8")
    if fp8_values and fp8_layout:
        raise FmoeError(f"fp8_values: the {layout} layout holds the FP8 weights already (it is for the float layouts)")
    spec = fp8_spec or Fp8Spec()
    shard_bytes = parse_size(shard_size)
    doc = load_preset(preset)
    text_only = bool(doc.get("text_only", False)) if text_only is None else text_only
    text = build_text_config(doc, layers, experts)
    tc = TextConfig.from_dict({**text, "eos_token_id": None}, where=f"preset {preset}")
    if on_grid and tc.moe_intermediate_size % GROUP_SIZE:
        raise FmoeError(
            f"--on-grid: moe_intermediate_size {tc.moe_intermediate_size} is not a multiple of {GROUP_SIZE}"
        )
    ids = TokenizerIds(special_base_for(tc.vocab_size, text.get("eos_token_id")))
    text["eos_token_id"] = ids.endoftext
    meta: dict[str, Any] = {"preset": preset, "seed": seed, "layout": layout, "on_grid": on_grid}
    meta |= {"text_only": text_only, "fp8_values": fp8_values}
    config = build_config(text, ids, meta, text_only=text_only)

    values = Values(seed, on_grid)
    tensors = text_tensors(values, tc, per_expert=layout in ("official-per-expert", "fp8"), text_only=text_only)
    if fp8_values:
        tensors = [fp8_rounded(t, spec) for t in tensors]
    file_format = "mlx" if layout == "mlx" else "pt"  # what mlx-lm / transformers write
    writer = ShardedSafetensorsWriter(Path(out), shard_size=shard_bytes, metadata={"format": file_format})
    if layout == "mlx":
        overrides = _add_mlx(writer, tensors)
        quant = {"group_size": GROUP_SIZE, "bits": MLX_BITS, "mode": "affine", **overrides}
        config["quantization"] = quant
        config["quantization_config"] = dict(quant)
        return Declared(config, writer, tc)
    mtp_layers = int(text.get("mtp_num_hidden_layers", 0))
    vision = None if text_only else config["vision_config"]
    everything = tensors + extra_tensors(values, tc, vision, mtp_layers)
    if fp8_values:
        everything = [fp8_rounded(t, spec) for t in everything]  # the MTP head's too (idempotent on the rest)
    if not fp8_layout:
        _add_official(writer, everything)
        return Declared(config, writer, tc)
    kept = _add_fp8(writer, everything, spec)
    config["quantization_config"] = {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": list(spec.block),
        "modules_to_not_convert": kept + ([] if text_only else ["model.visual"]),
    }
    meta["fp8_scale_dtype"] = spec.scale_dtype
    return Declared(config, writer, tc)


# ---- entry point --------------------------------------------------------------------------------
def synthesize(
    out: Path,
    *,
    preset: str = "tiny",
    layers: int | None = None,
    experts: int | None = None,
    seed: int = 0,
    layout: str = "official",
    on_grid: bool = False,
    shard_size: str | int = "2GB",
    text_only: bool | None = None,
    fp8_values: bool = False,
    fp8_spec: Fp8Spec | None = None,
) -> dict[str, Any]:
    """Write a random-weight checkpoint into ``out`` (which must not exist or be empty); the options
    are :func:`declare`'s."""
    from fmoe.progress import byte_progress

    out = Path(out)
    declared = declare(
        out,
        preset=preset,
        layers=layers,
        experts=experts,
        seed=seed,
        layout=layout,
        on_grid=on_grid,
        shard_size=shard_size,
        text_only=text_only,
        fp8_values=fp8_values,
        fp8_spec=fp8_spec,
    )
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise FmoeError(f"{out}: exists and is not an empty directory; synth never overwrites (remove it first)")
    config, writer, tc = declared.config, declared.writer, declared.text_config
    out.mkdir(parents=True, exist_ok=True)
    text = config.get("text_config", config)
    write_tokenizer_files(
        out, vocab_size=tc.vocab_size, eos_token_id=text["eos_token_id"], max_length=tc.max_position_embeddings
    )

    with byte_progress(transient=True) as progress:
        task = progress.add_task(f"synth {preset} ({layout})", total=writer.total_size)
        writer.on_bytes = lambda n: progress.advance(task, n)
        written = writer.write()
    write_json_atomic(out / "config.json", config)  # last: a folder with config.json is complete

    files = sorted(p for p in out.iterdir() if p.is_file())
    return {
        "path": str(out),
        "preset": preset,
        "layout": layout,
        "text_only": config["fmoe_synth"]["text_only"],
        "layers": tc.num_hidden_layers,
        "experts": tc.num_experts,
        "seed": seed,
        "on_grid": on_grid,
        "tensors": writer.tensor_count,
        "shards": written["files"],
        "tensor_bytes": written["total_size"],
        "bytes": sum(p.stat().st_size for p in files),
        "files": [p.name for p in files],
    }


def load_reference_model(path: Path):  # -> transformers Qwen3_5MoeForCausalLM
    """The transformers reference model (float32, eval mode) with the weights of an official-layout
    checkpoint at ``path`` (either expert layout; imports torch and transformers lazily).

    transformers 5.x maps the release names itself: ``Qwen3_5MoeForCausalLM.from_pretrained`` reads
    the nested ``text_config`` and strips ``language_model`` (``model.language_model.X`` ->
    ``model.X``), and ignores ``model.visual.*`` / ``mtp.*``. Any missing weight is an error here
    (transformers would silently initialise it randomly).
    """
    path = Path(path)
    raw = read_json(path / "config.json", "the model's config")
    config = TextConfig.from_dict(raw, where=str(path / "config.json"))  # a clear error for a non-checkpoint
    if "quantization" in raw:
        raise FmoeError(f"{path}: an MLX (quantised) checkpoint; the reference model needs an official layout")
    if (raw.get("quantization_config") or {}).get("quant_method") == "fp8":
        raise FmoeError(f"{path}: an FP8 checkpoint; the reference model needs a float layout (see fp8_values)")
    import torch
    from transformers import Qwen3_5MoeForCausalLM

    # transformers annotates from_pretrained as returning the model alone, but output_loading_info makes it a pair
    model, info = cast(
        "tuple[Qwen3_5MoeForCausalLM, dict[str, Any]]",
        Qwen3_5MoeForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True),
    )
    missing = list(info.get("missing_keys") or []) + list(info.get("mismatched_keys") or [])
    if missing:
        raise FmoeError(f"{path}: the reference model lacks {len(missing)} weights, e.g. {missing[0]}")
    if model.config.num_hidden_layers != config.num_hidden_layers:
        raise FmoeError(f"{path}: transformers read {model.config.num_hidden_layers} layers, config.json says "
                        f"{config.num_hidden_layers}")  # fmt: skip
    return model.eval()
