"""Host-homed experts computed by the host inside a device's decode step (``--host-compute`` with
``--host-reads direct``): :class:`DeviceCoCompute` ties the host's workers (cocompute.py) to the
device's launches (runtime/kernels/triton_cocompute.py).

A decode layer then runs: the hand-over (the host's jobs chosen among the token's host-homed choices,
their rows, weights and the layer's input written to page-locked memory, then the layer's step
number posted to the host's ``mark``), the expert kernels on the rest (the jobs' experts -1 in their map),
and the wait for the host's sum, added to the output. All of it is device work in stream order: no
host round trip, so the step is still one CUDA graph, and the host computes while the link carries
the other host-homed experts. Only decode (one token) is shared; a prefill reads every expert itself.
"""

from __future__ import annotations

import numpy as np
import torch

from fmoe.errors import FmoeError
from fmoe.formats.packed import ExpertLayout
from fmoe.runtime.experts.cocompute import Alloc, HostCoCompute, default_cores
from fmoe.runtime.kernels import triton_cocompute

MAX_JOBS = 8  # host jobs a layer at most (the host's share of K choices: a few experts)


def tensor_alloc(pin: bool) -> tuple[Alloc, dict[int, torch.Tensor]]:
    """:class:`HostCoCompute`'s ``alloc`` as torch tensors (page-locked with ``pin``), and the tensors
    it made by address (an array's ``ctypes.data``), for the device's launches and copies."""
    made: dict[int, torch.Tensor] = {}

    def alloc(shape: tuple[int, ...], dtype: type) -> np.ndarray:
        t = torch.zeros(shape, dtype=torch.int64 if dtype is np.int64 else torch.float32, pin_memory=pin)
        made[t.data_ptr()] = t
        return t.numpy()

    return alloc, made


class DeviceCoCompute:
    """The host's share of each decode layer's host-homed experts, ``share`` of them (rounded), on
    ``threads`` workers (int8 activations with ``int8`` where the CPU has integer dots) reading
    ``host_rows`` (the page-locked rows the device reads too) laid out as ``layout``."""

    def __init__(
        self,
        host_rows: np.ndarray,
        layout: ExpertLayout,
        layers: int,
        num_experts: int,
        device: torch.device,
        share: float,
        threads: int,
        int8: bool = False,
        max_jobs: int = MAX_JOBS,
    ) -> None:
        if not 0.0 <= share <= 1.0:
            raise FmoeError(f"--host-compute {share}: the host's share must be between 0 and 1")
        pin = device.type == "cuda"
        alloc, pinned = tensor_alloc(pin)
        self.host = HostCoCompute(host_rows, layout, layers, max_jobs, threads, int8=int8, alloc=alloc,
                                  cores=default_cores(threads) if pin else None)  # fmt: skip
        h = self.host
        self._mark, self._flag, self._jobs, self._weights, self._x, self._out = (
            pinned[a.ctypes.data] for a in (h.mark, h.flag, h.jobs, h.weights, h.x, h.out)
        )
        self.steps = torch.zeros(layers, dtype=torch.int64, device=device)  # each layer's hand-overs so far
        self.share = torch.tensor([share], dtype=torch.float32, device=device)
        self.computed = torch.zeros(layers, dtype=torch.int32, device=device)  # jobs handed over, per layer
        self._override = torch.empty((layers, num_experts), dtype=torch.int32, device=device)
        self._failed = torch.zeros(1, dtype=torch.int32, device=device)
        # both read back with a pass's routed counters (PlacedExperts.maintain), never waited for there
        self._computed_read = torch.zeros(layers, dtype=torch.int32, pin_memory=pin)
        self._failed_read = torch.zeros(1, dtype=torch.int32, pin_memory=pin)
        self.device = device

    def hand_over(
        self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, host_map: torch.Tensor
    ) -> torch.Tensor:
        """Queue ``layer``'s hand-over for one token and post its step; returns the map the device's
        kernels take instead of ``host_map`` (the jobs' experts -1)."""
        at = slice(layer, layer + 1)
        return triton_cocompute.hand_over(
            ids, weights, host_map, self.share, self._override[layer], x, self._jobs[layer], self._weights[layer],
            self._x[layer], self.steps[at], self.computed[at], self._mark[at],
        )  # fmt: skip

    def add_host_sum(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """Queue the wait for ``layer``'s host sum and its add to ``out`` (one token, in place)."""
        return triton_cocompute.add_host_sum(
            self._flag[layer : layer + 1], self.steps[layer : layer + 1], self._out[layer], out, self._failed
        )

    def queue_read(self) -> None:
        """Queue the read of the jobs handed over since the last read (and of the device's give-up
        flag) into page-locked memory; :meth:`take_in` takes them once the caller's event has passed."""
        self._computed_read.copy_(self.computed, non_blocking=True)
        self.computed.zero_()
        self._failed_read.copy_(self._failed, non_blocking=True)

    def take_in(self) -> np.ndarray:
        """The jobs a layer handed over up to the last :meth:`queue_read` (int64 ``[layers]``); raises
        where the host failed (a worker's error, jobs that did not fit) or the device gave up on it."""
        try:
            self.host.check()
        except RuntimeError as e:
            raise FmoeError(f"--host-compute: {str(e).removeprefix('host co-compute: ')}") from None
        if int(self._failed_read[0]):
            raise FmoeError("--host-compute: the device gave up waiting for the host's experts")
        return self._computed_read.numpy().astype(np.int64)

    def measured_share(self, rounds: int = 8, repeats: int = 4, copy_bytes: int = 256 << 20) -> float:
        """The share of host-homed experts that balances both sides: the host's rate on a few of its
        rows over the sum of that and the link's copy rate (a CUDA device; else an even split). The
        host's rate is taken while a copy over the link runs, as in decode (both read the same host
        memory; measured alone, it gave 0.68 on a machine where 0.6 decoded 1.3x faster): ``repeats``
        computes back to back inside each of ``rounds`` copies, the median of all but each round's
        first and the whole first round (the workers nap when idle, and the first compute after a
        nap pays for the wake-up: one compute a copy gave 0.34-0.68 between runs on one machine)."""
        if self.device.type != "cuda":
            return 0.5
        import time

        from fmoe.runtime.kernels.gpu_bandwidth import SideCopy, host_to_device_bandwidth

        link_rate = host_to_device_bandwidth(self.device)
        copy = SideCopy(self.device, min(copy_bytes, torch.cuda.mem_get_info(self.device)[0] // 4))
        rows = list(range(min(2, self.host.slab.shape[0])))
        x = np.random.default_rng(0).standard_normal(self.host.x.shape[1]).astype(np.float32)
        seconds = []
        for r in range(rounds):
            _, end = copy.start()  # (milliseconds: the computes below run inside it)
            for i in range(repeats):
                t0 = time.perf_counter()
                self.host.compute(x, rows, [1.0] * len(rows))
                if r and i:
                    seconds.append(time.perf_counter() - t0)
            end.synchronize()
        self.steps.copy_(torch.from_numpy(self.host.mark.copy()))  # the device's steps go on from the host's
        host_rate = len(rows) * self.host.slab.shape[1] / float(np.median(seconds)) / 1e9
        return host_rate / (host_rate + link_rate)

    def close(self) -> None:
        self.host.close()
