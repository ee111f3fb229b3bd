"""Benchmarks: `fmoe bench kernels`, `fmoe bench model`, `fmoe bench synthetic` (tables to stdout, `--json`
for scripts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from fmoe.cli import app, command, options

bench_app = typer.Typer(help="Benchmarks (print a table; results go in docs/PERFORMANCE.md).", no_args_is_help=True)
app.add_typer(bench_app, name="bench")


@command("kernels", group=bench_app)
def bench_kernels(
    repeat: Annotated[int, typer.Option(help="Timed calls per case (median reported).")] = 20,
    threads: Annotated[int | None, typer.Option(help="numba threads (default: all cores).")] = None,
    preset: Annotated[
        str,
        typer.Option(help="Geometry the shapes come from (expert matrices, DeltaNet heads); 'tiny' for a smoke test."),
    ] = "qwen3.5-397b-a17b",
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
    backend: Annotated[
        str, typer.Option(help="cpu (numba vs numpy) or mlx (MLX ops vs the Metal kernels of shaders/).")
    ] = "cpu",
) -> None:
    """Time the numba CPU kernels against the numpy reference, side by side (quantised matvec/matmul, delta rule); with --backend mlx, the MLX backend's kernels."""
    import os

    from fmoe.errors import FmoeError

    if repeat < 1:
        raise FmoeError(f"--repeat: must be at least 1, got {repeat}")
    if backend == "mlx":
        _bench_mlx_kernels(repeat, preset, threads, as_json)
        return
    if backend != "cpu":
        raise FmoeError(f"--backend {backend!r}: bench kernels times cpu or mlx")
    if threads is not None and not 1 <= threads <= (os.cpu_count() or 1):
        raise FmoeError(f"--threads: must be between 1 and {os.cpu_count()}, got {threads}")
    from fmoe.cli.console import console, err_console
    from fmoe.runtime.kernels.bench import render_table, run_kernel_bench

    with err_console.status("timing kernels (numpy reference and numba)..."):
        result = run_kernel_bench(repeat, preset=preset, threads=threads)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        console.print(render_table(result))


def _bench_mlx_kernels(repeat: int, preset: str, threads: int | None, as_json: bool) -> None:
    import importlib.util

    from fmoe.errors import FmoeError

    if threads is not None:
        raise FmoeError("--threads: the mlx backend has no thread setting (MLX schedules its own work)")
    if importlib.util.find_spec("mlx") is None:
        raise FmoeError("--backend mlx: needs the mlx package (pip install 'fmoe[metal]'; Linux: 'mlx[cpu]')")
    from fmoe.cli.console import console, err_console
    from fmoe.runtime.backends.mlx_bench import render_mlx_table, run_mlx_kernel_bench

    with err_console.status("timing the mlx backend's kernels (MLX ops and, on Metal, the shaders)..."):
        result = run_mlx_kernel_bench(repeat, preset=preset)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        console.print(render_mlx_table(result))


@command("model", group=bench_app)
def bench_model(
    packed: Annotated[Path, typer.Argument(help="Packed model directory.")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Decode steps to time.")] = 32,
    warm_tokens: Annotated[
        int,
        typer.Option(
            help="Decode steps of the warm-up run (compiles, fills the expert tiers: more reach their steady state)."
        ),
    ] = 2,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random token ids) for the prefill.")] = 64,
    bits: Annotated[int, typer.Option(help="Expert bit width: 4 or 2.")] = 4,
    k: Annotated[int | None, typer.Option("--k", help="Experts per token (default: the model's own).")] = None,
    cache_gb: options.CacheGb = 0.0,
    seed: Annotated[int, typer.Option(help="Seed of the random prompt and the sampler.")] = 0,
    checks: options.Checks = "first-read",
    threads: options.Threads = None,
    io: options.Io = "pread",
    backend: options.Backend = "cpu",
    device: options.Device = None,
    routing: Annotated[
        str,
        typer.Option(
            help="Which experts tokens use: model (the router's own), uniform, zipf[:S] (popularity rank r drawn "
            "with weight r^-S, default 1), or trace:FILE (a recorded routing trace, scripts/routing_trace.py)."
        ),
    ] = "model",
    gpu_cache_gb: options.GpuCacheGb = None,
    host_compute: options.HostCompute = "off",
    host_reads: options.HostReads = "copy",
    host_bits: options.HostBits = None,
    cuda_graph: options.CudaGraph = False,
    int8_dot: options.Int8Dot = False,
    prefill_chunk: options.PrefillChunk = None,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    timing: Annotated[bool, typer.Option("--timing", help="Also print the per-layer phase breakdown.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Prefill and decode tokens/s of a packed model (random prompt; greedy unless told to sample;
    stop tokens ignored)."""
    from fmoe.errors import FmoeError
    from fmoe.runtime.text.sampling import SamplingParams

    if tokens < 1 or prompt_tokens < 1 or warm_tokens < 1:  # before loading: a big model takes a while to load
        raise FmoeError("--prompt-tokens, --tokens and --warm-tokens: must be >= 1")
    if seed < 0:
        raise FmoeError(f"--seed {seed}: must be >= 0")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    with options.load_engine(
        packed, bits=bits, k=k, backend=backend, device=device, threads=threads, io=io, int8_dot=int8_dot,
        cache_gb=cache_gb, checks=checks, gpu_cache_gb=gpu_cache_gb, host_compute=host_compute, host_reads=host_reads,
        host_bits=host_bits, cuda_graph=cuda_graph, prefill_chunk=prefill_chunk,
    ) as model:  # fmt: skip
        result = _measure(model, routing, prompt_tokens, tokens, seed, warm_tokens, sampling)
        layer_types = list(model.config.layer_types)
    _print_bench(str(packed), result, layer_types, timing, as_json)


@command("synthetic", group=bench_app)
def bench_synthetic(
    preset: Annotated[str, typer.Argument(help="Model geometry: a preset name (fmoe synth --help lists them).")],
    layers: Annotated[int | None, typer.Option(help="Keep only the first N layers (default: all).")] = None,
    experts: Annotated[
        int | None, typer.Option(help="Keep only the first N experts of each layer (default: all), as fmoe synth.")
    ] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Decode steps to time.")] = 32,
    warm_tokens: Annotated[
        int,
        typer.Option(
            help="Decode steps of the warm-up run (compiles, fills the expert tiers: more reach their steady state)."
        ),
    ] = 2,
    prompt_tokens: Annotated[int, typer.Option(help="Prompt length (random token ids) for the prefill.")] = 64,
    bits: Annotated[int, typer.Option(help="Expert bit width: 2, 4 or 8.")] = 4,
    dense_bits: Annotated[int, typer.Option(help="Dense matrices' bit width: 4 or 8.")] = 4,
    k: Annotated[int | None, typer.Option("--k", help="Experts per token (default: the model's own).")] = None,
    backend: options.Backend = "torch",
    device: options.Device = None,
    gpu_cache_gb: options.GpuCacheGb = None,
    host_gb: Annotated[
        float,
        typer.Option(
            help="Host memory for experts the device does not hold (page-locked on a GPU; the cpu backend's "
            "experts; GB). Past it, experts share bytes: the amounts moved, and so the timings, stay those of "
            "distinct experts."
        ),
    ] = 8.0,
    host_compute: options.HostCompute = "off",
    host_reads: options.HostReads = "copy",
    host_bits: options.HostBits = None,
    routing: Annotated[str, typer.Option(help="model, uniform, zipf[:S] or trace:FILE (as bench model).")] = "model",
    cuda_graph: options.CudaGraph = False,
    int8_dot: options.Int8Dot = False,
    prefill_chunk: options.PrefillChunk = None,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    seed: Annotated[int, typer.Option(help="Seed of the weights, the prompt and the sampler.")] = 0,
    timing: Annotated[bool, typer.Option("--timing", help="Also print the per-layer phase breakdown.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Prefill and decode of a model of any geometry built in memory with random weights (no files):
    the full-depth 397B measured on the box that runs it. Experts on the GPU as far as its memory
    goes, the rest copied from page-locked host memory."""
    from fmoe.errors import FmoeError
    from fmoe.runtime.engine.runner import GRAPH_SPAN
    from fmoe.runtime.synthetic import synthetic_config, synthetic_engine
    from fmoe.runtime.text.sampling import SamplingParams

    if tokens < 1 or prompt_tokens < 1 or warm_tokens < 1:
        raise FmoeError("--prompt-tokens, --tokens and --warm-tokens: must be >= 1")
    sampling = SamplingParams(temperature, top_k, top_p, seed)
    if bits not in (2, 4, 8):
        raise FmoeError(f"--bits {bits}: must be 2, 4 or 8")
    cfg = synthetic_config(preset, layers, experts)
    engine = synthetic_engine(
        cfg,
        bits=bits,
        dense_bits=dense_bits,
        k=k,
        backend=backend,
        device=device,
        device_cache_bytes=None if gpu_cache_gb is None else options.gb_to_bytes(gpu_cache_gb, "--gpu-cache-gb"),
        host_bytes=options.gb_to_bytes(host_gb, "--host-gb"),
        host_compute=host_compute,
        host_reads=host_reads,
        host_bits=host_bits,
        max_context=prompt_tokens + max(tokens, warm_tokens) + GRAPH_SPAN,  # the KV room `fmoe run` captures
        seed=seed,
        backend_options=options.int8_backend_options(int8_dot, backend),
        cuda_graph=cuda_graph,
        prefill_chunk=prefill_chunk,
    )
    with engine:
        result = _measure(engine, routing, prompt_tokens, tokens, seed, warm_tokens, sampling)
    _print_bench(
        f"synthetic {preset}, {cfg.num_hidden_layers} layers, {cfg.num_experts} experts",
        result,
        list(cfg.layer_types),
        timing,
        as_json,
    )


def _measure(
    engine: Any, routing: str, prompt_tokens: int, tokens: int, seed: int, warm_tokens: int, sampling: Any
) -> Any:
    """`bench model` and `bench synthetic`'s run on a loaded engine, with ``--routing`` resolved."""
    from fmoe.runtime.bench import bench_model
    from fmoe.runtime.routing_trace import routing_source

    cfg = engine.config
    source = routing_source(routing, cfg.num_hidden_layers, cfg.num_experts, engine.k)
    return bench_model(
        engine, prompt_tokens=prompt_tokens, tokens=tokens, seed=seed, routing=source, warm_tokens=warm_tokens,
        sampling=sampling,
    )  # fmt: skip


def _print_bench(title: str, result: Any, layer_types: list[str], timing: bool, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps(result.to_dict()))
        return
    from fmoe.cli.console import console
    from fmoe.cli.timing_tables import bandwidth_table, expert_table, layer_table, throughput_table

    kernels = f", kernels: {result.kernels}" if result.kernels else ""
    threads = f", {result.threads} threads" if result.threads else ""
    replayed = f", routing: {result.routing}" if result.routing != "model" else ""
    graph = ", decode from a CUDA graph" if result.cuda_graph else ""
    if result.prefill.replayed:
        graph += " (the prompt's first chunk too)"
    int8 = ", int8 dot products" if result.int8_dot else ""
    if result.host_bits is not None:
        int8 += f", {result.host_bits}-bit experts in host memory"
    if result.host_compute_share is not None:
        int8 += f", the host computing {result.host_compute_share:.2f} of each decode layer's host-homed experts"
    if result.sampling:
        int8 += ", sampled ({temperature} temperature, top-k {top_k}, top-p {top_p})".format(**result.sampling)
    console.print(
        f"[bold]{title}[/]: {result.bits}-bit experts, K={result.k}, {result.backend} on {result.device}"
        f"{kernels}{int8}{threads}{replayed}{graph}"
    )
    console.print(throughput_table(result.prefill, result.decode))
    console.print(bandwidth_table(result))
    if result.resident_expert_bytes is None:
        console.print(
            expert_table(
                result.prefill,
                result.decode,
                result.bits,
                result.k,
                result.cache_bytes,
                result.host_reads,
                result.host_bits,
            )
        )
    else:
        console.print("Every expert resident on the device: routing never leaves it, no host traffic.")
    if timing and result.prefill.replayed:
        console.print("The prefill's first chunk was replayed from a CUDA graph: no phase breakdown.")
    elif timing and result.cuda_graph:  # a replayed graph has no phase marks: the prefill's breakdown
        title = "Prefill: ms per prompt token (batched)"
        console.print(layer_table(result.prefill.profile, layer_types, result.prompt_tokens, title))
    elif timing:
        console.print(layer_table(result.decode.profile, layer_types, result.tokens, "Decode: ms per token"))
