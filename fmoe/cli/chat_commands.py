"""`fmoe chat`: the terminal chat (runtime/chat_repl.py)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from fmoe.cli import command, options
from fmoe.cli.console import err_console
from fmoe.errors import FmoeError


@command("chat")
def chat(
    packed: Annotated[Path, typer.Argument(help="Packed model directory.")],
    prompt: Annotated[
        str | None, typer.Argument(help="Answer this one message and exit (default: the >>> prompt).")
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt.")] = None,
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Most tokens per answer.")] = 2048,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    seed: options.SamplingSeed = None,
    no_think: Annotated[bool, typer.Option("--no-think", help="Turn the model's thinking off.")] = False,
    show_think: Annotated[
        bool, typer.Option("--show-think", help="Show the thinking (dimmed) instead of hiding it.")
    ] = False,
    verbose: Annotated[bool, typer.Option("--verbose", help="Timings after each answer.")] = False,
    session: Annotated[
        Path | None,
        typer.Option("--session", help="Save the conversation to FILE after each answer; resume it if FILE exists."),
    ] = None,
    tools: Annotated[
        Path | None,
        typer.Option(
            "--tools",
            help="JSON list of tools {name, description, parameters, command}; each call is confirmed before it runs.",
        ),
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
) -> None:
    """Chat with a packed model in the terminal (>>> prompt; /help lists the commands)."""
    from fmoe.cli.runtime_commands import check_run_options
    from fmoe.runtime.chat_repl import Chat, Repl, Settings, read_tools, restore_settings, settings_meta
    from fmoe.runtime.engine.session_file import load_session, save_session

    check_run_options(tokens=tokens, checks=checks, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if tokens < 1:
        raise FmoeError(f"--tokens {tokens}: must be >= 1")
    tool_list = read_tools(tools) if tools is not None else []
    if session is not None and session.exists() and not session.is_file():
        raise FmoeError(f"--session {session}: not a regular file")
    settings = Settings(system, temperature, top_p, top_k, seed, tokens, not no_think, show_think, verbose)
    engine = options.load_engine(
        packed, bits=bits, k=k, backend=backend, device=device, threads=threads, io=io, int8_dot=int8_dot,
        cache_gb=cache_gb, checks=checks, max_context=max_context, cuda_graph=cuda_graph,
        gpu_cache_gb=gpu_cache_gb, host_reads=host_reads, host_compute=host_compute, host_bits=host_bits,
        prefill_chunk=prefill_chunk,
    )  # fmt: skip
    with engine:
        conversation = Chat(engine, settings, tool_list)
        if session is not None and session.is_file():
            conversation.session, meta = load_session(session, engine)
            restore_settings(settings, meta)
            err_console.print(f"resumed {len(conversation.session.conversation)} tokens of conversation from {session}")

        def save(path: Path) -> None:
            save_session(path, conversation.session, engine, settings_meta(settings))

        def read(text: str) -> str:
            return input(text)

        def write(text: str) -> None:
            sys.stdout.write(text)
            sys.stdout.flush()

        repl = Repl(conversation, read=read, write=write, color=sys.stdout.isatty(), session_file=session, save=save)
        if prompt is not None:
            repl.ask([{"role": "user", "content": prompt}])
            return
        if sys.stdin.isatty():
            import readline  # noqa: F401  # line editing and history for input()

            err_console.print("fmoe chat: /help for the commands, /bye or Ctrl-D to quit")
        repl.run()
