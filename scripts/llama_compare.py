"""fmoe beside llama.cpp on the same synthetic checkpoint and the same threads: `llama-bench` (from a
build you give) and `fmoe bench model`, alternating for several rounds, medians and ratios.

    python scripts/llama_compare.py SOURCE PACKED --llama-build DIR --llama-src DIR
        [--threads 2 [16 ...]] [--rounds 3] [--prompt-tokens 128] [--tokens 32] [--quant Q4_0] [--io mmap|pread]
        [--int8-dot]
        [--gpu [--experts-on-cpu]] [--build [--cmake-arg=ARG ...]] [--per-layer SOURCE2 PACKED2] [--fmoe-path DIR]
        [--workdir DIR] [--json]

SOURCE is a checkpoint in the official layout (`fmoe synth`), PACKED its `fmoe extract` + `fmoe repack
--bits 4`. The GGUF is made once (cached in --workdir) with llama.cpp's own convert_hf_to_gguf.py and
llama-quantize. The synthetic tokenizer is unknown to the converter's pre-tokenizer check (it hashes
the tokenisation of a probe string): the converter runs with that check answering "qwen35", the
Qwen3.5 family's pre-tokenizer, which is what the synthetic tokenizer is modelled on.

``--gpu`` compares on a CUDA GPU: llama.cpp with every layer offloaded (``-ngl 99``; with
``--experts-on-cpu`` its experts stay in host memory, computed by the CPU threads: ``-ot exps=CPU``)
beside fmoe's torch backend on CUDA with decode from a CUDA graph (experts in its device tier).
``--build`` first configures and builds llama-bench and llama-quantize from ``--llama-src`` into
``--llama-build`` with CMake (CUDA for the machine's GPU with ``--gpu``; ``--cmake-arg`` adds
arguments, e.g. ``-DGGML_CUDA_FA=OFF``) when the build has no llama-bench yet.

llama.cpp has no per-layer profile: with ``--per-layer`` a second pair with more layers (same
geometry, e.g. `fmoe synth --layers 8`) is measured too, and per-layer time is the difference of the
two per-token times over the difference of layers, for both engines alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

CONVERT_SHIM = """
import sys
sys.path[:0] = [{src!r}, {gguf!r}]
sys.argv = ["convert_hf_to_gguf.py", *{args!r}]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen35"
import runpy
runpy.run_path({script!r}, run_name="__main__")
"""


def make_gguf(source: Path, llama_src: Path, llama_build: Path, quant: str, workdir: Path) -> Path:
    """``source`` as a GGUF quantised to ``quant`` (made once, cached in ``workdir``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    f16 = workdir / f"{source.name}-bf16.gguf"
    out = workdir / f"{source.name}-{quant}.gguf"
    if not out.is_file():
        if not f16.is_file():
            args = [str(source), "--outfile", str(f16), "--outtype", "bf16", "--no-mtp"]
            code = CONVERT_SHIM.format(
                src=str(llama_src), gguf=str(llama_src / "gguf-py"), args=args,
                script=str(llama_src / "convert_hf_to_gguf.py"),
            )  # fmt: skip
            _run([sys.executable, "-c", code], "convert_hf_to_gguf.py")
        _run([str(llama_build / "bin" / "llama-quantize"), str(f16), str(out), quant], "llama-quantize")
    return out


def build_llama(src: Path, build: Path, gpu: bool, jobs: int, extra: tuple[str, ...] = ()) -> None:
    """Configure and build llama-bench and llama-quantize from ``src`` into ``build`` (CMake), unless
    the build has them already: with CUDA for the machine's own GPU (``native``: one architecture, not
    every one) when ``gpu``, without the tests, examples and server, plus ``extra`` CMake arguments
    (``-DGGML_CUDA_FA=OFF`` leaves the flash-attention kernels out: a shorter build)."""
    if (build / "bin" / "llama-bench").is_file() and (build / "bin" / "llama-quantize").is_file():
        return
    cuda = ["-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=native"] if gpu else ["-DGGML_CUDA=OFF"]
    lean = [f"-DLLAMA_BUILD_{part}=OFF" for part in ("TESTS", "EXAMPLES", "SERVER", "APP")]
    _run(["cmake", "-S", str(src), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *cuda, "-DLLAMA_CURL=OFF", *lean,
          *extra], "cmake (configure)")  # fmt: skip
    _run(["cmake", "--build", str(build), "--target", "llama-bench", "llama-quantize", "-j", str(jobs)], "cmake")


def llama_bench_command(
    build: Path, gguf: Path, threads: int, prompt: int, tokens: int, gpu: bool = False, experts_on_cpu: bool = False
) -> list[str]:
    """llama-bench's command line: CPU only, or (``gpu``) every layer offloaded, experts kept on the
    CPU with ``experts_on_cpu``."""
    cmd = [
        str(build / "bin" / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-p", str(prompt),
        "-n", str(tokens), "-r", "1", "-o", "json", "-ngl", "99" if gpu else "0",
    ]  # fmt: skip
    return cmd + (["-ot", "exps=CPU"] if gpu and experts_on_cpu else [])


def llama_bench(build: Path, gguf: Path, threads: int, prompt: int, tokens: int, **gpu: bool) -> dict[str, float]:
    cmd = llama_bench_command(build, gguf, threads, prompt, tokens, **gpu)
    rows = json.loads(_run(cmd, "llama-bench"))
    pp = next(r for r in rows if r["n_prompt"] and not r["n_gen"])
    tg = next(r for r in rows if r["n_gen"] and not r["n_prompt"])
    return {"prefill_tok_s": float(pp["avg_ts"]), "decode_tok_s": float(tg["avg_ts"])}


def fmoe_bench(packed: Path, threads: int, prompt: int, tokens: int, path: str, extra: list[str]) -> dict[str, float]:
    cmd = [
        sys.executable, "-P", "-m", "fmoe", "bench", "model", str(packed.resolve()), "--threads", str(threads),
        "--prompt-tokens", str(prompt), "--tokens", str(tokens), *extra, "--json",
    ]  # fmt: skip
    env = None if path == "installed" else {**os.environ, "PYTHONPATH": str(Path(path).resolve())}
    doc = json.loads(_run(cmd, "fmoe bench model", env))
    return {"prefill_tok_s": doc["prefill"]["tokens_per_second"], "decode_tok_s": doc["decode"]["tokens_per_second"]}


def _fmoe_options(args: argparse.Namespace) -> list[str]:
    """fmoe bench model's options for the comparison: the CPU backend's I/O, or on a GPU the torch
    backend on CUDA with decode replayed from a CUDA graph; ``--int8-dot`` on either."""
    int8 = ["--int8-dot"] if args.int8_dot else []
    if args.gpu:
        return ["--backend", "torch", "--device", "cuda", "--cuda-graph", *int8]
    return ["--io", args.io, *int8]


def _run(cmd: list[str], what: str, env: dict[str, str] | None = None) -> str:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=tempfile.gettempdir(), env=env)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"error: {what} failed ({out.returncode}): {' | '.join(tail)}")
    return out.stdout


def paired_ratios(llama: list[dict[str, float]], fmoe: list[dict[str, float]]) -> dict[str, float]:
    """The median over rounds of each round's fmoe / llama.cpp ratio (prefill speed; decode time per
    token as llama.cpp's over fmoe's, <= 1 is faster): on a machine whose speed drifts, the two runs
    of a round share its state, so their ratio moves less than the ratio of the medians."""
    prefill = [f["prefill_tok_s"] / ll["prefill_tok_s"] for ll, f in zip(llama, fmoe, strict=True)]
    decode = [ll["decode_tok_s"] / f["decode_tok_s"] for ll, f in zip(llama, fmoe, strict=True)]
    return {"prefill_tok_s": statistics.median(prefill), "decode_ms_per_token": statistics.median(decode)}


def _key(engine: str, pair: int, threads: int) -> str:
    """A run's name: the engine, the slice (0, or 1 for --per-layer's) and the thread count."""
    return f"{engine}{pair}@{threads}"


def speedups(runs: dict[str, list[dict[str, float]]], engine: str, threads: list[int]) -> dict[str, dict[str, float]]:
    """Each later thread count's speed over the first's, for the first slice: the median over rounds
    of each round's ratio (the runs of a round share the machine's state), prefill and decode."""
    first = runs[_key(engine, 0, threads[0])]
    out = {}
    for t in threads[1:]:
        later = runs[_key(engine, 0, t)]
        out[str(t)] = {
            m: statistics.median(b[m] / a[m] for a, b in zip(first, later, strict=True))
            for m in ("prefill_tok_s", "decode_tok_s")
        }
    return out


def measure(pairs: list[tuple[Path, Path]], args: argparse.Namespace) -> dict[str, Any]:
    if args.build:
        build_llama(args.llama_src, args.llama_build, args.gpu, os.cpu_count() or 1, tuple(args.cmake_arg))
    ggufs = [make_gguf(src, args.llama_src, args.llama_build, args.quant, args.workdir) for src, _ in pairs]
    gpu = {"gpu": args.gpu, "experts_on_cpu": args.experts_on_cpu}
    threads: list[int] = args.threads
    runs: dict[str, list[dict[str, float]]] = {
        _key(e, i, t): [] for t in threads for i in range(len(pairs)) for e in ("llama", "fmoe")
    }
    for _ in range(args.rounds):  # alternating: drifting machine load hits both engines (and counts) alike
        for t in threads:
            for i, ((_, packed), gguf) in enumerate(zip(pairs, ggufs, strict=True)):
                runs[_key("llama", i, t)].append(
                    llama_bench(args.llama_build, gguf, t, args.prompt_tokens, args.tokens, **gpu)
                )
                runs[_key("fmoe", i, t)].append(
                    fmoe_bench(packed, t, args.prompt_tokens, args.tokens, args.fmoe_path, _fmoe_options(args))
                )
    med = {
        k: {m: statistics.median(r[m] for r in v) for m in ("prefill_tok_s", "decode_tok_s")} for k, v in runs.items()
    }
    doc: dict[str, Any] = {
        "threads": threads,
        "quant": args.quant,
        "io": args.io,
        "int8_dot": args.int8_dot,
        "gpu": args.gpu,
        "experts_on_cpu": args.experts_on_cpu,
        "rounds": args.rounds,
        "median": med,
        "runs": runs,
        "ratio_fmoe_over_llama": {},
        "ratio_per_round_median": {},
    }
    for t in threads:  # keyed by the thread count
        llama, fmoe = med[_key("llama", 0, t)], med[_key("fmoe", 0, t)]
        doc["ratio_fmoe_over_llama"][str(t)] = {
            "prefill_tok_s": fmoe["prefill_tok_s"] / llama["prefill_tok_s"],
            "decode_ms_per_token": llama["decode_tok_s"] / fmoe["decode_tok_s"],
        }
        doc["ratio_per_round_median"][str(t)] = paired_ratios(runs[_key("llama", 0, t)], runs[_key("fmoe", 0, t)])
    if len(threads) > 1:
        doc["speedup_over_first_threads"] = {e: speedups(runs, e, threads) for e in ("llama", "fmoe")}
    if len(pairs) == 2:
        layers = [_layers(src) for src, _ in pairs]
        per_layer: dict[str, dict[str, float]] = {}
        for t in threads:
            per_layer[str(t)] = {}
            for e in ("llama", "fmoe"):
                ms = [1e3 / med[_key(e, i, t)]["decode_tok_s"] for i in range(2)]
                per_layer[str(t)][e] = (ms[1] - ms[0]) / (layers[1] - layers[0])
            doc["ratio_fmoe_over_llama"][str(t)]["decode_ms_per_layer"] = (
                per_layer[str(t)]["fmoe"] / per_layer[str(t)]["llama"]
            )
        doc["decode_ms_per_layer"] = per_layer
    return doc


def _layers(source: Path) -> int:
    cfg = json.loads((source / "config.json").read_text())
    return int(cfg.get("text_config", cfg)["num_hidden_layers"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path)
    ap.add_argument("packed", type=Path)
    ap.add_argument("--llama-build", type=Path, required=True, help="a llama.cpp build folder (bin/llama-bench)")
    ap.add_argument("--llama-src", type=Path, required=True, help="its source tree (convert_hf_to_gguf.py)")
    ap.add_argument(
        "--threads",
        type=int,
        nargs="+",
        default=[os.cpu_count() or 1],
        help="one or more thread counts (several: each engine's speed-up over the first too)",
    )
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--quant", default="Q4_0")
    ap.add_argument("--io", default="mmap", help="fmoe's --io: mmap (llama.cpp maps its model too) or pread")
    ap.add_argument("--int8-dot", action="store_true", help="fmoe's --int8-dot (int8 activations, as llama.cpp's)")
    ap.add_argument("--gpu", action="store_true", help="both engines on a CUDA GPU (llama.cpp -ngl 99, fmoe torch)")
    ap.add_argument("--experts-on-cpu", action="store_true", help="with --gpu: llama.cpp's experts on the CPU")
    ap.add_argument("--build", action="store_true", help="build llama.cpp from --llama-src first (CMake)")
    ap.add_argument("--cmake-arg", action="append", default=[], help="with --build: one more CMake argument")
    ap.add_argument("--fmoe-path", default="installed", help="run fmoe from this PYTHONPATH folder (a pinned build)")
    ap.add_argument("--per-layer", nargs=2, type=Path, metavar=("SOURCE2", "PACKED2"))
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "fmoe-llama-compare")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.experts_on_cpu and not args.gpu:
        ap.error("--experts-on-cpu needs --gpu")
    # absolute: llama.cpp's converter runs in another folder
    pairs = [(args.source, args.packed)] + ([tuple(args.per_layer)] if args.per_layer else [])
    doc = measure([(source.resolve(), packed.resolve()) for source, packed in pairs], args)
    if args.json:
        print(json.dumps(doc, indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    where = "CUDA GPU" + (", llama.cpp experts on the CPU" if args.experts_on_cpu else "") if args.gpu else "CPU"
    counts = ", ".join(map(str, args.threads))
    title = f"fmoe vs llama.cpp {args.quant}, {where}, {counts} threads, median of {args.rounds}"
    table = Table(title=title)
    for col in ("engine", "slice", "threads", "prefill tok/s", "decode tok/s", "decode ms/token"):
        table.add_column(col, justify="left" if col in ("engine", "slice") else "right")
    for t in args.threads:
        for i, (source, _) in enumerate(pairs):
            for e in ("llama", "fmoe"):
                m = doc["median"][_key(e, i, t)]
                table.add_row(e, source.name, str(t), f"{m['prefill_tok_s']:.1f}", f"{m['decode_tok_s']:.2f}",
                              f"{1e3 / m['decode_tok_s']:.1f}")  # fmt: skip

    def rounded(d: dict[str, Any]) -> dict[str, Any]:
        return {k: rounded(v) if isinstance(v, dict) else round(v, 3) for k, v in d.items()}

    console = Console()
    console.print(table)
    console.print("ratio of the medians, by threads", rounded(doc["ratio_fmoe_over_llama"]))
    console.print("median of the rounds' ratios, by threads", rounded(doc["ratio_per_round_median"]))
    if "speedup_over_first_threads" in doc:
        console.print(f"speed-up over {args.threads[0]} threads", rounded(doc["speedup_over_first_threads"]))
    if "decode_ms_per_layer" in doc:
        console.print("decode ms/layer, by threads", rounded(doc["decode_ms_per_layer"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
