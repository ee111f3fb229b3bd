"""A CUDA device's ceilings, measured in the same run as the figures they bound: HBM read bandwidth
(a reduction over a buffer far larger than the L2, timed with CUDA events) and the host-to-device
link (copies from page-locked host memory)."""

from __future__ import annotations

from collections.abc import Callable

import torch


def best_ms(fn: Callable[[], object], repeat: int) -> float:
    """Best of ``repeat`` timings of ``fn`` in milliseconds, by CUDA events, after one untimed call."""
    fn()  # warm-up: kernel load, first touch
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end))
    return best


def graph_us(calls: list[Callable[[], object]], repeat: int = 5) -> float:
    """Microseconds per call of ``calls`` captured in one CUDA graph and replayed, as decode runs its
    kernels (best of ``repeat`` replays, by CUDA events); the first two calls run once outside the
    capture, so that compilation stays out of it."""
    for fn in calls[:2]:
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for fn in calls:
            fn()
    best = float("inf")
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        best = min(best, start.elapsed_time(end) * 1e3 / len(calls))
    return best


def hbm_read_bandwidth(device: torch.device, nbytes: int = 4 << 30, repeat: int = 5) -> float:
    """Best-of-``repeat`` GB/s of ``torch.sum`` over ``nbytes`` of float32 (read once, nothing written)."""
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 2)  # what the loaded model left (>> the L2)
    x = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    ms = best_ms(x.sum, repeat)
    return nbytes / (ms * 1e-3) / 1e9


def host_to_device_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeat: int = 5) -> float:
    """Best-of-``repeat`` GB/s copying ``nbytes`` from page-locked host memory to the device."""
    nbytes = min(nbytes, torch.cuda.mem_get_info(device)[0] // 2)
    src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    ms = best_ms(lambda: dst.copy_(src, non_blocking=True), repeat)
    return nbytes / (ms * 1e-3) / 1e9


class SideCopy:
    """A copy of ``nbytes`` from page-locked host memory to ``device`` on a stream of its own, to run
    while the host works (the link reading host memory, as decode's direct reads do): :meth:`start`
    queues it between two timing events and returns them."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        self.nbytes = nbytes
        self.src = torch.ones(nbytes, dtype=torch.uint8).pin_memory()
        self.dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
        self.stream = torch.cuda.Stream(device)

    def start(self) -> tuple[torch.cuda.Event, torch.cuda.Event]:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(self.stream):
            start.record()
            self.dst.copy_(self.src, non_blocking=True)
            end.record()
        return start, end


def shared_host_read_bandwidth(device: torch.device, copy_bytes: int = 4 << 30, repeat: int = 3) -> float | None:
    """GB/s host memory gives the link and the CPU's threads together: a copy from page-locked
    memory to ``device`` on a stream of its own while the threads stream a buffer of their own (the
    CPU's probe, runtime/kernels/membw.py), the copy's bytes over its CUDA-event time plus the
    threads' bytes over the passes that ran while it did; best of ``repeat``. This is how decode reads
    host memory with ``--host-compute`` over direct reads (the device's kernels and the host's
    workers at once), which the CPU's probe alone does not show: on the H200 box the two together
    took 1.5x what its 16 threads read alone. None where the device has too little memory free for
    the copy."""
    import time

    from fmoe.runtime.kernels.membw import read_buffer, read_pass

    copy_bytes = min(copy_bytes, torch.cuda.mem_get_info(device)[0] // 2)
    if copy_bytes < 64 << 20:  # too little device memory left for a copy that outlasts a few passes
        return None
    copy = SideCopy(device, copy_bytes)
    words = read_buffer(512 << 20)  # far larger than the caches (105 MiB of L3 on the H200 box), several passes a copy
    read_pass(words)
    best = 0.0
    for _ in range(repeat + 1):  # (the first: warm-up)
        start, end = copy.start()
        passes, t0 = 0, time.perf_counter()
        while not end.query():
            read_pass(words)
            passes += 1
        cpu_seconds = time.perf_counter() - t0
        end.synchronize()
        link_rate = copy_bytes / (start.elapsed_time(end) * 1e-3)
        cpu_rate = passes * words.nbytes / cpu_seconds if passes else 0.0
        best = max(best, (link_rate + cpu_rate) / 1e9)
    return best
