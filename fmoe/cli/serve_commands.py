"""`fmoe serve`: the OpenAI- and Anthropic-compatible HTTP server with a chat page (docs/SERVING.md)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from fmoe.cli import command, options
from fmoe.cli.console import err_console
from fmoe.errors import FmoeError


def _need_serve_extra() -> None:
    try:
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise FmoeError("fmoe serve needs the server packages: pip install 'fmoe[serve]'") from None


@command("serve")
def serve(
    packed: Annotated[Path, typer.Argument(help="Packed model directory.")],
    host: Annotated[str, typer.Option(help="Address to listen on (127.0.0.1: this machine only).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port (0: any free port).")] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key", help="Require this key (Authorization: Bearer KEY or x-api-key); default $FMOE_API_KEY."
        ),
    ] = None,
    model_name: Annotated[
        str | None, typer.Option(help="Model id the API reports (default: the directory's name).")
    ] = None,
    bits: Annotated[int, typer.Option(help="Expert bit width: 4 or 2.")] = 4,
    k: Annotated[int | None, typer.Option("--k", help="Experts per token (default: the model's own).")] = None,
    backend: options.Backend = "cpu",
    device: options.Device = None,
    threads: options.Threads = None,
    io: options.Io = "pread",
    int8_dot: options.Int8Dot = False,
    cuda_graph: options.CudaGraph = False,
    host_reads: options.HostReads = "copy",
    gpu_cache_gb: options.GpuCacheGb = None,
    host_compute: options.HostCompute = "off",
    host_bits: options.HostBits = None,
    prefill_chunk: options.PrefillChunk = None,
    cache_gb: options.CacheGb = 0.0,
    checks: options.Checks = "first-read",
    max_context: Annotated[int | None, typer.Option(help="Context limit in tokens (default: the model's).")] = None,
    max_queue: Annotated[
        int, typer.Option(help="Requests that may wait for the engine; more get 503 + Retry-After.")
    ] = 16,
    max_tokens: Annotated[int, typer.Option(help="Answer length when a request gives none.")] = 4096,
    prefix_cache_gb: Annotated[
        float, typer.Option(help="Memory for saved prompt states (prefix reuse); 0 turns it off.")
    ] = 2.0,
    no_think: Annotated[bool, typer.Option("--no-think", help="Thinking off unless a request turns it on.")] = False,
    log_level: Annotated[
        str, typer.Option(help="uvicorn's log level: critical, error, warning, info, debug.")
    ] = "info",
) -> None:
    """Serve a packed model over HTTP: OpenAI (/v1/chat/completions, /v1/completions, /v1/models),
    Anthropic (/v1/messages), /health, /metrics and a chat page at /."""
    from fmoe.cli.runtime_commands import check_run_options
    from fmoe.runtime.loader import check_packed_dir

    _need_serve_extra()
    if not 0 <= port <= 65535:
        raise FmoeError(f"--port {port}: must be between 0 and 65535")
    if max_queue < 1:
        raise FmoeError(f"--max-queue {max_queue}: must be >= 1")
    if max_tokens < 1:
        raise FmoeError(f"--max-tokens {max_tokens}: must be >= 1")
    if log_level not in ("critical", "error", "warning", "info", "debug"):
        raise FmoeError(f"--log-level {log_level!r}: one of critical, error, warning, info, debug")
    check_run_options(tokens=max_tokens, checks=checks)
    options.gb_to_bytes(cache_gb)  # the options fail now, not after the server started
    options.int8_backend_options(int8_dot, backend)
    prefix_bytes = options.gb_to_bytes(prefix_cache_gb, "--prefix-cache-gb")
    check_packed_dir(packed, bits)  # a wrong path fails now, not after the server started
    api_key = api_key if api_key is not None else os.environ.get("FMOE_API_KEY") or None
    if api_key is not None and not api_key.strip():
        raise FmoeError("--api-key: empty")
    if host not in ("127.0.0.1", "localhost", "::1") and api_key is None:
        err_console.print(
            f"[yellow]warning:[/] listening on {host} without --api-key: anyone who reaches it can use it"
        )

    import uvicorn

    from fmoe.runtime.serve.app import create_app
    from fmoe.runtime.serve.server import uvicorn_config

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def load() -> object:
        return options.load_engine(
            packed, bits=bits, k=k, backend=backend, device=device, threads=threads, io=io, int8_dot=int8_dot,
            cache_gb=cache_gb, checks=checks, max_context=max_context, cuda_graph=cuda_graph,
            gpu_cache_gb=gpu_cache_gb, host_reads=host_reads, host_compute=host_compute, host_bits=host_bits,
            prefill_chunk=prefill_chunk,
        )  # fmt: skip

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    app = create_app(
        load,
        model_id=model_name or packed.resolve().name,
        api_key=api_key,
        thinking=not no_think,
        max_queue=max_queue,
        prefix_cache_bytes=prefix_bytes,
        max_tokens_default=max_tokens,
        on_load_error=on_load_error,
    )
    err_console.print(f"fmoe serve: loading {packed}; the chat page and API at http://{host}:{port}/ (Ctrl-C stops)")
    server = uvicorn.Server(uvicorn_config(app, host, port, log_level))
    server.run()
    if failure:
        raise FmoeError(failure[0])
