"""Runtime commands: run (generate text from a packed model), demo (the newcomer's first command)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from fmoe.cli import command, options
from fmoe.cli.console import console, err_console
from fmoe.errors import FmoeError

DEMO_PROMPT = "import os\nimport sys\n\n\ndef main(argv=None):"


def check_run_options(*, tokens: int, checks: str, **sampling: Any) -> None:
    """The options `fmoe run` and `fmoe bench model` share, checked before any loading."""
    from fmoe.runtime.experts.files import CHECKS
    from fmoe.runtime.text.sampling import SamplingParams

    if tokens < 0:
        raise FmoeError(f"--tokens {tokens}: must be >= 0")
    if checks not in CHECKS:
        raise FmoeError(f"--checks {checks!r}: must be one of {', '.join(CHECKS)}")
    SamplingParams(**sampling)


def _verify_first(packed: Path, bits: int) -> dict[str, Any]:
    """`fmoe verify` the directory; a one-line error unless it is sound and has verified ``bits``-bit experts."""
    from fmoe.convert.verify import verify

    report = verify(packed)
    bad = report["bad"]
    if not report["ok"]:
        first = bad[0] if bad else {"file": str(packed), "problem": "verification failed"}
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise FmoeError(f"{packed}: fails `fmoe verify`: {first['file']}: {first['problem']}{more}")
    if bits not in report["expert_bits"]:
        raise FmoeError(f"{packed}: no verified {bits}-bit experts")
    return report


@command("run")
def run(
    packed: Annotated[Path, typer.Argument(help="Packed model directory (from `fmoe extract` + `fmoe repack`).")],
    prompt: Annotated[str, typer.Option("--prompt", "-p", help="The prompt (a user message unless --raw).")],
    tokens: Annotated[int, typer.Option("--tokens", "-n", help="Maximum tokens to generate.")] = 256,
    bits: Annotated[int, typer.Option(help="Expert bit width: 4 or 2.")] = 4,
    k: Annotated[int | None, typer.Option("--k", help="Experts per token (default: the model's own).")] = None,
    raw: Annotated[bool, typer.Option("--raw", help="Feed the prompt as is, without the chat template.")] = False,
    timing: Annotated[
        bool, typer.Option("--timing", help="Print a per-layer phase breakdown and tok/s to stderr.")
    ] = False,
    as_json: Annotated[
        bool,
        typer.Option("--json", help="Print one JSON object (prompt_tokens, tokens, text, timing) and nothing else."),
    ] = False,
    temperature: options.Temperature = 0.0,
    top_p: options.TopP = 1.0,
    top_k: options.TopK = 0,
    seed: options.SamplingSeed = None,
    stop: Annotated[list[str] | None, typer.Option("--stop", help="Stop when this text appears (repeatable).")] = None,
    no_think: Annotated[
        bool, typer.Option("--no-think", help="Turn the model's thinking off (chat template).")
    ] = False,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    cache_gb: options.CacheGb = 0.0,
    checks: options.Checks = "first-read",
    verify_first: Annotated[bool, typer.Option("--verify", help="Run `fmoe verify` on the directory first.")] = False,
    max_context: Annotated[
        int | None, typer.Option(help="Context limit in tokens (default: the model's max_position_embeddings).")
    ] = None,
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
) -> None:
    """Generate text from a packed model, streaming it to stdout."""
    from fmoe.runtime.loader import check_packed_dir

    check_run_options(tokens=tokens, checks=checks, temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if verify_first:
        check_packed_dir(packed, bits)
        _verify_first(packed, bits)
    model = options.load_engine(
        packed, bits=bits, k=k, backend=backend, device=device, threads=threads, io=io, int8_dot=int8_dot,
        cache_gb=cache_gb, checks=checks, max_context=max_context, cuda_graph=cuda_graph,
        gpu_cache_gb=gpu_cache_gb, host_reads=host_reads, host_compute=host_compute, host_bits=host_bits,
        prefill_chunk=prefill_chunk,
    )  # fmt: skip
    request: dict[str, Any] = dict(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        stop=stop or (),
        chat=not raw,
        thinking=not no_think,
        system=system,
    )
    result = None
    with model:
        for chunk in model.stream(prompt, tokens, **request):
            result = chunk.result or result
            if not as_json and chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
    assert result is not None  # the last chunk carries it
    if as_json:
        doc = {
            "prompt_tokens": result.prompt_tokens,
            "tokens": len(result.token_ids),
            "text": result.text,
            "finish_reason": result.finish_reason,
            "token_ids": result.token_ids,
            "timing": result.timing.to_dict(),
        }
        typer.echo(json.dumps(doc))
    else:
        sys.stdout.write("\n")
        sys.stdout.flush()
    if timing:  # tables go to stderr, so --json's stdout stays one object
        from fmoe.cli.timing_tables import print_timing

        print_timing(err_console, result.timing, list(model.config.layer_types))


# ---- demo ---------------------------------------------------------------------------------------
def _step(n: int, text: str) -> None:
    console.print(f"[bold cyan]step {n}/6[/] {text}")


DEMO_SAMPLING: dict[str, Any] = {"temperature": 0.6, "top_k": 20, "top_p": 0.95, "seed": 0}  # generation_config.json's


@command("demo")
def demo(
    dir: Annotated[
        Path, typer.Option("--dir", help="Working directory for the demo's files (reused on re-runs).")
    ] = Path("fmoe-demo"),
    prompt: Annotated[str, typer.Option("--prompt", help="Python code for the model to continue.")] = DEMO_PROMPT,
    tokens: Annotated[int, typer.Option("--tokens", help="Tokens to generate.")] = 48,
) -> None:
    """Convert fmoe's trained reference model (extract, repack 4 and 2 bits), verify it and run it on Python code."""
    if tokens < 0:  # before any of the work
        raise FmoeError(f"--tokens {tokens}: must be >= 0")
    from fmoe.convert.extract import extract
    from fmoe.convert.repack import repack
    from fmoe.runtime.eval import reference_model_dir

    source, packed = reference_model_dir(), dir / "packed"
    if not (source / "config.json").is_file():
        raise FmoeError(f"{source}: the reference model is missing from this installation (reinstall fmoe)")
    training = json.loads((source / "training.json").read_text(encoding="utf-8"))
    console.print(
        f"fmoe demo in [bold]{dir}[/]: the whole pipeline on fmoe's [bold]trained reference model[/], a "
        f"{training['parameters'] / 1e6:.1f} M-parameter Qwen3.5-MoE ({_geometry(source)}) trained for "
        f"{training['train_seconds'] / 60:.0f} minutes on the Python standard library's source: it writes "
        "Python-like code, not chat."
    )
    dir.mkdir(parents=True, exist_ok=True)

    _step(1, f"the source checkpoint, official release layout (bf16 safetensors, config, tokenizer): {source}")
    console.print(f"  held-out perplexity {training['heldout']['perplexity']:.2f} (docs/QUALITY.md)")

    _step(2, f"extract the dense weights, tokenizer and chat template -> {packed}")
    report = extract(source, packed)
    console.print(
        f"  {report['tensors']} tensors, {report['bytes'] / 1e6:.1f} MB"
        + (" (reused)" if report.get("skipped") else "")
    )

    _step(3, "repack the routed experts at 4 bits, one file per expert")
    report = repack(source, packed, bits=4)
    console.print(f"  {report['experts']} expert files, {report['bytes'] / 1e6:.1f} MB")

    _step(4, "requantise them to 2 bits beside the 4-bit ones")
    report = repack(packed, packed, bits=2)
    console.print(f"  {report['experts']} expert files, {report['bytes'] / 1e6:.1f} MB")

    _step(5, "verify every file against its checksum")
    report = _verify_first(packed, 2)
    console.print(f"  ok: {report['checked_files']} files, {report['checked_bytes'] / 1e6:.1f} MB checked")

    sampling = " ".join(f"--{k.replace('_', '-')} {v}" for k, v in DEMO_SAMPLING.items())
    _step(6, f"continue Python code ({tokens} tokens, sampled, seeded), 4-bit experts with --timing, then 2-bit")
    for bits in (4, 2):
        timing = " --timing" if bits == 4 else ""
        console.print(
            f"\n  $ fmoe run {packed} --raw --bits {bits} --tokens {tokens} {sampling}{timing} --prompt {prompt!r}"
        )
        console.print(prompt, end="", markup=False, highlight=False, style="dim")
        run(packed, prompt=prompt, tokens=tokens, bits=bits, raw=True, timing=bits == 4, **DEMO_SAMPLING)
    console.print(
        f"\nDone. Try `fmoe eval {packed} --reference {source} --k 4,2,1` (what 2 bits and a smaller K cost), "
        f"`fmoe bench model {packed}`, `fmoe info {packed}`; for a real model: `fmoe download`, `fmoe extract`, "
        "`fmoe repack` (see the README)."
    )


def _geometry(source: Path) -> str:
    text = json.loads((source / "config.json").read_text(encoding="utf-8"))["text_config"]
    kinds = text["layer_types"]
    return (
        f"{len(kinds)} layers: {kinds.count('linear_attention')} DeltaNet + {kinds.count('full_attention')} attention, "
        f"{text['num_experts']} experts, top-{text['num_experts_per_tok']}"
    )
