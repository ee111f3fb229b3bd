"""Reading a source checkpoint (official BF16, its per-expert variant, the official block-FP8 release,
or MLX 4-bit) in canonical form; the text-only checkpoints (flat config, ``model.layers.*``) too.

Everything is checked when the checkpoint is opened (config, shard files, headers, every tensor's
presence and shape against the config), so conversion never fails half-way on a bad source.
Reads are lazy and bounded: one tensor (or a range of its rows), one expert at a time.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash

from fmoe.config import TextConfig
from fmoe.convert import fp8
from fmoe.errors import FmoeError
from fmoe.formats.dense_tensors import dense_tensor_shapes
from fmoe.formats.packed import EXPERT_PROJECTIONS
from fmoe.formats.quant import SUPPORTED_BITS, QuantTensor, bf16_to_f32
from fmoe.formats.safetensors_io import FP8_DTYPES, INDEX_FILE, MAX_INDEX, SafetensorsFile, TensorInfo
from fmoe.fsutil import check_name, check_regular_file, confined, read_json, read_json_or_none

LAYOUTS = ("official", "official-per-expert", "mlx", "fp8", "fp8-fused")
# The FP8 layouts are the official ones with block-FP8 matrices: "fp8" stores experts per expert (the
# official FP8 releases), "fp8-fused" as fused [E, ...] tensors with [E, ...] scales (transformers' FP8Experts).
FP8_LAYOUTS = {"official-per-expert": "fp8", "official": "fp8-fused"}
# Tensors the text model never reads: the vision tower and the MTP head (`fmoe download` skips
# shards holding nothing else).
SKIPPED_PREFIXES = ("visual.", "mtp.", "vision_tower.", "model.visual.", "model.mtp.", "language_model.mtp")
# Zero-centred RMSNorms, stored as the effective scale 1 + w (docs/FORMAT.md).
NORM1P_SUFFIXES = ("input_layernorm.weight", "post_attention_layernorm.weight", "q_norm.weight", "k_norm.weight")
FLOAT_DTYPES = ("BF16", "F16", "F32")
# Text-model prefixes of the releases: official, transformers' save_pretrained, MLX.
OFFICIAL_PREFIXES = ("model.language_model.", "model.")
MLX_PREFIX = "language_model.model."
MLX_LM_HEAD = "language_model.lm_head.weight"
DOWNLOAD_RECORD = ".fmoe-download.json"  # written by `fmoe download`: repo and resolved sha


# ---- the canonical non-expert tensors ---------------------------------------------------------------
@dataclass(frozen=True)
class DenseSpec:
    """One canonical non-expert tensor: its name, canonical shape and role."""

    name: str
    shape: tuple[int, ...]
    role: str  # "matrix" (2-D, may be quantised) | "norm1p" | "vector" | "conv"


def dense_specs(cfg: TextConfig) -> list[DenseSpec]:
    """Every non-expert tensor of the text model (names and shapes from fmoe.convert.expected)."""
    return [DenseSpec(name, shape, _role(name, shape)) for name, shape in dense_tensor_shapes(cfg).items()]


def _role(name: str, shape: tuple[int, ...]) -> str:
    if name.endswith("conv1d.weight"):
        return "conv"
    if len(shape) == 2:
        return "matrix"
    if name == "norm.weight" or name.endswith(NORM1P_SUFFIXES):
        return "norm1p"
    return "vector"  # A_log, dt_bias, the DeltaNet output norm (plain weight)


def expert_shapes(cfg: TextConfig) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each projection of one routed expert."""
    I, H = cfg.moe_intermediate_size, cfg.hidden_size
    return {"gate_proj": (I, H), "up_proj": (I, H), "down_proj": (H, I)}


# ---- source tensor references ---------------------------------------------------------------------
@dataclass(frozen=True)
class _Ref:
    """Where one (possibly quantised, possibly stacked) source tensor lives."""

    file: SafetensorsFile
    info: TensorInfo
    quant: tuple[TensorInfo, TensorInfo, SafetensorsFile, SafetensorsFile] | None = None  # scales, biases
    bits: int = 0
    group_size: int = 0
    fp8: tuple[TensorInfo, SafetensorsFile] | None = None  # block scales (scale_inv) of an FP8 matrix
    block: tuple[int, int] = (0, 0)

    @property
    def nbytes(self) -> int:
        extra = self.quant[0].nbytes + self.quant[1].nbytes if self.quant else 0
        return self.info.nbytes + extra + (self.fp8[0].nbytes if self.fp8 else 0)

    def rows(self, start: int, stop: int) -> np.ndarray | QuantTensor:
        """Rows of the first dimension: float32, or a QuantTensor for a quantised tensor. An FP8 matrix
        is dequantised with its block scales (the bf16 values transformers' loader gives)."""
        raw = self.file.read_rows(self.info.name, start, stop)
        if self.fp8 is not None:
            return self._fp8_rows(raw, start, stop)
        if self.quant is None:
            return _to_float32(raw, self.info.dtype)
        s_info, b_info, s_file, b_file = self.quant
        scales = s_file.read_rows(s_info.name, start, stop)
        biases = b_file.read_rows(b_info.name, start, stop)
        return QuantTensor(raw, scales, biases, self.bits, self.group_size)

    def _fp8_rows(self, raw: np.ndarray, start: int, stop: int) -> np.ndarray:
        assert self.fp8 is not None
        s_info, s_file = self.fp8
        if len(self.info.shape) > 2:  # stacked [E, out, in]: rows are whole matrices, one scale grid each
            scales = s_file.read_rows(s_info.name, start, stop)
            return fp8.dequantize(raw, _to_float32(scales, s_info.dtype), self.block)
        bm = self.block[0]
        first, last = start // bm, min(s_info.shape[0], -(-stop // bm))  # the scale rows covering the range
        scales = s_file.read_rows(s_info.name, first, max(first, last))
        return fp8.dequantize(raw, _to_float32(scales, s_info.dtype), self.block, row0=start)


def _to_float32(raw: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return bf16_to_f32(raw)
    return raw.astype(np.float32, copy=False)


# ---- the checkpoint ---------------------------------------------------------------------------------
class SourceCheckpoint:
    """A source checkpoint directory: config, shards and the mapping to canonical names."""

    path: Path
    layout: str
    config: TextConfig
    raw_config: dict[str, Any]

    def __init__(
        self,
        path: Path,
        layout: str,
        config: TextConfig,
        raw_config: dict[str, Any],
        files: dict[str, SafetensorsFile],
        shard_sizes: dict[str, int],
        dense: dict[str, tuple[DenseSpec, _Ref]],
        experts: list[dict[str, Any]],
    ) -> None:
        self.path, self.layout, self.config, self.raw_config = path, layout, config, raw_config
        self._files = files
        self._shard_sizes = shard_sizes  # every shard present, vision/MTP-only ones included
        self._dense = dense
        self._experts = experts

    # ---- opening ---------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str) -> SourceCheckpoint:
        path = Path(path)
        if not path.is_dir():
            raise FmoeError(f"{path}: not a directory (expected a source checkpoint)")
        if not os.path.lexists(path / "config.json"):
            raise FmoeError(f"{path}: no config.json (not a model checkpoint)")
        check_regular_file(confined(path, "config.json"), "the model's config")
        raw = read_json(path / "config.json")
        cfg = TextConfig.from_dict(raw, where=str(path / "config.json"))
        files, key_file, sizes = _open_shards(path)
        layout, dense, experts = _Mapper(path, cfg, raw, files, key_file).build()  # files open lazily
        return cls(path, layout, cfg, raw, files, sizes, dense, experts)

    # ---- non-expert tensors --------------------------------------------------------------------------
    def dense_names(self) -> list[str]:
        return list(self._dense)

    def dense_spec(self, name: str) -> DenseSpec:
        return self._spec_ref(name)[0]

    def dense_bits(self, name: str) -> int | None:
        """Bit width of a quantised source tensor, None for a float one."""
        ref = self._spec_ref(name)[1]
        return ref.bits if ref.quant else None

    def dense_nbytes(self, name: str) -> int:
        return self._spec_ref(name)[1].nbytes

    def read_dense(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray | QuantTensor:
        """The tensor in canonical convention (float32, or a QuantTensor as stored in an MLX source).

        ``rows`` selects a range of a matrix's rows, so huge matrices (embedding, lm_head) can be
        converted in bounded memory.
        """
        spec, ref = self._spec_ref(name)
        if spec.role == "matrix":
            start, stop = rows if rows is not None else (0, spec.shape[0])
            return ref.rows(start, stop)
        data = ref.rows(0, ref.info.shape[0])
        assert isinstance(data, np.ndarray)  # the mapper takes only float tensors for non-matrices
        data = data.reshape(spec.shape)
        if spec.role == "norm1p" and self.layout != "mlx":  # MLX conversions already added the 1
            data = data + np.float32(1.0)
        return np.ascontiguousarray(data, dtype=np.float32)

    def _spec_ref(self, name: str) -> tuple[DenseSpec, _Ref]:
        if name not in self._dense:
            raise FmoeError(f"{self.path}: no tensor {name!r}")
        return self._dense[name]

    # ---- experts -----------------------------------------------------------------------------------
    def expert_bits(self) -> int | None:
        """Bits of the stored experts (4 for the MLX 4-bit release), None for float experts."""
        return self._experts[0]["bits"]

    def expert_dtype(self) -> str:
        """How the experts are stored: ``affine`` (quantised) or the float dtype, e.g. ``bf16``."""
        refs = self._experts[0]
        if refs["kind"] == "fused":
            return refs["gate_up"].info.dtype.lower()
        ref = refs["gate_proj"][0] if refs["kind"] == "per-expert" else refs["gate_proj"]
        return "affine" if ref.quant else ref.info.dtype.lower()

    def expert_nbytes(self) -> int:
        """Source bytes of one expert (all three projections)."""
        return self._experts[0]["nbytes"]

    def expert_origin(self) -> str:
        """What quantised experts are made ``from`` (the expert manifest's quantization "from"):
        ``mlx-{bits}bit`` for MLX experts, ``fp8`` for FP8 ones, else ``bf16`` (any float source)."""
        bits = self.expert_bits()
        if bits is not None:
            return f"mlx-{bits}bit"
        return "fp8" if self.expert_dtype() == fp8.FP8_WEIGHT_DTYPE.lower() else "bf16"

    def fp8_block(self) -> tuple[int, int] | None:
        """The FP8 block size when any tensor read is block-FP8, else None."""
        refs = [r for _, r in self._dense.values()]
        for v in self._experts[0].values():  # every layer's experts are stored alike (checked when opened)
            refs += [r for r in (v if isinstance(v, list) else [v]) if isinstance(r, _Ref)]
        return next((r.block for r in refs if r.fp8 is not None), None)

    def read_expert(self, layer: int, expert: int) -> dict[str, np.ndarray | QuantTensor]:
        """One expert's projections ``{gate_proj, up_proj, down_proj}``: float32 ``[out, in]`` or
        QuantTensor; only that expert's bytes are read."""
        cfg = self.config
        if not (0 <= layer < cfg.num_hidden_layers and 0 <= expert < cfg.num_experts):
            raise FmoeError(f"{self.path}: no expert {expert} in layer {layer}")
        refs = self._experts[layer]
        kind = refs["kind"]
        if kind == "fused":
            gate_up = refs["gate_up"].rows(expert, expert + 1)[0]
            inter = cfg.moe_intermediate_size
            return {
                "gate_proj": gate_up[:inter],
                "up_proj": gate_up[inter:],
                "down_proj": refs["down"].rows(expert, expert + 1)[0],
            }
        if kind == "per-expert":
            return {proj: refs[proj][expert].rows(0, refs[proj][expert].info.shape[0]) for proj in EXPERT_PROJECTIONS}
        out: dict[str, np.ndarray | QuantTensor] = {}
        for proj in EXPERT_PROJECTIONS:  # stacked (MLX switch_mlp)
            t = refs[proj].rows(expert, expert + 1)
            out[proj] = (
                QuantTensor(t.weight[0], t.scales[0], t.biases[0], t.bits, t.group_size)
                if isinstance(t, QuantTensor)
                else t[0]
            )
        return out

    # ---- description -------------------------------------------------------------------------------
    def shards(self) -> list[tuple[str, int]]:
        """(file name, bytes) of every safetensors file of the checkpoint present on disk."""
        return sorted(self._shard_sizes.items())

    def total_bytes(self) -> int:
        return sum(size for _, size in self.shards())

    def source_fingerprint(self) -> str:
        """Identity of the source files (names and sizes): a changed download gives a new value."""
        text = json.dumps({"layout": self.layout, "shards": self.shards()})
        return xxhash.xxh3_64_hexdigest(text.encode())

    def record(self) -> dict[str, Any]:
        """The ``source`` entry of fmoe.json: path, layout and, if known, hub repo and revision."""
        pin = read_json_or_none(self.path / DOWNLOAD_RECORD) or {}
        return {
            "path": str(self.path.resolve()),
            "layout": self.layout,
            "repo": pin.get("repo"),
            "revision": pin.get("sha"),
        }

    def describe(self) -> dict[str, Any]:
        cfg = self.config
        return {
            "kind": "source",
            "path": str(self.path),
            "layout": self.layout,
            "model_type": self.raw_config.get("model_type"),
            "model_fingerprint": cfg.fingerprint(),
            "source_fingerprint": self.source_fingerprint(),
            "shards": [name for name, _ in self.shards()],
            "bytes": self.total_bytes(),
            "num_layers": cfg.num_hidden_layers,
            "num_experts": cfg.num_experts,
            "hidden_size": cfg.hidden_size,
            "expert_bits": self.expert_bits(),
            "expert_dtype": self.expert_dtype(),
            "dense_tensors": len(self._dense),
            "dense_quantized": sum(1 for _, r in self._dense.values() if r.quant),
            "dense_fp8": sum(1 for _, r in self._dense.values() if r.fp8),
            "fp8_block": list(block) if (block := self.fp8_block()) else None,
            **{k: v for k, v in self.record().items() if k in ("repo", "revision")},
        }

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def __enter__(self) -> SourceCheckpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# ---- opening helpers --------------------------------------------------------------------------------
def is_text_tensor(key: str) -> bool:
    """Whether the text model reads this source tensor (vision tower and MTP head: no)."""
    return not (key.startswith(SKIPPED_PREFIXES) or ".mtp." in key)


def _open_shards(path: Path) -> tuple[dict[str, SafetensorsFile], dict[str, str], dict[str, int]]:
    """Open every shard that holds a text-model tensor; returns those files, tensor -> file name,
    and the size of every shard present (vision/MTP-only ones included).

    Shard names come from the index (or the folder's listing) and are confined to ``path``: a name
    leaving it (``../x``, ``/x``, a symlink resolving outside) or a shard that is not a regular file
    (a FIFO, a device, a directory) is refused by name before anything is opened."""
    index = path / INDEX_FILE
    if os.path.lexists(index):
        names, present = _shards_from_index(path, index)
    else:
        names = sorted(p.name for p in path.glob("*.safetensors"))
        if not names:
            raise FmoeError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
        present = {name: _shard_size(path, name, "the folder's listing") for name in names}
    files = {name: SafetensorsFile(confined(path, name)) for name in names}
    key_file: dict[str, str] = {}
    for name, f in files.items():
        for key in f.tensors:
            if is_text_tensor(key):
                key_file[key] = name
    return files, key_file, present


def _shards_from_index(path: Path, index: Path) -> tuple[list[str], dict[str, int]]:
    """(shards holding text tensors, size of every shard present) from the index's weight_map."""
    size = check_regular_file(confined(path, INDEX_FILE), "the shard index").st_size
    if size > MAX_INDEX:
        raise FmoeError(f"{index}: {size} bytes, over the {MAX_INDEX >> 20} MiB a shard index may have")
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise FmoeError(f"{index}: no weight_map")
    needed: dict[str, str] = {}  # shard -> first text tensor it holds
    for key, fname in weight_map.items():
        check_name(fname, f"{index}: weight_map[{key!r}]")
        if is_text_tensor(key):
            needed.setdefault(fname, key)
    present: dict[str, int] = {}
    for fname in sorted(set(weight_map.values())):
        named_by = f"{INDEX_FILE}, holds {needed[fname]!r}" if fname in needed else INDEX_FILE
        if fname in needed or os.path.lexists(confined(path, fname, named_by)):  # vision/MTP-only: may be absent
            present[fname] = _shard_size(path, fname, named_by)
    return sorted(needed), present


def _shard_size(path: Path, name: str, named_by: str) -> int:
    """Size of the shard ``name``: a regular file (symlinks followed) confined to ``path``."""
    shard = confined(path, name, named_by)
    if not os.path.lexists(shard):
        raise FmoeError(f"{shard}: missing shard (named by {named_by})")
    return check_regular_file(shard, f"shard named by {named_by}").st_size


class _Mapper:
    """Works out a checkpoint's layout and maps every canonical tensor to its source tensors,
    checking presence, dtypes and shapes against the config."""

    def __init__(
        self,
        path: Path,
        cfg: TextConfig,
        raw: dict[str, Any],
        files: dict[str, SafetensorsFile],
        key_file: dict[str, str],
    ) -> None:
        self.path, self.cfg, self.raw, self.files, self.key_file = path, cfg, raw, files, key_file
        quant = raw.get("quantization") or raw.get("quantization_config") or {}
        self.quant_cfg: dict[str, Any] = quant if isinstance(quant, dict) else {}
        self.config_file = path / "config.json"
        self.fp8: fp8.Fp8Config | None = None
        self.fp8_used = False

    def build(self) -> tuple[str, dict[str, tuple[DenseSpec, _Ref]], list[dict[str, Any]]]:
        """(layout, canonical name -> (spec, source ref), per-layer expert refs)."""
        layout, prefix = self._detect_layout()
        self.layout, self.prefix = layout, prefix
        if layout == "mlx" and self.quant_cfg.get("mode", "affine") != "affine":
            raise FmoeError(
                f"{self.path}: MLX quantisation mode {self.quant_cfg.get('mode')!r} is not supported yet (only affine)"
            )
        if layout != "mlx":
            self._check_quantization()
        dense = {spec.name: (spec, self._dense_ref(spec)) for spec in dense_specs(self.cfg)}
        experts = [self._expert_refs(L) for L in range(self.cfg.num_hidden_layers)]
        bits = {e["bits"] for e in experts}
        if len(bits) > 1:
            raise FmoeError(f"{self.path}: experts are stored at different bit widths across layers ({bits})")
        dtypes = {_expert_dtype(e) for e in experts}
        if len(dtypes) > 1:
            raise FmoeError(f"{self.path}: experts are stored differently across layers ({', '.join(sorted(dtypes))})")
        return (FP8_LAYOUTS[layout] if self.fp8_used else layout), dense, experts

    def _check_quantization(self) -> None:
        """An official-layout checkpoint is float, or block FP8 as the official releases are: any other
        quantisation method, or companions of FP8 schemes this reader does not apply, are refused."""
        method = self.quant_cfg.get("quant_method")
        if method == "fp8":
            self.fp8 = fp8.Fp8Config.parse(self.quant_cfg, str(self.config_file))
        elif method is not None:
            raise FmoeError(
                f"{self.config_file}: quantization_config.quant_method {method!r} is not read by fmoe (it reads the "
                "BF16 releases, the official block-FP8 releases and MLX conversions)"
            )
        for key in self.key_file:
            if key.endswith(fp8.FOREIGN_SCALE_SUFFIXES):
                raise FmoeError(
                    f"{self.path}: tensor {key!r} belongs to an FP8 variant fmoe does not read (it reads block "
                    "FP8 with weight_scale_inv and dynamic activation scaling, as the official releases store it)"
                )

    def _detect_layout(self) -> tuple[str, str]:
        keys = self.key_file
        if any(".mlp.switch_mlp." in k for k in keys):
            return "mlx", MLX_PREFIX
        for prefix in OFFICIAL_PREFIXES:
            if f"{prefix}embed_tokens.weight" not in keys:
                continue
            if any(k.startswith(prefix) and k.endswith(".mlp.experts.gate_up_proj") for k in keys):
                return "official", prefix
            if any(k.startswith(prefix) and ".mlp.experts.0.gate_proj" in k for k in keys):
                return "official-per-expert", prefix
        if not any(".experts." in k or "switch_mlp" in k for k in keys):
            raise FmoeError(
                f"{self.path}: no routed-expert tensors found (unrecognised checkpoint layout; "
                f"fmoe reads the official BF16 and FP8 releases and MLX conversions)"
            )
        raise FmoeError(f"{self.path}: unrecognised checkpoint layout (no embed_tokens.weight under a known prefix)")

    # ---- lookup ------------------------------------------------------------------------------------
    def _key(self, canonical: str) -> str:
        if canonical == "lm_head.weight":
            return MLX_LM_HEAD if self.layout == "mlx" else "lm_head.weight"
        return self.prefix + canonical

    def _info(self, key: str) -> tuple[SafetensorsFile, TensorInfo]:
        if key not in self.key_file:
            raise FmoeError(f"{self.path}: tensor {key!r} is missing")
        f = self.files[self.key_file[key]]
        return f, f.tensors[key]

    def _mismatch(self, info: TensorInfo, expected: object) -> FmoeError:
        return FmoeError(
            f"{self.path}: tensor {info.name!r} has shape {list(info.shape)}, the config implies {expected}"
        )

    def _float_ref(self, key: str, shapes: list[tuple[int, ...]]) -> _Ref:
        f, info = self._info(key)
        if info.dtype not in FLOAT_DTYPES:
            raise FmoeError(f"{self.path}: tensor {key!r} has dtype {info.dtype}, expected a float type")
        if info.shape not in shapes:
            raise self._mismatch(info, list(shapes[0]))
        return _Ref(f, info)

    def _matrix_ref(self, key: str, lead: tuple[int, ...], out_dim: int, in_dim: int) -> _Ref:
        """A float, block-FP8 or MLX-quantised matrix ``[*lead, out, in]``."""
        base = key.removesuffix(".weight")
        if base + ".scales" not in self.key_file:
            f, info = self._info(key)
            if info.dtype in FP8_DTYPES:
                return self._fp8_ref(key, f, info, (*lead, out_dim, in_dim))
            if fp8.scale_key(key) in self.key_file:
                raise FmoeError(
                    f"{self.path}: tensor {key!r} is {info.dtype} but has an FP8 block scale "
                    f"{fp8.scale_key(key)!r} (a scale belongs to a float8 e4m3 weight)"
                )
            return self._float_ref(key, [(*lead, out_dim, in_dim)])
        f, info = self._info(key)
        sf, s_info = self._info(base + ".scales")
        bf, b_info = self._info(base + ".biases")
        expected = f"{[*lead, out_dim, in_dim]} (quantised)"
        if info.dtype != "U32" or len(info.shape) != len(lead) + 2 or s_info.shape != b_info.shape:
            raise self._mismatch(info, expected)
        if info.shape[:-1] != (*lead, out_dim) or s_info.shape[:-1] != (*lead, out_dim):
            raise self._mismatch(info, expected)
        if s_info.dtype != "BF16" or b_info.dtype != "BF16":
            raise FmoeError(f"{self.path}: {base}.scales/biases are {s_info.dtype}, fmoe reads bf16 only")
        words, groups = info.shape[-1], s_info.shape[-1]
        if groups == 0 or in_dim % groups or (words * 32) % in_dim:
            raise self._mismatch(info, expected)
        bits, group_size = words * 32 // in_dim, in_dim // groups
        if bits not in SUPPORTED_BITS:
            raise FmoeError(f"{self.path}: {base} is quantised to {bits} bits; fmoe reads {SUPPORTED_BITS}")
        declared = self._declared_quant(base)
        if declared and (declared.get("bits", bits), declared.get("group_size", group_size)) != (bits, group_size):
            raise FmoeError(
                f"{self.path}: {base} is stored at {bits} bits / group {group_size} but config.json "
                f"quantization says {declared.get('bits')} / {declared.get('group_size')}"
            )
        return _Ref(f, info, (s_info, b_info, sf, bf), bits, group_size)

    def _fp8_ref(self, key: str, f: SafetensorsFile, info: TensorInfo, shape: tuple[int, ...]) -> _Ref:
        """A block-FP8 matrix ``shape`` and its ``scale_inv`` grid, checked against the config's block."""
        if self.fp8 is None:
            raise FmoeError(
                f"{self.path}: tensor {key!r} is {info.dtype} (FP8) but config.json has no quantization_config "
                "with quant_method 'fp8' (the official FP8 releases declare it, with the block size)"
            )
        if info.dtype != fp8.FP8_WEIGHT_DTYPE:
            raise FmoeError(
                f"{self.path}: tensor {key!r} is {info.dtype}, an FP8 variant fmoe does not read "
                f"(the official releases store {fp8.FP8_WEIGHT_DTYPE}, i.e. float8 e4m3fn)"
            )
        if info.shape != shape:
            raise self._mismatch(info, list(shape))
        skey = fp8.scale_key(key)
        if skey not in self.key_file:
            raise FmoeError(f"{self.path}: FP8 tensor {key!r} has no block scale {skey!r}")
        sf, s_info = self._info(skey)
        if s_info.dtype not in fp8.SCALE_DTYPES:
            raise FmoeError(
                f"{self.path}: FP8 block scale {skey!r} is {s_info.dtype}, an FP8 variant fmoe does not read "
                f"(scales in {', '.join(fp8.SCALE_DTYPES)})"
            )
        block = self.fp8.block
        rows, cols = shape[-2:]
        grid = (*shape[:-2], *fp8.expected_grid(rows, cols, block))
        if s_info.shape != grid:
            raise FmoeError(
                f"{self.path}: FP8 block scale {skey!r} has shape {list(s_info.shape)}; {list(shape)} in "
                f"{block[0]} x {block[1]} blocks (quantization_config.weight_block_size) needs {list(grid)}"
            )
        why = fp8.partial_block(rows, cols, block)
        if why:
            raise FmoeError(
                f"{self.path}: FP8 tensor {key!r}: {why} (partial blocks are read differently by transformers' "
                "dequantising loader and its FP8 matmul, so fmoe refuses them)"
            )
        self.fp8_used = True
        return _Ref(f, info, fp8=(s_info, sf), block=block)

    def _declared_quant(self, base: str) -> dict[str, Any]:
        """The config's quantisation for a module: its per-module override, else the default."""
        q = self.quant_cfg
        for name in (base, base.removeprefix("language_model."), base.removeprefix("language_model.model.")):
            entry = q.get(name)
            if isinstance(entry, dict):
                return entry
        return {k: q[k] for k in ("bits", "group_size") if k in q}

    # ---- dense -----------------------------------------------------------------------------------
    def _dense_ref(self, spec: DenseSpec) -> _Ref:
        key = self._key(spec.name)
        if spec.role == "matrix":
            return self._matrix_ref(key, (), *spec.shape)
        if spec.role == "conv":
            c, k = spec.shape
            return self._float_ref(key, [(c, 1, k), (c, k, 1), (c, k)])
        return self._float_ref(key, [spec.shape])

    # ---- experts ----------------------------------------------------------------------------------
    def _expert_refs(self, layer: int) -> dict[str, Any]:
        cfg = self.cfg
        E, I, H = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        shapes = expert_shapes(cfg)
        base = f"{self.prefix}layers.{layer}.mlp."
        if self.layout == "official":
            gate_up = self._matrix_ref(base + "experts.gate_up_proj", (E,), 2 * I, H)
            down = self._matrix_ref(base + "experts.down_proj", (E,), H, I)
            nbytes = (gate_up.nbytes + down.nbytes) // E
            if (gate_up.fp8 is None) != (down.fp8 is None):
                raise FmoeError(f"{self.path}: layer {layer} experts mix dtypes (some FP8, some float)")
            return {"kind": "fused", "gate_up": gate_up, "down": down, "bits": None, "nbytes": nbytes}
        if self.layout == "official-per-expert":
            refs: dict[str, Any] = {"kind": "per-expert", "bits": None}
            for proj, shape in shapes.items():
                refs[proj] = [self._matrix_ref(f"{base}experts.{e}.{proj}.weight", (), *shape) for e in range(E)]
            refs["nbytes"] = sum(refs[p][0].nbytes for p in EXPERT_PROJECTIONS)
            if len({r.fp8 is None for p in EXPERT_PROJECTIONS for r in refs[p]}) > 1:
                raise FmoeError(f"{self.path}: layer {layer} experts mix dtypes (some FP8, some float)")
            return refs
        refs = {"kind": "stacked"}
        for proj, (out_dim, in_dim) in shapes.items():
            refs[proj] = self._matrix_ref(f"{base}switch_mlp.{proj}.weight", (E,), out_dim, in_dim)
        bits = {refs[p].bits if refs[p].quant else None for p in EXPERT_PROJECTIONS}
        if len(bits) > 1:
            raise FmoeError(f"{self.path}: layer {layer} experts mix bit widths {bits}")
        refs["bits"] = bits.pop()
        refs["nbytes"] = sum(refs[p].nbytes for p in EXPERT_PROJECTIONS) // E
        return refs


def _expert_dtype(refs: dict[str, Any]) -> str:
    """How one layer's experts are stored: ``affine`` (MLX), ``fp8`` or ``float`` (any float dtype)."""
    ref = refs["gate_up"] if refs["kind"] == "fused" else refs["gate_proj"]
    ref = ref[0] if isinstance(ref, list) else ref
    return "affine" if ref.quant else "fp8" if ref.fp8 else "float"
