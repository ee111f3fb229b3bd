"""How many threads the CPU kernels use: by default one per physical core this process may run on
(SMT siblings share a core's vector units and its cache: a second thread per core only adds
contention to bandwidth-bound matvecs)."""

from __future__ import annotations

import os
from pathlib import Path


def physical_cores() -> int:
    """Cores available to this process, SMT siblings counted once (Linux sysfs; else all CPUs)."""
    try:
        cpus = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    cores = set()
    for cpu in cpus:
        try:
            cores.add(Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip())
        except OSError:
            return len(cpus)
    return max(1, len(cores))


def kernel_threads(requested: int | None) -> int:
    """The numba thread count to use: ``requested`` (checked against numba's pool) or the physical cores."""
    import numba

    from fmoe.errors import FmoeError

    pool = int(numba.config.NUMBA_NUM_THREADS)  # type: ignore[attr-defined]  # set at import from the environment
    if requested is None:
        return min(pool, physical_cores())
    if isinstance(requested, bool) or not isinstance(requested, int) or not 1 <= requested <= pool:
        raise FmoeError(f"--threads {requested!r}: must be a whole number between 1 and {pool} (numba's thread pool)")
    return requested


def single_threaded_blas() -> None:
    """Limit the BLAS libraries loaded (numpy's: the CPU backend's attention matmuls) to one thread,
    for the rest of the process. Left alone, BLAS starts a thread per core beside numba's pool once a
    matmul is large enough (a KV cache of about 128 positions), and its idle threads spin on the cores
    the kernels need: on a 16-core host decode after a 128-token prompt ran 2.7x slower than after 64
    tokens. Called at each backend's creation (about 1 ms), not once a process: a BLAS loaded since
    (scipy's, imported with transformers) is limited too."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=1, user_api="blas")
