"""Options that several commands share (run, chat, serve, bench model, eval): one definition each, so
their names, defaults and help read the same everywhere."""

from __future__ import annotations

import math
from typing import Annotated, Any

import typer

Backend = Annotated[str, typer.Option(help="Compute backend: cpu (numba kernels), torch or mlx (Metal).")]
Device = Annotated[
    str | None, typer.Option(help="Device: torch cpu, cuda or cuda:N (default: cuda when present); mlx gpu or cpu.")
]
Threads = Annotated[int | None, typer.Option(help="Compute threads (default: the physical cores).")]
Io = Annotated[
    str,
    typer.Option(
        help="How experts reach the kernels: pread (reader threads into slots; best from a disk) or mmap "
        "(files mapped and computed on in place in the page cache, no copy; best when it holds them, cpu backend)."
    ),
]
Checks = Annotated[
    str,
    typer.Option(
        help="Checksums while running: first-read (dense weights at load, each expert file on its first read), "
        "every-read (each expert read), off (trust the files)."
    ),
]
Temperature = Annotated[float, typer.Option(help="Sampling temperature; 0 = greedy.")]
TopP = Annotated[float, typer.Option(help="Nucleus sampling mass (1 = off).")]
TopK = Annotated[int, typer.Option(help="Sample among the K most likely tokens (0 = off).")]
SamplingSeed = Annotated[int | None, typer.Option(help="Random seed for sampling.")]
CacheGb = Annotated[float, typer.Option(help="In-process expert cache budget in GB (0: the OS page cache only).")]
GpuCacheGb = Annotated[
    float | None,
    typer.Option(
        help="Device expert cache in GB (torch backend; default on CUDA: the free memory after the weights, less "
        "a margin; 0: off). When it holds every expert, all are loaded at start."
    ),
]
HostCompute = Annotated[
    str,
    typer.Option(
        help="Experts in host memory computed on the CPU while the GPU takes the rest: off, auto (from both sides' "
        "measured rates) or a share between 0 and 1 (of the GPU cache's misses; with --host-reads direct, of each "
        "decode layer's host-homed experts, on --threads workers, default a core each but one)."
    ),
]
HostReads = Annotated[
    str,
    typer.Option(
        help="How the GPU reaches the experts it does not hold: copy (each miss copied into its expert cache, "
        "LRU) or direct (every expert has a home, GPU or page-locked host memory, which together must hold them all; "
        "the kernels read host-homed ones over the link in place; the most routed move to the GPU as routing goes)."
    ),
]
HostBits = Annotated[
    int | None,
    typer.Option(
        help="With --host-reads direct: the width of the experts homed in host memory (2: their 2-bit files, half "
        "the link's bytes a read, for the 2-bit error on the choices routed to them, least where the least routed "
        "experts are the ones on the host, as homes follow the routing). Default: --bits.",
    ),
]
CudaGraph = Annotated[
    bool,
    typer.Option(
        "--cuda-graph",
        help="Decode replayed from captured CUDA graphs (torch backend on CUDA): one per step with every expert "
        "on the GPU or read in place (--host-reads direct), else per layer, only routing and the expert cache's "
        "bookkeeping between them. With every expert on the GPU, a prompt's first chunk too, from its length's "
        "second sighting on.",
    ),
]
PrefillChunk = Annotated[
    int | None,
    typer.Option(
        help="The most prompt tokens a forward pass takes (default 2048): a longer prompt runs in chunks, which "
        "bounds its activations' memory.",
    ),
]
Int8Dot = Annotated[
    bool,
    typer.Option(
        "--int8-dot",
        help="Integer dot products on int8 activations, as llama.cpp's: the cpu backend's 4-bit matvecs and "
        "prefill GEMMs (AVX512-VNNI or AVX2 CPUs), the torch backend's Triton matvecs on CUDA (dp4a) and its "
        "prefill's routed experts (int8 tensor cores; in long prefills, weights dequantised to bfloat16 for "
        "cuBLAS and CUTLASS GEMMs instead). Faster for about the error of 4-bit experts.",
    ),
]


def int8_backend_options(int8_dot: bool, backend: str) -> dict[str, bool] | None:
    """The backend options of ``--int8-dot``; a one-line error where it cannot apply."""
    if not int8_dot:
        return None
    from fmoe.errors import FmoeError

    if backend == "torch":  # the backend checks that it runs its Triton kernels
        return {"int8": True}
    if backend != "cpu":
        raise FmoeError("--int8-dot: an option of the cpu and torch backends (--backend cpu|torch)")
    from fmoe.runtime.kernels.int8dot import AVAILABLE

    if not AVAILABLE:
        raise FmoeError("--int8-dot: this CPU has neither AVX512-VNNI nor AVX2 integer dot products")
    return {"int8": True}


def gb_to_bytes(gb: float, option: str = "--cache-gb") -> int:
    """A size in GB (decimal) from ``option`` as bytes; a one-line error naming it for anything else."""
    from fmoe.errors import FmoeError

    if not math.isfinite(gb) or not 0 <= gb <= 1e9:
        raise FmoeError(f"{option} {gb}: must be a number of GB >= 0")
    return int(gb * 1e9)


def load_engine(
    packed: Any,
    *,
    bits: int,
    k: int | None,
    backend: str,
    device: str | None,
    threads: int | None,
    io: str,
    int8_dot: bool,
    cache_gb: float,
    checks: str,
    max_context: int | None = None,
    gpu_cache_gb: float | None = None,
    host_compute: str = "off",
    host_reads: str = "copy",
    host_bits: int | None = None,
    cuda_graph: bool = False,
    prefill_chunk: int | None = None,
) -> Any:
    """``load_model`` with the run options as the commands take them (GB figures, ``--int8-dot``)."""
    from fmoe.runtime.loader import load_model

    return load_model(
        packed,
        bits=bits,
        k=k,
        backend=backend,
        device=device,
        threads=threads,
        io=io,
        backend_options=int8_backend_options(int8_dot, backend),
        cache_bytes=gb_to_bytes(cache_gb),
        device_cache_bytes=None if gpu_cache_gb is None else gb_to_bytes(gpu_cache_gb, "--gpu-cache-gb"),
        checks=checks,
        max_context=max_context,
        host_compute=host_compute,
        host_reads=host_reads,
        host_bits=host_bits,
        cuda_graph=cuda_graph,
        prefill_chunk=prefill_chunk,
    )
