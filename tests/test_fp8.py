"""The official block-FP8 releases as a source: e4m3 decoding, block dequantisation against float64
and against transformers, the synthetic FP8 checkpoint (`fmoe synth --layout fp8`), extract and
repack from it (the same artifacts as from a BF16 checkpoint of the same weights), and a one-line
refusal for every FP8 variant fmoe does not read."""

from __future__ import annotations

import importlib.util
import json
import shutil
import struct
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open
from support import assert_cli_error
from typer.testing import CliRunner

from fmoe.cli import app
from fmoe.convert import fp8
from fmoe.convert.extract import extract
from fmoe.convert.repack import repack
from fmoe.convert.source import SourceCheckpoint
from fmoe.convert.synth import Fp8Spec, synthesize
from fmoe.convert.verify import verify
from fmoe.errors import FmoeError
from fmoe.formats.packed import expert_relpath
from fmoe.formats.quant import bf16_to_f32, f32_to_bf16, quantize
from fmoe.formats.safetensors_io import ShardedSafetensorsWriter

TINY = {"preset": "tiny", "layers": 4, "experts": 6}
SMALL_BLOCK = Fp8Spec(block=(32, 32))  # several blocks per matrix, and they divide every tiny dimension


@pytest.fixture(scope="module")
def seed() -> int:
    from support import fresh_seed

    return fresh_seed("test_fp8") % 2**31


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory, seed: int) -> dict[str, Path]:
    """The same weights as the FP8 release (32 x 32 blocks), a fused-FP8 copy, BF16 checkpoints holding
    exactly its dequantised weights (fused and per expert), and the original BF16 weights."""
    root = tmp_path_factory.mktemp("fp8")
    variants: dict[str, dict[str, Any]] = {
        "fp8": {"layout": "fp8", "fp8_spec": SMALL_BLOCK},
        "fp8-fused": {"layout": "fp8-fused", "fp8_spec": SMALL_BLOCK},
        "bf16-of-fp8": {"layout": "official", "fp8_values": True, "fp8_spec": SMALL_BLOCK},
        "bf16-of-fp8-per-expert": {"layout": "official-per-expert", "fp8_values": True, "fp8_spec": SMALL_BLOCK},
        "bf16": {"layout": "official"},
        "fp8-bf16-scales": {"layout": "fp8", "fp8_spec": Fp8Spec(block=(32, 32), scale_dtype="BF16")},
        "fp8-128": {"layout": "fp8"},  # the releases' 128 x 128 blocks
    }
    for name, options in variants.items():
        synthesize(root / name, seed=seed, **TINY, **options)
    return {name: root / name for name in variants}


def tensors_of(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a checkpoint, read with the safetensors library's header and numpy: float8 as
    ml_dtypes' float8 types, bf16 as ml_dtypes.bfloat16 (safetensors' numpy reader has no float8)."""
    dtypes = {"F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2, "BF16": ml_dtypes.bfloat16,
              "F32": np.float32, "U8": np.uint8}  # fmt: skip
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        header.pop("__metadata__", None)
        for key, e in header.items():
            a, b = e["data_offsets"]
            out[key] = np.frombuffer(raw[8 + n + a : 8 + n + b], dtype=dtypes[e["dtype"]]).reshape(e["shape"])
    return out


def write_tensors(folder: Path, tensors: dict[str, np.ndarray]) -> None:
    """The tensors as one model.safetensors (fmoe's writer: it names float8 dtypes as torch does)."""
    names = {"float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2", "bfloat16": "BF16", "float32": "F32", "uint8": "U8"}
    for f in folder.glob("*.safetensors"):
        f.unlink()
    (folder / "model.safetensors.index.json").unlink(missing_ok=True)
    writer = ShardedSafetensorsWriter(folder, shard_size=1 << 40)
    for key, a in tensors.items():
        writer.add(key, names[a.dtype.name], a.shape, np.ascontiguousarray(a).view(np.uint8).reshape(-1))
    writer.write()


# ---- e4m3 and the block dequantisation --------------------------------------------------------------
def test_e4m3_table_is_ml_dtypes_float8_e4m3fn() -> None:
    codes = np.arange(256, dtype=np.uint8)
    ref = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    got = fp8.E4M3_VALUES.astype(np.float64)
    assert np.array_equal(np.isnan(got), np.isnan(ref)) and np.isnan(got).sum() == 2  # 0x7F, 0xFF
    assert np.array_equal(got[~np.isnan(got)], ref[~np.isnan(ref)])
    assert np.nanmax(got) == 448.0 and got[1] == 2.0**-9  # largest normal, smallest subnormal


def _random_codes(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    codes = rng.integers(0, 256, size=shape, dtype=np.uint8)
    return np.where((codes & 0x7F) == 0x7F, np.uint8(0x3F), codes)  # no NaN codes


def _reference(codes: np.ndarray, scales: np.ndarray, block: tuple[int, int], row0: int) -> np.ndarray:
    """float64 dequantisation, element by element from the block indices (no repeat/broadcast)."""
    values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float64)
    rows, cols = codes.shape
    i = (np.arange(rows)[:, None] + row0) // block[0] - row0 // block[0]
    j = np.arange(cols)[None, :] // block[1]
    return values * scales.astype(np.float64)[i, j]


@pytest.mark.parametrize("case", range(6))
def test_dequantize_against_float64(rng: np.random.Generator, case: int) -> None:
    bm, bn = int(rng.choice([16, 32, 128])), int(rng.choice([16, 64, 128]))
    rows, cols = bm * int(rng.integers(1, 5)), bn * int(rng.integers(1, 4))
    if case % 3 == 0:  # a dimension smaller than its block: one block holds it all
        rows, cols = int(rng.integers(1, bm + 1)), int(rng.integers(1, bn + 1))
    row0 = int(rng.integers(0, rows)) if case % 2 else 0  # a range of rows, as extract reads big matrices
    stop = int(rng.integers(row0 + 1, rows + 1))
    codes = _random_codes(rng, (rows, cols))
    scales = np.exp2(rng.uniform(-14, 2, size=fp8.expected_grid(rows, cols, (bm, bn)))).astype(np.float32)
    first = row0 // bm
    got = fp8.dequantize(codes[row0:stop], scales[first:], (bm, bn), row0=row0)
    ref = _reference(codes[row0:stop], scales[first:], (bm, bn), row0)
    assert got.dtype == np.float32 and got.shape == (stop - row0, cols)
    # exact: the float32 product of an e4m3 value (4 significant bits) and a float32 scale is the
    # float64 product rounded once; then bf16 rounds it to nearest even, as torch's .to(bfloat16)
    assert np.array_equal(got, bf16_to_f32(f32_to_bf16(ref.astype(np.float32))))
    assert np.all(np.abs(got - ref) <= 2.0**-8 * np.abs(ref))


def test_dequantize_matches_transformers(rng: np.random.Generator) -> None:
    """transformers' own loader op (Fp8Dequantize, finegrained_fp8.py) on the same codes and scales."""
    torch = pytest.importorskip("torch")
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    for scale_dtype in ("F32", "BF16"):
        rows, cols, block = 256, 384, (128, 128)
        codes = _random_codes(rng, (3, rows, cols))  # stacked, as fused experts
        scales = np.exp2(rng.uniform(-12, 0, size=(3, 2, 3))).astype(np.float32)
        if scale_dtype == "BF16":
            scales = bf16_to_f32(f32_to_bf16(scales))
        t_codes = torch.from_numpy(codes).view(torch.float8_e4m3fn)
        t_scales = torch.from_numpy(scales).to(torch.bfloat16 if scale_dtype == "BF16" else torch.float32)
        op = finegrained.Fp8Dequantize(None)
        ref = op._dequantize_one(t_codes, t_scales, output_dtype=torch.bfloat16).float().numpy()
        assert np.array_equal(fp8.dequantize(codes, scales, block), ref)


def test_quantize_is_transformers_fp8quantize(rng: np.random.Generator) -> None:
    """synth's FP8 writer (fp8.quantize) gives the codes and scales transformers' Fp8Quantize gives."""
    torch = pytest.importorskip("torch")
    finegrained = pytest.importorskip("transformers.integrations.finegrained_fp8")
    from types import SimpleNamespace

    from transformers.utils.quantization_config import FineGrainedFP8Config

    w = (rng.standard_normal((2, 256, 128)) * np.exp2(rng.uniform(-6, 2, size=(2, 256, 1)))).astype(np.float32)
    w[0, :128, :] = 0.0  # an all-zero block keeps scale 1
    quantizer = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=(128, 64)))
    ref = finegrained.Fp8Quantize(quantizer).convert({"x.weight": torch.from_numpy(w)})
    codes, inv = fp8.quantize(w, (128, 64))
    assert np.array_equal(codes, ref["x.weight"].view(torch.uint8).numpy())
    assert np.array_equal(inv, ref["x.weight_scale_inv"].numpy())


# ---- the synthetic release --------------------------------------------------------------------------
def test_synth_fp8_is_the_release_layout(sources: dict[str, Path]) -> None:
    cfg = json.loads((sources["fp8-128"] / "config.json").read_text())
    q = cfg["quantization_config"]
    assert q | {"modules_to_not_convert": None} == {
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "quant_method": "fp8",
        "weight_block_size": [128, 128],
        "modules_to_not_convert": None,
    }
    assert {"lm_head", "model.language_model.embed_tokens", "model.language_model.layers.0.mlp.gate"} <= set(
        q["modules_to_not_convert"]
    )
    with safe_open(sources["fp8-128"] / "model.safetensors", framework="pt") as f:  # the header only
        meta = {k: (f.get_slice(k).get_dtype(), f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    p = "model.language_model.layers."
    assert meta[p + "0.mlp.experts.5.down_proj.weight"] == ("F8_E4M3", [128, 64])
    assert meta[p + "0.mlp.experts.5.down_proj.weight_scale_inv"] == ("F32", [1, 1])
    assert meta[p + "3.self_attn.q_proj.weight"] == ("F8_E4M3", [512, 128])
    assert meta[p + "3.self_attn.q_proj.weight_scale_inv"] == ("F32", [4, 1])
    for kept in ("0.mlp.gate.weight", "0.linear_attn.in_proj_a.weight", "0.linear_attn.in_proj_b.weight"):
        assert meta[p + kept][0] == "BF16" and p + kept + "_scale_inv" not in meta
    assert meta["lm_head.weight"][0] == "BF16" and meta["model.language_model.embed_tokens.weight"][0] == "BF16"
    assert meta["mtp.layers.0.mlp.experts.0.gate_proj.weight"][0] == "F8_E4M3"  # the MTP head is FP8 too


def test_synth_fp8_error_is_e4m3_error(sources: dict[str, Path]) -> None:
    """Each FP8 weight is within e4m3's half step of the BF16 weight it was made from."""
    bf, f8 = tensors_of(sources["bf16"]), tensors_of(sources["fp8"])
    name = "model.language_model.layers.1.linear_attn.in_proj_qkv.weight"
    w = bf[name].astype(np.float64)
    inv = np.repeat(np.repeat(f8[name + "_scale_inv"], 32, 0), 32, 1).astype(np.float64)
    got = f8[name].view(ml_dtypes.float8_e4m3fn).astype(np.float64) * inv
    assert np.all(np.abs(got - w) <= 2.0**-4 * np.abs(w) + 2.0**-10 * inv)  # 3 mantissa bits; subnormal step
    assert np.abs(w).max() * 0.99 <= np.abs(got).max() <= np.abs(w).max() * 1.01  # amax maps to 448


# ---- the reader ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name,layout", [("fp8", "fp8"), ("fp8-fused", "fp8-fused"), ("bf16-of-fp8", "official"), ("fp8-128", "fp8")]
)
def test_layouts_and_origin(sources: dict[str, Path], name: str, layout: str) -> None:
    with SourceCheckpoint.open(sources[name]) as src:
        assert src.layout == layout
        assert src.expert_origin() == ("bf16" if layout == "official" else "fp8")
        assert src.expert_bits() is None
        d = src.describe()
        assert d["fp8_block"] == (None if layout == "official" else [128, 128] if name == "fp8-128" else [32, 32])
        assert d["dense_fp8"] == (0 if layout == "official" else 25)  # 3 linear x 6 + 1 full x 7


def test_fp8_reads_the_bf16_of_its_dequantised_weights(sources: dict[str, Path], rng: np.random.Generator) -> None:
    """The FP8 layouts (per expert, fused, bf16 scales) read exactly the weights a BF16 checkpoint of
    the FP8-rounded values stores: every dense tensor, every expert, and row ranges."""
    names = ("fp8", "fp8-fused", "bf16-of-fp8", "bf16-of-fp8-per-expert")
    srcs = {n: SourceCheckpoint.open(sources[n]) for n in names}
    try:
        ref = srcs["bf16-of-fp8"]
        for name in ref.dense_names():
            want = ref.read_dense(name)
            for other in names[:2]:
                assert np.array_equal(srcs[other].read_dense(name), want), (other, name)
            if ref.dense_spec(name).role == "matrix":
                rows = ref.dense_spec(name).shape[0]
                a = int(rng.integers(0, rows))
                b = int(rng.integers(a + 1, rows + 1))
                assert np.array_equal(srcs["fp8"].read_dense(name, rows=(a, b)), np.asarray(want)[a:b]), name
        for layer in range(4):
            for expert in range(6):
                want = ref.read_expert(layer, expert)
                for other in (*names[:2], names[3]):
                    got = srcs[other].read_expert(layer, expert)
                    assert all(np.array_equal(got[p], want[p]) for p in want), (other, layer, expert)
    finally:
        for s in srcs.values():
            s.close()
    with SourceCheckpoint.open(sources["fp8-bf16-scales"]) as src:  # bf16 scales read as transformers reads them
        raw = tensors_of(sources["fp8-bf16-scales"])
        key = "model.language_model.layers.0.mlp.experts.2.up_proj.weight"
        scales = raw[key + "_scale_inv"].astype(np.float32)
        want = fp8.dequantize(raw[key].view(np.uint8), scales, (32, 32))
        assert np.array_equal(src.read_expert(0, 2)["up_proj"], want)


# ---- conversion -----------------------------------------------------------------------------------------
def test_extract_and_repack_fp8_equal_bf16_of_same_weights(sources: dict[str, Path], tmp_path: Path) -> None:
    """extract (bf16 and 4-bit dense) and repack (4- and 2-bit) from the FP8 checkpoint give the same
    bytes as from a BF16 checkpoint holding its dequantised weights; only the recorded origin differs."""
    out = {}
    for name in ("fp8", "bf16-of-fp8"):
        for dense_bits in (16, 4):
            packed = tmp_path / f"{name}-{dense_bits}"
            extract(sources[name], packed, dense_bits=dense_bits)
            out[name, dense_bits] = packed
        repack(sources[name], out[name, 4], bits=4)
        repack(out[name, 4], bits=2)
    for dense_bits in (16, 4):
        a, b = (out[n, dense_bits] / "model_weights.bin" for n in ("fp8", "bf16-of-fp8"))
        assert a.read_bytes() == b.read_bytes()
    for bits in (4, 2):
        ma, mb = (
            json.loads((out[n, 4] / f"experts-q{bits}/manifest.json").read_text()) for n in ("fp8", "bf16-of-fp8")
        )
        assert ma["files"] == mb["files"]  # every expert file, byte for byte (xxh3_128)
        assert ma["quantization"]["from"] == ("fp8" if bits == 4 else "packed-4bit")
        assert mb["quantization"]["from"] == ("bf16" if bits == 4 else "packed-4bit")
    report = verify(out["fp8", 4], deep=True)
    assert report["ok"], report


def test_repack_from_fp8_against_the_original_bf16(sources: dict[str, Path], tmp_path: Path) -> None:
    """4-bit experts from the FP8 release against those from the BF16 release it was made from: the
    error against the original weights grows by the FP8 rounding (independent errors add in
    quadrature), no more."""
    for name in ("fp8", "bf16"):
        repack(sources[name], tmp_path / name, bits=4)
    sse = {"fp8": 0.0, "bf16": 0.0, "fp8-itself": 0.0}
    ref = 0.0
    from fmoe.formats.packed import ExpertLayout

    with SourceCheckpoint.open(sources["bf16"]) as bf, SourceCheckpoint.open(sources["fp8"]) as f8:
        layout = ExpertLayout.for_config(bf.config, 4)
        for layer in range(4):
            for expert in range(6):
                w = bf.read_expert(layer, expert)
                w8 = f8.read_expert(layer, expert)
                for name in ("fp8", "bf16"):
                    q = layout.decode((tmp_path / name / "experts-q4" / expert_relpath(layer, expert)).read_bytes())
                    for p in w:
                        sse[name] += float(((q[p].dequantize().astype(np.float64) - w[p]) ** 2).sum())
                for p in w:
                    sse["fp8-itself"] += float(((w8[p].astype(np.float64) - w[p]) ** 2).sum())
                    ref += float((w[p].astype(np.float64) ** 2).sum())
    rel = {k: np.sqrt(v / ref) for k, v in sse.items()}
    assert 0.015 < rel["fp8-itself"] < 0.04  # e4m3: 3 mantissa bits
    assert rel["bf16"] < rel["fp8"] <= 1.1 * np.hypot(rel["bf16"], rel["fp8-itself"])


def test_quantiser_sees_the_fp8_weights(sources: dict[str, Path]) -> None:
    """The 4-bit expert made from the FP8 source is fmoe's min/max quantisation of the dequantised FP8
    weights (not of the raw e4m3 codes)."""
    with SourceCheckpoint.open(sources["fp8"]) as src:
        w = src.read_expert(2, 1)["down_proj"]
        raw = tensors_of(sources["fp8"])["model.language_model.layers.2.mlp.experts.1.down_proj.weight"]
    assert not np.array_equal(w, fp8.E4M3_VALUES[raw.view(np.uint8)])
    q = quantize(w, 4, 64)
    assert np.abs(q.dequantize() - w).max() <= float(bf16_to_f32(q.scales).max())


# ---- against transformers' loader -----------------------------------------------------------------------
@pytest.mark.skipif(importlib.util.find_spec("accelerate") is None, reason="transformers' FP8 loader needs accelerate")
def test_transformers_loads_the_same_weights(sources: dict[str, Path], tmp_path: Path, seed: int) -> None:
    """transformers, dequantising FP8 to the config's bf16 while loading (what it does without a GPU,
    asked for explicitly so that a GPU changes nothing), holds exactly the weights fmoe reads, for the
    multimodal release and a text-only one."""
    torch = pytest.importorskip("torch")
    from transformers import FineGrainedFP8Config, Qwen3_5MoeForCausalLM, Qwen3_5MoeForConditionalGeneration

    text_only = tmp_path / "text-only"
    synthesize(text_only, seed=seed, **TINY, layout="fp8", text_only=True, fp8_spec=SMALL_BLOCK)
    # The nested release through the multimodal class: transformers' Qwen3_5MoeForCausalLM reads only
    # text_config of a nested config and so misses its top-level quantization_config.
    for path, cls, prefix in (
        (sources["fp8"], Qwen3_5MoeForConditionalGeneration, "model.language_model."),
        (text_only, Qwen3_5MoeForCausalLM, "model."),
    ):
        model = cls.from_pretrained(
            path, dtype=torch.bfloat16, quantization_config=FineGrainedFP8Config(dequantize=True)
        )
        state = {k: v.float().numpy() for k, v in model.state_dict().items()}
        with SourceCheckpoint.open(path) as src:
            for name in src.dense_names():
                if src.dense_spec(name).role != "matrix":
                    continue
                key = name if name == "lm_head.weight" else prefix + name
                assert np.array_equal(state[key], src.read_dense(name)), name
            inter = src.config.moe_intermediate_size
            for layer in range(4):
                gate_up = state[f"{prefix}layers.{layer}.mlp.experts.gate_up_proj"]
                down = state[f"{prefix}layers.{layer}.mlp.experts.down_proj"]
                for e in range(6):
                    got = src.read_expert(layer, e)
                    assert np.array_equal(gate_up[e, :inter], got["gate_proj"])
                    assert np.array_equal(gate_up[e, inter:], got["up_proj"])
                    assert np.array_equal(down[e], got["down_proj"])


# ---- refusals ------------------------------------------------------------------------------------------
def _copy(src: Path, tmp_path: Path, name: str = "src") -> Path:
    dst = tmp_path / name
    shutil.copytree(src, dst)
    return dst


def _edit_config(folder: Path, **quant: Any) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    q = cfg.setdefault("quantization_config", {})
    for key, value in quant.items():
        if value is ...:
            q.pop(key, None)
        else:
            q[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))


def _edit_tensors(folder: Path, change: Any) -> None:
    tensors = tensors_of(folder)
    change(tensors)
    write_tensors(folder, tensors)


def _expect(folder: Path, *words: str) -> None:
    with pytest.raises(FmoeError) as err:
        SourceCheckpoint.open(folder)
    msg = str(err.value)
    assert "\n" not in msg and str(folder) in msg
    for w in words:
        assert w in msg, msg


@pytest.mark.parametrize(
    "field,value,words",
    [
        ("quant_method", "gptq", ("quant_method 'gptq'", "not read")),
        ("fmt", "e5m2", ("quantization_config.fmt = 'e5m2'", "FP8 variant")),
        ("activation_scheme", "static", ("activation_scheme = 'static'",)),
        ("scale_fmt", "ue8m0", ("scale_fmt = 'ue8m0'",)),
        ("expert_dtype", "fp4", ("expert_dtype = 'fp4'",)),
        ("weight_block_size", None, ("weight_block_size is null", "per-tensor")),
        ("weight_block_size", [128], ("weight_block_size = [128]",)),
        ("modules_to_convert", ["model.embed_tokens"], ("modules_to_convert",)),
    ],
)
def test_refuses_config_variants(
    sources: dict[str, Path], tmp_path: Path, field: str, value: Any, words: tuple
) -> None:
    folder = _copy(sources["fp8"], tmp_path)
    _edit_config(folder, **{field: value})
    _expect(folder, "config.json", *words)


def test_refuses_tensor_variants(sources: dict[str, Path], tmp_path: Path) -> None:
    key = "model.language_model.layers.0.linear_attn.in_proj_z.weight"
    cases: list[tuple[Any, tuple[str, ...]]] = [
        (lambda t: t.pop(key + "_scale_inv"), (key, "has no block scale")),
        (lambda t: t.__setitem__(key + "_scale_inv", t[key + "_scale_inv"][:1]), ("needs [4, 4]", "[1, 4]")),
        (lambda t: t.__setitem__(key + "_scale_inv", t[key + "_scale_inv"].view(np.uint8)[:, :4]), ("U8",)),
        (lambda t: t.__setitem__(key, t[key].view(ml_dtypes.float8_e5m2)), ("F8_E5M2", "FP8 variant")),
        (lambda t: t.__setitem__(key.replace(".weight", ".activation_scale"), np.ones((), np.float32)),
         ("activation_scale", "FP8 variant")),
        (lambda t: t.__setitem__(key.replace(".weight", ".weight_scale"), np.ones((1,), np.float32)),
         ("weight_scale'", "FP8 variant")),
    ]  # fmt: skip
    for i, (change, words) in enumerate(cases):
        folder = _copy(sources["fp8"], tmp_path, f"case{i}")
        _edit_tensors(folder, change)
        _expect(folder, *words)
    folder = _copy(sources["fp8"], tmp_path, "no-config")
    _edit_config(folder, quant_method=..., fmt=..., activation_scheme=..., weight_block_size=...,
                 modules_to_not_convert=...)  # fmt: skip
    _expect(folder, "F8_E4M3 (FP8)", "no quantization_config with quant_method 'fp8'")


def test_refuses_partial_blocks(tmp_path: Path) -> None:
    """48 x 48 blocks leave a partial block in the 128-wide matrices: transformers' loader and its
    matmul would read it differently, so fmoe refuses (the releases' 128 x 128 blocks tile exactly)."""
    synthesize(tmp_path / "p", **TINY, layout="fp8", fp8_spec=Fp8Spec(block=(48, 48)))
    _expect(tmp_path / "p", "do not tile into blocks of 48", "partial blocks")


def test_fp8_refusal_is_one_line_on_the_cli(sources: dict[str, Path], tmp_path: Path) -> None:
    folder = _copy(sources["fp8"], tmp_path)
    _edit_config(folder, scale_fmt="ue8m0")
    for args in (["extract", str(folder), "--out", str(tmp_path / "o")], ["repack", str(folder), "--bits", "4"]):
        result = CliRunner().invoke(app, args)
        assert_cli_error(result, "scale_fmt", "FP8 variant")


def test_header_dtype_name_is_what_torch_writes(tmp_path: Path) -> None:
    """safetensors names torch.float8_e4m3fn ``F8_E4M3``: the dtype string fmoe matches on."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import save_file as save_torch

    save_torch({"w": torch.zeros(2, 2, dtype=torch.float8_e4m3fn)}, str(tmp_path / "x.safetensors"))
    raw = (tmp_path / "x.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert json.loads(raw[8 : 8 + n])["w"]["dtype"] == fp8.FP8_WEIGHT_DTYPE
