"""Which of a step's expert misses the host computes instead of copying them to the device.

A device expert tier (runtime/experts/device.py) copies each miss over the host link before the GPU
can compute it. The host can instead compute some misses itself, from the host memory they are
already in, while the link carries the rest: both sides then work at once, and a step's misses take
the longer of the two times instead of their sum. :class:`HostShare` says how many of a step's
misses go to the host.
"""

from __future__ import annotations

from typing import Any

from fmoe.errors import FmoeError

HOST_COMPUTE_MAX_EXPERTS = 64  # host co-computation serves steps routing to at most this many experts


class HostShare:
    """How many of a step's misses the host computes instead of copying them over the link.

    Fixed (a ``share``): that share of every step's misses, rounded with the remainder carried to
    the next step, so the long-run share is the one asked. Adaptive ("auto"): from the measured
    seconds an expert takes each way (moving averages), the count that makes the step's slower side
    fastest, ``max((n - h) * t_link, h * t_host)`` least: none when the host is slower than the link
    by more than the step's misses can share. Every ``EXPLORE_EVERY``-th step gives each side at
    least one expert, so both estimates stay current (a first call that compiles a kernel must not
    park the split for good). Until both are measured it splits half and half."""

    EXPLORE_EVERY = 32

    def __init__(self, share: float, adaptive: bool = False, smoothing: float = 0.2) -> None:
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"host compute share {share}: must be between 0 and 1")
        self.share, self.adaptive, self._smoothing = share, adaptive, smoothing
        self.t_link: float | None = None  # seconds an expert, moving averages
        self.t_host: float | None = None
        self._carry = 0.0
        self._steps = 0

    @classmethod
    def parse(cls, value: str | float | None) -> HostShare | None:
        """None, "off" or 0: no host computation; "auto": adaptive; a number in (0, 1]: that share."""
        if value is None or value in ("off", 0, 0.0):
            return None
        if value == "auto":
            return cls(0.5, adaptive=True)
        try:
            share = float(value)
        except ValueError:
            raise FmoeError(f"--host-compute {value!r}: must be off, auto or a share between 0 and 1") from None
        if not 0.0 <= share <= 1.0:
            raise FmoeError(f"--host-compute {value!r}: must be off, auto or a share between 0 and 1")
        return cls(share) if share else None

    def split(self, misses: int) -> int:
        """How many of ``misses`` the host computes this step."""
        if not self.adaptive or self.t_link is None or self.t_host is None:
            want = misses * self.share + self._carry
            n = min(misses, max(0, int(want + 0.5)))
            self._carry = want - n
            return n
        t_link, t_host = self.t_link, self.t_host
        n = min(range(misses + 1), key=lambda h: max((misses - h) * t_link, h * t_host))
        self._steps += 1
        if misses >= 2 and self._steps % self.EXPLORE_EVERY == 0:
            n = min(max(n, 1), misses - 1)
        return n

    def observe_link(self, seconds: float, experts: int) -> None:
        """The time ``experts`` copies over the link took (for the adaptive split)."""
        if experts:
            self.t_link = self._average(self.t_link, seconds / experts)
            self._balance()

    def observe_host(self, seconds: float, experts: int) -> None:
        """The time the host took to compute ``experts`` (for the adaptive split)."""
        if experts:
            self.t_host = self._average(self.t_host, seconds / experts)
            self._balance()

    def _balance(self) -> None:
        if self.adaptive and self.t_link and self.t_host:  # the continuous balance, reported
            self.share = self.t_link / (self.t_link + self.t_host)

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self._smoothing * (new - old)


HOST_READS = ("copy", "direct")  # how a device reaches the experts it does not hold: device.py, or placed.py


def check_host_reads(host_reads: str) -> None:
    """A one-line error for an unknown ``--host-reads`` (free of torch, so that a CPU-only install checks it)."""
    if host_reads not in HOST_READS:
        raise FmoeError(f"--host-reads {host_reads!r}: must be one of {', '.join(HOST_READS)}")


def check_direct_share(backend: Any) -> None:
    """``--host-compute`` with ``--host-reads direct`` needs the hand-over kernel (Triton): a one-line
    error on the torch backend's plain-torch kernels, before anything is loaded."""
    if getattr(backend, "kernels", None) != "triton":
        raise FmoeError("--host-compute with --host-reads direct: needs the torch backend's Triton kernels (a GPU)")


def share_direct_reads(provider: Any, backend: Any, share: HostShare, threads: int | None) -> None:
    """``--host-compute`` with ``--host-reads direct``: ``share`` of each decode layer's host-homed
    choices computed by host workers (``provider.share_with_host``; "auto": the share measured when
    they start), on ``threads`` of them (``--threads``; default a physical core each but one, which
    drives the device), with int8 activations where the backend has ``--int8-dot``."""
    check_direct_share(backend)
    if threads is None:
        from fmoe.runtime.kernels.threads import physical_cores

        threads = max(1, physical_cores() - 1)
    int8 = bool(getattr(backend, "int8", False))
    provider.share_with_host(None if share.adaptive else share.share, threads, int8=int8)


def check_host_bits(host_bits: int | None, bits: int, host_reads: str) -> int | None:
    """``host_bits`` when the host-homed experts take another width than ``bits`` (else None), or a
    one-line error: only 4 or 2, and only where experts have homes in host rows (``--host-reads direct``)."""
    if host_bits is None or host_bits == bits:
        return None
    if isinstance(host_bits, bool) or host_bits not in (4, 2):
        raise FmoeError(f"--host-bits {host_bits!r}: must be 4 or 2")
    if host_reads != "direct":
        raise FmoeError(f"--host-bits {host_bits}: needs --host-reads direct (experts with homes in host memory)")
    return host_bits
