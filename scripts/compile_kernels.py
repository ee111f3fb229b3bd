"""Compile every Triton kernel a synthetic model's forward passes launch, for an NVIDIA GPU, without one.

    python scripts/compile_kernels.py [PRESET] [--arch 90] [--layers 4] [--experts 8] [--stage ttir|ttgir|cubin]
        [--json]

Triton's interpreter (CI and the development machines run the kernels through it) executes a
kernel's Python but does not type it, so a kernel it runs may still fail to compile: a name given a
value of another shape inside a branch, say, which cost a GPU call once (docs/PERFORMANCE.md,
sixteenth pass). This runs a synthetic model's passes on the torch backend's Triton path on the CPU
with every launch recorded instead of run: a prefill long enough for the grouped GEMMs, a few
tokens on the matvecs, a decode step, and a prefill long enough for ``--int8-dot``'s dequantised
weights; float and ``--int8-dot``; 4- and 2-bit experts; experts all
resident and some read from a host slab in place (``--host-reads direct``, with half of them
computed by the host in decode: ``--host-compute 0.5``); decode with and without
programmatic dependent launch; and the backend ops no pass launches any more (``rms_norm``,
``delta_rule_inputs``, ``gated_delta_rule``). Each distinct specialisation (a kernel, its constexprs, the types of
its other arguments, its launch options) is then compiled for sm_ARCH, to Triton's GPU IR by
default (``--stage cubin``: to machine code, with the ptxas Triton ships; the tests take ``ttir``).
Prints one line per failure, naming the kernel and the compiler's last words, and exits non-zero
if there is one. No GPU, no CUDA driver (``--stage cubin``: Triton's bundled ptxas, which the
``triton`` wheel for Linux has).
"""

from __future__ import annotations

import os

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be Triton's compiled functions, not interpreted

import argparse
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import triton
from triton._C.libtriton import ir
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.kernels import triton_dequant, triton_int8, triton_moe, triton_ops
from fmoe.runtime.synthetic import synthetic_config, synthetic_engine

_TYPES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int8: "i8", torch.int16: "i16",
          torch.int32: "i32", torch.int64: "i64", torch.uint8: "u8", torch.bool: "i1"}  # fmt: skip
_OPTIONS = ("num_warps", "num_stages", "maxnreg", "num_ctas")  # launch keywords that shape the compiled code


def arg_type(value: Any) -> str | None:
    """Triton's signature type of a runtime argument (None: it is passed as a constexpr, as None is)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        return "*" + _TYPES[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -(2**31) <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"a kernel argument of type {type(value).__name__}")


def specialisation(fn: JITFunction, args: tuple, kwargs: dict[str, Any]) -> tuple:
    """A hashable key of one launch: the kernel, each parameter's constexpr value or runtime type, and
    the compile options among the launch keywords."""
    values = dict(zip(fn.arg_names, args, strict=False)) | {k: v for k, v in kwargs.items() if k in fn.arg_names}
    params = []
    for p in fn.params:
        v = values.get(p.name, p.default if p.has_default else None)
        kind = arg_type(v) if not p.is_constexpr else None
        params.append((p.name, "constexpr" if kind is None else kind, v if kind is None else None))
    options = tuple(sorted((k, v) for k, v in kwargs.items() if k in _OPTIONS and v is not None))
    return (fn, tuple(params), options)


STAGES = ("ttir", "ttgir", "cubin")


def compile_one(key: tuple, arch: int, stage: str = "ttgir") -> None:
    """Compile one recorded specialisation for sm_``arch`` as far as ``stage`` (raises the compiler's
    error): "ttir", Triton's own IR (the kernel's code typed: what the interpreter never checks;
    about 0.1 s a kernel), "ttgir" its GPU IR (laid out over threads: 0.5 s), "cubin" machine code
    (LLVM and ptxas: 1.5 s)."""
    fn, params, options = key
    names = fn.arg_names
    signature = {name: kind for name, kind, _ in params}
    constexprs = {(names.index(name),): value for name, kind, value in params if kind == "constexpr"}
    src = ASTSource(fn=fn, signature=signature, constexprs=constexprs)
    target = GPUTarget("cuda", arch, 32)
    if stage == "cubin":
        triton.compile(src, target=target, options=dict(options))
        return
    backend = make_backend(target)
    opts = backend.parse_options(dict(options))
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    module = src.make_ir(target, opts, backend.get_codegen_implementation(opts), backend.get_module_map(), context)
    stages: dict[str, Any] = {}
    backend.add_stages(stages, opts, src.language)
    metadata: dict[str, Any] = {}
    for name in STAGES[: STAGES.index(stage) + 1]:
        module = stages[name](module, metadata)


@contextlib.contextmanager
def recording(launches: dict[tuple, str], tag: str, pdl_on: bool = False) -> Iterator[None]:
    """Inside: every Triton launch recorded in ``launches`` (key -> ``tag`` of the pass that first
    made it) instead of run; with ``pdl_on``, the kernels launched with programmatic dependent
    launch, as a CUDA graph's are."""

    def record(self: JITFunction, *args: Any, grid: Any, warmup: bool, **kwargs: Any) -> None:
        launches.setdefault(specialisation(self, args, kwargs), tag)

    modules = (triton_moe, triton_ops, triton_int8, triton_dequant)
    saved_run, saved_pdl = JITFunction.run, [m.pdl for m in modules]
    saved_empty = torch.empty, torch.empty_like
    JITFunction.run = record  # type: ignore[method-assign]
    # what no kernel writes is read on: zeros, so routing picks valid experts and indexes stay in range
    torch.empty, torch.empty_like = torch.zeros, torch.zeros_like  # type: ignore[assignment]
    if pdl_on:
        for m in modules:
            m.pdl = lambda device: {"PDL": True, "launch_pdl": True}  # type: ignore[assignment]
    try:
        yield
    finally:
        JITFunction.run = saved_run  # type: ignore[method-assign]
        torch.empty, torch.empty_like = saved_empty  # type: ignore[assignment]
        for m, p in zip(modules, saved_pdl, strict=True):
            m.pdl = p  # type: ignore[assignment]


def record_model(preset: str, layers: int, experts: int, launches: dict[tuple, str]) -> None:
    """A synthetic model's passes on the torch backend's Triton path on the CPU, each way the GPU
    runs them, every launch recorded."""
    cfg = synthetic_config(preset, layers, experts)
    k = min(cfg.num_experts_per_tok, experts)
    prefill = max(8, 2 * (64 // k + 1))  # (token, choice) pairs above the matvecs' 64: the grouped GEMMs
    # --int8-dot's long prefill: weights dequantised for library GEMMs (dense and experts)
    long = max(triton_moe._DEQUANT_MIN_TOKENS, triton_moe._DEQUANT_MIN_PAIRS * experts // k + 1)
    for bits, int8, direct in ((4, False, False), (4, True, False), (2, False, False), (2, True, False),
                               (4, False, True), (4, True, True)):  # fmt: skip
        options: dict[str, Any] = {"kernels": "triton", "int8": int8}
        # direct: a device tier of one layer's experts, the rest read from the host slab in place
        cache = experts * ExpertLayout.for_config(cfg, bits).file_size if direct else None
        with synthetic_engine(
            cfg, bits=bits, k=k, device="cpu", device_cache_bytes=cache, host_bytes=cache or 0,
            max_context=4 * max(prefill, long), host_reads="direct" if direct else "copy", backend_options=options,
            host_compute="0.5" if direct else None,  # (decode's hand-over to the host and the wait for its sum)
        ) as engine:  # fmt: skip
            net = engine.runner.network
            for tokens, pdl_on in ((prefill, False), (long, False), (3, False), (1, False), (1, True)):
                state = net.new_state()
                tag = (
                    f"{bits}-bit{' int8' * int8}{' host reads and compute' * direct}, {tokens} tokens{', PDL' * pdl_on}"
                )
                with recording(launches, tag, pdl_on):
                    net.forward(np.arange(tokens, dtype=np.int64) % cfg.vocab_size, state, last_only=True)


def record_ops(preset: str, launches: dict[tuple, str]) -> None:
    """The backend ops a forward pass no longer launches (the model fuses them elsewhere) but the
    backend contract keeps, at the preset's shapes, one and several tokens."""
    cfg = synthetic_config(preset, 1)
    hk, dk, hv, dv = (cfg.linear_num_key_heads, cfg.linear_key_head_dim, cfg.linear_num_value_heads,
                      cfg.linear_value_head_dim)  # fmt: skip
    hidden = cfg.hidden_size
    for t in (1, 5):
        with recording(launches, f"ops, {t} tokens"):
            x = torch.zeros(t, hidden)
            for kw in ({}, {"residual": x}, {"gate": x}):
                triton_ops.rms_norm(x, torch.ones(hidden), 1e-6, **kw)
            qkv, ab, per_head = torch.zeros(t, 2 * hk * dk + hv * dv), torch.zeros(t, hv), torch.zeros(hv)
            q, k, v, g, beta = triton_ops.delta_rule_inputs(qkv, ab, ab, per_head, per_head, (hk, dk, hv, dv))
            triton_ops.gated_delta_rule(q, k, v, g, beta, torch.zeros(hv, dk, dv))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("preset", nargs="?", default="qwen3.5-397b-a17b")
    ap.add_argument("--arch", type=int, default=90, help="the GPU's compute capability as a number (90: H100/H200)")
    ap.add_argument("--layers", type=int, default=4, help="layers of the synthetic model (4: every layer kind)")
    ap.add_argument("--experts", type=int, default=8, help="routed experts a layer (few: the passes stay small)")
    ap.add_argument("--stage", choices=STAGES, default="ttgir", help="how far to compile (see compile_one)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    for name in ("layers", "experts"):
        if getattr(args, name) < 1:
            ap.error(f"argument --{name}: must be at least 1")
    if args.arch < 80:
        ap.error(f"argument --arch: {args.arch}: the kernels need compute capability 8.0 or later")
    try:
        synthetic_config(args.preset, args.layers, args.experts)
    except FmoeError as e:
        ap.error(str(e))
    launches: dict[tuple, str] = {}
    t0 = time.perf_counter()
    record_model(args.preset, args.layers, args.experts, launches)
    record_ops(args.preset, launches)
    recorded = time.perf_counter() - t0
    failures = []
    for key in launches:
        try:
            compile_one(key, args.arch, args.stage)
        except Exception as e:  # the compiler's errors have no common base class
            last = [line for line in str(e).splitlines() if line.strip()][-1:] or [type(e).__name__]
            failures.append({"kernel": key[0].__name__, "pass": launches[key],
                             "error": f"{type(e).__name__}: {last[0].strip()}"})  # fmt: skip
    names = sorted({key[0].__name__ for key in launches})
    result = {"preset": args.preset, "arch": args.arch, "stage": args.stage, "kernels": names,
              "specialisations": len(launches), "record_seconds": recorded,
              "compile_seconds": time.perf_counter() - t0 - recorded, "failures": failures}  # fmt: skip
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{len(launches)} specialisations of {len(names)} kernels compiled to {args.stage} for sm_{args.arch} "
              f"({result['compile_seconds']:.0f} s; the passes recorded in {recorded:.0f} s)")  # fmt: skip
        for f in failures:
            print(f"FAILED {f['kernel']} ({f['pass']}): {f['error']}")
    raise SystemExit(1 if failures else 0)


if __name__ == "__main__":
    main()
