"""Options that several commands share (run, chat, serve, bench model, eval): one definition each, so
their names, defaults and help read the same everywhere."""

from __future__ import annotations

from typing import Annotated

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
CacheGb = Annotated[float, typer.Option(help="In-process expert cache budget in GB (0: the OS page cache only).")]
GpuCacheGb = Annotated[
    float | None,
    typer.Option(
        help="Device expert cache in GB (torch backend; default on CUDA: the free memory after the weights, less "
        "a margin; 0: off). When it holds every expert, all are loaded at start."
    ),
]
CudaGraph = Annotated[
    bool,
    typer.Option("--cuda-graph", help="Decode replayed from a captured CUDA graph (every expert on the GPU)."),
]
